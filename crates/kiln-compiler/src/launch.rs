//! The launch description: what the runtime creates and binds to run a compiled graph, as
//! plain data — each plan buffer's size, each kernel's scratch buffers (chunk tables with
//! their bytes, zeroed running sums) and its dispatches, each with every binding's buffer,
//! offset and size.
//!
//! Why: the schedules that cut a kernel into dispatches (image chunks, spans: `chunks.rs`,
//! `spans.rs`) decide the byte layout of the tables their WGSL reads and which window of a
//! buffer each dispatch sees. Written out here, that layout lives beside the code that reads
//! it, and the runtime executes any description with one loop, knowing no schedule: a new
//! schedule changes the description, not the runtime.

use crate::chunks::Chunks;
use crate::plan::Plan;
use crate::wgsl::{Access, Binding, KernelModule};

/// How to run every kernel of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Per plan buffer: the bytes it must hold at least — its data, plus room past it where
    /// a kernel reads it through chunk windows (the last chunk's aligned window ends past
    /// the data, see `Chunks::window_slack`). The window offsets below assume no more.
    pub buffer_bytes: Vec<u64>,
    /// Per kernel, in execution order (as `Compiled::modules`).
    pub kernels: Vec<KernelLaunch>,
}

/// One kernel's scratch buffers and dispatches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelLaunch {
    /// Buffers the kernel alone uses, created with the program.
    pub scratch: Vec<Scratch>,
    /// Recorded in order, each with its own bind group.
    pub dispatches: Vec<Dispatch>,
}

/// A buffer of one kernel: a chunk table, or a running sum carried from chunk to chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scratch {
    pub label: String,
    pub contents: ScratchContents,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScratchContents {
    /// Created holding these bytes (a multiple of 16).
    Bytes(Vec<u8>),
    /// Created zeroed, this many bytes (a multiple of 16).
    Zeroed(u64),
}

