//! Each op's computation, defined once: the kernel IR function returning element `i` of an op's
//! value from its operands' elements. Every schedule starts from these — the scalar element
//! functions call them with scalar operands, register blocking with four lanes (`vec4`
//! operands where an operand varies along the lanes, scalars where the lanes share it) — and
//! `tests/compute.rs`-style checks run them on the kernel IR's interpreter against the
//! reference executor, so an op's meaning on the device is pinned without one.
//!
//! Formulas are written to hold for both widths: arithmetic on a `vec4` is per lane and a
//! scalar operand is shared by the lanes; constants that meet lanes in a `select` or an
//! accumulator are splat.

use kiln_ir::{DType, Graph, NodeId, Op};

use crate::kir::{BinOp, Builder, ChunkBound, Expr, Function, MathFn, Scalar, Ty, UnOp};

/// The kernel IR type a value of `dtype` is loaded as (u8 widened to u32).
pub fn value_ty(dtype: DType) -> Ty {
    match dtype {
        DType::F32 => Ty::F32,
        DType::U8 | DType::U32 => Ty::U32,
        DType::I32 => Ty::I32,
    }
}

/// [`element`] of node `id` computing one element of its own type, each operand read as a
/// scalar of its type: the definition schedules transform.
pub fn scalar_element(graph: &Graph, id: NodeId, chunked: bool) -> Function {
    let operands: Vec<Ty> = graph
        .node(id)
        .inputs
        .iter()
        .map(|&n| value_ty(graph.ty(n).dtype))
        .collect();
    element(graph, id, None, &operands, chunked)
}

