//! A compiled graph on the device: pipelines and bind groups created once, recorded into any
//! number of compute passes.

use std::collections::HashMap;
use std::sync::Arc;

use std::time::Duration;

use kiln_compiler::{Access, BufferKind, Compiled, Slot, kernel_cost};
use kiln_ir::{DType, TensorType};
use kiln_reference::{Data, Tensor};

use wgpu::util::DeviceExt;

use crate::gpu::{Gpu, RuntimeError};

/// A compiled graph with its pipelines, bind groups and buffers.
pub struct Program {
    pub compiled: Compiled,
    pipelines: Vec<wgpu::ComputePipeline>,
    /// Per kernel: its bind group, or one per dispatch of image chunks (each binding the
    /// windows and tables of the chunks it runs).
    bind_groups: Vec<Vec<wgpu::BindGroup>>,
    /// The chunk tables and running sums of chunked kernels, kept alive with their bind
    /// groups.
    _tables: Vec<wgpu::Buffer>,
    /// One per plan buffer; leaves may be shared with other programs.
    buffers: Vec<Arc<wgpu::Buffer>>,
}

/// Usage of every kiln buffer: kernels read and write it, copies move it, tests read it back.
pub fn storage_usage() -> wgpu::BufferUsages {
    wgpu::BufferUsages::STORAGE
        | wgpu::BufferUsages::UNIFORM
        | wgpu::BufferUsages::COPY_SRC
        | wgpu::BufferUsages::COPY_DST
}

/// Refuses a plan that needs more than the device offers, naming the limit and the culprit.
pub fn check_limits(gpu: &Gpu, compiled: &Compiled) -> Result<(), RuntimeError> {
    let l = &gpu.limits;
    for b in &compiled.plan.buffers {
        let bytes = b.bytes();
        let what = format!(
            "buffer `{}` ({}) of graph `{}`",
            b.name, b.ty, compiled.graph.name
        );
        if bytes > l.max_storage_buffer_binding_size {
            return Err(gpu.limit_error(
                what,
                "max_storage_buffer_binding_size",
                bytes,
                l.max_storage_buffer_binding_size,
            ));
        }
        if bytes > l.max_buffer_size {
            return Err(gpu.limit_error(what, "max_buffer_size", bytes, l.max_buffer_size));
        }
    }
    for m in &compiled.modules {
        let what = format!("kernel {} of graph `{}`", m.name, compiled.graph.name);
        let (uniforms, storage) = m.slot_counts();
        let n = storage as u64;
        if n > l.max_storage_buffers_per_shader_stage as u64 {
            return Err(gpu.limit_error(
                what.clone(),
                "max_storage_buffers_per_shader_stage",
                n,
                l.max_storage_buffers_per_shader_stage as u64,
            ));
        }
        let n = uniforms as u64;
        if n > l.max_uniform_buffers_per_shader_stage as u64 {
            return Err(gpu.limit_error(
                what.clone(),
                "max_uniform_buffers_per_shader_stage",
                n,
                l.max_uniform_buffers_per_shader_stage as u64,
            ));
        }
        if m.workgroup_size
            > l.max_compute_workgroup_size_x
                .min(l.max_compute_invocations_per_workgroup)
        {
            return Err(gpu.limit_error(
                what,
                "max_compute_invocations_per_workgroup",
                m.workgroup_size as u64,
                l.max_compute_invocations_per_workgroup as u64,
            ));
        }
        if let Some(&d) = m.dispatch.iter().max() {
            if d > l.max_compute_workgroups_per_dimension {
                return Err(gpu.limit_error(
                    what,
                    "max_compute_workgroups_per_dimension",
                    d as u64,
                    l.max_compute_workgroups_per_dimension as u64,
                ));
            }
        }
        if m.workgroup_storage_bytes > l.max_compute_workgroup_storage_size as u64 {
            return Err(gpu.limit_error(
                what,
                "max_compute_workgroup_storage_size",
                m.workgroup_storage_bytes,
                l.max_compute_workgroup_storage_size as u64,
            ));
        }
    }
    Ok(())
}

/// The bind group entries of binding `b` over `buffer`: the whole buffer, or each part of a
/// value split over several uniform bindings.
fn entries_of<'a>(
    b: &kiln_compiler::Binding,
    buffer: &'a wgpu::Buffer,
    compiled: &Compiled,
) -> Vec<wgpu::BindGroupEntry<'a>> {
    match b.access {
        Access::Split { parts, part_bytes } => {
            let bytes = compiled.plan.buffers[b.buffer].bytes();
            (0..parts)
                .map(|k| {
                    let offset = u64::from(k) * part_bytes;
                    wgpu::BindGroupEntry {
                        binding: b.binding + k,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer,
                            offset,
                            size: wgpu::BufferSize::new(part_bytes.min(bytes - offset)),
                        }),
                    }
                })
                .collect()
        }
        _ => vec![wgpu::BindGroupEntry {
            binding: b.binding,
            resource: buffer.as_entire_binding(),
        }],
    }
}

