//! Register blocking: four outputs per invocation.
//!
//! A reduction computing one output per invocation loads both operands for every multiply-add.
//! Four outputs that share an operand — four output channels of a convolution share the input
//! pixel, four columns of a matmul share the row, four images share the weight — load it once
//! per four multiply-adds and give the driver `vec4` arithmetic. On lavapipe, where every
//! storage load is a bounds-checked per-lane gather, this is the largest single lever
//! (measured 10-20x for a dense layer with wider blocks); on GPUs it is the usual
//! register tiling.
//!
//! A blocked kernel evaluates `v<id>_x4s<s>(i) -> vec4<f32>`: the elements `i`, `i + s`,
//! `i + 2s` and `i + 3s` of node `id`. The invariant every caller keeps: the four lanes are
//! elements of the node, and when `s` is the stride of an axis whose size is a multiple of
//! four, they are four consecutive coordinates of that axis starting at a multiple of four. Which
//! operands an op reads in lanes (with their own strides) and which the lanes share (a plain
//! scalar call) is read off the op's definition (`kir::unroll::lane_reads`: an operand whose
//! index does not depend on the lane's coordinate is shared); an op whose definition cannot
//! compute lanes that way (a condition on the lane's coordinate, unevenly spaced reads), and a
//! plain reduction, whose lanes share no load, falls back to four scalar evaluations. That is
//! always correct, so blocking never changes what a kernel computes, only how many loads it
//! makes.
//!
//! Where the kernel's reduction reaches the root through elementwise ops and reshapes only
//! (or through one pooling over images and channels, as in conv + bias + activation + pool), a
//! second axis is blocked too ([`Rows`]): up to eight rows of four lanes per invocation, the
//! rows sharing the lanes' operand (a matmul's rows share each column block of weights, a
//! convolution's channels share each pixel or its images each weight, a conv input gradient's
//! channels and a weight gradient's kernel columns share each `dy` load). The reduction keeps
//! one `vec4` accumulator per row and each row's epilogue runs on its own lanes. The rows are
//! the reduction's lane definition held along the rows' axis (`kir::unroll`: what does not
//! depend on the row, the lanes' shared load among it, is done once), then any window of
//! reads that slides along a loop kept in registers (`kir::slide`), and a matrix bound in
//! uniform parts read from the part each step's row lies in (`kir::parts`). A loop whose
//! bounds differ per row (an input gradient's kernel columns, clipped to the taps whose `dy`
//! exists) runs its whole range first, `dy` read as zero outside (`kir::widen`); a tap that
//! skips the padding per copy (`continue`) reads zero there instead
//! (`kir::widen::predicate`). No body is written out here.
//! Measured on
//! lavapipe (`--profile`, batch 256, same machine and hour, A/B against the lanes-only build):
//! conv2's input gradient 295 -> 69 ms, its weight gradient 323 -> 151 ms, fc1 forward 62 ->
//! 24 ms, conv1 forward 155 -> 41 ms; the whole step 1,480 -> 625 ms. Under a pooling at
//! most four rows: each row is evaluated once per window tap, and eight made the unrolled
//! forward kernels cost lavapipe's JIT enough to push the cold start from 7 s to 11 s.
//!
//! On CPU-class targets a kernel with no load to share (an activation gradient upsampled
//! through a pooling) takes four consecutive elements of its innermost axis instead (of an
//! image, where rows are not in fours): its aligned uniform reads become one `vec4` load each
//! and a tiling average pool's gradient loads one value per window, not per column (conv1's
//! activation gradient 11.4 -> 7.7 ms per step on lavapipe; storing its outputs a `vec4` at a
//! time, `Schedule::vec4_out` in schedule.rs, then took it to ~5 ms).
//!
//! Two rows bodies reuse loads along the input row. A stride-1 convolution under a 2x2 pooling
//! of stride 2 computes the window's four taps in one pass ([`LaneFns::rows_fn`] via
//! `pool_taps`: its definition, taps in the padding predicated, held along the window's two
//! axes and the rows'): the taps share every weight load, and the two pixel columns a step
//! needs slide along the input rows (conv2 forward 26 -> 15 ms per step on lavapipe, with
//! less code for the JIT). Rows over images whose convolution reads a chunk's uniform window
//! take no more images than the window holds (`LaneFns::max_image_rows`): VGG's second
//! convolution (8 channels at 28x28) would need 100 KB for four, and read its pixels from
//! storage instead. A stride-1 weight gradient's rows over kernel columns read pixels `ox + k`:
//! one step later row `k`'s pixel is row `k + 1`'s, so one load per step feeds all rows (the
//! held definition slid along `ox` by `kir::slide`).
//!
//! CPU-class targets take a second rows axis ([`Rows::inner`]) where it shares loads: a
//! stride-1 input gradient computes two adjacent columns per row, one `dy` load per step
//! feeding both (its widened definition held along both axes and slid along the row: each
//! column's zero-padded `dy` is the other's one step later; conv2's input gradient 28 ->
//! 21.5 ms per step on lavapipe). On lavapipe every load is a per-lane gather while spilled accumulators are
//! cheap stack traffic, so more accumulators per invocation win even with few invocations,
//! up to what the driver's JIT can afford at the first dispatch (a weight gradient with 25
//! accumulators was 17% faster and cost 3.7 s of cold start).

use std::collections::BTreeSet;

use kiln_ir::{DType, Graph, NodeId, Op, OpPattern};

use crate::compute;
use crate::kir::parts::{IndexFacts, Parts, gcd, read_parts, reads_operand};
use crate::kir::slide::slide;
use crate::kir::unroll::{HeldAxis, UnrollError, lane_reads, unroll};
use crate::kir::widen::{predicate, widen};
use crate::kir::{self, module::Item, wgsl::Callee};
use crate::plan::{Kernel, Placement, Plan};
use crate::text::{Operand as Read, UniformAt, chunk_part, definition_over, strides, v};

/// Outputs per invocation of a blocked kernel (the lanes of a `vec4`).
pub const LANES: usize = 4;

/// How a blocked kernel splits its root's flat index space: four coordinates of a virtual axis
/// of `extent` elements at `stride` per invocation. Lanes are four consecutive coordinates of
/// the axis, or (`quarter`) one in each quarter of it: lane `k` at coordinate `c + k * extent /
/// 4`, so that `stride` is the axis's own stride times `extent / 4`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocking {
    pub stride: usize,
    pub extent: usize,
    pub quarter: bool,
}

impl Blocking {
    /// The axis's own flat stride (one coordinate to the next).
    pub fn base(&self) -> usize {
        if self.quarter {
            self.stride * LANES / self.extent
        } else {
            self.stride
        }
    }

    /// Flat length of the whole axis.
    pub fn span(&self) -> usize {
        self.extent * self.base()
    }
}