/// The element function of node `id`: returning `lanes` (`Ty::VEC4_F32`) or, with `None`, one
/// element of the node's own type; operand `k` read through a function of type
/// `operands[k]`. `chunked`: a reduction over the batch sums only the images of the kernel's
/// current chunk (CPU-class image chunks).
///
/// # Panics
/// For leaves (they are loaded, not computed) and shapes the verifier refuses.
pub fn element(
    graph: &Graph,
    id: NodeId,
    lanes: Option<Ty>,
    operands: &[Ty],
    chunked: bool,
) -> Function {
    let node = graph.node(id);
    let ret = lanes.unwrap_or_else(|| value_ty(node.ty.dtype));
    let mut builder = Builder::new(ret, operands.to_vec());
    let ins = &node.inputs;
    let shape = |k: usize| graph.ty(ins[k]).shape.clone();
    let out = node.ty.shape.clone();
    let b = &mut builder;
    let zero_lit = b.f32(0.0);
    let zero = if lanes.is_some() {
        b.splat(zero_lit)
    } else {
        zero_lit
    };
    let i = b.index();
    match &node.op {
        Op::Input { .. } | Op::Param { .. } => unreachable!("leaves are loaded, not computed"),
        Op::Full { value, .. } => {
            let x = b.f32(value.0);
            let x = if lanes.is_some() { b.splat(x) } else { x };
            b.ret_(x);
        }
        Op::Reshape { .. } => {
            let x = b.operand(0, i);
            b.ret_(x);
        }
        Op::ScaleU8 => {
            let x = b.operand(0, i);
            let x = b.cast(Scalar::F32, x);
            let d = b.f32(255.0);
            let y = b.div(x, d);
            b.ret_(y);
        }
        Op::Sigmoid => {
            let x = b.operand(0, i);
            let neg = b.unary(UnOp::Neg, x);
            let e = b.math(MathFn::Exp, &[neg]);
            let one = b.f32(1.0);
            let den = b.add(one, e);
            let one = b.f32(1.0);
            let y = b.div(one, den);
            b.ret_(y);
        }
        Op::Relu => {
            let x = b.operand(0, i);
            let a = b.let_("a", operands[0], x);
            let neg = b.bin(BinOp::Lt, a, zero);
            let y = b.select(neg, zero, a);
            b.ret_(y);
        }
        Op::Tanh => {
            let x = b.operand(0, i);
            let y = b.math(MathFn::Tanh, &[x]);
            b.ret_(y);
        }
        Op::Silu => {
            let x = b.operand(0, i);
            let a = b.let_("a", operands[0], x);
            let neg = b.unary(UnOp::Neg, a);
            let e = b.math(MathFn::Exp, &[neg]);
            let one = b.f32(1.0);
            let den = b.add(one, e);
            let y = b.div(a, den);
            b.ret_(y);
        }
        Op::SiluGrad => {
            let x = b.operand(0, i);
            let x = b.let_("x", operands[0], x);
            let neg = b.unary(UnOp::Neg, x);
            let e = b.math(MathFn::Exp, &[neg]);
            let one = b.f32(1.0);
            let den = b.add(one, e);
            let one = b.f32(1.0);
            let s = b.div(one, den);
            let s = b.let_("s", operands[0], s);
            let one = b.f32(1.0);
            let rest = b.sub(one, s);
            let xr = b.mul(x, rest);
            let one = b.f32(1.0);
            let slope = b.add(one, xr);
            let dy = b.operand(1, i);
            let t = b.mul(dy, s);
            let r = b.mul(t, slope);
            b.ret_(r);
        }
        Op::SigmoidGrad | Op::TanhGrad => {
            let x = b.operand(0, i);
            let y = b.let_("y", operands[0], x);
            let dy = b.operand(1, i);
            let one = b.f32(1.0);
            let r = if matches!(node.op, Op::SigmoidGrad) {
                let t = b.mul(dy, y);
                let s = b.sub(one, y);
                b.mul(t, s)
            } else {
                let yy = b.mul(y, y);
                let s = b.sub(one, yy);
                b.mul(dy, s)
            };
            b.ret_(r);
        }
        Op::ReluGrad => {
            let x = b.operand(0, i);
            let pos = b.bin(BinOp::Gt, x, zero);
            let dy = b.operand(1, i);
            let r = b.select(pos, dy, zero);
            b.ret_(r);
        }
        Op::Add | Op::Sub | Op::Mul | Op::Div => {
            let op = match node.op {
                Op::Add => BinOp::Add,
                Op::Sub => BinOp::Sub,
                Op::Mul => BinOp::Mul,
                _ => BinOp::Div,
            };
            let (x, y) = (b.operand(0, i), b.operand(1, i));
            let r = b.bin(op, x, y);
            b.ret_(r);
        }
        Op::Sqrt | Op::Exp => {
            let fun = if matches!(node.op, Op::Sqrt) {
                MathFn::Sqrt
            } else {
                MathFn::Exp
            };
            let x = b.operand(0, i);
            let r = b.math(fun, &[x]);
            b.ret_(r);
        }
        Op::Scale { factor } => {
            let x = b.operand(0, i);
            let f = b.f32(factor.0);
            let r = b.mul(x, f);
            b.ret_(r);
        }
        Op::BiasAdd { axis } => {
            let inner: usize = out[axis + 1..].iter().product();
            let x = b.operand(0, i);
            let s = b.u32(inner);
            let q = b.div(i, s);
            let n = b.u32(out[*axis]);
            let at = b.rem(q, n);
            let bias = b.operand(1, at);
            let r = b.add(x, bias);
            b.ret_(r);
        }
        Op::Broadcast { shape: to, axes } => {
            let names: Vec<String> = (0..to.len()).map(|d| format!("c{d}")).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let coords = b.decode(i, &refs, to);
            let kept: Vec<usize> = (0..to.len()).filter(|d| !axes.contains(d)).collect();
            let kept_shape: Vec<usize> = kept.iter().map(|&d| to[d]).collect();
            let ks = strides(&kept_shape);
            let terms: Vec<(usize, usize)> = kept.iter().copied().zip(ks).collect();
            let index = sum_of_products(b, &terms, &|_, d| coords[d]);
            let r = b.operand(0, index);
            b.ret_(r);
        }
        Op::Gather => {
            let data = shape(0);
            let row: usize = data[1..].iter().product();
            let r = b.u32(row);
            let q = b.div(i, r);
            let row_at = b.let_("row", Ty::U32, q);
            let m = b.rem(i, r);
            let offset = b.let_("offset", Ty::U32, m);
            let picked = b.operand(1, row_at);
            let base = b.mul(picked, r);
            let at = b.add(base, offset);
            let x = b.operand(0, at);
            b.ret_(x);
        }
        Op::Conv2d { stride, padding } => {
            let [_, c, h, w] = rank4(&shape(0));
            let [_, _, kh, kw] = rank4(&shape(1));
            let [n, o, oy, ox] = coords4(b, i, ["n", "o", "oy", "ox"], &out);
            let acc = b.var("acc", ret, zero);
            let (c0, cn) = (b.u32(0), b.u32(c));
            b.for_("c", c0, cn, |b, ci| {
                let (k0, kn) = (b.u32(0), b.u32(kh));
                b.for_("ky", k0, kn, |b, ky| {
                    let iy = tap(b, "iy", oy, ky, stride[0], padding[0], h);
                    let (k0, kn) = (b.u32(0), b.u32(kw));
                    b.for_("kx", k0, kn, |b, kx| {
                        let ix = tap(b, "ix", ox, kx, stride[1], padding[1], w);
                        let xi = b.flat(&[n, ci, iy, ix], &[0, c, h, w]);
                        let wi = b.flat(&[o, ci, ky, kx], &[0, c, kh, kw]);
                        let (x, wt) = (b.operand(0, xi), b.operand(1, wi));
                        let t = b.mul(x, wt);
                        b.add_assign(acc, t);
                    });
                });
            });
            let r = b.get(acc);
            b.ret_(r);
        }
        Op::Conv2dGradInput {
            stride, padding, ..
        } => {
            let [_, o, oh, ow] = rank4(&shape(0));
            let [_, c, kh, kw] = rank4(&shape(1));
            let [n, ci, h, w] = coords4(b, i, ["n", "c", "h", "w"], &out);
            let acc = b.var("acc", ret, zero);
            if *stride == [1, 1] {
                unit_stride_grad_input_taps(
                    b,
                    [n, ci, h, w],
                    &shape(0),
                    &shape(1),
                    *padding,
                    &|b, dyi, wi| {
                        let (dy, wt) = (b.operand(0, dyi), b.operand(1, wi));
                        let t = b.mul(dy, wt);
                        b.add_assign(acc, t);
                    },
                );
            } else {
                let (o0, on) = (b.u32(0), b.u32(o));
                b.for_("o", o0, on, |b, oi| {
                    let (k0, kn) = (b.u32(0), b.u32(kh));
                    b.for_("ky", k0, kn, |b, ky| {
                        let oy = strided_source(b, ["ty", "oy"], h, ky, padding[0], stride[0], oh);
                        let (k0, kn) = (b.u32(0), b.u32(kw));
                        b.for_("kx", k0, kn, |b, kx| {
                            let ox =
                                strided_source(b, ["tx", "ox"], w, kx, padding[1], stride[1], ow);
                            let dyi = b.flat(&[n, oi, oy, ox], &[0, o, oh, ow]);
                            let wi = b.flat(&[oi, ci, ky, kx], &[0, c, kh, kw]);
                            let (dy, wt) = (b.operand(0, dyi), b.operand(1, wi));
                            let t = b.mul(dy, wt);
                            b.add_assign(acc, t);
                        });
                    });
                });
            }
            let r = b.get(acc);
            b.ret_(r);
        }
        Op::Conv2dGradWeight {
            stride, padding, ..
        } => {
            let [nn, c, h, w] = rank4(&shape(0));
            let [_, o, oh, ow] = rank4(&shape(1));
            let [oi, ci, ky, kx] = coords4(b, i, ["o", "c", "ky", "kx"], &out);
            let padded_unit = *stride == [1, 1] && *padding != [0, 0];
            // Padded, stride 1: loop over exactly the outputs whose tap lands inside the
            // input (testing every tap was most of the loop on lavapipe).
            let ranges = padded_unit.then(|| {
                (
                    valid_outputs(b, "oy", ky, padding[0], h, oh),
                    valid_outputs(b, "ox", kx, padding[1], w, ow),
                )
            });
            let acc = b.var("acc", ret, zero);
            let (n0, n1) = batch_range(b, nn, chunked);
            b.for_("n", n0, n1, |b, n| {
                let (y0, y1) = match ranges {
                    Some(((lo, end), _)) => (lo, end),
                    None => (b.u32(0), b.u32(oh)),
                };
                b.for_("oy", y0, y1, |b, oy| {
                    let iy = if padded_unit {
                        let s = b.add(oy, ky);
                        let p = b.u32(padding[0]);
                        let v = b.sub(s, p);
                        b.let_("iy", Ty::U32, v)
                    } else {
                        tap(b, "iy", oy, ky, stride[0], padding[0], h)
                    };
                    let (x0, x1) = match ranges {
                        Some((_, (lo, end))) => (lo, end),
                        None => (b.u32(0), b.u32(ow)),
                    };
                    b.for_("ox", x0, x1, |b, ox| {
                        let ix = if padded_unit {
                            let s = b.add(ox, kx);
                            let p = b.u32(padding[1]);
                            let v = b.sub(s, p);
                            b.let_("ix", Ty::U32, v)
                        } else {
                            tap(b, "ix", ox, kx, stride[1], padding[1], w)
                        };
                        let xi = b.flat(&[n, ci, iy, ix], &[0, c, h, w]);
                        let dyi = b.flat(&[n, oi, oy, ox], &[0, o, oh, ow]);
                        let (x, dy) = (b.operand(0, xi), b.operand(1, dyi));
                        let t = b.mul(x, dy);
                        b.add_assign(acc, t);
                    });
                });
            });
            let r = b.get(acc);
            b.ret_(r);
        }
        Op::AvgPool2d { kernel, stride } | Op::MaxPool2d { kernel, stride } => {
            let [_, _, h, w] = rank4(&shape(0));
            let [nc, oy, ox] =
                coords3(b, i, ["nc", "oy", "ox"], &[out[0] * out[1], out[2], out[3]]);
            let base = {
                let hh = b.u32(h);
                let t = b.mul(nc, hh);
                let sy = b.u32(stride[0]);
                let y = b.mul(oy, sy);
                let t = b.add(t, y);
                let ww = b.u32(w);
                let t = b.mul(t, ww);
                let sx = b.u32(stride[1]);
                let x = b.mul(ox, sx);
                let t = b.add(t, x);
                b.let_("base", Ty::U32, t)
            };
            let at = |b: &mut Builder, ky: usize, kx: usize| {
                let off = b.u32(ky * w + kx);
                let idx = b.add(base, off);
                b.operand(0, idx)
            };
            if matches!(node.op, Op::AvgPool2d { .. }) {
                let mut sum = at(b, 0, 0);
                for ky in 0..kernel[0] {
                    for kx in 0..kernel[1] {
                        if ky + kx > 0 {
                            let t = at(b, ky, kx);
                            sum = b.add(sum, t);
                        }
                    }
                }
                let d = b.f32((kernel[0] * kernel[1]) as f32);
                let r = b.div(sum, d);
                b.ret_(r);
            } else {
                let first = at(b, 0, 0);
                let best = b.var("best", operands[0], first);
                for ky in 0..kernel[0] {
                    for kx in 0..kernel[1] {
                        if ky + kx > 0 {
                            let t = at(b, ky, kx);
                            let a = b.let_(&format!("a{ky}_{kx}"), operands[0], t);
                            // Keep the first maximum; NaN wins, as in the reference. `select`
                            // and `&` so that the same code works per lane.
                            let bv = b.get(best);
                            let takes = first_max_takes(b, bv, a, BinOp::BitAnd);
                            let bv = b.get(best);
                            let r = b.select(takes, a, bv);
                            b.assign(best, r);
                        }
                    }
                }
                let r = b.get(best);
                b.ret_(r);
            }
        }
        Op::AvgPool2dGrad { kernel, stride, .. } | Op::MaxPool2dGrad { kernel, stride } => {
            let max = matches!(node.op, Op::MaxPool2dGrad { .. });
            let dy_shape = shape(usize::from(max));
            let (oh, ow) = (dy_shape[2], dy_shape[3]);
            let (h, w) = (out[2], out[3]);
            let [nc, hh, ww] = coords3(b, i, ["nc", "h", "w"], &[out[0] * out[1], h, w]);
            if kernel == stride {
                // Windows that tile the input: each element is in at most one window, so its
                // gradient is that window's, shared evenly or, for the maximum, all of it where
                // the element is the window's first maximum (no loop over the windows that
                // could hold it: their divergent tests were most of the kernels that upsample
                // gradients).
                if h != oh * kernel[0] || w != ow * kernel[1] {
                    let (lh, lw) = (b.u32(oh * kernel[0]), b.u32(ow * kernel[1]));
                    let (a, c) = (b.bin(BinOp::Ge, hh, lh), b.bin(BinOp::Ge, ww, lw));
                    let outside = b.bin(BinOp::Or, a, c);
                    b.if_(outside, |b| b.ret_(zero));
                }
                let (ohu, owu, khu, kwu) =
                    (b.u32(oh), b.u32(ow), b.u32(kernel[0]), b.u32(kernel[1]));
                let y = b.div(hh, khu);
                let x = b.div(ww, kwu);
                let (y, x) = if max {
                    (b.let_("oy", Ty::U32, y), b.let_("ox", Ty::U32, x))
                } else {
                    (y, x)
                };
                let t = b.mul(nc, ohu);
                let t = b.add(t, y);
                let t = b.mul(t, owu);
                let at = b.add(t, x);
                let g = b.operand(usize::from(max), at);
                let r = if max {
                    let (ky, kx) = (b.rem(hh, khu), b.rem(ww, kwu));
                    let hit =
                        first_max_at(b, operands[0], [nc, y, x], (h, w), kernel, kernel, [ky, kx]);
                    b.select(hit, g, zero)
                } else {
                    let d = b.f32((kernel[0] * kernel[1]) as f32);
                    b.div(g, d)
                };
                b.ret_(r);
            } else {
                let acc = b.var("acc", ret, zero);
                // Only the windows that can hold the element: ceil(kernel / stride) along
                // each axis (2 x 2 of a 3x3/2 pool, where a loop over the taps tried 3 x 3).
                let (t0, tn) = (b.u32(0), b.u32(kernel[0].div_ceil(stride[0])));
                b.for_("ty", t0, tn, |b, t| {
                    let (oy, ky) = window_of(b, ["oy", "ky"], hh, t, kernel[0], stride[0], oh);
                    let (t0, tn) = (b.u32(0), b.u32(kernel[1].div_ceil(stride[1])));
                    b.for_("tx", t0, tn, |b, t| {
                        let (ox, kx) = window_of(b, ["ox", "kx"], ww, t, kernel[1], stride[1], ow);
                        let g = |b: &mut Builder, k: usize| {
                            let (ohu, owu) = (b.u32(oh), b.u32(ow));
                            let t = b.mul(nc, ohu);
                            let t = b.add(t, oy);
                            let t = b.mul(t, owu);
                            let at = b.add(t, ox);
                            b.operand(k, at)
                        };
                        if !max {
                            let t = g(b, 0);
                            b.add_assign(acc, t);
                            return;
                        }
                        // Recompute the window's first maximum; the gradient goes to it alone.
                        let window = [nc, oy, ox];
                        let hit =
                            first_max_at(b, operands[0], window, (h, w), kernel, stride, [ky, kx]);
                        b.if_(hit, |b| {
                            let t = g(b, 1);
                            b.add_assign(acc, t);
                        });
                    });
                });
                let a = b.get(acc);
                let r = if max {
                    a
                } else {
                    let d = b.f32((kernel[0] * kernel[1]) as f32);
                    b.div(a, d)
                };
                b.ret_(r);
            }
        }
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => {
            let (a, bs) = (shape(0), shape(1));
            let k = if *transpose_a { a[0] } else { a[1] };
            let [r, c] = coords2(b, i, ["r", "c"], &out);
            let acc = b.var("acc", ret, zero);
            let (p0, p1) = batch_range(b, k, chunked);
            b.for_("p", p0, p1, |b, p| {
                let a1 = b.u32(a[1]);
                let ai = if *transpose_a {
                    let t = b.mul(p, a1);
                    b.add(t, r)
                } else {
                    let t = b.mul(r, a1);
                    b.add(t, p)
                };
                let b1 = b.u32(bs[1]);
                let bi = if *transpose_b {
                    let t = b.mul(c, b1);
                    b.add(t, p)
                } else {
                    let t = b.mul(p, b1);
                    b.add(t, c)
                };
                let (x, y) = (b.operand(0, ai), b.operand(1, bi));
                let t = b.mul(x, y);
                b.add_assign(acc, t);
            });
            let r = b.get(acc);
            b.ret_(r);
        }
        Op::ReduceSum { axes } | Op::ReduceMean { axes } => {
            let xs = shape(0);
            let st = strides(&xs);
            let kept: Vec<usize> = (0..xs.len()).filter(|d| !axes.contains(d)).collect();
            let names: Vec<String> = kept.iter().map(|d| format!("k{d}")).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let kept_shape: Vec<usize> = kept.iter().map(|&d| xs[d]).collect();
            let kept_coords = b.decode(i, &refs, &kept_shape);
            let acc = b.var("acc", ret, zero);
            reduce_loops(b, &xs, axes, chunked, &mut Vec::new(), &|b, reduced| {
                let terms: Vec<(usize, usize)> = (0..xs.len()).map(|d| (d, st[d])).collect();
                let index =
                    sum_of_products(b, &terms, &|_, d| match axes.iter().position(|&a| a == d) {
                        Some(k) => reduced[k],
                        None => kept_coords[kept.iter().position(|&k| k == d).expect("kept")],
                    });
                let x = b.operand(0, index);
                b.add_assign(acc, x);
            });
            let a = b.get(acc);
            let r = if matches!(node.op, Op::ReduceMean { .. }) {
                let count: usize = axes.iter().map(|&a| xs[a]).product();
                let d = b.f32(count as f32);
                b.div(a, d)
            } else {
                a
            };
            b.ret_(r);
        }
        Op::SoftmaxCrossEntropy | Op::SoftmaxCrossEntropyGrad => {
            let classes = shape(0)[1];
            let loss = matches!(node.op, Op::SoftmaxCrossEntropy);
            let row = if loss {
                i
            } else {
                let cu = b.u32(classes);
                b.div(i, cu)
            };
            let row = b.let_("row", Ty::U32, row);
            let cu = b.u32(classes);
            let base = b.mul(row, cu);
            let base = b.let_("base", Ty::U32, base);
            let first = b.operand(0, base);
            let m = b.var("m", Ty::F32, first);
            let (one, cn) = (b.u32(1), b.u32(classes));
            b.for_("c", one, cn, |b, c| {
                let at = b.add(base, c);
                let z = b.operand(0, at);
                let mv = b.get(m);
                let mx = b.math(MathFn::Max, &[mv, z]);
                b.assign(m, mx);
            });
            let z0 = b.f32(0.0);
            let s = b.var("s", Ty::F32, z0);
            let (zero_u, cn) = (b.u32(0), b.u32(classes));
            b.for_("c", zero_u, cn, |b, c| {
                let at = b.add(base, c);
                let z = b.operand(0, at);
                let mv = b.get(m);
                let d = b.sub(z, mv);
                let e = b.math(MathFn::Exp, &[d]);
                b.add_assign(s, e);
            });
            let l = b.operand(1, row);
            let l = clamped_label(b, l, classes);
            let label = b.let_("label", Ty::U32, l);
            let (mv, sv) = (b.get(m), b.get(s));
            if loss {
                let ls = b.math(MathFn::Log, &[sv]);
                let t = b.add(mv, ls);
                let at = b.add(base, label);
                let z = b.operand(0, at);
                let r = b.sub(t, z);
                b.ret_(r);
            } else {
                let cu = b.u32(classes);
                let c = b.rem(i, cu);
                let c = b.let_("c", Ty::U32, c);
                let z = b.operand(0, i);
                let d = b.sub(z, mv);
                let e = b.math(MathFn::Exp, &[d]);
                let p = b.div(e, sv);
                let p = b.let_("p", Ty::F32, p);
                let is = b.bin(BinOp::Eq, c, label);
                let (z, one) = (b.f32(0.0), b.f32(1.0));
                let onehot = b.select(is, one, z);
                let t = b.sub(p, onehot);
                let scale = b.operand(2, row);
                let r = b.mul(t, scale);
                b.ret_(r);
            }
        }
        Op::Argmax => {
            let classes = shape(0)[1];
            let cu = b.u32(classes);
            let base = b.mul(i, cu);
            let base = b.let_("base", Ty::U32, base);
            let first = b.operand(0, base);
            let best = b.var("best", operands[0], first);
            let z = b.u32(0);
            let at = b.var("at", Ty::U32, z);
            let (one, cn) = (b.u32(1), b.u32(classes));
            b.for_("c", one, cn, |b, c| {
                let idx = b.add(base, c);
                let x = b.operand(0, idx);
                let a = b.let_("a", operands[0], x);
                let bv = b.get(best);
                let takes = first_max_takes(b, bv, a, BinOp::And);
                b.if_(takes, |b| {
                    b.assign(best, a);
                    b.assign(at, c);
                });
            });
            let r = b.get(at);
            b.ret_(r);
        }
        Op::CountEqual => {
            let n = graph.ty(ins[0]).numel();
            let z = b.u32(0);
            let count = b.var("count", Ty::U32, z);
            let (j0, jn) = (b.u32(0), b.u32(n));
            b.for_("j", j0, jn, |b, j| {
                let (x, y) = (b.operand(0, j), b.operand(1, j));
                let (x, y) = (b.cast(Scalar::I32, x), b.cast(Scalar::I32, y));
                let eq = b.bin(BinOp::Eq, x, y);
                b.if_(eq, |b| {
                    let one = b.u32(1);
                    b.add_assign(count, one);
                });
            });
            let r = b.get(count);
            b.ret_(r);
        }
    }
    builder.finish()
}

