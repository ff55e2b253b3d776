//! The human-readable form of a plan (`--emit kernels`).

use std::fmt::Write as _;

use kiln_ir::{Graph, NodeId, Op, thousands};

use crate::plan::{Kernel, KernelKind, Placement, Plan};

/// `%7 conv2d@3`: a node, its op and the layer it came from.
pub(crate) fn node_label(graph: &Graph, n: NodeId) -> String {
    let node = graph.node(n);
    match &node.layer {
        Some(l) => format!("{n} {}@{}", node.op.name(), l.index),
        None => format!("{n} {}", node.op.name()),
    }
}

/// Lists each kernel with the IR ops it covers, what it reads and writes, and buffer sizes.
pub fn describe(graph: &Graph, plan: &Plan) -> String {
    let mut s = String::new();
    let ops = graph.nodes().iter().filter(|n| !n.op.is_leaf()).count();
    let bytes: u64 = plan.buffers.iter().map(|b| b.bytes()).sum();
    let _ = writeln!(
        s,
        "plan \"{}\": {} kernels for {} ops, {} buffers ({} bytes)",
        plan.graph,
        plan.kernels.len(),
        ops,
        plan.buffers.len(),
        thousands(bytes as usize)
    );
    for k in &plan.kernels {
        let kind = match &k.kind {
            KernelKind::Map { roots } => {
                let r: Vec<String> = roots
                    .iter()
                    .map(|r| format!("{r} {}", graph.ty(*r)))
                    .collect();
                format!("map over {}", r.join(" and "))
            }
            KernelKind::Head(h) => {
                format!("classifier head over the rows of {}", graph.ty(h.logits))
            }
        };
        let _ = writeln!(s, "{}: {kind}", k.name);
        let covered: Vec<String> = k
            .nodes
            .iter()
            .map(|&n| {
                let mut l = node_label(graph, n);
                if k.recomputed.contains(&n) {
                    l.push_str(" (recomputed)");
                }
                if matches!(plan.placement[n.0], Placement::Side { .. }) {
                    l.push_str(" (saved)");
                }
                l
            })
            .collect();
        let _ = writeln!(s, "  ops: {}", covered.join(", "));
        let buf = |n: &NodeId| {
            let b = plan
                .buffer(*n)
                .expect("read and written nodes have buffers");
            format!("{} {} ({} B)", b.name, b.ty, thousands(b.bytes() as usize))
        };
        let reads: Vec<String> = k.reads.iter().map(buf).collect();
        let writes: Vec<String> = k
            .stores
            .iter()
            .map(|n| {
                let in_place = plan.updates.iter().any(|(u, _)| u == n);
                format!("{}{}", buf(n), if in_place { " in place" } else { "" })
            })
            .collect();
        let _ = writeln!(s, "  reads: {}", reads.join(", "));
        let _ = writeln!(s, "  writes: {}", writes.join(", "));
    }
    s
}

/// The work of one kernel, for the profiler's GFLOP/s and GB/s columns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCost {
    /// Floating-point operations of the IR nodes the kernel computes, each node counted once
    /// (a multiply-add is two; work recomputed by inlining is not counted: this is the useful
    /// work, so recomputation shows up as a lower GFLOP/s).
    pub flops: u64,
    /// Bytes of every buffer the kernel reads plus every buffer it writes, each once: the
    /// traffic the kernel cannot avoid, whatever its caches do.
    pub bytes: u64,
}

/// Floating-point operations of computing node `id` once.
pub fn node_flops(graph: &Graph, id: NodeId) -> u64 {
    let node = graph.node(id);
    let out = node.ty.numel() as u64;
    let shape = |k: usize| &graph.ty(node.inputs[k]).shape;
    let numel = |k: usize| graph.ty(node.inputs[k]).numel() as u64;
    let window = |w: &[usize; 2]| (w[0] * w[1]) as u64;
    match &node.op {
        Op::Input { .. } | Op::Param { .. } | Op::Reshape { .. } | Op::Full { .. } => 0,
        Op::Gather | Op::Broadcast { .. } => 0,
        // Multiply-adds per output element times two.
        Op::Conv2d { .. } => 2 * out * shape(1)[1..].iter().product::<usize>() as u64,
        Op::Conv2dGradInput { .. } | Op::Conv2dGradWeight { .. } => {
            // Each dy element meets every weight of its output channel once.
            let (dy, w) = if matches!(node.op, Op::Conv2dGradInput { .. }) {
                (0, 1)
            } else {
                (1, 0)
            };
            let w_shape = if dy == 0 { shape(w) } else { &node.ty.shape };
            2 * numel(dy) * w_shape[1..].iter().product::<usize>() as u64
        }
        Op::MatMul { transpose_a, .. } => 2 * out * shape(0)[usize::from(!*transpose_a)] as u64,
        Op::AvgPool2d { kernel, .. } | Op::MaxPool2d { kernel, .. } => out * window(kernel),
        Op::AvgPool2dGrad { .. } => out,
        Op::MaxPool2dGrad { kernel, .. } => numel(1) * window(kernel),
        Op::ReduceSum { .. } | Op::ReduceMean { .. } | Op::CountEqual => numel(0),
        Op::SoftmaxCrossEntropy | Op::SoftmaxCrossEntropyGrad | Op::Argmax => 4 * numel(0),
        // Elementwise: one operation per element (a sigmoid's exp and division count as one).
        _ => out,
    }
}

/// The useful work and compulsory traffic of `kernel` (see [`KernelCost`]).
pub fn kernel_cost(graph: &Graph, plan: &Plan, kernel: &Kernel) -> KernelCost {
    let flops = kernel.nodes.iter().map(|&n| node_flops(graph, n)).sum();
    let reads: u64 = kernel
        .reads
        .iter()
        .map(|&n| {
            // A gathered data set is read one batch at a time, not whole.
            let b = &plan.buffers[plan.buffer_of[n.0].expect("reads have buffers")];
            let gathered = kernel
                .nodes
                .iter()
                .find(|&&g| matches!(graph.node(g).op, Op::Gather) && graph.node(g).inputs[0] == n);
            match gathered {
                Some(&g) => b
                    .bytes()
                    .min((graph.ty(g).numel() * if b.packed_u8 { 1 } else { 4 }) as u64),
                None => b.bytes(),
            }
        })
        .sum();
    let writes: u64 = kernel
        .stores
        .iter()
        .map(|&n| plan.buffer(n).map_or(0, |b| b.bytes()))
        .sum();
    KernelCost {
        flops,
        bytes: reads + writes,
    }
}
