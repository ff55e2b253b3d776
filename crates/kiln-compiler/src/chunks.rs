//! Image chunks: a kernel whose every output image needs only the same image of its batched
//! operands runs as several dispatches of a few images each, and reads those operands through
//! uniform-buffer windows over the images of its chunk.
//!
//! Why: on lavapipe (Mesa 22.3) every storage-buffer or workgroup-memory load is a loop over
//! the eight SIMD lanes with a bounds check per lane, about 0.25 G loads/s on the 2-core CI
//! machine, while a uniform-buffer load is one vector gather: 2 G/s scalar, 3 G/s as `vec4`
//! (measured with a micro-benchmark of each kind of load; textures 0.5 G/s). A uniform binding
//! holds at most 64 KiB, a few images of an activation, so the batch is cut into chunks that
//! fit. Only CPU-class targets use this: on GPUs a divergent uniform read serialises in the
//! constant cache.
//!
//! The kernel keeps its global index arithmetic. Each chunk's dispatch gets a small uniform
//! table with its first and last invocation and, per window, the flat index of the window's
//! first element, which the element functions subtract. The compiler computes the tables and
//! window offsets ([`Chunks::entry`], laid out as buffers and bindings by `launch.rs`); the
//! runtime only binds and dispatches.
//!
//! A chunk takes as many images as its windows allow, spread evenly, the last taking the rest
//! (e.g. 13 chunks of 20 images and one of 16 rather than 16 of 16): a dispatch costs ~20 us
//! on lavapipe and a small one leaves its threads waiting. Against chunks that divide the
//! batch (conv1's activation and weight gradients had 128 chunks of 2 images, now 86 of 3),
//! bench training went 2,000-2,200 -> 2,150-2,400 examples/s (three alternating runs each).
//!
//! Measured on lavapipe (`--profile`, batch 256, same machine): conv2's forward kernel 82 ->
//! 27 ms per step, its weight gradient (summing chunks) 130 -> 27 ms, the whole step 510 ->
//! 240 ms with these two alone.

use kiln_ir::{DType, Graph, NodeId, Op, OpPattern};

use crate::kir::{self, module::Item};
use crate::text::chunk_part;

/// The bindings of one span (several chunks per dispatch: `spans.rs`): its windows (in
/// [`Chunks::windows`] order), its chunk range
/// (storage) and its windows' bases (uniform).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub windows: Vec<u32>,
    pub table: u32,
    pub bases: u32,
}

/// A kernel split into dispatches of `images` images each (the last may have fewer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunks {
    /// Dispatches (batch / images, rounded up).
    pub count: usize,
    pub images: usize,
    /// Images in the batch.
    pub batch: usize,
    /// Invocations per dispatch (the last image chunk's may be fewer).
    pub invocations: usize,
    /// The binding of the chunk's range (`var<storage, read> chunk: array<vec4<u32>, 1>`); the
    /// next binding holds its windows' base indices (`var<uniform> bases`).
    ///
    /// The range decides branches and loop bounds, so it is read-only storage: Mesa's lavapipe
    /// before 23.1 corrupts its heap compiling a shader whose control flow reads a uniform
    /// binding at a constant offset (`uniform_control.rs`). The bases only enter index
    /// arithmetic and stay uniform: they are read in the innermost loops, where a storage
    /// load cost conv1's forward and weight-gradient kernels about 50% on lavapipe.
    pub table_binding: u32,
    /// `vec4<u32>` entries of a chunk's table: `(first invocation, end invocation, first
    /// image, end image)`, then the windows' base indices four to an entry (the bases).
    pub table_vec4s: usize,
    pub windows: Vec<Window>,
    /// Alignment of a uniform binding's offset (the windows), in bytes.
    pub alignment: u64,
    /// Alignment of a storage binding's offset (the ranges), in bytes.
    pub table_alignment: u64,
    /// Reductions over the batch carried from chunk to chunk (weight gradients): every
    /// dispatch runs all invocations over its own images and adds the sums so far; the last
    /// one runs the epilogue. Empty for image chunks, whose dispatches split the invocations.
    pub sums: Vec<Sum>,
    /// The chunks one dispatch runs, in order, each reading its own windows and table
    /// (`spans.rs`); the first uses `windows` and `table_binding`. Dispatch `d` runs
    /// chunks `d * spans.len() ..`; a span past the last chunk gets an all-zero table.
    pub spans: Vec<Span>,
}

/// The running sum of one reduction over the batch, a zeroed storage buffer of the kernel's
/// launch (`launch.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sum {
    pub binding: u32,
    pub node: NodeId,
    pub words: usize,
    /// Declared and carried as `vec4`s (a blocked kernel whose lanes are four consecutive
    /// elements at aligned offsets).
    pub quads: bool,
}

