//! Direct convolutions over `vec4`s of pixel rows: CPU-class schedules for stride-1
//! convolutions, their epilogues (bias, activation, a 2x2 pooling, a flatten) and their
//! gradients. On lavapipe every gather costs about as much as 16 multiply-adds (a
//! micro-benchmark: 30-50 GFLOP/s of pure multiply-adds, ~1 ns per lane for each `vec4`
//! gathered), so each schedule makes every gathered `vec4` serve as many multiply-adds as it
//! can. Rows of a width in fours are whole `vec4`s of the uniform window; a row of another
//! even width starts at a multiple of four or two past one, so [`skewed_row`] reads it as
//! `vec4`s from the aligned word at or before its start and picks each element's lane by the
//! row's offset. Values of the convolution's shape a kernel stores (the saved activation, the
//! input gradient) are written a `vec4` at a time. Four covers, each measured on the 2-core CI
//! machine with lavapipe (`--profile`, batch 256, ms per step):
//!
//! - *Column quads* (conv1 forward: 1 -> 6 channels, 5x5, rows of 28): four consecutive
//!   output columns of every output channel per invocation, for both rows of a pooling window
//!   (one row without a pooling); weights at compile-time-constant indices, which lavapipe
//!   turns into broadcasts (~10 G/s against ~2 G/s for an index that varies, even one the same
//!   for every lane). Unrolled over channels and taps, so taken only while the weights are few
//!   ([`MAX_WEIGHTS`]): lavapipe compiles each shader at its first dispatch. 11.5-12.5 (four
//!   images x three channels per invocation, scalar stores) -> 6.9-7.7, of which ~2 ms are the
//!   saved activation's stores.
//! - *Whole rows* (conv2 forward: 6 -> 16 channels, rows of 14 -> 10): both rows of a pooling
//!   window, every column, of four output channels per invocation, which share each pixel
//!   row; each weight (a gather: its channel is the invocation's) serves a whole row of
//!   multiply-adds. 13.2 (blocked over four channels x four images, scalar pixel loads) ->
//!   9.5-12.4.
//! - *Input-gradient rows* (conv2's input gradient: `dy` rows of 10 -> rows of 14): both rows
//!   of a row pair, every column, of three input channels per invocation, looping over output
//!   channels and kernel rows, the `dy` rows shared by the channels. 17-20 -> 10-14.6.
//! - *Weight-gradient rows* ([`weight_rows_fn`], conv2's weight gradient, a sum over the batch
//!   carried from chunk to chunk): the five kernel columns of four output channels at one
//!   input channel and kernel row per invocation; every pixel serves 20 multiply-adds.
//!   14.5-17.7 -> 11.9-15.8.

use kiln_ir::{DType, Graph, NodeId, Op};

use crate::kir;
use crate::nest::{Held, Invocations, Nest, Split, coordinates};
use crate::plan::Kernel;
use crate::text::lanes_formula;

/// Most weights (`O * C * KH * KW`) the column-quad cover unrolls.
pub(crate) const MAX_WEIGHTS: usize = 256;

/// Most output values (both rows of a window) a whole-rows invocation accumulates per
/// channel.
const MAX_ROW_VALUES: usize = 32;

/// Output channels per whole-rows invocation, sharing each pixel load. conv2's forward
/// kernel per step, kernel rows unrolled: 1 channel 11.7-13.9 ms, 2 10.1-11.9, 4 8.3-9.9,
/// 8 7.4-10.2 (three alternating runs each), but lavapipe's JIT grew with it (cold start
/// 6.7 s with 1, 8.2-9.4 with 4, 11 with 8); with the kernel-row loop, 4 channels run in
/// 9.5-10.9 ms and 8 in 10.0-11.8, at the unrolled single channel's JIT cost.
const CHANNELS_PER_ROWS: usize = 4;

/// What one invocation covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cover {
    /// Four columns of every channel; weights at constant indices.
    Quads,
    /// Every column of a few channels.
    WholeRows,
    /// A stride-1 input gradient: every column of a pair of rows of a few input channels.
    GradInputRows,
}

/// A convolution kernel scheduled over `vec4`s of pixel rows.
#[derive(Clone, Debug)]
pub(crate) struct ConvQuads {
    pub cover: Cover,
    pub conv: NodeId,
    /// The convolution's epilogue up to the pooling (or the root), bottom up.
    pub chain: Vec<NodeId>,
    /// The 2x2, stride-2 pooling at the top, if any.
    pub pool: Option<NodeId>,
    /// The kernel's main root: the pooling, a reshape of it, or the chain's top.
    pub out: NodeId,
    /// Values of the convolution's shape this kernel stores, each a `vec4` at a time.
    pub quads_out: Vec<NodeId>,
    /// Output rows per invocation: a pooling window's two, or one.
    pub rows: usize,
    /// Invocations per image.
    pub per_image: usize,
    /// Output channels per invocation (whole rows).
    pub channels: usize,
}

impl ConvQuads {
    /// Invocations of the whole batch.
    pub fn invocations(&self, graph: &Graph) -> usize {
        graph.ty(self.conv).shape[0] * self.per_image
    }

    /// The loop nest the invocations enumerate: the convolution's output (an input
    /// gradient's, for its rows) with each invocation's channels, rows and columns; whole
    /// rows take the channel sets fastest, so that the lanes of a SIMD group read the same
    /// pixels.
    pub fn nest(&self, graph: &Graph) -> Nest {
        let shape = graph.ty(self.conv).shape.clone();
        let [_, channels, _, width] = crate::compute::rank4(&shape);
        match self.cover {
            Cover::Quads => {
                let mut splits = vec![Split::block(1, channels, Held::Channels)];
                if self.rows > 1 {
                    splits.push(Split::block(2, self.rows, Held::Rows));
                }
                splits.push(Split::block(3, 4, Held::Lanes));
                Nest::new(shape, splits)
            }
            Cover::WholeRows | Cover::GradInputRows => Nest {
                shape,
                splits: vec![
                    Split::block(1, self.channels, Held::Channels),
                    Split::block(2, self.rows, Held::Rows),
                    Split::block(3, width, Held::Columns),
                ],
                order: vec![0, 2, 1, 3],
            },
        }
    }