impl Program {
    /// Creates the program's pipelines and bind groups. Leaves named in `external` use those
    /// buffers (shared data sets and parameters); every other buffer is created here.
    pub fn new(
        gpu: &Gpu,
        compiled: Compiled,
        external: &HashMap<String, Arc<wgpu::Buffer>>,
    ) -> Result<Program, RuntimeError> {
        check_limits(gpu, &compiled)?;
        let graph_name = compiled.graph.name.clone();
        // Buffers read through chunk windows get room past their data (`window_slack`).
        let mut slack = vec![0u64; compiled.plan.buffers.len()];
        for c in compiled.modules.iter().filter_map(|m| m.chunks.as_ref()) {
            for w in &c.windows {
                slack[w.buffer] = slack[w.buffer].max(c.window_slack());
            }
        }
        let mut buffers = Vec::with_capacity(compiled.plan.buffers.len());
        for (b, slack) in compiled.plan.buffers.iter().zip(&slack) {
            let size = (b.bytes() + slack).div_ceil(16) * 16;
            let leaf = matches!(b.kind, BufferKind::Input | BufferKind::Param);
            let shared = if leaf {
                external.get(&b.name).cloned()
            } else {
                None
            };
            let buffer = match shared {
                Some(s) => {
                    if s.size() < b.bytes() + slack {
                        return Err(RuntimeError::Setup(format!(
                            "buffer `{}` of graph `{graph_name}` holds {} bytes, {} needed",
                            b.name,
                            s.size(),
                            b.bytes() + slack
                        )));
                    }
                    s
                }
                None => Arc::new(gpu.scoped(
                    &format!("creating buffer `{}` ({size} bytes)", b.name),
                    || {
                        gpu.device.create_buffer(&wgpu::BufferDescriptor {
                            label: Some(&b.name),
                            size,
                            usage: storage_usage(),
                            mapped_at_creation: false,
                        })
                    },
                )?),
            };
            buffers.push(buffer);
        }
        let mut pipelines = Vec::new();
        let mut bind_groups = Vec::new();
        let mut tables = Vec::new();
        for (m, naga) in compiled.kernels() {
            // The layout comes from the compiler's binding list, not from the globals wgpu
            // finds the shader using: one source of truth for what every dispatch binds
            // (the compiler checked that the WGSL declares and uses exactly these slots).
            let entries: Vec<wgpu::BindGroupLayoutEntry> = m
                .layout()
                .iter()
                .map(|e| wgpu::BindGroupLayoutEntry {
                    binding: e.binding,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: match e.slot {
                            Slot::Uniform => wgpu::BufferBindingType::Uniform,
                            Slot::Storage { read_only } => {
                                wgpu::BufferBindingType::Storage { read_only }
                            }
                        },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                })
                .collect();
            let (layout, pipeline_layout) = gpu.scoped(
                &format!("layouts of kernel {} of graph `{graph_name}`", m.name),
                || {
                    let layout =
                        gpu.device
                            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                                label: Some(&m.name),
                                entries: &entries,
                            });
                    let pipeline_layout =
                        gpu.device
                            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                                label: Some(&m.name),
                                bind_group_layouts: &[Some(&layout)],
                                immediate_size: 0,
                            });
                    (layout, pipeline_layout)
                },
            )?;
            let pipeline = gpu.scoped(
                &format!("kernel {} of graph `{graph_name}`", m.name),
                || {
                    // The compiler's naga IR, not the WGSL text, which the compiler has
                    // parsed already. (wgpu-core still validates the IR, against the
                    // device's capabilities: its safe API has no way around that.)
                    let module = gpu
                        .device
                        .create_shader_module(wgpu::ShaderModuleDescriptor {
                            label: Some(&m.name),
                            source: wgpu::ShaderSource::Naga(std::borrow::Cow::Owned(
                                naga.module.clone(),
                            )),
                        });
                    gpu.device
                        .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                            label: Some(&m.name),
                            layout: Some(&pipeline_layout),
                            module: &module,
                            entry_point: Some("main"),
                            compilation_options: Default::default(),
                            cache: None,
                        })
                },
            )?;
            let bind = |entries: &[wgpu::BindGroupEntry]| {
                gpu.scoped(
                    &format!("bindings of kernel {} of graph `{graph_name}`", m.name),
                    || {
                        gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                            label: Some(&m.name),
                            layout: &layout,
                            entries,
                        })
                    },
                )
            };
            let groups = match &m.chunks {
                None => {
                    let entries: Vec<wgpu::BindGroupEntry> = m
                        .bindings
                        .iter()
                        .flat_map(|b| entries_of(b, &buffers[b.buffer], &compiled))
                        .collect();
                    vec![bind(&entries)?]
                }
                Some(c) => {
                    let bytes = |b: usize| buffers[b].size();
                    let stride = c.table_stride();
                    let chunk_entries: Vec<_> = (0..c.count).map(|k| c.entry(k, &bytes)).collect();
                    // One table per span of every dispatch; spans past the last chunk keep
                    // an all-zero table (no invocations).
                    let spans = c.spans.len().max(1);
                    let slots = c.dispatches() * spans;
                    // Each slot: the chunk's range (read as storage), then its windows' bases
                    // (read as uniform) at an offset both bindings' alignments allow.
                    let bases_at = c.bases_offset() as usize;
                    let mut table = vec![0u8; (stride * slots as u64) as usize];
                    for (k, e) in chunk_entries.iter().enumerate() {
                        let at = k * stride as usize;
                        let (range, bases) = e.table.split_at(4);
                        let range: &[u8] = bytemuck::cast_slice(range);
                        let bases: &[u8] = bytemuck::cast_slice(bases);
                        table[at..at + range.len()].copy_from_slice(range);
                        table[at + bases_at..at + bases_at + bases.len()].copy_from_slice(bases);
                    }
                    let table = gpu
                        .device
                        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                            label: Some(&format!("{} chunk table", m.name)),
                            contents: &table,
                            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::UNIFORM,
                        });
                    // Running sums of summing kernels: read and written by every chunk.
                    let sums: Vec<wgpu::Buffer> = c
                        .sums
                        .iter()
                        .map(|sum| {
                            gpu.device.create_buffer(&wgpu::BufferDescriptor {
                                label: Some(&format!("{} running sum of {}", m.name, sum.node)),
                                size: (sum.words.max(4) as u64 * 4).div_ceil(16) * 16,
                                usage: wgpu::BufferUsages::STORAGE,
                                mapped_at_creation: false,
                            })
                        })
                        .collect();
                    let window = |w: usize, k: usize| {
                        // A span past the last chunk reads the last chunk's windows (unused).
                        let e = &chunk_entries[k.min(c.count - 1)];
                        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &buffers[c.windows[w].buffer],
                            offset: e.window_offsets[w],
                            size: wgpu::BufferSize::new(c.windows[w].vec4s as u64 * 16),
                        })
                    };
                    let mut groups = Vec::with_capacity(c.dispatches());
                    for d in 0..c.dispatches() {
                        let mut entries: Vec<wgpu::BindGroupEntry> = m
                            .bindings
                            .iter()
                            .filter(|b| !c.windows.iter().any(|w| w.binding == b.binding))
                            .flat_map(|b| entries_of(b, &buffers[b.buffer], &compiled))
                            .collect();
                        for (s, span) in c.spans.iter().enumerate() {
                            let k = d * spans + s;
                            for (w, &binding) in span.windows.iter().enumerate() {
                                entries.push(wgpu::BindGroupEntry {
                                    binding,
                                    resource: window(w, k),
                                });
                            }
                            entries.push(wgpu::BindGroupEntry {
                                binding: span.table,
                                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                    buffer: &table,
                                    offset: k as u64 * stride,
                                    size: wgpu::BufferSize::new(16),
                                }),
                            });
                            if c.bases_vec4s() == 0 {
                                continue;
                            }
                            entries.push(wgpu::BindGroupEntry {
                                binding: span.bases,
                                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                    buffer: &table,
                                    offset: k as u64 * stride + bases_at as u64,
                                    size: wgpu::BufferSize::new(c.bases_vec4s() as u64 * 16),
                                }),
                            });
                        }
                        for (sum, buffer) in c.sums.iter().zip(&sums) {
                            entries.push(wgpu::BindGroupEntry {
                                binding: sum.binding,
                                resource: buffer.as_entire_binding(),
                            });
                        }
                        groups.push(bind(&entries)?);
                    }
                    tables.push(table);
                    tables.extend(sums);
                    groups
                }
            };
            pipelines.push(pipeline);
            bind_groups.push(groups);
        }
        Ok(Program {
            compiled,
            pipelines,
            bind_groups,
            _tables: tables,
            buffers,
        })
    }

    /// The buffer holding the plan buffer named `name` (an input, parameter or output).
    pub fn buffer(&self, name: &str) -> Option<&Arc<wgpu::Buffer>> {
        let i = self
            .compiled
            .plan
            .buffers
            .iter()
            .position(|b| b.name == name)?;
        Some(&self.buffers[i])
    }

    /// The buffer of plan buffer `index`.
    pub fn buffer_at(&self, index: usize) -> &Arc<wgpu::Buffer> {
        &self.buffers[index]
    }

    /// Records kernel `k` alone into `pass`.
    pub fn record_kernel(&self, pass: &mut wgpu::ComputePass<'_>, k: usize) {
        let m = &self.compiled.modules[k];
        pass.set_pipeline(&self.pipelines[k]);
        for group in &self.bind_groups[k] {
            pass.set_bind_group(0, group, &[]);
            pass.dispatch_workgroups(m.dispatch[0], m.dispatch[1], m.dispatch[2]);
        }
    }

    /// Time of each kernel of one run of the program, with its FLOPs and bytes (see
    /// [`kiln_compiler::KernelCost`]). With timestamp queries (when the adapter has them) every
    /// kernel runs in its own pass between two timestamps, `reps` whole runs after a warm-up
    /// run that pays any JIT compilation, and each kernel's median is kept. Without them each
    /// kernel is timed on the host, alone, `reps` times in one submission. Kernels run on
    /// whatever the buffers hold (updates included); only their time is of interest.
    pub fn profile(&self, gpu: &Gpu, reps: usize) -> Result<Profile, RuntimeError> {
        let reps = reps.max(1);
        let times = if gpu
            .device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
        {
            self.time_with_timestamps(gpu, reps)?
        } else {
            self.time_isolated_submits(gpu, reps)?
        };
        gpu.check("profiling")?;
        let c = &self.compiled;
        let kernels = c
            .plan
            .kernels
            .iter()
            .zip(times.0)
            .map(|(k, time)| {
                let cost = kernel_cost(&c.graph, &c.plan, k);
                KernelTiming {
                    name: k.name.clone(),
                    time,
                    flops: cost.flops,
                    bytes: cost.bytes,
                }
            })
            .collect();
        Ok(Profile {
            kernels,
            method: times.1,
        })
    }

    fn time_with_timestamps(
        &self,
        gpu: &Gpu,
        reps: usize,
    ) -> Result<(Vec<Duration>, String), RuntimeError> {
        let kernels = self.compiled.modules.len();
        let queries = 2 * kernels as u32;
        let set = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("kiln profile"),
            ty: wgpu::QueryType::Timestamp,
            count: queries,
        });
        let bytes = queries as u64 * 8;
        let resolve = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kiln profile resolve"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let period = gpu.queue.get_timestamp_period() as f64;
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); kernels];
        for rep in 0..=reps {
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            for k in 0..kernels {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: None,
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: &set,
                        beginning_of_pass_write_index: Some(2 * k as u32),
                        end_of_pass_write_index: Some(2 * k as u32 + 1),
                    }),
                });
                self.record_kernel(&mut pass, k);
            }
            enc.resolve_query_set(&set, 0..queries, &resolve, 0);
            gpu.queue.submit([enc.finish()]);
            let raw = download(gpu, &resolve, 0, bytes, "profile timestamps")?;
            if rep == 0 {
                continue; // the warm-up run pays the JIT
            }
            let ticks: Vec<u64> = raw
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect();
            for (k, s) in samples.iter_mut().enumerate() {
                let ns = ticks[2 * k + 1].saturating_sub(ticks[2 * k]) as f64 * period;
                s.push(ns);
            }
        }
        let times = samples
            .into_iter()
            .map(|mut s| {
                s.sort_by(f64::total_cmp);
                Duration::from_nanos(s[s.len() / 2] as u64)
            })
            .collect();
        Ok((
            times,
            format!("GPU timestamp queries, median of {reps} runs of the whole program"),
        ))
    }

    fn time_isolated_submits(
        &self,
        gpu: &Gpu,
        reps: usize,
    ) -> Result<(Vec<Duration>, String), RuntimeError> {
        let mut out = Vec::new();
        for k in 0..self.compiled.modules.len() {
            for (round, n) in [(0, 1), (1, reps)] {
                let mut enc = gpu.device.create_command_encoder(&Default::default());
                {
                    let mut pass = enc.begin_compute_pass(&Default::default());
                    for _ in 0..n {
                        self.record_kernel(&mut pass, k);
                    }
                }
                let start = std::time::Instant::now();
                gpu.queue.submit([enc.finish()]);
                gpu.wait()?;
                if round == 1 {
                    out.push(start.elapsed() / n as u32);
                }
            }
        }
        Ok((
            out,
            format!(
                "host clock, each kernel alone {reps} times in one submission (no timestamp queries)"
            ),
        ))
    }

    /// Records every kernel, in plan order, into `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        for k in 0..self.pipelines.len() {
            self.record_kernel(pass, k);
        }
    }
}

