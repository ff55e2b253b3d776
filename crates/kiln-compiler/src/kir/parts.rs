//! Reading a value bound in parts straight from the part that holds each element, a
//! transform of a function. A value too large for one uniform binding is bound as several
//! (`parts`, each `words` consecutive elements as an array of `vec4`s); an element function
//! reading it at an unknown index has to read every part and select (`elements.rs`). Inside
//! a `for` loop whose counter decides the part, the loop is split at the parts' boundaries:
//! each piece runs the counter over the steps whose reads all lie in one part, and reads
//! that part directly, one load per read. A matmul whose right-hand matrix `[K, N]` is bound
//! as four quarters of whole rows reads four consecutive columns as one `vec4` of the part
//! its row lies in (`p * N + c`: the loop over `p` in four pieces).
//!
//! The part a read lies in is worked out, for every step of the loop, from a range analysis
//! of its index: the function's index below a length the caller gives, literals, the
//! counters of loops with literal bounds, `let`s, and `+ - * / %`, shifts, masks, `min`,
//! `max` and `clamp` of them. A read whose range at some step spans two parts, reads of the
//! value through anything else, or a loop with more pieces than parts' boundaries allow, leave
//! the loop as it is (its reads still go through the operand). A read outside such loops
//! whose range lies in one part is read from it too (four lanes a part apart: lane `k` of
//! `i + k * words`, `i` below `words`, reads part `k` at `i`). Every read the transformed
//! function makes is of the element the original read, in the part that holds it.

use std::collections::HashMap;

use super::unroll::map_children;
use super::{BinOp, Block, Expr, ExprKind, Function, Global, Literal, Local, MathFn, Scalar, Stmt};
use super::{Ty, validate, walk_exprs};

/// Operand `operand` of a function, bound as `globals.len()` uniform arrays of `vec4`s of
/// `words` consecutive elements each (the last may hold fewer). An `f32` operand is one
/// element; a `vec4` operand at `at` is the four elements `at` to `at + 3` (lanes of a
/// consecutive block), read as one `vec4` where `at` is a multiple of four.
pub struct Parts {
    pub operand: usize,
    pub globals: Vec<Global>,
    pub words: usize,
}

/// What the caller knows of the function's index: below `len`, a multiple of `multiple`
/// (the first element of a block of lanes).
#[derive(Clone, Copy, Debug)]
pub struct IndexFacts {
    pub len: u64,
    pub multiple: u64,
}

/// The most steps a loop may have for its parts to be worked out step by step.
const MAX_STEPS: i64 = 1 << 16;

/// `f` with the reads of `parts.operand` in each loop whose steps decide their part read from
/// that part directly, and any other read whose index lies in one part read from it; and how
/// many loops were split plus how many other reads were so resolved.
pub fn read_parts(
    f: &Function,
    parts: &Parts,
    facts: IndexFacts,
) -> Result<(Function, usize), String> {
    let types = validate(f).map_err(|e| e.0)?.types;
    let ty = *f
        .operands
        .get(parts.operand)
        .ok_or_else(|| format!("no operand {}", parts.operand))?;
    if !matches!(ty, Ty::F32 | Ty::VEC4_F32) || parts.words % 4 != 0 || parts.globals.is_empty() {
        return Err(format!(
            "parts of {} words, operand of type {ty:?}: not uniform vec4 parts of f32 elements",
            parts.words
        ));
    }
    let mut lets = HashMap::new();
    collect_lets(&f.body, &mut lets);
    let mut p = Parter {
        f: f.clone(),
        types,
        parts,
        facts,
        vec4: ty == Ty::VEC4_F32,
        lets,
        ranges: HashMap::new(),
        globals: Vec::new(),
        split: 0,
        direct: 0,
        copy: Copier::default(),
    };
    p.globals = parts
        .globals
        .iter()
        .map(|g| match p.f.globals.iter().position(|h| h == g) {
            Some(k) => k,
            None => {
                p.f.globals.push(g.clone());
                p.f.globals.len() - 1
            }
        })
        .collect();
    let body = std::mem::take(&mut p.f.body);
    p.f.body = p.block(body);
    if p.split + p.direct == 0 {
        // Nothing to read directly: the function as it was, without the parts' globals.
        return Ok((f.clone(), 0));
    }
    validate(&p.f).map_err(|e| format!("reading parts left invalid kernel IR: {}", e.0))?;
    Ok((p.f, p.split + p.direct))
}

