//! Direct convolution in column quads, a CPU-class schedule for a small stride-1 convolution
//! (conv1 of LeNet: 1 -> 6 channels, 5x5) and its epilogue: bias, activation, a 2x2 pooling.
//!
//! Each invocation computes four consecutive output columns of every output channel, for the
//! two rows of a pooling window (one row without a pooling): the input pixels the quad needs
//! are whole `vec4`s of the uniform window (rows in fours), loaded once per input row and
//! shared by every channel and kernel tap, and the weights are read at compile-time-constant
//! indices, which lavapipe turns into broadcasts (~10 G/s against ~2 G/s for an index that
//! varies, even one the same for every lane). The saved activations are stored a `vec4` at a
//! time. Measured on the 2-core CI machine (lavapipe, `--profile`, batch 256): conv1's
//! forward kernel went from 11.5-12.5 ms per step (four images x three channels per
//! invocation, scalar stores) to 6.9-7.5 (of which ~2 ms are the saved activation's stores).
//!
//! The loops are unrolled over channels and taps, so the schedule is taken only while the
//! weights are few ([`MAX_WEIGHTS`]): lavapipe compiles each shader at its first dispatch.

use std::fmt::Write as _;

use kiln_ir::{DType, Graph, NodeId, Op};

use crate::plan::Kernel;
use crate::wgsl::{i, u};

/// Most weights (`O * C * KH * KW`) a quad kernel unrolls.
pub(crate) const MAX_WEIGHTS: usize = 256;

/// A convolution kernel scheduled in column quads.
#[derive(Clone, Debug)]
pub(crate) struct ConvQuads {
    pub conv: NodeId,
    /// The convolution's epilogue up to the pooling (or the root), bottom up.
    pub chain: Vec<NodeId>,
    /// The 2x2, stride-2 pooling at the top, if any: the kernel's main root then.
    pub pool: Option<NodeId>,
    /// Values of the convolution's shape this kernel stores, each a `vec4` at a time.
    pub quads_out: Vec<NodeId>,
    /// Output rows per invocation: a pooling window's two, or one.
    pub rows: usize,
    /// Invocations per image.
    pub per_image: usize,
}

impl ConvQuads {
    /// Invocations of the whole batch.
    pub fn invocations(&self, graph: &Graph) -> usize {
        graph.ty(self.conv).shape[0] * self.per_image
    }
}

/// The quad schedule of `kernel`, whose largest root is `main`, where it applies.
/// `uniform_of(id)` is the index expression of element `i` of `id` where the kernel reads
/// `id` from a uniform binding (a whole buffer or a window), else `None`.
pub(crate) fn find(
    graph: &Graph,
    kernel: &Kernel,
    roots: &[NodeId],
    main: NodeId,
    uniform_of: &dyn Fn(NodeId) -> Option<String>,
) -> Option<ConvQuads> {
    let read_uniform = |id: NodeId| kernel.reads.contains(&id) && uniform_of(id).is_some();
    // A whole buffer (not a window): its weights are read at constant indices.
    let whole = |id: NodeId| read_uniform(id) && uniform_of(id).as_deref() == Some("i");
    let computed = |id: NodeId| kernel.nodes.contains(&id) && graph.ty(id).dtype == DType::F32;
    let (pool, mut at) = match &graph.node(main).op {
        Op::AvgPool2d { kernel, stride } | Op::MaxPool2d { kernel, stride }
            if *kernel == [2, 2] && *stride == [2, 2] =>
        {
            (Some(main), graph.node(main).inputs[0])
        }
        _ => (None, main),
    };
    let mut chain = Vec::new();
    loop {
        if !computed(at) {
            return None;
        }
        let node = graph.node(at);
        match &node.op {
            Op::Conv2d { stride, .. } if *stride == [1, 1] => break,
            Op::Sigmoid | Op::Relu | Op::Tanh => {}
            Op::BiasAdd { axis: 1 } if whole(node.inputs[1]) => {}
            _ => return None,
        }
        chain.push(at);
        at = node.inputs[0];
    }
    chain.reverse();
    let conv = at;
    let node = graph.node(conv);
    let (x, w) = (node.inputs[0], node.inputs[1]);
    let [_, c, h, wi] = <[usize; 4]>::try_from(graph.ty(x).shape.as_slice()).ok()?;
    let [_, o, oh, ow] = <[usize; 4]>::try_from(node.ty.shape.as_slice()).ok()?;
    let [_, _, kh, kw] = <[usize; 4]>::try_from(graph.ty(w).shape.as_slice()).ok()?;
    let fits = read_uniform(x)
        && whole(w)
        && !kernel.nodes.contains(&x)
        && wi % 4 == 0
        && ow % 4 == 0
        && h > 0
        && o * c * kh * kw <= MAX_WEIGHTS
        && (pool.is_none() || oh % 2 == 0);
    // Exactly the chain is computed here, and only its values are stored.
    let members: Vec<NodeId> = std::iter::once(conv)
        .chain(chain.iter().copied())
        .chain(pool)
        .collect();
    let only_chain = kernel.nodes.len() == members.len()
        && kernel.nodes.iter().all(|n| members.contains(n))
        && roots.iter().all(|r| members.contains(r))
        && kernel.stores.iter().all(|s| members.contains(s));
    if !fits || !only_chain {
        return None;
    }
    let quads_out = members
        .iter()
        .copied()
        .filter(|&m| Some(m) != pool && (kernel.stores.contains(&m) || roots.contains(&m)))
        .collect();
    let rows = if pool.is_some() { 2 } else { 1 };
    Some(ConvQuads {
        conv,
        chain,
        pool,
        quads_out,
        rows,
        per_image: oh / rows * (ow / 4),
    })
}