/// A batched operand read through a uniform window over the images of a chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub binding: u32,
    /// Index into [`crate::Plan::buffers`].
    pub buffer: usize,
    /// Elements (32-bit words) per image.
    pub image_words: usize,
    /// Declared size of the window, in `vec4`s.
    pub vec4s: usize,
}

/// What chunk `k`'s dispatch binds: its table words and each window's byte offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkEntry {
    pub table: Vec<u32>,
    pub window_offsets: Vec<u64>,
}

impl Chunks {
    /// Bytes a buffer read through this kernel's windows must be allocated past its data.
    /// A window starts at the aligned offset at or below its chunk's first image; for the
    /// last chunk it must also end inside the buffer, and without room past the data no
    /// aligned start both covers the last words and fits (batch 211 of 84 features lost the
    /// last image's last four).
    pub fn window_slack(&self) -> u64 {
        self.alignment
    }

    /// Chunk `k`'s table and window offsets; `buffer_bytes(b)` is what plan buffer `b` holds
    /// at least, its data plus [`Chunks::window_slack`] (windows end inside it). The table's
    /// first entry is `(first invocation, end invocation, first image, end image)`. A window
    /// starts at the aligned offset at or below its chunk's first image, pulled back for the
    /// last chunks so that it ends inside the buffer.
    pub fn entry(&self, k: usize, buffer_bytes: &dyn Fn(usize) -> u64) -> ChunkEntry {
        let images = k * self.images;
        let end_image = (images + self.images).min(self.batch);
        // Image chunks split the invocations in proportion to their images.
        let (first, end) = if self.sums.is_empty() {
            let all = self.invocations * self.batch / self.images;
            (k * self.invocations, ((k + 1) * self.invocations).min(all))
        } else {
            (0, self.invocations)
        };
        let mut table = vec![first as u32, end as u32, images as u32, end_image as u32];
        let mut window_offsets = Vec::new();
        for w in &self.windows {
            let start = (k * self.images * w.image_words * 4) as u64;
            let room = buffer_bytes(w.buffer).saturating_sub((w.vec4s * 16) as u64);
            let offset = start.min(room) / self.alignment * self.alignment;
            window_offsets.push(offset);
            table.push((offset / 4) as u32);
        }
        table.resize(self.table_vec4s * 4, 0);
        ChunkEntry {
            table,
            window_offsets,
        }
    }

    /// Dispatches of the kernel: its chunks, `spans.len()` to a dispatch.
    pub fn dispatches(&self) -> usize {
        self.count.div_ceil(self.spans.len().max(1))
    }

    /// The first binding number after the table and the running sums.
    pub fn next_binding(&self) -> u32 {
        self.table_binding + 2 + self.sums.len() as u32
    }

    /// `vec4<u32>` entries of the window bases binding.
    pub fn bases_vec4s(&self) -> usize {
        self.table_vec4s - 1
    }

    /// Where a table's bases start in its slot of the table buffer: its range comes first,
    /// and each part's offset meets its binding's alignment.
    pub(crate) fn bases_offset(&self) -> u64 {
        self.alignment.max(self.table_alignment).max(16)
    }

    /// Bytes between two chunks' tables in the table buffer.
    pub(crate) fn table_stride(&self) -> u64 {
        let a = self.bases_offset();
        a + ((self.bases_vec4s() * 16) as u64).div_ceil(a) * a
    }
}

/// Whether output image `n` of `node` needs only image `n` of its operand `k` (both batched).
fn image_local(graph: &Graph, node: NodeId, k: usize) -> bool {
    let n = graph.node(node);
    let out = &n.ty.shape;
    let input = &graph.ty(n.inputs[k]).shape;
    let same_batch = !out.is_empty() && !input.is_empty() && out[0] == input[0];
    same_batch
        && match n.op.pattern() {
            OpPattern::Elementwise => input == out,
            OpPattern::Broadcast => k == 0,
            OpPattern::Window => true,
            // A gather's rows come from its indices (see `batched`); a broadcast spreads a
            // value over the axes it adds, the batch's among them.
            OpPattern::Injective => matches!(n.op, Op::Reshape { .. }),
            // Softmax's gradient works row by row (one image a row); the other reductions
            // sum over images.
            OpPattern::Reduction => matches!(n.op, Op::SoftmaxCrossEntropyGrad),
            OpPattern::Anchor => match &n.op {
                Op::Conv2d { .. } | Op::Conv2dGradInput { .. } => k == 0,
                Op::MatMul { transpose_a, .. } => k == 0 && !transpose_a,
                _ => false,
            },
            OpPattern::Leaf | OpPattern::Constant => false,
        }
}