pub(crate) fn rank4(s: &[usize]) -> [usize; 4] {
    <[usize; 4]>::try_from(s).expect("rank 4")
}

pub(crate) fn coords4(b: &mut Builder, i: Expr, names: [&str; 4], shape: &[usize]) -> [Expr; 4] {
    <[Expr; 4]>::try_from(b.decode(i, &names, shape)).expect("rank 4")
}

fn coords3(b: &mut Builder, i: Expr, names: [&str; 3], shape: &[usize]) -> [Expr; 3] {
    <[Expr; 3]>::try_from(b.decode(i, &names, shape)).expect("rank 3")
}

fn coords2(b: &mut Builder, i: Expr, names: [&str; 2], shape: &[usize]) -> [Expr; 2] {
    <[Expr; 2]>::try_from(b.decode(i, &names, shape)).expect("rank 2")
}

/// A row's label as a class index, clamped to the last class (a label out of range must not
/// index past the row).
pub(crate) fn clamped_label(b: &mut Builder, label: Expr, classes: usize) -> Expr {
    let l = b.cast(Scalar::U32, label);
    let (cu, one) = (b.u32(classes), b.u32(1));
    let last = b.sub(cu, one);
    b.math(MathFn::Min, &[l, last])
}

/// Whether the window `(oy, ox)` of image-channel `nc` (`kernel` in size, `stride` apart, over
/// an input of `(h, w)`, read through operand 0 of type `ty`) has its first maximum (row-major,
/// NaN wins) at offset `(ky, kx)`.
fn first_max_at(
    b: &mut Builder,
    ty: Ty,
    [nc, oy, ox]: [Expr; 3],
    (h, w): (usize, usize),
    kernel: &[usize; 2],
    stride: &[usize; 2],
    [ky, kx]: [Expr; 2],
) -> Expr {
    let base = {
        let (hu, sy, wu, sx) = (b.u32(h), b.u32(stride[0]), b.u32(w), b.u32(stride[1]));
        let t = b.mul(nc, hu);
        let y = b.mul(oy, sy);
        let t = b.add(t, y);
        let t = b.mul(t, wu);
        let x = b.mul(ox, sx);
        let t = b.add(t, x);
        b.let_("base", Ty::U32, t)
    };
    let first = b.operand(0, base);
    let best = b.var("best", ty, first);
    let z = b.u32(0);
    let by = b.var("by", Ty::U32, z);
    let bx = b.var("bx", Ty::U32, z);
    let (w0, wn) = (b.u32(0), b.u32(kernel[0]));
    b.for_("wy", w0, wn, |b, wy| {
        let (w0, wn) = (b.u32(0), b.u32(kernel[1]));
        b.for_("wx", w0, wn, |b, wx| {
            let wu = b.u32(w);
            let t = b.mul(wy, wu);
            let t = b.add(base, t);
            let t = b.add(t, wx);
            let x = b.operand(0, t);
            let a = b.let_("a", ty, x);
            let bv = b.get(best);
            let takes = first_max_takes(b, bv, a, BinOp::And);
            b.if_(takes, |b| {
                b.assign(best, a);
                b.assign(by, wy);
                b.assign(bx, wx);
            });
        });
    });
    let (byv, bxv) = (b.get(by), b.get(bx));
    let (y_eq, x_eq) = (b.bin(BinOp::Eq, byv, ky), b.bin(BinOp::Eq, bxv, kx));
    b.bin(BinOp::And, y_eq, x_eq)
}

