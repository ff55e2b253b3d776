//! WGSL generation: one compute module per kernel, shapes and hyper-parameters baked in.
//!
//! A kernel's module is made in stages, each a plain function of the one before:
//! `bind_buffers` (`bind.rs`: what each buffer is bound as, and whether the kernel runs chunk
//! by chunk) → `choose_schedule` (`schedule.rs`: the recipe, from a rule table) → `lay_out`
//! (workgroups, dispatch grid, image chunks) → `lower` (`lower.rs`: the kernel IR module,
//! over the element functions of `elements.rs`) → `spans::repeat` (several chunks per
//! dispatch) → `header` and the kernel IR's printer. [`emit_wgsl`] then validates every
//! module with naga and keeps its naga IR.

use std::fmt::Write as _;

use kiln_ir::{Graph, NodeId, TensorType};

use crate::bind::{bind_buffers, part_len};
use crate::chunks::{self, Chunks, Window};
use crate::interface::{self, LayoutEntry, Slot};
use crate::kir::{self, module::Declaration};
use crate::lower::{Lowering, lower};
use crate::plan::{Kernel, KernelKind, Plan};
use crate::report::node_label;
use crate::schedule::{self, Schedule, choose_schedules};
use crate::target::{DeviceClass, Target};
use crate::trips::{self, Loads};

/// Workgroups a map kernel should have at least, shrinking its workgroups (down to 8
/// invocations) when it has few invocations.
const MIN_WORKGROUPS: u32 = 8;

/// Invocations of the classifier head's single workgroup (a power of two).
const HEAD_WORKGROUP: u32 = 64;

pub use crate::bind::{Access, Binding};

/// A generated kernel: its WGSL and how to launch it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelModule {
    pub name: String,
    pub wgsl: String,
    pub bindings: Vec<Binding>,
    /// Workgroups to dispatch in x, y, z.
    pub dispatch: [u32; 3],
    pub workgroup_size: u32,
    /// Bytes of `var<workgroup>` memory the module declares.
    pub workgroup_storage_bytes: u64,
    /// Dispatched as image chunks, `dispatch` workgroups each (CPU-class targets).
    pub chunks: Option<Chunks>,
    /// The most loop iterations one invocation runs (`trips.rs`), `None` if unbounded;
    /// set when the module is validated.
    pub loop_iterations: Option<u64>,
    /// The most loads of globals one invocation issues, by address space (`trips.rs`);
    /// set when the module is validated.
    pub loads: Option<Loads>,
    /// Invocations one dispatch runs (a chunk's, for chunked kernels).
    pub invocations: u32,
    /// The kernel's functions and entry point as kernel IR, several chunks per dispatch
    /// included, which the interpreter runs (`kir::interp::Runner`: invocation by
    /// invocation, or the classifier head's workgroup at once).
    pub kernel_ir: kir::module::Module,
    /// The kernel's functions in module order before its entry point (the first chunk's of
    /// a dispatch), the head's too: a blocked kernel's lane and rows functions as data, for
    /// tests and tools that call them on the interpreter (`kir::interp::Library`).
    pub functions: Vec<kir::module::Item>,
}

impl KernelModule {
    /// The most loads of globals one step's dispatches of the kernel issue, by address space
    /// (every dispatch's invocations times [`KernelModule::loads`]); `None` where a loop of
    /// the kernel has no bound.
    pub fn loads_per_step(&self) -> Option<Loads> {
        Some(step_loads(
            self.loads?,
            self.invocations,
            self.chunks.as_ref(),
        ))
    }