/// Per node: whether it is batched with `batch` images, i.e. follows from a batch-sized input
/// through image-local ops only (a weight whose first axis happens to equal the batch is not).
pub(crate) fn batched(graph: &Graph, batch: usize) -> Vec<bool> {
    let mut b = vec![false; graph.nodes().len()];
    for (idx, node) in graph.nodes().iter().enumerate() {
        let id = NodeId(idx);
        b[idx] = match &node.op {
            Op::Input { .. } => node.ty.shape.first() == Some(&batch),
            // A batch gathered from a data set on the device: batched by its indices.
            Op::Gather => b[node.inputs[1].0] && node.ty.shape.first() == Some(&batch),
            _ => {
                node.ty.shape.first() == Some(&batch)
                    && node
                        .inputs
                        .iter()
                        .enumerate()
                        .any(|(k, i)| b[i.0] && image_local(graph, id, k))
            }
        };
    }
    b
}

/// Whether a kernel computing `nodes` (root `root`) computes each image of its root from the
/// same image of every batched value it touches, so that it can run image chunk by chunk.
pub(crate) fn kernel_is_image_local(
    graph: &Graph,
    nodes: &[NodeId],
    root: NodeId,
    batched: &[bool],
) -> bool {
    batched[root.0]
        && nodes.iter().all(|&n| {
            graph
                .node(n)
                .inputs
                .iter()
                .enumerate()
                .all(|(k, i)| !batched[i.0] || (batched[n.0] && image_local(graph, n, k)))
        })
}

/// Whether `node` sums its operand `k` over the batch (a weight or bias gradient).
fn sums_batch(graph: &Graph, node: NodeId, k: usize) -> bool {
    let n = graph.node(node);
    match &n.op {
        Op::Conv2dGradWeight { .. } => k < 2,
        Op::MatMul {
            transpose_a: true,
            transpose_b: false,
        } => true,
        Op::ReduceSum { axes } => axes.first() == Some(&0),
        _ => false,
    }
}

/// Same flat index, elementwise: whether `from`'s element `i` is computed from element `i`
/// of `to` through ops of `nodes` that keep the index.
pub(crate) fn elementwise_path(graph: &Graph, nodes: &[NodeId], from: NodeId, to: NodeId) -> bool {
    if from == to {
        return true;
    }
    let node = graph.node(from);
    let keeps_index = (node.op.is_elementwise() && node.op != Op::ScaleU8)
        || matches!(node.op, Op::Reshape { .. });
    nodes.contains(&from)
        && keeps_index
        && node.ty.numel() == graph.ty(to).numel()
        && node
            .inputs
            .iter()
            .any(|&i| elementwise_path(graph, nodes, i, to))
}

/// For a kernel whose roots are not batched: its reductions over the batch, each with the
/// root that reaches it elementwise, when every batched value the kernel touches is either
/// image-local or summed by one of them; `None` otherwise (or when there are none).
pub(crate) fn batch_sums(
    graph: &Graph,
    nodes: &[NodeId],
    roots: &[NodeId],
    batched: &[bool],
) -> Option<Vec<(NodeId, NodeId)>> {
    if roots.iter().any(|r| batched[r.0]) {
        return None;
    }
    let mut sums = Vec::new();
    for &n in nodes {
        for (k, i) in graph.node(n).inputs.iter().enumerate() {
            if !batched[i.0] {
                continue;
            }
            if batched[n.0] && image_local(graph, n, k) {
                continue;
            }
            if batched[n.0] || !sums_batch(graph, n, k) {
                return None;
            }
            if !sums.iter().any(|(s, _)| *s == n) {
                let root = roots
                    .iter()
                    .find(|&&r| elementwise_path(graph, nodes, r, n))?;
                sums.push((n, *root));
            }
        }
    }
    (!sums.is_empty()).then_some(sums)
}

/// The forms in which a kernel computes a reduction summed chunk by chunk, each a chunk part
/// ([`chunk_part`]) whose plain name must load the finished sums instead.
#[derive(Clone, Debug, Default)]
pub(crate) struct SummedForms {
    /// Its scalar function `v<red>`.
    pub scalar: bool,
    /// Its lane functions, by stride (`blocking::lane_fn`), in the order they were made.
    pub lanes: Vec<usize>,
    /// Its rows function (`v<red>_rows_of_reduction`): the flat offset from `i` of every
    /// accumulator's lanes, four to an accumulator.
    pub rows: Option<Vec<usize>>,
}

