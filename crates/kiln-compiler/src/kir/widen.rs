//! Widening a loop whose bounds clip a literal range to the whole range, its reads of one
//! operand predicated: `for c in u32(max(a, L))..u32(min(b, U))` becomes `for c in L..U`, and
//! each read of the guarded operand is zero where `a <= c < b` fails. Its index there is
//! the one it had at the narrow loop's first step, so the read stays inside what the narrow
//! loop read: the caller promises that the narrow loop runs at least once (for every value of
//! what its bounds depend on).
//!
//! Why: copies held along an axis (`kir::unroll`) share their loops, and bounds that depend
//! on the held coordinate differ per copy; the literal range does not. The bounds of a
//! stride-1 convolution's input gradient clip its kernel columns to the taps whose `dy`
//! pixel exists: widened with `dy` guarded, the taps outside read zero, which is the
//! padding's meaning.
//!
//! What widens: the loop's body only accumulates (`let`s, `acc += value`, inner loops of the
//! same), and every guarded read is a factor of a product it adds, so a step outside the
//! bounds adds zero, as the narrow loop adds nothing (exactly so where the other factors are
//! finite). The predicate is written `c - a >= 0 && c - b < 0` (in `i32`; the bounds are
//! small), so that it is a sum of the counter and the copies' coordinates that
//! `kir::slide` can follow from step to step.
//!
//! [`predicate`] is the same for a step that skips itself: a convolution's tap in the
//! padding (`if v < 0 || v >= n { continue; }`) runs, its reads of the guarded operand zero
//! there and at `v` clamped into `0..n` (the row or column the tap lands nearest), with the
//! same rule on what the steps add.

use std::collections::{HashMap, HashSet};

use super::unroll::map_children;
use super::{
    BinOp, Block, Expr, ExprKind, Function, Literal, Local, MathFn, Scalar, Stmt, Ty, validate,
};
use super::{top_lets, walk_exprs};

/// `f` with its loop whose counter is named `name` widened, reads of operand `guarded`
/// predicated; an error saying why where it does not widen. The loop must run at least once
/// as it is (see the module's documentation).
pub fn widen(f: &Function, name: &str, guarded: usize) -> Result<Function, String> {
    let (mut w, mut body) = Widener::new(f, guarded)?;
    let lets = top_lets(&body);
    let done = w.block(&mut body, name, &lets)?;
    if !done {
        return Err(format!("no loop `{name}`"));
    }
    // The bounds' `let`s are left unread: gone, so that no copy computes them.
    let mut used = HashSet::new();
    uses(&w.f, &body, &mut used);
    body.retain(|s| !matches!(s, Stmt::Let { local, .. } if !used.contains(local)));
    w.f.body = body;
    validate(&w.f).map_err(|e| format!("widening left invalid kernel IR: {}", e.0))?;
    Ok(w.f)
}

/// `f` with every padding test, `if v < 0 || v >= n { continue; }` at the top level of a
/// loop's body (`v` an `i32` `let`, `n` a literal: a convolution's tap that lands in the
/// padding), removed: each read of operand `guarded` after it, at any depth, is zero where
/// `0 <= v < n` fails, and reads at `u32(v)` clamped into `0..n`. An error saying why where
/// a test does not go (the statements after it must only accumulate, each addition with a
/// guarded factor; no other operand's index may depend on `v`), or where there is none.
///
/// Why: copies held along an axis (`kir::unroll`) share their `continue`s, and a tap's test
/// differs per output column or row. The caller promises that `v` is a coordinate of the
/// guarded operand along an axis of `n` (so the clamped reads are its elements), as a
/// convolution's input coordinate is.
pub fn predicate(f: &Function, guarded: usize) -> Result<Function, String> {
    let (mut w, mut body) = Widener::new(f, guarded)?;
    let mut seen = HashSet::new();
    let tests = w.skips(&mut body, &[], &HashMap::new(), &mut seen)?;
    if tests == 0 {
        return Err("no padding test".into());
    }
    w.f.body = body;
    validate(&w.f).map_err(|e| format!("predication left invalid kernel IR: {}", e.0))?;
    Ok(w.f)
}

/// `if cond { continue; }`.
fn is_skip(accept: &Block, reject: &Block) -> bool {
    matches!(accept.as_slice(), [Stmt::Continue]) && reject.is_empty()
}

/// A padding test in force: its coordinate, the axis's length, and the condition that every
/// test in force passes (this one and those of the loops around it).
#[derive(Clone, Copy)]
struct Skip {
    v: Local,
    n: i64,
    inside: Expr,
}