    /// Every `@group(0)` slot the kernel's dispatches bind, in binding order: each binding
    /// (a split value one slot per part), and for chunked kernels each span's windows and
    /// table and the running sums. The runtime builds the pipeline's bind group layout from
    /// this list, and [`emit_wgsl`] refuses a module whose WGSL does not declare and use
    /// exactly these slots.
    pub fn layout(&self) -> Vec<LayoutEntry> {
        let mut out = Vec::new();
        for b in &self.bindings {
            let slot = match b.access {
                Access::Read => Slot::Storage { read_only: true },
                Access::ReadWrite => Slot::Storage { read_only: false },
                Access::Uniform | Access::Window | Access::Split { .. } => Slot::Uniform,
            };
            for k in 0..b.access.slots() {
                out.push(LayoutEntry {
                    binding: b.binding + k,
                    slot,
                });
            }
        }
        if let Some(c) = &self.chunks {
            for span in c.spans.iter().skip(1) {
                for &binding in &span.windows {
                    out.push(LayoutEntry {
                        binding,
                        slot: Slot::Uniform,
                    });
                }
            }
            for span in &c.spans {
                out.push(LayoutEntry {
                    binding: span.table,
                    slot: Slot::Storage { read_only: true },
                });
                if c.bases_vec4s() > 0 {
                    out.push(LayoutEntry {
                        binding: span.bases,
                        slot: Slot::Uniform,
                    });
                }
            }
            for sum in &c.sums {
                out.push(LayoutEntry {
                    binding: sum.binding,
                    slot: Slot::Storage { read_only: false },
                });
            }
        }
        out.sort_by_key(|e| e.binding);
        out
    }

    /// Uniform and storage slots of [`KernelModule::layout`], for the per-stage limits.
    pub fn slot_counts(&self) -> (usize, usize) {
        let layout = self.layout();
        let uniforms = layout.iter().filter(|e| e.slot == Slot::Uniform).count();
        (uniforms, layout.len() - uniforms)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodegenError {
    #[error("kernel {kernel}: {message}")]
    Unsupported { kernel: String, message: String },
    #[error("kernel {kernel} failed WGSL validation:\n{diagnostic}")]
    Invalid { kernel: String, diagnostic: String },
    /// The WGSL's resources disagree with the kernel's binding list: a code generator bug.
    #[error("kernel {kernel}: bindings disagree with the WGSL: {message}")]
    Interface { kernel: String, message: String },
    /// One invocation may run more loop iterations than the target allows (or an unknown
    /// number): on lavapipe its loops would stop early without an error.
    #[error(
        "kernel {kernel}: one invocation runs {} loop iterations, but the device allows \
         max_loop_iterations = {limit} (lavapipe stops longer loops early without an error); \
         use a smaller batch or model",
        found.map_or("an unbounded number of".to_string(), |n| n.to_string())
    )]
    LoopLimit {
        kernel: String,
        found: Option<u64>,
        limit: u64,
    },
    /// The kernel binds more buffers of one kind than the target allows in one shader stage.
    #[error(
        "kernel {kernel} binds {needed} {kind} buffers, but the device allows {limit} = \
         {available}; use a smaller model"
    )]
    BindingLimit {
        kernel: String,
        kind: &'static str,
        needed: usize,
        limit: &'static str,
        available: u32,
    },
    /// The kernel steers its control flow by uniform-buffer values, which crashes lavapipe's
    /// shader compiler (`uniform_control.rs`): a code generator bug.
    #[error("kernel {kernel}: {message}")]
    UniformControl { kernel: String, message: String },
}

/// A kernel's WGSL as naga parsed and validated it. [`compile`](crate::compile) keeps one per
/// module, so the runtime and the back ends (`backends.rs`) start from this IR instead of
/// parsing and validating the text a second time.
#[derive(Clone, Debug)]
pub struct NagaModule {
    pub module: naga::Module,
    /// What validation found (expression types, resource uses): the back ends need it.
    pub info: naga::valid::ModuleInfo,
}

/// Parses and validates WGSL with naga (all validation flags, WebGPU core capabilities).
pub fn validate_wgsl(kernel: &str, src: &str) -> Result<naga::Module, CodegenError> {
    validate_module(kernel, src).map(|m| m.module)
}

fn validate_module(kernel: &str, src: &str) -> Result<NagaModule, CodegenError> {
    use naga::valid::{Capabilities, ValidationFlags, Validator};
    let invalid = |diagnostic| CodegenError::Invalid {
        kernel: kernel.to_string(),
        diagnostic,
    };
    let module = naga::front::wgsl::parse_str(src).map_err(|e| invalid(e.emit_to_string(src)))?;
    let info = Validator::new(ValidationFlags::all(), Capabilities::empty())
        .validate(&module)
        .map_err(|e| invalid(e.emit_to_string(src)))?;
    Ok(NagaModule { module, info })
}