/// The lane functions of one kernel, generated on demand from the root down.
pub struct LaneFns<'a> {
    graph: &'a Graph,
    plan: &'a Plan,
    kernel: &'a Kernel,
    binding_of: &'a dyn Fn(usize) -> u32,
    uniform_at: UniformAt<'a>,
    done: BTreeSet<(NodeId, usize)>,
    /// The lane and rows functions made so far, in order.
    items: Vec<Item>,
    /// Multiply-adds per output done by reductions with a blocked rule: what choosing a
    /// blocking maximises.
    pub blocked_work: usize,
    /// The reductions with a blocked rule, for the kernel's header.
    pub blocked: Vec<String>,
    /// Reductions over the batch that sum only the images of the kernel's current chunk.
    pub chunked: Vec<NodeId>,
    /// Whether a blocked reduction shares an operand between its lanes (a convolution or a
    /// matmul: one load for four outputs), as opposed to only vectorising (poolings).
    pub shares_loads: bool,
    /// Whether rows may take a second axis ([`Rows::inner`]); set for CPU-class targets.
    pub inner_rows: bool,
    /// The most images rows over the images may take where their reduction reads a chunk's
    /// window: what the windows hold (more would leave the kernel reading from storage).
    pub max_image_rows: usize,
    /// Lanes are four consecutive flat elements starting at a multiple of four, on no axis
    /// (see [`choose`]): every operand read at the root's index is aligned.
    flat: bool,
    /// Lanes may lie one in each quarter of an axis ([`Blocking::quarter`]).
    pub quarter: bool,
    /// A value read from [`crate::Access::Split`] uniform parts: its binding, parts and
    /// words per part.
    split: SplitOf<'a>,
    /// Lane loads that read one split part each (lanes a part apart) instead of every part.
    pub direct_parts: usize,
    /// A value whose lanes the rows being made read from its parts directly
    /// ([`LaneFns::held_rows`]): its lane function is made only if some read is left.
    from_parts: Option<NodeId>,
    /// That value's lane function at its stride, named but not made.
    unmade: Option<(NodeId, usize)>,
    /// The lane functions made of reductions in `chunked`, in order: each is a chunk part
    /// (`chunks::chunk_part`), its plain name left for the loader of the finished sums.
    pub summed_lanes: Vec<(NodeId, usize)>,
}

/// The split uniform parts a value is read from: `(binding, parts, words per part)`.
pub(crate) type SplitOf<'a> = &'a dyn Fn(NodeId) -> Option<(u32, u32, usize)>;

/// A uniform binding of `vec4`s, by its name.
fn uniform_quads(name: String) -> kir::Global {
    kir::Global {
        name,
        space: kir::Space::Uniform,
        elem: kir::Ty::VEC4_F32,
    }
}

pub fn lane_fn(id: NodeId, stride: usize) -> String {
    format!("v{}_x4s{stride}", id.0)
}

/// An operand of a blocked op: four lanes at its own stride, or one value shared by the lanes.
enum Operand {
    Lanes(usize),
    Shared,
}

impl<'a> LaneFns<'a> {
    pub fn new(
        graph: &'a Graph,
        plan: &'a Plan,
        kernel: &'a Kernel,
        binding_of: &'a dyn Fn(usize) -> u32,
        uniform_at: UniformAt<'a>,
        split: SplitOf<'a>,
    ) -> Self {
        LaneFns {
            graph,
            plan,
            kernel,
            binding_of,
            uniform_at,
            split,
            quarter: false,
            direct_parts: 0,
            from_parts: None,
            unmade: None,
            done: BTreeSet::new(),
            items: Vec::new(),
            blocked_work: 0,
            blocked: Vec::new(),
            chunked: Vec::new(),
            shares_loads: false,
            inner_rows: false,
            max_image_rows: usize::MAX,
            flat: false,
            summed_lanes: Vec::new(),
        }
    }

    /// The name of `id`'s lane function at `stride`, generating it (and what it calls) once.
    pub fn request(&mut self, id: NodeId, stride: usize) -> String {
        let name = lane_fn(id, stride);
        if !self.done.insert((id, stride)) {
            return name;
        }
        let computed_here = self.kernel.nodes.contains(&id);
        let body = if computed_here {
            self.rule(id, stride)
        } else {
            None
        };
        if let Some((slot, parts, words)) = (self.split)(id).filter(|_| !computed_here) {
            if parts as usize == LANES && words == stride {
                // Lanes a part apart: lane k reads part k at the same index, one load each
                // instead of one from every part (the four lanes of the value's element
                // function, read through `kir::parts`).
                let mut f = kir::Builder::new(kir::Ty::VEC4_F32, vec![kir::Ty::F32]);
                let i = f.index();
                let lanes = [0, 1, 2, 3].map(|k| {
                    let at = offset_expr(&mut f, i, k * stride);
                    f.operand(0, at)
                });
                let value = f.compose(lanes);
                f.ret_(value);
                let parts = Parts {
                    operand: 0,
                    globals: (0..LANES)
                        .map(|k| uniform_quads(format!("buf{slot}_{k}")))
                        .collect(),
                    words,
                };
                // Lane 3 is an element: the first lane lies in the first part.
                let facts = IndexFacts {
                    len: words as u64,
                    multiple: 1,
                };
                let read = read_parts(&f.finish(), &parts, facts)
                    .ok()
                    .filter(|(read, direct)| *direct == LANES && !reads_operand(read, 0));
                if let Some((read, _)) = read {
                    self.push_function(&name, read, vec![Callee::Call(v(id))]);
                    self.direct_parts += 1;
                    return name;
                }
            }
        }
        if let Some((slot, window)) = self.aligned_uniform(id, stride) {
            // Four consecutive values starting at a multiple of four: one vec4 of the binding
            // (a window starts at a multiple of four too).
            let mut f = kir::Builder::new(kir::Ty::VEC4_F32, Vec::new());
            let g = f.global(uniform_quads(format!("buf{slot}")));
            let mut at = f.index();
            if let Some(w) = window {
                let base = f.window_base(w);
                at = f.sub(at, base);
            }
            let two = f.u32(2);
            let q = f.bin(kir::BinOp::ShiftRight, at, two);
            let value = f.load(g, q);
            f.ret_(value);
            self.push(&name, f, Vec::new());
            return name;
        }
        let saved = matches!(self.plan.placement[id.0], Placement::Side { .. })
            && self.kernel.stores.contains(&id);
        // A reduction summed chunk by chunk computes the chunk's part under its own name.
        let summed = computed_here && self.chunked.contains(&id);
        let (scalar, own) = if summed {
            self.summed_lanes.push((id, stride));
            (chunk_part(&v(id)), chunk_part(&name))
        } else {
            (v(id), name.clone())
        };
        match body {
            Some((definition, callees)) if saved => {
                // Store the four lanes as they are computed, like the scalar saved values.
                let slot = (self.binding_of)(
                    self.plan.buffer_of[id.0].expect("stored nodes have buffers"),
                );
                let value_of = format!("value_of_{name}");
                self.items.push(Item::Function {
                    name: value_of.clone(),
                    comment: None,
                    function: definition,
                    callees,
                });
                let mut f = kir::Builder::new(kir::Ty::VEC4_F32, vec![kir::Ty::VEC4_F32]);
                let i = f.index();
                let value = f.operand(0, i);
                let value = f.let_("value", kir::Ty::VEC4_F32, value);
                store_lanes(&mut f, slot, stride, value);
                f.ret_(value);
                self.push(&own, f, vec![Callee::Call(value_of)]);
            }
            Some((definition, callees)) => {
                self.items.push(Item::Function {
                    name: own,
                    comment: None,
                    function: definition,
                    callees,
                });
            }
            None => {
                // Four scalar evaluations (a saved scalar function stores each lane itself).
                let ty = compute::value_ty(self.graph.ty(id).dtype);
                let mut f = kir::Builder::new(kir::Ty::VEC4_F32, vec![ty]);
                let i = f.index();
                let lanes = [0, 1, 2, 3].map(|k| {
                    let at = if k == 0 {
                        i
                    } else {
                        let d = f.u32(k * stride);
                        f.add(i, d)
                    };
                    f.operand(0, at)
                });
                let value = f.compose(lanes);
                f.ret_(value);
                self.push(&own, f, vec![Callee::Call(scalar)]);
            }
        }
        name
    }

