//! WGSL text fragments shared by the schedules that are still written as text (register
//! blocking's rows, the CPU-class convolutions, chunk sums) and the element functions they
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

/// The statements (at `indent`) computing input coordinate `var = outer * stride + k - pad` of
/// a convolution tap, skipping taps that fall in the zero padding, and the u32 expression for
/// the coordinate. Without padding every tap of a valid output lies inside the input: no check,
/// and unsigned arithmetic the driver's compiler can vectorise.
pub(crate) fn tap(
    indent: &str,
    var: &str,
    outer: &str,
    k: &str,
    stride: usize,
    pad: usize,
    size: usize,
) -> (String, String) {
    if pad == 0 {
        (
            format!("{indent}let {var} = {outer} * {} + {k};", u(stride)),
            var.to_string(),
        )
    } else {
        (
            format!(
                "{indent}let {var} = i32({outer} * {} + {k}) - {};\n{indent}if ({var} < 0i || {var} >= {}) {{ continue; }}",
                u(stride),
                i(pad),
                i(size)
            ),
            format!("u32({var})"),
        )
    }
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

/// A matmul's reduction length and, at step `p`, the flat indices of `a` at row `row` and of
/// `b` at column `c`.
pub(crate) fn matmul_indices(
    transpose_a: bool,
    transpose_b: bool,
    a: &[usize],
    b: &[usize],
    row: &str,
) -> (usize, String, String) {
    let k = if transpose_a { a[0] } else { a[1] };
    let ai = if transpose_a {
        format!("p * {} + {row}", u(a[1]))
    } else if row.contains(' ') {
        format!("({row}) * {} + p", u(a[1]))
    } else {
        format!("{row} * {} + p", u(a[1]))
    };
    let bi = if transpose_b {
        format!("c * {} + p", u(b[1]))
    } else {
        format!("p * {} + c", u(b[1]))
    };
    (k, ai, bi)
}

/// The loops of a stride-1 convolution input gradient at `(n, c, h, w)` (dy `[N,O,OH,OW]`,
/// weights `[O,C,KH,KW]`) over exactly the taps that land inside dy — one range per axis
/// instead of testing every tap, which was most of the loop — with `dyi` and `wi` the flat
/// indices of dy and of the weight; `inner` runs once per tap.
pub(crate) fn unit_stride_grad_input_taps(
    dy: &[usize],
    w: &[usize],
    padding: [usize; 2],
    inner: &str,
) -> String {
    let [_, o, oh, ow] = <[usize; 4]>::try_from(dy).expect("rank 4");
    let [_, c, kh, kw] = <[usize; 4]>::try_from(w).expect("rank 4");
    format!(
        "    let ky_lo = u32(max(i32(h) + {PY} - {OH1}, 0i));
    let ky_end = u32(min(i32(h) + {PY} + 1i, {KHi}));
    let kx_lo = u32(max(i32(w) + {PX} - {OW1}, 0i));
    let kx_end = u32(min(i32(w) + {PX} + 1i, {KWi}));
    for (var o = 0u; o < {O}; o++) {{
        for (var ky = ky_lo; ky < ky_end; ky++) {{
            let oy = h + {PYu} - ky;
            for (var kx = kx_lo; kx < kx_end; kx++) {{
                let ox = w + {PXu} - kx;
                let dyi = ((n * {O} + o) * {OH} + oy) * {OW} + ox;
                let wi = ((o * {C} + c) * {KH} + ky) * {KW} + kx;
{inner}            }}
        }}
    }}
",
        O = u(o),
        OH = u(oh),
        OW = u(ow),
        OH1 = i(oh - 1),
        OW1 = i(ow - 1),
        C = u(c),
        KH = u(kh),
        KW = u(kw),
        KHi = i(kh),
        KWi = i(kw),
        PY = i(padding[0]),
        PX = i(padding[1]),
        PYu = u(padding[0]),
        PXu = u(padding[1]),
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
