//! The element functions of a kernel: `fn v<id>(i: u32)` returning element `i` (flat,
//! row-major) of each value it touches, as kernel IR: a load for what it reads (storage,
//! uniform `vec4` arrays, windows over a chunk's images, split uniform parts, packed u8
//! words), the op's definition from `compute.rs` over its operands' functions for what it
//! computes, and a store as computed for saved values. Inlining is calling a function.

use kiln_ir::{DType, Graph, NodeId, Op};

use crate::bind::part_len;
use crate::compute;
use crate::kir::module::Item;
use crate::kir::wgsl::Callee;
use crate::kir::{self, BinOp};
use crate::plan::{Kernel, KernelKind, Placement, Plan};
use crate::text::{UniformAt, scalar_operands, strides, v};

/// How a kernel addresses its buffers: each one's binding, the index expression of a uniform
/// (or window) binding, and the parts of a split one.
pub(crate) struct Addressing<'a> {
    pub binding_of: &'a dyn Fn(usize) -> u32,
    pub uniform_at: UniformAt<'a>,
    pub split: &'a dyn Fn(usize) -> Option<(u32, u64)>,
    /// The kernel IR's view of a buffer's binding (name, space, element type).
    pub global: &'a dyn Fn(usize) -> kir::Global,
}

/// The element functions for `kernel`: loads for what it reads, formulas for what it computes.
/// `quads`: sums over uniform bindings read whole `vec4`s where they can (CPU-class targets).
pub(crate) fn element_functions(
    graph: &Graph,
    plan: &Plan,
    kernel: &Kernel,
    at: &Addressing,
    summed: &[NodeId],
    quads: bool,
) -> Vec<Item> {
    let Addressing {
        binding_of,
        uniform_at,
        split,
        global,
    } = *at;
    let mut items = Vec::new();
    for &r in &kernel.reads {
        let b = plan.buffer_of[r.0].expect("reads have buffers");
        let buf = &plan.buffers[b];
        if let Some((parts, part_bytes)) = split(b) {
            // Every part is read (an index past a part's end reads zero or a clamped
            // element) and the one holding element `i` selected: branch-free on SIMD lanes.
            let slot = binding_of(b);
            let per = (part_bytes / 16) as usize;
            let mut f = kir::Builder::new(kir::Ty::F32, Vec::new());
            let i = f.index();
            let (two, three) = (f.u32(2), f.u32(3));
            let q = f.bin(BinOp::ShiftRight, i, two);
            let q = f.let_("q", kir::Ty::U32, q);
            let l = f.bin(BinOp::BitAnd, i, three);
            let l = f.let_("l", kir::Ty::U32, l);
            let mut pick = None;
            for k in 0..parts {
                let g = f.global(kir::Global {
                    name: format!("buf{slot}_{k}"),
                    space: kir::Space::Uniform,
                    elem: kir::Ty::VEC4_F32,
                });
                let first = f.u32(k as usize * per);
                let last = f.u32((part_len(buf.bytes(), part_bytes, k) / 16 - 1) as usize);
                let at = f.sub(q, first);
                let at = f.math(kir::MathFn::Min, &[at, last]);
                let quad = f.load(g, at);
                let value = f.lane(quad, l);
                let p = f.let_(&format!("p{k}"), kir::Ty::F32, value);
                pick = Some(match pick {
                    None => p,
                    Some(before) => {
                        let past = f.bin(BinOp::Ge, q, first);
                        f.select(past, p, before)
                    }
                });
            }
            f.ret_(pick.expect("split values have parts"));
            items.push(Item::Function {
                name: v(r),
                comment: None,
                function: f.finish(),
                callees: Vec::new(),
            });
        } else if let Some(Some(w)) = uniform_at(b) {
            // A window over the chunk's images: the index is rebased to the window.
            let mut f = kir::Builder::new(kir::Ty::F32, Vec::new());
            let g = f.global(global(b));
            let i = f.index();
            let base = f.window_base(w);
            let at = f.sub(i, base);
            let at = f.let_("w", kir::Ty::U32, at);
            let (two, three) = (f.u32(2), f.u32(3));
            let q = f.bin(BinOp::ShiftRight, at, two);
            let quad = f.load(g, q);
            let l = f.bin(BinOp::BitAnd, at, three);
            let value = f.lane(quad, l);
            f.ret_(value);
            items.push(Item::Function {
                name: v(r),
                comment: None,
                function: f.finish(),
                callees: Vec::new(),
            });
        } else {
            let ret = compute::value_ty(graph.ty(r).dtype);
            let mut f = kir::Builder::new(ret, Vec::new());
            let g = f.global(global(b));
            let i = f.index();
            let value = if uniform_at(b).is_some() {
                // A uniform array of vec4s: element `i` is lane `i % 4` of vec4 `i / 4`.
                let (two, three) = (f.u32(2), f.u32(3));
                let q = f.bin(BinOp::ShiftRight, i, two);
                let quad = f.load(g, q);
                let l = f.bin(BinOp::BitAnd, i, three);
                f.lane(quad, l)
            } else if buf.packed_u8 {
                // Byte `i % 4` of word `i / 4`, little-endian.
                let (two, three, eight) = (f.u32(2), f.u32(3), f.u32(8));
                let q = f.bin(BinOp::ShiftRight, i, two);
                let word = f.load(g, q);
                let l = f.bin(BinOp::BitAnd, i, three);
                let bits = f.mul(l, eight);
                let shifted = f.bin(BinOp::ShiftRight, word, bits);
                let mask = f.u32(0xff);
                f.bin(BinOp::BitAnd, shifted, mask)
            } else {
                f.load(g, i)
            };
            f.ret_(value);
            items.push(Item::Function {
                name: v(r),
                comment: buf.packed_u8.then(|| {
                    "Byte `i` of a u8 tensor packed little-endian, four bytes to a word.".into()
                }),
                function: f.finish(),
                callees: Vec::new(),
            });
        }
    }
    // The head's entry point computes these itself, row by row.
    let in_head_main: Vec<NodeId> = match &kernel.kind {
        KernelKind::Head(h) => [
            h.loss.map(|l| l.0),
            h.loss.map(|l| l.1),
            h.correct.map(|c| c.0),
            h.correct.map(|c| c.1),
            h.grad,
        ]
        .into_iter()
        .flatten()
        .collect(),
        KernelKind::Map { .. } => Vec::new(),
    };
    for &n in kernel.nodes.iter().filter(|n| !in_head_main.contains(n)) {
        let node = graph.node(n);
        let layer = node
            .layer
            .as_ref()
            .map(|l| format!(" @{}:{}", l.index, l.kind))
            .unwrap_or_default();
        let comment = format!("{n} = {} : {}{layer}", node.op.name(), node.ty);
        // A reduction summed chunk by chunk computes the chunk's part; `v<n>` loads the sum.
        let name = if summed.contains(&n) {
            crate::text::chunk_part(&v(n))
        } else {
            v(n)
        };
        let quad_sum = if quads {
            reduce_sum_in_quads(graph, kernel, plan, n, at, summed)
        } else {
            None
        };
        if let Some(function) = quad_sum {
            items.push(Item::Function {
                name,
                comment: Some(comment),
                function,
                callees: Vec::new(),
            });
            continue;
        }
        let operands = scalar_operands(graph, n);
        let tys: Vec<kir::Ty> = operands.iter().map(|o| o.ty).collect();
        let definition = compute::element(graph, n, None, &tys, summed.contains(&n));
        let callees: Vec<Callee> = operands.into_iter().map(|o| o.callee).collect();
        let saved =
            matches!(plan.placement[n.0], Placement::Side { .. }) && kernel.stores.contains(&n);
        if !saved {
            items.push(Item::Function {
                name,
                comment: Some(comment),
                function: definition,
                callees,
            });
            continue;
        }
        // Store as computed: this kernel reads each element of a saved value exactly once.
        let value_of = format!("value_of_{}", v(n));
        let ret = definition.ret.expect("element functions return");
        items.push(Item::Function {
            name: value_of.clone(),
            comment: None,
            function: definition,
            callees,
        });
        let mut f = kir::Builder::new(ret, vec![ret]);
        let g = f.global(global(
            plan.buffer_of[n.0].expect("stored nodes have buffers"),
        ));
        let i = f.index();
        let x = f.operand(0, i);
        let value = f.let_("value", ret, x);
        f.store(g, i, value);
        f.ret_(value);
        items.push(Item::Function {
            name,
            comment: Some(comment),
            function: f.finish(),
            callees: vec![Callee::Call(value_of)],
        });
    }
    items
}

