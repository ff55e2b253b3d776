//! The classifier head's entry point: softmax cross-entropy, argmax hits and the logits'
//! gradient of a whole batch in one workgroup (plan.rs makes the head kernel).

use kiln_ir::{Graph, NodeId};

use crate::compute;
use crate::kir::wgsl::Callee;
use crate::kir::{self, BinOp};
use crate::plan::{Head, Plan};
use crate::text::v;
/// The classifier head's entry point: one workgroup strides over the rows, keeping a row's
/// logits in a local array for the softmax shift, argmax, loss and gradient, then sums the
/// invocations' partial loss and count in workgroup memory.
pub(crate) fn head_main(
    graph: &Graph,
    plan: &Plan,
    h: &Head,
    global: &dyn Fn(usize) -> kir::Global,
    workgroup: u32,
) -> kir::module::Entry {
    use kir::{Literal, MathFn, Scalar, Space, Ty};
    let [n, c] = <[usize; 2]>::try_from(graph.ty(h.logits).shape.as_slice()).expect("rank 2");
    let buffer = |id: NodeId| plan.buffer_of[id.0].expect("head outputs are stored");
    // Operands: the logits, then the labels, the other side of the count, the gradient's
    // labels and its scale, where the head computes them.
    let mut callees = vec![Callee::Call(v(h.logits))];
    let mut operand_tys = vec![compute::value_ty(graph.ty(h.logits).dtype)];
    let mut operand = |id: NodeId| {
        callees.push(Callee::Call(v(id)));
        operand_tys.push(compute::value_ty(graph.ty(id).dtype));
        callees.len() - 1
    };
    let loss = h
        .loss
        .map(|(sce, r)| (operand(graph.node(sce).inputs[1]), r));
    let correct = h.correct.map(|(arg, count)| {
        let ins = &graph.node(count).inputs;
        (operand(if ins[0] == arg { ins[1] } else { ins[0] }), count)
    });
    let grad = h.grad.map(|g| {
        let ins = &graph.node(g).inputs;
        (operand(ins[1]), operand(ins[2]), g)
    });
    let mut f = kir::Builder::entry(operand_tys);
    let part_loss = f.global(kir::Global {
        name: "part_loss".into(),
        space: Space::Workgroup,
        elem: Ty::F32,
    });
    let part_count = f.global(kir::Global {
        name: "part_count".into(),
        space: Space::Workgroup,
        elem: Ty::U32,
    });
    let lid = f.local_index();
    let zero_f = f.f32(0.0);
    let loss_sum = f.var("loss", Ty::F32, zero_f);
    let zero_u = f.u32(0);
    let count = f.var("count", Ty::U32, zero_u);
    let (rows, wg) = (f.u32(n), f.u32(workgroup as usize));
    let below = |f: &mut kir::Builder, r: kir::Expr| f.bin(BinOp::Lt, r, rows);
    f.loop_("r", lid, (&below, wg, false), |f, r| {
        let z = f.var_array("z", Ty::F32, c as u32);
        let (c0, cn) = (f.u32(0), f.u32(c));
        f.for_("c", c0, cn, |f, k| {
            let cu = f.u32(c);
            let t = f.mul(r, cu);
            let at = f.add(t, k);
            let x = f.operand(0, at);
            f.assign_element(z, k, x);
        });
        f.comment("First maximum (NaN wins), shared by the softmax shift and argmax.");
        let first = f.lit(Literal::U32(0));
        let z0 = f.element(z, first);
        let m = f.var("m", Ty::F32, z0);
        let zu = f.u32(0);
        let best = f.var("best", Ty::U32, zu);
        let (c1, cn) = (f.u32(1), f.u32(c));
        f.for_("c", c1, cn, |f, k| {
            let mv = f.get(m);
            let zc = f.element(z, k);
            let takes = compute::first_max_takes(f, mv, zc, BinOp::And);
            f.if_(takes, |f| {
                f.assign(m, zc);
                f.assign(best, k);
            });
        });
        // `exp(z[k] - m)`: the softmax's numerator, summed here and divided in the gradient.
        let shifted_exp = |f: &mut kir::Builder, k: kir::Expr| {
            let zc = f.element(z, k);
            let mv = f.get(m);
            let d = f.sub(zc, mv);
            f.math(MathFn::Exp, &[d])
        };
        let zf = f.f32(0.0);
        let s = f.var("s", Ty::F32, zf);
        let (c0, cn) = (f.u32(0), f.u32(c));
        f.for_("c", c0, cn, |f, k| {
            let e = shifted_exp(f, k);
            f.add_assign(s, e);
        });
        let label = |f: &mut kir::Builder, k: usize, name: &str| {
            let l = f.operand(k, r);
            let l = compute::clamped_label(f, l, c);
            f.let_(name, Ty::U32, l)
        };
        if let Some((k, _)) = loss {
            let l = label(f, k, "loss_label");
            let (mv, sv) = (f.get(m), f.get(s));
            let ls = f.math(MathFn::Log, &[sv]);
            let t = f.add(mv, ls);
            let zl = f.element(z, l);
            let t = f.sub(t, zl);
            f.add_assign(loss_sum, t);
        }
        if let Some((k, _)) = correct {
            let bv = f.get(best);
            let bi = f.cast(Scalar::I32, bv);
            let o = f.operand(k, r);
            let oi = f.cast(Scalar::I32, o);
            let hit = f.bin(BinOp::Eq, bi, oi);
            f.if_(hit, |f| {
                let one = f.u32(1);
                f.add_assign(count, one);
            });
        }
        if let Some((kl, kd, g)) = grad {
            let l = label(f, kl, "grad_label");
            let d = f.operand(kd, r);
            let dloss = f.let_("dloss", Ty::F32, d);
            let out = f.global(global(buffer(g)));
            let (c0, cn) = (f.u32(0), f.u32(c));
            f.for_("c", c0, cn, |f, k| {
                let e = shifted_exp(f, k);
                let sv = f.get(s);
                let p = f.div(e, sv);
                let p = f.let_("p", Ty::F32, p);
                let is = f.bin(BinOp::Eq, k, l);
                let (zero, one) = (f.f32(0.0), f.f32(1.0));
                let onehot = f.select(is, one, zero);
                let t = f.sub(p, onehot);
                let value = f.mul(t, dloss);
                let cu = f.u32(c);
                let row = f.mul(r, cu);
                let at = f.add(row, k);
                f.store(out, at, value);
            });
        }
    });
    f.comment(&format!(
        "Tree reduction over the workgroup: {workgroup} partial sums become one in slot 0."
    ));
    let (lv, cv) = (f.get(loss_sum), f.get(count));
    f.store(part_loss, lid, lv);
    f.store(part_count, lid, cv);
    f.barrier();
    let (wgu, two) = (f.u32(workgroup as usize), f.u32(2));
    let half = f.div(wgu, two);
    let positive = |f: &mut kir::Builder, s: kir::Expr| {
        let z = f.u32(0);
        f.bin(BinOp::Gt, s, z)
    };
    f.loop_("stride", half, (&positive, two, true), |f, stride| {
        let inside = f.bin(BinOp::Lt, lid, stride);
        f.if_(inside, |f| {
            let other = f.add(lid, stride);
            for g in [part_loss, part_count] {
                let (a, b) = (f.load(g, lid), f.load(g, other));
                let sum = f.add(a, b);
                f.store(g, lid, sum);
            }
        });
        f.barrier();
    });
    let z = f.u32(0);
    let first = f.bin(BinOp::Eq, lid, z);
    f.if_(first, |f| {
        let zero = f.lit(Literal::U32(0));
        for (result, part) in [
            (loss.map(|(_, r)| r), part_loss),
            (correct.map(|(_, r)| r), part_count),
        ] {
            if let Some(r) = result {
                let out = f.global(global(buffer(r)));
                let x = f.load(part, zero);
                f.store(out, zero, x);
            }
        }
    });
    kir::module::Entry {
        workgroup_size: workgroup,
        function: f.finish(),
        callees,
        workgroup: vec![
            ("part_loss".into(), Ty::F32, workgroup),
            ("part_count".into(), Ty::U32, workgroup),
        ],
        spans: Vec::new(),
    }
}
