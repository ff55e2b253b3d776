//! Sliding a window of reads along a loop: where the reads a loop's body makes of one operand
//! are evenly spaced, and one step of the loop moves them by exactly that spacing, the value
//! read at one offset in this step is the value read at its neighbouring offset in the last.
//! The transformed loop keeps the window in registers: it reads the values but the newest
//! once before the loop, one new value per step, and shifts the window at the end of each
//! step. A convolution's weight gradient held along its kernel columns (row `k` reads pixel
//! `ox + kx + k`) loads one pixel per step for every row instead of one per row.
//!
//! What slides: in a `for` loop with literal bounds that runs at least once (the window's
//! first values are read before it, at the first step's offsets) and has no `continue` or
//! `return` of its own (the shift must end every step), the operand reads and buffer loads
//! of its top-level statements (their expressions are evaluated every step; a read under an
//! `if` may be guarded and is left alone), grouped by what they read and by a common base
//! index, each at the base plus a constant. A group slides when its constants are evenly
//! spaced by the base's change per step. The base's change is worked out from its
//! expression (sums, constant multiples, `let`s of the loop's body); a value the body
//! assigns is not followed. Every read the transformed loop makes is one the original loop
//! made: the window only remembers them.
//!
//! Whole values slide too, after the reads: an expression that reads and changes along the
//! loop (a load selected to zero outside its row, its index and the selection sums of the
//! counter and a copy's coordinate) is compared with the others as a `Sig` — integer sums
//! (`u32` and `i32`, wrapping) as their terms and constant, the body's `let`s as their
//! values, anything else as its kind and its operands' values. Where one value at the next
//! step is another at this one, all of one shape in one chain, they are a window; the
//! largest values are taken first.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::unroll::{exits, map_children};
use super::{BinOp, Block, Expr, ExprKind, Function, Literal, Local, LocalDecl, Scalar, Stmt, Ty};
use super::{top_lets, validate, walk_exprs};

/// `f` with every window that slides kept in registers, and how many windows it made.
pub fn slide(f: &Function) -> Result<(Function, usize), String> {
    let types = validate(f).map_err(|e| e.0)?.types;
    let mut s = Slider {
        f: f.clone(),
        types,
        windows: 0,
    };
    let body = std::mem::take(&mut s.f.body);
    s.f.body = s.block(body);
    validate(&s.f).map_err(|e| format!("a window left invalid kernel IR: {}", e.0))?;
    Ok((s.f, s.windows))
}

struct Slider {
    f: Function,
    /// The types of the original expressions (the reads' types for their windows).
    types: Vec<Option<Ty>>,
    windows: usize,
}

/// What a read reads: operand `k`, or global `g`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Source {
    Operand(usize),
    Global(usize),
}

/// A read's base index: a local's value, or another expression.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Base {
    Local(u32),
    Expr(u32),
}

/// One read of a group: its expression, its index, its offset from the base.
struct Read {
    expr: Expr,
    index: Expr,
    offset: i64,
}

/// What the analysis of one loop's body knows.
struct Body {
    counter: Local,
    start: Expr,
    /// The `let`s of the body's top level, by local.
    lets: HashMap<Local, Expr>,
    /// Locals declared anywhere in the body, and locals it assigns.
    inner: HashSet<Local>,
}

impl Slider {
    fn push(&mut self, kind: ExprKind) -> Expr {
        self.f.exprs.push(kind);
        Expr(self.f.exprs.len() as u32 - 1)
    }

    fn declare(&mut self, name: String, ty: Ty) -> Local {
        self.f.locals.push(LocalDecl {
            name,
            ty,
            array: None,
        });
        Local(self.f.locals.len() as u32 - 1)
    }

    /// A local name no local of the function has.
    fn fresh(&self, stem: &str) -> String {
        let taken = |n: &str| self.f.locals.iter().any(|l| l.name == n);
        if !taken(stem) {
            return stem.to_string();
        }
        (1..)
            .map(|k| format!("{stem}_{k}"))
            .find(|n| !taken(n))
            .expect("some name is free")
    }

    /// `block` with its loops' windows slid, innermost loops first.
    fn block(&mut self, block: Block) -> Block {
        let mut out = Vec::with_capacity(block.len());
        for mut s in block {
            match &mut s {
                Stmt::For {
                    counter,
                    start,
                    end,
                    body,
                    ..
                } => {
                    let inner = self.block(std::mem::take(body));
                    let (before, slid) = self.slide_loop(*counter, *start, *end, inner);
                    *body = slid;
                    out.extend(before);
                }
                Stmt::If { accept, reject, .. } => {
                    *accept = self.block(std::mem::take(accept));
                    *reject = self.block(std::mem::take(reject));
                }
                Stmt::Block(b) | Stmt::Loop { body: b, .. } => {
                    *b = self.block(std::mem::take(b));
                }
                _ => {}
            }
            out.push(s);
        }
        out
    }

    fn literal(&self, e: Expr) -> Option<i64> {
        match self.f.expr(e) {
            ExprKind::Literal(Literal::U32(n)) => Some(i64::from(*n)),
            _ => None,
        }
    }

