//! WGSL text fragments shared by the schedules that are still written as text (the CPU-class
//! convolutions, kernel columns, entry points, chunk sums) and the element functions they
//! wrap, which come from each op's definition in the kernel IR (`compute.rs`). Only the other
//! code generation modules import it; it imports none of them, so they form no cycle.

use kiln_ir::{Graph, NodeId};

pub(crate) use crate::compute::strides;
use crate::{compute, kir};

/// How a kernel's code indexes a buffer bound as a uniform array: given the buffer and the
/// name of a flat index variable, the index into the binding (the variable itself, or rebased
/// to the chunk's window); `None` for storage bindings.
pub(crate) type UniformIndex<'a> = &'a dyn Fn(usize, &str) -> Option<String>;

/// The same for the kernel IR: `None` for storage bindings, `Some(None)` for a whole uniform
/// binding, `Some(Some(w))` for one read through the chunk's window `w`.
pub(crate) type UniformAt<'a> = &'a dyn Fn(usize) -> Option<Option<usize>>;

pub(crate) fn u(n: usize) -> String {
    format!("{n}u")
}

pub(crate) fn i(n: usize) -> String {
    format!("{n}i")
}

pub(crate) fn v(id: NodeId) -> String {
    format!("v{}", id.0)
}

/// `let` statements decoding flat index `i` into named coordinates of `shape`.
pub(crate) fn decode(names: &[&str], shape: &[usize]) -> String {
    decode_from("i", names, shape)
}

/// [`decode`] of the flat index held in variable `var`.
pub(crate) fn decode_from(var: &str, names: &[&str], shape: &[usize]) -> String {
    let mut s = String::new();
    let mut stride = 1usize;
    let mut parts = Vec::new();
    for d in (0..shape.len()).rev() {
        let expr = if d == 0 {
            format!("{var} / {}", u(stride))
        } else if stride == 1 {
            format!("{var} % {}", u(shape[d]))
        } else {
            format!("({var} / {}) % {}", u(stride), u(shape[d]))
        };
        parts.push(format!("    let {} = {};\n", names[d], expr));
        stride *= shape[d];
    }
    for p in parts.into_iter().rev() {
        s.push_str(&p);
    }
    s
}

/// `let <o>_lo` and `let <o>_end`: the range of outputs `o` (`out` of them) along one axis
/// whose stride-1 tap `k` lands inside an input of `size` padded by `pad` on each side.
pub(crate) fn valid_outputs(o: &str, k: &str, pad: usize, size: usize, out: usize) -> String {
    format!(
        "    let {o}_lo = u32(max({} - i32({k}), 0i));\n    let {o}_end = u32(min({} - i32({k}), {}));\n",
        i(pad),
        i(size + pad),
        i(out)
    )
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

/// The loop bounds of a reduction over `n` images: all of them, or (`chunked`) those of the
/// chunk in the kernel's chunk table.
pub(crate) fn batch_range(n: usize, chunked: bool) -> (String, String) {
    if chunked {
        ("chunk[0].z".into(), "chunk[0].w".into())
    } else {
        ("0u".into(), u(n))
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

/// `base + delta` as WGSL, without a `+ 0u`.
pub(crate) fn offset(base: &str, delta: usize) -> String {
    if delta == 0 {
        base.to_string()
    } else {
        format!("{base} + {}", u(delta))
    }
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
