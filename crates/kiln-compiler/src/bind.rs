//! Binding choice, the first stage of a kernel's generation: what each buffer the kernel
//! touches is bound as (storage, a uniform array, uniform windows over a chunk's images,
//! uniform parts), and whether the kernel runs chunk by chunk over the batch (the images it
//! is cut along and the reductions whose sums it carries). The schedule (`schedule.rs`) is
//! chosen from these bindings, and every later stage addresses buffers through them.

use kiln_ir::{DType, Graph, NodeId, Op};

use crate::blocking::LANES;
use crate::chunks;
use crate::compute;
use crate::kir;
use crate::plan::{Kernel, KernelKind, Plan};
use crate::target::{DeviceClass, Target};

/// How a kernel may use a bound buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    ReadWrite,
    /// A small read-only parameter bound as `var<uniform>` (`array<vec4<f32>, N>`).
    Uniform,
    /// A batched operand read through a uniform window over the images of each chunk
    /// (see [`Chunks`](crate::Chunks)).
    Window,
    /// A read-only value too large for one uniform binding, bound as `parts` consecutive
    /// uniform bindings of `part_bytes` each (the last one the rest), from `binding` on; a
    /// load reads every part and selects (CPU-class targets: still cheaper than a storage load).
    Split {
        parts: u32,
        part_bytes: u64,
    },
}

impl Access {
    /// Binding slots the access takes.
    pub fn slots(self) -> u32 {
        match self {
            Access::Split { parts, .. } => parts,
            _ => 1,
        }
    }

    /// Whether the binding is one or more uniform buffers.
    pub fn is_uniform(self) -> bool {
        !matches!(self, Access::Read | Access::ReadWrite)
    }
}

/// One `@group(0) @binding(n)` of a kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub binding: u32,
    /// Index into [`Plan::buffers`].
    pub buffer: usize,
    pub access: Access,
}

/// Bytes of part `k` of a buffer of `bytes` split in parts of `part_bytes`.
pub(crate) fn part_len(bytes: u64, part_bytes: u64, k: u32) -> u64 {
    part_bytes.min(bytes - u64::from(k) * part_bytes)
}

/// What a kernel binds, how, and whether it runs chunk by chunk over the batch.
pub(crate) struct KernelBindings {
    /// Every buffer read or written, in buffer order.
    pub bindings: Vec<Binding>,
    /// Uniform binding slots taken.
    pub uniforms: u32,
    /// The first slot after the bindings: a chunked kernel's table and running sums follow.
    pub next: u32,
    /// The batch a kernel reading windows or summing chunk by chunk is cut along.
    pub batch: Option<usize>,
    /// Reductions summed over the batch chunk by chunk, each with the root it reaches.
    pub sums: Vec<(NodeId, NodeId)>,
    /// The buffers bound as windows, in binding order (window `w` of the chunk table).
    pub windowed: Vec<usize>,
}

impl KernelBindings {
    fn find(&self, buffer: usize) -> Option<&Binding> {
        self.bindings.iter().find(|b| b.buffer == buffer)
    }

    /// The first slot of `buffer`'s binding.
    pub fn binding_of(&self, buffer: usize) -> u32 {
        self.find(buffer).expect("bound").binding
    }

    /// How a buffer bound as a uniform array is indexed: whole, or through window `w` over
    /// the chunk's images (`None` for storage bindings and split parts).
    pub fn uniform_at(&self, buffer: usize) -> Option<Option<usize>> {
        match self.find(buffer)?.access {
            Access::Uniform => Some(None),
            Access::Window => Some(Some(
                self.windowed
                    .iter()
                    .position(|&x| x == buffer)
                    .expect("windowed"),
            )),
            Access::Read | Access::ReadWrite | Access::Split { .. } => None,
        }
    }

    /// The parts and part bytes of a buffer bound as split uniform parts.
    pub fn split(&self, buffer: usize) -> Option<(u32, u64)> {
        match self.find(buffer)?.access {
            Access::Split { parts, part_bytes } => Some((parts, part_bytes)),
            _ => None,
        }
    }

    /// Where `kernel` reads `n` from split uniform parts: `(binding, parts, words per part)`.
    pub fn split_of(&self, plan: &Plan, kernel: &Kernel, n: NodeId) -> Option<(u32, u32, usize)> {
        let b = self.find(plan.buffer_of[n.0]?)?;
        match b.access {
            Access::Split { parts, part_bytes } if kernel.reads.contains(&n) => {
                Some((b.binding, parts, part_bytes as usize / 4))
            }
            _ => None,
        }
    }