/// The functions loading the finished sums of reduction `red` under the names of its forms
/// (`sum<red>`, declared as `vec4`s with `quads`: [`Sum::quads`]). A scalar is an element
/// (a lane of a `vec4`), four consecutive lanes at an aligned offset are one `vec4`.
pub(crate) fn sum_loaders(red: NodeId, forms: &SummedForms, quads: bool) -> Vec<Item> {
    let v = format!("v{}", red.0);
    let global = sum_global(red, quads);
    // Element `i + off` of the sums.
    let at = |f: &mut kir::Builder, g: usize, off: usize| -> kir::Expr {
        let i = f.index();
        let index = if off == 0 {
            i
        } else {
            let o = f.u32(off);
            f.add(i, o)
        };
        if quads {
            let (two, three) = (f.u32(2), f.u32(3));
            let q = f.bin(kir::BinOp::ShiftRight, index, two);
            let quad = f.load(g, q);
            let l = f.bin(kir::BinOp::BitAnd, index, three);
            f.lane(quad, l)
        } else {
            f.load(g, index)
        }
    };
    let item = |name: String, f: kir::Builder| Item::Function {
        name,
        comment: None,
        function: f.finish(),
        callees: Vec::new(),
    };
    let mut items = Vec::new();
    if forms.scalar {
        let mut f = kir::Builder::new(kir::Ty::F32, Vec::new());
        let g = f.global(global.clone());
        let value = at(&mut f, g, 0);
        f.ret_(value);
        items.push(item(v.clone(), f));
    }
    for &stride in &forms.lanes {
        let mut f = kir::Builder::new(kir::Ty::VEC4_F32, Vec::new());
        let g = f.global(global.clone());
        let value = if quads && stride == 1 {
            let i = f.index();
            let two = f.u32(2);
            let q = f.bin(kir::BinOp::ShiftRight, i, two);
            f.load(g, q)
        } else {
            let lanes = [0, 1, 2, 3].map(|k| at(&mut f, g, k * stride));
            f.compose(lanes)
        };
        f.ret_(value);
        items.push(item(format!("{v}_x4s{stride}"), f));
    }
    if let Some(offsets) = &forms.rows {
        let n = offsets.len().div_ceil(4);
        let ret = kir::Ty::array(kir::Ty::VEC4_F32, n as u32).expect("one deep");
        let mut f = kir::Builder::new(ret, Vec::new());
        let g = f.global(global.clone());
        let rows: Vec<kir::Expr> = offsets
            .chunks(4)
            .map(|lanes| {
                if quads {
                    let i = f.index();
                    let index = if lanes[0] == 0 {
                        i
                    } else {
                        let d = f.u32(lanes[0]);
                        f.add(i, d)
                    };
                    let two = f.u32(2);
                    let q = f.bin(kir::BinOp::ShiftRight, index, two);
                    return f.load(g, q);
                }
                let l = [0, 1, 2, 3].map(|k| at(&mut f, g, lanes[k]));
                f.compose(l)
            })
            .collect();
        let value = f.array(rows);
        f.ret_(value);
        items.push(item(format!("{v}_rows_of_reduction"), f));
    }
    items
}

/// The running sums of reduction `red`: `sum<red>`, as `vec4`s with `quads`.
pub(crate) fn sum_global(red: NodeId, quads: bool) -> kir::Global {
    kir::Global {
        name: format!("sum{}", red.0),
        space: kir::Space::Storage { read_only: false },
        elem: if quads {
            kir::Ty::VEC4_F32
        } else {
            kir::Ty::F32
        },
    }
}

/// Entry-point statements (in a block of their own) that compute reduction `red`'s chunk
/// part `value` (of type `ty`, at flat index `base`) into var `name`, add the running sum
/// after the first chunk and store it: `stores` are the offsets from `base` and the parts of
/// the var they hold. With `quads` the sum is declared as `vec4`s ([`Sum::quads`]) and
/// `stores` are `vec4` parts at offsets in fours: one load and one store each instead of
/// four (lavapipe stores 1.3 G floats/s as `vec4`s, 0.4-0.5 G/s one at a time).
pub(crate) fn running_sum(
    f: &mut kir::Builder,
    red: NodeId,
    (name, ty, value): (&str, kir::Ty, kir::Expr),
    base: kir::Expr,
    stores: &[(usize, kir::Part)],
    quads: bool,
) {
    let g = f.global(sum_global(red, quads));
    let at = |f: &mut kir::Builder, off: usize| {
        let index = if off == 0 {
            base
        } else {
            let d = f.u32(off);
            f.add(base, d)
        };
        if quads {
            let two = f.u32(2);
            f.bin(kir::BinOp::ShiftRight, index, two)
        } else {
            index
        }
    };
    f.scope(|f| {
        let var = f.var(name, ty, value);
        let first = f.chunk(kir::ChunkBound::FirstImage);
        let zero = f.u32(0);
        let later = f.bin(kir::BinOp::Ne, first, zero);
        f.if_(later, |f| {
            for &(off, part) in stores {
                let index = at(f, off);
                let sum = f.load(g, index);
                f.update_part(var, part, Some(kir::BinOp::Add), sum);
            }
        });
        for &(off, part) in stores {
            let index = at(f, off);
            let whole = f.get(var);
            let v = f.part(whole, part);
            f.store(g, index, v);
        }
    });
}