    /// The statements to write before the loop (the windows' first values) and its body,
    /// with the windows that slide.
    fn slide_loop(
        &mut self,
        counter: Local,
        start: Expr,
        end: Expr,
        mut body: Block,
    ) -> (Block, Block) {
        let runs = matches!((self.literal(start), self.literal(end)), (Some(a), Some(b)) if a < b);
        if !runs || exits(&body) {
            return (Vec::new(), body);
        }
        let facts = self.facts(counter, start, &body);
        // The reads of the top-level statements, by group.
        let mut groups: BTreeMap<(Source, Base), Vec<Read>> = BTreeMap::new();
        let mut seen = HashSet::new();
        for s in &body {
            for root in s.exprs() {
                let mut reads = Vec::new();
                self.reads_in(root, &mut seen, &mut reads);
                for (source, (expr, index)) in reads {
                    let (base, offset) = self.split_offset(index);
                    groups.entry((source, base)).or_default().push(Read {
                        expr,
                        index,
                        offset,
                    });
                }
            }
        }
        let mut before = Vec::new();
        // Inserted into the body before the group's first use.
        let mut news: Vec<(usize, Stmt)> = Vec::new();
        let mut shifts = Vec::new();
        for ((_, base), reads) in groups {
            let Some(window) = self.window(&facts, base, &reads) else {
                continue;
            };
            let n = self.windows;
            self.windows += 1;
            let ty = self.types[reads[0].expr.index()].expect("validated");
            let r = window.len();
            let stem = |j: usize| window_name(n, j);
            // The base at the first step, computed once before the loop.
            let base_expr = match base {
                Base::Local(l) => self.push(ExprKind::Local(Local(l))),
                Base::Expr(e) => Expr(e),
            };
            let first = self.at_start(&facts, base_expr);
            let first = if is_leaf(self.f.expr(first)) {
                first
            } else {
                let name = self.fresh(&format!("first{n}"));
                let local = self.declare(name, Ty::U32);
                before.push(Stmt::Let {
                    local,
                    value: first,
                });
                self.push(ExprKind::Local(local))
            };
            let targets: HashSet<Expr> = reads.iter().map(|r| r.expr).collect();
            let at = body
                .iter()
                .position(|s| self.mentions(s, &targets))
                .expect("the reads are the body's");
            let mut locals = Vec::with_capacity(r);
            for (j, &k) in window.iter().enumerate() {
                let read = &reads[k];
                let name = self.fresh(&stem(j));
                let local = self.declare(name, ty);
                locals.push(local);
                let kind = self.f.expr(read.expr).clone();
                if j + 1 < r {
                    // Its value at the first step, read before the loop.
                    let index = self.offset(first, read.offset);
                    let value = self.push(with_index(kind, index));
                    before.push(Stmt::Var { local, value });
                } else {
                    let value = self.push(kind);
                    news.push((at, Stmt::Let { local, value }));
                }
            }
            // Every read of an offset is now its window's value.
            for read in &reads {
                let j = window
                    .iter()
                    .position(|&k| reads[k].offset == read.offset)
                    .expect("every offset is in the window");
                self.f.exprs[read.expr.index()] = ExprKind::Local(locals[j]);
            }
            self.shift(&locals, &mut shifts);
        }
        finish_step(&mut body, news, shifts);
        self.slide_values(counter, start, &mut body, &mut before);
        (before, body)
    }

    /// Windows of whole values ([`Sig`]): where an expression that reads (a load selected
    /// to zero outside the row, say) is, at the next step, another expression of the body at
    /// this step, the window keeps the values. Run after the reads' windows, on what they
    /// left.
    fn slide_values(&mut self, counter: Local, start: Expr, body: &mut Block, before: &mut Block) {
        let facts = self.facts(counter, start, body);
        let mut sigs = HashMap::new();
        let mut seen = HashMap::new();
        let mut candidates = Vec::new();
        for s in body.iter() {
            for root in s.exprs() {
                self.candidates(&facts, root, &mut seen, &mut sigs, &mut candidates);
            }
        }
        // Members by shape (their sums' constants erased), each member with every
        // expression of its value.
        let mut groups: BTreeMap<Sig, BTreeMap<Sig, Vec<Expr>>> = BTreeMap::new();
        let mut size: HashMap<Expr, usize> = HashMap::new();
        for (e, n) in candidates {
            let sig = sigs[&(e, None)].clone().expect("candidates have a value");
            groups
                .entry(sig.shape())
                .or_default()
                .entry(sig)
                .or_default()
                .push(e);
            size.insert(e, n);
        }
        // Largest values first: a window of a value covers the windows inside it.
        let counter = facts.counter_sig();
        let mut chains: Vec<(usize, Vec<Vec<Expr>>)> = groups
            .into_values()
            .flat_map(|members| chains(&counter, &members))
            .map(|chain| {
                let n = chain.iter().flatten().map(|e| size[e]).max().unwrap_or(0);
                (n, chain)
            })
            .collect();
        chains.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
        let mut covered: HashSet<Expr> = HashSet::new();
        let mut news: Vec<(usize, Stmt)> = Vec::new();
        let mut shifts = Vec::new();
        for (_, chain) in chains {
            if chain.iter().flatten().any(|e| covered.contains(e)) {
                continue;
            }
            let Some(ty) = self.types.get(chain[0][0].index()).copied().flatten() else {
                continue;
            };
            for e in chain.iter().flatten() {
                self.subtree(*e, &mut covered);
            }
            let n = self.windows;
            self.windows += 1;
            let r = chain.len();
            let targets: HashSet<Expr> = chain.iter().flatten().copied().collect();
            let at = body
                .iter()
                .position(|s| self.mentions(s, &targets))
                .expect("the values are the body's");
            let mut locals = Vec::with_capacity(r);
            for (j, member) in chain.iter().enumerate() {
                let stem = window_name(n, j);
                let local = self.declare(self.fresh(&stem), ty);
                locals.push(local);
                let kind = self.f.expr(member[0]).clone();
                if j + 1 < r {
                    let value = self.at_start(&facts, member[0]);
                    before.push(Stmt::Var { local, value });
                } else {
                    let value = self.push(kind);
                    news.push((at, Stmt::Let { local, value }));
                }
            }
            for (member, &local) in chain.iter().zip(&locals) {
                for e in member {
                    self.f.exprs[e.index()] = ExprKind::Local(local);
                }
            }
            self.shift(&locals, &mut shifts);
        }
        finish_step(body, news, shifts);
    }