/// Whether `a` replaces `best` as a window's first maximum: `!(best != best) op !(a <= best)`
/// (NaN wins and stays; ties keep the first), with `&&` for scalars that branch and `&` for
/// lanes.
pub(crate) fn first_max_takes(b: &mut Builder, best: Expr, a: Expr, op: BinOp) -> Expr {
    let nan = b.bin(BinOp::Ne, best, best);
    let not_nan = b.unary(UnOp::Not, nan);
    let le = b.bin(BinOp::Le, a, best);
    let above = b.unary(UnOp::Not, le);
    b.bin(op, not_nan, above)
}

/// `t0 * s0 + t1 * s1 + ...` over `(axis, stride)` terms, `coord(axis)` the coordinate; `0u`
/// for none.
fn sum_of_products(
    b: &mut Builder,
    terms: &[(usize, usize)],
    coord: &dyn Fn(&mut Builder, usize) -> Expr,
) -> Expr {
    let mut sum: Option<Expr> = None;
    for &(d, s) in terms {
        let c = coord(b, d);
        let su = b.u32(s);
        let t = b.mul(c, su);
        sum = Some(match sum {
            None => t,
            Some(acc) => b.add(acc, t),
        });
    }
    sum.unwrap_or_else(|| b.u32(0))
}

/// The bounds of a reduction over `n` images: all of them, or (`chunked`) those of the
/// kernel's current chunk.
pub(crate) fn batch_range(b: &mut Builder, n: usize, chunked: bool) -> (Expr, Expr) {
    if chunked {
        (
            b.chunk(ChunkBound::FirstImage),
            b.chunk(ChunkBound::EndImage),
        )
    } else {
        (b.u32(0), b.u32(n))
    }
}