    /// The schedule line of the kernel's header.
    pub fn describe(&self, graph: &Graph) -> String {
        let n = self.invocations(graph);
        let rows = if self.rows == 1 { "1 row" } else { "2 rows" };
        match self.cover {
            Cover::Quads => format!(
                "{rows} x 4 columns of every channel of {} per invocation (column quads: vec4 pixel rows, constant-index weights; {n} invocations)",
                self.conv
            ),
            Cover::GradInputRows => format!(
                "2 rows x every column of {} channels of {} per invocation (whole rows: vec4 output-gradient rows shared by the channels, one weight load per row of multiply-adds; {n} invocations)",
                self.channels, self.conv
            ),
            Cover::WholeRows => format!(
                "{rows} x every column of {} channel{} of {} per invocation (whole rows: vec4 pixel rows shared by the channels, one weight load per row of multiply-adds; {n} invocations)",
                self.channels,
                if self.channels == 1 { "" } else { "s" },
                self.conv
            ),
        }
    }
}

/// The schedule of `kernel`, whose largest root is `main`, where one applies.
/// `uniform_of(id)` says how the kernel reads `id` from a uniform binding: `Some(None)` whole,
/// `Some(Some(w))` through the chunk's window `w`, `None` not at all.
pub(crate) fn find(
    graph: &Graph,
    kernel: &Kernel,
    roots: &[NodeId],
    main: NodeId,
    uniform_of: &dyn Fn(NodeId) -> Option<Option<usize>>,
) -> Option<ConvQuads> {
    let read_uniform = |id: NodeId| kernel.reads.contains(&id) && uniform_of(id).is_some();
    // A whole buffer (not a window): read at any index, constant or not.
    let whole = |id: NodeId| read_uniform(id) && uniform_of(id) == Some(None);
    let computed = |id: NodeId| kernel.nodes.contains(&id) && graph.ty(id).dtype == DType::F32;
    if let Some(q) = grad_input_rows(graph, kernel, roots, main, &read_uniform, &whole) {
        return Some(q);
    }
    let mut members = Vec::new();
    let mut at = main;
    while computed(at) && matches!(graph.node(at).op, Op::Reshape { .. }) {
        members.push(at);
        at = graph.node(at).inputs[0];
    }
    let pool = match &graph.node(at).op {
        Op::AvgPool2d { kernel, stride } | Op::MaxPool2d { kernel, stride }
            if *kernel == [2, 2] && *stride == [2, 2] && computed(at) =>
        {
            let pool = at;
            members.push(pool);
            at = graph.node(pool).inputs[0];
            Some(pool)
        }
        _ => None,
    };
    if pool.is_none() && !members.is_empty() {
        return None;
    }
    let mut chain = Vec::new();
    loop {
        if !computed(at) {
            return None;
        }
        let node = graph.node(at);
        match &node.op {
            Op::Conv2d { stride, .. } if *stride == [1, 1] => break,
            Op::BiasAdd { axis: 1 } if whole(node.inputs[1]) => {}
            // Any activation: its formula comes from its definition (`lanes_formula`).
            _ if lanes_formula(graph, at, "x").is_some() => {}
            _ => return None,
        }
        chain.push(at);
        at = node.inputs[0];
    }
    chain.reverse();
    let conv = at;
    members.push(conv);
    members.extend(&chain);
    let node = graph.node(conv);
    let (x, w) = (node.inputs[0], node.inputs[1]);
    let [_, c, h, wi] = <[usize; 4]>::try_from(graph.ty(x).shape.as_slice()).ok()?;
    let [_, o, oh, ow] = <[usize; 4]>::try_from(node.ty.shape.as_slice()).ok()?;
    let [_, _, kh, kw] = <[usize; 4]>::try_from(graph.ty(w).shape.as_slice()).ok()?;
    let operands = read_uniform(x) && whole(w) && !kernel.nodes.contains(&x) && h > 0;
    let pooled = pool.is_none() || oh % 2 == 0;
    let quads = wi % 4 == 0 && ow % 4 == 0 && o * c * kh * kw <= MAX_WEIGHTS;
    // Rows of an even width start at a multiple of four or two past one (planes in fours);
    // the stored values of a pooling window's two rows are whole vec4s.
    let rows = pool.is_some()
        && wi % 2 == 0
        && (h * wi) % 4 == 0
        && (2 * ow) % 4 == 0
        && 2 * ow <= MAX_ROW_VALUES;
    let cover = if quads {
        Cover::Quads
    } else if rows {
        Cover::WholeRows
    } else {
        return None;
    };
    // Exactly these nodes are computed here, and only their values are stored.
    let only_these = kernel.nodes.len() == members.len()
        && kernel.nodes.iter().all(|n| members.contains(n))
        && roots.iter().all(|r| members.contains(r))
        && kernel.stores.iter().all(|s| members.contains(s));
    if !operands || !pooled || !only_these {
        return None;
    }
    // Below the pooling, a stored value has the convolution's shape.
    let quads_out = std::iter::once(conv)
        .chain(chain.iter().copied())
        .filter(|m| kernel.stores.contains(m) || roots.contains(m))
        .collect();
    let rows = if pool.is_some() { 2 } else { 1 };
    let channels = [CHANNELS_PER_ROWS, 2, 1]
        .into_iter()
        .find(|k| o % k == 0)
        .expect("1 divides");
    let per_image = match cover {
        Cover::Quads => oh / rows * (ow / 4),
        Cover::WholeRows => oh / rows * (o / channels),
        Cover::GradInputRows => unreachable!("input gradients are found above"),
    };
    Some(ConvQuads {
        cover,
        conv,
        chain,
        pool,
        out: main,
        quads_out,
        rows,
        per_image,
        channels,
    })
}

/// Input channels per grad-input invocation, sharing each output-gradient load. conv2's
/// input gradient per step (alternating runs, a noisy hour): 1 channel 18.6-19.1 ms, 2
/// 14.4-14.6, 3 12.1-14.6, 6 9.7-14.0; 20 ms before (blocked over images, two columns).
const GRAD_INPUT_CHANNELS: usize = 3;