/// Validates `m`'s WGSL, checks its resources against [`KernelModule::layout`], and refuses
/// control flow steered by uniform values (`uniform_control.rs`).
pub fn validate_kernel(m: &KernelModule) -> Result<NagaModule, CodegenError> {
    let naga = validate_module(&m.name, &m.wgsl)?;
    interface::check(&m.layout(), &naga.module, &naga.info).map_err(|message| {
        CodegenError::Interface {
            kernel: m.name.clone(),
            message,
        }
    })?;
    crate::uniform_control::check(&naga.module).map_err(|message| {
        CodegenError::UniformControl {
            kernel: m.name.clone(),
            message,
        }
    })?;
    Ok(naga)
}

/// Validates `m` ([`validate_kernel`]), counts its bindings against the target's limits, and
/// bounds the loop iterations of one invocation (`trips.rs`) by the target's limit.
/// Returns the validated module, so no later stage parses the WGSL again.
fn check_kernel(m: &mut KernelModule, target: &Target) -> Result<NagaModule, CodegenError> {
    let naga = validate_kernel(m)?;
    let (uniforms, storage) = m.slot_counts();
    for (kind, needed, limit, available) in [
        (
            "uniform",
            uniforms,
            "max_uniform_buffers_per_shader_stage",
            target.max_uniform_buffers_per_stage,
        ),
        (
            "storage",
            storage,
            "max_storage_buffers_per_shader_stage",
            target.max_storage_buffers_per_stage,
        ),
    ] {
        if needed > available as usize {
            return Err(CodegenError::BindingLimit {
                kernel: m.name.clone(),
                kind,
                needed,
                limit,
                available,
            });
        }
    }
    let images = m.chunks.as_ref().map(|c| c.images as u64);
    let bounds = trips::bounds(&naga.module, images);
    m.loop_iterations = bounds.map(|(iterations, _)| iterations);
    m.loads = bounds.map(|(_, loads)| loads);
    if let Some(limit) = target.max_loop_iterations {
        match m.loop_iterations {
            Some(n) if n <= limit => {}
            found => {
                return Err(CodegenError::LoopLimit {
                    kernel: m.name.clone(),
                    found,
                    limit,
                });
            }
        }
    }
    Ok(naga)
}

/// Generates and validates the modules of every kernel of `plan`, in execution order.
pub fn emit_wgsl(
    graph: &Graph,
    plan: &Plan,
    target: &Target,
) -> Result<Vec<KernelModule>, CodegenError> {
    let modules = emit_validated(graph, plan, target)?;
    Ok(modules.into_iter().map(|(m, _)| m).collect())
}

