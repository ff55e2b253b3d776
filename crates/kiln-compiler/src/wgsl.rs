//! WGSL generation: one compute module per kernel, shapes and hyper-parameters baked in.
//!
//! Every node a kernel touches becomes a WGSL function `v<id>(i: u32)` returning element `i`
//! (flat, row-major) of its value: a buffer load for values read from memory, the op's formula
//! over its operands' functions for values computed here. A kernel's entry point evaluates its
//! root's function once per element and stores it; a saved (side-output) value stores itself
//! as it is computed. Inlining is therefore just calling a function, and fusion decisions stay
//! in the planner. Reductions (convolutions, matmuls, sums) are loops inside their function.
//!
//! The classifier head has its own entry point: one workgroup loops over the rows, keeps a
//! row's logits in registers, and writes the loss sum, correct count and logits gradient.

use std::fmt::Write as _;

use kiln_ir::{DType, Graph, NodeId, Op, TensorType};

use crate::blocking::{self, LANES, LaneFns, lane_fn};
use crate::chunks::{self, Chunks, Window};
use crate::compute;
use crate::interface::{self, LayoutEntry, Slot};
use crate::kir::module::Item;
use crate::kir::wgsl::Callee;
use crate::kir::{self, BinOp};
use crate::plan::{Head, Kernel, KernelKind, Placement, Plan};
use crate::report::node_label;
use crate::target::{DeviceClass, Target};
use crate::text::{UniformAt, scalar_operands, strides, v};
use crate::trips;

/// Workgroups a map kernel should have at least, shrinking its workgroups (down to 8
/// invocations) when it has few invocations.
const MIN_WORKGROUPS: u32 = 8;

/// Invocations of the classifier head's single workgroup (a power of two).
const HEAD_WORKGROUP: u32 = 64;

/// How a kernel may use a bound buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    ReadWrite,
    /// A small read-only parameter bound as `var<uniform>` (`array<vec4<f32>, N>`).
    Uniform,
    /// A batched operand read through a uniform window over the images of each chunk
    /// (see [`Chunks`]).
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
    /// The kernel's functions and entry point as kernel IR, several chunks per dispatch
    /// included, which the interpreter can run (`kir::interp::Runner`); `None` for the
    /// classifier head, whose workgroup barriers it cannot.
    pub kernel_ir: Option<kir::module::Module>,
    /// The kernel's functions in module order before its entry point (the first chunk's of
    /// a dispatch), the head's too: a blocked kernel's lane and rows functions as data, for
    /// tests and tools that call them on the interpreter (`kir::interp::Library`).
    pub functions: Vec<kir::module::Item>,
}

impl KernelModule {
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
    m.loop_iterations = trips::loop_iterations(&naga.module, images);
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

fn wgsl_type(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::U8 | DType::U32 => "u32",
        DType::I32 => "i32",
    }
}

/// A map kernel's main root: its largest (the first of those), which decides its schedule.
fn main_root(graph: &Graph, roots: &[NodeId]) -> NodeId {
    *roots
        .iter()
        .max_by_key(|r| (graph.ty(**r).numel(), std::cmp::Reverse(r.0)))
        .expect("map kernels have a root")
}

/// How a kernel addresses its buffers: each one's binding, the index expression of a uniform
/// (or window) binding, and the parts of a split one.
struct Addressing<'a> {
    binding_of: &'a dyn Fn(usize) -> u32,
    uniform_at: UniformAt<'a>,
    split: &'a dyn Fn(usize) -> Option<(u32, u64)>,
    /// The kernel IR's view of a buffer's binding (name, space, element type).
    global: &'a dyn Fn(usize) -> kir::Global,
}

/// The element functions for `kernel`: loads for what it reads, formulas for what it computes.
/// `quads`: sums over uniform bindings read whole `vec4`s where they can (CPU-class targets).
fn functions(
    graph: &Graph,
    plan: &Plan,
    kernel: &Kernel,
    at: &Addressing,
    summed: &[NodeId],
    quads: bool,
) -> Vec<Item> {
    let Addressing {
        binding_of,
        uniform_at,
        split,
        global,
    } = *at;
    let mut items = Vec::new();
    for &r in &kernel.reads {
        let b = plan.buffer_of[r.0].expect("reads have buffers");
        let buf = &plan.buffers[b];
        if let Some((parts, part_bytes)) = split(b) {
            // Every part is read (an index past a part's end reads zero or a clamped
            // element) and the one holding element `i` selected: branch-free on SIMD lanes.
            let slot = binding_of(b);
            let per = (part_bytes / 16) as usize;
            let mut f = kir::Builder::new(kir::Ty::F32, Vec::new());
            let i = f.index();
            let (two, three) = (f.u32(2), f.u32(3));
            let q = f.bin(BinOp::ShiftRight, i, two);
            let q = f.let_("q", kir::Ty::U32, q);
            let l = f.bin(BinOp::BitAnd, i, three);
            let l = f.let_("l", kir::Ty::U32, l);
            let mut pick = None;
            for k in 0..parts {
                let g = f.global(kir::Global {
                    name: format!("buf{slot}_{k}"),
                    space: kir::Space::Uniform,
                    elem: kir::Ty::VEC4_F32,
                });
                let first = f.u32(k as usize * per);
                let last = f.u32((part_len(buf.bytes(), part_bytes, k) / 16 - 1) as usize);
                let at = f.sub(q, first);
                let at = f.math(kir::MathFn::Min, &[at, last]);
                let quad = f.load(g, at);
                let value = f.lane(quad, l);
                let p = f.let_(&format!("p{k}"), kir::Ty::F32, value);
                pick = Some(match pick {
                    None => p,
                    Some(before) => {
                        let past = f.bin(BinOp::Ge, q, first);
                        f.select(past, p, before)
                    }
                });
            }
            f.ret_(pick.expect("split values have parts"));
            items.push(Item::Function {
                name: v(r),
                comment: None,
                function: f.finish(),
                callees: Vec::new(),
            });
        } else if let Some(Some(w)) = uniform_at(b) {
            // A window over the chunk's images: the index is rebased to the window.
            let mut f = kir::Builder::new(kir::Ty::F32, Vec::new());
            let g = f.global(global(b));
            let i = f.index();
            let base = f.window_base(w);
            let at = f.sub(i, base);
            let at = f.let_("w", kir::Ty::U32, at);
            let (two, three) = (f.u32(2), f.u32(3));
            let q = f.bin(BinOp::ShiftRight, at, two);
            let quad = f.load(g, q);
            let l = f.bin(BinOp::BitAnd, at, three);
            let value = f.lane(quad, l);
            f.ret_(value);
            items.push(Item::Function {
                name: v(r),
                comment: None,
                function: f.finish(),
                callees: Vec::new(),
            });
        } else {
            let ret = compute::value_ty(graph.ty(r).dtype);
            let mut f = kir::Builder::new(ret, Vec::new());
            let g = f.global(global(b));
            let i = f.index();
            let value = if uniform_at(b).is_some() {
                // A uniform array of vec4s: element `i` is lane `i % 4` of vec4 `i / 4`.
                let (two, three) = (f.u32(2), f.u32(3));
                let q = f.bin(BinOp::ShiftRight, i, two);
                let quad = f.load(g, q);
                let l = f.bin(BinOp::BitAnd, i, three);
                f.lane(quad, l)
            } else if buf.packed_u8 {
                // Byte `i % 4` of word `i / 4`, little-endian.
                let (two, three, eight) = (f.u32(2), f.u32(3), f.u32(8));
                let q = f.bin(BinOp::ShiftRight, i, two);
                let word = f.load(g, q);
                let l = f.bin(BinOp::BitAnd, i, three);
                let bits = f.mul(l, eight);
                let shifted = f.bin(BinOp::ShiftRight, word, bits);
                let mask = f.u32(0xff);
                f.bin(BinOp::BitAnd, shifted, mask)
            } else {
                f.load(g, i)
            };
            f.ret_(value);
            items.push(Item::Function {
                name: v(r),
                comment: buf.packed_u8.then(|| {
                    "Byte `i` of a u8 tensor packed little-endian, four bytes to a word.".into()
                }),
                function: f.finish(),
                callees: Vec::new(),
            });
        }
    }
    // The head's entry point computes these itself, row by row.
    let in_head_main: Vec<NodeId> = match &kernel.kind {
        KernelKind::Head(h) => [
            h.loss.map(|l| l.0),
            h.loss.map(|l| l.1),
            h.correct.map(|c| c.0),
            h.correct.map(|c| c.1),
            h.grad,
        ]
        .into_iter()
        .flatten()
        .collect(),
        KernelKind::Map { .. } => Vec::new(),
    };
    for &n in kernel.nodes.iter().filter(|n| !in_head_main.contains(n)) {
        let node = graph.node(n);
        let layer = node
            .layer
            .as_ref()
            .map(|l| format!(" @{}:{}", l.index, l.kind))
            .unwrap_or_default();
        let comment = format!("{n} = {} : {}{layer}", node.op.name(), node.ty);
        // A reduction summed chunk by chunk computes the chunk's part; `v<n>` loads the sum.
        let name = if summed.contains(&n) {
            crate::text::chunk_part(&v(n))
        } else {
            v(n)
        };
        let quad_sum = if quads {
            reduce_sum_in_quads(graph, kernel, plan, n, at, summed)
        } else {
            None
        };
        if let Some(function) = quad_sum {
            items.push(Item::Function {
                name,
                comment: Some(comment),
                function,
                callees: Vec::new(),
            });
            continue;
        }
        let operands = scalar_operands(graph, n);
        let tys: Vec<kir::Ty> = operands.iter().map(|o| o.ty).collect();
        let definition = compute::element(graph, n, None, &tys, summed.contains(&n));
        let callees: Vec<Callee> = operands.into_iter().map(|o| o.callee).collect();
        let saved =
            matches!(plan.placement[n.0], Placement::Side { .. }) && kernel.stores.contains(&n);
        if !saved {
            items.push(Item::Function {
                name,
                comment: Some(comment),
                function: definition,
                callees,
            });
            continue;
        }
        // Store as computed: this kernel reads each element of a saved value exactly once.
        let value_of = format!("value_of_{}", v(n));
        let ret = definition.ret.expect("element functions return");
        items.push(Item::Function {
            name: value_of.clone(),
            comment: None,
            function: definition,
            callees,
        });
        let mut f = kir::Builder::new(ret, vec![ret]);
        let g = f.global(global(
            plan.buffer_of[n.0].expect("stored nodes have buffers"),
        ));
        let i = f.index();
        let x = f.operand(0, i);
        let value = f.let_("value", ret, x);
        f.store(g, i, value);
        f.ret_(value);
        items.push(Item::Function {
            name,
            comment: Some(comment),
            function: f.finish(),
            callees: vec![Callee::Call(value_of)],
        });
    }
    items
}

