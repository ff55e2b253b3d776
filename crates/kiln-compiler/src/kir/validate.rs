//! Checks a [`Function`] from scratch: every expression's type follows from its operands
//! (WGSL's rules: arithmetic on equal types, or an `f32` scalar with `vec4<f32>` lanes), each
//! local is read only inside the scope that declares it and after its declaration, `var`s
//! are the only locals assigned, loop counters are `u32`, conditions are `bool`, `continue`
//! is inside a loop, and every path returns a value of the function's type.

use super::{
    BinOp, Block, Expr, ExprKind, Function, Global, Literal, Local, MathFn, Scalar, Space, Stmt,
    Ty, UnOp,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kernel IR: {0}")]
pub struct ValidationError(pub String);

fn fail<T>(message: String) -> Result<T, ValidationError> {
    Err(ValidationError(message))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Let,
    Var,
    Counter,
}

struct Checker<'a> {
    f: &'a Function,
    /// Locals in scope, innermost last, with how they were declared.
    scope: Vec<(Local, Kind)>,
    declared: Vec<bool>,
    /// Open loops, innermost last: whether each is unrolled.
    loops: Vec<bool>,
    types: Vec<Option<Ty>>,
    /// Where each open scope's locals start in `scope` (WGSL forbids a name twice in one
    /// scope, allows shadowing in an inner one).
    starts: Vec<usize>,
}

/// What validation learned of a function, for the printers: each reachable expression's type.
#[derive(Clone, Debug, PartialEq)]
pub struct FunctionInfo {
    pub types: Vec<Option<Ty>>,
}

/// Validates `f`; the error names the first violation.
pub fn validate(f: &Function) -> Result<FunctionInfo, ValidationError> {
    let mut c = Checker {
        f,
        scope: Vec::new(),
        declared: vec![false; f.locals.len()],
        loops: Vec::new(),
        types: vec![None; f.exprs.len()],
        starts: Vec::new(),
    };
    for (k, (name, _)) in f.params.iter().enumerate() {
        if name == "i" || f.params[..k].iter().any(|(n, _)| n == name) {
            return fail(format!("parameter `{name}` is declared twice"));
        }
        if f.locals.iter().any(|l| l.name == *name) {
            return fail(format!("local `{name}` shadows a parameter"));
        }
    }
    if !c.block(&f.body)? && f.ret.is_some() {
        return fail("the function can end without returning a value".into());
    }
    Ok(FunctionInfo { types: c.types })
}