/// [`emit_wgsl`], keeping each module's naga IR from its validation.
pub fn emit_validated(
    graph: &Graph,
    plan: &Plan,
    target: &Target,
) -> Result<Vec<(KernelModule, NagaModule)>, CodegenError> {
    // One thread per kernel: naga's validation of the largest CPU-class modules (~20 ms for
    // conv1's column quads) dominates the compile time.
    std::thread::scope(|scope| {
        let handles: Vec<_> = plan
            .kernels
            .iter()
            .map(|k| {
                scope.spawn(move || {
                    let mut m = emit_kernel(graph, plan, k, target)?;
                    // A classifier head loops over the batch's rows in one workgroup: where
                    // its invocations would loop too long, it takes more of them (powers of
                    // two up to the device's workgroup limit; 256 fit in its storage).
                    let most = target.max_workgroup_size_x.min(1024);
                    let mut wg = HEAD_WORKGROUP;
                    let naga = loop {
                        match check_kernel(&mut m, target) {
                            Err(CodegenError::LoopLimit { .. })
                                if matches!(k.kind, KernelKind::Head(_)) && wg * 2 <= most =>
                            {
                                wg *= 2;
                                m = emit_kernel_sized(graph, plan, k, target, wg, None)?;
                            }
                            Err(CodegenError::LoopLimit {
                                found: Some(found),
                                limit,
                                ..
                            }) if matches!(k.kind, KernelKind::Map { .. })
                                && m.chunks
                                    .as_ref()
                                    .is_none_or(|c| !c.sums.is_empty() && c.images > 1) =>
                            {
                                // A kernel summing over the batch takes it in chunks of
                                // fewer images, each adding to running sums, until one
                                // chunk's loops fit. Not chunked yet: one chunk of the whole
                                // batch first, to learn its images; then as many as scale to
                                // the limit (with a margin), always fewer than before.
                                let next = match &m.chunks {
                                    None => usize::MAX,
                                    Some(c) => {
                                        let fit = limit as u128 * c.images as u128 / found as u128;
                                        (fit as usize * 9 / 10).clamp(1, c.images - 1)
                                    }
                                };
                                let again =
                                    emit_kernel_sized(graph, plan, k, target, wg, Some(next))?;
                                if again.chunks.as_ref().is_none_or(|c| c.sums.is_empty()) {
                                    break check_kernel(&mut m, target);
                                }
                                m = again;
                            }
                            result => break result,
                        }
                    }?;
                    Ok((m, naga))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

fn numel_u32(kernel: &str, ty: &TensorType) -> Result<u32, CodegenError> {
    u32::try_from(ty.numel()).map_err(|_| CodegenError::Unsupported {
        kernel: kernel.to_string(),
        message: format!("{ty} has more elements than a u32 index can address"),
    })
}

/// Generates the module of one kernel (not yet validated; [`emit_wgsl`] validates).
pub fn emit_kernel(
    graph: &Graph,
    plan: &Plan,
    kernel: &Kernel,
    target: &Target,
) -> Result<KernelModule, CodegenError> {
    emit_kernel_sized(graph, plan, kernel, target, HEAD_WORKGROUP, None)
}

/// [`emit_kernel`] with a classifier head of `head_workgroup` invocations, and a kernel
/// summing over the batch cut into chunks of at most `max_chunk_images` images where given.
fn emit_kernel_sized(
    graph: &Graph,
    plan: &Plan,
    kernel: &Kernel,
    target: &Target,
    head_workgroup: u32,
    max_chunk_images: Option<usize>,
) -> Result<KernelModule, CodegenError> {
    let hw = (head_workgroup, max_chunk_images);
    let (module, shares_loads) = emit_kernel_with(graph, plan, kernel, target, true, hw)?;
    if let Some(m) = module {
        return Ok(m);
    }
    // The blocked schedule leaves no chunk size that fits the windows (its lanes span images).
    // Where blocking shares no loads (elementwise kernels) chunks without it read cheaper.
    if target.block_outputs && !shares_loads {
        let plain = Target {
            block_outputs: false,
            ..target.clone()
        };
        if let (Some(m), _) = emit_kernel_with(graph, plan, kernel, &plain, true, hw)? {
            return Ok(m);
        }
    }
    // A kernel that must be cut into batch chunks (`max_chunk_images`) but whose windows do
    // not fit (a convolution's output gradient of more than 64 KiB an image) reads its
    // operands from storage instead, as the portable schedules do.
    if max_chunk_images.is_some() && target.class == DeviceClass::Cpu {
        let storage = Target {
            class: DeviceClass::Other,
            ..target.clone()
        };
        if let (Some(m), _) = emit_kernel_with(graph, plan, kernel, &storage, true, hw)? {
            if m.chunks.is_some() {
                return Ok(m);
            }
        }
    }
    let (module, _) = emit_kernel_with(graph, plan, kernel, target, false, hw)?;
    Ok(module.expect("an unchunked schedule always applies"))
}

/// [`emit_kernel`], trying image chunks when `try_chunks`; no module when the chosen schedule
/// cannot be cut into chunks after all. The flag says whether the schedule's register
/// blocking shares loads between outputs (blocks a reduction). `sizes` are the classifier
/// head's workgroup size and the most images per chunk of a kernel summing over the batch
/// ([`emit_kernel_sized`]).
fn emit_kernel_with(
    graph: &Graph,
    plan: &Plan,
    kernel: &Kernel,
    target: &Target,
    try_chunks: bool,
    sizes: (u32, Option<usize>),
) -> Result<(Option<KernelModule>, bool), CodegenError> {
    let (head_workgroup, max_chunk_images) = sizes;
    let bound = bind_buffers(graph, plan, kernel, target, try_chunks, max_chunk_images);
    let binding_of = |b: usize| bound.binding_of(b);
    let uniform_at = |b: usize| bound.uniform_at(b);
    let split_of = |n: NodeId| bound.split_of(plan, kernel, n);
    let cx = schedule::Context {
        graph,
        plan,
        kernel,
        target,
        bound: &bound,
        binding_of: &binding_of,
        uniform_at: &uniform_at,
        split_of: &split_of,
    };
    let schedules = choose_schedules(&cx);
    let shares_loads = schedules[0].shares_loads;
    // The rules' choice decides whether the kernel can be laid out (else `emit_kernel_sized`
    // tries another target); its alternatives only where they can be too.
    let Some(first) = build(&cx, &schedules[0], sizes)? else {
        return Ok((None, shares_loads));
    };
    let mut built = vec![first];
    for schedule in &schedules[1..] {
        if let Some(b) = build(&cx, schedule, sizes)? {
            built.push(b);
        }
    }
    // Blockings the rules hold as good as each other: the one whose module issues the fewest
    // loads, weighted by their cost on the device (the first of equals).
    let mut note = String::new();
    if built.len() > 1 {
        let costs: Vec<Option<f64>> = built.iter().map(|b| b.weighted_loads(target)).collect();
        let first = costs[0];
        let (k, cost) = costs
            .iter()
            .enumerate()
            .filter_map(|(k, c)| c.map(|c| (k, c)))
            .fold(None, |best: Option<(usize, f64)>, (k, c)| match best {
                Some((_, b)) if b <= c => best,
                _ => Some((k, c)),
            })
            .unwrap_or((0, 0.0));
        let shown: Vec<String> = costs
            .iter()
            .map(|c| c.map_or("unbounded".to_string(), |c| format!("{c:.0}")))
            .collect();
        let _ = writeln!(
            note,
            "// tie: {} blockings do as much blocked work; weighted loads per step {}: the {} ({cost:.0}{})",
            built.len(),
            shown.join(", "),
            if k == 0 { "first" } else { "fewest" },
            match first {
                Some(f) if k > 0 => format!(" against the first's {f:.0}"),
                _ => String::new(),
            }
        );
        built.swap(0, k);
    }
    let b = built.swap_remove(0);
    let is_head = matches!(kernel.kind, KernelKind::Head(_));
    // The head's two partial-sum arrays (f32 and u32, one entry per invocation).
    let workgroup_storage_bytes = if is_head {
        2 * u64::from(head_workgroup) * 4
    } else {
        0
    };
    Ok((
        Some(KernelModule {
            name: kernel.name.clone(),
            wgsl: b.header.0 + &note + &b.header.1 + &b.printed,
            bindings: bound.bindings.clone(),
            dispatch: b.dispatch,
            workgroup_size: b.workgroup_size,
            workgroup_storage_bytes,
            chunks: b.chunks,
            loop_iterations: None,
            loads: None,
            invocations: b.invocations,
            kernel_ir: b.module,
            functions: b.functions,
        }),
        shares_loads,
    ))
}

/// One schedule's module, before validation.
struct Built {
    /// The header's lines through the schedule's, and the rest.
    header: (String, String),
    printed: String,
    module: kir::module::Module,
    functions: Vec<kir::module::Item>,
    dispatch: [u32; 3],
    workgroup_size: u32,
    invocations: u32,
    chunks: Option<Chunks>,
}

impl Built {
    /// The loads a step's dispatches issue (`trips::loads` of the parsed module), storage
    /// and workgroup loads weighted as the device class pays for them against uniform
    /// ones; `None` where the module does not parse or a loop has no bound.
    fn weighted_loads(&self, target: &Target) -> Option<f64> {
        let module = naga::front::wgsl::parse_str(&self.printed).ok()?;
        let images = self.chunks.as_ref().map(|c| c.images as u64);
        let per_invocation = trips::loads(&module, images)?;
        let l = step_loads(per_invocation, self.invocations, self.chunks.as_ref());
        // lavapipe runs a storage or workgroup load as a loop over the SIMD lanes, a uniform
        // load as one gather (~0.25 against 2-3 G loads/s, `chunks.rs`).
        let costly = if target.class == DeviceClass::Cpu {
            STORAGE_LOAD_WEIGHT
        } else {
            1.0
        };
        Some((l.storage + l.workgroup) as f64 * costly + l.uniform as f64)
    }
}

/// A step's loads of a kernel whose invocations issue `per_invocation`: every dispatch runs
/// `invocations` (a chunked kernel's chunks, several to a dispatch where it has spans).
fn step_loads(per_invocation: Loads, invocations: u32, chunks: Option<&Chunks>) -> Loads {
    let dispatches = chunks.map_or(1, |c| c.dispatches());
    per_invocation.times(u64::from(invocations) * dispatches as u64)
}

/// How many uniform loads one storage load costs on a CPU-class device.
const STORAGE_LOAD_WEIGHT: f64 = 10.0;

/// `schedule`'s module for `cx.kernel`; `None` where the schedule cannot be laid out.
fn build(
    cx: &schedule::Context,
    schedule: &Schedule,
    sizes: (u32, Option<usize>),
) -> Result<Option<Built>, CodegenError> {
    let (graph, plan, kernel, target, bound) = (cx.graph, cx.plan, cx.kernel, cx.target, cx.bound);
    let head_workgroup = sizes.0;
    let Some(layout) = lay_out(cx, schedule, sizes)? else {
        return Ok(None);
    };
    let l = Lowering::new(
        graph,
        plan,
        kernel,
        bound,
        schedule,
        (layout.workgroup_size, layout.dispatch),
        layout.chunks.is_some(),
        head_workgroup,
        target.class == DeviceClass::Cpu,
    );
    let (mut module, functions) = lower(&l);
    let mut chunking = layout.chunks;
    module.declarations = declarations(&l, chunking.as_ref());
    // Several chunks per dispatch where binding slots and code size allow.
    if let Some(c) = chunking.as_mut() {
        let storage = bound
            .bindings
            .iter()
            .filter(|b| matches!(b.access, Access::Read | Access::ReadWrite))
            .count()
            + 1
            + c.sums.len();
        let free = crate::spans::FreeSlots {
            uniforms: target
                .max_uniform_buffers_per_stage
                .saturating_sub(bound.uniforms + 1),
            storage: target
                .max_storage_buffers_per_stage
                .saturating_sub(storage as u32),
        };
        crate::spans::repeat(&mut module, c, free);
    }
    let printed = module.print().map_err(|e| CodegenError::Unsupported {
        kernel: kernel.name.clone(),
        message: format!("generator bug: {e}"),
    })?;
    let header = header(&l, target, &layout.description, chunking.as_ref());
    Ok(Some(Built {
        header,
        printed,
        module,
        functions,
        dispatch: layout.dispatch,
        workgroup_size: layout.workgroup_size,
        invocations: layout.invocations,
        chunks: chunking,
    }))
}

/// How a kernel is launched: its workgroups, its dispatch grid and, cut into image chunks,
/// its chunk table; with the schedule's line of the module header.
struct Layout {
    workgroup_size: u32,
    /// Invocations one dispatch runs.
    invocations: u32,
    dispatch: [u32; 3],
    description: String,
    chunks: Option<Chunks>,
}

/// Lays `cx.kernel` out under `schedule`: `None` where the schedule cannot be cut into the
/// image chunks its bindings need (its invocations straddle images, no chunk size fits the
/// windows, or it cannot carry the kernel's running sums).
fn lay_out(
    cx: &schedule::Context,
    schedule: &Schedule,
    (head_workgroup, max_chunk_images): (u32, Option<usize>),
) -> Result<Option<Layout>, CodegenError> {
    let (graph, plan, kernel, target, bound) = (cx.graph, cx.plan, cx.kernel, cx.target, cx.bound);
    let mut chunking: Option<Chunks> = None;
    let (workgroup_size, dispatch, description, invocations) = match &kernel.kind {
        KernelKind::Map { roots } => {
            let wg = target.workgroup_size();
            let mut numel = 0;
            for r in roots {
                numel = numel.max(numel_u32(&kernel.name, graph.ty(*r))?);
            }
            let root = roots
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(" and ");
            let (numel, description) = schedule.describe(graph, numel, &root);
            if let Some(n) = bound.batch {
                // Every dispatch of a summing kernel runs all its invocations.
                let per = if bound.sums.is_empty() {
                    schedule.images_per_invocation(graph, n)
                } else {
                    Some(1)
                };
                let Some(per) = per else {
                    return Ok(None);
                };
                let words: Vec<usize> = bound
                    .windowed
                    .iter()
                    .map(|&b| plan.buffers[b].ty.numel() / n)
                    .collect();
                let align = target.uniform_offset_alignment();
                let Some(mut images) = chunks::images_per_chunk(
                    n,
                    per,
                    &words,
                    align,
                    target.max_uniform_buffer_binding_size,
                ) else {
                    return Ok(None);
                };
                if let Some(cap) = max_chunk_images.filter(|_| !bound.sums.is_empty()) {
                    // As few chunks of at most `cap` images as cover the batch, evened out.
                    let count = n.div_ceil(images.min(cap).max(per));
                    images = n.div_ceil(count).div_ceil(per) * per;
                }
                let count = n.div_ceil(images);
                if bound.sums.is_empty() && numel as usize * images % n != 0 {
                    return Ok(None);
                }
                let windows = bound
                    .windowed
                    .iter()
                    .zip(&words)
                    .map(|(&buffer, &w)| Window {
                        binding: bound.binding_of(buffer),
                        buffer,
                        image_words: w,
                        vec4s: chunks::window_vec4s(images, w, align),
                    })
                    .collect::<Vec<_>>();
                let table_binding = bound.next;
                chunking = Some(Chunks {
                    count,
                    images,
                    batch: n,
                    invocations: if bound.sums.is_empty() {
                        numel as usize * images / n
                    } else {
                        numel as usize
                    },
                    table_binding,
                    table_vec4s: 1 + windows.len().div_ceil(4),
                    spans: vec![crate::chunks::Span {
                        windows: windows.iter().map(|w| w.binding).collect(),
                        table: table_binding,
                        bases: table_binding + 1,
                    }],
                    windows,
                    alignment: align,
                    table_alignment: target.storage_offset_alignment(),
                    sums: bound
                        .sums
                        .iter()
                        .enumerate()
                        .map(|(k, (red, _))| chunks::Sum {
                            binding: table_binding + 2 + k as u32,
                            node: *red,
                            words: graph.ty(*red).numel(),
                            quads: schedule.quad_sum == Some(*red),
                        })
                        .collect(),
                });
            }
            // Each dispatch runs one chunk's invocations.
            let numel = chunking.as_ref().map_or(numel, |c| c.invocations as u32);
            // A kernel of few, long invocations (weight gradients summing over the whole
            // batch) gets smaller workgroups, so that there are enough of them to keep every
            // core or compute unit busy; never below 8 (lavapipe's SIMD width).
            let wg = if numel < wg * MIN_WORKGROUPS {
                // The largest power of two giving at least MIN_WORKGROUPS groups.
                let most = (numel / MIN_WORKGROUPS).max(1);
                (1u32 << (31 - most.leading_zeros())).clamp(8, wg)
            } else {
                wg
            };
            let groups = numel.div_ceil(wg).max(1);
            let gx = groups.min(target.max_workgroups_per_dimension);
            let gy = groups.div_ceil(gx);
            if gy > target.max_workgroups_per_dimension {
                return Err(CodegenError::Unsupported {
                    kernel: kernel.name.clone(),
                    message: format!(
                        "{numel} elements need more workgroups than the device allows"
                    ),
                });
            }
            (wg, [gx, gy, 1], description, numel)
        }
        KernelKind::Head(h) => (
            head_workgroup,
            [1, 1, 1],
            format!(
                "one workgroup looping over the {} rows of {}",
                graph.ty(h.logits).shape[0],
                h.logits
            ),
            head_workgroup,
        ),
    };
    if !schedule.carries(&bound.sums) {
        return Ok(None);
    }
    Ok(Some(Layout {
        workgroup_size,
        invocations,
        dispatch,
        description,
        chunks: chunking,
    }))
}

/// The module's header comments, once its chunks (and spans) are known: the lines through
/// the schedule's (where a tie between schedules is noted), and the rest.
fn header(
    l: &Lowering,
    target: &Target,
    schedule: &str,
    c_opt: Option<&Chunks>,
) -> (String, String) {
    let (graph, plan, kernel) = (l.graph, l.plan, l.kernel);
    let (workgroup_size, dispatch) = (l.workgroup_size, l.dispatch);
    let bindings = &l.bound.bindings;
    let vec4_out = &l.schedule.vec4_out;
    let ops: Vec<String> = kernel.nodes.iter().map(|&n| node_label(graph, n)).collect();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "// kiln kernel {} of graph \"{}\"",
        kernel.name, plan.graph
    );
    let _ = writeln!(s, "// target: {target}");
    let _ = writeln!(s, "// ops: {}", ops.join(", "));
    if !kernel.recomputed.is_empty() {
        let r: Vec<String> = kernel.recomputed.iter().map(|n| n.to_string()).collect();
        let _ = writeln!(
            s,
            "// recomputed here (cheap, also computed by other kernels): {}",
            r.join(", ")
        );
    }
    let _ = writeln!(
        s,
        "// schedule: {schedule}, workgroup size {workgroup_size}"
    );
    let _ = writeln!(s, "// recipe: {}", l.schedule.rule);
    if let Some(nest) = &l.schedule.nest {
        let _ = writeln!(s, "// nest: {nest}");
    }
    let head = std::mem::take(&mut s);
    let _ = writeln!(
        s,
        "// dispatch: {} x {} x {} workgroups",
        dispatch[0], dispatch[1], dispatch[2]
    );
    if let Some(c) = c_opt {
        let names: Vec<String> = c
            .windows
            .iter()
            .map(|w| format!("{} ({} bytes)", plan.buffers[w.buffer].name, w.vec4s * 16))
            .collect();
        let rest = c.batch - (c.count - 1) * c.images;
        let last = if rest == c.images {
            String::new()
        } else {
            format!(", the last of {rest}")
        };
        let _ = writeln!(
            s,
            "// chunks: {} of {} images{last} ({} invocations each), reading {} through uniform windows{}",
            c.count,
            c.images,
            c.invocations,
            names.join(", "),
            crate::spans::per_dispatch(c)
        );
    }
    let _ = writeln!(s, "// bindings:");
    for b in bindings {
        let buf = &plan.buffers[b.buffer];
        let _ = writeln!(
            s,
            "//   {}: {} {}{} ({})",
            b.binding,
            buf.name,
            buf.ty,
            if buf.packed_u8 {
                " packed 4 per word"
            } else {
                ""
            },
            match b.access {
                Access::ReadWrite if vec4_out.contains(&b.buffer) => {
                    "read_write, stored as vec4".to_string()
                }
                Access::ReadWrite => "read_write".to_string(),
                Access::Read => "read".to_string(),
                Access::Uniform => "uniform".to_string(),
                Access::Window => "uniform window".to_string(),
                Access::Split { parts, .. } => format!("{parts} uniform parts"),
            }
        );
    }
    // The further spans' bindings, listed after the others.
    for (k, span) in c_opt
        .iter()
        .flat_map(|c| c.spans.iter().enumerate().skip(1))
    {
        let _ = writeln!(
            s,
            "//   {}-{}: span {k}: {} windows, then its chunk range and window bases",
            span.windows.first().copied().unwrap_or(span.table),
            span.bases,
            span.windows.len()
        );
    }
    s.push('\n');
    (head, s)
}

/// The module's binding declarations: each binding (a split value one per part), then a
/// chunked kernel's table (range and window bases) and running sums. `spans::repeat` adds
/// the further spans'.
fn declarations(l: &Lowering, c_opt: Option<&Chunks>) -> Vec<Declaration> {
    let mut out = Vec::new();
    for b in &l.bound.bindings {
        let buf = &l.plan.buffers[b.buffer];
        let global = l.bound.global(l.plan, b.buffer, &l.schedule.vec4_out);
        let len = match b.access {
            Access::Read | Access::ReadWrite => None,
            Access::Uniform => Some(buf.bytes() / 16),
            Access::Window => Some(
                c_opt
                    .and_then(|c| c.windows.iter().find(|w| w.binding == b.binding))
                    .expect("windows are chunked")
                    .vec4s as u64,
            ),
            Access::Split { parts, part_bytes } => {
                for k in 0..parts {
                    out.push(Declaration {
                        slot: b.binding + k,
                        global: kir::Global {
                            name: format!("{}_{k}", global.name),
                            ..global.clone()
                        },
                        len: Some((part_len(buf.bytes(), part_bytes, k) / 16) as u32),
                    });
                }
                continue;
            }
        };
        out.push(Declaration {
            slot: b.binding,
            global,
            len: len.map(|n| n as u32),
        });
    }
    if let Some(c) = c_opt {
        out.push(Declaration::chunk_range(c.table_binding, 0));
        if c.bases_vec4s() > 0 {
            out.push(Declaration::window_bases(
                c.table_binding + 1,
                0,
                c.bases_vec4s() as u32,
            ));
        }
        for sum in &c.sums {
            out.push(Declaration {
                slot: sum.binding,
                global: chunks::sum_global(sum.node, sum.quads),
                len: None,
            });
        }
    }
    out
}