    /// The reductions summed chunk by chunk.
    pub fn summed(&self) -> Vec<NodeId> {
        self.sums.iter().map(|s| s.0).collect()
    }

    /// The kernel IR's view of `buffer`'s binding (name, space, element type); the buffers
    /// in `vec4_out` are stored a `vec4` at a time.
    pub fn global(&self, plan: &Plan, buffer: usize, vec4_out: &[usize]) -> kir::Global {
        let b = self
            .find(buffer)
            .expect("the kernel binds what it reads and stores");
        let buf = &plan.buffers[buffer];
        let (space, elem) = match b.access {
            Access::Read | Access::ReadWrite => (
                kir::Space::Storage {
                    read_only: b.access == Access::Read,
                },
                if vec4_out.contains(&buffer) {
                    kir::Ty::VEC4_F32
                } else if buf.packed_u8 {
                    kir::Ty::U32
                } else {
                    compute::value_ty(buf.ty.dtype)
                },
            ),
            Access::Uniform | Access::Window | Access::Split { .. } => {
                (kir::Space::Uniform, kir::Ty::VEC4_F32)
            }
        };
        kir::Global {
            name: format!("buf{}", b.binding),
            space,
            elem,
        }
    }
}

/// Chooses `kernel`'s bindings on `target`. With `try_chunks`, a kernel may read batched
/// operands through windows (CPU-class targets) and sum over the batch chunk by chunk;
/// `max_chunk_images` is given when a kernel summing over the batch must be cut into chunks
/// (its loops would run past the device's limit otherwise).
pub(crate) fn bind_buffers(
    graph: &Graph,
    plan: &Plan,
    kernel: &Kernel,
    target: &Target,
    try_chunks: bool,
    max_chunk_images: Option<usize>,
) -> KernelBindings {
    // Bindings: every buffer read or written, in buffer order; written ones read_write.
    let mut used: Vec<(usize, Access)> = Vec::new();
    for n in kernel.reads.iter().chain(&kernel.stores) {
        let b = plan.buffer_of[n.0].expect("read and stored nodes have buffers");
        let access = if kernel.stores.iter().any(|s| plan.buffer_of[s.0] == Some(b)) {
            Access::ReadWrite
        } else {
            Access::Read
        };
        if !used.iter().any(|(u, _)| *u == b) {
            used.push((b, access));
        }
    }
    used.sort_by_key(|(b, _)| *b);
    // Small parameters this kernel only reads go to uniform bindings.
    let mut uniforms = 0u32;
    for (b, access) in used.iter_mut() {
        let buf = &plan.buffers[*b];
        if *access == Access::Read
            && buf.kind == crate::plan::BufferKind::Param
            && buf.ty.dtype == DType::F32
            && buf.bytes() <= target.max_uniform_buffer_binding_size
            && uniforms < target.max_uniform_buffers_per_stage
        {
            *access = Access::Uniform;
            uniforms += 1;
        }
    }
    // On CPU-class devices every small read-only f32 value is read from a uniform binding too,
    // and an image-local kernel reads its large batched operands through per-chunk windows
    // (one uniform binding is kept for the table of window bases). A kernel summing over the
    // batch runs chunk by chunk too, carrying its partial sums.
    let mut batch = None;
    let mut sums: Vec<(NodeId, NodeId)> = Vec::new();
    // A kernel summing batched values over the batch (weight gradients): the batch is the
    // first axis of what it reads.
    let summing = match &kernel.kind {
        KernelKind::Map { roots } if try_chunks => kernel.reads.iter().find_map(|r| {
            let n = *graph.ty(*r).shape.first()?;
            let batched = chunks::batched(graph, n);
            let s = chunks::batch_sums(graph, &kernel.nodes, roots, &batched)?;
            Some((n, batched, s))
        }),
        _ => None,
    };
    if target.class == DeviceClass::Cpu {
        let max = target.max_uniform_buffer_binding_size;
        for (b, access) in used.iter_mut() {
            let buf = &plan.buffers[*b];
            if *access == Access::Read
                && buf.ty.dtype == DType::F32
                && !buf.packed_u8
                && buf.bytes() <= max
                && uniforms < target.max_uniform_buffers_per_stage
            {
                *access = Access::Uniform;
                uniforms += 1;
            }
        }
        let root = match &kernel.kind {
            KernelKind::Map { roots } if try_chunks && roots.len() == 1 => Some(roots[0]),
            _ => None,
        };
        // A summing kernel, or else an image-local kernel, batched by its root's first axis.
        let candidate = summing.clone().or_else(|| {
            let (root, &n) = root.and_then(|r| Some((r, graph.ty(r).shape.first()?)))?;
            let batched = chunks::batched(graph, n);
            chunks::kernel_is_image_local(graph, &kernel.nodes, root, &batched)
                .then(|| (n, batched, Vec::new()))
        });
        if let Some((n, batched, s)) = candidate {
            for (b, access) in used.iter_mut() {
                let windowable = kernel.reads.iter().any(|r| {
                    plan.buffer_of[r.0] == Some(*b) && chunks::windowable(graph, *r, &batched)
                });
                if *access == Access::Read
                    && windowable
                    && uniforms + 1 < target.max_uniform_buffers_per_stage
                {
                    *access = Access::Window;
                    uniforms += 1;
                }
            }
            if used.iter().any(|(_, a)| *a == Access::Window) {
                batch = Some(n);
                sums = s;
            }
        }
        // What is still read from storage and fits in up to four uniform bindings (a dense
        // layer's weights) is split over several: each load reads them all and selects.
        let align = target.uniform_offset_alignment();
        let part = max / align * align;
        let keep = u32::from(batch.is_some());
        // The right-hand matrix of a matmul (fc1's weights) is split into four equal parts
        // of whole rows where they fit, so that no load has to read every part: lanes one in
        // each quarter of the output features read one part each (`blocking::choose`), a
        // reduction over the rows runs one loop per part (`kir::parts`). fc1's
        // forward kernel 3.8-5.1 -> 2.7-3.1 ms per step, its input gradient 4.1-4.9 -> 2.8-3.1
        // (`--profile`, four alternating runs); the input gradient's JIT 155 -> 290 ms.
        let quarter_parts = |b: usize| -> Option<u64> {
            let ty = &plan.buffers[b].ty;
            let rows = *ty.shape.first()?;
            let bytes = (ty.numel() * 4) as u64;
            let quarter = bytes / LANES as u64;
            // Rows of B are the output features (`[out, in]`, lanes a quarter apart) or the
            // reduction (`[in, out]`, one loop per part).
            let rows_of_matmul = kernel.nodes.iter().any(|&n| {
                let node = graph.node(n);
                matches!(node.op, Op::MatMul { .. })
                    && kernel.reads.contains(&node.inputs[1])
                    && plan.buffer_of[node.inputs[1].0] == Some(b)
            });
            (rows_of_matmul
                && rows % LANES == 0
                && bytes > max
                && quarter <= max
                && quarter % align == 0)
                .then_some(quarter)
        };
        for (b, access) in used.iter_mut() {
            let buf = &plan.buffers[*b];
            let (parts, part_bytes) = match quarter_parts(*b) {
                Some(q)
                    if uniforms + LANES as u32 + keep <= target.max_uniform_buffers_per_stage =>
                {
                    (LANES as u64, q)
                }
                _ => (buf.bytes().div_ceil(part.max(1)), part),
            };
            if *access == Access::Read
                && buf.ty.dtype == DType::F32
                && !buf.packed_u8
                && (2..=LANES as u64).contains(&parts)
                && uniforms + parts as u32 + keep <= target.max_uniform_buffers_per_stage
            {
                *access = Access::Split {
                    parts: parts as u32,
                    part_bytes,
                };
                uniforms += parts as u32;
            }
        }
    }
    // A kernel summing over the batch whose batch loop would run past the device's loop
    // limit (`emit_wgsl` gives the cap): chunks of images carrying running sums, as above,
    // reading whatever has no window straight from storage (on any device class: the
    // portable schedules on lavapipe need it as much as a convolution whose output gradient
    // is too big for a window).
    if let (None, Some(_), Some((n, _, s))) = (batch, max_chunk_images, summing) {
        batch = Some(n);
        sums = s;
    }
    let mut next = 0u32;
    let bindings: Vec<Binding> = used
        .iter()
        .map(|&(buffer, access)| {
            let binding = next;
            next += access.slots();
            Binding {
                binding,
                buffer,
                access,
            }
        })
        .collect();
    let windowed = bindings
        .iter()
        .filter(|b| b.access == Access::Window)
        .map(|b| b.buffer)
        .collect();
    KernelBindings {
        bindings,
        uniforms,
        next,
        batch,
        sums,
        windowed,
    }
}