impl<'a> Checker<'a> {
    fn global(&self, k: usize) -> Result<&'a Global, ValidationError> {
        match self.f.globals.get(k) {
            Some(g) => Ok(g),
            None => fail(format!("global {k} is not declared")),
        }
    }

    /// Checks that `l` is an array `var` in scope.
    fn array(&self, l: Local) -> Result<(), ValidationError> {
        if self.kind(l) != Some(Kind::Var) || self.f.locals[l.index()].array.is_none() {
            return fail(format!("`{}` is not an array var in scope", self.name(l)));
        }
        Ok(())
    }

    fn kind(&self, l: Local) -> Option<Kind> {
        self.scope
            .iter()
            .rev()
            .find(|(s, _)| *s == l)
            .map(|&(_, k)| k)
    }

    fn name(&self, l: Local) -> &str {
        self.f
            .locals
            .get(l.index())
            .map_or("?", |d| d.name.as_str())
    }

    fn declare(&mut self, l: Local, kind: Kind, ty: Ty) -> Result<(), ValidationError> {
        let Some(decl) = self.f.locals.get(l.index()) else {
            return fail(format!("local {} is not declared", l.index()));
        };
        if std::mem::replace(&mut self.declared[l.index()], true) {
            return fail(format!("local `{}` is declared twice", decl.name));
        }
        let start = self.starts.last().copied().unwrap_or(0);
        if self.scope[start..]
            .iter()
            .any(|(s, _)| self.f.locals[s.index()].name == decl.name)
        {
            return fail(format!("`{}` is declared twice in one scope", decl.name));
        }
        if decl.ty != ty {
            return fail(format!(
                "local `{}` is {:?} but its value is {ty:?}",
                decl.name, decl.ty
            ));
        }
        self.scope.push((l, kind));
        Ok(())
    }

    /// Checks the statements; true when every path through them returns.
    fn block(&mut self, block: &Block) -> Result<bool, ValidationError> {
        let depth = self.scope.len();
        self.starts.push(depth);
        let mut returns = false;
        for s in block {
            if returns {
                return fail("a statement follows a return".into());
            }
            returns = self.stmt(s)?;
        }
        self.starts.pop();
        self.scope.truncate(depth);
        Ok(returns)
    }

    fn stmt(&mut self, s: &Stmt) -> Result<bool, ValidationError> {
        match s {
            Stmt::Let { local, value } => {
                let ty = self.ty(*value)?;
                self.declare(*local, Kind::Let, ty)?;
            }
            Stmt::Var { local, value } => {
                let ty = self.ty(*value)?;
                self.declare(*local, Kind::Var, ty)?;
            }
            Stmt::Assign { local, op, value } => {
                if self.kind(*local) != Some(Kind::Var) {
                    return fail(format!(
                        "`{}` is assigned but is not a var in scope",
                        self.name(*local)
                    ));
                }
                let target = self.f.locals[local.index()].ty;
                let ty = match op {
                    None => self.ty(*value)?,
                    Some(op) => {
                        let v = self.ty(*value)?;
                        self.binary_ty(*op, target, v)?
                    }
                };
                if ty != target {
                    return fail(format!(
                        "`{}` of type {target:?} is assigned a {ty:?}",
                        self.name(*local)
                    ));
                }
            }
            Stmt::For {
                counter,
                start,
                end,
                body,
                unroll,
            } => {
                for bound in [start, end] {
                    if self.ty(*bound)? != Ty::U32 {
                        return fail(format!(
                            "loop `{}` has a bound that is not u32",
                            self.name(*counter)
                        ));
                    }
                }
                if *unroll {
                    for bound in [start, end] {
                        if !matches!(self.f.expr(*bound), ExprKind::Literal(Literal::U32(_))) {
                            return fail(format!(
                                "unrolled loop `{}` has a bound that is not a literal",
                                self.name(*counter)
                            ));
                        }
                    }
                }
                let depth = self.scope.len();
                self.starts.push(depth);
                self.declare(*counter, Kind::Counter, Ty::U32)?;
                self.loops.push(*unroll);
                self.block(body)?;
                self.loops.pop();
                self.starts.pop();
                self.scope.truncate(depth);
            }
            Stmt::If {
                cond,
                accept,
                reject,
            } => {
                if self.ty(*cond)? != Ty::BOOL {
                    return fail("an if's condition is not a bool".into());
                }
                let a = self.block(accept)?;
                let r = self.block(reject)?;
                return Ok(a && r);
            }
            Stmt::Continue => {
                match self.loops.last() {
                    None => return fail("continue outside a loop".into()),
                    // The printer writes an unrolled iteration as a plain block.
                    Some(true) => return fail("continue in an unrolled loop".into()),
                    Some(false) => {}
                }
                // Control does not fall through past it: treat as ending this path.
                return Ok(true);
            }
            Stmt::Return(value) => {
                let ty = value.map(|v| self.ty(v)).transpose()?;
                if ty != self.f.ret {
                    return fail(format!("returns {ty:?}, the function {:?}", self.f.ret));
                }
                return Ok(true);
            }
            Stmt::Loop {
                counter,
                start,
                cond,
                step,
                body,
                ..
            } => {
                if self.ty(*start)? != Ty::U32 || {
                    let depth = self.scope.len();
                    self.starts.push(depth);
                    self.declare(*counter, Kind::Counter, Ty::U32)?;
                    let bad = self.ty(*cond)? != Ty::BOOL || self.ty(*step)? != Ty::U32;
                    self.loops.push(false);
                    self.block(body)?;
                    self.loops.pop();
                    self.starts.pop();
                    self.scope.truncate(depth);
                    bad
                } {
                    return fail(format!(
                        "loop `{}` needs a u32 start and step and a bool condition",
                        self.name(*counter)
                    ));
                }
            }
            Stmt::VarArray { local } => {
                let Some(decl) = self.f.locals.get(local.index()) else {
                    return fail(format!("local {} is not declared", local.index()));
                };
                if decl.array.is_none() {
                    return fail(format!(
                        "`{}` is declared an array but has no length",
                        decl.name
                    ));
                }
                let ty = decl.ty;
                self.declare(*local, Kind::Var, ty)?;
            }
            Stmt::Update {
                local,
                index,
                lane,
                op,
                value,
            } => {
                if self.kind(*local) != Some(Kind::Var)
                    || self.f.locals[local.index()].array.is_some()
                {
                    return fail(format!(
                        "`{}` is updated but is not a var in scope",
                        self.name(*local)
                    ));
                }
                let mut target = self.f.locals[local.index()].ty;
                if let Some(index) = index {
                    if !target.is_array() || self.ty(*index)? != Ty::U32 {
                        return fail(format!("`{}` is not an array", self.name(*local)));
                    }
                    target = target.element().expect("arrays have elements");
                }
                if let Some(lane) = lane {
                    if !matches!(target, Ty::Vec4(_)) || *lane > 3 {
                        return fail(format!("lane {lane} of a {target:?}"));
                    }
                    target = target.element().expect("vec4s have lanes");
                }
                let v = self.ty(*value)?;
                let ty = match op {
                    None => v,
                    Some(op) => self.binary_ty(*op, target, v)?,
                };
                if ty != target {
                    return fail(format!(
                        "part {target:?} of `{}` is assigned a {ty:?}",
                        self.name(*local)
                    ));
                }
            }
            Stmt::Block(body) => {
                if self.block(body)? {
                    return Ok(true);
                }
            }
            Stmt::AssignElement {
                local,
                index,
                value,
            } => {
                self.array(*local)?;
                if self.ty(*index)? != Ty::U32 {
                    return fail(format!("`{}` is indexed by a non-u32", self.name(*local)));
                }
                let ty = self.ty(*value)?;
                if ty != self.f.locals[local.index()].ty {
                    return fail(format!("`{}` is assigned a {ty:?}", self.name(*local)));
                }
            }
            Stmt::Barrier => {
                if self.f.ret.is_some() {
                    return fail("a barrier outside an entry point".into());
                }
            }
            Stmt::Comment(_) => {}
            Stmt::Store {
                global,
                index,
                value,
            } => {
                let g = self.global(*global)?;
                if !matches!(
                    g.space,
                    Space::Storage { read_only: false } | Space::Workgroup
                ) {
                    return fail(format!(
                        "`{}` is stored to but is not read_write storage",
                        g.name
                    ));
                }
                if self.ty(*index)? != Ty::U32 {
                    return fail(format!(
                        "`{}` is stored at an index that is not u32",
                        g.name
                    ));
                }
                let ty = self.ty(*value)?;
                if ty != g.elem {
                    return fail(format!(
                        "`{}` holds {:?} but is stored a {ty:?}",
                        g.name, g.elem
                    ));
                }
            }
        }
        Ok(false)
    }

    fn binary_ty(&self, op: BinOp, l: Ty, r: Ty) -> Result<Ty, ValidationError> {
        use Scalar::*;
        let bad = || fail(format!("{op:?} of {l:?} and {r:?}"));
        if l.is_array() || r.is_array() {
            return bad();
        }
        match op {
            BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Rem => {
                if l.scalar() == Bool || l.scalar() != r.scalar() {
                    return bad();
                }
                match (l, r) {
                    _ if l == r => Ok(l),
                    (Ty::Vec4(_), Ty::Scalar(_)) | (Ty::Scalar(_), Ty::Vec4(_)) => {
                        Ok(Ty::Vec4(l.scalar()))
                    }
                    _ => bad(),
                }
            }
            _ if op.is_comparison() => {
                if l != r || l.scalar() == Bool && !matches!(op, BinOp::Eq | BinOp::Ne) {
                    return bad();
                }
                Ok(l.with_scalar(Bool))
            }
            BinOp::And | BinOp::Or => {
                if l != Ty::BOOL || r != Ty::BOOL {
                    return bad();
                }
                Ok(Ty::BOOL)
            }
            BinOp::BitAnd => {
                if l != r || l.scalar() == F32 {
                    return bad();
                }
                Ok(l)
            }
            BinOp::ShiftRight => {
                if !matches!(l.scalar(), U32 | I32) || r.scalar() != U32 || l.with_scalar(U32) != r
                {
                    return bad();
                }
                Ok(l)
            }
            _ => unreachable!("every operator is matched"),
        }
    }

    fn ty(&mut self, e: Expr) -> Result<Ty, ValidationError> {
        let ty = self.ty_of(e)?;
        self.types[e.index()] = Some(ty);
        Ok(ty)
    }

    fn ty_of(&mut self, e: Expr) -> Result<Ty, ValidationError> {
        let f = self.f;
        let Some(kind) = f.exprs.get(e.index()) else {
            return fail(format!("expression {} is not in the arena", e.index()));
        };
        match kind {
            ExprKind::Literal(l) => Ok(l.ty()),
            ExprKind::Index if f.ret.is_some() => Ok(Ty::U32),
            ExprKind::Index => fail("an entry point has no element index".into()),
            ExprKind::GlobalId(axis) if f.ret.is_none() && *axis < 2 => Ok(Ty::U32),
            ExprKind::LocalIndex if f.ret.is_none() => Ok(Ty::U32),
            ExprKind::LocalIndex => {
                fail("the workgroup index is read outside an entry point".into())
            }
            ExprKind::Element { local, index } => {
                self.array(*local)?;
                if self.ty(*index)? != Ty::U32 {
                    return fail(format!("`{}` is indexed by a non-u32", self.name(*local)));
                }
                Ok(f.locals[local.index()].ty)
            }
            ExprKind::GlobalId(_) => {
                fail("the invocation id is read outside an entry point".into())
            }
            ExprKind::Load { global, index } => {
                let g = self.global(*global)?;
                if self.ty(*index)? != Ty::U32 {
                    return fail(format!("`{}` is read at an index that is not u32", g.name));
                }
                Ok(g.elem)
            }
            ExprKind::Lane { vector, lane } => {
                let v = self.ty(*vector)?;
                if self.ty(*lane)? != Ty::U32 {
                    return fail("a lane index that is not u32".into());
                }
                match v.element() {
                    Some(t) => Ok(t),
                    None => fail(format!("a lane of {v:?}")),
                }
            }
            ExprKind::Call { k, args } => {
                let Some(&ty) = f.operands.get(*k) else {
                    return fail(format!("operand {k} does not exist"));
                };
                let Some((&index, extra)) = args.split_first() else {
                    return fail(format!("operand {k} is called without an index"));
                };
                if self.ty(index)? != Ty::U32 {
                    return fail(format!("operand {k} is called at an index that is not u32"));
                }
                // The callee's extra parameters are its own (naga checks the module's calls).
                for &a in extra {
                    self.ty(a)?;
                }
                Ok(ty)
            }
            ExprKind::Param(k) => match f.params.get(*k) {
                Some(&(_, ty)) if f.ret.is_some() => Ok(ty),
                _ => fail(format!("parameter {k} does not exist")),
            },
            ExprKind::Array(elements) => {
                let Some(&first) = elements.first() else {
                    return fail("an empty array".into());
                };
                let t = self.ty(first)?;
                for &e in &elements[1..] {
                    if self.ty(e)? != t {
                        return fail("an array of elements of different types".into());
                    }
                }
                match Ty::array(t, elements.len() as u32) {
                    Some(a) => Ok(a),
                    None => fail("an array of arrays of arrays".into()),
                }
            }
            ExprKind::Local(l) => {
                if self.kind(*l).is_none() {
                    return fail(format!("`{}` is read outside its scope", self.name(*l)));
                }
                if f.locals[l.index()].array.is_some() {
                    return fail(format!("array `{}` is read whole", self.name(*l)));
                }
                Ok(f.locals[l.index()].ty)
            }
            ExprKind::Operand { k, index } => {
                let Some(&ty) = f.operands.get(*k) else {
                    return fail(format!("operand {k} does not exist"));
                };
                if self.ty(*index)? != Ty::U32 {
                    return fail(format!("operand {k} is read at an index that is not u32"));
                }
                Ok(ty)
            }
            ExprKind::Binary { op, left, right } => {
                let (l, r) = (self.ty(*left)?, self.ty(*right)?);
                self.binary_ty(*op, l, r)
            }
            ExprKind::Unary { op, operand } => {
                let t = self.ty(*operand)?;
                match (op, t.scalar()) {
                    _ if t.is_array() => fail(format!("{op:?} of an array")),
                    (UnOp::Neg, Scalar::F32 | Scalar::I32) | (UnOp::Not, Scalar::Bool) => Ok(t),
                    _ => fail(format!("{op:?} of {t:?}")),
                }
            }
            ExprKind::Math { fun, args } => {
                if args.len() != fun.arity() {
                    return fail(format!("{fun:?} takes {} arguments", fun.arity()));
                }
                let t = self.ty(args[0])?;
                if t.is_array() {
                    return fail(format!("{fun:?} of an array"));
                }
                for &a in args.iter().skip(1) {
                    if self.ty(a)? != t {
                        return fail(format!("{fun:?} of different types"));
                    }
                }
                let float_only = !matches!(fun, MathFn::Max | MathFn::Min | MathFn::Clamp);
                if t.scalar() == Scalar::Bool || float_only && t.scalar() != Scalar::F32 {
                    return fail(format!("{fun:?} of {t:?}"));
                }
                match fun {
                    MathFn::Dot if t != Ty::VEC4_F32 => fail(format!("dot of {t:?}")),
                    MathFn::Dot => Ok(Ty::F32),
                    _ => Ok(t),
                }
            }
            ExprKind::Select {
                cond,
                accept,
                reject,
            } => {
                let a = self.ty(*accept)?;
                let r = self.ty(*reject)?;
                let c = self.ty(*cond)?;
                if a != r || a.is_array() || (c != Ty::BOOL && c != a.with_scalar(Scalar::Bool)) {
                    return fail(format!("select of {a:?} and {r:?} on {c:?}"));
                }
                Ok(a)
            }
            ExprKind::Cast { to, value } => match self.ty(*value)? {
                t if t.is_array() => fail("a cast of an array".into()),
                t => Ok(t.with_scalar(*to)),
            },
            ExprKind::Splat(x) => match self.ty(*x)? {
                Ty::Scalar(s) => Ok(Ty::Vec4(s)),
                t => fail(format!("splat of {t:?}")),
            },
            ExprKind::Compose(lanes) => {
                let t = self.ty(lanes[0])?;
                for &l in &lanes[1..] {
                    if self.ty(l)? != t {
                        return fail("a vec4 of lanes of different types".into());
                    }
                }
                match t {
                    Ty::Scalar(s) => Ok(Ty::Vec4(s)),
                    t => fail(format!("a vec4 of {t:?} lanes")),
                }
            }
            ExprKind::Chunk(_) | ExprKind::WindowBase(_) => Ok(Ty::U32),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Builder, Ty};
    use super::*;

    #[test]
    fn a_well_formed_reduction_validates() {
        let mut b = Builder::new(Ty::F32, vec![Ty::F32]);
        let zero = b.f32(0.0);
        let acc = b.var("acc", Ty::F32, zero);
        let (lo, hi) = (b.u32(0), b.u32(8));
        b.for_("k", lo, hi, |b, k| {
            let x = b.operand(0, k);
            b.add_assign(acc, x);
        });
        let a = b.get(acc);
        b.ret_(a);
        validate(&b.finish()).unwrap();
    }

    #[test]
    fn a_counter_read_after_its_loop_is_refused() {
        let mut b = Builder::new(Ty::U32, vec![]);
        let (lo, hi) = (b.u32(0), b.u32(8));
        let mut counter = None;
        b.for_("k", lo, hi, |_, k| counter = Some(k));
        b.ret_(counter.unwrap());
        let e = validate(&b.finish()).unwrap_err();
        assert!(e.0.contains("`k` is read outside its scope"), "{e}");
    }

    #[test]
    fn mixed_types_and_missing_returns_are_refused() {
        let mut b = Builder::new(Ty::F32, vec![]);
        let (x, n) = (b.f32(1.0), b.u32(2));
        let bad = b.add(x, n);
        b.ret_(bad);
        assert!(validate(&b.finish()).unwrap_err().0.contains("Add of"));

        let mut b = Builder::new(Ty::F32, vec![]);
        let c = b.lit(Literal::Bool(true));
        let one = b.f32(1.0);
        b.if_(c, |b| b.ret_(one));
        let e = validate(&b.finish()).unwrap_err();
        assert!(e.0.contains("without returning"), "{e}");
    }

    #[test]
    fn only_vars_are_assigned() {
        let mut b = Builder::new(Ty::F32, vec![]);
        let one = b.f32(1.0);
        let x = b.let_("x", Ty::F32, one);
        let ExprKind::Local(l) = *b.f.expr(x) else {
            unreachable!()
        };
        b.assign(l, one);
        b.ret_(x);
        assert!(validate(&b.finish()).unwrap_err().0.contains("not a var"));
    }

    #[test]
    fn lanes_mix_with_scalars_only_in_arithmetic() {
        let mut b = Builder::new(Ty::VEC4_F32, vec![Ty::VEC4_F32]);
        let i = b.index();
        let x = b.operand(0, i);
        let one = b.f32(1.0);
        let y = b.sub(one, x);
        let zero = b.f32(0.0);
        let z = b.splat(zero);
        let neg = b.bin(BinOp::Lt, y, z);
        let r = b.select(neg, z, y);
        b.ret_(r);
        validate(&b.finish()).unwrap();

        let mut b = Builder::new(Ty::VEC4_F32, vec![Ty::VEC4_F32]);
        let i = b.index();
        let x = b.operand(0, i);
        let zero = b.f32(0.0);
        let c = b.bin(BinOp::Lt, x, zero);
        let r = b.select(c, x, x);
        b.ret_(r);
        assert!(validate(&b.finish()).unwrap_err().0.contains("Lt of"));
    }
}
