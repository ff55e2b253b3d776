//! The human-readable form of a plan (`--emit kernels`).

use std::fmt::Write as _;

use kiln_ir::{Graph, NodeId, thousands};

use crate::plan::{KernelKind, Placement, Plan};

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