/// The whole-rows schedule of a kernel computing only a stride-1 convolution input gradient
/// (conv2's: `dy` rows of 10, input rows of 14).
fn grad_input_rows(
    graph: &Graph,
    kernel: &Kernel,
    roots: &[NodeId],
    main: NodeId,
    read_uniform: &dyn Fn(NodeId) -> bool,
    whole: &dyn Fn(NodeId) -> bool,
) -> Option<ConvQuads> {
    let node = graph.node(main);
    let Op::Conv2dGradInput { stride, .. } = &node.op else {
        return None;
    };
    let (dy, w) = (node.inputs[0], node.inputs[1]);
    let [_, c, h, wi] = <[usize; 4]>::try_from(node.ty.shape.as_slice()).ok()?;
    let [_, _, oh, ow] = <[usize; 4]>::try_from(graph.ty(dy).shape.as_slice()).ok()?;
    let fits = *stride == [1, 1]
        && kernel.nodes == [main]
        && roots == [main]
        && node.ty.dtype == DType::F32
        && read_uniform(dy)
        && whole(w)
        && ow % 2 == 0
        && (oh * ow) % 4 == 0
        && h % 2 == 0
        && (2 * wi) % 4 == 0
        && (h * wi) % 4 == 0
        && 2 * wi <= MAX_ROW_VALUES;
    if !fits {
        return None;
    }
    let channels = [GRAD_INPUT_CHANNELS, 2, 1]
        .into_iter()
        .find(|k| c % k == 0)
        .expect("1 divides");
    Some(ConvQuads {
        cover: Cover::GradInputRows,
        conv: main,
        chain: Vec::new(),
        pool: None,
        out: main,
        quads_out: vec![main],
        rows: 2,
        per_image: h / 2 * (c / channels),
        channels,
    })
}

/// Output channels per invocation of a weight gradient in whole rows. conv2's weight
/// gradient per step (alternating runs): 2 channels 14.8-17.3 ms, 4 11.9-15.8, 8 12.0-14.8,
/// 16 13.9; blocked over four channels x five kernel columns with scalar loads 14.5-17.7.
const WEIGHT_ROWS_CHANNELS: usize = 4;

/// The output channels per invocation of stride-1 weight gradient `red` computed in whole
/// rows (conv2's: `dy` rows of 10, input rows of 14), where its rows are even and its planes
/// in fours; `None` where they are not.
pub(crate) fn weight_rows_channels(graph: &Graph, red: NodeId) -> Option<usize> {
    let node = graph.node(red);
    let Op::Conv2dGradWeight { stride, .. } = &node.op else {
        return None;
    };
    let [_, _, h, wi] = <[usize; 4]>::try_from(graph.ty(node.inputs[0]).shape.as_slice()).ok()?;
    let [_, o, oh, ow] = <[usize; 4]>::try_from(graph.ty(node.inputs[1]).shape.as_slice()).ok()?;
    let fits = *stride == [1, 1]
        && wi % 2 == 0
        && (h * wi) % 4 == 0
        && ow % 2 == 0
        && (oh * ow) % 4 == 0
        && o % WEIGHT_ROWS_CHANNELS == 0;
    fits.then_some(WEIGHT_ROWS_CHANNELS)
}

/// `fn v<red>_columns_chunk(i) -> array<f32, P * KW>`: the `KW` kernel columns of `P`
/// output channels (`o, o + 1, ..`) of weight gradient `red` at input channel `c` and kernel
/// row `ky`, where `i` is the flat index of `(o, c, ky, 0)`, summed over the chunk's images.
/// Each step reads one input row and each channel's `dy` row as `vec4`s (rows of an even
/// width: [`skewed_row`]); every input pixel serves `P * KW` multiply-adds. `x` and `dy`:
/// the binding of each operand and the chunk window it is read through, if any.
pub(crate) fn weight_rows_fn(
    graph: &Graph,
    red: NodeId,
    per: usize,
    x: (u32, Option<usize>),
    dy: (u32, Option<usize>),
) -> kir::module::Item {
    let node = graph.node(red);
    let Op::Conv2dGradWeight { padding, .. } = &node.op else {
        unreachable!("weight rows are a weight gradient's")
    };
    let [_, c, h, wi] = crate::compute::rank4(&graph.ty(node.inputs[0]).shape);
    let [_, o, oh, ow] = crate::compute::rank4(&graph.ty(node.inputs[1]).shape);
    let kw = node.ty.shape[3];
    let ret = kir::Ty::array(kir::Ty::F32, (per * kw) as u32).expect("one deep");
    let mut f = kir::Builder::new(ret, Vec::new());
    let i = f.index();
    let [oc, cc, ky, _] =
        crate::compute::coords4(&mut f, i, ["o", "c", "ky", "kx"], &node.ty.shape);
    let (oy_lo, oy_end) = crate::compute::valid_outputs(&mut f, "oy", ky, padding[0], h, oh);
    let accs: Vec<kir::Local> = (0..per)
        .flat_map(|k| (0..kw).map(move |kx| format!("a{k}_{kx}")))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|name| {
            let z = f.f32(0.0);
            f.var(&name, kir::Ty::F32, z)
        })
        .collect();
    let (xg, dg) = (f.global(uniform_quads(x.0)), f.global(uniform_quads(dy.0)));
    let (first, end) = crate::compute::batch_range(&mut f, 0, true);
    f.for_("n", first, end, |f, n| {
        f.for_("oy", oy_lo, oy_end, |f, oy| {
            let row = weight_gradient_row(f, (n, cc, oy, ky), (c, h, wi), padding[0]);
            let row = uniform_index(f, row, x.1);
            let yes = f.lit(kir::Literal::Bool(true));
            let pixels = skewed_row(f, (xg, row), wi, "x", yes);
            for k in 0..per {
                f.scope(|f| {
                    let ou = f.u32(o);
                    let t = f.mul(n, ou);
                    let t = f.add(t, oc);
                    let ku = f.u32(k);
                    let t = f.add(t, ku);
                    let ohu = f.u32(oh);
                    let t = f.mul(t, ohu);
                    let t = f.add(t, oy);
                    let owu = f.u32(ow);
                    let t = f.mul(t, owu);
                    let drow = uniform_index(f, t, dy.1);
                    let yes = f.lit(kir::Literal::Bool(true));
                    let d = skewed_row(f, (dg, drow), ow, "d", yes);
                    for kx in 0..kw {
                        let mut sum = None;
                        for (ox, &dv) in d.iter().enumerate() {
                            let ix = (ox + kx) as i64 - padding[1] as i64;
                            if (0..wi as i64).contains(&ix) {
                                let t = f.mul(dv, pixels[ix as usize]);
                                sum = Some(match sum {
                                    None => t,
                                    Some(s) => f.add(s, t),
                                });
                            }
                        }
                        if let Some(sum) = sum {
                            f.add_assign(accs[k * kw + kx], sum);
                        }
                    }
                });
            }
        });
    });
    let values: Vec<kir::Expr> = accs.iter().map(|&a| f.get(a)).collect();
    let all = f.array(values);
    f.ret_(all);
    kir::module::Item::Function {
        name: crate::text::chunk_part(&format!("v{}_columns", red.0)),
        comment: None,
        function: f.finish(),
        callees: Vec::new(),
    }
}