/// The nest of loops `r<a>` over the reduced `axes` (the batch axis over the chunk's images
/// when `chunked`), calling `inner` with the counters innermost.
fn reduce_loops(
    b: &mut Builder,
    xs: &[usize],
    axes: &[usize],
    chunked: bool,
    counters: &mut Vec<Expr>,
    inner: &dyn Fn(&mut Builder, &[Expr]),
) {
    let Some((&a, rest)) = axes.split_first() else {
        inner(b, counters);
        return;
    };
    let (lo, hi) = batch_range(b, xs[a], chunked && a == 0);
    let mut inside = std::mem::take(counters);
    b.for_(&format!("r{a}"), lo, hi, |b, r| {
        inside.push(r);
        reduce_loops(b, xs, rest, chunked, &mut inside, inner);
    });
}

/// The input coordinate `name = outer * stride + k - pad` of a convolution tap, skipping taps
/// in the zero padding. Without padding every tap of a valid output lies inside the input:
/// no check, and unsigned arithmetic the driver's compiler can vectorise.
pub(crate) fn tap(
    b: &mut Builder,
    name: &str,
    outer: Expr,
    k: Expr,
    stride: usize,
    pad: usize,
    size: usize,
) -> Expr {
    let s = b.u32(stride);
    let t = b.mul(outer, s);
    let t = b.add(t, k);
    if pad == 0 {
        return b.let_(name, Ty::U32, t);
    }
    let t = b.cast(Scalar::I32, t);
    let p = b.i32(pad);
    let t = b.sub(t, p);
    let v = b.let_(name, Ty::I32, t);
    let (z, n) = (b.i32(0), b.i32(size));
    let (lo, hi) = (b.bin(BinOp::Lt, v, z), b.bin(BinOp::Ge, v, n));
    let outside = b.bin(BinOp::Or, lo, hi);
    b.continue_if(outside);
    b.cast(Scalar::U32, v)
}

