//! Register blocking: four outputs per invocation.
//!
//! A reduction computing one output per invocation loads both operands for every multiply-add.
//! Four outputs that share an operand — four output channels of a convolution share the input
//! pixel, four columns of a matmul share the row, four images share the weight — load it once
//! per four multiply-adds and give the driver `vec4` arithmetic. On lavapipe, where every
//! storage load is a bounds-checked per-lane gather, this is the largest single lever
//! (`../shared/notes`: 10-20x for dense layers with wider blocks); on GPUs it is the usual
//! register tiling.
//!
//! A blocked kernel evaluates `v<id>_x4s<s>(i) -> vec4<f32>`: the elements `i`, `i + s`,
//! `i + 2s` and `i + 3s` of node `id`. The invariant every caller keeps: the four lanes are
//! elements of the node, and when `s` is the stride of an axis whose size is a multiple of
//! four, they are four consecutive coordinates of that axis starting at a multiple of four. An op
//! with a rule for that axis asks for its operands blocked (with their own strides) or shared (a
//! plain scalar call); any other op falls back to four scalar evaluations, which is always
//! correct, so blocking never changes what a kernel computes, only how many loads it makes.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use kiln_ir::{DType, Graph, NodeId, Op};

use crate::plan::{Kernel, Placement, Plan};
use crate::wgsl::{body_with, strides, u, v};

/// Outputs per invocation of a blocked kernel (the lanes of a `vec4`).
pub const LANES: usize = 4;

/// How a blocked kernel splits its root's flat index space: four coordinates of a virtual axis
/// of `extent` elements at `stride` per invocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocking {
    pub stride: usize,
    pub extent: usize,
}

/// The lane functions of one kernel, generated on demand from the root down.
pub struct LaneFns<'a> {
    graph: &'a Graph,
    plan: &'a Plan,
    kernel: &'a Kernel,
    binding_of: &'a dyn Fn(usize) -> u32,
    uniform: &'a dyn Fn(usize) -> bool,
    done: BTreeSet<(NodeId, usize)>,
    pub text: String,
    /// Multiply-adds per output done by reductions with a blocked rule: what choosing a
    /// blocking maximises.
    pub blocked_work: usize,
    /// The reductions with a blocked rule, for the kernel's header.
    pub blocked: Vec<String>,
}

pub fn lane_fn(id: NodeId, stride: usize) -> String {
    format!("v{}_x4s{stride}", id.0)
}

/// An operand of a blocked op: four lanes at its own stride, or one value shared by the lanes.
enum Operand {
    Lanes(usize),
    Shared,
}

impl<'a> LaneFns<'a> {
    pub fn new(
        graph: &'a Graph,
        plan: &'a Plan,
        kernel: &'a Kernel,
        binding_of: &'a dyn Fn(usize) -> u32,
        uniform: &'a dyn Fn(usize) -> bool,
    ) -> Self {
        LaneFns {
            graph,
            plan,
            kernel,
            binding_of,
            uniform,
            done: BTreeSet::new(),
            text: String::new(),
            blocked_work: 0,
            blocked: Vec::new(),
        }
    }

    /// The name of `id`'s lane function at `stride`, generating it (and what it calls) once.
    pub fn request(&mut self, id: NodeId, stride: usize) -> String {
        let name = lane_fn(id, stride);
        if !self.done.insert((id, stride)) {
            return name;
        }
        let computed_here = self.kernel.nodes.contains(&id);
        let body = if computed_here {
            self.rule(id, stride)
        } else {
            None
        };
        if let Some(slot) = self.aligned_uniform(id, stride) {
            // Four consecutive weights starting at a multiple of four: one vec4 of the binding.
            let _ = writeln!(
                self.text,
                "fn {name}(i: u32) -> vec4<f32> {{\n    return buf{slot}[i >> 2u];\n}}"
            );
            return name;
        }
        let saved = matches!(self.plan.placement[id.0], Placement::Side { .. })
            && self.kernel.stores.contains(&id);
        match body {
            Some(body) if saved => {
                // Store the four lanes as they are computed, like the scalar saved values.
                let slot = (self.binding_of)(
                    self.plan.buffer_of[id.0].expect("stored nodes have buffers"),
                );
                let _ = writeln!(
                    self.text,
                    "fn value_of_{name}(i: u32) -> vec4<f32> {{\n{body}}}"
                );
                let _ = write!(
                    self.text,
                    "fn {name}(i: u32) -> vec4<f32> {{\n    let value = value_of_{name}(i);\n"
                );
                for (k, lane) in ["x", "y", "z", "w"].iter().enumerate() {
                    let _ = writeln!(
                        self.text,
                        "    buf{slot}[{}] = value.{lane};",
                        offset("i", k * stride)
                    );
                }
                let _ = writeln!(self.text, "    return value;\n}}");
            }
            Some(body) => {
                let _ = writeln!(self.text, "fn {name}(i: u32) -> vec4<f32> {{\n{body}}}");
            }
            None => {
                // Four scalar evaluations (a saved scalar function stores each lane itself).
                let lanes: Vec<String> = (0..LANES)
                    .map(|k| format!("{}({})", v(id), offset("i", k * stride)))
                    .collect();
                let _ = writeln!(
                    self.text,
                    "fn {name}(i: u32) -> vec4<f32> {{\n    return vec4<f32>({});\n}}",
                    lanes.join(", ")
                );
            }
        }
        name
    }