/// The flat index of the input row a weight gradient's output row `oy` reads at kernel row
/// `ky`, `((n * C + c) * H + oy + ky - pad) * W`, for an input `[_, C, H, W]`.
pub(crate) fn weight_gradient_row(
    f: &mut kir::Builder,
    (n, c, oy, ky): (kir::Expr, kir::Expr, kir::Expr, kir::Expr),
    (channels, h, w): (usize, usize, usize),
    pad: usize,
) -> kir::Expr {
    let row = f.flat(&[n, c], &[0, channels]);
    let hh = f.u32(h);
    let row = f.mul(row, hh);
    let row = f.add(row, oy);
    let row = f.add(row, ky);
    let py = f.u32(pad);
    let row = f.sub(row, py);
    let ww = f.u32(w);
    f.mul(row, ww)
}

/// The `width` elements of a row of even width at flat index `at` of
/// uniform `global` (each its own `let`), read as `vec4`s, zero unless `ok`.
pub(crate) fn skewed_row(
    f: &mut kir::Builder,
    (global, at): (usize, kir::Expr),
    width: usize,
    name: &str,
    ok: kir::Expr,
) -> Vec<kir::Expr> {
    let skewed = width % 4 != 0;
    let blocks = (width + if skewed { 2 } else { 0 }).div_ceil(4);
    let at = f.let_(&format!("{name}at"), kir::Ty::U32, at);
    let skew = skewed.then(|| {
        let three = f.u32(3);
        let s = f.bin(kir::BinOp::BitAnd, at, three);
        f.let_(&format!("{name}skew"), kir::Ty::U32, s)
    });
    let quads: Vec<kir::Expr> = (0..blocks)
        .map(|b| {
            let two = f.u32(2);
            let q = f.bin(kir::BinOp::ShiftRight, at, two);
            let bb = f.u32(b);
            let q = f.add(q, bb);
            let quad = f.load(global, q);
            let zero = f.f32(0.0);
            let zero = f.splat(zero);
            let v = f.select(ok, quad, zero);
            f.let_(&format!("{name}q{b}"), kir::Ty::VEC4_F32, v)
        })
        .collect();
    let lane = |f: &mut kir::Builder, at: usize| {
        let l = f.u32(at % 4);
        f.lane(quads[at / 4], l)
    };
    (0..width)
        .map(|k| {
            let pick = match skew {
                Some(skew) => {
                    let (a, b) = (lane(f, k), lane(f, k + 2));
                    let z = f.u32(0);
                    let shifted = f.bin(kir::BinOp::Ne, skew, z);
                    f.select(shifted, b, a)
                }
                None => lane(f, k),
            };
            f.let_(&format!("{name}{k}"), kir::Ty::F32, pick)
        })
        .collect()
}

/// The pixel `vec4`s a quad of output columns `4q ..= 4q + 3` reads through a kernel row
/// of `kw` columns at padding `px`: pixels `4q - px ..= 4q + 3 + kw - 1 - px`, in `vec4`s
/// `q + lo ..= q + hi` of the row.
pub(crate) fn quad_blocks(kw: usize, px: i64) -> (i64, i64) {
    ((-px).div_euclid(4), (3 + kw as i64 - 1 - px).div_euclid(4))
}

/// A uniform binding of `vec4`s, by its slot.
pub(crate) fn uniform_quads(slot: u32) -> kir::Global {
    kir::Global {
        name: format!("buf{slot}"),
        space: kir::Space::Uniform,
        elem: kir::Ty::VEC4_F32,
    }
}

/// `index` into a uniform binding read whole, or through the chunk's window `window`.
pub(crate) fn uniform_index(
    f: &mut kir::Builder,
    index: kir::Expr,
    window: Option<usize>,
) -> kir::Expr {
    match window {
        None => index,
        Some(w) => {
            let base = f.window_base(w);
            f.sub(index, base)
        }
    }
}

/// `vec4` `b` (an `i32`) of the row of `row_vec4s` whole
/// `vec4`s starting at `vec4` `xq` of `global`, zero outside it or where `ok` is false.
pub(crate) fn row_quad(
    f: &mut kir::Builder,
    (global, xq): (usize, kir::Expr),
    b: kir::Expr,
    row_vec4s: usize,
    ok: Option<kir::Expr>,
) -> kir::Expr {
    let zero = f.f32(0.0);
    let zero = f.splat(zero);
    let (z, last) = (f.i32(0), f.i32(row_vec4s - 1));
    let at = f.math(kir::MathFn::Clamp, &[b, z, last]);
    let at = f.cast(kir::Scalar::U32, at);
    let at = f.add(xq, at);
    let quad = f.load(global, at);
    let (z, n) = (f.i32(0), f.i32(row_vec4s));
    let lo = f.bin(kir::BinOp::Ge, b, z);
    let lo = match ok {
        Some(ok) => f.bin(kir::BinOp::And, ok, lo),
        None => lo,
    };
    let hi = f.bin(kir::BinOp::Lt, b, n);
    let inside = f.bin(kir::BinOp::And, lo, hi);
    f.select(inside, quad, zero)
}

/// The quad's four pixels under kernel column `kx`, from the blocks `blocks` (`p0 ..`) loaded
/// from [`quad_blocks`]'s `lo` (padding `px`): output column `4q + j` reads pixel
/// `4q + j + kx - px`.
pub(crate) fn quad_taps(
    f: &mut kir::Builder,
    blocks: &[kir::Expr],
    kx: usize,
    px: i64,
    lo: i64,
) -> kir::Expr {
    let taps = [0i64, 1, 2, 3].map(|j| {
        let at = j + kx as i64 - px - 4 * lo;
        let l = f.u32((at % 4) as usize);
        f.lane(blocks[(at / 4) as usize], l)
    });
    f.compose(taps)
}

