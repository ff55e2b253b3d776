//! A compiled graph on the device: pipelines and bind groups created once, recorded into any
//! number of compute passes.
//!
//! The compiler's launch description (`kiln_compiler::Launch`) says which buffers to create,
//! what each dispatch binds and how many workgroups it runs; this module executes it with one
//! loop and knows nothing of the schedules that shaped it (image chunks, several a dispatch).

use std::collections::HashMap;
use std::sync::Arc;

use std::time::Duration;

use kiln_compiler::{
    BufferKind, Compiled, Launch, Loads, Resource, Scratch, ScratchContents, Slot, kernel_cost,
};
use kiln_ir::{DType, TensorType};
use kiln_reference::{Data, Tensor};

use wgpu::util::DeviceExt;

use crate::gpu::{Gpu, RuntimeError};

/// A compiled graph with its pipelines, bind groups and buffers.
pub struct Program {
    pub compiled: Compiled,
    /// What the compiler says to create, bind and dispatch (`kiln_compiler::Launch`).
    launch: Launch,
    pipelines: Vec<wgpu::ComputePipeline>,
    /// Per kernel: one bind group per dispatch of its launch.
    bind_groups: Vec<Vec<wgpu::BindGroup>>,
    /// The kernels' scratch buffers, kept alive with the bind groups that hold them.
    _scratch: Vec<wgpu::Buffer>,
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

/// Creates a kernel's scratch buffer: with its bytes, or zeroed (as wgpu creates buffers).
fn create_scratch(gpu: &Gpu, s: &Scratch, graph_name: &str) -> Result<wgpu::Buffer, RuntimeError> {
    // Bound as storage or uniform, whichever slot a dispatch puts it in.
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::UNIFORM;
    gpu.scoped(
        &format!(
            "creating buffer `{}` ({} bytes) of graph `{graph_name}`",
            s.label,
            s.contents.len()
        ),
        || match &s.contents {
            ScratchContents::Bytes(bytes) => {
                gpu.device
                    .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: Some(&s.label),
                        contents: bytes,
                        usage,
                    })
            }
            ScratchContents::Zeroed(size) => gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(&s.label),
                size: *size,
                usage,
                mapped_at_creation: false,
            }),
        },
    )
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
        let launch = compiled.launch();
        let mut buffers = Vec::with_capacity(compiled.plan.buffers.len());
        for (b, &needed) in compiled.plan.buffers.iter().zip(&launch.buffer_bytes) {
            // Whole 16-byte rows, as `upload` makes them.
            let size = needed.div_ceil(16) * 16;
            let leaf = matches!(b.kind, BufferKind::Input | BufferKind::Param);
            let shared = if leaf {
                external.get(&b.name).cloned()
            } else {
                None
            };
            let buffer = match shared {
                Some(s) => {
                    if s.size() < needed {
                        return Err(RuntimeError::Setup(format!(
                            "buffer `{}` of graph `{graph_name}` holds {} bytes, {needed} needed",
                            b.name,
                            s.size(),
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
        let mut scratch_buffers = Vec::new();
        for ((m, naga), kernel) in compiled.kernels().zip(&launch.kernels) {
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
            let scratch = kernel
                .scratch
                .iter()
                .map(|s| create_scratch(gpu, s, &graph_name))
                .collect::<Result<Vec<_>, _>>()?;
            let mut groups = Vec::with_capacity(kernel.dispatches.len());
            for d in &kernel.dispatches {
                let entries: Vec<wgpu::BindGroupEntry> = d
                    .bindings
                    .iter()
                    .map(|b| {
                        let (buffer, offset, size) = match b.resource {
                            Resource::Buffer {
                                buffer,
                                offset,
                                size,
                            } => (&*buffers[buffer], offset, size),
                            Resource::Scratch {
                                index,
                                offset,
                                size,
                            } => (&scratch[index], offset, size),
                        };
                        wgpu::BindGroupEntry {
                            binding: b.binding,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer,
                                offset,
                                size: size.and_then(wgpu::BufferSize::new),
                            }),
                        }
                    })
                    .collect();
                groups.push(gpu.scoped(
                    &format!("bindings of kernel {} of graph `{graph_name}`", m.name),
                    || {
                        gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
                            label: Some(&m.name),
                            layout: &layout,
                            entries: &entries,
                        })
                    },
                )?);
            }
            pipelines.push(pipeline);
            bind_groups.push(groups);
            scratch_buffers.extend(scratch);
        }
        Ok(Program {
            compiled,
            launch,
            pipelines,
            bind_groups,
            _scratch: scratch_buffers,
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
        pass.set_pipeline(&self.pipelines[k]);
        for (group, d) in self.bind_groups[k]
            .iter()
            .zip(&self.launch.kernels[k].dispatches)
        {
            pass.set_bind_group(0, group, &[]);
            let [x, y, z] = d.workgroups;
            pass.dispatch_workgroups(x, y, z);
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
            .zip(&c.modules)
            .zip(times.0)
            .map(|((k, m), time)| {
                let cost = kernel_cost(&c.graph, &c.plan, k);
                KernelTiming {
                    name: k.name.clone(),
                    time,
                    flops: cost.flops,
                    bytes: cost.bytes,
                    loads: m.loads_per_step(),
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
    /// The most loads of globals the kernel's dispatches issue in a step, by address space
    /// (`kiln_compiler::KernelModule::loads_per_step`); `None` where a loop is unbounded.
    pub loads: Option<Loads>,
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