    /// Appends kernel IR function `name`.
    fn push(&mut self, name: &str, f: kir::Builder, callees: Vec<Callee>) {
        self.push_function(name, f.finish(), callees);
    }

    fn push_function(&mut self, name: &str, function: kir::Function, callees: Vec<Callee>) {
        self.items.push(Item::Function {
            name: name.to_string(),
            comment: None,
            function,
            callees,
        });
    }

    /// The lane and rows functions made, in order.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// The binding of `id` when it is read from a uniform buffer and lanes at `stride` are
    /// four consecutive elements starting at a multiple of four, with the chunk window it is
    /// read through, if any.
    fn aligned_uniform(&self, id: NodeId, stride: usize) -> Option<(u32, Option<usize>)> {
        let b = self.plan.buffer_of[id.0]?;
        let shape = &self.graph.ty(id).shape;
        let st = strides(shape);
        let aligned = stride == 1
            && (self.flat || (0..shape.len()).any(|a| st[a] == 1 && shape[a] % LANES == 0));
        let window = (self.uniform_at)(b)?;
        (self.kernel.reads.contains(&id) && aligned).then(|| ((self.binding_of)(b), window))
    }

    /// The blocked body of computed node `id` at `stride`, or `None` where the op has no rule
    /// for that axis.
    fn rule(&mut self, id: NodeId, stride: usize) -> Option<(kir::Function, Vec<Callee>)> {
        self.blocked_definition(id, stride, true)
    }

    /// [`LaneFns::rule`]'s body; `count`: whether a blocked reduction counts as this
    /// kernel's blocked work (not when its rows hold it, [`LaneFns::rows_fn`]).
    fn blocked_definition(
        &mut self,
        id: NodeId,
        stride: usize,
        count: bool,
    ) -> Option<(kir::Function, Vec<Callee>)> {
        let graph = self.graph;
        let node = graph.node(id);
        if node.ty.dtype != DType::F32 {
            return None;
        }
        let out = &node.ty.shape;
        let (axis, mult) = match self.lane_axis(out, stride) {
            Some((a, m)) => (Some(a), m),
            None => (None, 1),
        };
        if stride == 1 && axis == Some(3) {
            if let Some(body) = self.tiling_pool_grad_columns(id) {
                return Some(body);
            }
        }
        // Four consecutive bytes starting at a multiple of four are one packed word.
        let word_aligned = stride == 1 && (self.flat || axis == Some(out.len() - 1));
        if word_aligned && node.op == Op::ScaleU8 {
            if let Some(word) = self.packed_word(node.inputs[0]) {
                let mut f = kir::Builder::new(kir::Ty::VEC4_F32, vec![kir::Ty::U32]);
                let i = f.index();
                let w = f.operand(0, i);
                let w = f.let_("w", kir::Ty::U32, w);
                let lanes = [0, 8, 16, 24].map(|shift| {
                    let byte = if shift == 0 {
                        w
                    } else {
                        let by = f.u32(shift);
                        f.bin(kir::BinOp::ShiftRight, w, by)
                    };
                    let byte = if shift == 24 {
                        byte
                    } else {
                        let mask = f.u32(0xff);
                        f.bin(kir::BinOp::BitAnd, byte, mask)
                    };
                    f.cast(kir::Scalar::F32, byte)
                });
                let bytes = f.compose(lanes);
                let scale = f.f32(255.0);
                let value = f.div(bytes, scale);
                f.ret_(value);
                return Some((f.finish(), vec![Callee::Call(word)]));
            }
        }
        use Operand::{Lanes, Shared};
        // A plain reduction's lanes share no load: four evaluations of its own (specialised)
        // body do as well.
        if node.op.pattern() == OpPattern::Reduction {
            return None;
        }
        // Blocked work is reported, costed and held in rows per output axis; lanes that lie
        // on no single axis (a flat stride, e.g. a batch-1 matmul's output read 8 apart) stay
        // scalar there.
        let work = reduction_length(graph, id);
        if work > 1 && axis.is_none() {
            return None;
        }
        // Which operands vary along the lanes, and how far apart, read off the op's own
        // definition: the lanes evaluate it once with `vec4` values.
        let scalar = compute::scalar_element(graph, id, self.chunked.contains(&id));
        let (held, gap) = match axis {
            Some(a) => (
                HeldAxis {
                    stride: strides(out)[a],
                    extent: out[a],
                },
                mult,
            ),
            None => (
                HeldAxis {
                    stride,
                    extent: node.ty.numel() / stride,
                },
                1,
            ),
        };
        let operands: Vec<Operand> = lane_reads(&scalar, held, gap)?
            .into_iter()
            .map(|s| s.map_or(Shared, Lanes))
            .collect();
        // Lanes all reading the same elements are the same value: four scalar evaluations
        // say so without a `vec4` definition.
        if !node.inputs.is_empty() && !operands.iter().any(|o| matches!(o, Lanes(_))) {
            return None;
        }
        let blocked_input_not_f32 = node
            .inputs
            .iter()
            .zip(&operands)
            .any(|(&n, o)| matches!(o, Lanes(_)) && graph.ty(n).dtype != DType::F32);
        if blocked_input_not_f32 {
            return None;
        }
        let reads: Vec<Read> = node
            .inputs
            .iter()
            .zip(&operands)
            .map(|(&n, o)| match o {
                Lanes(s) if self.from_parts == Some(n) => {
                    self.unmade = Some((n, *s));
                    Read::lanes(Callee::Call(lane_fn(n, *s)))
                }
                Lanes(s) => Read::lanes(Callee::Call(self.request(n, *s))),
                Shared => Read::scalar(graph, n),
            })
            .collect();
        if work > 1 && count {
            self.shares_loads |= operands.iter().any(|o| matches!(o, Shared));
            self.blocked_work += work;
            self.blocked.push(format!(
                "{id} {} (axis {})",
                node.op.name(),
                axis.expect("reductions have a rule only for an axis")
            ));
        }
        Some(definition_over(
            graph,
            id,
            &reads,
            Some(kir::Ty::VEC4_F32),
            self.chunked.contains(&id),
        ))
    }
}

