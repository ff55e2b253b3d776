//! What the code generation modules share without importing each other: the names of
//! element functions (`v`, `chunk_part`), how a schedule reads an operand (`Operand`), each
//! op's definition with the callees its operands name (`definition_over`, from `compute.rs`),
//! and how a buffer is indexed (`UniformAt`). It imports only `compute` and
//! `kir`, so the code generation modules form no cycle.

use kiln_ir::{Graph, NodeId};

pub(crate) use crate::compute::strides;
use crate::{compute, kir};

/// How a kernel reads a buffer (by plan index) bound as a uniform array: `None` for storage
/// bindings, `Some(None)` for a whole uniform binding, `Some(Some(w))` for one read through
/// the chunk's window `w`.
pub(crate) type UniformAt<'a> = &'a dyn Fn(usize) -> Option<Option<usize>>;

pub(crate) fn v(id: NodeId) -> String {
    format!("v{}", id.0)
}

/// Each operand of `id` read through its own scalar function `v<operand>`.
pub(crate) fn scalar_operands(graph: &Graph, id: NodeId) -> Vec<Operand> {
    graph
        .node(id)
        .inputs
        .iter()
        .map(|&n| Operand::scalar(graph, n))
        .collect()
}

/// How an element function reads one operand: the call the printer writes and the type it
/// returns (a scalar, or four lanes).
#[derive(Clone, Debug)]
pub(crate) struct Operand {
    pub callee: kir::wgsl::Callee,
    pub ty: kir::Ty,
}

impl Operand {
    /// Operand `n` through its scalar function `v<n>`.
    pub fn scalar(graph: &Graph, n: NodeId) -> Operand {
        Operand {
            callee: kir::wgsl::Callee::Call(v(n)),
            ty: compute::value_ty(graph.ty(n).dtype),
        }
    }

    /// Four lanes from the function `name`.
    pub fn lanes(callee: kir::wgsl::Callee) -> Operand {
        Operand {
            callee,
            ty: kir::Ty::VEC4_F32,
        }
    }
}

/// `id`'s element function from its definition (`compute::element`), returning `lanes` (four
/// `vec4` lanes) or its own scalar type, reading `operands`, with the callees they name; a
/// reduction over the batch sums only the chunk's images when `chunked`.
pub(crate) fn definition_over(
    graph: &Graph,
    id: NodeId,
    operands: &[Operand],
    lanes: Option<kir::Ty>,
    chunked: bool,
) -> (kir::Function, Vec<kir::wgsl::Callee>) {
    let tys: Vec<kir::Ty> = operands.iter().map(|o| o.ty).collect();
    let callees = operands.iter().map(|o| o.callee.clone()).collect();
    (compute::element(graph, id, lanes, &tys, chunked), callees)
}

/// The name of the function computing the part of a reduction summed over the batch (and
/// carried from chunk to chunk) that the kernel's current chunk adds: `name`'s function
/// computes the whole sum, which the entry point has stored in `sum<red>` by the time the
/// epilogue reads it, so the reduction runs once per dispatch, not once for the running sum
/// and again for the epilogue.
pub(crate) fn chunk_part(name: &str) -> String {
    format!("{name}_chunk")
}

/// Elementwise op `id`'s formula as one WGSL expression over four lanes `value` (its only
/// operand, at hand as a `vec4`), from its definition (`compute::element`).
pub(crate) fn lanes_formula(graph: &Graph, id: NodeId, value: &str) -> Option<String> {
    let node = graph.node(id);
    if !node.op.is_elementwise() || node.inputs.len() != 1 || node.ty.dtype != kiln_ir::DType::F32 {
        return None;
    }
    let f = compute::element(
        graph,
        id,
        Some(kir::Ty::VEC4_F32),
        &[kir::Ty::VEC4_F32],
        false,
    );
    kir::wgsl::expression(&f, &[kir::wgsl::Callee::Value(value.to_string())])
        .unwrap_or_else(|e| panic!("{id}: the op's definition does not validate: {e}"))
}
