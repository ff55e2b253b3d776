//! The plan verifier: checks a fused plan against its graph from scratch.

use std::collections::{HashMap, HashSet};

use kiln_ir::{Graph, NodeId};

use crate::plan::{KernelKind, Placement, Plan, is_anchor, reads_elementwise};
use crate::target::Target;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plan for `{graph}`: {message}")]
pub struct PlanError {
    pub graph: String,
    pub message: String,
}

/// Checks that `plan` computes `graph`: every op is computed by exactly one kernel unless it is
/// cheap and listed as recomputed; every stored value has exactly one writer, which runs before
/// every reader; every kernel reads only leaves, stored values or what it computes itself; no
/// parameter is updated before every kernel reading its old value has run, and the update reads
/// the parameter only at the element it writes; no kernel binds more storage buffers than the
/// target allows.
pub fn verify_plan(graph: &Graph, plan: &Plan, target: &Target) -> Result<(), PlanError> {
    let fail = |message: String| PlanError {
        graph: graph.name.clone(),
        message,
    };
    let mut computed_by: HashMap<NodeId, Vec<usize>> = HashMap::new();
    let mut writer: HashMap<NodeId, usize> = HashMap::new();
    for (k, kernel) in plan.kernels.iter().enumerate() {
        for &n in &kernel.nodes {
            computed_by.entry(n).or_default().push(k);
        }
        for &s in &kernel.stores {
            if let Some(other) = writer.insert(s, k) {
                return Err(fail(format!(
                    "{s} is written by both {} and {}",
                    plan.kernels[other].name, kernel.name
                )));
            }
            if !kernel.nodes.contains(&s) {
                return Err(fail(format!(
                    "{} stores {s} without computing it",
                    kernel.name
                )));
            }
            if plan.buffer_of[s.0].is_none() {
                return Err(fail(format!(
                    "{s} is stored by {} but has no buffer",
                    kernel.name
                )));
            }
        }
        if let KernelKind::Map { roots } = &kernel.kind {
            if let Some(root) = roots.iter().find(|r| !kernel.stores.contains(r)) {
                return Err(fail(format!(
                    "{} does not store its root {root}",
                    kernel.name
                )));
            }
        }
    }
    for (id, node) in graph.iter() {
        if node.op.is_leaf() {
            if computed_by.contains_key(&id) {
                return Err(fail(format!("leaf {id} is computed by a kernel")));
            }
            continue;
        }
        let by = computed_by.get(&id).map(Vec::as_slice).unwrap_or(&[]);
        match by {
            [] => {
                return Err(fail(format!(
                    "{id} ({}) is computed by no kernel",
                    node.op.name()
                )));
            }
            [_] => {}
            several => {
                let cheap = !is_anchor(&node.op);
                for &k in several {
                    if !cheap || !plan.kernels[k].recomputed.contains(&id) {
                        return Err(fail(format!(
                            "{id} ({}) is computed by {} kernels without being a cheap op marked as recomputed",
                            node.op.name(),
                            several.len()
                        )));
                    }
                }
            }
        }
    }
    for o in graph.outputs() {
        let stored = writer.contains_key(&o.node) || graph.node(o.node).op.is_leaf();
        if !stored {
            return Err(fail(format!(
                "output \"{}\" ({}) is never written",
                o.name, o.node
            )));
        }
    }
    let updated_param: HashMap<NodeId, NodeId> =
        plan.updates.iter().map(|&(u, p)| (p, u)).collect();
    for (k, kernel) in plan.kernels.iter().enumerate() {
        let computed: HashSet<NodeId> = kernel.nodes.iter().copied().collect();
        for &n in &kernel.nodes {
            for &i in &graph.node(n).inputs {
                if !computed.contains(&i) && !kernel.reads.contains(&i) {
                    return Err(fail(format!(
                        "{} computes {n} but neither computes nor reads its operand {i}",
                        kernel.name
                    )));
                }
            }
        }
        for &r in &kernel.reads {
            if graph.node(r).op.is_leaf() {
                // Reading a parameter's old value must happen before its update.
                if let Some(&u) = updated_param.get(&r) {
                    let uk = writer[&u];
                    if uk < k {
                        return Err(fail(format!(
                            "{} reads {r} after {} updated it in place",
                            kernel.name, plan.kernels[uk].name
                        )));
                    }
                    if uk == k && !reads_elementwise(graph, &kernel.nodes, r) {
                        return Err(fail(format!(
                            "{} updates {r} in place but also reads it elsewhere",
                            kernel.name
                        )));
                    }
                }
                continue;
            }
            match writer.get(&r) {
                Some(&w) if w < k => {}
                Some(&w) => {
                    return Err(fail(format!(
                        "{} reads {r} before {} writes it",
                        kernel.name, plan.kernels[w].name
                    )));
                }
                None => {
                    return Err(fail(format!(
                        "{} reads {r}, which nothing stores",
                        kernel.name
                    )));
                }
            }
            if !matches!(
                plan.placement[r.0],
                Placement::Stored | Placement::Side { .. }
            ) {
                return Err(fail(format!(
                    "{} reads {r}, which is not placed in memory",
                    kernel.name
                )));
            }
        }
        let mut buffers: HashSet<usize> = HashSet::new();
        for n in kernel.reads.iter().chain(&kernel.stores) {
            match plan.buffer_of[n.0] {
                Some(b) => {
                    buffers.insert(b);
                }
                None => {
                    return Err(fail(format!(
                        "{} touches {n}, which has no buffer",
                        kernel.name
                    )));
                }
            }
        }
        if buffers.len() > target.max_storage_buffers_per_stage as usize {
            return Err(fail(format!(
                "{} binds {} storage buffers; the target allows {}",
                kernel.name,
                buffers.len(),
                target.max_storage_buffers_per_stage
            )));
        }
    }
    Ok(())
}