/// Shapes of a convolution: input `[c, h, w]`, output `[o, oh, ow]`, kernel `[kh, kw]`,
/// padding.
struct Dims {
    c: usize,
    h: usize,
    wi: usize,
    o: usize,
    oh: usize,
    ow: usize,
    kh: usize,
    kw: usize,
    py: i64,
    px: i64,
}

fn dims(graph: &Graph, conv: NodeId) -> Dims {
    let node = graph.node(conv);
    let Op::Conv2d { padding, .. } = &node.op else {
        unreachable!("quads are a convolution's")
    };
    let shape = |id: NodeId| -> [usize; 4] {
        <[usize; 4]>::try_from(graph.ty(id).shape.as_slice()).expect("rank 4")
    };
    let [_, c, h, wi] = shape(node.inputs[0]);
    let [_, o, oh, ow] = shape(conv);
    let [_, _, kh, kw] = shape(node.inputs[1]);
    Dims {
        c,
        h,
        wi,
        o,
        oh,
        ow,
        kh,
        kw,
        py: padding[0] as i64,
        px: padding[1] as i64,
    }
}

/// Where the schedule reads or stores a value: its global (binding, space, element type)
/// and the chunk window a read goes through, if any.
pub(crate) type Bound<'a> = &'a dyn Fn(NodeId) -> (kir::Global, Option<usize>);

/// The statements of the entry point after invocation `j` is known: its coordinates in the
/// nest (`inv`, from [`ConvQuads::nest`]), the accumulation, the epilogue and the stores, in
/// the kernel IR.
pub(crate) fn body(
    f: &mut kir::Builder,
    graph: &Graph,
    q: &ConvQuads,
    (j, inv): (kir::Expr, &Invocations),
    at: Bound,
) {
    match q.cover {
        Cover::Quads => {
            let c = coordinates(f, j, inv, &["n", "o", "g", "q"]);
            quads_body(f, graph, q, (c[0], c[2], c[3]), at)
        }
        Cover::WholeRows | Cover::GradInputRows => {
            // The invocation's first channel: its set's.
            let c = coordinates(f, j, inv, &["n", "s", "g", "x"]);
            let per = f.u32(q.channels);
            let first = f.mul(c[1], per);
            if q.cover == Cover::WholeRows {
                let o0 = let_u32(f, "o0", first);
                rows_body(f, graph, q, (c[0], c[2], o0), at)
            } else {
                let c0 = let_u32(f, "c0", first);
                grad_input_body(f, graph, q, (c[0], c[2], c0), at)
            }
        }
    }
}

fn ilit(f: &mut kir::Builder, v: i64) -> kir::Expr {
    f.lit(kir::Literal::I32(v as i32))
}

/// `let <name> = value;` of `u32` `value`.
fn let_u32(f: &mut kir::Builder, name: &str, value: kir::Expr) -> kir::Expr {
    f.let_(name, kir::Ty::U32, value)
}

/// `var a<k>_<r>_<x> = 0.0f;` for `channels x rows x width` scalar accumulators, in that order.
fn accumulators(
    f: &mut kir::Builder,
    channels: usize,
    rows: usize,
    width: usize,
) -> Vec<kir::Local> {
    let mut out = Vec::new();
    for k in 0..channels {
        for r in 0..rows {
            for x in 0..width {
                let z = f.f32(0.0);
                out.push(f.var(&format!("a{k}_{r}_{x}"), kir::Ty::F32, z));
            }
        }
    }
    out
}

/// `let wb<k>` and `let w<k>_<kx>`: the `kw` weights of a kernel row starting at flat index
/// `base(k)` for each of `channels` channels, gathered from the uniform `global`.
fn kernel_row_weights(
    f: &mut kir::Builder,
    global: usize,
    channels: usize,
    kw: usize,
    base: &dyn Fn(&mut kir::Builder, usize) -> kir::Expr,
) -> Vec<Vec<kir::Expr>> {
    (0..channels)
        .map(|k| {
            let b = base(f, k);
            let wb = let_u32(f, &format!("wb{k}"), b);
            (0..kw)
                .map(|kx| {
                    let d = f.u32(kx);
                    let at = f.add(wb, d);
                    let (two, three) = (f.u32(2), f.u32(3));
                    let q = f.bin(kir::BinOp::ShiftRight, at, two);
                    let quad = f.load(global, q);
                    let at = f.add(wb, d);
                    let l = f.bin(kir::BinOp::BitAnd, at, three);
                    let v = f.lane(quad, l);
                    f.let_(&format!("w{k}_{kx}"), kir::Ty::F32, v)
                })
                .collect()
        })
        .collect()
}

/// `(n * C + c) * H + u32(clamp(iy, 0i, H - 1))`, times `W`: the flat index of input row `iy`
/// (an `i32`) of channel `c` of image `n`, clamped into the image.
fn clamped_row(
    f: &mut kir::Builder,
    (n, c): (kir::Expr, kir::Expr),
    iy: kir::Expr,
    (channels, h, w): (usize, usize, usize),
) -> kir::Expr {
    let cc = f.u32(channels);
    let t = f.mul(n, cc);
    let t = f.add(t, c);
    let hh = f.u32(h);
    let t = f.mul(t, hh);
    let (z, hm) = (f.i32(0), f.i32(h - 1));
    let y = f.math(kir::MathFn::Clamp, &[iy, z, hm]);
    let y = f.cast(kir::Scalar::U32, y);
    let t = f.add(t, y);
    let ww = f.u32(w);
    f.mul(t, ww)
}

/// `iy >= 0i && iy < size`.
fn inside(f: &mut kir::Builder, iy: kir::Expr, size: usize) -> kir::Expr {
    let (z, n) = (f.i32(0), f.i32(size));
    let lo = f.bin(kir::BinOp::Ge, iy, z);
    let hi = f.bin(kir::BinOp::Lt, iy, n);
    f.bin(kir::BinOp::And, lo, hi)
}