/// The `t`-th window (counting back) that may hold input coordinate `at` along an axis of
/// `out` windows, `kernel` wide and `stride` apart: the window `names[0]` and the element's
/// offset in it `names[1]`, `continue` where that window does not exist or does not reach `at`.
fn window_of(
    b: &mut Builder,
    names: [&str; 2],
    at: Expr,
    t: Expr,
    kernel: usize,
    stride: usize,
    out: usize,
) -> (Expr, Expr) {
    let s = b.u32(stride);
    let last = b.div(at, s);
    let before = b.bin(BinOp::Lt, last, t);
    b.continue_if(before);
    let o = b.sub(last, t);
    let o = b.let_(names[0], Ty::U32, o);
    let n = b.u32(out);
    let past = b.bin(BinOp::Ge, o, n);
    b.continue_if(past);
    let start = b.mul(o, s);
    let k = b.sub(at, start);
    let k = b.let_(names[1], Ty::U32, k);
    let kn = b.u32(kernel);
    let outside = b.bin(BinOp::Ge, k, kn);
    b.continue_if(outside);
    (o, k)
}

/// The output coordinate `names[1]` a strided gradient tap `k` of input coordinate `at`
/// comes from, `continue` when none does: `t = at + pad - k` must be a non-negative multiple
/// of the stride, and `t / stride` inside the `out` outputs.
fn strided_source(
    b: &mut Builder,
    names: [&str; 2],
    at: Expr,
    k: Expr,
    pad: usize,
    stride: usize,
    out: usize,
) -> Expr {
    let a = b.cast(Scalar::I32, at);
    let t = if pad == 0 {
        let kk = b.cast(Scalar::I32, k);
        b.sub(a, kk)
    } else {
        let p = b.i32(pad);
        let t = b.add(a, p);
        let kk = b.cast(Scalar::I32, k);
        b.sub(t, kk)
    };
    let t = b.let_(names[0], Ty::I32, t);
    let z = b.i32(0);
    let neg = b.bin(BinOp::Lt, t, z);
    let tu = b.cast(Scalar::U32, t);
    let s = b.u32(stride);
    let r = b.rem(tu, s);
    let z = b.u32(0);
    let off = b.bin(BinOp::Ne, r, z);
    let skip = b.bin(BinOp::Or, neg, off);
    b.continue_if(skip);
    let tu = b.cast(Scalar::U32, t);
    let s = b.u32(stride);
    let q = b.div(tu, s);
    let o = b.let_(names[1], Ty::U32, q);
    let n = b.u32(out);
    let past = b.bin(BinOp::Ge, o, n);
    b.continue_if(past);
    o
}