    /// The statements that move window `locals` one step along: each takes its successor.
    fn shift(&mut self, locals: &[Local], shifts: &mut Vec<Stmt>) {
        for pair in locals.windows(2) {
            let value = self.push(ExprKind::Local(pair[1]));
            shifts.push(Stmt::Assign {
                local: pair[0],
                op: None,
                value,
            });
        }
    }

    /// What the analysis of a loop's body knows, from the body as it is now.
    fn facts(&self, counter: Local, start: Expr, body: &Block) -> Body {
        let mut inner = HashSet::new();
        declared(body, &mut inner);
        let lets = top_lets(body).into_iter().collect();
        Body {
            counter,
            start,
            lets,
            inner,
        }
    }

    /// Every expression of `e`'s tree.
    fn subtree(&self, e: Expr, out: &mut HashSet<Expr>) {
        if !out.insert(e) {
            return;
        }
        map_children(self.f.expr(e).clone(), &mut |c| {
            self.subtree(c, out);
            c
        });
    }

    /// The values in `e` that may slide (they read, and change along the loop), with their
    /// sizes; `seen` keeps each expression's size and whether it reads, `sigs` its [`Sig`].
    fn candidates(
        &self,
        facts: &Body,
        e: Expr,
        seen: &mut HashMap<Expr, (usize, bool)>,
        sigs: &mut Memo,
        out: &mut Vec<(Expr, usize)>,
    ) -> (usize, bool) {
        if let Some(&known) = seen.get(&e) {
            return known;
        }
        let kind = self.f.expr(e).clone();
        let mut n = 1;
        let mut reads = matches!(kind, ExprKind::Operand { .. } | ExprKind::Load { .. });
        map_children(kind, &mut |c| {
            let (m, r) = self.candidates(facts, c, seen, sigs, out);
            n += m;
            reads |= r;
            c
        });
        seen.insert(e, (n, reads));
        if reads {
            let sig = self.sig(facts, e, None, sigs);
            if sig
                .as_ref()
                .is_some_and(|s| s.mentions(&facts.counter_sig()))
            {
                out.push((e, n));
            }
        }
        (n, reads)
    }

    /// `e`'s [`Sig`] where `assume` (a condition) holds; `None` where it depends on a value the
    /// body assigns, or calls. A selection's chosen value is taken where its condition holds:
    /// inside it, a selection on the same condition is its chosen value (a load selected to
    /// zero outside its row reads, inside it, at the index it would read anyway; what it
    /// reads outside is never seen).
    fn sig(&self, facts: &Body, e: Expr, assume: Option<Expr>, memo: &mut Memo) -> Option<Sig> {
        if let Some(s) = memo.get(&(e, assume)) {
            return s.clone();
        }
        let s = self.sig_of(facts, e, assume, memo);
        memo.insert((e, assume), s.clone());
        s
    }