/// `n`, `g` and `q`: the invocation's image, row group and column quad.
fn quads_body(
    f: &mut kir::Builder,
    graph: &Graph,
    q: &ConvQuads,
    (n, g, qq): (kir::Expr, kir::Expr, kir::Expr),
    at: Bound,
) {
    let Dims {
        c,
        h,
        wi,
        o,
        oh,
        ow,
        kh,
        kw,
        py,
        px,
    } = dims(graph, q.conv);
    let (x, w) = (graph.node(q.conv).inputs[0], graph.node(q.conv).inputs[1]);
    let rows = q.rows;
    let quads = ow / 4;
    let qi = f.cast(kir::Scalar::I32, qq);
    let qi = f.let_("qi", kir::Ty::I32, qi);
    let (lo, hi) = quad_blocks(kw, px);
    let ((xglobal, xwindow), (wglobal, _)) = (at(x), at(w));
    let (xg, wg) = (f.global(xglobal), f.global(wglobal));
    // One output channel at a time: its two accumulators stay in registers (SIMD lanes hold
    // each of a vec4's components in a register of its own; AVX2 has 16), at the price of
    // loading each pixel row once per channel (measured: 7.3-8.3 ms per step against 8.3 with
    // all six channels' accumulators live).
    for oc in 0..o {
        f.scope(|f| {
            let accs: Vec<kir::Local> = (0..rows)
                .map(|r| {
                    let z = f.f32(0.0);
                    let z = f.splat(z);
                    f.var(&format!("a{r}"), kir::Ty::VEC4_F32, z)
                })
                .collect();
            // The channel's weights as whole vec4s at constant indices (naga validates a
            // module with a constant-index load per multiply-add twice as slowly).
            let per_channel = c * kh * kw;
            let first = oc * per_channel / 4;
            let weights: Vec<kir::Expr> = (first..=((oc + 1) * per_channel - 1) / 4)
                .map(|m| {
                    let mm = f.u32(m);
                    let v = f.load(wg, mm);
                    f.let_(&format!("wq{m}"), kir::Ty::VEC4_F32, v)
                })
                .collect();
            for ci in 0..c {
                // Input row t of the invocation is y = rows * g + t - py; output row r
                // reads it through kernel row t - r.
                for t in 0..rows + kh - 1 {
                    f.scope(|f| {
                        let rr = f.u32(rows);
                        let base = f.mul(g, rr);
                        let base = f.cast(kir::Scalar::I32, base);
                        let d = ilit(f, t as i64 - py);
                        let iy = f.add(base, d);
                        let iy = f.let_("iy", kir::Ty::I32, iy);
                        let ok = inside(f, iy, h);
                        let ok = f.let_("ok", kir::Ty::BOOL, ok);
                        let cu = f.u32(ci);
                        let row = clamped_row(f, (n, cu), iy, (c, h, wi));
                        let row = uniform_index(f, row, xwindow);
                        let two = f.u32(2);
                        let xq = f.bin(kir::BinOp::ShiftRight, row, two);
                        let xq = let_u32(f, "xq", xq);
                        let blocks: Vec<kir::Expr> = (lo..=hi)
                            .map(|b| {
                                let d = ilit(f, b);
                                let at = f.add(qi, d);
                                let quad = row_quad(f, (xg, xq), at, wi / 4, Some(ok));
                                f.let_(&format!("p{}", b - lo), kir::Ty::VEC4_F32, quad)
                            })
                            .collect();
                        // The quad's pixels under kernel column kx, shared by both rows.
                        let taps: Vec<kir::Expr> = (0..kw)
                            .map(|kx| {
                                let v = quad_taps(f, &blocks, kx, px, lo);
                                f.let_(&format!("s{kx}"), kir::Ty::VEC4_F32, v)
                            })
                            .collect();
                        for (r, &acc) in accs.iter().enumerate() {
                            let Some(ky) = t.checked_sub(r).filter(|&ky| ky < kh) else {
                                continue;
                            };
                            for (kx, &tap) in taps.iter().enumerate() {
                                let k = ((oc * c + ci) * kh + ky) * kw + kx;
                                let l = f.u32(k % 4);
                                let wv = f.lane(weights[k / 4 - first], l);
                                let term = f.mul(tap, wv);
                                f.add_assign(acc, term);
                            }
                        }
                    });
                }
            }
            let values: Vec<kir::Expr> = accs.iter().map(|&a| f.get(a)).collect();
            let stored = |f: &mut kir::Builder, r: usize| {
                let (ou, ocu, ohu, rr, ru, qn) = (
                    f.u32(o),
                    f.u32(oc),
                    f.u32(oh),
                    f.u32(rows),
                    f.u32(r),
                    f.u32(quads),
                );
                let t = f.mul(n, ou);
                let t = f.add(t, ocu);
                let t = f.mul(t, ohu);
                let gr = f.mul(g, rr);
                let t = f.add(t, gr);
                let t = f.add(t, ru);
                let t = f.mul(t, qn);
                f.add(t, qq)
            };
            let bias = |f: &mut kir::Builder, b: NodeId| {
                let g = f.global(at(b).0);
                let m = f.u32(oc / 4);
                let quad = f.load(g, m);
                let l = f.u32(oc % 4);
                f.lane(quad, l)
            };
            // Value (r, column k of the quad) is lane k of vec4 r; pooled columns 2q, 2q + 1.
            let pooled = |f: &mut kir::Builder| {
                let (ou, ocu, oh2, ow2, two) =
                    (f.u32(o), f.u32(oc), f.u32(oh / 2), f.u32(ow / 2), f.u32(2));
                let t = f.mul(n, ou);
                let t = f.add(t, ocu);
                let t = f.mul(t, oh2);
                let t = f.add(t, g);
                let t = f.mul(t, ow2);
                let q2 = f.mul(qq, two);
                f.add(t, q2)
            };
            epilogue(f, graph, q, &values, &stored, &bias, at, 4, &pooled);
        });
    }
}