/// The body of reduction `n` reading its operand a `vec4` at a time, where the operand comes
/// straight from a uniform binding and the reduced axes end with a contiguous run in fours
/// (conv1's bias gradient sums rows of 784 per image and channel). lavapipe gathers a `vec4`
/// for about the price of 1.5 scalars, and the bias sum runs on only six invocations beside
/// the weight gradient's.
fn reduce_sum_in_quads(
    graph: &Graph,
    kernel: &Kernel,
    plan: &Plan,
    n: NodeId,
    at: &Addressing,
    summed: &[NodeId],
) -> Option<kir::Function> {
    let node = graph.node(n);
    let Op::ReduceSum { axes } = &node.op else {
        return None;
    };
    let x = node.inputs[0];
    if !kernel.reads.contains(&x) || graph.ty(x).dtype != DType::F32 {
        return None;
    }
    let buffer = plan.buffer_of[x.0]?;
    let xs = &graph.ty(x).shape;
    // The reduced axes that end the shape: one contiguous run.
    let run_from = (0..=xs.len())
        .rev()
        .take_while(|&d| d == xs.len() || axes.contains(&d))
        .last()?;
    let run: usize = xs[run_from..].iter().product();
    // A chunked sum runs over its chunk's images: the batch axis stays a loop.
    let chunked = summed.contains(&n);
    if run_from == xs.len() || run % 4 != 0 || (chunked && run_from == 0) {
        return None;
    }
    let window = (at.uniform_at)(buffer)?;
    let outer: Vec<usize> = axes.iter().copied().filter(|&a| a < run_from).collect();
    let st = strides(xs);
    let kept: Vec<usize> = (0..xs.len()).filter(|d| !axes.contains(d)).collect();
    let names: Vec<String> = kept.iter().map(|d| format!("k{d}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let kept_shape: Vec<usize> = kept.iter().map(|&d| xs[d]).collect();
    let mut f = kir::Builder::new(kir::Ty::F32, Vec::new());
    let g = f.global((at.global)(buffer));
    let i = f.index();
    let coords = f.decode(i, &refs, &kept_shape);
    let zero = f.f32(0.0);
    let zero = f.splat(zero);
    let acc = f.var("acc", kir::Ty::VEC4_F32, zero);
    // The loops over the outer reduced axes (their counters by axis), then one over the
    // run's vec4s.
    type Inner<'a> = &'a dyn Fn(&mut kir::Builder, &[(usize, kir::Expr)]);
    fn nest(
        f: &mut kir::Builder,
        loops: &[usize],
        counters: &mut Vec<(usize, kir::Expr)>,
        inner: Inner,
        (xs, chunked): (&[usize], bool),
    ) {
        let Some((&a, rest)) = loops.split_first() else {
            inner(f, counters);
            return;
        };
        let (lo, hi) = compute::batch_range(f, xs[a], chunked && a == 0);
        let mut inside = std::mem::take(counters);
        f.for_(&format!("r{a}"), lo, hi, |f, r| {
            inside.push((a, r));
            nest(f, rest, &mut inside, inner, (xs, chunked));
        });
    }
    let inner = |f: &mut kir::Builder, counters: &[(usize, kir::Expr)]| {
        let mut index: Option<kir::Expr> = None;
        for d in 0..run_from {
            let c = if axes.contains(&d) {
                counters
                    .iter()
                    .find(|(a, _)| *a == d)
                    .expect("a loop per outer axis")
                    .1
            } else {
                coords[kept.iter().position(|&k| k == d).expect("kept")]
            };
            let s = f.u32(st[d]);
            let t = f.mul(c, s);
            index = Some(match index {
                None => t,
                Some(sum) => f.add(sum, t),
            });
        }
        let index = index.unwrap_or_else(|| f.u32(0));
        let q = crate::conv_quads::uniform_index(f, index, window);
        let two = f.u32(2);
        let q = f.bin(BinOp::ShiftRight, q, two);
        let q = f.let_("q", kir::Ty::U32, q);
        let (z, quads) = (f.u32(0), f.u32(run / 4));
        f.for_("r", z, quads, |f, r| {
            let at = f.add(q, r);
            let v = f.load(g, at);
            f.add_assign(acc, v);
        });
    };
    nest(&mut f, &outer, &mut Vec::new(), &inner, (xs, chunked));
    let a = f.get(acc);
    let lanes: Vec<kir::Expr> = (0..4)
        .map(|l| {
            let l = f.u32(l);
            f.lane(a, l)
        })
        .collect();
    let sum = f.add(lanes[0], lanes[1]);
    let sum = f.add(sum, lanes[2]);
    let sum = f.add(sum, lanes[3]);
    f.ret_(sum);
    Some(f.finish())
}