    fn sig_of(&self, facts: &Body, e: Expr, assume: Option<Expr>, memo: &mut Memo) -> Option<Sig> {
        let kind = self.f.expr(e).clone();
        let int = self.is_int(e);
        match &kind {
            ExprKind::Local(l) if *l == facts.counter => {
                return Some(Sig::Sum {
                    terms: vec![(Box::new(facts.counter_sig()), 1)],
                    constant: 0,
                });
            }
            ExprKind::Local(l) => {
                if let Some(&v) = facts.lets.get(l) {
                    return self.sig(facts, v, assume, memo);
                }
                if facts.inner.contains(l) {
                    return None;
                }
            }
            ExprKind::Call { .. } => return None,
            ExprKind::Select { cond, accept, .. } if Some(*cond) == assume => {
                return self.sig(facts, *accept, assume, memo);
            }
            ExprKind::Select {
                cond,
                accept,
                reject,
            } => {
                let children = vec![
                    self.sig(facts, *cond, assume, memo)?,
                    self.sig(facts, *accept, Some(*cond), memo)?,
                    self.sig(facts, *reject, assume, memo)?,
                ];
                let node = Sig::Node {
                    kind: "select".into(),
                    children,
                };
                return Some(if int {
                    Sig::Sum {
                        terms: vec![(Box::new(node), 1)],
                        constant: 0,
                    }
                } else {
                    node
                });
            }
            ExprKind::Literal(Literal::U32(n)) => return Some(Sig::constant(*n)),
            ExprKind::Literal(Literal::I32(n)) => return Some(Sig::constant(*n as u32)),
            ExprKind::Cast { to, value }
                if matches!(to, Scalar::U32 | Scalar::I32) && self.is_int(*value) =>
            {
                return self.sig(facts, *value, assume, memo);
            }
            ExprKind::Binary { op, left, right } if int => {
                let (a, b) = (
                    self.sig(facts, *left, assume, memo)?,
                    self.sig(facts, *right, assume, memo)?,
                );
                let combined = match op {
                    BinOp::Add => a.plus(&b, 1),
                    BinOp::Sub => a.plus(&b, u32::MAX),
                    BinOp::Mul => match (a.as_constant(), b.as_constant()) {
                        (_, Some(c)) => a.times(c),
                        (Some(c), _) => b.times(c),
                        _ => None,
                    },
                    _ => None,
                };
                if combined.is_some() {
                    return combined;
                }
            }
            _ => {}
        }
        let mut children = Vec::new();
        let mut ok = true;
        let tag = map_children(kind, &mut |c| {
            match self.sig(facts, c, assume, memo) {
                Some(s) => children.push(s),
                None => ok = false,
            }
            Expr(0)
        });
        ok.then(|| {
            let node = Sig::Node {
                kind: format!("{tag:?}"),
                children,
            };
            // Every integer is a sum (of one term, if need be), so that equal values compare
            // equal.
            if int {
                Sig::Sum {
                    terms: vec![(Box::new(node), 1)],
                    constant: 0,
                }
            } else {
                node
            }
        })
    }

    /// Whether `e` is a `u32` or `i32` scalar.
    fn is_int(&self, e: Expr) -> bool {
        let ty = match self.types.get(e.index()).copied().flatten() {
            Some(ty) => Some(ty),
            None => match self.f.expr(e) {
                ExprKind::Local(l) => Some(self.f.locals[l.0 as usize].ty),
                ExprKind::Literal(Literal::U32(_)) => Some(Ty::U32),
                ExprKind::Literal(Literal::I32(_)) => Some(Ty::I32),
                _ => None,
            },
        };
        matches!(ty, Some(Ty::U32 | Ty::I32))
    }

    /// The reads of a group in window order (each the position of one read of that
    /// offset): the next step's value at position `j` is this step's at `j + 1`, the last
    /// read anew. `None` where the group does not slide.
    fn window(&self, facts: &Body, base: Base, reads: &[Read]) -> Option<Vec<usize>> {
        let step = match base {
            Base::Local(l) => self.change_local(facts, Local(l))?,
            Base::Expr(e) => self.change(facts, Expr(e))?,
        };
        if step == 0 {
            return None;
        }
        let mut offsets: Vec<(i64, usize)> = Vec::new();
        for (at, r) in reads.iter().enumerate() {
            if !offsets.iter().any(|(o, _)| *o == r.offset) {
                offsets.push((r.offset, at));
            }
        }
        // The base is index arithmetic only: the first step's value is computed before the
        // loop, where nothing else may be read.
        if offsets.len() < 2 || reads.iter().any(|r| self.reads_anything(r.index)) {
            return None;
        }
        // Along the step: this step's offset `o + step` is the next step's `o`.
        offsets.sort_by_key(|(o, _)| if step > 0 { *o } else { -*o });
        offsets
            .windows(2)
            .all(|w| w[1].0 - w[0].0 == step)
            .then(|| offsets.into_iter().map(|(_, at)| at).collect())
    }

    /// How much local `l` grows per step of the loop.
    fn change_local(&self, facts: &Body, l: Local) -> Option<i64> {
        if l == facts.counter {
            return Some(1);
        }
        match facts.lets.get(&l) {
            Some(&v) => self.change(facts, v),
            None if facts.inner.contains(&l) => None,
            None => Some(0),
        }
    }

    /// How much `e` grows per step of the loop; `None` where that is not a constant.
    fn change(&self, facts: &Body, e: Expr) -> Option<i64> {
        match self.f.expr(e) {
            ExprKind::Local(l) => self.change_local(facts, *l),
            ExprKind::Literal(_)
            | ExprKind::Index
            | ExprKind::Param(_)
            | ExprKind::Chunk(_)
            | ExprKind::WindowBase(_) => Some(0),
            ExprKind::Binary { op, left, right } => {
                let (a, b) = (self.change(facts, *left)?, self.change(facts, *right)?);
                match op {
                    BinOp::Add => Some(a + b),
                    BinOp::Sub => Some(a - b),
                    BinOp::Mul => match (a, b) {
                        (0, 0) => Some(0),
                        (a, 0) => Some(a * self.literal(*right)?),
                        (0, b) => Some(b * self.literal(*left)?),
                        _ => None,
                    },
                    _ if a == 0 && b == 0 => Some(0),
                    _ => None,
                }
            }
            kind => {
                let mut all = true;
                map_children(kind.clone(), &mut |c| {
                    all &= self.change(facts, c) == Some(0);
                    c
                });
                all.then_some(0)
            }
        }
    }

