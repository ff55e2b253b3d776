//! Holding axes in registers: from an element function, one function that computes its
//! values at several elements at once — a schedule's rows — doing once, for all of them,
//! every statement and load that does not depend on the coordinates they differ in.
//!
//! The elements are `i` and the copies `i + d_k`, where `d_k` moves each held axis of `i`'s
//! element space (known by its flat stride and extent, [`HeldAxis`]) by an offset
//! ([`unroll`]'s `copies`). A value's *class* says how it changes between the copies:
//! - the same in every copy (shared: computed once);
//! - the shared value plus a constant per copy (affine: the coordinate decoded from `i` along
//!   a held axis, and sums and constant multiples of it — the row index `n * C + c` of row
//!   `k` is row 0's plus `k * C`), computed once and offset per copy;
//! - anything else (computed per copy).
//!
//! Decoding `(i / s) % n` is affine exactly when the held axes lie wholly inside or wholly
//! outside the digits it extracts: the caller promises that no copy carries a held
//! coordinate past its axis (the nest's blocks of rows start at multiples of the rows and
//! divide the axis). Every other use of `i` is `i + d_k`, so the result is exact either
//! way; the classes only decide what is shared.
//!
//! A shared read that copies use (the lanes' operand every row multiplies) is bound to a
//! `let` where the first copy reads it, so the printed kernel loads it once; so is a read
//! that several (not all) copies make at the same element (copies along two axes, the
//! read's index moving along one).
//!
//! Loops must have shared bounds (one loop serves every copy), and a `continue` may only
//! depend on shared values. An `if` on a per-copy condition is written once per copy.
//!
//! The same classes say how an element function computes four lanes with one evaluation
//! ([`lane_reads`]): each operand is read at four evenly spaced elements (a `vec4` lane
//! function) or at one they share, and nothing else depends on the lane.

use std::collections::HashMap;

use super::{
    BinOp, Block, Expr, ExprKind, Function, Literal, Local, LocalDecl, Stmt, Ty, validate,
};

/// An axis of the element space an element function's index enumerates: the distance
/// between consecutive coordinates of it in the flat index, and how many there are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldAxis {
    pub stride: usize,
    pub extent: usize,
}

/// Why a function cannot be held along the axes asked for.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UnrollError {
    #[error("the bounds of loop `{0}` depend on the held coordinates")]
    LoopBounds(String),
    #[error("a `continue` or `return` depends on the held coordinates")]
    VaryingExit,
    #[error("a copy moves held axis {axis} by {offset}, past its extent {extent}")]
    Offset {
        axis: usize,
        offset: usize,
        extent: usize,
    },
    #[error("held copies need an offset per held axis")]
    Copies,
    #[error("{0} is not held")]
    Unsupported(&'static str),
    #[error("the function is not valid kernel IR: {0}")]
    Invalid(String),
}

/// How a value changes from copy to copy.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Class {
    /// The shared value plus `offsets[k]` in copy `k` (all zeros: shared).
    Affine(Vec<i64>),
    Varying,
}

impl Class {
    fn is_shared(&self) -> bool {
        matches!(self, Class::Affine(o) if o.iter().all(|&d| d == 0))
    }
}

/// `f`'s values at the elements `i + d_k`, one per entry of `copies` (the offset of each
/// held axis of `axes`), as one function returning them in an array in that order: shared
/// work done once. The caller promises that, wherever the result is evaluated, no copy
/// moves a held coordinate of `i` past its axis's extent.
pub fn unroll(
    f: &Function,
    axes: &[HeldAxis],
    copies: &[Vec<usize>],
) -> Result<Function, UnrollError> {
    if copies.is_empty() || copies.iter().any(|c| c.len() != axes.len()) {
        return Err(UnrollError::Copies);
    }
    for copy in copies {
        for (axis, (&offset, a)) in copy.iter().zip(axes).enumerate() {
            if offset >= a.extent {
                return Err(UnrollError::Offset {
                    axis,
                    offset,
                    extent: a.extent,
                });
            }
        }
    }
    let ret = f
        .ret
        .filter(|t| !t.is_array())
        .ok_or(UnrollError::Unsupported(
            "a function without a scalar or vec4 result",
        ))?;
    let ret = Ty::array(ret, copies.len() as u32).expect("one deep");
    let types = validate(f).map_err(|e| UnrollError::Invalid(e.0))?.types;
    let mut u = Unroller {
        types,
        reads: vec![None; f.exprs.len()],
        scopes: Vec::new(),
        pending: Vec::new(),
        shared_lets: HashMap::new(),
        f,
        axes,
        copies,
        locals: HashMap::new(),
        classes: vec![None; f.exprs.len()],
        out: Function {
            ret: Some(ret),
            span: f.span,
            params: f.params.clone(),
            operands: f.operands.clone(),
            globals: f.globals.clone(),
            exprs: Vec::new(),
            locals: Vec::new(),
            body: Vec::new(),
        },
        copied: HashMap::new(),
        mapped: HashMap::new(),
    };
    u.classify();
    let (last, rest) = f
        .body
        .split_last()
        .ok_or(UnrollError::Unsupported("an empty function"))?;
    let Stmt::Return(Some(value)) = last else {
        return Err(UnrollError::Unsupported("a body not ending in a return"));
    };
    u.scopes.push(Vec::new());
    let mut body = u.block(rest, None)?;
    let values = (0..copies.len()).map(|k| u.copy(*value, Some(k))).collect();
    let all = u.push(ExprKind::Array(values));
    u.emit(&mut body, Stmt::Return(Some(all)));
    u.out.body = body;
    Ok(u.out)
}