/// `<o>_lo` and `<o>_end`: the range of outputs `o` (`out` of them) along one axis whose
/// stride-1 tap `k` lands inside an input of `size` padded by `pad` on each side.
pub(crate) fn valid_outputs(
    b: &mut Builder,
    o: &str,
    k: Expr,
    pad: usize,
    size: usize,
    out: usize,
) -> (Expr, Expr) {
    let p = b.i32(pad);
    let ki = b.cast(Scalar::I32, k);
    let d = b.sub(p, ki);
    let z = b.i32(0);
    let m = b.math(MathFn::Max, &[d, z]);
    let lo = b.cast(Scalar::U32, m);
    let lo = b.let_(&format!("{o}_lo"), Ty::U32, lo);
    let e = b.i32(size + pad);
    let ki = b.cast(Scalar::I32, k);
    let d = b.sub(e, ki);
    let n = b.i32(out);
    let m = b.math(MathFn::Min, &[d, n]);
    let end = b.cast(Scalar::U32, m);
    let end = b.let_(&format!("{o}_end"), Ty::U32, end);
    (lo, end)
}

/// Whether [`valid_outputs`] is non-empty at every tap `0..k` of an axis: each kernel tap
/// lands inside the input (`size`, padded by `pad`) for some output (`out`).
pub(crate) fn every_tap_lands(pad: usize, size: usize, out: usize, k: usize) -> bool {
    let (pad, size, out) = (pad as i64, size as i64, out as i64);
    (0..k as i64).all(|t| (pad - t).max(0) < (size + pad - t).min(out))
}