/// Whether `f` still reads operand `k` (by index or with arguments).
pub fn reads_operand(f: &Function, k: usize) -> bool {
    f.exprs.iter().any(|e| match e {
        ExprKind::Operand { k: j, .. } | ExprKind::Call { k: j, .. } => *j == k,
        _ => false,
    }) && mentions_operand(f, &f.body, k)
}

fn mentions_operand(f: &Function, block: &[Stmt], k: usize) -> bool {
    let mut found = false;
    walk_exprs(block, &mut |e| found |= expr_reads(f, e, k));
    found
}

fn expr_reads(f: &Function, e: Expr, k: usize) -> bool {
    match f.expr(e) {
        ExprKind::Operand { k: j, .. } | ExprKind::Call { k: j, .. } if *j == k => true,
        kind => {
            let mut found = false;
            map_children(kind.clone(), &mut |c| {
                found = found || expr_reads(f, c, k);
                c
            });
            found
        }
    }
}

struct Parter<'a> {
    f: Function,
    types: Vec<Option<Ty>>,
    parts: &'a Parts,
    facts: IndexFacts,
    vec4: bool,
    /// Every `let` of the function, by local.
    lets: HashMap<Local, Expr>,
    /// The range of each counter of the enclosing loops with literal bounds.
    ranges: HashMap<Local, (i64, i64)>,
    /// The parts' globals, by part.
    globals: Vec<usize>,
    split: usize,
    /// Reads outside split loops that know their part.
    direct: usize,
    /// The copy of a loop's body being made.
    copy: Copier,
}

/// One piece of a split loop: its steps and, for each read, its part.
struct Piece {
    start: i64,
    end: i64,
    parts: Vec<usize>,
}