/// `n`, `g` and `o0`: the invocation's image, row group and first output channel.
fn rows_body(
    f: &mut kir::Builder,
    graph: &Graph,
    q: &ConvQuads,
    (n, g, o0): (kir::Expr, kir::Expr, kir::Expr),
    at: Bound,
) {
    let Dims {
        c,
        h,
        wi,
        o,
        oh,
        ow,
        kh,
        kw,
        py,
        px,
    } = dims(graph, q.conv);
    let (x, w) = (graph.node(q.conv).inputs[0], graph.node(q.conv).inputs[1]);
    let rows = q.rows;
    let per = q.channels;
    let accs = accumulators(f, per, rows, ow);
    let ((xglobal, xwindow), (wglobal, _)) = (at(x), at(w));
    let (xg, wg) = (f.global(xglobal), f.global(wglobal));
    // Loops over input channels and kernel rows keep the shader small (lavapipe compiles it
    // at the first dispatch; the same kernel unrolled over kernel rows took ~1 s more).
    let (z, cu) = (f.u32(0), f.u32(c));
    f.for_("c", z, cu, |f, ci| {
        let (z, khu) = (f.u32(0), f.u32(kh));
        f.for_("ky", z, khu, |f, ky| {
            // The kernel row's weights of each channel: gathers (the channel is the lane's),
            // each serving a row of multiply-adds for each output row.
            let weights = kernel_row_weights(f, wg, per, kw, &|f, k| {
                let ku = f.u32(k);
                let t = f.add(o0, ku);
                let cc = f.u32(c);
                let t = f.mul(t, cc);
                let t = f.add(t, ci);
                let khh = f.u32(kh);
                let t = f.mul(t, khh);
                let t = f.add(t, ky);
                let kww = f.u32(kw);
                f.mul(t, kww)
            });
            for r in 0..rows {
                f.scope(|f| {
                    let rr = f.u32(rows);
                    let t = f.mul(g, rr);
                    let ru = f.u32(r);
                    let t = f.add(t, ru);
                    let t = f.add(t, ky);
                    let t = f.cast(kir::Scalar::I32, t);
                    let p = f.i32(py as usize);
                    let iy = f.sub(t, p);
                    let iy = f.let_("iy", kir::Ty::I32, iy);
                    let ok = inside(f, iy, h);
                    let ok = f.let_("ok", kir::Ty::BOOL, ok);
                    let row = clamped_row(f, (n, ci), iy, (c, h, wi));
                    let row = uniform_index(f, row, xwindow);
                    let pixels = skewed_row(f, (xg, row), wi, "x", ok);
                    for (k, kernel_row) in weights.iter().enumerate() {
                        for (kx, &wv) in kernel_row.iter().enumerate() {
                            for ox in 0..ow {
                                let ix = (ox + kx) as i64 - px;
                                if ix < 0 || ix >= wi as i64 {
                                    continue;
                                }
                                let t = f.mul(pixels[ix as usize], wv);
                                f.add_assign(accs[(k * rows + r) * ow + ox], t);
                            }
                        }
                    }
                });
            }
        });
    });
    for k in 0..per {
        f.scope(|f| {
            let ku = f.u32(k);
            let oc = f.add(o0, ku);
            let oc = let_u32(f, "o", oc);
            // The rows' values, four at a time in memory order (rows x columns).
            let values: Vec<kir::Expr> = accs[k * rows * ow..(k + 1) * rows * ow]
                .chunks(4)
                .enumerate()
                .map(|(v, four)| {
                    let lanes = [0, 1, 2, 3].map(|l| f.get(four[l]));
                    let quad = f.compose(lanes);
                    f.let_(&format!("v{v}"), kir::Ty::VEC4_F32, quad)
                })
                .collect();
            let stored = |f: &mut kir::Builder, v: usize| {
                let (ou, ohu, rr, owu, four, vu) = (
                    f.u32(o),
                    f.u32(oh),
                    f.u32(rows),
                    f.u32(ow),
                    f.u32(4),
                    f.u32(v),
                );
                let t = f.mul(n, ou);
                let t = f.add(t, oc);
                let t = f.mul(t, ohu);
                let gr = f.mul(g, rr);
                let t = f.add(t, gr);
                let t = f.mul(t, owu);
                let t = f.div(t, four);
                f.add(t, vu)
            };
            let bias = |f: &mut kir::Builder, b: NodeId| {
                let g = f.global(at(b).0);
                let (two, three) = (f.u32(2), f.u32(3));
                let qv = f.bin(kir::BinOp::ShiftRight, oc, two);
                let quad = f.load(g, qv);
                let l = f.bin(kir::BinOp::BitAnd, oc, three);
                f.lane(quad, l)
            };
            let pooled = |f: &mut kir::Builder| {
                let (ou, oh2, ow2) = (f.u32(o), f.u32(oh / 2), f.u32(ow / 2));
                let t = f.mul(n, ou);
                let t = f.add(t, oc);
                let t = f.mul(t, oh2);
                let t = f.add(t, g);
                f.mul(t, ow2)
            };
            epilogue(f, graph, q, &values, &stored, &bias, at, ow, &pooled);
        });
    }
}

