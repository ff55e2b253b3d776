//! Generic clean-up passes over a graph. Each returns a new, renumbered graph that still
//! verifies; node order (and so execution order) is otherwise preserved.

use std::collections::HashMap;

use crate::graph::{Graph, GraphOutput, Node, NodeId};
use crate::op::Op;

/// Rebuilds `graph` keeping the nodes `keep` selects, redirecting operands through `map`.
fn rebuild(graph: &Graph, keep: impl Fn(NodeId) -> bool, mut map: Vec<NodeId>) -> Graph {
    let mut nodes = Vec::new();
    let mut new_id = vec![None; graph.nodes().len()];
    for (id, node) in graph.iter() {
        if map[id.0] != id || !keep(id) {
            continue;
        }
        let inputs = node
            .inputs
            .iter()
            .map(|i| new_id[map[i.0].0].expect("operands are kept and defined earlier"))
            .collect();
        new_id[id.0] = Some(NodeId(nodes.len()));
        nodes.push(Node {
            inputs,
            ..node.clone()
        });
    }
    for i in 0..map.len() {
        map[i] = map[map[i].0];
    }
    let outputs = graph
        .outputs()
        .iter()
        .map(|o| GraphOutput {
            name: o.name.clone(),
            node: new_id[map[o.node.0].0].expect("outputs are kept"),
        })
        .collect();
    Graph::from_parts(graph.name.clone(), nodes, outputs)
}

/// Removes every node no output depends on. Inputs and parameters stay even when unused:
/// they are the graph's interface.
pub fn eliminate_dead_code(graph: &Graph) -> Graph {
    let mut live = vec![false; graph.nodes().len()];
    for o in graph.outputs() {
        live[o.node.0] = true;
    }
    for (id, node) in graph.iter().collect::<Vec<_>>().into_iter().rev() {
        if live[id.0] || node.op.is_leaf() {
            live[id.0] = true;
            for i in &node.inputs {
                live[i.0] = true;
            }
        }
    }
    let identity = (0..graph.nodes().len()).map(NodeId).collect();
    rebuild(graph, |id| live[id.0], identity)
}

/// Merges nodes that apply the same op to the same operands into the first of them. Leaves
/// are never merged (two parameters of one shape are still two parameters).
pub fn eliminate_common_subexpressions(graph: &Graph) -> Graph {
    let mut map: Vec<NodeId> = Vec::with_capacity(graph.nodes().len());
    let mut seen: HashMap<(&Op, Vec<NodeId>), NodeId> = HashMap::new();
    for (id, node) in graph.iter() {
        if node.op.is_leaf() {
            map.push(id);
            continue;
        }
        let key = (&node.op, node.inputs.iter().map(|i| map[i.0]).collect());
        map.push(*seen.entry(key).or_insert(id));
    }
    rebuild(graph, |_| true, map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::{parse, print};
    use crate::verify::verify;

    #[test]
    fn dce_drops_unused_work_but_keeps_leaves() {
        let g = parse(
            r#"graph "g" {
  %0 = input "x" : f32[2]
  %1 = param "unused" : f32[3]
  %2 = tanh(%0) : f32[2]
  %3 = relu(%0) : f32[2]
  %4 = sigmoid(%3) : f32[2]
  output "y" = %3
}"#,
        )
        .unwrap();
        let d = eliminate_dead_code(&g);
        verify(&d).unwrap();
        assert_eq!(
            print(&d),
            "graph \"g\" {\n  %0 = input \"x\" : f32[2]\n  %1 = param \"unused\" : f32[3]\n  \
             %2 = relu(%0) : f32[2]\n  output \"y\" = %2\n}\n"
        );
    }

    #[test]
    fn cse_merges_repeated_work_transitively() {
        let g = parse(
            r#"graph "g" {
  %0 = input "x" : f32[2]
  %1 = param "a" : f32[2]
  %2 = param "b" : f32[2]
  %3 = add(%0, %1) : f32[2]
  %4 = add(%0, %1) : f32[2]
  %5 = relu(%3) : f32[2]
  %6 = relu(%4) : f32[2]
  %7 = add(%0, %2) : f32[2]
  %8 = sub(%5, %6) : f32[2]
  output "d" = %8
  output "e" = %7
  output "f" = %6
}"#,
        )
        .unwrap();
        let c = eliminate_common_subexpressions(&g);
        verify(&c).unwrap();
        assert_eq!(
            print(&c),
            "graph \"g\" {\n  %0 = input \"x\" : f32[2]\n  %1 = param \"a\" : f32[2]\n  \
             %2 = param \"b\" : f32[2]\n  %3 = add(%0, %1) : f32[2]\n  %4 = relu(%3) : f32[2]\n  \
             %5 = add(%0, %2) : f32[2]\n  %6 = sub(%4, %4) : f32[2]\n  output \"d\" = %6\n  \
             output \"e\" = %5\n  output \"f\" = %4\n}\n"
        );
    }
}

/// Which graph input becomes a gather from which whole-data-set input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatherInput {
    /// The batch input to replace, e.g. `x: u8[B,1,28,28]`.
    pub input: String,
    /// The data-set input that replaces it, e.g. `dataset.x: u8[M,1,28,28]`.
    pub dataset: String,
    /// The data set's element type (labels are u8 on disk and u32 in a CPU batch).
    pub dtype: crate::types::DType,
}

/// Name of the index input [`gather_inputs`] adds.
pub const BATCH_INDICES: &str = "batch.indices";

/// Rewrites batch inputs `T[B, ...]` into `gather(dataset: T'[rows, ...], batch.indices: u32[B])`,
/// so a batch is read straight from a data set that stays on the device. Every node is re-added
/// (and re-typed), so consumers of a changed element type are checked again.
pub fn gather_inputs(
    graph: &Graph,
    rows: usize,
    inputs: &[GatherInput],
) -> Result<Graph, crate::graph::GraphError> {
    use crate::types::{DType, TensorType};
    let batch = inputs
        .iter()
        .find_map(|g| graph.inputs().find(|(_, n, _)| *n == g.input))
        .map(|(_, _, t)| t.shape.first().copied().unwrap_or(1))
        .unwrap_or(1);
    let mut out = Graph::new(graph.name.clone());
    let mut map: Vec<NodeId> = Vec::with_capacity(graph.nodes().len());
    let mut indices = None;
    for (_, node) in graph.iter() {
        let id = match &node.op {
            Op::Input { name } => match inputs.iter().find(|g| &g.input == name) {
                Some(g) => {
                    let idx = match indices {
                        Some(i) => i,
                        None => {
                            let i =
                                out.add_input(BATCH_INDICES, TensorType::new(DType::U32, [batch]))?;
                            indices = Some(i);
                            i
                        }
                    };
                    let mut shape = node.ty.shape.clone();
                    if let Some(first) = shape.first_mut() {
                        *first = rows;
                    }
                    let data = out.add_input(g.dataset.clone(), TensorType::new(g.dtype, shape))?;
                    out.add(Op::Gather, &[data, idx])?
                }
                None => out.copy_node(node, &map)?,
            },
            _ => out.copy_node(node, &map)?,
        };
        map.push(id);
    }
    for o in graph.outputs() {
        out.add_output(o.name.clone(), map[o.node.0])?;
    }
    Ok(out)
}