impl Parter<'_> {
    fn push(&mut self, kind: ExprKind) -> Expr {
        self.f.exprs.push(kind);
        self.types.push(None);
        Expr(self.f.exprs.len() as u32 - 1)
    }

    fn u32(&mut self, n: i64) -> Expr {
        self.push(ExprKind::Literal(Literal::U32(n as u32)))
    }

    fn literal(&self, e: Expr) -> Option<i64> {
        match self.f.expr(e) {
            ExprKind::Literal(Literal::U32(n)) => Some(i64::from(*n)),
            ExprKind::Literal(Literal::I32(n)) => Some(i64::from(*n)),
            _ => None,
        }
    }

    fn block(&mut self, block: Block) -> Block {
        let mut out = Vec::with_capacity(block.len());
        for mut s in block {
            match &mut s {
                Stmt::For {
                    counter,
                    start,
                    end,
                    body,
                    unroll,
                } => {
                    let bounds = self.literal(*start).zip(self.literal(*end));
                    if let Some((lo, hi)) = bounds.filter(|(lo, hi)| lo < hi) {
                        if let Some((reads, pieces)) = self.plan(*counter, lo, hi, body) {
                            self.split += 1;
                            for piece in &pieces {
                                out.push(self.piece(*counter, body, (&reads, piece), *unroll));
                            }
                            continue;
                        }
                        self.ranges.insert(*counter, (lo, hi - 1));
                    }
                    *body = self.block(std::mem::take(body));
                    self.ranges.remove(counter);
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
            self.direct_stmt(&mut s);
            out.push(s);
        }
        out
    }

    /// `s` with the reads its own expressions make (not those of its blocks) from their part
    /// where the index's range, with the enclosing loops' counters in theirs, lies in one.
    fn direct_stmt(&mut self, s: &mut Stmt) {
        match s {
            Stmt::Let { value, .. }
            | Stmt::Var { value, .. }
            | Stmt::Assign { value, .. }
            | Stmt::Return(Some(value)) => *value = self.direct(*value),
            Stmt::AssignElement { index, value, .. } | Stmt::Store { index, value, .. } => {
                *index = self.direct(*index);
                *value = self.direct(*value);
            }
            Stmt::Update { index, value, .. } => {
                *index = index.map(|i| self.direct(i));
                *value = self.direct(*value);
            }
            Stmt::If { cond, .. } => *cond = self.direct(*cond),
            _ => {}
        }
    }

    /// `e` with each read of the operand whose part is known read from that part.
    fn direct(&mut self, e: Expr) -> Expr {
        let mut reads = Vec::new();
        let mut through_call = false;
        self.reads_in(e, &mut HashMap::new(), &mut reads, &mut through_call);
        let known: Vec<(Expr, usize)> = reads
            .into_iter()
            .filter_map(|r| {
                let part = self.part_of(r)?;
                (!self.vec4 || self.multiple(r) % 4 == 0).then_some((r, part))
            })
            .collect();
        if known.is_empty() {
            return e;
        }
        self.direct += known.len();
        self.copy = Copier::default();
        self.copy.parts.extend(known);
        self.copy_expr(e)
    }

    /// The reads of the operand in `body` (by their index expressions) and the pieces of the
    /// loop over `counter` from `lo` to `hi` in which each lies in one part, or `None` where
    /// it has no such reads or they do not split so.
    fn plan(
        &mut self,
        counter: Local,
        lo: i64,
        hi: i64,
        body: &Block,
    ) -> Option<(Vec<Expr>, Vec<Piece>)> {
        let mut reads = Vec::new();
        let mut through_call = false;
        let mut seen = HashMap::new();
        walk_exprs(body, &mut |e| {
            self.reads_in(e, &mut seen, &mut reads, &mut through_call)
        });
        if reads.is_empty() || through_call || hi - lo > MAX_STEPS {
            return None;
        }
        // The body's own loops range over their literal bounds; other counters are unknown.
        let mut inner = HashMap::new();
        self.inner_counters(body, &mut inner);
        let saved = self.ranges.clone();
        self.ranges.extend(inner);
        let mut pieces: Vec<Piece> = Vec::new();
        let mut ok = true;
        'steps: for c in lo..hi {
            self.ranges.insert(counter, (c, c));
            let mut here = Vec::with_capacity(reads.len());
            for &index in &reads {
                let Some(part) = self.part_of(index) else {
                    ok = false;
                    break 'steps;
                };
                here.push(part);
            }
            match pieces.last_mut() {
                Some(last) if last.parts == here => last.end = c + 1,
                _ => pieces.push(Piece {
                    start: c,
                    end: c + 1,
                    parts: here,
                }),
            }
        }
        self.ranges = saved;
        let aligned = !self.vec4 || reads.iter().all(|&r| self.multiple(r) % 4 == 0);
        (ok && aligned && pieces.len() <= self.parts.globals.len()).then_some((reads, pieces))
    }

    /// The counters of `block`'s loops with literal bounds that run, and their ranges.
    fn inner_counters(&self, block: &[Stmt], out: &mut HashMap<Local, (i64, i64)>) {
        for s in block {
            match s {
                Stmt::For {
                    counter,
                    start,
                    end,
                    body,
                    ..
                } => {
                    if let (Some(lo), Some(hi)) = (self.literal(*start), self.literal(*end)) {
                        if lo < hi {
                            out.insert(*counter, (lo, hi - 1));
                        }
                    }
                    self.inner_counters(body, out);
                }
                Stmt::Loop { body, .. } | Stmt::Block(body) => self.inner_counters(body, out),
                Stmt::If { accept, reject, .. } => {
                    self.inner_counters(accept, out);
                    self.inner_counters(reject, out);
                }
                _ => {}
            }
        }
    }

    /// The part holding every element `index` may be, if one does.
    fn part_of(&self, index: Expr) -> Option<usize> {
        let (lo, hi) = self.range(index)?;
        let words = self.parts.words as i64;
        let part = (lo / words) as usize;
        (lo >= 0 && hi / words == lo / words && part < self.parts.globals.len()).then_some(part)
    }

    /// The operand's reads in `e`, by their index expressions (each read once).
    fn reads_in(
        &self,
        e: Expr,
        seen: &mut HashMap<Expr, ()>,
        out: &mut Vec<Expr>,
        through_call: &mut bool,
    ) {
        if seen.insert(e, ()).is_some() {
            return;
        }
        let kind = self.f.expr(e).clone();
        match kind {
            ExprKind::Operand { k, index } if k == self.parts.operand => out.push(index),
            ExprKind::Call { k, .. } if k == self.parts.operand => *through_call = true,
            _ => {}
        }
        map_children(kind, &mut |c| {
            self.reads_in(c, seen, out, through_call);
            c
        });
    }

    /// The loop over `counter` as the piece's steps, its reads of the operand from their part.
    fn piece(
        &mut self,
        counter: Local,
        body: &Block,
        (reads, piece): (&[Expr], &Piece),
        unroll: bool,
    ) -> Stmt {
        self.copy = Copier::default();
        for (&index, &part) in reads.iter().zip(&piece.parts) {
            self.copy.parts.insert(index, part);
        }
        let counter = self.fresh_local(counter);
        let body = self.copy_block(body);
        let (start, end) = (self.u32(piece.start), self.u32(piece.end));
        Stmt::For {
            counter,
            start,
            end,
            body,
            unroll,
        }
    }

    fn fresh_local(&mut self, l: Local) -> Local {
        let decl = self.f.local(l).clone();
        self.f.locals.push(decl);
        let new = Local(self.f.locals.len() as u32 - 1);
        self.copy.locals.insert(l, new);
        new
    }

    fn copy_block(&mut self, block: &Block) -> Block {
        block.iter().map(|s| self.copy_stmt(s)).collect()
    }

    fn copy_stmt(&mut self, s: &Stmt) -> Stmt {
        let e = |p: &mut Self, x: Expr| p.copy_expr(x);
        match s.clone() {
            Stmt::Let { local, value } => {
                let value = e(self, value);
                let local = self.fresh_local(local);
                Stmt::Let { local, value }
            }
            Stmt::Var { local, value } => {
                let value = e(self, value);
                let local = self.fresh_local(local);
                Stmt::Var { local, value }
            }
            Stmt::VarArray { local } => Stmt::VarArray {
                local: self.fresh_local(local),
            },
            Stmt::Assign { local, op, value } => Stmt::Assign {
                local: self.copy.local(local),
                op,
                value: e(self, value),
            },
            Stmt::For {
                counter,
                start,
                end,
                body,
                unroll,
            } => {
                let (start, end) = (e(self, start), e(self, end));
                let counter = self.fresh_local(counter);
                Stmt::For {
                    counter,
                    start,
                    end,
                    body: self.copy_block(&body),
                    unroll,
                }
            }
            Stmt::Loop {
                counter,
                start,
                cond,
                step,
                halve,
                body,
            } => {
                let start = e(self, start);
                let counter = self.fresh_local(counter);
                Stmt::Loop {
                    counter,
                    start,
                    cond: e(self, cond),
                    step: e(self, step),
                    halve,
                    body: self.copy_block(&body),
                }
            }
            Stmt::If {
                cond,
                accept,
                reject,
            } => Stmt::If {
                cond: e(self, cond),
                accept: self.copy_block(&accept),
                reject: self.copy_block(&reject),
            },
            Stmt::Return(v) => Stmt::Return(v.map(|v| e(self, v))),
            Stmt::Store {
                global,
                index,
                value,
            } => Stmt::Store {
                global,
                index: e(self, index),
                value: e(self, value),
            },
            Stmt::Update {
                local,
                index,
                lane,
                op,
                value,
            } => Stmt::Update {
                local: self.copy.local(local),
                index: index.map(|i| e(self, i)),
                lane,
                op,
                value: e(self, value),
            },
            Stmt::Block(b) => Stmt::Block(self.copy_block(&b)),
            Stmt::AssignElement {
                local,
                index,
                value,
            } => Stmt::AssignElement {
                local: self.copy.local(local),
                index: e(self, index),
                value: e(self, value),
            },
            s @ (Stmt::Continue | Stmt::Barrier | Stmt::Comment(_)) => s,
        }
    }

    /// `e` in the copy: its locals renamed, the operand's reads from their parts.
    fn copy_expr(&mut self, e: Expr) -> Expr {
        if let Some(&done) = self.copy.memo.get(&e) {
            return done;
        }
        let kind = self.f.expr(e).clone();
        let out = match kind {
            ExprKind::Local(l) => match self.copy.locals.get(&l) {
                Some(&n) => self.push(ExprKind::Local(n)),
                None => e,
            },
            ExprKind::Operand { k, index }
                if k == self.parts.operand && self.copy.parts.contains_key(&index) =>
            {
                let part = self.copy.parts[&index];
                let at = self.copy_expr(index);
                self.read_part(part, at)
            }
            ExprKind::Element { local, index } => {
                let index = self.copy_expr(index);
                self.push(ExprKind::Element {
                    local: self.copy.local(local),
                    index,
                })
            }
            kind => {
                let mut changed = false;
                let new = map_children(kind, &mut |c| {
                    let d = self.copy_expr(c);
                    changed |= d != c;
                    d
                });
                if changed { self.push(new) } else { e }
            }
        };
        self.copy.memo.insert(e, out);
        out
    }

    /// Element `at` (four from `at` for a `vec4` operand) read from `part`.
    fn read_part(&mut self, part: usize, at: Expr) -> Expr {
        let base = (part * self.parts.words) as i64;
        // `x + base - base` is `x` (lanes a part apart: lane `k` at `i + k * words`).
        let offset = match self.f.expr(at) {
            ExprKind::Binary {
                op: BinOp::Add,
                left,
                right,
            } => Some(*left).zip(self.literal(*right)),
            _ => None,
        };
        let at = if base == 0 {
            at
        } else if let Some((x, _)) = offset.filter(|&(_, c)| c == base) {
            x
        } else {
            let b = self.u32(base);
            self.push(ExprKind::Binary {
                op: BinOp::Sub,
                left: at,
                right: b,
            })
        };
        let two = self.u32(2);
        let quad = self.push(ExprKind::Binary {
            op: BinOp::ShiftRight,
            left: at,
            right: two,
        });
        let load = self.push(ExprKind::Load {
            global: self.globals[part],
            index: quad,
        });
        if self.vec4 {
            return load;
        }
        let three = self.u32(3);
        let lane = self.push(ExprKind::Binary {
            op: BinOp::BitAnd,
            left: at,
            right: three,
        });
        self.push(ExprKind::Lane { vector: load, lane })
    }

    /// The values integer expression `e` may take, where that follows from what is known;
    /// `None` where it does not, or where a step of it could wrap around.
    fn range(&self, e: Expr) -> Option<(i64, i64)> {
        let scalar = match self.types.get(e.index()).copied().flatten() {
            Some(Ty::Scalar(s)) => s,
            _ => return None,
        };
        let (lo, hi) = match self.f.expr(e) {
            ExprKind::Literal(_) => {
                let v = self.literal(e)?;
                (v, v)
            }
            ExprKind::Index => (0, self.facts.len.checked_sub(1)? as i64),
            ExprKind::Local(l) => match self.ranges.get(l) {
                Some(&r) => r,
                None => self.range(*self.lets.get(l)?)?,
            },
            ExprKind::Binary { op, left, right } => {
                let (a, b) = (self.range(*left)?, self.range(*right)?);
                match op {
                    BinOp::Add => (a.0 + b.0, a.1 + b.1),
                    BinOp::Sub => (a.0 - b.1, a.1 - b.0),
                    BinOp::Mul => {
                        let p = [a.0 * b.0, a.0 * b.1, a.1 * b.0, a.1 * b.1];
                        (*p.iter().min()?, *p.iter().max()?)
                    }
                    BinOp::Div if a.0 >= 0 && b.0 > 0 => (a.0 / b.1, a.1 / b.0),
                    BinOp::Rem if a.0 >= 0 && b.0 == b.1 && b.0 > 0 => {
                        if a.0 / b.0 == a.1 / b.0 {
                            (a.0 % b.0, a.1 % b.0)
                        } else {
                            (0, b.0 - 1)
                        }
                    }
                    BinOp::ShiftRight if a.0 >= 0 && b.0 == b.1 && (0..32).contains(&b.0) => {
                        (a.0 >> b.0, a.1 >> b.0)
                    }
                    BinOp::BitAnd if a.0 >= 0 && b.0 == b.1 && b.0 >= 0 => (0, a.1.min(b.0)),
                    _ => return None,
                }
            }
            ExprKind::Math { fun, args } => {
                let r: Vec<(i64, i64)> =
                    args.iter().map(|&a| self.range(a)).collect::<Option<_>>()?;
                match (fun, r.as_slice()) {
                    (MathFn::Min, [a, b]) => (a.0.min(b.0), a.1.min(b.1)),
                    (MathFn::Max, [a, b]) => (a.0.max(b.0), a.1.max(b.1)),
                    (MathFn::Clamp, [x, lo, hi]) => {
                        (x.0.max(lo.0).min(hi.0), x.1.max(lo.1).min(hi.1))
                    }
                    _ => return None,
                }
            }
            ExprKind::Cast { value, .. } => self.range(*value)?,
            _ => return None,
        };
        let fits = match scalar {
            Scalar::U32 => lo >= 0 && hi <= i64::from(u32::MAX),
            Scalar::I32 => lo >= i64::from(i32::MIN) && hi <= i64::from(i32::MAX),
            _ => false,
        };
        fits.then_some((lo, hi))
    }

    /// A number every value of integer expression `e` is a multiple of (0: it is zero).
    fn multiple(&self, e: Expr) -> u64 {
        match self.f.expr(e) {
            ExprKind::Literal(_) => self.literal(e).map_or(1, |v| v.unsigned_abs()),
            ExprKind::Index => self.facts.multiple,
            ExprKind::Local(l) => self.lets.get(l).map_or(1, |&v| self.multiple(v)),
            ExprKind::Binary { op, left, right } => {
                let (a, b) = (self.multiple(*left), self.multiple(*right));
                let divided = |d: u64| if d > 0 && a % d == 0 { a / d } else { 1 };
                match op {
                    BinOp::Add | BinOp::Sub => gcd(a, b),
                    BinOp::Mul => a.saturating_mul(b),
                    BinOp::Rem => match self.literal(*right) {
                        Some(m) => gcd(a, m.unsigned_abs()),
                        None => 1,
                    },
                    BinOp::Div => self
                        .literal(*right)
                        .map_or(1, |d| divided(d.unsigned_abs())),
                    BinOp::ShiftRight => match self.literal(*right) {
                        Some(s) if (0..32).contains(&s) => divided(1 << s),
                        _ => 1,
                    },
                    _ => 1,
                }
            }
            _ => 1,
        }
    }
}