/// Whether the taps of [`unit_stride_grad_input_taps`] along an axis are non-empty at every
/// input coordinate `0..size`: each input element is under some output (`out`) for a
/// kernel `k` wide, padded by `pad`.
pub(crate) fn every_input_tapped(pad: usize, size: usize, out: usize, k: usize) -> bool {
    let (pad, out, k) = (pad as i64, out as i64, k as i64);
    (0..size as i64).all(|x| (x + pad - (out - 1)).max(0) < (x + pad + 1).min(k))
}

/// The loops of a stride-1 convolution input gradient at `(n, c, h, w)` (dy `[N,O,OH,OW]`,
/// weights `[O,C,KH,KW]`) over exactly the taps that land inside dy — one range per axis
/// instead of testing every tap, which was most of the loop — calling `inner` with the flat
/// indices of dy and of the weight.
pub(crate) fn unit_stride_grad_input_taps(
    b: &mut Builder,
    [n, c, h, w]: [Expr; 4],
    dy: &[usize],
    wt: &[usize],
    padding: [usize; 2],
    inner: &dyn Fn(&mut Builder, Expr, Expr),
) {
    let [_, o, oh, ow] = rank4(dy);
    let [_, cc, kh, kw] = rank4(wt);
    let range = |b: &mut Builder, name: &str, at: Expr, pad: usize, out: usize, k: usize| {
        let a = b.cast(Scalar::I32, at);
        let p = b.i32(pad);
        let t = b.add(a, p);
        let o1 = b.i32(out - 1);
        let t = b.sub(t, o1);
        let z = b.i32(0);
        let m = b.math(MathFn::Max, &[t, z]);
        let lo = b.cast(Scalar::U32, m);
        let lo = b.let_(&format!("{name}_lo"), Ty::U32, lo);
        let a = b.cast(Scalar::I32, at);
        let p = b.i32(pad);
        let t = b.add(a, p);
        let one = b.i32(1);
        let t = b.add(t, one);
        let kk = b.i32(k);
        let m = b.math(MathFn::Min, &[t, kk]);
        let end = b.cast(Scalar::U32, m);
        let end = b.let_(&format!("{name}_end"), Ty::U32, end);
        (lo, end)
    };
    let (ky_lo, ky_end) = range(b, "ky", h, padding[0], oh, kh);
    let (kx_lo, kx_end) = range(b, "kx", w, padding[1], ow, kw);
    let (o0, on) = (b.u32(0), b.u32(o));
    b.for_("o", o0, on, |b, oi| {
        b.for_("ky", ky_lo, ky_end, |b, ky| {
            let p = b.u32(padding[0]);
            let t = b.add(h, p);
            let t = b.sub(t, ky);
            let oy = b.let_("oy", Ty::U32, t);
            b.for_("kx", kx_lo, kx_end, |b, kx| {
                let p = b.u32(padding[1]);
                let t = b.add(w, p);
                let t = b.sub(t, kx);
                let ox = b.let_("ox", Ty::U32, t);
                let dyi = b.flat(&[n, oi, oy, ox], &[0, o, oh, ow]);
                let dyi = b.let_("dyi", Ty::U32, dyi);
                let wi = b.flat(&[oi, c, ky, kx], &[0, cc, kh, kw]);
                let wi = b.let_("wi", Ty::U32, wi);
                inner(b, dyi, wi);
            });
        });
    });
}

/// Row-major strides of `shape`.
pub(crate) fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_that_land_and_inputs_that_are_tapped() {
        // LeNet's conv1 (28x28 padded by 2, 5x5 kernel) and a 3x3 kernel padded by 1.
        assert!(every_tap_lands(2, 28, 28, 5));
        assert!(every_tap_lands(1, 28, 28, 3));
        // A one-pixel row padded by 2 under a 4-wide kernel: two outputs, and kernel column
        // 3 lands in the padding for both.
        assert!(!every_tap_lands(2, 1, 2, 4));
        assert!(every_input_tapped(2, 28, 28, 5));
        assert!(every_input_tapped(2, 1, 2, 4));
    }
}