    /// `e` at the loop's first step, as an expression valid before the loop: the counter
    /// is its start, the body's `let`s their values.
    fn at_start(&mut self, facts: &Body, e: Expr) -> Expr {
        match self.f.expr(e).clone() {
            ExprKind::Local(l) if l == facts.counter => facts.start,
            ExprKind::Local(l) => match facts.lets.get(&l) {
                Some(&v) => self.at_start(facts, v),
                None => e,
            },
            kind @ (ExprKind::Literal(_)
            | ExprKind::Index
            | ExprKind::Param(_)
            | ExprKind::Chunk(_)
            | ExprKind::WindowBase(_)
            | ExprKind::GlobalId(_)
            | ExprKind::LocalIndex) => {
                let _ = kind;
                e
            }
            kind => {
                let kind = map_children(kind, &mut |c| self.at_start(facts, c));
                // A cast of the start is the start of the other type.
                if let ExprKind::Cast { to, value } = &kind {
                    if let Some(n) = self.literal(*value) {
                        let lit = match to {
                            Scalar::I32 => Some(Literal::I32(n as i32)),
                            Scalar::U32 => Some(Literal::U32(n as u32)),
                            _ => None,
                        };
                        if let Some(lit) = lit {
                            return self.push(ExprKind::Literal(lit));
                        }
                    }
                }
                // The counter's start is often 0: `0 * s + k` is `k`.
                if let ExprKind::Binary { op, left, right } = kind {
                    let (l, r) = (self.literal(left), self.literal(right));
                    match (op, l, r) {
                        (BinOp::Mul, Some(0), _) | (BinOp::Add | BinOp::Sub, _, Some(0)) => {
                            return left;
                        }
                        (BinOp::Mul, _, Some(0)) | (BinOp::Add, Some(0), _) => return right,
                        _ => {}
                    }
                }
                self.push(kind)
            }
        }
    }

    /// `base + d` (or `- d`).
    fn offset(&mut self, base: Expr, d: i64) -> Expr {
        if d == 0 {
            return base;
        }
        let lit = self.push(ExprKind::Literal(Literal::U32(d.unsigned_abs() as u32)));
        let op = if d > 0 { BinOp::Add } else { BinOp::Sub };
        self.push(ExprKind::Binary {
            op,
            left: base,
            right: lit,
        })
    }

    /// Whether `s` (its expressions, at any depth of its blocks) evaluates one of `targets`.
    fn mentions(&self, s: &Stmt, targets: &HashSet<Expr>) -> bool {
        let mut found = false;
        walk_exprs(std::slice::from_ref(s), &mut |e| {
            found = found || self.expr_mentions(e, targets)
        });
        found
    }

    fn expr_mentions(&self, e: Expr, targets: &HashSet<Expr>) -> bool {
        if targets.contains(&e) {
            return true;
        }
        let mut found = false;
        map_children(self.f.expr(e).clone(), &mut |c| {
            found = found || self.expr_mentions(c, targets);
            c
        });
        found
    }

    /// Whether `e` reads an operand or a buffer.
    fn reads_anything(&self, e: Expr) -> bool {
        let kind = self.f.expr(e).clone();
        if matches!(
            kind,
            ExprKind::Operand { .. } | ExprKind::Call { .. } | ExprKind::Load { .. }
        ) {
            return true;
        }
        let mut found = false;
        map_children(kind, &mut |c| {
            found = found || self.reads_anything(c);
            c
        });
        found
    }

    /// An index as a base plus a constant.
    fn split_offset(&self, index: Expr) -> (Base, i64) {
        let base_of = |e: Expr| match self.f.expr(e) {
            ExprKind::Local(l) => Base::Local(l.0),
            _ => Base::Expr(e.0),
        };
        if let ExprKind::Binary { op, left, right } = self.f.expr(index) {
            if let Some(c) = self.literal(*right) {
                match op {
                    BinOp::Add => return (base_of(*left), c),
                    BinOp::Sub => return (base_of(*left), -c),
                    _ => {}
                }
            }
        }
        (base_of(index), 0)
    }

    /// The operand reads and buffer loads in `e` (each once).
    fn reads_in(&self, e: Expr, seen: &mut HashSet<Expr>, out: &mut Vec<(Source, (Expr, Expr))>) {
        if !seen.insert(e) {
            return;
        }
        let kind = self.f.expr(e).clone();
        match kind {
            ExprKind::Operand { k, index } => out.push((Source::Operand(k), (e, index))),
            ExprKind::Load { global, index } => out.push((Source::Global(global), (e, index))),
            _ => {}
        }
        map_children(kind, &mut |c| {
            self.reads_in(c, seen, out);
            c
        });
    }
}

/// Each expression's [`Sig`] under a condition assumed to hold (or none).
type Memo = HashMap<(Expr, Option<Expr>), Option<Sig>>;