/// [`running_sum`] of element `index` (an invocation variable) of reduction `red`, its chunk
/// part `value`, for the invocations below `numel` (a second root, like a bias, smaller than
/// the main one).
pub(crate) fn element_running_sum(
    f: &mut kir::Builder,
    red: NodeId,
    index: kir::Expr,
    value: kir::Expr,
    numel: usize,
) {
    let n = f.u32(numel);
    let inside = f.bin(kir::BinOp::Lt, index, n);
    f.if_(inside, |f| {
        running_sum(
            f,
            red,
            ("part", kir::Ty::F32, value),
            index,
            &[(0, kir::Part::WHOLE)],
            false,
        );
    });
}

/// The kernel-column schedule of an unblocked summing kernel whose main root is (elementwise)
/// a stride-1 convolution weight gradient `red`: one invocation per `(o, c, ky)` computes all
/// `KW` kernel columns, sliding a window of `KW` input pixels along each input row so that
/// every step loads one pixel and one output gradient for `KW` multiply-adds (instead of two
/// loads per multiply-add). Returns `KW`, or `None` where it does not apply.
pub(crate) fn kernel_columns(graph: &Graph, red: NodeId) -> Option<usize> {
    let node = graph.node(red);
    match &node.op {
        Op::Conv2dGradWeight {
            stride, padding, ..
        } if *stride == [1, 1] => {
            let kw = node.ty.shape[3];
            // The columns run every output column, pixels in the padding zero: each kernel
            // column must have an output whose tap lands in the row (`held_columns`).
            let (w, ow) = (
                graph.ty(node.inputs[0]).shape[3],
                graph.ty(node.inputs[1]).shape[3],
            );
            let lands = crate::compute::every_tap_lands(padding[1], w, ow, kw);
            ((2..=8).contains(&kw) && lands).then_some(kw)
        }
        _ => None,
    }
}

/// How [`kernel_columns_fn`] reads its operands.
pub(crate) enum ColumnLoads {
    /// One element at a time, through the operands' element functions (`x`, `dy`).
    Scalar { x: String, dy: String },
    /// Four consecutive elements at a time from uniform bindings whose rows (input and output
    /// gradient) are whole `vec4`s: each operand's binding and the chunk window it is read
    /// through, if any.
    Vec4 {
        x: (u32, Option<usize>),
        dy: (u32, Option<usize>),
    },
}

/// Whether weight gradient `red`'s kernel columns can read whole `vec4`s: the input and output
/// gradient rows are both in fours (so every row starts at a multiple of four).
pub(crate) fn columns_in_vec4s(graph: &Graph, red: NodeId) -> bool {
    let node = graph.node(red);
    let w = graph.ty(node.inputs[0]).shape[3];
    let ow = graph.ty(node.inputs[1]).shape[3];
    w % 4 == 0 && ow % 4 == 0
}

/// `fn v<red>_columns_chunk(i) -> array<f32, KW>`: the `KW` kernel columns of weight-gradient
/// `red` starting at flat index `i` (`kx = 0`), summed over the current chunk's images.
///
/// With [`ColumnLoads::Vec4`] each step covers four output columns: one `dy` `vec4` and one
/// new pixel `vec4` (the window of pixel `vec4`s slides along the row), `4 * KW`
/// multiply-adds for two loads, where scalar steps do `KW` for two (lavapipe: a `vec4` load
/// costs about 1.5 scalar ones).
pub(crate) fn kernel_columns_fn(graph: &Graph, red: NodeId, loads: ColumnLoads) -> Item {
    let name = chunk_part(&format!("v{}_columns", red.0));
    let (function, callees) = match loads {
        ColumnLoads::Scalar { x, dy } => (
            held_columns(graph, red),
            vec![kir::wgsl::Callee::Call(x), kir::wgsl::Callee::Call(dy)],
        ),
        ColumnLoads::Vec4 { x, dy } => (quad_columns(graph, red, x, dy), Vec::new()),
    };
    Item::Function {
        name,
        comment: None,
        function,
        callees,
    }
}