/// The body of reduction `n` reading its operand a `vec4` at a time, where the operand comes
/// straight from a uniform binding and the reduced axes end with a contiguous run in fours
/// (conv1's bias gradient sums rows of 784 per image and channel). lavapipe gathers a `vec4`
/// for about the price of 1.5 scalars, and the bias sum runs on only six invocations beside
/// the weight gradient's.
fn reduce_sum_in_quads(
    graph: &Graph,
    kernel: &Kernel,
    plan: &Plan,
    n: NodeId,
    at: &Addressing,
    summed: &[NodeId],
) -> Option<kir::Function> {
    let node = graph.node(n);
    let Op::ReduceSum { axes } = &node.op else {
        return None;
    };
    let x = node.inputs[0];
    if !kernel.reads.contains(&x) || graph.ty(x).dtype != DType::F32 {
        return None;
    }
    let buffer = plan.buffer_of[x.0]?;
    let xs = &graph.ty(x).shape;
    // The reduced axes that end the shape: one contiguous run.
    let run_from = (0..=xs.len())
        .rev()
        .take_while(|&d| d == xs.len() || axes.contains(&d))
        .last()?;
    let run: usize = xs[run_from..].iter().product();
    // A chunked sum runs over its chunk's images: the batch axis stays a loop.
    let chunked = summed.contains(&n);
    if run_from == xs.len() || run % 4 != 0 || (chunked && run_from == 0) {
        return None;
    }
    let window = (at.uniform_at)(buffer)?;
    let outer: Vec<usize> = axes.iter().copied().filter(|&a| a < run_from).collect();
    let st = strides(xs);
    let kept: Vec<usize> = (0..xs.len()).filter(|d| !axes.contains(d)).collect();
    let names: Vec<String> = kept.iter().map(|d| format!("k{d}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let kept_shape: Vec<usize> = kept.iter().map(|&d| xs[d]).collect();
    let mut f = kir::Builder::new(kir::Ty::F32, Vec::new());
    let g = f.global((at.global)(buffer));
    let i = f.index();
    let coords = f.decode(i, &refs, &kept_shape);
    let zero = f.f32(0.0);
    let zero = f.splat(zero);
    let acc = f.var("acc", kir::Ty::VEC4_F32, zero);
    // The loops over the outer reduced axes (their counters by axis), then one over the
    // run's vec4s.
    type Inner<'a> = &'a dyn Fn(&mut kir::Builder, &[(usize, kir::Expr)]);
    fn nest(
        f: &mut kir::Builder,
        loops: &[usize],
        counters: &mut Vec<(usize, kir::Expr)>,
        inner: Inner,
        (xs, chunked): (&[usize], bool),
    ) {
        let Some((&a, rest)) = loops.split_first() else {
            inner(f, counters);
            return;
        };
        let (lo, hi) = compute::batch_range(f, xs[a], chunked && a == 0);
        let mut inside = std::mem::take(counters);
        f.for_(&format!("r{a}"), lo, hi, |f, r| {
            inside.push((a, r));
            nest(f, rest, &mut inside, inner, (xs, chunked));
        });
    }
    let inner = |f: &mut kir::Builder, counters: &[(usize, kir::Expr)]| {
        let mut index: Option<kir::Expr> = None;
        for d in 0..run_from {
            let c = if axes.contains(&d) {
                counters
                    .iter()
                    .find(|(a, _)| *a == d)
                    .expect("a loop per outer axis")
                    .1
            } else {
                coords[kept.iter().position(|&k| k == d).expect("kept")]
            };
            let s = f.u32(st[d]);
            let t = f.mul(c, s);
            index = Some(match index {
                None => t,
                Some(sum) => f.add(sum, t),
            });
        }
        let index = index.unwrap_or_else(|| f.u32(0));
        let q = crate::conv_quads::uniform_index(f, index, window);
        let two = f.u32(2);
        let q = f.bin(BinOp::ShiftRight, q, two);
        let q = f.let_("q", kir::Ty::U32, q);
        let (z, quads) = (f.u32(0), f.u32(run / 4));
        f.for_("r", z, quads, |f, r| {
            let at = f.add(q, r);
            let v = f.load(g, at);
            f.add_assign(acc, v);
        });
    };
    nest(&mut f, &outer, &mut Vec::new(), &inner, (xs, chunked));
    let a = f.get(acc);
    let lanes: Vec<kir::Expr> = (0..4)
        .map(|l| {
            let l = f.u32(l);
            f.lane(a, l)
        })
        .collect();
    let sum = f.add(lanes[0], lanes[1]);
    let sum = f.add(sum, lanes[2]);
    let sum = f.add(sum, lanes[3]);
    f.ret_(sum);
    Some(f.finish())
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
        // reduction over the rows runs one loop per part (`LaneFns::reduction_rows`). fc1's
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
    let binding_of = |buffer: usize| {
        bindings
            .iter()
            .find(|b| b.buffer == buffer)
            .expect("bound")
            .binding
    };

    let ops: Vec<String> = kernel.nodes.iter().map(|&n| node_label(graph, n)).collect();
    let windowed: Vec<usize> = bindings
        .iter()
        .filter(|b| b.access == Access::Window)
        .map(|b| b.buffer)
        .collect();
    // How a buffer bound as a uniform array is indexed: whole, or through window `w` over
    // the chunk's images (`None` for storage bindings).
    let uniform_at = |buffer: usize| -> Option<Option<usize>> {
        let b = bindings.iter().find(|b| b.buffer == buffer)?;
        match b.access {
            Access::Uniform => Some(None),
            Access::Window => Some(Some(
                windowed
                    .iter()
                    .position(|&x| x == buffer)
                    .expect("windowed"),
            )),
            Access::Read | Access::ReadWrite | Access::Split { .. } => None,
        }
    };
    let summed: Vec<NodeId> = sums.iter().map(|s| s.0).collect();
    // A small stride-1 convolution whose input is a uniform binding (whole or a window) on a
    // CPU-class target: column quads (conv_quads.rs), when the values it stores as vec4s are
    // not read here.
    let conv_quads = match &kernel.kind {
        KernelKind::Map { roots }
            if target.class == DeviceClass::Cpu && target.block_outputs && sums.is_empty() =>
        {
            let main = main_root(graph, roots);
            let uniform_of = |id: NodeId| plan.buffer_of[id.0].and_then(&uniform_at);
            crate::conv_quads::find(graph, kernel, roots, main, &uniform_of).filter(|q| {
                q.quads_out.iter().all(|m| {
                    let buffer = plan.buffer_of[m.0];
                    !kernel.reads.iter().any(|n| plan.buffer_of[n.0] == buffer)
                })
            })
        }
        _ => None,
    };
    // The buffer of `id` where the kernel reads it straight from a uniform binding.
    let direct = |id: NodeId| -> Option<usize> {
        if !kernel.reads.contains(&id) || kernel.nodes.contains(&id) {
            return None;
        }
        let buffer = plan.buffer_of[id.0]?;
        uniform_at(buffer).map(|_| buffer)
    };
    // A summing kernel whose main root is (elementwise) a stride-1 conv weight gradient:
    // the kernel columns of one `(o, c, ky)` per invocation (`kernel_columns`), or, on a
    // CPU-class target reading both operands straight from uniform bindings (`operands`)
    // where the rows allow, of several output channels in whole rows (conv_quads.rs; taken
    // before blocking, which the single-channel columns only replace where it found nothing).
    let (column_candidate, column_operands) = match &kernel.kind {
        KernelKind::Map { roots } if target.block_outputs && batch.is_some() => {
            let main = main_root(graph, roots);
            let found = sums.iter().find(|(_, r)| *r == main).and_then(|&(red, _)| {
                let kw = chunks::kernel_columns(graph, red)?;
                let ins = &graph.node(red).inputs;
                let operands = match (direct(ins[0]), direct(ins[1])) {
                    (Some(x), Some(dy)) if target.class == DeviceClass::Cpu => Some((x, dy)),
                    _ => None,
                };
                let rows =
                    operands.and_then(|_| crate::conv_quads::weight_rows_channels(graph, red));
                let candidate = rows.into_iter().chain([1]).find_map(|channels| {
                    let per = graph.ty(main).numel() / (kw * channels);
                    let fits = roots
                        .iter()
                        .all(|r| *r == main || graph.ty(*r).numel() <= per);
                    (fits && graph.ty(main).numel() == graph.ty(red).numel())
                        .then_some((main, red, kw, channels))
                })?;
                Some((candidate, operands))
            });
            (found.map(|f| f.0), found.and_then(|f| f.1))
        }
        _ => (None, None),
    };
    let weight_rows = column_candidate.filter(|c| c.3 > 1);
    // Register blocking: the largest root, four elements per invocation, when that gives a
    // reduction a blocked rule and the other roots fit in the fewer invocations.
    let split_of = |n: NodeId| -> Option<(u32, u32, usize)> {
        let buffer = plan.buffer_of[n.0]?;
        let b = bindings.iter().find(|b| b.buffer == buffer)?;
        match b.access {
            Access::Split { parts, part_bytes } if kernel.reads.contains(&n) => {
                Some((b.binding, parts, part_bytes as usize / 4))
            }
            _ => None,
        }
    };
    let blocking = match &kernel.kind {
        KernelKind::Map { roots }
            if target.block_outputs && conv_quads.is_none() && weight_rows.is_none() =>
        {
            let main = main_root(graph, roots);
            let quads = graph.ty(main).numel() / LANES;
            let others_fit = roots
                .iter()
                .all(|r| *r == main || graph.ty(*r).numel() <= quads);
            let fresh = || {
                let mut fns =
                    LaneFns::new(graph, plan, kernel, &binding_of, &uniform_at, &split_of);
                fns.chunked = summed.clone();
                fns.inner_rows = target.class == DeviceClass::Cpu;
                fns
            };
            if others_fit {
                blocking::choose(&fresh, main, target.class == DeviceClass::Cpu).map(|(b, fns)| {
                    // Rows too, when the other roots still fit in the fewer invocations.
                    let rows = fns.rows_for(main, b.stride).filter(|r| {
                        let n = graph.ty(main).numel() / (LANES * r.accumulators());
                        roots
                            .iter()
                            .all(|x| *x == main || graph.ty(*x).numel() <= n)
                    });
                    match rows {
                        // The rows functions replace the lane functions of the choice:
                        // start from none, so the module carries no unused ones.
                        Some(r) => {
                            let mut fns = fresh();
                            fns.quarter = b.quarter;
                            let name = fns.rows_fn(main, b.stride, r);
                            (main, b, fns, Some((r, name)))
                        }
                        None => (main, b, fns, None),
                    }
                })
            } else {
                None
            }
        }
        _ => None,
    };
    // On CPU-class targets, lanes that are four consecutive elements at offsets in fours
    // (from the invocation's first element, for every row) can be stored and carried a vec4
    // at a time.
    let lanes_in_quads = match &blocking {
        Some((_, b, _, rows)) if target.class == DeviceClass::Cpu && b.stride == 1 => {
            rows.as_ref().is_none_or(|(r, _)| {
                r.offsets(&strides(&graph.ty(r.top()).shape))
                    .iter()
                    .all(|o| o % LANES == 0)
            })
        }
        _ => false,
    };
    // Such a main root is stored a vec4 at a time (lavapipe: 1.3 G floats/s against 0.4-0.5
    // for scalar stores), its binding declared as vec4s; only when the kernel writes that
    // buffer nowhere else and reads it not at all (a parameter updated in place is read too).
    let blocked_vec4_out: Option<usize> = match &blocking {
        Some((main, ..)) if lanes_in_quads && sums.is_empty() => {
            let buffer = plan.buffer_of[main.0];
            let read_here = kernel.reads.iter().any(|n| plan.buffer_of[n.0] == buffer);
            let f32_out = graph.ty(*main).dtype == DType::F32;
            buffer.filter(|_| !read_here && f32_out)
        }
        _ => None,
    };
    let vec4_out: Vec<usize> = blocked_vec4_out
        .into_iter()
        .chain(conv_quads.iter().flat_map(|q| {
            q.quads_out
                .iter()
                .map(|m| plan.buffer_of[m.0].expect("stored nodes have buffers"))
        }))
        .collect();
    // The running sum of a blocked rows kernel with such lanes is carried a vec4 at a time
    // (fc1's weight gradient: 48,000 sums loaded and stored by each of its 7 chunks; its
    // kernel 6.6-8.4 -> 5.8-6.6 ms per step, `--profile`, five alternating runs).
    let quad_sum: Option<NodeId> = match &blocking {
        Some((main, _, _, Some((r, _)))) if lanes_in_quads && r.pool.is_none() => sums
            .iter()
            .find(|(red, root)| root == main && *red == r.reduction)
            .map(|(red, _)| *red),
        _ => None,
    };
    let shares_loads = blocking
        .as_ref()
        .is_some_and(|(_, _, fns, rows)| fns.shares_loads || rows.is_some());
    let columns: Option<(NodeId, NodeId, usize, usize)> =
        weight_rows.or(column_candidate.filter(|_| blocking.is_none()));
    // CPU-class targets read four kernel-column steps at a time where both operands come
    // straight from uniform bindings whose rows are whole vec4s.
    let column_quads = columns
        .filter(|c| c.3 == 1 && chunks::columns_in_vec4s(graph, c.1))
        .and(column_operands);
    let mut chunking: Option<Chunks> = None;
    let (workgroup_size, dispatch, schedule) = match &kernel.kind {
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
            // Images each invocation covers, for cutting the invocations into image chunks.
            let per_invocation = |n: usize| -> Option<usize> {
                match &blocking {
                    Some((main, b, _, rows)) => match rows {
                        Some((r, _)) => {
                            let shape = &graph.ty(r.top()).shape;
                            (shape.first() == Some(&n)).then_some(if r.lane_axis == 0 {
                                LANES
                            } else if r.row_axis == 0 {
                                r.count
                            } else {
                                1
                            })
                        }
                        None => {
                            let image = graph.ty(*main).numel() / n;
                            let span = b.extent * b.stride;
                            if image % span == 0 {
                                Some(1)
                            } else if b.stride % image == 0 && span % image == 0 {
                                Some(LANES * b.stride / image)
                            } else {
                                None
                            }
                        }
                    },
                    None => Some(1),
                }
            };
            let (numel, schedule) = match (&blocking, columns) {
                _ if conv_quads.is_some() => {
                    let q = conv_quads.as_ref().expect("quads");
                    (q.invocations(graph) as u32, q.describe(graph))
                }
                (None, Some((main, red, kw, channels))) if channels > 1 => {
                    let n = numel / (kw * channels) as u32;
                    (
                        n,
                        format!(
                            "{kw} kernel columns x {channels} output channels of {main} per invocation, in whole rows (vec4 rows of the input and dy, each pixel serving {} multiply-adds; {n} invocations; {red} conv2d_grad_weight)",
                            kw * channels
                        ),
                    )
                }
                (None, Some((main, red, kw, _))) => {
                    let n = numel / kw as u32;
                    (
                        n,
                        format!(
                            "{kw} kernel columns of {main} per invocation, sliding along the input rows{} ({n} invocations; {red} conv2d_grad_weight)",
                            if column_quads.is_some() {
                                " four output columns a step (vec4 loads)"
                            } else {
                                ""
                            }
                        ),
                    )
                }
                _ => match &blocking {
                    Some((main, b, fns, rows)) => {
                        let per = LANES * rows.as_ref().map_or(1, |(r, _)| r.accumulators());
                        let n = numel / per as u32;
                        let what = if fns.blocked.is_empty() {
                            "no reduction to block: vec4 reads".to_string()
                        } else {
                            format!("blocked: {}", fns.blocked.join(", "))
                        };
                        (
                            n,
                            format!(
                                "{per} elements of {main} per invocation, lanes at stride {} ({n} invocations; {what})",
                                b.stride,
                            ),
                        )
                    }
                    None => (
                        numel,
                        format!("one invocation per element of {root} ({numel} invocations)"),
                    ),
                },
            };
            if let Some(n) = batch {
                // Every dispatch of a summing kernel runs all its invocations.
                let per = if sums.is_empty() {
                    per_invocation(n)
                } else {
                    Some(1)
                };
                let Some(per) = per else {
                    return Ok((None, shares_loads));
                };
                let words: Vec<usize> = windowed
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
                    return Ok((None, shares_loads));
                };
                if let Some(cap) = max_chunk_images.filter(|_| !sums.is_empty()) {
                    // As few chunks of at most `cap` images as cover the batch, evened out.
                    let count = n.div_ceil(images.min(cap).max(per));
                    images = n.div_ceil(count).div_ceil(per) * per;
                }
                let count = n.div_ceil(images);
                if sums.is_empty() && numel as usize * images % n != 0 {
                    return Ok((None, shares_loads));
                }
                let windows = windowed
                    .iter()
                    .zip(&words)
                    .map(|(&buffer, &w)| Window {
                        binding: binding_of(buffer),
                        buffer,
                        image_words: w,
                        vec4s: chunks::window_vec4s(images, w, align),
                    })
                    .collect::<Vec<_>>();
                let table_binding = next;
                chunking = Some(Chunks {
                    count,
                    images,
                    batch: n,
                    invocations: if sums.is_empty() {
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
                    sums: sums
                        .iter()
                        .enumerate()
                        .map(|(k, (red, _))| chunks::Sum {
                            binding: table_binding + 2 + k as u32,
                            node: *red,
                            words: graph.ty(*red).numel(),
                            quads: quad_sum == Some(*red),
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
            (wg, [gx, gy, 1], schedule)
        }
        KernelKind::Head(h) => (
            head_workgroup,
            [1, 1, 1],
            format!(
                "one workgroup looping over the {} rows of {}",
                graph.ty(h.logits).shape[0],
                h.logits
            ),
        ),
    };
    // The module's header and binding declarations, once its chunks (and spans) are known.
    let header = |c_opt: Option<&Chunks>| -> String {
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
        for b in &bindings {
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
        for b in &bindings {
            let buf = &plan.buffers[b.buffer];
            let elem = if buf.packed_u8 {
                "u32"
            } else {
                wgsl_type(buf.ty.dtype)
            };
            let elem = if vec4_out.contains(&b.buffer) {
                "vec4<f32>"
            } else {
                elem
            };
            let decl = match b.access {
                Access::ReadWrite => {
                    format!("var<storage, read_write> buf{}: array<{elem}>", b.binding)
                }
                Access::Read => format!("var<storage, read> buf{}: array<{elem}>", b.binding),
                Access::Uniform => format!(
                    "var<uniform> buf{}: array<vec4<f32>, {}>",
                    b.binding,
                    buf.bytes() / 16
                ),
                Access::Window => format!(
                    "var<uniform> buf{}: array<vec4<f32>, {}>",
                    b.binding,
                    c_opt
                        .and_then(|c| c.windows.iter().find(|w| w.binding == b.binding))
                        .expect("windows are chunked")
                        .vec4s
                ),
                Access::Split { parts, part_bytes } => {
                    for k in 0..parts {
                        let bytes = part_len(buf.bytes(), part_bytes, k);
                        let _ = writeln!(
                            s,
                            "@group(0) @binding({}) var<uniform> buf{}_{k}: array<vec4<f32>, {}>;",
                            b.binding + k,
                            b.binding,
                            bytes / 16
                        );
                    }
                    continue;
                }
            };
            let _ = writeln!(s, "@group(0) @binding({}) {decl};", b.binding);
        }
        if let Some(c) = c_opt {
            let _ = writeln!(
                s,
                "@group(0) @binding({}) var<storage, read> chunk: array<vec4<u32>, 1>;",
                c.table_binding
            );
            if c.bases_vec4s() > 0 {
                let _ = writeln!(
                    s,
                    "@group(0) @binding({}) var<uniform> bases: array<vec4<u32>, {}>;",
                    c.table_binding + 1,
                    c.bases_vec4s()
                );
            }
            for sum in &c.sums {
                let _ = writeln!(
                    s,
                    "@group(0) @binding({}) var<storage, read_write> sum{}: array<{}>;",
                    sum.binding,
                    sum.node.0,
                    if sum.quads { "vec4<f32>" } else { "f32" }
                );
            }
            // Each further span's windows, chunk range and window bases.
            for (k, span) in c.spans.iter().enumerate().skip(1) {
                for (w, b) in c.windows.iter().zip(&span.windows) {
                    let _ = writeln!(
                        s,
                        "@group(0) @binding({b}) var<uniform> buf{}_s{k}: array<vec4<f32>, {}>;",
                        w.binding, w.vec4s
                    );
                }
                let _ = writeln!(
                    s,
                    "@group(0) @binding({}) var<storage, read> chunk_s{k}: array<vec4<u32>, 1>;",
                    span.table
                );
                if !c.windows.is_empty() {
                    let _ = writeln!(
                        s,
                        "@group(0) @binding({}) var<uniform> bases_s{k}: array<vec4<u32>, {}>;",
                        span.bases,
                        c.bases_vec4s()
                    );
                }
            }
        }
        s.push('\n');
        s
    };
    let split = |buffer: usize| match bindings.iter().find(|b| b.buffer == buffer)?.access {
        Access::Split { parts, part_bytes } => Some((parts, part_bytes)),
        _ => None,
    };
    let global = |buffer: usize| {
        let b = bindings
            .iter()
            .find(|b| b.buffer == buffer)
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
    };
    let addressing = Addressing {
        binding_of: &binding_of,
        uniform_at: &uniform_at,
        split: &split,
        global: &global,
    };
    // A convolution over vec4 quads loads and stores everything in its entry point.
    let items = if conv_quads.is_some() {
        Vec::new()
    } else {
        functions(
            graph,
            plan,
            kernel,
            &addressing,
            &summed,
            target.class == DeviceClass::Cpu,
        )
    };
    // The kernel's functions in module order.
    let mut functions: Vec<Item> = items.clone();
    let printed_module = |m: &kir::module::Module| {
        m.print().map_err(|e| CodegenError::Unsupported {
            kernel: kernel.name.clone(),
            message: format!("generator bug: {e}"),
        })
    };
    // Summing kernels: each dispatch's reductions add the sums carried from the chunks before.
    let batch_end = batch.unwrap_or(0);
    // After the running sums, only the chunk that ends the batch runs the epilogue.
    let last_chunk_only = |f: &mut kir::Builder| {
        let end = f.chunk(kir::ChunkBound::EndImage);
        let batch = f.u32(batch_end);
        let before = f.bin(BinOp::Lt, end, batch);
        f.if_(before, |f| f.return_());
    };
    // Stores `root`'s element `at` (operand `k`) into its buffer.
    let store_root = |f: &mut kir::Builder, root: NodeId, k: usize, at: kir::Expr| {
        let g = f.global(global(plan.buffer_of[root.0].expect("roots are stored")));
        let value = f.operand(k, at);
        f.store(g, at, value);
    };
    // The other roots, one element per invocation `j` below their size (operands from
    // `first`, in the roots' order).
    let other_roots = |f: &mut kir::Builder, others: &[NodeId], first: usize, j: kir::Expr| {
        for (k, &r) in others.iter().enumerate() {
            let n = f.u32(graph.ty(r).numel());
            let inside = f.bin(BinOp::Lt, j, n);
            f.if_(inside, |f| store_root(f, r, first + k, j));
        }
    };
    // The loaders of a summed reduction's finished sums, under the names of its forms.
    let loaders = |red: NodeId, lanes: Vec<usize>, rows: Option<Vec<usize>>, quads: bool| {
        let forms = chunks::SummedForms {
            scalar: kernel.nodes.contains(&red),
            lanes,
            rows,
        };
        chunks::sum_loaders(red, &forms, quads)
    };
    let kernel_ir;
    match &kernel.kind {
        KernelKind::Map { .. } if conv_quads.is_some() => {
            // Every value is loaded and stored in the entry point itself.
            let q = conv_quads.as_ref().expect("quads");
            let buffer = |id: NodeId| plan.buffer_of[id.0].expect("bound nodes have buffers");
            let at = |id: NodeId| (global(buffer(id)), uniform_at(buffer(id)).flatten());
            let mut f = kir::Builder::entry(Vec::new());
            let row = dispatch[0] as usize * workgroup_size as usize;
            let count = chunking.is_none().then_some(q.invocations(graph));
            let j = invocation(&mut f, "j", row, count);
            crate::conv_quads::body(&mut f, graph, q, j, &at);
            kernel_ir = Some(map_module(Vec::new(), workgroup_size, f, Vec::new()));
        }
        KernelKind::Map { roots } if columns.is_some() => {
            let (main, red, kw, channels) = columns.expect("columns");
            let ins = &graph.node(red).inputs;
            let (xv, dyv) = (v(ins[0]), v(ins[1]));
            // Offsets from `i` of the values an invocation computes: kernel columns of each of
            // its output channels.
            let channel_words = graph.ty(red).numel() / graph.ty(red).shape[0];
            let offsets: Vec<usize> = (0..channels)
                .flat_map(|k| (0..kw).map(move |kx| k * channel_words + kx))
                .collect();
            if channels > 1 {
                let (x, dy) = column_operands.expect("whole rows read uniform bindings");
                let window = |b: usize| uniform_at(b).expect("read from a uniform binding");
                functions.push(crate::conv_quads::weight_rows_fn(
                    graph,
                    red,
                    channels,
                    (binding_of(x), window(x)),
                    (binding_of(dy), window(dy)),
                ));
            } else {
                let window = |b: usize| uniform_at(b).expect("read from a uniform binding");
                let loads = match column_quads {
                    Some((x, dy)) => chunks::ColumnLoads::Vec4 {
                        x: (binding_of(x), window(x)),
                        dy: (binding_of(dy), window(dy)),
                    },
                    None => chunks::ColumnLoads::Scalar {
                        x: xv.clone(),
                        dy: dyv.clone(),
                    },
                };
                functions.push(chunks::kernel_columns_fn(graph, red, loads));
            }
            for &(r, _) in &sums {
                functions.extend(loaders(r, Vec::new(), None, false));
            }
            // Operand 0: the kernel columns' chunk part; 1: the main root; then the chunk
            // parts of the other sums and the other roots.
            let others: Vec<NodeId> = roots.iter().copied().filter(|&r| r != main).collect();
            let other_sums: Vec<(NodeId, NodeId)> =
                sums.iter().copied().filter(|&(r, _)| r != red).collect();
            let mut operands = vec![
                kir::Ty::array(kir::Ty::F32, offsets.len() as u32).expect("one deep"),
                compute::value_ty(graph.ty(main).dtype),
            ];
            let mut callees = vec![
                Callee::Call(crate::text::chunk_part(&format!("v{}_columns", red.0))),
                Callee::Call(v(main)),
            ];
            for &(r, _) in &other_sums {
                operands.push(kir::Ty::F32);
                callees.push(Callee::Call(crate::text::chunk_part(&v(r))));
            }
            element_operands(graph, &others, (&mut operands, &mut callees));
            let mut f = kir::Builder::entry(operands);
            let j = invocation(
                &mut f,
                "j",
                dispatch[0] as usize * workgroup_size as usize,
                None,
            );
            // Invocation j covers channels `channels * (j / per_set) ..` at kernel row
            // `j % per_set` (an (input channel, kernel row) pair).
            let per_set = channel_words / kw;
            let first = if channels > 1 {
                let (per, block, kwu) =
                    (f.u32(per_set), f.u32(channels * channel_words), f.u32(kw));
                let set = f.div(j, per);
                let set = f.mul(set, block);
                let row = f.rem(j, per);
                let row = f.mul(row, kwu);
                f.add(set, row)
            } else {
                let kwu = f.u32(kw);
                f.mul(j, kwu)
            };
            let i = f.let_("i", kir::Ty::U32, first);
            let stores: Vec<(usize, kir::Part)> = offsets
                .iter()
                .enumerate()
                .map(|(k, &off)| {
                    (
                        off,
                        kir::Part {
                            index: Some(k as u32),
                            lane: None,
                        },
                    )
                })
                .collect();
            let mut other = 0;
            for &(r, root) in &sums {
                if r == red {
                    let columns = f.operand(0, i);
                    let ty = f.operand_ty(0);
                    chunks::running_sum(&mut f, red, ("rows", ty, columns), i, &stores, false);
                } else {
                    let part = f.operand(2 + other, j);
                    other += 1;
                    chunks::element_running_sum(&mut f, r, j, part, graph.ty(root).numel());
                }
            }
            last_chunk_only(&mut f);
            for &k in &offsets {
                let at = if k == 0 {
                    i
                } else {
                    let d = f.u32(k);
                    f.add(i, d)
                };
                store_root(&mut f, main, 1, at);
            }
            other_roots(&mut f, &others, 2 + other_sums.len(), j);
            kernel_ir = Some(map_module(functions.clone(), workgroup_size, f, callees));
        }
        KernelKind::Map { roots } if blocking.is_some() => {
            let (main, b, fns, rows) = blocking.as_ref().expect("blocked");
            functions.extend(fns.items().iter().cloned());
            let part = |index: Option<usize>, lane: Option<usize>| kir::Part {
                index: index.map(|k| k as u32),
                lane: lane.map(|l| l as u32),
            };
            let main_numel = graph.ty(*main).numel();
            // The invocation grid: the main root's index space with its blocked axes divided
            // by their blocks, and how far one grid step moves in the root's flat index; what
            // the invocation computes (`rows` of lanes, or one `value` of four), its lanes'
            // offsets from `i`, and its vec4s' offsets.
            type Stores = Vec<(usize, kir::Part)>;
            let (grid, steps, setup, stores, quads): (Vec<usize>, Vec<usize>, _, Stores, Stores) =
                match rows {
                    Some((r, rows_fn)) => {
                        let shape = &graph.ty(r.top()).shape;
                        let st = strides(shape);
                        let block = |d: usize| {
                            if d == r.lane_axis {
                                LANES
                            } else if d == r.row_axis {
                                r.count
                            } else if d == r.inner_axis {
                                r.inner
                            } else {
                                1
                            }
                        };
                        let offsets = r.offsets(&st);
                        (
                            (0..shape.len()).map(|d| shape[d] / block(d)).collect(),
                            (0..shape.len())
                                .map(|d| {
                                    // Along the lanes: four apart, or one where the lanes lie a
                                    // quarter of the axis apart.
                                    if d == r.lane_axis {
                                        b.step()
                                    } else {
                                        block(d) * st[d]
                                    }
                                })
                                .collect(),
                            (
                                "rows",
                                vec4s_ty(r.accumulators()),
                                Callee::Call(rows_fn.clone()),
                            ),
                            offsets
                                .iter()
                                .enumerate()
                                .flat_map(|(q, &at)| {
                                    (0..LANES)
                                        .map(move |k| (at + k * b.stride, part(Some(q), Some(k))))
                                })
                                .collect(),
                            offsets
                                .iter()
                                .enumerate()
                                .map(|(q, &at)| (at, part(Some(q), None)))
                                .collect(),
                        )
                    }
                    None => (
                        vec![main_numel / b.span(), b.extent / LANES, b.base()],
                        vec![b.span(), b.step(), 1],
                        (
                            "value",
                            kir::Ty::VEC4_F32,
                            Callee::Call(lane_fn(*main, b.stride)),
                        ),
                        (0..LANES)
                            .map(|k| (k * b.stride, part(None, Some(k))))
                            .collect(),
                        vec![(0, part(None, None))],
                    ),
                };
            // Every chunk adds its part to the running sums; the last then runs the epilogue,
            // which loads the finished sums.
            let summed_lanes = |red: NodeId| -> Vec<usize> {
                fns.summed_lanes
                    .iter()
                    .filter(|(n, _)| *n == red)
                    .map(|(_, s)| *s)
                    .collect()
            };
            // Operand 0: what the invocation computes; then each sum's chunk part; then the
            // other roots.
            let (setup_name, setup_ty, setup_fn) = setup;
            let others: Vec<NodeId> = roots.iter().copied().filter(|&r| r != *main).collect();
            let mut operands = vec![setup_ty];
            let mut callees = vec![setup_fn];
            for &(red, root) in &sums {
                if root == *main {
                    let part = match rows {
                        Some((r, _)) if r.reduction == red && r.pool.is_none() => (
                            crate::text::chunk_part(&format!("v{}_rows_of_reduction", red.0)),
                            setup_ty,
                        ),
                        Some(_) => return Ok((None, shares_loads)),
                        None => (
                            crate::text::chunk_part(&lane_fn(red, b.stride)),
                            kir::Ty::VEC4_F32,
                        ),
                    };
                    operands.push(part.1);
                    callees.push(Callee::Call(part.0));
                } else {
                    operands.push(kir::Ty::F32);
                    callees.push(Callee::Call(crate::text::chunk_part(&v(red))));
                }
            }
            element_operands(graph, &others, (&mut operands, &mut callees));
            let mut f = kir::Builder::entry(operands);
            let count = grid.iter().product::<usize>();
            let row = dispatch[0] as usize * workgroup_size as usize;
            let j = invocation(&mut f, "j", row, chunking.is_none().then_some(count));
            let names: Vec<String> = (0..grid.len()).map(|d| format!("g{d}")).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let coords = f.decode(j, &refs, &grid);
            let mut first = None;
            for (d, &c) in coords.iter().enumerate() {
                let step = f.u32(steps[d]);
                let term = f.mul(c, step);
                first = Some(match first {
                    None => term,
                    Some(sum) => f.add(sum, term),
                });
            }
            let i = f.let_("i", kir::Ty::U32, first.expect("a grid has axes"));
            for (k, &(red, root)) in sums.iter().enumerate() {
                if root == *main {
                    let value = f.operand(1 + k, i);
                    let ty = f.operand_ty(1 + k);
                    if quad_sum == Some(red) {
                        chunks::running_sum(&mut f, red, (setup_name, ty, value), i, &quads, true);
                    } else {
                        chunks::running_sum(
                            &mut f,
                            red,
                            (setup_name, ty, value),
                            i,
                            &stores,
                            false,
                        );
                    }
                    let rows_offsets = rows
                        .as_ref()
                        .filter(|(r, _)| r.reduction == red)
                        .map(|_| stores.iter().map(|(off, _)| *off).collect());
                    functions.extend(loaders(
                        red,
                        summed_lanes(red),
                        rows_offsets,
                        quad_sum == Some(red),
                    ));
                } else {
                    let value = f.operand(1 + k, j);
                    chunks::element_running_sum(&mut f, red, j, value, graph.ty(root).numel());
                    functions.extend(loaders(red, summed_lanes(red), None, false));
                }
            }
            if !sums.is_empty() {
                last_chunk_only(&mut f);
            }
            let computed = f.operand(0, i);
            let computed = f.let_(setup_name, setup_ty, computed);
            let g = f.global(global(plan.buffer_of[main.0].expect("roots are stored")));
            let at = |f: &mut kir::Builder, off: usize| {
                if off == 0 {
                    i
                } else {
                    let d = f.u32(off);
                    f.add(i, d)
                }
            };
            if blocked_vec4_out.is_some() {
                for &(off, p) in &quads {
                    let index = at(&mut f, off);
                    let two = f.u32(2);
                    let q = f.bin(BinOp::ShiftRight, index, two);
                    let value = f.part(computed, p);
                    f.store(g, q, value);
                }
            } else {
                for &(off, p) in &stores {
                    let index = at(&mut f, off);
                    let value = f.part(computed, p);
                    f.store(g, index, value);
                }
            }
            other_roots(&mut f, &others, 1 + sums.len(), j);
            kernel_ir = Some(map_module(functions.clone(), workgroup_size, f, callees));
        }
        KernelKind::Map { roots } if sums.is_empty() && chunking.is_none() => {
            // One invocation per element, every root stored: all kernel IR.
            let operands: Vec<kir::Ty> = roots
                .iter()
                .map(|r| compute::value_ty(graph.ty(*r).dtype))
                .collect();
            let mut f = kir::Builder::entry(operands);
            let numel = roots
                .iter()
                .map(|r| numel_u32(&kernel.name, graph.ty(*r)))
                .collect::<Result<Vec<u32>, _>>()?;
            let count = *numel.iter().max().expect("map kernels have a root");
            let (x, y) = (f.global_id(0), f.global_id(1));
            let row = f.u32(dispatch[0] as usize * workgroup_size as usize);
            let t = f.mul(y, row);
            let t = f.add(x, t);
            let i = f.let_("i", kir::Ty::U32, t);
            let end = f.lit(kir::Literal::U32(count));
            let past = f.bin(BinOp::Ge, i, end);
            f.if_(past, |f| f.return_());
            for (k, r) in roots.iter().enumerate() {
                let g = f.global(global(plan.buffer_of[r.0].expect("roots are stored")));
                let store = |f: &mut kir::Builder| {
                    let value = f.operand(k, i);
                    f.store(g, i, value);
                };
                if roots.len() == 1 {
                    store(&mut f);
                } else {
                    let n = f.lit(kir::Literal::U32(numel[k]));
                    let inside = f.bin(BinOp::Lt, i, n);
                    f.if_(inside, store);
                }
            }
            let callees = roots.iter().map(|r| Callee::Call(v(*r))).collect();
            kernel_ir = Some(map_module(items, workgroup_size, f, callees));
        }
        KernelKind::Map { roots } => {
            // One invocation per element, summing chunk by chunk or cut into image chunks.
            let mut operands: Vec<kir::Ty> = vec![kir::Ty::F32; sums.len()];
            let mut callees: Vec<Callee> = sums
                .iter()
                .map(|(red, _)| Callee::Call(crate::text::chunk_part(&v(*red))))
                .collect();
            for &(red, _) in &sums {
                functions.extend(loaders(red, Vec::new(), None, false));
            }
            let mut numel = 0;
            for r in roots {
                numel = numel.max(numel_u32(&kernel.name, graph.ty(*r))?);
            }
            element_operands(graph, roots, (&mut operands, &mut callees));
            let mut f = kir::Builder::entry(operands);
            let row = dispatch[0] as usize * workgroup_size as usize;
            let i = invocation(
                &mut f,
                "i",
                row,
                chunking.is_none().then_some(numel as usize),
            );
            for (k, &(red, root)) in sums.iter().enumerate() {
                let value = f.operand(k, i);
                chunks::element_running_sum(&mut f, red, i, value, graph.ty(root).numel());
            }
            if !sums.is_empty() {
                last_chunk_only(&mut f);
            }
            if roots.len() == 1 {
                store_root(&mut f, roots[0], sums.len(), i);
            } else {
                other_roots(&mut f, roots, sums.len(), i);
            }
            kernel_ir = Some(map_module(functions.clone(), workgroup_size, f, callees));
        }
        KernelKind::Head(h) => {
            // A workgroup's barriers: printed from the kernel IR, not interpreted.
            kernel_ir = Some(kir::module::Module {
                items,
                entry: head_main(graph, plan, h, &global, head_workgroup),
            });
        }
    }
    let mut module = kernel_ir.expect("every schedule is kernel IR");
    let is_head = matches!(kernel.kind, KernelKind::Head(_));
    // Several chunks per dispatch where binding slots and code size allow.
    if let Some(c) = chunking.as_mut() {
        let storage = bindings
            .iter()
            .filter(|b| matches!(b.access, Access::Read | Access::ReadWrite))
            .count()
            + 1
            + c.sums.len();
        let free = crate::spans::FreeSlots {
            uniforms: target
                .max_uniform_buffers_per_stage
                .saturating_sub(uniforms + 1),
            storage: target
                .max_storage_buffers_per_stage
                .saturating_sub(storage as u32),
        };
        crate::spans::repeat(&mut module, c, free);
    }
    let s = header(chunking.as_ref()) + &printed_module(&module)?;
    // The head's two partial-sum arrays (f32 and u32, one entry per invocation).
    let workgroup_storage_bytes = match kernel.kind {
        KernelKind::Head(_) => 2 * u64::from(head_workgroup) * 4,
        KernelKind::Map { .. } => 0,
    };
    Ok((
        Some(KernelModule {
            name: kernel.name.clone(),
            wgsl: s,
            bindings,
            dispatch,
            workgroup_size,
            workgroup_storage_bytes,
            chunks: chunking,
            loop_iterations: None,
            // The head's barriers are printed, not interpreted.
            kernel_ir: (!is_head).then_some(module),
            functions,
        }),
        shares_loads,
    ))
}

/// Appends each of `nodes`' element functions `v<id>` to an entry point's operands.
fn element_operands(
    graph: &Graph,
    nodes: &[NodeId],
    (operands, callees): (&mut Vec<kir::Ty>, &mut Vec<Callee>),
) {
    for &n in nodes {
        operands.push(compute::value_ty(graph.ty(n).dtype));
        callees.push(Callee::Call(v(n)));
    }
}

/// A map kernel's module: its functions and, from `f`, its entry point.
fn map_module(
    items: Vec<Item>,
    workgroup_size: u32,
    f: kir::Builder,
    callees: Vec<Callee>,
) -> kir::module::Module {
    kir::module::Module {
        items,
        entry: kir::module::Entry {
            workgroup_size,
            function: f.finish(),
            callees,
            workgroup: Vec::new(),
            spans: Vec::new(),
        },
    }
}

/// The invocation's index `var`: `gid.x + gid.y * row`, returning past `count`; or, in an
/// image chunk (`count` `None`), plus the chunk's first invocation, returning past its end.
fn invocation(f: &mut kir::Builder, var: &str, row: usize, count: Option<usize>) -> kir::Expr {
    let (x, y) = (f.global_id(0), f.global_id(1));
    let r = f.u32(row);
    let t = f.mul(y, r);
    let mut at = f.add(x, t);
    if count.is_none() {
        let first = f.chunk(kir::ChunkBound::FirstInvocation);
        at = f.add(at, first);
    }
    let j = f.let_(var, kir::Ty::U32, at);
    let end = match count {
        Some(n) => f.u32(n),
        None => f.chunk(kir::ChunkBound::EndInvocation),
    };
    let past = f.bin(BinOp::Ge, j, end);
    f.if_(past, |f| f.return_());
    j
}

/// `array<vec4<f32>, n>`.
fn vec4s_ty(n: usize) -> kir::Ty {
    kir::Ty::array(kir::Ty::VEC4_F32, n as u32).expect("one deep")
}

/// Bytes of part `k` of a buffer of `bytes` split in parts of `part_bytes`.
fn part_len(bytes: u64, part_bytes: u64, k: u32) -> u64 {
    part_bytes.min(bytes - u64::from(k) * part_bytes)
}

/// The classifier head's entry point: one workgroup strides over the rows, keeping a row's
/// logits in a local array for the softmax shift, argmax, loss and gradient, then sums the
/// invocations' partial loss and count in workgroup memory.
fn head_main(
    graph: &Graph,
    plan: &Plan,
    h: &Head,
    global: &dyn Fn(usize) -> kir::Global,
    workgroup: u32,
) -> kir::module::Entry {
    use kir::{Literal, MathFn, Scalar, Space, Ty};
    let [n, c] = <[usize; 2]>::try_from(graph.ty(h.logits).shape.as_slice()).expect("rank 2");
    let buffer = |id: NodeId| plan.buffer_of[id.0].expect("head outputs are stored");
    // Operands: the logits, then the labels, the other side of the count, the gradient's
    // labels and its scale, where the head computes them.
    let mut callees = vec![Callee::Call(v(h.logits))];
    let mut operand_tys = vec![compute::value_ty(graph.ty(h.logits).dtype)];
    let mut operand = |id: NodeId| {
        callees.push(Callee::Call(v(id)));
        operand_tys.push(compute::value_ty(graph.ty(id).dtype));
        callees.len() - 1
    };
    let loss = h
        .loss
        .map(|(sce, r)| (operand(graph.node(sce).inputs[1]), r));
    let correct = h.correct.map(|(arg, count)| {
        let ins = &graph.node(count).inputs;
        (operand(if ins[0] == arg { ins[1] } else { ins[0] }), count)
    });
    let grad = h.grad.map(|g| {
        let ins = &graph.node(g).inputs;
        (operand(ins[1]), operand(ins[2]), g)
    });
    let mut f = kir::Builder::entry(operand_tys);
    let part_loss = f.global(kir::Global {
        name: "part_loss".into(),
        space: Space::Workgroup,
        elem: Ty::F32,
    });
    let part_count = f.global(kir::Global {
        name: "part_count".into(),
        space: Space::Workgroup,
        elem: Ty::U32,
    });
    let lid = f.local_index();
    let zero_f = f.f32(0.0);
    let loss_sum = f.var("loss", Ty::F32, zero_f);
    let zero_u = f.u32(0);
    let count = f.var("count", Ty::U32, zero_u);
    let (rows, wg) = (f.u32(n), f.u32(workgroup as usize));
    let below = |f: &mut kir::Builder, r: kir::Expr| f.bin(BinOp::Lt, r, rows);
    f.loop_("r", lid, (&below, wg, false), |f, r| {
        let z = f.var_array("z", Ty::F32, c as u32);
        let (c0, cn) = (f.u32(0), f.u32(c));
        f.for_("c", c0, cn, |f, k| {
            let cu = f.u32(c);
            let t = f.mul(r, cu);
            let at = f.add(t, k);
            let x = f.operand(0, at);
            f.assign_element(z, k, x);
        });
        f.comment("First maximum (NaN wins), shared by the softmax shift and argmax.");
        let first = f.lit(Literal::U32(0));
        let z0 = f.element(z, first);
        let m = f.var("m", Ty::F32, z0);
        let zu = f.u32(0);
        let best = f.var("best", Ty::U32, zu);
        let (c1, cn) = (f.u32(1), f.u32(c));
        f.for_("c", c1, cn, |f, k| {
            let mv = f.get(m);
            let zc = f.element(z, k);
            let takes = compute::first_max_takes(f, mv, zc, BinOp::And);
            f.if_(takes, |f| {
                f.assign(m, zc);
                f.assign(best, k);
            });
        });
        let zf = f.f32(0.0);
        let s = f.var("s", Ty::F32, zf);
        let (c0, cn) = (f.u32(0), f.u32(c));
        f.for_("c", c0, cn, |f, k| {
            let zc = f.element(z, k);
            let mv = f.get(m);
            let d = f.sub(zc, mv);
            let e = f.math(MathFn::Exp, &[d]);
            f.add_assign(s, e);
        });
        let label = |f: &mut kir::Builder, k: usize, name: &str| {
            let l = f.operand(k, r);
            let l = compute::clamped_label(f, l, c);
            f.let_(name, Ty::U32, l)
        };
        if let Some((k, _)) = loss {
            let l = label(f, k, "loss_label");
            let (mv, sv) = (f.get(m), f.get(s));
            let ls = f.math(MathFn::Log, &[sv]);
            let t = f.add(mv, ls);
            let zl = f.element(z, l);
            let t = f.sub(t, zl);
            f.add_assign(loss_sum, t);
        }
        if let Some((k, _)) = correct {
            let bv = f.get(best);
            let bi = f.cast(Scalar::I32, bv);
            let o = f.operand(k, r);
            let oi = f.cast(Scalar::I32, o);
            let hit = f.bin(BinOp::Eq, bi, oi);
            f.if_(hit, |f| {
                let one = f.u32(1);
                f.add_assign(count, one);
            });
        }
        if let Some((kl, kd, g)) = grad {
            let l = label(f, kl, "grad_label");
            let d = f.operand(kd, r);
            let dloss = f.let_("dloss", Ty::F32, d);
            let out = f.global(global(buffer(g)));
            let (c0, cn) = (f.u32(0), f.u32(c));
            f.for_("c", c0, cn, |f, k| {
                let zc = f.element(z, k);
                let mv = f.get(m);
                let d = f.sub(zc, mv);
                let e = f.math(MathFn::Exp, &[d]);
                let sv = f.get(s);
                let p = f.div(e, sv);
                let p = f.let_("p", Ty::F32, p);
                let is = f.bin(BinOp::Eq, k, l);
                let (zero, one) = (f.f32(0.0), f.f32(1.0));
                let onehot = f.select(is, one, zero);
                let t = f.sub(p, onehot);
                let value = f.mul(t, dloss);
                let cu = f.u32(c);
                let row = f.mul(r, cu);
                let at = f.add(row, k);
                f.store(out, at, value);
            });
        }
    });
    f.comment(&format!(
        "Tree reduction over the workgroup: {workgroup} partial sums become one in slot 0."
    ));
    let (lv, cv) = (f.get(loss_sum), f.get(count));
    f.store(part_loss, lid, lv);
    f.store(part_count, lid, cv);
    f.barrier();
    let (wgu, two) = (f.u32(workgroup as usize), f.u32(2));
    let half = f.div(wgu, two);
    let positive = |f: &mut kir::Builder, s: kir::Expr| {
        let z = f.u32(0);
        f.bin(BinOp::Gt, s, z)
    };
    f.loop_("stride", half, (&positive, two, true), |f, stride| {
        let inside = f.bin(BinOp::Lt, lid, stride);
        f.if_(inside, |f| {
            let other = f.add(lid, stride);
            for g in [part_loss, part_count] {
                let (a, b) = (f.load(g, lid), f.load(g, other));
                let sum = f.add(a, b);
                f.store(g, lid, sum);
            }
        });
        f.barrier();
    });
    let z = f.u32(0);
    let first = f.bin(BinOp::Eq, lid, z);
    f.if_(first, |f| {
        let zero = f.lit(Literal::U32(0));
        for (result, part) in [
            (loss.map(|(_, r)| r), part_loss),
            (correct.map(|(_, r)| r), part_count),
        ] {
            if let Some(r) = result {
                let out = f.global(global(buffer(r)));
                let x = f.load(part, zero);
                f.store(out, zero, x);
            }
        }
    });
    kir::module::Entry {
        workgroup_size: workgroup,
        function: f.finish(),
        callees,
        workgroup: vec![
            ("part_loss".into(), Ty::F32, workgroup),
            ("part_count".into(), Ty::U32, workgroup),
        ],
        spans: Vec::new(),
    }
}