impl LaneFns<'_> {
    /// Whether the kernel reads a value split over uniform parts.
    fn reads_split(&self) -> bool {
        self.kernel.reads.iter().any(|&n| (self.split)(n).is_some())
    }

    /// The axis of `shape` whose lanes lie `stride` apart, and how many coordinates apart
    /// that is: 1 (consecutive), or a quarter of the axis where [`Blocking::quarter`] lanes
    /// are allowed (never the batch axis, which image chunks cut).
    pub fn lane_axis(&self, shape: &[usize], stride: usize) -> Option<(usize, usize)> {
        let st = strides(shape);
        let exact = (0..shape.len()).find(|&a| st[a] == stride && shape[a] % LANES == 0);
        exact.map(|a| (a, 1)).or_else(|| {
            self.quarter.then_some(())?;
            (1..shape.len())
                .find(|&a| shape[a] % LANES == 0 && st[a] * (shape[a] / LANES) == stride)
                .map(|a| (a, shape[a] / LANES))
        })
    }

    /// `fn v<id>_word(i) -> u32`: the packed word holding bytes `i ..= i + 3` of u8 value
    /// `id` (`i` a multiple of four), one load where four byte reads load it four times
    /// (the batch's pixels, gathered from the data set by row). `None` unless `id` is read
    /// from a packed buffer or gathered by rows in fours from one.
    fn packed_word(&mut self, id: NodeId) -> Option<String> {
        let graph = self.graph;
        let name = format!("v{}_word", id.0);
        if graph.ty(id).dtype != DType::U8 {
            return None;
        }
        let (f, callees) = if self.kernel.reads.contains(&id) {
            let b = self.plan.buffer_of[id.0]?;
            if !self.plan.buffers[b].packed_u8 {
                return None;
            }
            let mut f = kir::Builder::new(kir::Ty::U32, Vec::new());
            let g = f.global(kir::Global {
                name: format!("buf{}", (self.binding_of)(b)),
                space: kir::Space::Storage { read_only: true },
                elem: kir::Ty::U32,
            });
            let i = f.index();
            let two = f.u32(2);
            let q = f.bin(kir::BinOp::ShiftRight, i, two);
            let word = f.load(g, q);
            f.ret_(word);
            (f, Vec::new())
        } else if self.kernel.nodes.contains(&id) && graph.node(id).op == Op::Gather {
            let [data, rows] = [graph.node(id).inputs[0], graph.node(id).inputs[1]];
            let row: usize = graph.ty(data).shape[1..].iter().product();
            if row % LANES != 0 {
                return None;
            }
            let word = self.packed_word(data)?;
            let rows_ty = compute::value_ty(graph.ty(rows).dtype);
            let mut f = kir::Builder::new(kir::Ty::U32, vec![rows_ty, kir::Ty::U32]);
            let i = f.index();
            let r = f.u32(row);
            let at = f.div(i, r);
            let at = f.let_("row", kir::Ty::U32, at);
            let first = f.operand(0, at);
            let first = f.mul(first, r);
            let within = f.rem(i, r);
            let index = f.add(first, within);
            let value = f.operand(1, index);
            f.ret_(value);
            (f, vec![Callee::Call(v(rows)), Callee::Call(word)])
        } else {
            return None;
        };
        // Stride 0 marks the word function among the lane functions done.
        if self.done.insert((id, 0)) {
            self.push(&name, f, callees);
        }
        Some(name)
    }

    /// Four consecutive columns of an average-pooling gradient whose windows tile the input
    /// along rows (kernel = stride, dividing four): the columns fall in `4 / stride` windows,
    /// so one load per window instead of one per column.
    fn tiling_pool_grad_columns(&mut self, id: NodeId) -> Option<(kir::Function, Vec<Callee>)> {
        let graph = self.graph;
        let node = graph.node(id);
        let Op::AvgPool2dGrad { kernel, stride, .. } = node.op else {
            return None;
        };
        let out = &node.ty.shape;
        let dy = &graph.ty(node.inputs[0]).shape;
        let (kx, tiles) = (kernel[1], kernel == stride);
        let covered = out[2] == dy[2] * kernel[0] && out[3] == dy[3] * kx;
        if !tiles || !covered || LANES % kx != 0 {
            return None;
        }
        let mut f = kir::Builder::new(kir::Ty::VEC4_F32, vec![kir::Ty::F32]);
        let i = f.index();
        let [nc, h, w] = <[kir::Expr; 3]>::try_from(f.decode(
            i,
            &["nc", "h", "w"],
            &[out[0] * out[1], out[2], out[3]],
        ))
        .expect("three axes");
        let (dy2, k0, dy3, k1) = (f.u32(dy[2]), f.u32(kernel[0]), f.u32(dy[3]), f.u32(kx));
        let at = f.mul(nc, dy2);
        let row = f.div(h, k0);
        let at = f.add(at, row);
        let at = f.mul(at, dy3);
        let col = f.div(w, k1);
        let at = f.add(at, col);
        let b = f.let_("b", kir::Ty::U32, at);
        let windows: Vec<kir::Expr> = (0..LANES / kx)
            .map(|t| {
                let at = if t == 0 {
                    b
                } else {
                    let d = f.u32(t);
                    f.add(b, d)
                };
                let g = f.operand(0, at);
                f.let_(&format!("g{t}"), kir::Ty::F32, g)
            })
            .collect();
        let lanes = [0, 1, 2, 3].map(|l| windows[l / kx]);
        let value = f.compose(lanes);
        let taps = f.f32((kernel[0] * kx) as f32);
        let value = f.div(value, taps);
        f.ret_(value);
        Some((f.finish(), vec![Callee::Call(v(node.inputs[0]))]))
    }
}

/// Multiply-adds (or loads) per output element of a reduction; 1 for elementwise ops.
fn reduction_length(graph: &Graph, id: NodeId) -> usize {
    let node = graph.node(id);
    let shape = |k: usize| &graph.ty(node.inputs[k]).shape;
    match &node.op {
        Op::Conv2d { .. } => shape(1)[1..].iter().product(),
        Op::Conv2dGradInput { .. } => shape(1)[0] * shape(1)[2] * shape(1)[3],
        Op::Conv2dGradWeight { .. } => shape(1)[0] * shape(1)[2] * shape(1)[3],
        Op::MatMul { transpose_a, .. } => shape(0)[usize::from(!*transpose_a)],
        Op::AvgPool2d { kernel, .. }
        | Op::MaxPool2d { kernel, .. }
        | Op::AvgPool2dGrad { kernel, .. } => kernel[0] * kernel[1],
        _ => 1,
    }
}

/// Statements storing the four lanes of `value` (lane 0 at `i`) into binding `slot`: how a
/// saved value writes itself as it is computed.
fn store_lanes(f: &mut kir::Builder, slot: u32, stride: usize, value: kir::Expr) {
    let g = f.global(kir::Global {
        name: format!("buf{slot}"),
        space: kir::Space::Storage { read_only: false },
        elem: kir::Ty::F32,
    });
    let i = f.index();
    for k in 0..LANES {
        let at = offset_expr(f, i, k * stride);
        let l = f.u32(k);
        let lane = f.lane(value, l);
        f.store(g, at, lane);
    }
}

/// `base + delta`, without a `+ 0u`.
fn offset_expr(f: &mut kir::Builder, base: kir::Expr, delta: usize) -> kir::Expr {
    if delta == 0 {
        base
    } else {
        let d = f.u32(delta);
        f.add(base, d)
    }
}

/// `array<vec4<f32>, n>`.
fn vec4s(n: usize) -> kir::Ty {
    kir::Ty::array(kir::Ty::VEC4_F32, n as u32).expect("one deep")
}