struct Unroller<'a> {
    f: &'a Function,
    /// The type of each of `f`'s expressions (from validation).
    types: Vec<Option<Ty>>,
    /// Whether each of `f`'s expressions reads an operand or a buffer.
    reads: Vec<Option<bool>>,
    /// The copies made in each open block, forgotten when it closes (they may read its
    /// locals).
    scopes: Vec<Vec<(Expr, Option<usize>)>>,
    /// `let`s of shared reads made while copying a statement's expressions, written just
    /// before it.
    pending: Vec<Stmt>,
    /// The `let`s made so far by name prefix (their names are numbered).
    shared_lets: HashMap<&'static str, usize>,
    axes: &'a [HeldAxis],
    copies: &'a [Vec<usize>],
    /// The class of each local of `f` that is not shared (a loop counter with per-copy
    /// bounds, a `var` assigned per copy, a `let` of a value that changes).
    locals: HashMap<Local, Class>,
    classes: Vec<Option<Class>>,
    out: Function,
    /// `f`'s expressions copied into `out`: the shared value (`None`) or copy `k`'s.
    copied: HashMap<(Expr, Option<usize>), Expr>,
    /// `f`'s locals declared in `out`: the shared one (`None`) or copy `k`'s.
    mapped: HashMap<(Local, Option<usize>), Local>,
}