/// The weight gradient's definition over the chunk's images held along its kernel columns
/// (`kir::unroll`), each pixel read once per step for all of them (`kir::slide`). Where the
/// input is padded, the loop over output columns is clipped per kernel column (to the outputs
/// whose tap lands inside the input); it runs over every output column instead, pixels in the
/// padding zero (`kir::widen`).
fn held_columns(graph: &Graph, red: NodeId) -> kir::Function {
    use kir::unroll::{HeldAxis, UnrollError, unroll};
    let definition = crate::compute::scalar_element(graph, red, true);
    let kw = graph.ty(red).shape[3];
    let axis = HeldAxis {
        stride: 1,
        extent: kw,
    };
    let copies: Vec<Vec<usize>> = (0..kw).map(|k| vec![k]).collect();
    let held = match unroll(&definition, &[axis], &copies) {
        Err(UnrollError::LoopBounds(name)) => kir::widen::widen(&definition, &name, 0)
            .map_err(|e| e.to_string())
            .and_then(|wide| unroll(&wide, &[axis], &copies).map_err(|e| e.to_string())),
        held => held.map_err(|e| e.to_string()),
    }
    .expect("a stride-1 weight gradient's definition holds along its kernel columns");
    kir::slide::slide(&held)
        .expect("held kernel columns are valid kernel IR")
        .0
}

/// [`ColumnLoads::Vec4`]'s body: four output columns per step, pixel `vec4`s sliding along
/// the row.
fn quad_columns(
    graph: &Graph,
    red: NodeId,
    (xs, xw): (u32, Option<usize>),
    (ds, dw): (u32, Option<usize>),
) -> kir::Function {
    use crate::conv_quads::{quad_blocks, quad_taps, row_quad, uniform_index};
    use kir::{BinOp, Literal, Scalar, Ty};
    let node = graph.node(red);
    let Op::Conv2dGradWeight { padding, .. } = &node.op else {
        unreachable!("kernel columns are a conv weight gradient's")
    };
    let [_, c, h, w] = crate::compute::rank4(&graph.ty(node.inputs[0]).shape);
    let [_, o, oh, ow] = crate::compute::rank4(&graph.ty(node.inputs[1]).shape);
    let kw = node.ty.shape[3];
    let ret = Ty::array(Ty::F32, kw as u32).expect("one deep");
    let mut f = kir::Builder::new(ret, Vec::new());
    let i = f.index();
    let [oc, cc, ky, _] =
        crate::compute::coords4(&mut f, i, ["o", "c", "ky", "kx"], &node.ty.shape);
    let (oy_lo, oy_end) = crate::compute::valid_outputs(&mut f, "oy", ky, padding[0], h, oh);
    let accs: Vec<kir::Local> = (0..kw)
        .map(|k| {
            let z = f.f32(0.0);
            f.var(&format!("acc{k}"), Ty::F32, z)
        })
        .collect();
    let (first, end) = crate::compute::batch_range(&mut f, 0, true);
    let px = padding[1] as i64;
    let ilit = |f: &mut kir::Builder, v: i64| f.lit(Literal::I32(v as i32));
    f.for_("n", first, end, |f, n| {
        f.for_("oy", oy_lo, oy_end, |f, oy| {
            let row =
                crate::conv_quads::weight_gradient_row(f, (n, cc, oy, ky), (c, h, w), padding[0]);
            let row = f.let_("row", Ty::U32, row);
            let drow = f.flat(&[n, oc, oy], &[0, o, oh]);
            let oww = f.u32(ow);
            let drow = f.mul(drow, oww);
            let drow = f.let_("drow", Ty::U32, drow);
            // A step at output column `4 * q` needs pixel vec4s `q + lo ..= q + hi`
            // of the row (zero outside it), held in `p0 ..= p{hi - lo}`; each step
            // loads the last.
            let (lo, hi) = quad_blocks(kw, px);
            let blocks = (hi - lo + 1) as usize;
            let xg = f.global(crate::conv_quads::uniform_quads(xs));
            let dg = f.global(crate::conv_quads::uniform_quads(ds));
            let xq = uniform_index(f, row, xw);
            let two = f.u32(2);
            let xq = f.bin(BinOp::ShiftRight, xq, two);
            let xq = f.let_("xq", Ty::U32, xq);
            let dq = uniform_index(f, drow, dw);
            let dq = f.bin(BinOp::ShiftRight, dq, two);
            let dq = f.let_("dq", Ty::U32, dq);
            let window: Vec<kir::Local> = (0..blocks - 1)
                .map(|b| {
                    let at = ilit(f, lo + b as i64);
                    let quad = row_quad(f, (xg, xq), at, w / 4, None);
                    f.var(&format!("p{b}"), Ty::VEC4_F32, quad)
                })
                .collect();
            let (z, qn) = (f.u32(0), f.u32(ow / 4));
            f.for_("q", z, qn, |f, q| {
                let qi = f.cast(Scalar::I32, q);
                let h = ilit(f, hi);
                let last = f.add(qi, h);
                let last = f.let_("last", Ty::I32, last);
                let newest = row_quad(f, (xg, xq), last, w / 4, None);
                let newest = f.let_(&format!("p{}", blocks - 1), Ty::VEC4_F32, newest);
                let at = f.add(dq, q);
                let d = f.load(dg, at);
                let d = f.let_("d", Ty::VEC4_F32, d);
                let blocks_now: Vec<kir::Expr> = (0..blocks)
                    .map(|b| {
                        if b == blocks - 1 {
                            newest
                        } else {
                            f.get(window[b])
                        }
                    })
                    .collect();
                for (k, &acc) in accs.iter().enumerate() {
                    let taps = quad_taps(f, &blocks_now, k, px, lo);
                    let t = f.math(kir::MathFn::Dot, &[taps, d]);
                    f.add_assign(acc, t);
                }
                for b in 0..blocks - 1 {
                    f.assign(window[b], blocks_now[b + 1]);
                }
            });
        });
    });
    let values: Vec<kir::Expr> = accs.iter().map(|&a| f.get(a)).collect();
    let all = f.array(values);
    f.ret_(all);
    f.finish()
}