/// Where a copy of a loop body puts what it copies.
#[derive(Default)]
struct Copier {
    locals: HashMap<Local, Local>,
    memo: HashMap<Expr, Expr>,
    /// The part each read of the operand (by its index expression) lies in.
    parts: HashMap<Expr, usize>,
}

impl Copier {
    fn local(&self, l: Local) -> Local {
        self.locals.get(&l).copied().unwrap_or(l)
    }
}

/// The greatest common divisor (`gcd(0, b)` is `b`).
pub(crate) fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn collect_lets(block: &[Stmt], out: &mut HashMap<Local, Expr>) {
    for s in block {
        match s {
            Stmt::Let { local, value } => {
                out.insert(*local, *value);
            }
            Stmt::For { body, .. } | Stmt::Loop { body, .. } | Stmt::Block(body) => {
                collect_lets(body, out)
            }
            Stmt::If { accept, reject, .. } => {
                collect_lets(accept, out);
                collect_lets(reject, out);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::interp::{Env, Lanes, Value, eval};
    use super::super::wgsl::{Callee, body};
    use super::super::{Builder, ChunkBound, Space};
    use super::*;

    const R: usize = 3;
    const N: usize = 8;
    const K: usize = 6;

    fn a(j: u32) -> f32 {
        0.25 * j as f32 - 1.0
    }

    fn b(j: u32) -> f32 {
        0.5 * j as f32 + 1.0
    }

    /// `a` (`[R, K]`) and `b` (`[K, N]`) as operands (`b` four elements at a time where
    /// `vec4`), `b` also as parts of `words` elements; operand reads of `b` are counted.
    struct Matrices {
        vec4: bool,
        words: usize,
        b_reads: usize,
    }

    impl Env for Matrices {
        fn operand(&mut self, k: usize, index: u32) -> Lanes {
            if k == 0 {
                return Lanes::Scalar(Value::F32(a(index)));
            }
            self.b_reads += 1;
            if self.vec4 {
                Lanes::Vec4(std::array::from_fn(|l| Value::F32(b(index + l as u32))))
            } else {
                Lanes::Scalar(Value::F32(b(index)))
            }
        }
        fn chunk(&self, _: ChunkBound) -> u32 {
            unreachable!("no chunks here")
        }
        fn load(&mut self, global: &str, index: u32) -> Lanes {
            let part: u32 = global.strip_prefix("b").unwrap().parse().unwrap();
            let first = part * self.words as u32 + index * 4;
            assert!(
                index * 4 < self.words as u32,
                "{global}[{index}] is past its part"
            );
            Lanes::Vec4(std::array::from_fn(|l| {
                let j = first + l as u32;
                Value::F32(if (j as usize) < K * N { b(j) } else { 0.0 })
            }))
        }
    }

    /// `sum over p of a[r, p] * b[p, c]` at element `i = (r, c)` of `[R, N]`, reading `b` as
    /// `f32` or as four consecutive columns.
    fn matmul(vec4: bool) -> Function {
        let ty = if vec4 { Ty::VEC4_F32 } else { Ty::F32 };
        let mut f = Builder::new(ty, vec![Ty::F32, ty]);
        let i = f.index();
        let [r, c] = f.decode(i, &["r", "c"], &[R, N])[..] else {
            unreachable!()
        };
        let zero = f.f32(0.0);
        let zero = if vec4 { f.splat(zero) } else { zero };
        let acc = f.var("acc", ty, zero);
        let (lo, hi) = (f.u32(0), f.u32(K));
        f.for_("p", lo, hi, |f, p| {
            let k = f.u32(K);
            let t = f.mul(r, k);
            let a_at = f.add(t, p);
            let x = f.operand(0, a_at);
            let n = f.u32(N);
            let t = f.mul(p, n);
            let b_at = f.add(t, c);
            let y = f.operand(1, b_at);
            let t = f.mul(x, y);
            f.add_assign(acc, t);
        });
        let v = f.get(acc);
        f.ret_(v);
        f.finish()
    }

    fn parts(words: usize) -> Parts {
        Parts {
            operand: 1,
            globals: (0..(K * N).div_ceil(words))
                .map(|k| Global {
                    name: format!("b{k}"),
                    space: Space::Uniform,
                    elem: Ty::VEC4_F32,
                })
                .collect(),
            words,
        }
    }

    /// Every element of `read` against `f`'s; the operand reads of `b` one evaluation made.
    fn check(f: &Function, read: &Function, vec4: bool, words: usize) -> usize {
        let step = if vec4 { 4 } else { 1 };
        let mut reads = 0;
        for i in (0..(R * N) as u32).step_by(step) {
            let mut env = Matrices {
                vec4,
                words,
                b_reads: 0,
            };
            let got = eval(read, i, &mut env).unwrap();
            reads = env.b_reads;
            let want = eval(f, i, &mut Matrices { b_reads: 0, ..env }).unwrap();
            assert_eq!(got, want, "element {i}");
        }
        reads
    }

    #[test]
    fn a_loop_over_rows_of_parts_reads_each_part_directly() {
        for vec4 in [false, true] {
            let f = matmul(vec4);
            let facts = IndexFacts {
                len: (R * N) as u64,
                multiple: if vec4 { 4 } else { 1 },
            };
            // Two rows of `b` per part: three pieces of two steps.
            let (read, split) = read_parts(&f, &parts(2 * N), facts).unwrap();
            assert_eq!(split, 1);
            assert!(!reads_operand(&read, 1));
            assert_eq!(check(&f, &read, vec4, 2 * N), 0);
            let names = [Callee::Call("a".into()), Callee::Call("b".into())];
            let text = body(&read, &names).unwrap();
            assert!(text.contains("for (var p = 2u; p < 4u; p++)"), "{text}");
            assert!(text.contains("b1[(p * 8u + c - 16u) >> 2u]"), "{text}");
            // Parts of four rows: the second piece is the last two steps.
            let (read, split) = read_parts(&f, &parts(4 * N), facts).unwrap();
            assert_eq!(split, 1);
            assert_eq!(check(&f, &read, vec4, 4 * N), 0);
        }
    }

    #[test]
    fn reads_that_straddle_parts_or_are_not_aligned_stay() {
        // Parts of one and a half rows: some step's columns lie in two parts.
        let f = matmul(false);
        let facts = IndexFacts {
            len: (R * N) as u64,
            multiple: 1,
        };
        let (read, split) = read_parts(&f, &parts(12), facts).unwrap();
        assert_eq!((split, &read), (0, &f));
        // Four columns from an index not known to be a multiple of four.
        let f = matmul(true);
        let (read, split) = read_parts(&f, &parts(2 * N), facts).unwrap();
        assert_eq!((split, &read), (0, &f));
        assert!(reads_operand(&read, 1));
    }

    #[test]
    fn lanes_a_part_apart_read_one_part_each() {
        // Lanes `i`, `i + 16`, `i + 32` of `b` in parts of 16: lane `k` is part `k` at `i`.
        let mut f = Builder::new(Ty::VEC4_F32, vec![Ty::F32, Ty::F32]);
        let i = f.index();
        let lanes = [0, 1, 2, 2].map(|k| {
            let at = if k == 0 {
                i
            } else {
                let d = f.u32(16 * k);
                f.add(i, d)
            };
            f.operand(1, at)
        });
        let v = f.compose(lanes);
        f.ret_(v);
        let f = f.finish();
        let facts = IndexFacts {
            len: 16,
            multiple: 1,
        };
        let (read, direct) = read_parts(&f, &parts(16), facts).unwrap();
        assert_eq!(direct, 4);
        assert!(!reads_operand(&read, 1));
        let names = [Callee::Call("a".into()), Callee::Call("b".into())];
        let text = body(&read, &names).unwrap();
        assert!(text.contains("b1[i >> 2u][i & 3u]"), "{text}");
        for i in 0..16 {
            let mut env = Matrices {
                vec4: false,
                words: 16,
                b_reads: 0,
            };
            let got = eval(&read, i, &mut env).unwrap();
            assert_eq!(env.b_reads, 0);
            assert_eq!(got, eval(&f, i, &mut env).unwrap(), "element {i}");
        }
        // One element more and every lane could lie in two parts: nothing is known.
        let wide = IndexFacts {
            len: 17,
            multiple: 1,
        };
        let (read, direct) = read_parts(&f, &parts(16), wide).unwrap();
        assert_eq!((direct, &read), (0, &f));
    }
}