impl Unroller<'_> {
    /// Classes every local (a fixed point: a value assigned under a per-copy condition, or
    /// from a per-copy value, is per copy).
    fn classify(&mut self) {
        loop {
            self.classes = vec![None; self.f.exprs.len()];
            let before = self.locals.clone();
            let f = self.f;
            self.scan(&f.body, false);
            if self.locals == before {
                return;
            }
        }
    }

    fn mark(&mut self, local: Local, class: Class) {
        if class.is_shared() {
            return;
        }
        let entry = self.locals.entry(local).or_insert(class.clone());
        if *entry != class {
            *entry = Class::Varying;
        }
    }

    fn scan(&mut self, block: &[Stmt], under: bool) {
        for s in block {
            match s {
                Stmt::Let { local, value } => {
                    let c = if under {
                        Class::Varying
                    } else {
                        self.class(*value)
                    };
                    self.mark(*local, c);
                }
                // A `var` changes: any difference makes it per copy.
                Stmt::Var { local, value } | Stmt::Assign { local, value, .. }
                    if under || !self.class(*value).is_shared() =>
                {
                    self.mark(*local, Class::Varying);
                }
                Stmt::Update {
                    local,
                    index,
                    value,
                    ..
                } => {
                    let index_shared = index.is_none_or(|i| self.class(i).is_shared());
                    if under || !index_shared || !self.class(*value).is_shared() {
                        self.mark(*local, Class::Varying);
                    }
                }
                Stmt::For {
                    counter,
                    start,
                    end,
                    body,
                    ..
                } => {
                    if under || !self.class(*start).is_shared() || !self.class(*end).is_shared() {
                        self.mark(*counter, Class::Varying);
                    }
                    self.scan(body, under);
                }
                Stmt::If {
                    cond,
                    accept,
                    reject,
                } => {
                    let inner = under || !self.class(*cond).is_shared();
                    self.scan(accept, inner);
                    self.scan(reject, inner);
                }
                Stmt::Block(b) => self.scan(b, under),
                _ => {}
            }
        }
    }

    /// The flat offset of copy `k`'s element from `i`.
    fn flat_offset(&self, k: usize) -> i64 {
        let d: usize = self.copies[k]
            .iter()
            .zip(self.axes)
            .map(|(o, a)| o * a.stride)
            .sum();
        d as i64
    }

    /// How `(i / s) % n` (`n` `None`: no `%`) changes in copy `k`, where the held axes lie
    /// wholly inside or outside its digits; `None` otherwise.
    fn digits_offset(&self, k: usize, s: usize, n: Option<usize>) -> Option<i64> {
        let mut total = 0i64;
        for (&o, a) in self.copies[k].iter().zip(self.axes) {
            let (lo, hi) = (a.stride, a.stride * a.extent);
            let outside_below = s % hi == 0;
            let outside_above = n.is_some_and(|n| lo % (s * n) == 0);
            let inside = lo % s == 0 && n.is_none_or(|n| (s * n) % hi == 0);
            if o == 0 || outside_below || outside_above {
                continue;
            }
            if !inside {
                return None;
            }
            total += (o * lo / s) as i64;
        }
        Some(total)
    }

    /// `e` as a decoding of the index, `(i / s) % n`: `(s, n)`.
    fn digits(&self, e: Expr) -> Option<(usize, Option<usize>)> {
        let lit = |e: Expr| match self.f.expr(e) {
            ExprKind::Literal(Literal::U32(n)) if *n > 0 => Some(*n as usize),
            _ => None,
        };
        let is_index = |e: Expr| matches!(self.f.expr(e), ExprKind::Index);
        match self.f.expr(e) {
            ExprKind::Index => Some((1, None)),
            ExprKind::Binary { op, left, right } if is_index(*left) => match op {
                BinOp::Div => Some((lit(*right)?, None)),
                BinOp::Rem => Some((1, Some(lit(*right)?))),
                _ => None,
            },
            ExprKind::Binary {
                op: BinOp::Rem,
                left,
                right,
            } => match self.f.expr(*left) {
                ExprKind::Binary {
                    op: BinOp::Div,
                    left: x,
                    right: s,
                } if is_index(*x) => Some((lit(*s)?, Some(lit(*right)?))),
                _ => None,
            },
            _ => None,
        }
    }

    fn shared(&self) -> Class {
        Class::Affine(vec![0; self.copies.len()])
    }

    fn class(&mut self, e: Expr) -> Class {
        if let Some(c) = &self.classes[e.index()] {
            return c.clone();
        }
        let c = self.class_of(e);
        self.classes[e.index()] = Some(c.clone());
        c
    }

    fn class_of(&mut self, e: Expr) -> Class {
        if let Some((s, n)) = self.digits(e) {
            let offsets: Option<Vec<i64>> = (0..self.copies.len())
                .map(|k| self.digits_offset(k, s, n))
                .collect();
            if let Some(o) = offsets {
                return Class::Affine(o);
            }
        }
        let kind = self.f.expr(e).clone();
        let combine = |a: Class, b: Class, f: &dyn Fn(i64, i64) -> i64| match (a, b) {
            (Class::Affine(x), Class::Affine(y)) => {
                Class::Affine(x.iter().zip(&y).map(|(p, q)| f(*p, *q)).collect())
            }
            _ => Class::Varying,
        };
        match kind {
            ExprKind::Index => Class::Affine(
                (0..self.copies.len())
                    .map(|k| self.flat_offset(k))
                    .collect(),
            ),
            ExprKind::Local(l) => self.locals.get(&l).cloned().unwrap_or(self.shared()),
            ExprKind::Binary {
                op: op @ (BinOp::Add | BinOp::Sub),
                left,
                right,
            } => {
                let (a, b) = (self.class(left), self.class(right));
                if op == BinOp::Add {
                    combine(a, b, &|p, q| p + q)
                } else {
                    combine(a, b, &|p, q| p - q)
                }
            }
            ExprKind::Binary {
                op: BinOp::Mul,
                left,
                right,
            } => {
                let (a, b) = (self.class(left), self.class(right));
                let factor = |e: Expr| match self.f.expr(e) {
                    ExprKind::Literal(Literal::U32(n)) => Some(i64::from(*n)),
                    _ => None,
                };
                match (a, b) {
                    (a, b) if a.is_shared() && b.is_shared() => self.shared(),
                    (Class::Affine(x), b) if b.is_shared() && factor(right).is_some() => {
                        let c = factor(right).expect("a literal");
                        Class::Affine(x.iter().map(|d| d * c).collect())
                    }
                    (a, Class::Affine(y)) if a.is_shared() && factor(left).is_some() => {
                        let c = factor(left).expect("a literal");
                        Class::Affine(y.iter().map(|d| d * c).collect())
                    }
                    _ => Class::Varying,
                }
            }
            kind => {
                let mut all_shared = true;
                for child in children(&kind) {
                    all_shared &= self.class(child).is_shared();
                }
                if all_shared {
                    self.shared()
                } else {
                    Class::Varying
                }
            }
        }
    }

    fn push(&mut self, kind: ExprKind) -> Expr {
        self.out.exprs.push(kind);
        Expr(self.out.exprs.len() as u32 - 1)
    }

    /// `f`'s expression `e` in `out`: its shared value (`None`: only for an affine `e`, its
    /// value at `i`), or copy `k`'s.
    fn copy(&mut self, e: Expr, k: Option<usize>) -> Expr {
        if let Some(&done) = self.copied.get(&(e, k)) {
            return done;
        }
        if let Some(k) = k {
            if let Some(read) = self.read_of_equals(e, k) {
                return read;
            }
        }
        let new = match (k, self.class(e)) {
            (Some(_), c) if c.is_shared() && self.reads(e) => self.bind_shared(e, "shared"),
            (Some(k), Class::Affine(offsets)) => {
                let base = if offsets.iter().all(|&d| d == 0) || self.is_leaf(e) {
                    self.copy(e, None)
                } else {
                    self.bind_shared(e, "at")
                };
                match offsets[k] {
                    0 => base,
                    d => {
                        let lit =
                            self.push(ExprKind::Literal(Literal::U32(d.unsigned_abs() as u32)));
                        let op = if d > 0 { BinOp::Add } else { BinOp::Sub };
                        self.push(ExprKind::Binary {
                            op,
                            left: base,
                            right: lit,
                        })
                    }
                }
            }
            _ => {
                let kind = match self.f.expr(e).clone() {
                    ExprKind::Local(l) => {
                        let at = k
                            .and_then(|k| self.mapped.get(&(l, Some(k))))
                            .or_else(|| self.mapped.get(&(l, None)))
                            .copied()
                            .expect("a local is declared before it is read");
                        ExprKind::Local(at)
                    }
                    kind => map_children(kind, &mut |c| self.copy(c, k)),
                };
                self.push(kind)
            }
        };
        self.copied.insert((e, k), new);
        self.scopes
            .last_mut()
            .expect("copies are made inside a block")
            .push((e, k));
        new
    }

    /// Whether `e` reads an operand or a buffer.
    fn reads(&mut self, e: Expr) -> bool {
        if let Some(r) = self.reads[e.index()] {
            return r;
        }
        let kind = self.f.expr(e).clone();
        let r = matches!(
            kind,
            ExprKind::Operand { .. } | ExprKind::Call { .. } | ExprKind::Load { .. }
        ) || children(&kind).into_iter().any(|c| self.reads(c));
        self.reads[e.index()] = Some(r);
        r
    }

    /// Whether `e` is a leaf expression (nothing to compute once).
    fn is_leaf(&self, e: Expr) -> bool {
        matches!(
            self.f.expr(e),
            ExprKind::Local(_) | ExprKind::Literal(_) | ExprKind::Index | ExprKind::Param(_)
        )
    }

    /// The shared value of `e` (a read, or an index the copies offset) as a `let` named
    /// `prefix<n>` before the statement that first needs it for a copy: computed once, not
    /// once per copy.
    fn bind_shared(&mut self, e: Expr, prefix: &'static str) -> Expr {
        if let Some(&done) = self.copied.get(&(e, None)) {
            if matches!(self.out.exprs[done.index()], ExprKind::Local(_)) {
                return done;
            }
        }
        let value = self.copy(e, None);
        let read = self.bind(e, value, prefix);
        self.copied.insert((e, None), read);
        read
    }

    /// `value` (a copy of `e`) bound to the next `let` named `prefix<n>` before the statement
    /// being made; its local.
    fn bind(&mut self, e: Expr, value: Expr, prefix: &'static str) -> Expr {
        let ty = self.types[e.index()].expect("validated");
        let count = self.shared_lets.entry(prefix).or_insert(0);
        let n = *count;
        *count += 1;
        self.out.locals.push(LocalDecl {
            name: format!("{prefix}{n}"),
            ty,
            array: None,
        });
        let local = Local(self.out.locals.len() as u32 - 1);
        self.pending.push(Stmt::Let { local, value });
        self.push(ExprKind::Local(local))
    }

    /// Copy `k` of read `e` where other copies read the same element (copies along two
    /// held axes, the read's index moving along one): made once for all of them, bound to a
    /// `let` where the first reads it. `None` for other expressions.
    fn read_of_equals(&mut self, e: Expr, k: usize) -> Option<Expr> {
        let index = match self.f.expr(e) {
            ExprKind::Operand { index, .. } | ExprKind::Load { index, .. } => *index,
            _ => return None,
        };
        let Class::Affine(offsets) = self.class(index) else {
            return None;
        };
        let equals: Vec<usize> = (0..offsets.len())
            .filter(|&j| offsets[j] == offsets[k])
            .collect();
        if equals.len() < 2 || offsets.iter().all(|&d| d == offsets[k]) {
            return None;
        }
        let kind = self.f.expr(e).clone();
        let value = map_children(kind, &mut |c| self.copy(c, Some(k)));
        let value = self.push(value);
        let read = self.bind(e, value, "shared");
        let scope = self
            .scopes
            .last_mut()
            .expect("copies are made inside a block");
        for j in equals {
            self.copied.insert((e, Some(j)), read);
            scope.push((e, Some(j)));
        }
        Some(read)
    }

    /// Appends `s` to `out`, after the `let`s of shared reads its expressions made.
    fn emit(&mut self, out: &mut Block, s: Stmt) {
        out.append(&mut self.pending);
        out.push(s);
    }

    /// Declares a copy of `f`'s local `l` in `out` (copy `k` named with its number).
    fn declare(&mut self, l: Local, k: Option<usize>) -> Local {
        let decl = self.f.local(l);
        let name = match k {
            None => decl.name.clone(),
            Some(k) if decl.name.ends_with(|c: char| c.is_ascii_digit()) => {
                format!("{}_{k}", decl.name)
            }
            Some(k) => format!("{}{k}", decl.name),
        };
        self.out.locals.push(LocalDecl {
            name,
            ty: decl.ty,
            array: decl.array,
        });
        let new = Local(self.out.locals.len() as u32 - 1);
        self.mapped.insert((l, k), new);
        new
    }

    /// Whether `l` is written per copy.
    fn per_copy(&self, l: Local) -> bool {
        matches!(self.locals.get(&l), Some(Class::Varying))
    }

    /// The local `l` of copy `k` (`None`: the shared one) as declared in `out`.
    fn local(&self, l: Local, k: Option<usize>) -> Local {
        k.and_then(|k| self.mapped.get(&(l, Some(k))))
            .or_else(|| self.mapped.get(&(l, None)))
            .copied()
            .expect("a local is declared before it is written")
    }

    /// The copies a statement on `l` is written for: every copy where it is per copy,
    /// else once (`None`); inside a per-copy `if` (`only`), that copy.
    fn writers(&self, per_copy: bool, only: Option<usize>) -> Vec<Option<usize>> {
        match only {
            Some(k) => vec![Some(k)],
            None if per_copy => (0..self.copies.len()).map(Some).collect(),
            None => vec![None],
        }
    }

    /// `block` in `out`: for every copy, or (`only`) inside copy `k`'s own `if`.
    fn block(&mut self, block: &[Stmt], only: Option<usize>) -> Result<Block, UnrollError> {
        self.scopes.push(Vec::new());
        let out = self.statements(block, only);
        for key in self.scopes.pop().expect("pushed") {
            self.copied.remove(&key);
        }
        out
    }

    fn statements(&mut self, block: &[Stmt], only: Option<usize>) -> Result<Block, UnrollError> {
        let mut out = Vec::new();
        for s in block {
            match s {
                Stmt::Let { local, value } | Stmt::Var { local, value } => {
                    let mut made: Vec<(Expr, Local)> = Vec::new();
                    for k in self.writers(self.per_copy(*local), only) {
                        let v = match k {
                            Some(k) => self.copy(*value, Some(k)),
                            None => self.copy(*value, None),
                        };
                        // Copies whose `let` has the same value (a row's coordinate, shared
                        // by the copies along another axis) bind one: fewer names, and
                        // `kir::slide` sees the copies' expressions over the same locals.
                        let same = matches!(s, Stmt::Let { .. })
                            .then(|| made.iter().find(|(m, _)| same_value(&self.out, *m, v)))
                            .flatten();
                        if let Some(&(_, l)) = same {
                            self.mapped.insert((*local, k), l);
                            continue;
                        }
                        let l = self.declare(*local, k);
                        made.push((v, l));
                        let s = match s {
                            Stmt::Let { .. } => Stmt::Let { local: l, value: v },
                            _ => Stmt::Var { local: l, value: v },
                        };
                        self.emit(&mut out, s);
                    }
                }
                Stmt::Assign { local, op, value } => {
                    for k in self.writers(self.per_copy(*local), only) {
                        let v = self.copy(*value, k);
                        let s = Stmt::Assign {
                            local: self.local(*local, k),
                            op: *op,
                            value: v,
                        };
                        self.emit(&mut out, s);
                    }
                }
                Stmt::Update {
                    local,
                    index,
                    lane,
                    op,
                    value,
                } => {
                    for k in self.writers(self.per_copy(*local), only) {
                        let index = index.map(|i| self.copy(i, k));
                        let v = self.copy(*value, k);
                        let s = Stmt::Update {
                            local: self.local(*local, k),
                            index,
                            lane: *lane,
                            op: *op,
                            value: v,
                        };
                        self.emit(&mut out, s);
                    }
                }
                Stmt::For {
                    counter,
                    start,
                    end,
                    body,
                    unroll,
                } => {
                    if self.per_copy(*counter) && only.is_none() {
                        return Err(UnrollError::LoopBounds(self.f.local(*counter).name.clone()));
                    }
                    let (start, end) = (self.copy(*start, only), self.copy(*end, only));
                    out.append(&mut self.pending);
                    let counter = self.declare(*counter, only);
                    let body = self.block(body, only)?;
                    out.push(Stmt::For {
                        counter,
                        start,
                        end,
                        body,
                        unroll: *unroll,
                    });
                }
                Stmt::If {
                    cond,
                    accept,
                    reject,
                } => {
                    if only.is_none() && !self.class(*cond).is_shared() {
                        if exits(accept) || exits(reject) {
                            return Err(UnrollError::VaryingExit);
                        }
                        for k in 0..self.copies.len() {
                            let cond = self.copy(*cond, Some(k));
                            out.append(&mut self.pending);
                            let (accept, reject) =
                                (self.block(accept, Some(k))?, self.block(reject, Some(k))?);
                            out.push(Stmt::If {
                                cond,
                                accept,
                                reject,
                            });
                        }
                    } else {
                        let cond = self.copy(*cond, only);
                        out.append(&mut self.pending);
                        let (accept, reject) =
                            (self.block(accept, only)?, self.block(reject, only)?);
                        out.push(Stmt::If {
                            cond,
                            accept,
                            reject,
                        });
                    }
                }
                Stmt::Continue => out.push(Stmt::Continue),
                Stmt::Block(b) => {
                    let b = self.block(b, only)?;
                    out.push(Stmt::Block(b));
                }
                Stmt::Comment(text) => out.push(Stmt::Comment(text.clone())),
                Stmt::Return(_) => return Err(UnrollError::Unsupported("a return before the end")),
                Stmt::Store { .. } => return Err(UnrollError::Unsupported("a store")),
                Stmt::Loop { .. } => return Err(UnrollError::Unsupported("a general loop")),
                Stmt::VarArray { .. } | Stmt::AssignElement { .. } => {
                    return Err(UnrollError::Unsupported("a local array"));
                }
                Stmt::Barrier => return Err(UnrollError::Unsupported("a barrier")),
            }
        }
        Ok(out)
    }
}