/// One kernel's line of a profile.
#[derive(Clone, Debug)]
pub struct KernelTiming {
    pub name: String,
    pub time: Duration,
    /// Useful floating-point operations and compulsory bytes (see `kiln_compiler::KernelCost`).
    pub flops: u64,
    pub bytes: u64,
}

/// Per-kernel times of one program run, and how they were taken.
#[derive(Clone, Debug)]
pub struct Profile {
    pub kernels: Vec<KernelTiming>,
    pub method: String,
}

impl Profile {
    pub fn total(&self) -> Duration {
        self.kernels.iter().map(|k| k.time).sum()
    }
}

/// A tensor's device bytes: u8 packed four to a word when `packed`, every other element one
/// 32-bit word. Padded to a multiple of 4 bytes.
pub fn tensor_bytes(t: &Tensor, packed: bool) -> Vec<u8> {
    let mut bytes = match t.data() {
        Data::Float(v) => bytemuck::cast_slice(v).to_vec(),
        Data::U8(v) if packed => v.clone(),
        Data::U8(v) => v.iter().flat_map(|&b| (b as u32).to_le_bytes()).collect(),
        Data::U32(v) => bytemuck::cast_slice(v).to_vec(),
        Data::I32(v) => bytemuck::cast_slice(v).to_vec(),
    };
    while bytes.len() % 4 != 0 || bytes.is_empty() {
        bytes.push(0);
    }
    bytes
}