    /// The binding of `id` when it is read from a uniform buffer and lanes at `stride` are
    /// four consecutive elements starting at a multiple of four.
    fn aligned_uniform(&self, id: NodeId, stride: usize) -> Option<u32> {
        let b = self.plan.buffer_of[id.0]?;
        let shape = &self.graph.ty(id).shape;
        let st = strides(shape);
        let aligned = stride == 1 && (0..shape.len()).any(|a| st[a] == 1 && shape[a] % LANES == 0);
        (self.kernel.reads.contains(&id) && (self.uniform)(b) && aligned)
            .then(|| (self.binding_of)(b))
    }

    /// The blocked body of computed node `id` at `stride`, or `None` where the op has no rule
    /// for that axis.
    fn rule(&mut self, id: NodeId, stride: usize) -> Option<String> {
        let graph = self.graph;
        let node = graph.node(id);
        if node.ty.dtype != DType::F32 {
            return None;
        }
        let out = &node.ty.shape;
        let out_strides = strides(out);
        let axis = (0..out.len()).find(|&a| out_strides[a] == stride && out[a] % LANES == 0);
        let in_strides = |k: usize| strides(&graph.ty(node.inputs[k]).shape);
        use Operand::{Lanes, Shared};
        let operands: Vec<Operand> = match (&node.op, axis) {
            (
                Op::Sigmoid
                | Op::Relu
                | Op::Tanh
                | Op::SigmoidGrad
                | Op::ReluGrad
                | Op::TanhGrad
                | Op::Add
                | Op::Sub
                | Op::Scale { .. }
                | Op::Reshape { .. }
                | Op::Full { .. },
                _,
            ) => node.inputs.iter().map(|_| Lanes(stride)).collect(),
            (Op::BiasAdd { axis: b }, Some(a)) => {
                vec![Lanes(stride), if a == *b { Lanes(1) } else { Shared }]
            }
            (Op::Conv2d { .. }, Some(1)) => vec![Shared, Lanes(in_strides(1)[0])],
            (Op::Conv2d { .. }, Some(0)) => vec![Lanes(in_strides(0)[0]), Shared],
            (Op::Conv2dGradInput { .. }, Some(1)) => vec![Shared, Lanes(in_strides(1)[1])],
            (Op::Conv2dGradInput { .. }, Some(0)) => vec![Lanes(in_strides(0)[0]), Shared],
            (Op::Conv2dGradWeight { .. }, Some(0)) => vec![Shared, Lanes(in_strides(1)[1])],
            (Op::Conv2dGradWeight { .. }, Some(1)) => vec![Lanes(in_strides(0)[1]), Shared],
            (Op::AvgPool2d { .. } | Op::MaxPool2d { .. } | Op::AvgPool2dGrad { .. }, Some(a))
                if a < 2 =>
            {
                vec![Lanes(in_strides(0)[a])]
            }
            (Op::MatMul { transpose_b, .. }, Some(1)) => {
                vec![Shared, Lanes(in_strides(1)[usize::from(!*transpose_b)])]
            }
            (Op::MatMul { transpose_a, .. }, Some(0)) => {
                vec![Lanes(in_strides(0)[usize::from(*transpose_a)]), Shared]
            }
            _ => return None,
        };
        let blocked_input_not_f32 = node
            .inputs
            .iter()
            .zip(&operands)
            .any(|(&n, o)| matches!(o, Lanes(_)) && graph.ty(n).dtype != DType::F32);
        if blocked_input_not_f32 {
            return None;
        }
        let names: Vec<String> = node
            .inputs
            .iter()
            .zip(&operands)
            .map(|(&n, o)| match o {
                Lanes(s) => self.request(n, *s),
                Shared => v(n),
            })
            .collect();
        let work = reduction_length(graph, id);
        if work > 1 {
            self.blocked_work += work;
            self.blocked.push(format!(
                "{id} {} (axis {})",
                node.op.name(),
                axis.expect("reductions have a rule only for an axis")
            ));
        }
        Some(body_with(graph, id, &names, "vec4<f32>"))
    }
}