/// Whether `block` leaves the loop around it or the function (`continue`, `return`).
pub(super) fn exits(block: &[Stmt]) -> bool {
    block.iter().any(|s| match s {
        Stmt::Continue | Stmt::Return(_) => true,
        Stmt::If { accept, reject, .. } => exits(accept) || exits(reject),
        Stmt::Block(b) => exits(b),
        // A loop's own `continue`s stay inside it; a `return` does not.
        Stmt::For { body, .. } | Stmt::Loop { body, .. } => returns(body),
        _ => false,
    })
}

fn returns(block: &[Stmt]) -> bool {
    block.iter().any(|s| match s {
        Stmt::Return(_) => true,
        Stmt::If { accept, reject, .. } => returns(accept) || returns(reject),
        Stmt::Block(b) | Stmt::For { body: b, .. } | Stmt::Loop { body: b, .. } => returns(b),
        _ => false,
    })
}

/// The expressions `kind` reads.
fn children(kind: &ExprKind) -> Vec<Expr> {
    let mut out = Vec::new();
    map_children(kind.clone(), &mut |c| {
        out.push(c);
        c
    });
    out
}

/// `kind` with each expression it reads replaced by `f` of it.
/// Whether `a` and `b` are the same expression of `f`, operand for operand.
fn same_value(f: &Function, a: Expr, b: Expr) -> bool {
    if a == b {
        return true;
    }
    let (mut left, mut right) = (Vec::new(), Vec::new());
    let shape = |e: Expr, children: &mut Vec<Expr>| {
        map_children(f.expr(e).clone(), &mut |c| {
            children.push(c);
            Expr(0)
        })
    };
    shape(a, &mut left) == shape(b, &mut right)
        && left.len() == right.len()
        && left.iter().zip(&right).all(|(&l, &r)| same_value(f, l, r))
}