struct Widener {
    f: Function,
    types: Vec<Option<Ty>>,
    guarded: usize,
}

impl Widener {
    /// A widener of `f`, and `f`'s body taken out of it to be rewritten.
    fn new(f: &Function, guarded: usize) -> Result<(Self, Block), String> {
        let info = validate(f).map_err(|e| e.0)?;
        let mut w = Widener {
            f: f.clone(),
            types: info.types,
            guarded,
        };
        let body = std::mem::take(&mut w.f.body);
        Ok((w, body))
    }

    fn push(&mut self, kind: ExprKind) -> Expr {
        self.f.exprs.push(kind);
        Expr(self.f.exprs.len() as u32 - 1)
    }

    /// Widens the loop `name` in `block` (at any depth); whether it was found.
    fn block(
        &mut self,
        block: &mut Block,
        name: &str,
        lets: &[(Local, Expr)],
    ) -> Result<bool, String> {
        let mut lets = lets.to_vec();
        lets.extend(top_lets(block));
        for s in block.iter_mut() {
            let found = match s {
                Stmt::For {
                    counter,
                    start,
                    end,
                    body,
                    ..
                } if self.f.local(*counter).name == name => {
                    let (a, lo) = self.clip(*start, &lets, MathFn::Max)?;
                    let (b, hi) = self.clip(*end, &lets, MathFn::Min)?;
                    if lo < 0 || hi <= lo {
                        return Err(format!("loop `{name}` clips an empty range"));
                    }
                    self.accumulates(body, false)?;
                    let c = self.push(ExprKind::Local(*counter));
                    let c = self.push(ExprKind::Cast {
                        to: Scalar::I32,
                        value: c,
                    });
                    let from = |w: &mut Self, bound: Expr, op: BinOp| {
                        let d = w.push(ExprKind::Binary {
                            op: BinOp::Sub,
                            left: c,
                            right: bound,
                        });
                        let zero = w.push(ExprKind::Literal(Literal::I32(0)));
                        w.push(ExprKind::Binary {
                            op,
                            left: d,
                            right: zero,
                        })
                    };
                    let (after, before) = (from(self, a, BinOp::Ge), from(self, b, BinOp::Lt));
                    let inside = self.push(ExprKind::Binary {
                        op: BinOp::And,
                        left: after,
                        right: before,
                    });
                    let first = *start;
                    self.guard(body, inside, *counter, first);
                    *start = self.push(ExprKind::Literal(Literal::U32(lo as u32)));
                    *end = self.push(ExprKind::Literal(Literal::U32(hi as u32)));
                    return Ok(true);
                }
                Stmt::For { body, .. } | Stmt::Loop { body, .. } | Stmt::Block(body) => {
                    self.block(body, name, &lets)?
                }
                Stmt::If { accept, reject, .. } => {
                    self.block(accept, name, &lets)? || self.block(reject, name, &lets)?
                }
                _ => false,
            };
            if found {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Removes the padding tests of `block` (and of the loops inside), predicating the guarded
    /// reads after each; `outer` are the tests in force around it. How many it removed.
    fn skips(
        &mut self,
        block: &mut Block,
        outer: &[Skip],
        lets: &HashMap<Local, Expr>,
        seen: &mut HashSet<Expr>,
    ) -> Result<usize, String> {
        let mut skips = outer.to_vec();
        let mut lets = lets.clone();
        lets.extend(top_lets(block));
        let statements = std::mem::take(block);
        let mut removed = 0;
        for (at, s) in statements.iter().enumerate() {
            if let Stmt::If {
                cond,
                accept,
                reject,
            } = s
            {
                if is_skip(accept, reject) {
                    let (v, n) = self.padding_test(*cond, &lets)?;
                    self.accumulates(&statements[at + 1..], true)?;
                    let inside = self.inside(*cond);
                    let inside = match skips.last() {
                        Some(o) => self.push(ExprKind::Binary {
                            op: BinOp::And,
                            left: o.inside,
                            right: inside,
                        }),
                        None => inside,
                    };
                    skips.push(Skip { v, n, inside });
                    removed += 1;
                    continue;
                }
            }
            let mut s = s.clone();
            match &mut s {
                Stmt::For { body, .. } => removed += self.skips(body, &skips, &lets, seen)?,
                Stmt::Let { value, .. } | Stmt::Assign { value, .. } if !skips.is_empty() => {
                    let mut reads = Vec::new();
                    self.all_reads(*value, seen, &mut reads);
                    for e in reads {
                        self.predicate_read(e, &skips, &lets)?;
                    }
                }
                _ => {}
            }
            block.push(s);
        }
        Ok(removed)
    }

    /// A padding test `v < 0 || v >= n` as `v` and `n`.
    fn padding_test(
        &self,
        cond: Expr,
        lets: &HashMap<Local, Expr>,
    ) -> Result<(Local, i64), String> {
        let not_a_test = || "a `continue` that is not a padding test".to_string();
        let ExprKind::Binary {
            op: BinOp::Or,
            left,
            right,
        } = self.f.expr(cond)
        else {
            return Err(not_a_test());
        };
        let side = |e: Expr, want: BinOp| match self.f.expr(e) {
            ExprKind::Binary { op, left, right } if *op == want => {
                match (self.f.expr(*left), self.f.expr(*right)) {
                    (ExprKind::Local(v), ExprKind::Literal(Literal::I32(n))) => {
                        Some((*v, i64::from(*n)))
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        match (side(*left, BinOp::Lt), side(*right, BinOp::Ge)) {
            (Some((v, 0)), Some((u, n)))
                if v == u && n > 0 && lets.contains_key(&v) && self.f.local(v).ty == Ty::I32 =>
            {
                Ok((v, n))
            }
            _ => Err(not_a_test()),
        }
    }

    /// `v >= 0 && v < n` of a padding test `v < 0 || v >= n`.
    fn inside(&mut self, test: Expr) -> Expr {
        let ExprKind::Binary { left, right, .. } = self.f.expr(test).clone() else {
            unreachable!("a padding test")
        };
        let flip = |w: &mut Self, e: Expr, to: BinOp| {
            let ExprKind::Binary { left, right, .. } = w.f.expr(e).clone() else {
                unreachable!("a comparison")
            };
            w.push(ExprKind::Binary {
                op: to,
                left,
                right,
            })
        };
        let (after, before) = (flip(self, left, BinOp::Ge), flip(self, right, BinOp::Lt));
        self.push(ExprKind::Binary {
            op: BinOp::And,
            left: after,
            right: before,
        })
    }

    /// Every operand read in `e` not seen before.
    fn all_reads(&self, e: Expr, seen: &mut HashSet<Expr>, out: &mut Vec<Expr>) {
        if !seen.insert(e) {
            return;
        }
        if matches!(self.f.expr(e), ExprKind::Operand { .. }) {
            out.push(e);
        }
        map_children(self.f.expr(e).clone(), &mut |c| {
            self.all_reads(c, seen, out);
            c
        });
    }

    /// Read `e` under the padding tests `skips`: a guarded read zero outside and at its
    /// coordinates clamped; an error for another operand's read that depends on them.
    fn predicate_read(
        &mut self,
        e: Expr,
        skips: &[Skip],
        lets: &HashMap<Local, Expr>,
    ) -> Result<(), String> {
        let ExprKind::Operand { k, index } = self.f.expr(e).clone() else {
            unreachable!("reads are operand reads")
        };
        let clamped = self.clamped(index, skips, lets);
        if k != self.guarded {
            return if clamped == index {
                Ok(())
            } else {
                Err(format!(
                    "operand {k}'s index depends on a padding test's coordinate"
                ))
            };
        }
        let read = self.push(ExprKind::Operand { k, index: clamped });
        let zero = self.push(ExprKind::Literal(Literal::F32(0.0)));
        let zero = match self.types[e.index()] {
            Some(Ty::Vec4(_)) => self.push(ExprKind::Splat(zero)),
            _ => zero,
        };
        let inside = skips
            .last()
            .expect("reads are predicated under tests")
            .inside;
        self.f.exprs[e.index()] = ExprKind::Select {
            cond: inside,
            accept: read,
            reject: zero,
        };
        Ok(())
    }

    /// `e` with each test's coordinate clamped into its axis (`let`s that read one written
    /// out); `e` itself where it reads none.
    fn clamped(&mut self, e: Expr, skips: &[Skip], lets: &HashMap<Local, Expr>) -> Expr {
        match self.f.expr(e).clone() {
            ExprKind::Local(l) => {
                if let Some(s) = skips.iter().find(|s| s.v == l) {
                    let (z, last) = (
                        self.push(ExprKind::Literal(Literal::I32(0))),
                        self.push(ExprKind::Literal(Literal::I32((s.n - 1) as i32))),
                    );
                    return self.push(ExprKind::Math {
                        fun: MathFn::Clamp,
                        args: vec![e, z, last],
                    });
                }
                match lets.get(&l) {
                    Some(&v) => {
                        let c = self.clamped(v, skips, lets);
                        if c == v { e } else { c }
                    }
                    None => e,
                }
            }
            kind => {
                let mut changed = false;
                let new = map_children(kind, &mut |c| {
                    let n = self.clamped(c, skips, lets);
                    changed |= n != c;
                    n
                });
                if changed { self.push(new) } else { e }
            }
        }
    }

    /// A bound `u32(fun(value, L))` (through a `let`) as `value` and `L`.
    fn clip(
        &self,
        bound: Expr,
        lets: &[(Local, Expr)],
        fun: MathFn,
    ) -> Result<(Expr, i64), String> {
        let mut e = bound;
        while let ExprKind::Local(l) = self.f.expr(e) {
            match lets.iter().find(|(m, _)| m == l) {
                Some(&(_, v)) => e = v,
                None => break,
            }
        }
        let ExprKind::Cast {
            to: Scalar::U32,
            value,
        } = self.f.expr(e)
        else {
            return Err("a bound is not a clipped i32".into());
        };
        match self.f.expr(*value) {
            ExprKind::Math { fun: g, args } if *g == fun && args.len() == 2 => {
                match self.f.expr(args[1]) {
                    ExprKind::Literal(Literal::I32(n)) => Ok((args[0], i64::from(*n))),
                    _ => Err("a bound clips to no literal".into()),
                }
            }
            _ => Err(format!("a bound is not {fun:?} of a value and a literal")),
        }
    }

    /// Whether `body` only accumulates, each addition a product with a guarded read among its
    /// factors (so that it adds zero where the read is zero). Padding tests
    /// ([`predicate`]'s) may stand among the statements where `skips` allows them.
    fn accumulates(&self, body: &[Stmt], skips: bool) -> Result<(), String> {
        for s in body {
            match s {
                Stmt::Let { value, .. } => self.unguarded(*value)?,
                Stmt::Assign {
                    op: Some(BinOp::Add),
                    value,
                    ..
                } => {
                    if !self.factors(*value)? {
                        return Err(format!(
                            "an accumulation has no factor read from operand {}",
                            self.guarded
                        ));
                    }
                }
                Stmt::For {
                    start, end, body, ..
                } => {
                    self.unguarded(*start)?;
                    self.unguarded(*end)?;
                    self.accumulates(body, skips)?;
                }
                Stmt::If {
                    cond,
                    accept,
                    reject,
                } if skips && is_skip(accept, reject) => self.unguarded(*cond)?,
                _ => return Err("the loop does more than accumulate".into()),
            }
        }
        Ok(())
    }

    fn is_guarded(&self, e: Expr) -> bool {
        matches!(self.f.expr(e), ExprKind::Operand { k, .. } if *k == self.guarded)
    }

    /// A product: guarded reads may be its factors (also splat to four lanes); whether one is.
    fn factors(&self, e: Expr) -> Result<bool, String> {
        match self.f.expr(e) {
            ExprKind::Binary {
                op: BinOp::Mul,
                left,
                right,
            } => Ok(self.factors(*left)? | self.factors(*right)?),
            ExprKind::Splat(value) if self.is_guarded(*value) => self.factors(*value),
            ExprKind::Operand { index, .. } if self.is_guarded(e) => {
                self.unguarded(*index)?;
                Ok(true)
            }
            _ => self.unguarded(e).map(|()| false),
        }
    }

    /// An expression that reads no guarded operand.
    fn unguarded(&self, e: Expr) -> Result<(), String> {
        if self.is_guarded(e) {
            return Err(format!(
                "operand {} is read other than as a factor",
                self.guarded
            ));
        }
        let mut r = Ok(());
        map_children(self.f.expr(e).clone(), &mut |c| {
            if r.is_ok() {
                r = self.unguarded(c);
            }
            c
        });
        r
    }

    /// Every guarded read of `body` zero where `inside` fails, its index then the one at the
    /// narrow loop's first step (`counter` at `first`).
    fn guard(&mut self, body: &Block, inside: Expr, counter: Local, first: Expr) {
        let mut reads = Vec::new();
        let mut seen = HashSet::new();
        for s in body {
            self.guarded_reads(s, &mut seen, &mut reads);
        }
        let lets: HashMap<Local, Expr> = top_lets(body).into_iter().collect();
        for e in reads {
            let ExprKind::Operand { k, index } = self.f.expr(e).clone() else {
                unreachable!("guarded reads are operand reads")
            };
            let at_first = self.at(index, counter, first, &lets);
            let at = self.push(ExprKind::Select {
                cond: inside,
                accept: index,
                reject: at_first,
            });
            let read = self.push(ExprKind::Operand { k, index: at });
            let zero = self.push(ExprKind::Literal(Literal::F32(0.0)));
            let zero = match self.types[e.index()] {
                Some(Ty::Vec4(_)) => self.push(ExprKind::Splat(zero)),
                _ => zero,
            };
            self.f.exprs[e.index()] = ExprKind::Select {
                cond: inside,
                accept: read,
                reject: zero,
            };
        }
    }

    /// `e` with `counter` at `value`, the body's `let`s it reads written out.
    fn at(&mut self, e: Expr, counter: Local, value: Expr, lets: &HashMap<Local, Expr>) -> Expr {
        match self.f.expr(e).clone() {
            ExprKind::Local(l) if l == counter => value,
            ExprKind::Local(l) => match lets.get(&l) {
                Some(&v) => self.at(v, counter, value, lets),
                None => e,
            },
            kind => {
                let mut changed = false;
                let new = map_children(kind, &mut |c| {
                    let n = self.at(c, counter, value, lets);
                    changed |= n != c;
                    n
                });
                if changed { self.push(new) } else { e }
            }
        }
    }

    fn guarded_reads(&self, s: &Stmt, seen: &mut HashSet<Expr>, out: &mut Vec<Expr>) {
        let mut visit = |e: Expr, out: &mut Vec<Expr>| self.reads_in(e, seen, out);
        match s {
            Stmt::Assign { value, .. } | Stmt::Let { value, .. } => visit(*value, out),
            Stmt::For { body, .. } => {
                for s in body {
                    self.guarded_reads(s, seen, out);
                }
            }
            _ => {}
        }
    }

    fn reads_in(&self, e: Expr, seen: &mut HashSet<Expr>, out: &mut Vec<Expr>) {
        if !seen.insert(e) {
            return;
        }
        if self.is_guarded(e) {
            out.push(e);
            return;
        }
        map_children(self.f.expr(e).clone(), &mut |c| {
            self.reads_in(c, seen, out);
            c
        });
    }
}

/// The locals any expression of `block` reads, at any depth.
fn uses(f: &Function, block: &Block, out: &mut HashSet<Local>) {
    fn expr(f: &Function, e: Expr, out: &mut HashSet<Local>) {
        let kind = f.expr(e).clone();
        if let ExprKind::Local(l) | ExprKind::Element { local: l, .. } = kind {
            out.insert(l);
        }
        map_children(kind, &mut |c| {
            expr(f, c, out);
            c
        });
    }
    walk_exprs(block, &mut |e| expr(f, e, out));
}

#[cfg(test)]
mod tests {
    use super::super::interp::{Env, Lanes, Value, eval};
    use super::super::slide::slide;
    use super::super::slide::tests::Counting;
    use super::super::unroll::{HeldAxis, unroll};
    use super::super::{Builder, ChunkBound};
    use super::*;

    /// The elements read, by operand.
    #[derive(Default)]
    struct Recording {
        read: HashSet<(usize, u32)>,
    }

    impl Env for Recording {
        fn operand(&mut self, k: usize, index: u32) -> Lanes {
            self.read.insert((k, index));
            Lanes::Scalar(Value::F32(index as f32))
        }
        fn chunk(&self, _: ChunkBound) -> u32 {
            unreachable!("no chunks here")
        }
    }

    const ROWS: usize = 4;
    const OW: usize = 6;
    const KW: usize = 3;
    const PAD: usize = 1;
    /// A padded stride-1 convolution's input width.
    const W: usize = OW + KW - 1 - 2 * PAD;

    /// A one-dimensional input gradient over `[ROWS, W]`: `dx[r, w]` sums
    /// `dy[r, w + PAD - kx] * k[r, kx]` over the kernel columns whose `dy` exists, the loop's
    /// bounds clipped to them.
    fn input_gradient() -> Function {
        let mut b = Builder::new(Ty::F32, vec![Ty::F32, Ty::F32]);
        let i = b.index();
        let [r, w] = b.decode(i, &["r", "w"], &[ROWS, W])[..] else {
            unreachable!()
        };
        let wi = b.cast(Scalar::I32, w);
        let p = b.i32(PAD);
        let t = b.add(wi, p);
        let last = b.i32(OW - 1);
        let t = b.sub(t, last);
        let z = b.i32(0);
        let lo = b.math(MathFn::Max, &[t, z]);
        let lo = b.cast(Scalar::U32, lo);
        let lo = b.let_("kx_lo", Ty::U32, lo);
        let wi = b.cast(Scalar::I32, w);
        let t = b.add(wi, p);
        let one = b.i32(1);
        let t = b.add(t, one);
        let k = b.i32(KW);
        let end = b.math(MathFn::Min, &[t, k]);
        let end = b.cast(Scalar::U32, end);
        let end = b.let_("kx_end", Ty::U32, end);
        let zero = b.f32(0.0);
        let acc = b.var("acc", Ty::F32, zero);
        b.for_("kx", lo, end, |b, kx| {
            let pu = b.u32(PAD);
            let t = b.add(w, pu);
            let ox = b.sub(t, kx);
            let row = b.u32(OW);
            let at = b.mul(r, row);
            let at = b.add(at, ox);
            let at = b.let_("at", Ty::U32, at);
            let d = b.operand(0, at);
            let kw = b.u32(KW);
            let k = b.mul(r, kw);
            let k = b.add(k, kx);
            let k = b.operand(1, k);
            let t = b.mul(d, k);
            b.add_assign(acc, t);
        });
        let v = b.get(acc);
        b.ret_(v);
        b.finish()
    }

    fn value(f: &Function, i: u32, env: &mut Counting) -> Lanes {
        eval(f, i, env).unwrap().unwrap()
    }

    #[test]
    fn a_widened_loop_reads_zero_outside_its_bounds() {
        let f = input_gradient();
        let wide = widen(&f, "kx", 0).unwrap();
        for i in 0..(ROWS * W) as u32 {
            let (mut a, mut b) = (Counting::default(), Counting::default());
            assert_eq!(value(&f, i, &mut a), value(&wide, i, &mut b), "element {i}");
            // Every kernel column, guarded reads included.
            assert_eq!(b.reads, 2 * KW);
            // Outside the bounds, only `dy` elements the narrow loop reads (a window over
            // some images holds no others); the weights' reads are all inside.
            let (mut narrow, mut widened) = (Recording::default(), Recording::default());
            eval(&f, i, &mut narrow).unwrap();
            eval(&wide, i, &mut widened).unwrap();
            let guarded: HashSet<_> = widened.read.iter().filter(|(k, _)| *k == 0).collect();
            assert!(
                guarded.iter().all(|r| narrow.read.contains(r)),
                "element {i}"
            );
        }
        let text = super::super::wgsl::body(
            &wide,
            &[
                super::super::wgsl::Callee::Call("dy".into()),
                super::super::wgsl::Callee::Call("k".into()),
            ],
        )
        .unwrap();
        assert!(text.contains("for (var kx = 0u; kx < 3u; kx++)"), "{text}");
        assert!(!text.contains("kx_end"), "{text}");
    }

    #[test]
    fn held_columns_of_a_widened_loop_slide_their_guarded_reads() {
        let f = input_gradient();
        let wide = widen(&f, "kx", 0).unwrap();
        let axis = HeldAxis {
            stride: 1,
            extent: W,
        };
        let copies: Vec<Vec<usize>> = (0..2).map(|k| vec![k]).collect();
        assert!(unroll(&f, &[axis], &copies).is_err());
        let held = unroll(&wide, &[axis], &copies).unwrap();
        let (slid, windows) = slide(&held).unwrap();
        assert_eq!(windows, 1);
        for first in (0..(ROWS * W) as u32).step_by(2) {
            let mut env = Counting::default();
            let Lanes::Array(got) = value(&slid, first, &mut env) else {
                panic!("an array")
            };
            for (k, got) in got.iter().enumerate() {
                let want = value(&f, first + k as u32, &mut Counting::default());
                assert_eq!(*got, want, "element {first} column {k}");
            }
            // One `dy` before the loop; per step one `dy` and one weight for both columns.
            assert_eq!(env.reads, 1 + KW * 2, "element {first}");
        }
    }

    /// The axes of a `[rows, width]` space and the copies of a 2x2 block of it, row-major.
    fn two_by_two(rows: usize, width: usize) -> ([HeldAxis; 2], Vec<Vec<usize>>) {
        let axes = [
            HeldAxis {
                stride: width,
                extent: rows,
            },
            HeldAxis {
                stride: 1,
                extent: width,
            },
        ];
        let copies = (0..2)
            .flat_map(|r| (0..2).map(move |c| vec![r, c]))
            .collect();
        (axes, copies)
    }

    #[test]
    fn rows_and_columns_of_a_widened_loop_slide_a_window_per_row() {
        let f = input_gradient();
        let wide = widen(&f, "kx", 0).unwrap();
        let (axes, copies) = two_by_two(ROWS, W);
        let held = unroll(&wide, &axes, &copies).unwrap();
        let (slid, windows) = slide(&held).unwrap();
        assert_eq!(windows, 2);
        for r in (0..ROWS as u32).step_by(2) {
            for w in (0..W as u32).step_by(2) {
                let first = r * W as u32 + w;
                let mut env = Counting::default();
                let Lanes::Array(got) = value(&slid, first, &mut env) else {
                    panic!("an array")
                };
                for (k, got) in got.iter().enumerate() {
                    let at = first + (k as u32 / 2) * W as u32 + k as u32 % 2;
                    let want = value(&f, at, &mut Counting::default());
                    assert_eq!(*got, want, "element {first} copy {k}");
                }
                // Per row: one `dy` before the loop, then per step one `dy` and one weight
                // (the row's columns share it).
                assert_eq!(env.reads, 2 * (1 + KW * 2), "element {first}");
            }
        }
    }

    /// `sum over kx in u32(max(i, 0))..u32(min(i, 4)) of term(kx)`.
    fn clipped_sum(term: fn(&mut Builder, Expr) -> Expr) -> Function {
        let mut b = Builder::new(Ty::F32, vec![Ty::F32]);
        let i = b.index();
        let ii = b.cast(Scalar::I32, i);
        let z = b.i32(0);
        let lo = b.math(MathFn::Max, &[ii, z]);
        let lo = b.cast(Scalar::U32, lo);
        let four = b.i32(4);
        let end = b.math(MathFn::Min, &[ii, four]);
        let end = b.cast(Scalar::U32, end);
        let zero = b.f32(0.0);
        let acc = b.var("acc", Ty::F32, zero);
        b.for_("kx", lo, end, |b, kx| {
            let t = term(b, kx);
            b.add_assign(acc, t);
        });
        let v = b.get(acc);
        b.ret_(v);
        b.finish()
    }

    #[test]
    fn loops_that_do_more_than_accumulate_or_read_outside_a_product_stay() {
        let f = clipped_sum(|b, kx| {
            let d = b.operand(0, kx);
            b.math(MathFn::Exp, &[d])
        });
        let err = widen(&f, "kx", 0).unwrap_err();
        assert!(err.contains("other than as a factor"), "{err}");
        assert!(widen(&f, "ky", 0).unwrap_err().contains("no loop `ky`"));
        // Literal bounds clip nothing.
        let wide = widen(&input_gradient(), "kx", 0).unwrap();
        let err = widen(&wide, "kx", 0).unwrap_err();
        assert!(err.contains("not a clipped i32"), "{err}");
    }

    /// Operand `k`'s element `i` is `(k + 1) * i + 0.25`, read only below `len[k]`.
    struct Bounded {
        len: [u32; 2],
        reads: usize,
    }

    impl Env for Bounded {
        fn operand(&mut self, k: usize, index: u32) -> Lanes {
            assert!(index < self.len[k], "operand {k} read at {index}");
            self.reads += 1;
            Lanes::Scalar(Value::F32((k as f32 + 1.0) * index as f32 + 0.25))
        }
        fn chunk(&self, _: ChunkBound) -> u32 {
            unreachable!("no chunks here")
        }
    }

    const H: usize = 6;
    const KH: usize = 3;
    /// A padded convolution's input width (and its output's, padded by one).
    const IW: usize = 8;

    fn bounded() -> Bounded {
        Bounded {
            len: [(H * IW) as u32, (KH * KW) as u32],
            reads: 0,
        }
    }

    /// `i32(outer + k) - PAD`, and `continue` where it lies outside `0..size`: a tap.
    fn tap(b: &mut Builder, name: &str, outer: Expr, k: Expr, size: usize) -> Expr {
        let t = b.add(outer, k);
        let t = b.cast(Scalar::I32, t);
        let p = b.i32(PAD);
        let t = b.sub(t, p);
        let v = b.let_(name, Ty::I32, t);
        let (z, n) = (b.i32(0), b.i32(size));
        let (lo, hi) = (b.bin(BinOp::Lt, v, z), b.bin(BinOp::Ge, v, n));
        let outside = b.bin(BinOp::Or, lo, hi);
        b.continue_if(outside);
        b.cast(Scalar::U32, v)
    }

    /// A stride-1 convolution of a `[H, IW]` image with a `[KH, KW]` kernel, padded by
    /// `PAD` (the output is `[H, IW]`), skipping the taps in the padding; `term` makes what
    /// a tap adds from its pixel and weight.
    fn padded_convolution(term: fn(&mut Builder, Expr, Expr) -> Expr) -> Function {
        let mut b = Builder::new(Ty::F32, vec![Ty::F32, Ty::F32]);
        let i = b.index();
        let [oy, ox] = b.decode(i, &["oy", "ox"], &[H, IW])[..] else {
            unreachable!()
        };
        let zero = b.f32(0.0);
        let acc = b.var("acc", Ty::F32, zero);
        let (z, kh) = (b.u32(0), b.u32(KH));
        b.for_("ky", z, kh, |b, ky| {
            let iy = tap(b, "iy", oy, ky, H);
            let (z, kw) = (b.u32(0), b.u32(KW));
            b.for_("kx", z, kw, |b, kx| {
                let ix = tap(b, "ix", ox, kx, IW);
                let w = b.u32(IW);
                let at = b.mul(iy, w);
                let at = b.add(at, ix);
                let x = b.operand(0, at);
                let kwu = b.u32(KW);
                let k = b.mul(ky, kwu);
                let k = b.add(k, kx);
                let k = b.operand(1, k);
                let t = term(b, x, k);
                b.add_assign(acc, t);
            });
        });
        let v = b.get(acc);
        b.ret_(v);
        b.finish()
    }

    fn product(b: &mut Builder, x: Expr, k: Expr) -> Expr {
        b.mul(x, k)
    }

    #[test]
    fn predicated_padding_reads_zero_and_stays_inside() {
        let f = padded_convolution(product);
        let p = predicate(&f, 0).unwrap();
        for i in 0..(H * IW) as u32 {
            let (mut a, mut b) = (bounded(), bounded());
            assert_eq!(
                eval(&f, i, &mut a).unwrap(),
                eval(&p, i, &mut b).unwrap(),
                "element {i}"
            );
            // Every tap, those in the padding included.
            assert_eq!(b.reads, 2 * KH * KW, "element {i}");
        }
        let text = super::super::wgsl::body(
            &p,
            &[
                super::super::wgsl::Callee::Call("x".into()),
                super::super::wgsl::Callee::Call("k".into()),
            ],
        )
        .unwrap();
        assert!(!text.contains("continue"), "{text}");
        assert!(text.contains("clamp(ix, 0i, 7i)"), "{text}");
    }

    #[test]
    fn the_taps_of_a_pooling_window_held_and_slid_share_their_pixels() {
        let f = padded_convolution(product);
        let (axes, copies) = two_by_two(H, IW);
        assert_eq!(
            unroll(&f, &axes, &copies).unwrap_err(),
            super::super::unroll::UnrollError::VaryingExit
        );
        let held = unroll(&predicate(&f, 0).unwrap(), &axes, &copies).unwrap();
        let (slid, windows) = slide(&held).unwrap();
        // One window of pixels per row of the window.
        assert_eq!(windows, 2);
        for oy in (0..H as u32).step_by(2) {
            for ox in (0..IW as u32).step_by(2) {
                let first = oy * IW as u32 + ox;
                let mut env = bounded();
                let Lanes::Array(got) = eval(&slid, first, &mut env).unwrap().unwrap() else {
                    panic!("an array")
                };
                for (t, got) in got.iter().enumerate() {
                    let at = first + (t as u32 / 2) * IW as u32 + t as u32 % 2;
                    let want = eval(&f, at, &mut bounded()).unwrap().unwrap();
                    assert_eq!(*got, want, "element {first} tap {t}");
                }
                // Per kernel row: a pixel per window row before the loop, then per step a
                // pixel per window row and one weight for all four taps.
                assert_eq!(env.reads, KH * (2 + 3 * KW), "element {first}");
            }
        }
    }

    #[test]
    fn padding_tests_stay_where_a_skipped_step_would_add() {
        // What a tap adds does not vanish with its pixel.
        fn plus(b: &mut Builder, x: Expr, k: Expr) -> Expr {
            b.add(x, k)
        }
        let err = predicate(&padded_convolution(plus), 0).unwrap_err();
        assert!(err.contains("other than as a factor"), "{err}");
        // Guarding the weights would leave the pixels read in the padding.
        let err = predicate(&padded_convolution(product), 1).unwrap_err();
        assert!(
            err.contains("operand 0's index depends on a padding test's coordinate"),
            "{err}"
        );
        let err = predicate(&input_gradient(), 0).unwrap_err();
        assert!(err.contains("no padding test"), "{err}");
        // Widening, too, needs each addition to vanish with its guarded read.
        let err = widen(&clipped_sum(|b, _| b.f32(1.0)), "kx", 0).unwrap_err();
        assert!(err.contains("no factor read from operand 0"), "{err}");
    }
}