/// Multiply-adds (or loads) per output element of a reduction; 1 for elementwise ops.
fn reduction_length(graph: &Graph, id: NodeId) -> usize {
    let node = graph.node(id);
    let shape = |k: usize| &graph.ty(node.inputs[k]).shape;
    match &node.op {
        Op::Conv2d { .. } => shape(1)[1..].iter().product(),
        Op::Conv2dGradInput { .. } => shape(1)[0] * shape(1)[2] * shape(1)[3],
        Op::Conv2dGradWeight { .. } => shape(1)[0] * shape(1)[2] * shape(1)[3],
        Op::MatMul { transpose_a, .. } => shape(0)[usize::from(!*transpose_a)],
        Op::AvgPool2d { kernel, .. }
        | Op::MaxPool2d { kernel, .. }
        | Op::AvgPool2dGrad { kernel, .. } => kernel[0] * kernel[1],
        _ => 1,
    }
}

/// `base + delta` as WGSL, without a `+ 0u`.
fn offset(base: &str, delta: usize) -> String {
    if delta == 0 {
        base.to_string()
    } else {
        format!("{base} + {}", u(delta))
    }
}

/// The blocking of a map kernel's `root` that gives the most reduction work a blocked rule,
/// with its lane functions; `None` when no candidate blocks a reduction.
///
/// Candidates are the root's axes and, through a reshape of the same size, its input's axes
/// (so `f32[N,400]` can be blocked over the 16 channels of the `f32[N,16,5,5]` it flattens);
/// channel-like axis 1 is tried first, so it wins ties.
pub fn choose<'a>(
    graph: &'a Graph,
    plan: &'a Plan,
    kernel: &'a Kernel,
    root: NodeId,
    binding_of: &'a dyn Fn(usize) -> u32,
    uniform: &'a dyn Fn(usize) -> bool,
) -> Option<(Blocking, LaneFns<'a>)> {
    let ty = graph.ty(root);
    if ty.dtype != DType::F32 {
        return None;
    }
    let numel = ty.numel();
    let axes_of = |shape: &[usize]| -> Vec<Blocking> {
        let st = strides(shape);
        let mut order: Vec<usize> = (0..shape.len()).collect();
        if order.len() > 1 {
            order.swap(0, 1);
        }
        order
            .into_iter()
            .filter(|&a| shape[a] % LANES == 0)
            .map(|a| Blocking {
                stride: st[a],
                extent: shape[a],
            })
            .collect()
    };
    let mut candidates = Vec::new();
    for &n in &kernel.nodes {
        if matches!(graph.node(n).op, Op::Reshape { .. }) && graph.ty(n).numel() == numel {
            candidates.extend(axes_of(&graph.ty(graph.node(n).inputs[0]).shape));
        }
    }
    candidates.extend(axes_of(&ty.shape));
    let mut best: Option<(Blocking, LaneFns<'a>)> = None;
    let mut seen = Vec::new();
    for c in candidates {
        if seen.contains(&c) || numel % (c.stride * c.extent) != 0 {
            continue;
        }
        seen.push(c);
        let mut fns = LaneFns::new(graph, plan, kernel, binding_of, uniform);
        fns.request(root, c.stride);
        let better = best
            .as_ref()
            .is_none_or(|(_, b)| fns.blocked_work > b.blocked_work);
        if fns.blocked_work > 0 && better {
            best = Some((c, fns));
        }
    }
    best
}