pub(super) fn map_children(kind: ExprKind, f: &mut dyn FnMut(Expr) -> Expr) -> ExprKind {
    use ExprKind as K;
    match kind {
        K::Literal(_)
        | K::Index
        | K::Local(_)
        | K::Param(_)
        | K::Chunk(_)
        | K::WindowBase(_)
        | K::GlobalId(_)
        | K::LocalIndex => kind,
        K::Operand { k, index } => K::Operand { k, index: f(index) },
        K::Call { k, args } => K::Call {
            k,
            args: args.into_iter().map(&mut *f).collect(),
        },
        K::Array(xs) => K::Array(xs.into_iter().map(&mut *f).collect()),
        K::Binary { op, left, right } => {
            let left = f(left);
            K::Binary {
                op,
                left,
                right: f(right),
            }
        }
        K::Unary { op, operand } => K::Unary {
            op,
            operand: f(operand),
        },
        K::Math { fun, args } => K::Math {
            fun,
            args: args.into_iter().map(&mut *f).collect(),
        },
        K::Select {
            cond,
            accept,
            reject,
        } => {
            let cond = f(cond);
            let accept = f(accept);
            K::Select {
                cond,
                accept,
                reject: f(reject),
            }
        }
        K::Cast { to, value } => K::Cast {
            to,
            value: f(value),
        },
        K::Splat(x) => K::Splat(f(x)),
        K::Compose(xs) => K::Compose(xs.map(&mut *f)),
        K::Load { global, index } => K::Load {
            global,
            index: f(index),
        },
        K::Lane { vector, lane } => {
            let vector = f(vector);
            K::Lane {
                vector,
                lane: f(lane),
            }
        }
        K::Element { local, index } => K::Element {
            local,
            index: f(index),
        },
    }
}