/// The inverse of [`tensor_bytes`].
pub fn tensor_from_bytes(bytes: &[u8], ty: &TensorType, packed: bool) -> Tensor {
    let n = ty.numel();
    let words = |k: usize| -> Vec<[u8; 4]> {
        bytes[..k * 4]
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect()
    };
    let data = match ty.dtype {
        DType::F32 => Data::Float(words(n).into_iter().map(f32::from_le_bytes).collect()),
        DType::U8 if packed => Data::U8(bytes[..n].to_vec()),
        DType::U8 => Data::U8(
            words(n)
                .into_iter()
                .map(|w| u32::from_le_bytes(w) as u8)
                .collect(),
        ),
        DType::U32 => Data::U32(words(n).into_iter().map(u32::from_le_bytes).collect()),
        DType::I32 => Data::I32(words(n).into_iter().map(i32::from_le_bytes).collect()),
    };
    Tensor::new(ty.shape.clone(), data).expect("numel elements for the type")
}

/// Creates a buffer holding `bytes`.
pub fn upload(gpu: &Gpu, label: &str, bytes: &[u8]) -> Result<Arc<wgpu::Buffer>, RuntimeError> {
    // Whole 16-byte rows, so the buffer can also be bound as a uniform array of vec4s.
    let size = (bytes.len().max(4) as u64).div_ceil(16) * 16;
    let buffer = gpu.scoped(&format!("creating buffer `{label}` ({size} bytes)"), || {
        gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: storage_usage(),
            mapped_at_creation: false,
        })
    })?;
    gpu.queue.write_buffer(&buffer, 0, bytes);
    Ok(Arc::new(buffer))
}

/// Copies `size` bytes of `buffer` back to the host (blocks until the device is done).
pub fn download(
    gpu: &Gpu,
    buffer: &wgpu::Buffer,
    offset: u64,
    size: u64,
    what: &str,
) -> Result<Vec<u8>, RuntimeError> {
    let size = size.max(4);
    let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("kiln readback"),
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
    gpu.queue.submit([enc.finish()]);
    map_read(gpu, &staging, what)
}

/// Maps a MAP_READ buffer and copies its contents out.
pub fn map_read(gpu: &Gpu, staging: &wgpu::Buffer, what: &str) -> Result<Vec<u8>, RuntimeError> {
    let (tx, rx) = std::sync::mpsc::channel();
    staging.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    gpu.wait()?;
    let fail = |message: String| RuntimeError::Readback {
        what: what.to_string(),
        message,
    };
    rx.recv()
        .map_err(|e| fail(e.to_string()))?
        .map_err(|e| fail(e.to_string()))?;
    let bytes = {
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| fail(e.to_string()))?;
        view.to_vec()
    };
    staging.unmap();
    gpu.check(what)?;
    Ok(bytes)
}