const LANE: [char; 4] = ['x', 'y', 'z', 'w'];

/// Element `k` of a uniform binding read whole, at a constant index.
fn constant(slot: u32, k: usize) -> String {
    format!("buf{slot}[{}u].{}", k / 4, LANE[k % 4])
}

/// `vec4` block and lane of pixel `r` (relative to a quad's first column) among the blocks
/// `lo ..` loaded for the quad.
fn tap(r: i64, lo: i64) -> (i64, char) {
    let at = r - 4 * lo;
    (at / 4, LANE[(at % 4) as usize])
}

/// The statements of the entry point after invocation `j` is known: the quad's
/// accumulation, its epilogue and its stores. `uniform_of` as in [`find`]; `slot(id)` is the
/// binding of what `id` is read from or stored to.
pub(crate) fn body(
    graph: &Graph,
    q: &ConvQuads,
    uniform_of: &dyn Fn(NodeId, &str) -> String,
    slot: &dyn Fn(NodeId) -> u32,
) -> String {
    let node = graph.node(q.conv);
    let Op::Conv2d { padding, .. } = &node.op else {
        unreachable!("quads are a convolution's")
    };
    let (x, w) = (node.inputs[0], node.inputs[1]);
    let [_, c, h, wi] = <[usize; 4]>::try_from(graph.ty(x).shape.as_slice()).expect("rank 4");
    let [_, o, oh, ow] = <[usize; 4]>::try_from(node.ty.shape.as_slice()).expect("rank 4");
    let [_, _, kh, kw] = <[usize; 4]>::try_from(graph.ty(w).shape.as_slice()).expect("rank 4");
    let (py, px) = (padding[0] as i64, padding[1] as i64);
    let rows = q.rows;
    let groups = oh / rows;
    let quads = ow / 4;
    let mut s = format!(
        "    let n = j / {};\n    let g = (j / {}) % {};\n    let q = j % {};\n    let qi = i32(q);\n",
        u(q.per_image),
        u(quads),
        u(groups),
        u(quads)
    );
    // Pixels 4q - px ..= 4q + 3 + KW - 1 - px of each input row: vec4s q + lo ..= q + hi.
    let lo = (-px).div_euclid(4);
    let hi = (3 + kw as i64 - 1 - px).div_euclid(4);
    let xs = slot(x);
    let ws = slot(w);
    // One output channel at a time: its two accumulators stay in registers (SIMD lanes hold
    // each of a vec4's components in a register of its own; AVX2 has 16), at the price of
    // loading each pixel row once per channel (measured: 7.3-8.3 ms per step against 8.3 with
    // all six channels' accumulators live).
    for oc in 0..o {
        s.push_str("    {\n");
        for r in 0..rows {
            let _ = writeln!(s, "        var a{r} = vec4<f32>(0.0f);");
        }
        for ci in 0..c {
            // Input row t of the invocation is y = rows * g + t - py; output row r reads it
            // through kernel row t - r.
            for t in 0..rows + kh - 1 {
                let _ = writeln!(
                    s,
                    "        {{\n            let iy = i32(g * {}) + {};\n            let ok = iy >= 0i && iy < {};",
                    u(rows),
                    i64_lit(t as i64 - py),
                    i(h)
                );
                let row = format!(
                    "((n * {} + {}) * {} + u32(clamp(iy, 0i, {}))) * {}",
                    u(c),
                    u(ci),
                    u(h),
                    i(h - 1),
                    u(wi)
                );
                let _ = writeln!(s, "            let xq = {} >> 2u;", uniform_of(x, &row));
                for b in lo..=hi {
                    let _ = writeln!(
                        s,
                        "            let p{k} = select(vec4<f32>(0.0f), buf{xs}[xq + u32(clamp(qi + {b}, 0i, {last}))], ok && qi + {b} >= 0i && qi + {b} < {end});",
                        k = b - lo,
                        b = i64_lit(b),
                        last = i(wi / 4 - 1),
                        end = i(wi / 4),
                    );
                }
                for r in 0..rows {
                    let Some(ky) = t.checked_sub(r).filter(|&ky| ky < kh) else {
                        continue;
                    };
                    for kx in 0..kw {
                        let taps: Vec<String> = (0..4)
                            .map(|j| {
                                let (b, lane) = tap(j + kx as i64 - px, lo);
                                format!("p{b}.{lane}")
                            })
                            .collect();
                        let k = ((oc * c + ci) * kh + ky) * kw + kx;
                        let _ = writeln!(
                            s,
                            "            a{r} += vec4<f32>({}) * {};",
                            taps.join(", "),
                            constant(ws, k)
                        );
                    }
                }
                s.push_str("        }\n");
            }
        }
        // The epilogue of each row, bottom up; stored values a vec4 at a time.
        let store = |s: &mut String, id: NodeId, r: usize, value: &str| {
            if q.quads_out.contains(&id) {
                let _ = writeln!(
                    s,
                    "        buf{}[((n * {} + {oc}u) * {} + g * {} + {r}u) * {} + q] = {value};",
                    slot(id),
                    u(o),
                    u(oh),
                    u(rows),
                    u(quads)
                );
            }
        };
        for r in 0..rows {
            let mut value = format!("a{r}");
            store(&mut s, q.conv, r, &value);
            for (k, &id) in q.chain.iter().enumerate() {
                let next = format!("e{r}_{k}");
                let formula = match &graph.node(id).op {
                    Op::BiasAdd { .. } => {
                        format!("{value} + {}", constant(slot(graph.node(id).inputs[1]), oc))
                    }
                    Op::Sigmoid => format!("1.0f / (1.0f + exp(-{value}))"),
                    Op::Relu => {
                        format!("select({value}, vec4<f32>(0.0f), {value} < vec4<f32>(0.0f))")
                    }
                    Op::Tanh => format!("tanh({value})"),
                    op => unreachable!("{} is not in a quad chain", op.name()),
                };
                let _ = writeln!(s, "        let {next} = {formula};");
                value = next;
                store(&mut s, id, r, &value);
            }
            let _ = writeln!(s, "        let y{r} = {value};");
        }
        if let Some(pool) = q.pool {
            // Two windows: columns (x, y) and (z, w) of both rows, in the reference's order.
            let at = format!(
                "((n * {} + {oc}u) * {} + g) * {} + q * 2u",
                u(o),
                u(oh / 2),
                u(ow / 2)
            );
            for (k, pair) in [["x", "y"], ["z", "w"]].iter().enumerate() {
                let taps = [
                    format!("y0.{}", pair[0]),
                    format!("y0.{}", pair[1]),
                    format!("y1.{}", pair[0]),
                    format!("y1.{}", pair[1]),
                ];
                let value = if matches!(graph.node(pool).op, Op::AvgPool2d { .. }) {
                    format!("({}) / 4.0f", taps.join(" + "))
                } else {
                    // Keep the first maximum; NaN wins, as in the reference.
                    let _ = writeln!(s, "        var best{k} = {};", taps[0]);
                    for t in &taps[1..] {
                        let _ = writeln!(
                            s,
                            "        best{k} = select(best{k}, {t}, !(best{k} != best{k}) & !({t} <= best{k}));"
                        );
                    }
                    format!("best{k}")
                };
                let _ = writeln!(s, "        buf{}[{at} + {k}u] = {value};", slot(pool));
            }
        }
        s.push_str("    }\n");
    }
    s
}

fn i64_lit(v: i64) -> String {
    format!("{v}i")
}