/// Whether `id` can be read through a window: batched f32 words.
pub(crate) fn windowable(graph: &Graph, id: NodeId, batched: &[bool]) -> bool {
    batched[id.0] && graph.ty(id).dtype == DType::F32
}

/// Images per chunk (a multiple of `per_invocation`, which divides `batch`) for the fewest
/// chunks whose windows, `image_words` per image plus the alignment slack, fit in
/// `max_bytes`, spread evenly (the last chunk takes the rest); `None` when not even
/// `per_invocation` images fit. Each dispatch costs ~20 us on lavapipe and few images leave
/// its threads idle, so fewer, fuller chunks win.
pub(crate) fn images_per_chunk(
    batch: usize,
    per_invocation: usize,
    image_words: &[usize],
    alignment: u64,
    max_bytes: u64,
) -> Option<usize> {
    let per = per_invocation.max(1);
    let fits = |c: usize| {
        image_words
            .iter()
            .all(|w| window_vec4s(c, *w, alignment) as u64 * 16 <= max_bytes)
    };
    let most = (1..=batch / per)
        .map(|m| m * per)
        .take_while(|&c| fits(c))
        .last()?;
    let count = batch.div_ceil(most);
    Some(batch.div_ceil(count).div_ceil(per) * per)
}

/// `vec4`s of a window over `images` images of `words` words starting anywhere: the images
/// plus the distance back to an aligned offset.
pub(crate) fn window_vec4s(images: usize, words: usize, alignment: u64) -> usize {
    (images * words * 4 + alignment as usize - 4).div_ceil(16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kir::interp::{Env, Lanes, Value, eval};

    /// Finished sums `0, 1, 2, ...` as `f32`s or as `vec4`s of them.
    struct Sums {
        quads: bool,
    }

    impl Env for Sums {
        fn operand(&mut self, k: usize, _: u32) -> Lanes {
            unreachable!("loaders read no operand {k}")
        }
        fn chunk(&self, _: kir::ChunkBound) -> u32 {
            unreachable!("loaders read no chunk range")
        }
        fn load(&mut self, global: &str, index: u32) -> Lanes {
            assert_eq!(global, "sum7");
            let at = |k: u32| Value::F32(k as f32);
            if self.quads {
                Lanes::Vec4([0, 1, 2, 3].map(|l| at(4 * index + l)))
            } else {
                Lanes::Scalar(at(index))
            }
        }
    }

    #[test]
    fn loaders_read_the_finished_sums_of_every_form() {
        let forms = SummedForms {
            scalar: true,
            lanes: vec![1, 3],
            rows: None,
        };
        for quads in [false, true] {
            let items = sum_loaders(NodeId(7), &forms, quads);
            let names: Vec<&str> = items.iter().map(|i| i.function()).map(|f| f.0).collect();
            assert_eq!(names, ["v7", "v7_x4s1", "v7_x4s3"]);
            for item in &items {
                let (name, f, _) = item.function();
                let stride = name
                    .strip_prefix("v7_x4s")
                    .map(|s| s.parse::<u32>().unwrap());
                for i in [0u32, 4, 8, 13] {
                    if quads && stride == Some(1) && i % 4 != 0 {
                        continue;
                    }
                    let got = eval(f, i, &mut Sums { quads }).unwrap().unwrap();
                    let want = match stride {
                        None => Lanes::Scalar(Value::F32(i as f32)),
                        Some(s) => {
                            Lanes::Vec4([0, 1, 2, 3].map(|k| Value::F32((i + k * s) as f32)))
                        }
                    };
                    assert_eq!(got, want, "{name}({i}), quads {quads}");
                }
            }
        }
    }

    #[test]
    fn chunk_sizes_fit_the_window_and_divide_the_batch() {
        // conv2's input: 6x14x14 words per image; 64 KiB windows, 32-byte alignment: 13 fit,
        // 20 chunks of 13 (the last of 9).
        assert_eq!(images_per_chunk(256, 1, &[1176], 32, 65536), Some(13));
        // Blocks of four images per invocation: 12 fit, 22 chunks of 12 (the last of 4).
        assert_eq!(images_per_chunk(256, 4, &[1176], 32, 65536), Some(12));
        // conv1's input, 28x28: 20 fit, 13 chunks of 20 (the last of 16).
        assert_eq!(images_per_chunk(256, 4, &[784], 32, 65536), Some(20));
        // conv1's activation gradient, 6x28x28: 86 chunks of 3 (the last of 1).
        assert_eq!(images_per_chunk(256, 1, &[4704], 32, 65536), Some(3));
        // 28 images where 13 fit: 10, 10 and 8 rather than 13, 13 and 2.
        assert_eq!(images_per_chunk(28, 1, &[1176], 32, 65536), Some(10));
        // The largest window decides.
        assert_eq!(images_per_chunk(256, 1, &[784, 1176], 32, 65536), Some(13));
        // Not even one image fits.
        assert_eq!(images_per_chunk(256, 1, &[20000], 32, 65536), None);
        assert_eq!(images_per_chunk(12, 4, &[1176], 256, 65536), Some(12));
    }

    #[test]
    fn windows_cover_their_chunk_and_stay_inside_the_buffer() {
        // LeNet's conv2 input at batch 256; a hidden layer of 84 at batch 211 (its last
        // chunk's data ends 16 bytes past an aligned window's reach without the slack).
        for (batch, words, images) in [(256, 1176, 8), (211, 84, 106), (257, 6, 100)] {
            windows_cover(batch, words, images);
        }
    }

    fn windows_cover(batch: usize, words: usize, images: usize) {
        let alignment = 32;
        let c = Chunks {
            count: batch.div_ceil(images),
            images,
            batch,
            invocations: 200,
            table_binding: 3,
            table_vec4s: 2,
            windows: vec![Window {
                binding: 0,
                buffer: 0,
                image_words: words,
                vec4s: window_vec4s(images, words, alignment),
            }],
            alignment,
            table_alignment: alignment,
            sums: Vec::new(),
            spans: Vec::new(),
        };
        let data = (batch * words * 4) as u64;
        let bytes = data + c.window_slack();
        for k in 0..c.count {
            let e = c.entry(k, &|_| bytes);
            let off = e.window_offsets[0];
            let (start, end) = (
                (k * images * words * 4) as u64,
                (((k + 1) * images).min(batch) * words * 4) as u64,
            );
            let at = format!("batch {batch}, {words} words, chunk {k}");
            assert_eq!(off % alignment, 0, "{at}");
            assert!(
                off <= start && end <= off + c.windows[0].vec4s as u64 * 16,
                "{at}: window at {off} misses {start}..{end}"
            );
            assert!(off + c.windows[0].vec4s as u64 * 16 <= bytes, "{at}");
            assert_eq!(e.table[4] as u64 * 4, off);
            let (j, n) = ((k * 200) as u32, (k * images) as u32);
            let all = (200 * batch / images) as u32;
            let last = (n + images as u32).min(batch as u32);
            assert_eq!(e.table[..4], [j, (j + 200).min(all), n, last], "{at}");
            assert_eq!(e.table.len(), 8);
        }
    }

    #[test]
    fn a_shorter_last_chunk_ends_at_the_batch() {
        // conv2 forward: 12 images per chunk, 25 invocations per image; 256 images.
        let words = 1176;
        let alignment = 32;
        let window = Window {
            binding: 0,
            buffer: 0,
            image_words: words,
            vec4s: window_vec4s(12, words, alignment),
        };
        let image_chunks = Chunks {
            count: 22,
            images: 12,
            batch: 256,
            invocations: 300,
            table_binding: 3,
            table_vec4s: 2,
            windows: vec![window.clone()],
            alignment,
            table_alignment: alignment,
            sums: Vec::new(),
            spans: Vec::new(),
        };
        let bytes = (256 * words * 4) as u64;
        let last = image_chunks.entry(21, &|_| bytes);
        assert_eq!(last.table[..4], [6300, 6400, 252, 256]);
        let off = last.window_offsets[0];
        assert!(off <= 252 * 1176 * 4 && off + window.vec4s as u64 * 16 <= bytes);
        // A summing chunk runs every invocation over its own images.
        let summing = Chunks {
            invocations: 120,
            sums: vec![Sum {
                binding: 4,
                node: NodeId(0),
                words: 2400,
                quads: false,
            }],
            ..image_chunks
        };
        assert_eq!(summing.entry(21, &|_| bytes).table[..4], [0, 120, 252, 256]);
        assert_eq!(summing.entry(20, &|_| bytes).table[..4], [0, 120, 240, 252]);
    }
}