/// A value of a loop's body as the loop sees it, to tell whether one expression at the next
/// step is another at this one: integer sums (`u32` and `i32` alike, both wrapping at 2^32,
/// their casts keeping the bits) as their terms and constant; anything else as its kind and
/// its operands' values. The body's `let`s are their values; the counter is a term.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Sig {
    Sum {
        terms: Vec<(Box<Sig>, u32)>,
        constant: u32,
    },
    Node {
        kind: String,
        children: Vec<Sig>,
    },
}

impl Sig {
    fn constant(c: u32) -> Sig {
        Sig::Sum {
            terms: Vec::new(),
            constant: c,
        }
    }

    fn as_constant(&self) -> Option<u32> {
        match self {
            Sig::Sum { terms, constant } if terms.is_empty() => Some(*constant),
            _ => None,
        }
    }

    /// The terms of a sum (any other value is one term).
    fn sum(&self) -> (Vec<(Box<Sig>, u32)>, u32) {
        match self {
            Sig::Sum { terms, constant } => (terms.clone(), *constant),
            node => (vec![(Box::new(node.clone()), 1)], 0),
        }
    }

    /// `self + factor * other`.
    fn plus(&self, other: &Sig, factor: u32) -> Option<Sig> {
        let (mut terms, c) = self.sum();
        let (more, d) = other.sum();
        for (t, k) in more {
            let k = k.wrapping_mul(factor);
            match terms.iter_mut().find(|(u, _)| *u == t) {
                Some((_, j)) => *j = j.wrapping_add(k),
                None => terms.push((t, k)),
            }
        }
        terms.retain(|(_, k)| *k != 0);
        terms.sort();
        Some(Sig::Sum {
            terms,
            constant: c.wrapping_add(d.wrapping_mul(factor)),
        })
    }

    fn times(&self, c: u32) -> Option<Sig> {
        Sig::constant(0).plus(self, c)
    }

    /// Whether `t` is a term of this value or of a value inside it.
    fn mentions(&self, t: &Sig) -> bool {
        match self {
            Sig::Sum { terms, .. } => terms.iter().any(|(u, _)| **u == *t || u.mentions(t)),
            Sig::Node { children, .. } => self == t || children.iter().any(|c| c.mentions(t)),
        }
    }

    /// The value with every sum's constant erased: values of one shape differ only in those.
    fn shape(&self) -> Sig {
        match self {
            Sig::Sum { terms, .. } => Sig::Sum {
                terms: terms
                    .iter()
                    .map(|(t, k)| (Box::new(t.shape()), *k))
                    .collect(),
                constant: 0,
            },
            Sig::Node { kind, children } => Sig::Node {
                kind: kind.clone(),
                children: children.iter().map(Sig::shape).collect(),
            },
        }
    }

    /// The value at the next step: term `t` (the counter) one more.
    fn step(&self, t: &Sig) -> Sig {
        match self {
            Sig::Sum { terms, constant } => {
                let mut c = *constant;
                let terms = terms
                    .iter()
                    .map(|(u, k)| {
                        if **u == *t {
                            c = c.wrapping_add(*k);
                            (u.clone(), *k)
                        } else {
                            (Box::new(u.step(t)), *k)
                        }
                    })
                    .collect();
                Sig::Sum { terms, constant: c }
            }
            Sig::Node { kind, children } => Sig::Node {
                kind: kind.clone(),
                children: children.iter().map(|c| c.step(t)).collect(),
            },
        }
    }
}

impl Body {
    /// The counter as a term.
    fn counter_sig(&self) -> Sig {
        Sig::Node {
            kind: format!("{:?}", ExprKind::Local(self.counter)),
            children: Vec::new(),
        }
    }
}

/// The members of one shape (each value with its expressions) as windows: member `j` of a
/// window at the next step is member `j + 1` at this one, each window two or more long (the
/// rows of held copies make one each).
fn chains(counter: &Sig, members: &BTreeMap<Sig, Vec<Expr>>) -> Vec<Vec<Vec<Expr>>> {
    // A step adds a constant, so each member is at most one other's next.
    let next: HashMap<&Sig, &Sig> = members
        .keys()
        .filter_map(|m| {
            let stepped = m.step(counter);
            members.get_key_value(&stepped).map(|(k, _)| (m, k))
        })
        .collect();
    let targets: HashSet<&Sig> = next.values().copied().collect();
    let mut out = Vec::new();
    for head in members.keys().filter(|m| !targets.contains(m)) {
        let mut order = vec![head];
        while let Some(&n) = next.get(order[order.len() - 1]) {
            if order.contains(&n) {
                break;
            }
            order.push(n);
        }
        if order.len() >= 2 {
            out.push(order.into_iter().map(|m| members[m].clone()).collect());
        }
    }
    out
}

/// The windows' newest values inserted into `body` where they are first used, and their
/// shifts at its end.
fn finish_step(body: &mut Block, mut news: Vec<(usize, Stmt)>, shifts: Vec<Stmt>) {
    // Later positions first, so that earlier ones stay where they were (and, among equal
    // positions, the groups keep their order).
    news.sort_by_key(|(at, _)| *at);
    for (at, s) in news.into_iter().rev() {
        body.insert(at, s);
    }
    body.extend(shifts);
}