impl ScratchContents {
    pub fn len(&self) -> u64 {
        match self {
            ScratchContents::Bytes(b) => b.len() as u64,
            ScratchContents::Zeroed(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One `dispatch_workgroups` and the bind group it runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispatch {
    pub workgroups: [u32; 3],
    /// Every slot of [`KernelModule::layout`] once, in binding order.
    pub bindings: Vec<BoundResource>,
}

/// What one `@binding(n)` of a dispatch's bind group holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundResource {
    pub binding: u32,
    pub resource: Resource,
}

/// A range of a buffer: `size: None` is everything from `offset` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// Of plan buffer `buffer` (an index into `Plan::buffers`).
    Buffer {
        buffer: usize,
        offset: u64,
        size: Option<u64>,
    },
    /// Of the kernel's scratch buffer `index` (into [`KernelLaunch::scratch`]).
    Scratch {
        index: usize,
        offset: u64,
        size: Option<u64>,
    },
}

/// The launch description of `modules`, the kernels of `plan`.
pub fn launch(plan: &Plan, modules: &[KernelModule]) -> Launch {
    let mut buffer_bytes: Vec<u64> = plan.buffers.iter().map(|b| b.bytes()).collect();
    let mut slack = vec![0u64; plan.buffers.len()];
    for c in modules.iter().filter_map(|m| m.chunks.as_ref()) {
        for w in &c.windows {
            slack[w.buffer] = slack[w.buffer].max(c.window_slack());
        }
    }
    for (bytes, slack) in buffer_bytes.iter_mut().zip(&slack) {
        *bytes += slack;
    }
    let kernels = modules
        .iter()
        .map(|m| match &m.chunks {
            None => KernelLaunch {
                scratch: Vec::new(),
                dispatches: vec![Dispatch {
                    workgroups: m.dispatch,
                    bindings: sorted(m.bindings.iter().flat_map(|b| bound(b, plan)).collect()),
                }],
            },
            Some(c) => chunked(m, c, plan, &buffer_bytes),
        })
        .collect();
    Launch {
        buffer_bytes,
        kernels,
    }
}

/// The slots of binding `b`: the whole buffer, or each part of a value split over several
/// uniform bindings (the last part the rest of the data).
fn bound(b: &Binding, plan: &Plan) -> Vec<BoundResource> {
    match b.access {
        Access::Split { parts, part_bytes } => {
            let bytes = plan.buffers[b.buffer].bytes();
            (0..parts)
                .map(|k| {
                    let offset = u64::from(k) * part_bytes;
                    BoundResource {
                        binding: b.binding + k,
                        resource: Resource::Buffer {
                            buffer: b.buffer,
                            offset,
                            size: Some(part_bytes.min(bytes - offset)),
                        },
                    }
                })
                .collect()
        }
        _ => vec![BoundResource {
            binding: b.binding,
            resource: Resource::Buffer {
                buffer: b.buffer,
                offset: 0,
                size: None,
            },
        }],
    }
}

fn sorted(mut bindings: Vec<BoundResource>) -> Vec<BoundResource> {
    bindings.sort_by_key(|b| b.binding);
    bindings
}

/// A chunked kernel: one table buffer with a slot per span of every dispatch (a span past
/// the last chunk keeps an all-zero slot, so its invocations return at once), its running
/// sums, and per dispatch each span's windows at its chunk's offsets and its table slot.
fn chunked(m: &KernelModule, c: &Chunks, plan: &Plan, buffer_bytes: &[u64]) -> KernelLaunch {
    let entries: Vec<_> = (0..c.count)
        .map(|k| c.entry(k, &|b| buffer_bytes[b]))
        .collect();
    let stride = c.table_stride();
    let spans = c.spans.len().max(1);
    let slots = c.dispatches() * spans;
    // Each slot: the chunk's range (read as storage), then its windows' bases (read as
    // uniform) at an offset both bindings' alignments allow.
    let bases_at = c.bases_offset();
    let bases_bytes = c.bases_vec4s() as u64 * 16;
    let mut table = vec![0u8; (stride * slots as u64) as usize];
    for (k, e) in entries.iter().enumerate() {
        let at = k * stride as usize;
        let (range, bases) = e.table.split_at(4);
        let bases_at = at + bases_at as usize;
        for (i, word) in range.iter().enumerate() {
            table[at + 4 * i..at + 4 * i + 4].copy_from_slice(&word.to_le_bytes());
        }
        for (i, word) in bases.iter().enumerate() {
            table[bases_at + 4 * i..bases_at + 4 * i + 4].copy_from_slice(&word.to_le_bytes());
        }
    }
    let mut scratch = vec![Scratch {
        label: format!("{} chunk table", m.name),
        contents: ScratchContents::Bytes(table),
    }];
    scratch.extend(c.sums.iter().map(|sum| Scratch {
        label: format!("{} running sum of {}", m.name, sum.node),
        contents: ScratchContents::Zeroed((sum.words.max(4) as u64 * 4).div_ceil(16) * 16),
    }));
    let table_slice = |offset: u64, size: u64| Resource::Scratch {
        index: 0,
        offset,
        size: Some(size),
    };
    let dispatches = (0..c.dispatches())
        .map(|d| {
            let mut bindings: Vec<BoundResource> = m
                .bindings
                .iter()
                .filter(|b| !c.windows.iter().any(|w| w.binding == b.binding))
                .flat_map(|b| bound(b, plan))
                .collect();
            for (s, span) in c.spans.iter().enumerate() {
                let k = d * spans + s;
                // A span past the last chunk binds the last chunk's windows; its all-zero
                // table keeps it from reading them.
                let e = &entries[k.min(c.count - 1)];
                for ((w, &binding), &offset) in
                    c.windows.iter().zip(&span.windows).zip(&e.window_offsets)
                {
                    bindings.push(BoundResource {
                        binding,
                        resource: Resource::Buffer {
                            buffer: w.buffer,
                            offset,
                            size: Some(w.vec4s as u64 * 16),
                        },
                    });
                }
                let slot = k as u64 * stride;
                bindings.push(BoundResource {
                    binding: span.table,
                    resource: table_slice(slot, 16),
                });
                if bases_bytes > 0 {
                    bindings.push(BoundResource {
                        binding: span.bases,
                        resource: table_slice(slot + bases_at, bases_bytes),
                    });
                }
            }
            for (s, sum) in c.sums.iter().enumerate() {
                bindings.push(BoundResource {
                    binding: sum.binding,
                    resource: Resource::Scratch {
                        index: 1 + s,
                        offset: 0,
                        size: None,
                    },
                });
            }
            Dispatch {
                workgroups: m.dispatch,
                bindings: sorted(bindings),
            }
        })
        .collect();
    KernelLaunch {
        scratch,
        dispatches,
    }
}