/// How a function's operands are read when it computes four lanes at once, its elements
/// `i + l * stride` (`l` = 0..4) along one axis: each operand's stride between lanes
/// (`Some(s)`: four lanes `s` apart, a `vec4` operand) or `None` where every lane reads the
/// same element (a scalar shared by the lanes). `None` as a whole where the function cannot
/// compute lanes with the same statements: a condition or a loop bound, or a value other
/// than an operand's index, depends on the lane, or an operand is read at lanes that are
/// not evenly spaced. The caller promises what [`unroll`] needs of `axis`: no lane moves
/// the coordinate past its extent (the lanes are a block of `4 * gap` coordinates).
///
/// This is what register blocking asks of an op: its definition, evaluated once with
/// `vec4` values, is then exactly its four elements.
pub fn lane_reads(f: &Function, axis: HeldAxis, gap: usize) -> Option<Vec<Option<usize>>> {
    let copies: Vec<Vec<usize>> = (0..4).map(|l| vec![l * gap]).collect();
    if copies.iter().any(|c| c[0] >= axis.extent) || f.ret.is_none_or(|t| t.is_array()) {
        return None;
    }
    let mut u = Unroller {
        types: Vec::new(),
        reads: vec![None; f.exprs.len()],
        scopes: Vec::new(),
        pending: Vec::new(),
        shared_lets: HashMap::new(),
        f,
        axes: std::slice::from_ref(&axis),
        copies: &copies,
        locals: HashMap::new(),
        classes: vec![None; f.exprs.len()],
        out: f.clone(),
        copied: HashMap::new(),
        mapped: HashMap::new(),
    };
    u.classify();
    let mut check = LaneCheck {
        u,
        strides: vec![Vec::new(); f.operands.len()],
        lane_locals: HashMap::new(),
    };
    // A local holding a value of the lanes: a fixed point over its definitions.
    loop {
        let before = check.lane_locals.clone();
        if !check.block(&f.body) {
            return None;
        }
        if check.lane_locals == before {
            break;
        }
    }
    check
        .strides
        .into_iter()
        .map(|s| match s[..] {
            [] => Some(None),
            [first, ..] if s.iter().all(|&x| x == first) => Some((first > 0).then_some(first)),
            _ => None,
        })
        .collect()
}