/// Whether an expression is a leaf (nothing to compute once).
fn is_leaf(kind: &ExprKind) -> bool {
    matches!(
        kind,
        ExprKind::Local(_) | ExprKind::Literal(_) | ExprKind::Index | ExprKind::Param(_)
    )
}

/// `kind` (a read) at another index.
fn with_index(kind: ExprKind, index: Expr) -> ExprKind {
    match kind {
        ExprKind::Operand { k, .. } => ExprKind::Operand { k, index },
        ExprKind::Load { global, .. } => ExprKind::Load { global, index },
        _ => unreachable!("only reads slide"),
    }
}

/// Every local `block` declares or writes, at any depth.
fn declared(block: &[Stmt], out: &mut HashSet<Local>) {
    for s in block {
        match s {
            Stmt::Let { local, .. }
            | Stmt::Var { local, .. }
            | Stmt::Assign { local, .. }
            | Stmt::VarArray { local }
            | Stmt::Update { local, .. }
            | Stmt::AssignElement { local, .. } => {
                out.insert(*local);
            }
            Stmt::For { counter, body, .. } | Stmt::Loop { counter, body, .. } => {
                out.insert(*counter);
                declared(body, out);
            }
            Stmt::If { accept, reject, .. } => {
                declared(accept, out);
                declared(reject, out);
            }
            Stmt::Block(b) => declared(b, out),
            _ => {}
        }
    }
}

