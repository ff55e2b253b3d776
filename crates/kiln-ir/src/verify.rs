//! The graph verifier: every invariant a pass may rely on, checked from scratch.

use std::collections::HashSet;

use crate::graph::{Graph, NodeId, leaf_name};

/// The first invariant a graph breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("graph `{graph}`: {at}: {message}")]
pub struct VerifyError {
    pub graph: String,
    /// `%3 (conv2d)`, or `output "logits"`.
    pub at: String,
    pub message: String,
}

/// Checks that `graph` is well formed: operands are defined before use (SSA, so definition order
/// is an execution order), each op has its arity and the type its operands imply, leaf names are
/// non-empty and unique per kind, leaf types are representable, and outputs name existing nodes
/// under unique names.
pub fn verify(graph: &Graph) -> Result<(), VerifyError> {
    let err = |at: String, message: String| VerifyError {
        graph: graph.name.clone(),
        at,
        message,
    };
    let mut leaf_names: HashSet<(&str, &str)> = HashSet::new();
    for (id, node) in graph.iter() {
        let at = format!("{id} ({})", node.op.name());
        if let Some(&bad) = node.inputs.iter().find(|i| i.0 >= id.0) {
            return Err(err(
                at,
                format!("uses {bad}, which is not defined before it"),
            ));
        }
        if let Some(name) = leaf_name(&node.op) {
            if !node.inputs.is_empty() {
                return Err(err(at, "a leaf takes no operands".into()));
            }
            if name.is_empty() {
                return Err(err(at, "empty name".into()));
            }
            if !leaf_names.insert((node.op.name(), name)) {
                return Err(err(at, format!("name `{name}` is used twice")));
            }
            if node.ty.checked_numel().is_none() {
                return Err(err(at, format!("type {} has too many elements", node.ty)));
            }
            continue;
        }
        let operand_types: Vec<_> = node.inputs.iter().map(|&i| graph.ty(i)).collect();
        let inferred = node
            .op
            .infer_type(&operand_types)
            .map_err(|m| err(at.clone(), m))?;
        if inferred != node.ty {
            return Err(err(
                at,
                format!("recorded type {} but operands imply {inferred}", node.ty),
            ));
        }
    }
    let mut output_names = HashSet::new();
    for out in graph.outputs() {
        let at = format!("output \"{}\"", out.name);
        if out.node.0 >= graph.nodes().len() {
            return Err(err(at, format!("{} does not exist", out.node)));
        }
        if out.name.is_empty() || !output_names.insert(out.name.as_str()) {
            return Err(err(at, "output names must be non-empty and unique".into()));
        }
    }
    Ok(())
}

/// Convenience for tests and passes: the ids of nodes nothing reads and no output names.
pub fn unused_nodes(graph: &Graph) -> Vec<NodeId> {
    let mut used = vec![false; graph.nodes().len()];
    for (_, n) in graph.iter() {
        for i in &n.inputs {
            used[i.0] = true;
        }
    }
    for o in graph.outputs() {
        used[o.node.0] = true;
    }
    used.iter()
        .enumerate()
        .filter(|(_, u)| !**u)
        .map(|(i, _)| NodeId(i))
        .collect()
}