/// The blocking of a map kernel's `root` that gives the most reduction work a blocked rule,
/// with its lane functions, then the other candidates that give as much (for the module's
/// load count to choose among: `wgsl.rs`); empty when no candidate blocks a reduction.
///
/// Candidates are the root's axes and, through a reshape of the same size, its input's axes
/// (so `f32[N,400]` can be blocked over the 16 channels of the `f32[N,16,5,5]` it flattens);
/// channel-like axis 1 is tried first, so it comes first among equals unless another has
/// rows and it has none.
///
/// `fresh` makes an empty set of lane functions for the kernel. With `vectorise` (CPU-class
/// targets), a kernel whose best blocking shares no loads takes four consecutive elements of
/// its innermost axis instead when that axis is in fours, else of an image when images are.
pub fn choose<'a>(
    fresh: &dyn Fn() -> LaneFns<'a>,
    root: NodeId,
    vectorise: bool,
) -> Vec<(Blocking, LaneFns<'a>)> {
    let probe = fresh();
    let (graph, kernel) = (probe.graph, probe.kernel);
    let ty = graph.ty(root);
    if ty.dtype != DType::F32 {
        return Vec::new();
    }
    let numel = ty.numel();
    let axes_of = |shape: &[usize]| -> Vec<Blocking> {
        let st = strides(shape);
        let mut order: Vec<usize> = (0..shape.len()).collect();
        if order.len() > 1 {
            order.swap(0, 1);
        }
        order
            .into_iter()
            .filter(|&a| shape[a] % LANES == 0)
            .map(|a| Blocking {
                stride: st[a],
                extent: shape[a],
                quarter: false,
            })
            .collect()
    };
    let mut candidates = Vec::new();
    for &n in &kernel.nodes {
        if matches!(graph.node(n).op, Op::Reshape { .. }) && graph.ty(n).numel() == numel {
            candidates.extend(axes_of(&graph.ty(graph.node(n).inputs[0]).shape));
        }
    }
    candidates.extend(axes_of(&ty.shape));
    let mut best: Option<(Blocking, LaneFns<'a>)> = None;
    // Candidates that did as much blocked work as the best when tried.
    let mut equals: Vec<(Blocking, LaneFns<'a>)> = Vec::new();
    let mut seen = Vec::new();
    for c in candidates {
        if seen.contains(&c) || numel % (c.stride * c.extent) != 0 {
            continue;
        }
        seen.push(c);
        let mut fns = fresh();
        fns.request(root, c.stride);
        // As much blocked work, but rows of it too where the best so far has none (a
        // stride-1 input gradient has rows over channels only with images as its lanes).
        let better = best.as_ref().is_none_or(|(bc, b)| {
            fns.blocked_work > b.blocked_work
                || (fns.blocked_work == b.blocked_work
                    && fns.rows_for(root, c.stride).is_some()
                    && b.rows_for(root, bc.stride).is_none())
        });
        if fns.blocked_work > 0 && better {
            if let Some(old) = best.take() {
                equals.push(old);
            }
            best = Some((c, fns));
        } else if fns.blocked_work > 0 {
            equals.push((c, fns));
        }
    }
    let work = best.as_ref().map_or(0, |(_, b)| b.blocked_work);
    equals.retain(|(_, f)| f.blocked_work == work);
    // A value split over four uniform parts (fc1's weights on CPU-class targets) is read
    // from every part and selected per load, unless the lanes lie a part apart: lanes in the
    // four quarters of an axis then read one part each. Taken when that does as much
    // blocked work as the best choice.
    if probe.reads_split() {
        for (a, &extent) in ty.shape.iter().enumerate().skip(1) {
            if extent % LANES != 0 || extent < 2 * LANES {
                continue;
            }
            let c = Blocking {
                stride: strides(&ty.shape)[a] * (extent / LANES),
                extent,
                quarter: true,
            };
            let mut fns = fresh();
            fns.quarter = true;
            fns.request(root, c.stride);
            let as_much = best
                .as_ref()
                .is_none_or(|(_, b)| fns.blocked_work >= b.blocked_work);
            if fns.direct_parts > 0 && fns.blocked_work > 0 && as_much {
                best = Some((c, fns));
                equals.clear();
            }
        }
    }
    if vectorise && best.as_ref().is_none_or(|(_, b)| !b.shares_loads) {
        // No load to share: four consecutive elements of the innermost axis per invocation
        // turn each aligned uniform read into one vec4 load instead (and keep an image's
        // lanes in one image, so its chunks stay small). Where that axis is not in fours but
        // an image is, four consecutive elements of the image: ops with a rule for an axis
        // then evaluate their lanes one by one, elementwise ops and reads stay vec4.
        let inner = ty.shape.last().copied().unwrap_or(1);
        let image = numel / ty.shape.first().copied().unwrap_or(1).max(1);
        let extent = if ty.shape.is_empty() {
            None
        } else if inner % LANES == 0 {
            Some(inner)
        } else {
            (ty.shape.len() > 1 && image % LANES == 0).then_some(image)
        };
        if let Some(extent) = extent {
            let mut fns = fresh();
            fns.flat = extent != inner;
            fns.request(root, 1);
            best = Some((
                Blocking {
                    stride: 1,
                    extent,
                    quarter: false,
                },
                fns,
            ));
            equals.clear();
        }
    }
    best.into_iter().chain(equals).collect()
}

/// A second blocked axis: `count` rows of four lanes per invocation, along an axis of the
/// kernel's reduction `reduction` whose rows share the lanes' operand (a conv weight gradient's
/// kernel columns share each `dy` load; an input gradient's channels share `dy`; a matmul's
/// rows share the column block of `b`). The reduction's value reaches the root through
/// elementwise ops and reshapes only (element `i` from element `i`), so each row's epilogue
/// is a plain four-lane evaluation at the same flat indices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    pub reduction: NodeId,
    /// A pooling between the reduction and the root (conv, bias, activation, pool): its
    /// windows gather rows of the reduction at each tap. Lanes and rows are then on axes 0 and
    /// 1 (images and channels), which pooling keeps.
    pub pool: Option<NodeId>,
    /// The lanes' axis and the rows' axis of the reduction's shape (and of the pool's output).
    pub lane_axis: usize,
    pub row_axis: usize,
    pub count: usize,
    /// A second rows axis on CPU-class targets, `inner` elements of `inner_axis` per row (1:
    /// none): two adjacent columns of a convolution's input gradient, whose `dy` loads slide
    /// along the row for both. More accumulators per invocation, fewer loads per multiply-add.
    pub inner_axis: usize,
    pub inner: usize,
    /// Coordinates between lanes along the lane axis: 1, or a quarter of the axis
    /// ([`Blocking::quarter`], matmul rows only).
    pub lane_gap: usize,
}

impl Rows {
    /// The `vec4` accumulators of one invocation: `inner` per row.
    pub fn accumulators(&self) -> usize {
        self.count * self.inner
    }

    /// The flat offset of each accumulator's lane 0 from the invocation's first element, in
    /// accumulator order (row-major over rows, then inner rows), given the strides of
    /// [`Rows::top`]'s shape.
    pub fn offsets(&self, strides: &[usize]) -> Vec<usize> {
        let (t, u) = (strides[self.row_axis], strides[self.inner_axis]);
        (0..self.count)
            .flat_map(|q| (0..self.inner).map(move |c| q * t + c * u))
            .collect()
    }

    /// The node whose flat index space the invocations enumerate: the pool's output, or the
    /// reduction (the root has the same flat indices, reshapes at most between).
    pub fn top(&self) -> NodeId {
        self.pool.unwrap_or(self.reduction)
    }
}

/// Most rows per invocation (accumulators: four lanes each).
const MAX_ROWS: usize = 8;

/// Same-shape elementwise ops: element `i` of the output needs element `i` of each operand.
fn passes_through(op: &Op) -> bool {
    (op.is_elementwise() && *op != Op::ScaleU8)
        || matches!(op, Op::BiasAdd { .. } | Op::Reshape { .. })
}

impl LaneFns<'_> {
    /// Whether `id`'s element `i` depends on element `i` of `target` through elementwise ops
    /// and reshapes computed in this kernel.
    fn leads_to(&self, id: NodeId, target: NodeId) -> bool {
        if id == target {
            return true;
        }
        let node = self.graph.node(id);
        self.kernel.nodes.contains(&id)
            && passes_through(&node.op)
            && node.ty.numel() == self.graph.ty(target).numel()
            && node.inputs.iter().any(|&n| self.leads_to(n, target))
    }

    /// The rows schedule for a kernel whose root is blocked at `lane_stride`, if one applies.
    pub fn rows_for(&self, root: NodeId, lane_stride: usize) -> Option<Rows> {
        let graph = self.graph;
        let lane_axis_of = |id: NodeId| self.lane_axis(&graph.ty(id).shape, lane_stride);
        for &red in &self.kernel.nodes {
            if red != root && self.kernel.stores.contains(&red) {
                continue;
            }
            // Directly below the root, or below one pooling that is.
            let (pool, (lane_axis, lane_gap)) = if self.leads_to(root, red) {
                match lane_axis_of(red) {
                    Some(a) => (None, a),
                    None => continue,
                }
            } else {
                let pool = self.kernel.nodes.iter().copied().find(|&p| {
                    matches!(
                        graph.node(p).op,
                        Op::AvgPool2d { .. } | Op::MaxPool2d { .. }
                    ) && self.leads_to(root, p)
                        && self.leads_to(graph.node(p).inputs[0], red)
                        && (p == root || !self.kernel.stores.contains(&p))
                });
                match pool.and_then(|p| lane_axis_of(p).map(|a| (p, a))) {
                    Some((p, (a, 1))) if a < 2 => (Some(p), (a, 1)),
                    _ => continue,
                }
            };
            if lane_gap > 1 && !matches!(graph.node(red).op, Op::MatMul { .. }) {
                continue;
            }
            let shape = &graph.ty(red).shape;
            let row_axis = match (&graph.node(red).op, lane_axis, pool) {
                (Op::Conv2dGradWeight { padding, .. }, 0, None) if *padding == [0, 0] => 3,
                (Op::Conv2dGradInput { stride, .. }, 0, None) if *stride == [1, 1] => 1,
                (Op::MatMul { .. }, 1, None) => 0,
                (Op::Conv2d { .. }, 1, _) => 0,
                (Op::Conv2d { .. }, 0, _) => 1,
                _ => continue,
            };
            let size = shape[row_axis];
            // Under a pooling every row is evaluated once per window tap: fewer rows keep the
            // unrolled code (and the driver's JIT time at the first dispatch) in check.
            let most = if pool.is_some() {
                MAX_ROWS / 2
            } else {
                MAX_ROWS
            };
            // Rows over images whose reduction reads a chunk's window (a convolution's
            // pixels, gathered many times each) take no more images than the windows hold:
            // more would read them from storage. (Capping rows whose windows only feed the
            // epilogue made conv7's matmul kernel 1.4x slower on lavapipe: more weight loads
            // for the few elementwise reads that left storage.)
            let reads_window = graph.node(red).inputs.iter().any(|&x| {
                self.plan.buffer_of[x.0]
                    .is_some_and(|b| matches!((self.uniform_at)(b), Some(Some(_))))
            });
            let most = if row_axis == 0 && lane_axis != 0 && reads_window {
                most.min(self.max_image_rows)
            } else {
                most
            };
            let count = (1..=most.min(size))
                .rev()
                .find(|r| size % r == 0)
                .unwrap_or(1);
            // A stride-1 input gradient slides its dy loads along the row for two columns.
            // (A weight gradient taking every kernel row, 25 accumulators sharing each dy
            // load, ran conv2's 15.5 -> 12.9 ms per step but its JIT added 3.7 s to the cold
            // start on lavapipe: not done.)
            let (inner_axis, inner) = match &graph.node(red).op {
                Op::Conv2dGradInput { .. }
                    if self.inner_rows
                        && pool.is_none()
                        && !self.chunked.contains(&red)
                        && shape[3] % 2 == 0 =>
                {
                    (3, 2)
                }
                _ => (row_axis, 1),
            };
            if count > 1 {
                return Some(Rows {
                    reduction: red,
                    pool,
                    lane_axis,
                    row_axis,
                    count,
                    inner_axis,
                    inner,
                    lane_gap,
                });
            }
        }
        None
    }

    /// `fn v<n>_row(i, red)` for every node from `from` down to `to` (exclusive): the node's
    /// four lanes at `i` given `red`, the lanes of `to` at `i`. Saved values store their
    /// lanes as they are computed.
    fn row_path(
        &mut self,
        from: NodeId,
        to: NodeId,
        lane_stride: usize,
        (lane_axis, lane_gap): (usize, usize),
    ) {
        let graph = self.graph;
        let mut path = Vec::new();
        let mut at = from;
        while at != to {
            path.push(at);
            at = *graph
                .node(at)
                .inputs
                .iter()
                .find(|&&n| self.leads_to(n, to))
                .expect("the path continues down");
        }
        for &n in path.iter().rev() {
            let node = graph.node(n);
            let reads: Vec<Read> = node
                .inputs
                .iter()
                .map(|&i| {
                    if i == to {
                        Read::lanes(Callee::Value("red".into()))
                    } else if self.leads_to(i, to) {
                        Read::lanes(Callee::CallWith(format!("v{}_row", i.0), "red".into()))
                    } else if let Op::BiasAdd { axis } = node.op {
                        // Four biases along the lanes, or one shared by them.
                        if axis == lane_axis {
                            Read::lanes(Callee::Call(self.request(i, lane_gap)))
                        } else {
                            Read::scalar(graph, i)
                        }
                    } else {
                        Read::lanes(Callee::Call(self.request(i, lane_stride)))
                    }
                })
                .collect();
            let (mut definition, callees) =
                definition_over(graph, n, &reads, Some(kir::Ty::VEC4_F32), false);
            definition.params.push(("red".into(), kir::Ty::VEC4_F32));
            let name = format!("v{}_row", n.0);
            let saved = matches!(self.plan.placement[n.0], Placement::Side { .. })
                && self.kernel.stores.contains(&n);
            if !saved {
                self.push_function(&name, definition, callees);
                continue;
            }
            let slot =
                (self.binding_of)(self.plan.buffer_of[n.0].expect("stored nodes have buffers"));
            let value_of = format!("value_of_{name}");
            self.push_function(&value_of, definition, callees);
            let mut f = kir::Builder::new(kir::Ty::VEC4_F32, vec![kir::Ty::VEC4_F32]);
            let i = f.index();
            let red = f.param("red", kir::Ty::VEC4_F32);
            let value = f.call(0, vec![i, red]);
            let value = f.let_("value", kir::Ty::VEC4_F32, value);
            store_lanes(&mut f, slot, lane_stride, value);
            f.ret_(value);
            self.push(&name, f, vec![Callee::Call(value_of)]);
        }
    }

    /// `fn v<root>_rows(i) -> array<vec4<f32>, R>`: the root's lanes for each row, the
    /// reduction computed once for all rows. Returns the function's name.
    pub fn rows_fn(&mut self, root: NodeId, lane_stride: usize, rows: Rows) -> Option<String> {
        let graph = self.graph;
        let red = rows.reduction;
        let r = rows.count;
        let red_strides = strides(&graph.ty(red).shape);
        let red_lanes = red_strides[rows.lane_axis] * rows.lane_gap;
        // A stride-1 convolution under a 2x2 pooling computes its four window taps together.
        let taps = rows
            .pool
            .filter(|&p| self.pool_taps_fusable(red, p))
            .and_then(|_| self.pool_taps(red, rows));
        let fused_taps = taps.is_some();
        let red_fn = match taps {
            Some(taps) => taps,
            None => self.reduction_rows(red, rows)?,
        };
        let top_fn = match rows.pool {
            None => red_fn,
            Some(pool) => {
                let input = graph.node(pool).inputs[0];
                if input != red {
                    self.row_path(input, red, red_lanes, (rows.lane_axis, rows.lane_gap));
                }
                self.pool_rows(pool, &red_fn, rows, fused_taps)
            }
        };
        let top = rows.top();
        if root != top {
            self.row_path(root, top, lane_stride, (rows.lane_axis, rows.lane_gap));
        }
        let accumulators = vec4s(rows.accumulators());
        // Operand 0: the top's rows; operand 1: the path from the top up to the root, per row.
        let mut operands = vec![accumulators];
        let mut callees = vec![Callee::Call(top_fn)];
        if root != top {
            operands.push(kir::Ty::VEC4_F32);
            callees.push(Callee::Call(format!("v{}_row", root.0)));
        }
        let mut f = kir::Builder::new(accumulators, operands);
        let i = f.index();
        let all = f.operand(0, i);
        let all = f.let_("top", accumulators, all);
        let per_row: Vec<kir::Expr> = rows
            .offsets(&strides(&graph.ty(top).shape))
            .into_iter()
            .enumerate()
            .map(|(k, at)| {
                let k = f.u32(k);
                let row = f.lane(all, k);
                if root == top {
                    row
                } else {
                    let at = offset_expr(&mut f, i, at);
                    f.call(1, vec![at, row])
                }
            })
            .collect();
        let value = f.array(per_row);
        f.ret_(value);
        let name = format!("v{}_rows", root.0);
        self.push(&name, f, callees);
        let label = format!("{red} ");
        self.blocked.retain(|b| !b.starts_with(&label));
        let columns = if rows.inner > 1 {
            format!(" x {} on axis {}", rows.inner, rows.inner_axis)
        } else {
            String::new()
        };
        self.blocked.push(format!(
            "{red} {} ({LANES} lanes on axis {} x {r} rows on axis {}{columns})",
            graph.node(red).op.name(),
            rows.lane_axis,
            rows.row_axis
        ));
        self.blocked_work += reduction_length(graph, red);
        Some(name)
    }

    /// The rows of a pooling over the reduction's rows: each window tap evaluates the
    /// reduction's rows once and the path above it per row.
    fn pool_rows(&mut self, pool: NodeId, red_fn: &str, rows: Rows, fused_taps: bool) -> String {
        let graph = self.graph;
        let node = graph.node(pool);
        let input = node.inputs[0];
        let (kernel, stride, max) = match node.op {
            Op::AvgPool2d { kernel, stride } => (kernel, stride, false),
            Op::MaxPool2d { kernel, stride } => (kernel, stride, true),
            _ => unreachable!("rows_for picks pools only"),
        };
        let out = &node.ty.shape;
        let [_, _, h, w] =
            <[usize; 4]>::try_from(graph.ty(input).shape.as_slice()).expect("rank 4");
        let in_t = strides(&graph.ty(input).shape)[rows.row_axis];
        let r = rows.count;
        let rows_ty = vec4s(r);
        let taps: Vec<(usize, usize)> = (0..kernel[0])
            .flat_map(|ky| (0..kernel[1]).map(move |kx| (ky, kx)))
            .collect();
        // Operand 0: the reduction's rows at a tap (or, fused, at all four taps); operand 1:
        // the path from the reduction up to the pool's input, per row.
        let red_ty = if fused_taps { vec4s(4 * r) } else { rows_ty };
        let through_path = input != rows.reduction;
        let mut operands = vec![red_ty];
        let mut callees = vec![Callee::Call(red_fn.to_string())];
        if through_path {
            operands.push(kir::Ty::VEC4_F32);
            callees.push(Callee::Call(format!("v{}_row", input.0)));
        }
        let mut f = kir::Builder::new(rows_ty, operands);
        let i = f.index();
        let [nc, oy, ox] = <[kir::Expr; 3]>::try_from(f.decode(
            i,
            &["nc", "oy", "ox"],
            &[out[0] * out[1], out[2], out[3]],
        ))
        .expect("three axes");
        let (hh, sy, ww, sx) = (f.u32(h), f.u32(stride[0]), f.u32(w), f.u32(stride[1]));
        let row = f.mul(oy, sy);
        let base = f.mul(nc, hh);
        let base = f.add(base, row);
        let base = f.mul(base, ww);
        let col = f.mul(ox, sx);
        let base = f.add(base, col);
        let base = f.let_("base", kir::Ty::U32, base);
        let all = if fused_taps {
            let all = f.operand(0, base);
            Some(f.let_("taps", red_ty, all))
        } else {
            None
        };
        let mut at = Vec::new();
        // Each tap's rows, and where its `q`-th row is: (`let`, lane).
        let mut tap = Vec::new();
        for (k, (ky, kx)) in taps.iter().enumerate() {
            let here = offset_expr(&mut f, base, ky * w + kx);
            let here = f.let_(&format!("at{k}"), kir::Ty::U32, here);
            tap.push(match all {
                Some(all) => (all, k * r),
                None => {
                    let value = f.operand(0, here);
                    (f.let_(&format!("tap{k}"), rows_ty, value), 0)
                }
            });
            at.push(here);
        }
        let value = |f: &mut kir::Builder, k: usize, q: usize| {
            let (rows, first) = tap[k];
            let qq = f.u32(first + q);
            let row = f.lane(rows, qq);
            if through_path {
                let here = offset_expr(f, at[k], q * in_t);
                f.call(1, vec![here, row])
            } else {
                row
            }
        };
        let mut results = Vec::new();
        for q in 0..r {
            if max {
                let first = value(&mut f, 0, q);
                let best = f.var(&format!("best{q}"), kir::Ty::VEC4_F32, first);
                for k in 1..taps.len() {
                    let a = value(&mut f, k, q);
                    let a = f.let_(&format!("a{q}_{k}"), kir::Ty::VEC4_F32, a);
                    let b = f.get(best);
                    let takes = compute::first_max_takes(&mut f, b, a, kir::BinOp::BitAnd);
                    let picked = f.select(takes, a, b);
                    f.assign(best, picked);
                }
                results.push(f.get(best));
            } else {
                let mut sum = value(&mut f, 0, q);
                for k in 1..taps.len() {
                    let term = value(&mut f, k, q);
                    sum = f.add(sum, term);
                }
                let n = f.f32(taps.len() as f32);
                let mean = f.div(sum, n);
                results.push(f.let_(&format!("row{q}"), kir::Ty::VEC4_F32, mean));
            }
        }
        let value = f.array(results);
        f.ret_(value);
        let name = format!("v{}_rows_of_pool", pool.0);
        self.push(&name, f, callees);
        name
    }

    /// Whether convolution `red` under pooling `pool` can compute the pool's four taps in one
    /// pass: stride 1, directly below a 2x2 window of stride 2.
    fn pool_taps_fusable(&self, red: NodeId, pool: NodeId) -> bool {
        let pool_2x2 = matches!(
            self.graph.node(pool).op,
            Op::AvgPool2d {
                kernel: [2, 2],
                stride: [2, 2]
            } | Op::MaxPool2d {
                kernel: [2, 2],
                stride: [2, 2]
            }
        );
        let conv_stride_1 = matches!(self.graph.node(red).op, Op::Conv2d { stride: [1, 1], .. });
        pool_2x2 && conv_stride_1
    }

    /// `fn v<red>_rows_at_pool_taps(i) -> array<vec4<f32>, 4 * R>`: the convolution's rows
    /// at the four taps of a 2x2 pooling window whose first tap is flat index `i`, tap by tap
    /// in the order (0,0), (0,1), (1,0), (1,1), each tap's rows in order. Its definition held
    /// along the window's two axes and the rows' (taps in the padding predicated first,
    /// `kir::widen::predicate`), so the taps share every weight load, and slid along the
    /// kernel's columns: a tap's pixel is its left neighbour's one step later, so a step
    /// loads two pixels per patch row instead of one per tap (about 2.5x fewer loads than
    /// evaluating the taps apart). `None` where the definition cannot be held so.
    fn pool_taps(&mut self, red: NodeId, rows: Rows) -> Option<String> {
        let (function, callees) = self.held(red, rows, true)?;
        let name = format!("v{}_rows_at_pool_taps", red.0);
        self.push_function(&name, function, callees);
        Some(name)
    }

    /// The reduction's rows function: one accumulator of four lanes per row, the lanes'
    /// operand loaded once per step for all rows. `None` where its definition cannot be
    /// held along the rows.
    fn reduction_rows(&mut self, red: NodeId, rows: Rows) -> Option<String> {
        let name = format!("v{}_rows_of_reduction", red.0);
        let chunked = self.chunked.contains(&red);
        // Summed chunk by chunk: the chunk's part, its plain name left for the finished sums.
        let own = if chunked {
            chunk_part(&name)
        } else {
            name.clone()
        };
        let (function, callees) = self.held(red, rows, false)?;
        self.push_function(&own, function, callees);
        Some(name)
    }

    /// The rows of `red` (with `window`, at each tap of a 2x2 pooling window in turn): the
    /// definition its lanes take, held along the rows' axis (`kir::unroll`), so that each
    /// operand read not depending on the row — the lanes' operand that the rows share — is
    /// made once for all of them; reads that then line up along a loop (row `k`'s this step
    /// is row `k + 1`'s the next) slide as a window (`kir::slide`). `None` where the
    /// definition cannot be held (a loop bound or a `continue` depending on the row that
    /// neither widening nor predication removes).
    fn held(
        &mut self,
        red: NodeId,
        rows: Rows,
        window: bool,
    ) -> Option<(kir::Function, Vec<Callee>)> {
        let shape = &self.graph.ty(red).shape;
        let st = strides(shape);
        let held = |a: usize| HeldAxis {
            stride: st[a],
            extent: shape[a],
        };
        // Rows, then each row's inner rows (one axis where there are none).
        let (mut axes, mut copies): (Vec<HeldAxis>, Vec<Vec<usize>>) = if rows.inner > 1 {
            (
                vec![held(rows.row_axis), held(rows.inner_axis)],
                (0..rows.count)
                    .flat_map(|k| (0..rows.inner).map(move |c| vec![k, c]))
                    .collect(),
            )
        } else {
            (
                vec![held(rows.row_axis)],
                (0..rows.count).map(|k| vec![k]).collect(),
            )
        };
        // A 2x2 pooling window's taps (rows and columns of the image) before them.
        if window {
            axes.splice(0..0, [held(2), held(3)]);
            copies = (0..4)
                .flat_map(|t| {
                    copies
                        .iter()
                        .map(move |c| [vec![t / 2, t % 2], c.clone()].concat())
                })
                .collect();
        }
        let lanes = st[rows.lane_axis] * rows.lane_gap;
        let parts = self.quarter_rows(red, rows);
        let b = self.graph.node(red).inputs.get(1).copied();
        self.from_parts = parts.and(b);
        self.unmade = None;
        let definition = self.blocked_definition(red, lanes, false);
        self.from_parts = None;
        let (definition, callees) = definition?;
        let held = match unroll(&definition, &axes, &copies) {
            Ok(held) => held,
            // A loop clipped per copy (an input gradient's kernel columns, clipped to the
            // taps whose `dy` exists) runs its whole range for all, `dy` zero outside.
            Err(UnrollError::LoopBounds(name)) => {
                let padded = padded_operand(self.graph, red)?;
                let wide = widen(&definition, &name, padded).ok()?;
                unroll(&wide, &axes, &copies).ok()?
            }
            // A tap in the padding, skipped per copy (a pooling window's taps), reads zero.
            Err(UnrollError::VaryingExit)
                if matches!(self.graph.node(red).op, Op::Conv2d { .. }) =>
            {
                let predicated = predicate(&definition, 0).ok()?;
                unroll(&predicated, &axes, &copies).ok()?
            }
            Err(_) => return None,
        };
        let (slid, _) = slide(&held).ok()?;
        let Some((slot, words)) = parts else {
            return Some((slid, callees));
        };
        // The matmul's right-hand matrix in four parts of whole rows along the reduction: the
        // loop over them runs in four pieces, each reading its part's four consecutive
        // columns as one vec4 (instead of every part per element).
        let parts = Parts {
            operand: 1,
            globals: (0..LANES)
                .map(|l| uniform_quads(format!("buf{slot}_{l}")))
                .collect(),
            words,
        };
        // The lanes' coordinate is a multiple of four, every other one any coordinate.
        let multiple = (0..shape.len())
            .map(|a| {
                let lanes_from_fours = a == rows.lane_axis && rows.lane_gap == 1;
                (st[a] * if lanes_from_fours { LANES } else { 1 }) as u64
            })
            .fold(0, gcd);
        let facts = IndexFacts {
            len: shape.iter().product::<usize>() as u64,
            multiple,
        };
        let (read, split) = read_parts(&slid, &parts, facts).ok()?;
        self.direct_parts += split;
        if let Some((n, stride)) = self.unmade.take().filter(|_| reads_operand(&read, 1)) {
            self.request(n, stride);
        }
        Some((read, callees))
    }

    /// The binding and words per part of a matmul's right-hand matrix `[K, N]` split in four
    /// parts of whole rows along the reduction, when the rows read it part by part.
    fn quarter_rows(&self, red: NodeId, rows: Rows) -> Option<(u32, usize)> {
        let graph = self.graph;
        let node = graph.node(red);
        let Op::MatMul {
            transpose_a,
            transpose_b,
        } = node.op
        else {
            return None;
        };
        let (a, b) = (
            &graph.ty(node.inputs[0]).shape,
            &graph.ty(node.inputs[1]).shape,
        );
        let k = if transpose_a { a[0] } else { a[1] };
        (self.split)(node.inputs[1])
            .filter(|&(_, parts, words)| {
                !transpose_b
                    && !self.chunked.contains(&red)
                    && rows.lane_gap == 1
                    && parts as usize == LANES
                    && k % LANES == 0
                    && b[1] % LANES == 0
                    && words == k / LANES * b[1]
            })
            .map(|(slot, _, words)| (slot, words))
    }
}

/// The operand a reduction reads zero-padded: where its definition clips a loop to the steps
/// whose read of it exists (a stride-1 input gradient's `dy`), that loop may run its whole
/// range with the reads outside zero ([`widen`]), provided the clipped loops all run (every
/// input element is under some output: true of stride-1 shapes, and checked, since the
/// widened reads outside rely on it).
fn padded_operand(graph: &Graph, red: NodeId) -> Option<usize> {
    let node = graph.node(red);
    let Op::Conv2dGradInput {
        stride, padding, ..
    } = &node.op
    else {
        return None;
    };
    let dy = &graph.ty(node.inputs[0]).shape;
    let w = &graph.ty(node.inputs[1]).shape;
    let x = &node.ty.shape;
    let tapped =
        (0..2).all(|a| compute::every_input_tapped(padding[a], x[2 + a], dy[2 + a], w[2 + a]));
    (*stride == [1, 1] && tapped).then_some(0)
}