/// The name of value `j` of the function's `n`-th window (`p<n>_<j>`: a window's values
/// read apart from another's).
fn window_name(n: usize, j: usize) -> String {
    format!("p{n}_{j}")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::interp::{Env, Lanes, Value, eval};
    use super::super::unroll::{HeldAxis, unroll};
    use super::super::wgsl::{Callee, body};
    use super::super::{Builder, ChunkBound, MathFn};
    use super::*;

    /// Operand `k`'s element `i` is `(k + 1) * i + 0.25`; every read is counted.
    #[derive(Default)]
    pub(crate) struct Counting {
        pub(crate) reads: usize,
    }

    impl Env for Counting {
        fn operand(&mut self, k: usize, index: u32) -> Lanes {
            self.reads += 1;
            Lanes::Scalar(Value::F32((k as f32 + 1.0) * index as f32 + 0.25))
        }
        fn chunk(&self, _: ChunkBound) -> u32 {
            unreachable!("no chunks here")
        }
    }

    /// A weight gradient's shape of reduction over elements of a `[3, 5]` space (`a`, `kx`):
    /// `sum over ox in 0..6 of x[a * 16 + ox * step + kx * spacing] * d[a * 6 + ox]`,
    /// with `continue` on `ox == skip` where asked, and the loop from `lo` to 6.
    fn weight_gradient(step: i64, spacing: u32, skip: Option<usize>, lo: usize) -> Function {
        let mut b = Builder::new(Ty::F32, vec![Ty::F32, Ty::F32]);
        let i = b.index();
        let [a, kx] = b.decode(i, &["a", "kx"], &[3, 5])[..] else {
            unreachable!()
        };
        let zero = b.f32(0.0);
        let acc = b.var("acc", Ty::F32, zero);
        let (start, end) = (b.u32(lo), b.u32(6));
        b.for_("ox", start, end, |b, ox| {
            if let Some(skip) = skip {
                let s = b.u32(skip);
                let is = b.bin(BinOp::Eq, ox, s);
                b.continue_if(is);
            }
            let sixteen = b.u32(16);
            let row = b.mul(a, sixteen);
            // Stepping back from the row's end where `step` is negative.
            let x_at = if step > 0 {
                let st = b.u32(step as usize);
                let t = b.mul(ox, st);
                b.add(row, t)
            } else {
                let five = b.u32(5);
                let r = b.add(row, five);
                b.sub(r, ox)
            };
            let sp = b.u32(spacing as usize);
            let k = b.mul(kx, sp);
            let x_at = b.add(x_at, k);
            let x_at = b.let_("x_at", Ty::U32, x_at);
            let x = b.operand(0, x_at);
            let six = b.u32(6);
            let d_at = b.mul(a, six);
            let d_at = b.add(d_at, ox);
            let d = b.operand(1, d_at);
            let t = b.mul(x, d);
            b.add_assign(acc, t);
        });
        let r = b.get(acc);
        b.ret_(r);
        b.finish()
    }

    /// The five kernel columns of each element held (rows along `kx`), then slid.
    fn held(f: &Function) -> Function {
        let axis = HeldAxis {
            stride: 1,
            extent: 5,
        };
        let copies: Vec<Vec<usize>> = (0..5).map(|k| vec![k]).collect();
        unroll(f, &[axis], &copies).unwrap()
    }

    /// The held rows' values at `first` (kx = 0) against the scalar definition's, and the
    /// operand reads one evaluation of the held function makes.
    fn check(f: &Function, held: &Function) -> usize {
        let mut reads = 0;
        for a in 0..3u32 {
            let first = a * 5;
            let mut env = Counting::default();
            let Some(Lanes::Array(got)) = eval(held, first, &mut env).unwrap() else {
                panic!("an array")
            };
            reads = env.reads;
            for k in 0..5 {
                let want = eval(f, first + k as u32, &mut Counting::default())
                    .unwrap()
                    .unwrap();
                assert_eq!(got[k], want, "element {first} column {k}");
            }
        }
        reads
    }

    #[test]
    fn a_window_of_columns_slides_along_the_loop() {
        let f = weight_gradient(1, 1, None, 0);
        let h = held(&f);
        // Five pixels and one shared d per step.
        assert_eq!(check(&f, &h), 6 * 6);
        let (s, windows) = slide(&h).unwrap();
        assert_eq!(windows, 1);
        // Four pixels before the loop, then one pixel and one d per step.
        assert_eq!(check(&f, &s), 4 + 6 * 2);
        let names = [Callee::Call("x".into()), Callee::Call("d".into())];
        let text = body(&s, &names).unwrap();
        assert!(text.contains("var p0_0 = "), "{text}");
        assert!(text.contains("p0_3 = p0_4;"), "{text}");
    }

    #[test]
    fn a_window_slides_backwards_where_the_reads_step_down() {
        // Step -1 along ox, columns +1 apart: this step's column k is the next step's k + 1.
        let f = weight_gradient(-1, 1, None, 1);
        let h = held(&f);
        let (s, windows) = slide(&h).unwrap();
        assert_eq!(windows, 1);
        assert_eq!(check(&f, &s), 4 + 5 * 2);
    }

    #[test]
    fn reads_that_do_not_line_up_with_the_step_stay() {
        // Columns 2 apart, step 1 (a stride-2 weight gradient's kernel columns would step 2).
        for (step, spacing) in [(1, 2), (3, 2)] {
            let f = weight_gradient(step, spacing, None, 0);
            let h = held(&f);
            let (s, windows) = slide(&h).unwrap();
            assert_eq!(windows, 0, "step {step} spacing {spacing}");
            assert_eq!(s, h);
        }
        // Step 2 and spacing 2 slide.
        let f = weight_gradient(2, 2, None, 0);
        let (s, windows) = slide(&held(&f)).unwrap();
        assert_eq!(windows, 1);
        check(&f, &s);
    }

    #[test]
    fn reads_a_step_of_two_apart_slide_as_two_windows() {
        // Step 2, columns 1 apart: columns 0, 2, 4 are one window, 1 and 3 another; each
        // step reads one of each (the others before the loop), and the shared d.
        let f = weight_gradient(2, 1, None, 0);
        let (s, windows) = slide(&held(&f)).unwrap();
        assert_eq!(windows, 2);
        assert_eq!(check(&f, &s), 3 + 6 * 3);
    }

    #[test]
    fn a_value_whose_selection_does_not_move_with_its_read_stays() {
        // `select(ox < 3, x[min(ox + k, 9)], 0)`: column k's read is column k + 1's a step
        // later (a value window: the index is no base plus a constant), but the selection
        // is on the step alone, so the selected values are not.
        let mut b = Builder::new(Ty::F32, vec![Ty::F32]);
        let i = b.index();
        let zero = b.f32(0.0);
        let acc = b.var("acc", Ty::F32, zero);
        let (start, end) = (b.u32(0), b.u32(6));
        b.for_("ox", start, end, |b, ox| {
            let at = b.add(ox, i);
            let nine = b.u32(9);
            let at = b.math(MathFn::Min, &[at, nine]);
            let x = b.operand(0, at);
            let three = b.u32(3);
            let early = b.bin(BinOp::Lt, ox, three);
            let zero = b.f32(0.0);
            let v = b.select(early, x, zero);
            b.add_assign(acc, v);
        });
        let r = b.get(acc);
        b.ret_(r);
        let f = b.finish();
        let axis = HeldAxis {
            stride: 1,
            extent: 5,
        };
        let copies: Vec<Vec<usize>> = (0..5).map(|k| vec![k]).collect();
        let h = unroll(&f, &[axis], &copies).unwrap();
        let (s, windows) = slide(&h).unwrap();
        // The reads slide; the selected values do not.
        let text = body(&s, &[Callee::Call("x".into())]).unwrap();
        assert!(
            text.contains("acc0 += select(0.0f, p0_0, ox < 3u);"),
            "{text}"
        );
        assert!(text.contains("let p0_4 = x(min("), "{text}");
        assert_eq!(windows, 1);
        let mut env = Counting::default();
        let Some(Lanes::Array(got)) = eval(&s, 0, &mut env).unwrap() else {
            panic!("an array")
        };
        for (k, got) in got.iter().enumerate() {
            let want = eval(&f, k as u32, &mut Counting::default())
                .unwrap()
                .unwrap();
            assert_eq!(*got, want, "column {k}");
        }
        assert_eq!(env.reads, 4 + 6);
    }

    #[test]
    fn a_loop_that_may_end_a_step_early_or_not_run_keeps_its_reads() {
        // A `continue` would skip the shift.
        let f = weight_gradient(1, 1, Some(2), 0);
        let h = held(&f);
        let (s, windows) = slide(&h).unwrap();
        assert_eq!((windows, &s), (0, &h));
        // No step: the window's first values would be reads the loop never makes.
        let f = weight_gradient(1, 1, None, 6);
        let h = held(&f);
        let (s, windows) = slide(&h).unwrap();
        assert_eq!((windows, &s), (0, &h));
    }
}