struct LaneCheck<'a> {
    u: Unroller<'a>,
    /// Each read's stride between lanes, by operand.
    strides: Vec<Vec<usize>>,
    /// Whether each local assigned a value that differs between lanes holds one the lanes
    /// compute (from operand reads) rather than a coordinate.
    lane_locals: HashMap<Local, bool>,
}

impl LaneCheck<'_> {
    /// Checks the statements of `block`: shared control, and values the lanes compute.
    fn block(&mut self, block: &[Stmt]) -> bool {
        block.iter().all(|s| match s {
            // A `let` of a coordinate may still index operands: judged where it is read.
            Stmt::Let { local, value } => {
                let ok = self.value(*value);
                self.lane_locals.insert(*local, ok);
                true
            }
            Stmt::Var { local, value } | Stmt::Assign { local, value, .. } => {
                let ok = self.value(*value);
                let entry = self.lane_locals.entry(*local).or_insert(true);
                *entry &= ok;
                ok
            }
            Stmt::For {
                start, end, body, ..
            } => self.shared(*start) && self.shared(*end) && self.block(body),
            Stmt::If {
                cond,
                accept,
                reject,
            } => self.shared(*cond) && self.block(accept) && self.block(reject),
            Stmt::Block(b) => self.block(b),
            Stmt::Return(Some(v)) => self.value(*v),
            Stmt::Continue | Stmt::Comment(_) => true,
            _ => false,
        })
    }

    /// Whether control value `e` is shared (its reads then shared too).
    fn shared(&mut self, e: Expr) -> bool {
        self.u.class(e).is_shared() && self.reads_in(e)
    }

    /// Whether `e`, used as a value, is shared or computed by the lanes from operand reads
    /// at evenly spaced elements (recording their strides).
    fn value(&mut self, e: Expr) -> bool {
        if self.shared(e) {
            return true;
        }
        match self.u.f.expr(e).clone() {
            // Reads inside an index are scalars every lane's index is made from.
            ExprKind::Operand { k, index } => match self.u.class(index) {
                Class::Affine(o) if o[1] > 0 && (0..4).all(|l| o[l] == l as i64 * o[1]) => {
                    self.strides[k].push(o[1] as usize);
                    self.reads_in(index)
                }
                _ => false,
            },
            ExprKind::Local(l) => self.lane_locals.get(&l).copied().unwrap_or(true),
            ExprKind::Index | ExprKind::Call { .. } | ExprKind::Load { .. } => false,
            kind => children(&kind).into_iter().all(|c| self.value(c)),
        }
    }

    /// Records the operand reads inside shared `e` (each read by every lane alike).
    fn reads_in(&mut self, e: Expr) -> bool {
        match self.u.f.expr(e).clone() {
            ExprKind::Operand { k, index } => {
                self.strides[k].push(0);
                self.reads_in(index)
            }
            ExprKind::Call { .. } | ExprKind::Load { .. } => false,
            kind => children(&kind).into_iter().all(|c| self.reads_in(c)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::interp::{Env, Lanes, Value, eval};
    use super::super::{Builder, ChunkBound};
    use super::*;

    struct Ramp;

    impl Env for Ramp {
        fn operand(&mut self, _: usize, index: u32) -> Lanes {
            Lanes::Scalar(Value::F32(index as f32 * 0.5))
        }
        fn chunk(&self, _: ChunkBound) -> u32 {
            unreachable!("no chunks here")
        }
    }

    /// Element `i` of a `[2, 3, 4]` space: coordinates `a`, `b`, `c`.
    fn coords(b: &mut Builder) -> Vec<Expr> {
        let i = b.index();
        b.decode(i, &["a", "b", "c"], &[2, 3, 4])
    }

    const ROWS: [HeldAxis; 1] = [HeldAxis {
        stride: 4,
        extent: 3,
    }];

    fn three_rows() -> Vec<Vec<usize>> {
        (0..3).map(|k| vec![k]).collect()
    }

    #[test]
    fn a_loop_bound_on_a_held_coordinate_is_refused() {
        let mut b = Builder::new(Ty::F32, vec![Ty::F32]);
        let [_, row, _] = coords(&mut b)[..] else {
            unreachable!()
        };
        let zero = b.f32(0.0);
        let acc = b.var("acc", Ty::F32, zero);
        let start = b.u32(0);
        b.for_("k", start, row, |b, k| {
            let x = b.operand(0, k);
            b.add_assign(acc, x);
        });
        let a = b.get(acc);
        b.ret_(a);
        let err = unroll(&b.finish(), &ROWS, &three_rows()).unwrap_err();
        assert_eq!(err, UnrollError::LoopBounds("k".into()));
    }

    #[test]
    fn a_continue_on_a_held_coordinate_is_refused() {
        let mut b = Builder::new(Ty::F32, vec![Ty::F32]);
        let [_, row, _] = coords(&mut b)[..] else {
            unreachable!()
        };
        let zero = b.f32(0.0);
        let acc = b.var("acc", Ty::F32, zero);
        let (start, end) = (b.u32(0), b.u32(4));
        b.for_("k", start, end, |b, k| {
            let skip = b.bin(BinOp::Eq, k, row);
            b.continue_if(skip);
            let x = b.operand(0, k);
            b.add_assign(acc, x);
        });
        let a = b.get(acc);
        b.ret_(a);
        let err = unroll(&b.finish(), &ROWS, &three_rows()).unwrap_err();
        assert_eq!(err, UnrollError::VaryingExit);
    }

    #[test]
    fn copies_past_their_axis_are_refused() {
        let mut b = Builder::new(Ty::F32, vec![Ty::F32]);
        let i = b.index();
        let x = b.operand(0, i);
        b.ret_(x);
        let copies: Vec<Vec<usize>> = (0..4).map(|k| vec![k]).collect();
        let err = unroll(&b.finish(), &ROWS, &copies).unwrap_err();
        assert_eq!(
            err,
            UnrollError::Offset {
                axis: 0,
                offset: 3,
                extent: 3
            }
        );
    }

    /// A per-copy condition is written once per copy, a shared read once for all, and the
    /// copies that differ only in the held coordinate share the loop.
    #[test]
    fn per_copy_conditions_and_shared_reads() {
        let mut b = Builder::new(Ty::F32, vec![Ty::F32, Ty::F32]);
        let [a, row, col] = coords(&mut b)[..] else {
            unreachable!()
        };
        let zero = b.f32(0.0);
        let acc = b.var("acc", Ty::F32, zero);
        let (start, end) = (b.u32(0), b.u32(5));
        b.for_("k", start, end, |b, k| {
            // Shared: reads at (a, k, c) only.
            let at = b.add(a, k);
            let at = b.add(at, col);
            let w = b.operand(1, at);
            // Per row: row * 5 + k.
            let five = b.u32(5);
            let r = b.mul(row, five);
            let r = b.add(r, k);
            let x = b.operand(0, r);
            let t = b.mul(x, w);
            b.add_assign(acc, t);
        });
        let one = b.u32(1);
        let odd = b.bin(BinOp::Eq, row, one);
        b.if_(odd, |b| {
            let half = b.f32(0.5);
            let got = b.get(acc);
            let v = b.mul(got, half);
            b.assign(acc, v);
        });
        let result = b.get(acc);
        b.ret_(result);
        let f = b.finish();
        let u = unroll(&f, &ROWS, &three_rows()).unwrap();
        validate(&u).unwrap();
        let reads: Vec<usize> = (0..2)
            .map(|n| {
                u.exprs
                    .iter()
                    .filter(|e| matches!(e, ExprKind::Operand { k, .. } if *k == n))
                    .count()
            })
            .collect();
        assert_eq!(reads, [3, 1]);
        let ifs = u
            .body
            .iter()
            .filter(|s| matches!(s, Stmt::If { .. }))
            .count();
        assert_eq!(ifs, 3);
        for first in [0u32, 1, 2, 3, 12, 15] {
            let Some(Lanes::Array(got)) = eval(&u, first, &mut Ramp).unwrap() else {
                panic!("an array")
            };
            for k in 0..3 {
                let want = eval(&f, first + 4 * k as u32, &mut Ramp).unwrap().unwrap();
                assert_eq!(got[k], want, "element {first} row {k}");
            }
        }
    }

    /// Lanes along the middle axis of `[2, 4, 4]`: `x` at the element itself varies with
    /// the lanes (4 apart), `w` at the first coordinate does not; a condition on the lanes'
    /// coordinate has no lanes.
    #[test]
    fn lane_reads_say_which_operands_vary_along_the_lanes() {
        let axis = HeldAxis {
            stride: 4,
            extent: 4,
        };
        let build = |branch: bool| {
            let mut b = Builder::new(Ty::F32, vec![Ty::F32, Ty::F32]);
            let i = b.index();
            let [a, row, _] = b.decode(i, &["a", "b", "c"], &[2, 4, 4])[..] else {
                unreachable!()
            };
            let x = b.operand(0, i);
            let w = b.operand(1, a);
            let v = b.mul(x, w);
            let acc = b.var("acc", Ty::F32, v);
            if branch {
                let one = b.u32(1);
                let odd = b.bin(BinOp::Eq, row, one);
                b.if_(odd, |b| {
                    let zero = b.f32(0.0);
                    b.assign(acc, zero);
                });
            }
            let r = b.get(acc);
            b.ret_(r);
            b.finish()
        };
        assert_eq!(
            lane_reads(&build(false), axis, 1),
            Some(vec![Some(4), None])
        );
        assert_eq!(lane_reads(&build(true), axis, 1), None);
        // Lanes a whole axis apart would leave it.
        assert_eq!(lane_reads(&build(false), axis, 2), None);
    }
}