/// `n`, `g` and `c0`: the invocation's image, row pair and first input channel.
fn grad_input_body(
    f: &mut kir::Builder,
    graph: &Graph,
    q: &ConvQuads,
    (n, g, c0): (kir::Expr, kir::Expr, kir::Expr),
    at: Bound,
) {
    let node = graph.node(q.conv);
    let Op::Conv2dGradInput { padding, .. } = &node.op else {
        unreachable!("grad-input rows are an input gradient's")
    };
    let (dy, w) = (node.inputs[0], node.inputs[1]);
    let [_, c, h, wi] = crate::compute::rank4(&graph.ty(q.conv).shape);
    let [_, o, oh, ow] = crate::compute::rank4(&graph.ty(dy).shape);
    let [_, _, kh, kw] = crate::compute::rank4(&graph.ty(w).shape);
    let per = q.channels;
    let accs = accumulators(f, per, 2, wi);
    let ((dglobal, dwindow), (wglobal, _)) = (at(dy), at(w));
    let (dg, wg) = (f.global(dglobal), f.global(wglobal));
    // dx[iy, ix] sums dy[iy + py - ky, ix + px - kx] w[ky, kx] over the output channels.
    let (z, ou) = (f.u32(0), f.u32(o));
    f.for_("o", z, ou, |f, oi| {
        let (z, khu) = (f.u32(0), f.u32(kh));
        f.for_("ky", z, khu, |f, ky| {
            let weights = kernel_row_weights(f, wg, per, kw, &|f, k| {
                let cc = f.u32(c);
                let t = f.mul(oi, cc);
                let t = f.add(t, c0);
                let ku = f.u32(k);
                let t = f.add(t, ku);
                let khh = f.u32(kh);
                let t = f.mul(t, khh);
                let t = f.add(t, ky);
                let kww = f.u32(kw);
                f.mul(t, kww)
            });
            for r in 0..2 {
                f.scope(|f| {
                    let two = f.u32(2);
                    let t = f.mul(g, two);
                    let d = f.u32(r + padding[0]);
                    let t = f.add(t, d);
                    let t = f.cast(kir::Scalar::I32, t);
                    let kyi = f.cast(kir::Scalar::I32, ky);
                    let oy = f.sub(t, kyi);
                    let oy = f.let_("oy", kir::Ty::I32, oy);
                    let ok = inside(f, oy, oh);
                    let ok = f.let_("ok", kir::Ty::BOOL, ok);
                    let row = clamped_row(f, (n, oi), oy, (o, oh, ow));
                    let row = uniform_index(f, row, dwindow);
                    let d = skewed_row(f, (dg, row), ow, "d", ok);
                    for (k, kernel_row) in weights.iter().enumerate() {
                        for (kx, &wv) in kernel_row.iter().enumerate() {
                            for ix in 0..wi {
                                let ox = (ix + padding[1]) as i64 - kx as i64;
                                if ox < 0 || ox >= ow as i64 {
                                    continue;
                                }
                                let t = f.mul(d[ox as usize], wv);
                                f.add_assign(accs[(k * 2 + r) * wi + ix], t);
                            }
                        }
                    }
                });
            }
        });
    });
    // Both rows of each channel, four values at a time in memory order.
    let out = f.global(at(q.conv).0);
    for k in 0..per {
        let values = &accs[k * 2 * wi..(k + 1) * 2 * wi];
        for (v, four) in values.chunks(4).enumerate() {
            let (cc, ku, hh, two, wu, four_u, vu) = (
                f.u32(c),
                f.u32(k),
                f.u32(h),
                f.u32(2),
                f.u32(wi),
                f.u32(4),
                f.u32(v),
            );
            let t = f.mul(n, cc);
            let t = f.add(t, c0);
            let t = f.add(t, ku);
            let t = f.mul(t, hh);
            let g2 = f.mul(g, two);
            let t = f.add(t, g2);
            let t = f.mul(t, wu);
            let t = f.div(t, four_u);
            let at = f.add(t, vu);
            let lanes = [0, 1, 2, 3].map(|l| f.get(four[l]));
            let quad = f.compose(lanes);
            f.store(out, at, quad);
        }
    }
}

/// The epilogue of one output channel's accumulated `vec4`s `accs` (values in memory order
/// of `rows x columns`, `columns` per row): the chain, bottom up, stores of the stored values
/// (`vec4` `k` at `stored(k)`), and the 2x2 pooling of the two rows' `columns / 2` windows
/// from flat index `pooled` of the kernel's main root.
#[allow(clippy::too_many_arguments)]
fn epilogue(
    f: &mut kir::Builder,
    graph: &Graph,
    q: &ConvQuads,
    accs: &[kir::Expr],
    stored: &dyn Fn(&mut kir::Builder, usize) -> kir::Expr,
    bias: &dyn Fn(&mut kir::Builder, NodeId) -> kir::Expr,
    at: Bound,
    columns: usize,
    pooled: &dyn Fn(&mut kir::Builder) -> kir::Expr,
) {
    let store = |f: &mut kir::Builder, id: NodeId, k: usize, value: kir::Expr| {
        if q.quads_out.contains(&id) {
            let g = f.global(at(id).0);
            let index = stored(f, k);
            f.store(g, index, value);
        }
    };
    // Each activation's definition over four lanes, substituted into every accumulator's.
    let definitions: Vec<Option<kir::Function>> = q
        .chain
        .iter()
        .map(|&id| {
            (!matches!(graph.node(id).op, Op::BiasAdd { .. })).then(|| {
                crate::compute::element(
                    graph,
                    id,
                    Some(kir::Ty::VEC4_F32),
                    &[kir::Ty::VEC4_F32],
                    false,
                )
            })
        })
        .collect();
    let mut tops = Vec::new();
    for (k, &acc) in accs.iter().enumerate() {
        let mut value = acc;
        store(f, q.conv, k, value);
        for (step, (&id, definition)) in q.chain.iter().zip(&definitions).enumerate() {
            let formula = match definition {
                None => {
                    let b = bias(f, graph.node(id).inputs[1]);
                    f.add(value, b)
                }
                Some(definition) => f.substitute(definition, &[value]).unwrap_or_else(|| {
                    unreachable!("{} is not in a quad chain", graph.node(id).op.name())
                }),
            };
            value = f.let_(&format!("e{k}_{step}"), kir::Ty::VEC4_F32, formula);
            store(f, id, k, value);
        }
        tops.push(value);
    }
    let Some(pool) = q.pool else {
        return;
    };
    // Window p of the two rows: columns 2p, 2p + 1 of rows 0 and 1, in the reference's order.
    let value = |f: &mut kir::Builder, r: usize, col: usize| {
        let k = r * columns + col;
        let l = f.u32(k % 4);
        f.lane(tops[k / 4], l)
    };
    let out = f.global(at(q.out).0);
    for p in 0..columns / 2 {
        let taps = [
            value(f, 0, 2 * p),
            value(f, 0, 2 * p + 1),
            value(f, 1, 2 * p),
            value(f, 1, 2 * p + 1),
        ];
        let result = if matches!(graph.node(pool).op, Op::AvgPool2d { .. }) {
            let s = f.add(taps[0], taps[1]);
            let s = f.add(s, taps[2]);
            let s = f.add(s, taps[3]);
            let four = f.f32(4.0);
            f.div(s, four)
        } else {
            // Keep the first maximum; NaN wins, as in the reference.
            let best = f.var(&format!("best{p}"), kir::Ty::F32, taps[0]);
            for &t in &taps[1..] {
                let b = f.get(best);
                let takes = crate::compute::first_max_takes(f, b, t, kir::BinOp::BitAnd);
                let picked = f.select(takes, t, b);
                f.assign(best, picked);
            }
            f.get(best)
        };
        let base = pooled(f);
        let pu = f.u32(p);
        let index = f.add(base, pu);
        f.store(out, index, result);
    }
}
