//! The graph verifier: every invariant a pass may rely on, checked from scratch.

use std::collections::HashSet;

use crate::graph::{Graph, NodeId, has_control, leaf_name, representable};

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
/// non-empty and unique per kind, every type is representable (its element count fits `usize`),
/// and outputs name existing nodes under unique names.
pub fn verify(graph: &Graph) -> Result<(), VerifyError> {
    let err = |at: String, message: String| VerifyError {
        graph: graph.name.clone(),
        at,
        message,
    };
    if has_control(&graph.name) {
        return Err(err(
            "the graph".into(),
            format!("name {:?} contains a control character", graph.name),
        ));
    }
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
            if has_control(name) {
                return Err(err(
                    at,
                    format!("name {name:?} contains a control character"),
                ));
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
            .and_then(representable)
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
        let at = format!("output {:?}", out.name);
        if has_control(&out.name) {
            return Err(err(at, "the name contains a control character".into()));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `frontend` fuzz target: a form feed in a parameter's name ended the WGSL
    /// comment it was printed in, and what followed compiled as code.
    #[test]
    fn names_with_control_characters_are_refused() {
        let text = "graph \"g\" {\n  %0 = param \"w\\u{c}fn injected() {} //\" : f32[2]\n  output \"output\" = %0\n}\n";
        let e = crate::parse(text).unwrap_err().to_string();
        assert!(e.contains("control character"), "{e}");
        let mut g = Graph::new("g");
        let e = g
            .add_input("x\ny", crate::types::TensorType::f32([1]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "input name \"x\\ny\" contains a control character"
        );
        let x = g
            .add_input("x", crate::types::TensorType::f32([1]))
            .unwrap();
        assert!(g.add_output("out\r", x).is_err());
        let bad = Graph::from_parts("a\u{85}b".into(), vec![], vec![]);
        assert!(
            verify(&bad)
                .unwrap_err()
                .to_string()
                .contains("control character")
        );
    }
    use crate::graph::Node;
    use crate::op::Op;
    use crate::types::TensorType;

    /// Results whose element count overflows `usize` although their operands' do not
    /// (`matmul` of `[M,0]` by `[0,N]`): the builder and the verifier accepted them, and
    /// `numel` saturated. (The parser refused them already: a declared type must fit.)
    #[test]
    fn overflowing_result_types_are_refused() {
        let big = 1usize << 40;
        let mut b = Graph::new("g");
        let a = b.add_input("a", TensorType::f32([big, 0])).unwrap();
        let c = b.add_input("b", TensorType::f32([0, big])).unwrap();
        let mm = Op::MatMul {
            transpose_a: false,
            transpose_b: false,
        };
        assert_eq!(
            b.add(mm, &[a, c]).unwrap_err().to_string(),
            format!("node %2: matmul: result type f32[{big},{big}] has too many elements")
        );
        let d = b
            .add_input("d", TensorType::new(crate::DType::U8, [0, big, big]))
            .unwrap();
        let i = b
            .add_input("i", TensorType::new(crate::DType::U32, [2]))
            .unwrap();
        assert_eq!(
            b.add(Op::Gather, &[d, i]).unwrap_err().to_string(),
            format!("node %4: gather: result type u8[2,{big},{big}] has too many elements")
        );

        let leaf = |name: &str, shape: [usize; 2]| Node {
            op: Op::Input { name: name.into() },
            inputs: vec![],
            ty: TensorType::f32(shape),
            layer: None,
        };
        let g = Graph::from_parts(
            "g".into(),
            vec![
                leaf("a", [big, 0]),
                leaf("b", [0, big]),
                Node {
                    op: Op::MatMul {
                        transpose_a: false,
                        transpose_b: false,
                    },
                    inputs: vec![NodeId(0), NodeId(1)],
                    ty: TensorType::f32([big, big]),
                    layer: None,
                },
            ],
            vec![],
        );
        assert_eq!(
            verify(&g).unwrap_err().to_string(),
            format!("graph `g`: %2 (matmul): result type f32[{big},{big}] has too many elements")
        );
    }
}
