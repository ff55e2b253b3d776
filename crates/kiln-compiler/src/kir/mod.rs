//! The kernel IR: what a kernel computes, as data, between the plan and the text of a back end.
//!
//! A [`Function`] is one element function of a kernel: given the flat index `i` of an element
//! it returns that element (an `f32`, or four lanes of a `vec4<f32>`). Its expressions live in
//! an arena and refer to each other by [`Expr`] handles (naga's layout: a DAG of expressions,
//! a tree of statements pointing into it), so nothing is text until a printer walks it.
//! Operands are [`ExprKind::Operand`] reads: element functions of other values, which the
//! caller names when printing — inlining a producer is calling its function, and a schedule
//! may hand the same definition lane functions instead of scalar ones.
//!
//! [`validate`] checks a function from scratch (types, scopes, loop bounds, that every path
//! returns), [`wgsl::body`] prints it, [`interp::eval`] runs it on the CPU against plain
//! closures, which is how each op's definition (`compute.rs`) is tested against the reference
//! executor without a device.

pub mod interp;
pub mod module;
pub mod parts;
pub mod slide;
pub mod unroll;
mod validate;
pub mod wgsl;
pub mod widen;

pub use validate::{FunctionInfo, ValidationError, validate};

/// A scalar type of the kernel IR (WGSL's): u8 values are loaded widened to `u32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scalar {
    F32,
    U32,
    I32,
    Bool,
}

/// The type of a value: a scalar, four lanes of one (`vec4<T>`), or a fixed-size array of
/// either (`array<T, len>`: a schedule's several accumulators returned at once), or of such
/// arrays (`outer`: `array<array<T, len>, outer>`, accumulators per window tap).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ty {
    Scalar(Scalar),
    Vec4(Scalar),
    Array {
        scalar: Scalar,
        vec4: bool,
        len: u32,
        outer: Option<u32>,
    },
}

impl Ty {
    pub const F32: Ty = Ty::Scalar(Scalar::F32);
    pub const U32: Ty = Ty::Scalar(Scalar::U32);
    pub const I32: Ty = Ty::Scalar(Scalar::I32);
    pub const BOOL: Ty = Ty::Scalar(Scalar::Bool);
    pub const VEC4_F32: Ty = Ty::Vec4(Scalar::F32);

    pub fn scalar(self) -> Scalar {
        match self {
            Ty::Scalar(s) | Ty::Vec4(s) | Ty::Array { scalar: s, .. } => s,
        }
    }

    /// The same type with `s` as its scalar (a comparison of `vec4<f32>`s is a `vec4<bool>`).
    pub fn with_scalar(self, s: Scalar) -> Ty {
        match self {
            Ty::Scalar(_) => Ty::Scalar(s),
            Ty::Vec4(_) => Ty::Vec4(s),
            Ty::Array {
                vec4, len, outer, ..
            } => Ty::Array {
                scalar: s,
                vec4,
                len,
                outer,
            },
        }
    }

    /// `array<elem, len>`; `None` for arrays three deep.
    pub fn array(elem: Ty, len: u32) -> Option<Ty> {
        match elem {
            Ty::Scalar(scalar) | Ty::Vec4(scalar) => Some(Ty::Array {
                scalar,
                vec4: matches!(elem, Ty::Vec4(_)),
                len,
                outer: None,
            }),
            Ty::Array {
                scalar,
                vec4,
                len: inner,
                outer: None,
            } => Some(Ty::Array {
                scalar,
                vec4,
                len: inner,
                outer: Some(len),
            }),
            Ty::Array { .. } => None,
        }
    }

    /// The type of one element of an array or one lane of a `vec4`.
    pub fn element(self) -> Option<Ty> {
        match self {
            Ty::Scalar(_) => None,
            Ty::Vec4(s) => Some(Ty::Scalar(s)),
            Ty::Array {
                outer: Some(_),
                scalar,
                vec4,
                len,
            } => Some(Ty::Array {
                scalar,
                vec4,
                len,
                outer: None,
            }),
            Ty::Array { scalar, vec4, .. } => Some(if vec4 {
                Ty::Vec4(scalar)
            } else {
                Ty::Scalar(scalar)
            }),
        }
    }

    pub fn is_array(self) -> bool {
        matches!(self, Ty::Array { .. })
    }
}

/// A literal. `F32` keeps its bits, so that a printed literal round-trips exactly (and two
/// literals are equal when their bits are).
#[derive(Clone, Copy, Debug)]
pub enum Literal {
    F32(f32),
    U32(u32),
    I32(i32),
    Bool(bool),
}

impl PartialEq for Literal {
    fn eq(&self, other: &Literal) -> bool {
        match (self, other) {
            (Literal::F32(a), Literal::F32(b)) => a.to_bits() == b.to_bits(),
            (Literal::U32(a), Literal::U32(b)) => a == b,
            (Literal::I32(a), Literal::I32(b)) => a == b,
            (Literal::Bool(a), Literal::Bool(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Literal {}

impl Literal {
    pub fn ty(self) -> Ty {
        match self {
            Literal::F32(_) => Ty::F32,
            Literal::U32(_) => Ty::U32,
            Literal::I32(_) => Ty::I32,
            Literal::Bool(_) => Ty::BOOL,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    /// Short-circuit `&&` / `||` (scalar bools).
    And,
    Or,
    /// Non-short-circuit `&` (also per lane of `vec4<bool>`s).
    BitAnd,
    ShiftRight,
}

impl BinOp {
    pub fn is_comparison(self) -> bool {
        matches!(
            self,
            BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge | BinOp::Eq | BinOp::Ne
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnOp {
    Neg,
    Not,
}

/// Built-in functions, with WGSL's meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MathFn {
    Exp,
    Log,
    Sqrt,
    Tanh,
    Max,
    Min,
    /// `clamp(x, low, high)`: `min(max(x, low), high)`.
    Clamp,
    /// `dot(a, b)` of two `vec4<f32>`s: the sum of their lanes' products.
    Dot,
}

impl MathFn {
    pub fn arity(self) -> usize {
        match self {
            MathFn::Max | MathFn::Min | MathFn::Dot => 2,
            MathFn::Clamp => 3,
            _ => 1,
        }
    }
}

/// A bound of the kernel's current chunk (CPU-class image chunks): of the invocations it
/// runs and of the images it covers (the chunk table's `x`, `y`, `z` and `w`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChunkBound {
    FirstInvocation,
    EndInvocation,
    FirstImage,
    EndImage,
}

/// Handle of an expression in its function's arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Expr(u32);

/// Handle of a local (a `let`, a `var` or a loop counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Local(u32);

impl Expr {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl Local {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExprKind {
    Literal(Literal),
    /// The function's parameter: the flat index of the element asked for.
    Index,
    Local(Local),
    /// Element `index` of operand `k` (an element function the caller names when printing).
    Operand {
        k: usize,
        index: Expr,
    },
    /// Operand `k` called with `args`: the element's index, then the values its extra
    /// parameters take (a rows epilogue is handed its row of the reduction).
    Call {
        k: usize,
        args: Vec<Expr>,
    },
    /// The function's extra parameter `k` ([`Function::params`]).
    Param(usize),
    /// `array<T, N>(elements)`.
    Array(Vec<Expr>),
    Binary {
        op: BinOp,
        left: Expr,
        right: Expr,
    },
    Unary {
        op: UnOp,
        operand: Expr,
    },
    Math {
        fun: MathFn,
        args: Vec<Expr>,
    },
    /// `cond ? accept : reject` without a branch (WGSL's `select(reject, accept, cond)`).
    Select {
        cond: Expr,
        accept: Expr,
        reject: Expr,
    },
    /// Conversion to `to` (lane by lane for vectors).
    Cast {
        to: Scalar,
        value: Expr,
    },
    /// A scalar broadcast to four lanes.
    Splat(Expr),
    /// Four scalars of one type as the lanes of a `vec4`.
    Compose([Expr; 4]),
    Chunk(ChunkBound),
    /// The flat index of the first element of window `w` over the current chunk's images
    /// (CPU-class image chunks: the chunk's window bases), which a window's reads subtract.
    WindowBase(usize),
    /// Element `index` of global `global` (one of the function's [`Function::globals`]): a
    /// scalar or, for an array of `vec4`s, four lanes.
    Load {
        global: usize,
        index: Expr,
    },
    /// Lane `lane` (0 to 3) of a `vec4`, or element `lane` of an array value.
    Lane {
        vector: Expr,
        lane: Expr,
    },
    /// A coordinate (0: x, 1: y) of the entry point's global invocation id.
    GlobalId(u8),
    /// The entry point's index in its workgroup (`local_invocation_index`).
    LocalIndex,
    /// `local[index]` of an array.
    Element {
        local: Local,
        index: Expr,
    },
}

/// Where a global lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Space {
    Storage {
        read_only: bool,
    },
    Uniform,
    /// Shared by a workgroup's invocations.
    Workgroup,
}

/// A buffer binding a function reads or writes, by the name the module declares it under:
/// an array of `elem` (`len` elements, where the binding's declaration fixes it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Global {
    pub name: String,
    pub space: Space,
    pub elem: Ty,
}

/// A local variable's declaration: its printed name and type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalDecl {
    pub name: String,
    pub ty: Ty,
    /// A `var` array of this many `ty` elements (read and written element by element).
    pub array: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stmt {
    /// `let local = value;` — immutable.
    Let {
        local: Local,
        value: Expr,
    },
    /// `var local = value;`
    Var {
        local: Local,
        value: Expr,
    },
    /// `local = value;` or, with `op`, `local op= value;`.
    Assign {
        local: Local,
        op: Option<BinOp>,
        value: Expr,
    },
    /// `for (var counter = start; counter < end; counter++) body`, `u32` counters. `unroll`
    /// asks the printer to write each iteration out (bounds must then be literals).
    For {
        counter: Local,
        start: Expr,
        end: Expr,
        body: Block,
        unroll: bool,
    },
    If {
        cond: Expr,
        accept: Block,
        reject: Block,
    },
    Continue,
    /// `return value;`, or `return;` in a function without a result (an entry point).
    Return(Option<Expr>),
    /// `global[index] = value;`
    Store {
        global: usize,
        index: Expr,
        value: Expr,
    },
    /// `for (var counter = start; cond; counter += step)` (or `counter = counter / step`
    /// with `halve`): the loops a `For` cannot say, such as a workgroup striding over rows or
    /// halving its reduction's stride.
    Loop {
        counter: Local,
        start: Expr,
        cond: Expr,
        step: Expr,
        halve: bool,
        body: Block,
    },
    /// `var local: array<T, N>;` (zeroed).
    VarArray {
        local: Local,
    },
    /// `local[index].lane op= value;`: part of a `var` — an element of an array value, a lane
    /// of a `vec4`, or a lane of an element (`index` and `lane` each optional).
    Update {
        local: Local,
        index: Option<Expr>,
        lane: Option<u32>,
        op: Option<BinOp>,
        value: Expr,
    },
    /// `{ body }`: a scope of its own.
    Block(Block),
    /// `local[index] = value;` of an array.
    AssignElement {
        local: Local,
        index: Expr,
        value: Expr,
    },
    /// `workgroupBarrier();`
    Barrier,
    /// `// text` — why the next statements are as they are.
    Comment(String),
}

pub type Block = Vec<Stmt>;

/// One element function, `fn name(i: u32) -> ret { body }`, reading operands whose types are
/// `operands` (the printer's caller names them) and the buffers `globals`; or, without a
/// `ret`, an entry point's body (no index: it reads the invocation id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    pub ret: Option<Ty>,
    /// Which of a dispatch's chunks the function's `Chunk` and `WindowBase` expressions read
    /// the table of: 0 its first (`chunk`, `bases`), `s` its span `s` (`chunk_s<s>`,
    /// `bases_s<s>`; several chunks per dispatch, `spans.rs`).
    pub span: u32,
    /// Parameters after the index, by name and type.
    pub params: Vec<(String, Ty)>,
    pub operands: Vec<Ty>,
    pub globals: Vec<Global>,
    pub exprs: Vec<ExprKind>,
    pub locals: Vec<LocalDecl>,
    pub body: Block,
}

impl Function {
    pub fn expr(&self, e: Expr) -> &ExprKind {
        &self.exprs[e.index()]
    }

    pub fn local(&self, l: Local) -> &LocalDecl {
        &self.locals[l.index()]
    }
}

/// A constant part of a value: element `index` of an array, lane `lane` of a `vec4`, or lane
/// `lane` of element `index` (the whole value where both are `None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    pub index: Option<u32>,
    pub lane: Option<u32>,
}

impl Part {
    pub const WHOLE: Part = Part {
        index: None,
        lane: None,
    };
}

/// A loop's condition, made from the read of its counter.
pub type LoopCondition<'a> = &'a dyn Fn(&mut Builder, Expr) -> Expr;

/// Builds a [`Function`]: expressions are appended to the arena as they are made, statements
/// to the innermost open block.
pub struct Builder {
    f: Function,
    blocks: Vec<Block>,
}

impl Builder {
    pub fn new(ret: Ty, operands: Vec<Ty>) -> Builder {
        Builder::with(Some(ret), operands)
    }

    /// An entry point's body: no result, `operands` the element functions it stores.
    pub fn entry(operands: Vec<Ty>) -> Builder {
        Builder::with(None, operands)
    }

    fn with(ret: Option<Ty>, operands: Vec<Ty>) -> Builder {
        Builder {
            f: Function {
                ret,
                span: 0,
                params: Vec::new(),
                operands,
                globals: Vec::new(),
                exprs: Vec::new(),
                locals: Vec::new(),
                body: Vec::new(),
            },
            blocks: vec![Vec::new()],
        }
    }

    pub fn finish(mut self) -> Function {
        assert_eq!(self.blocks.len(), 1, "every nested block is closed");
        self.f.body = self.blocks.pop().expect("the body");
        self.f
    }

    /// Declares that the function uses buffer `global`; returns its handle for loads and
    /// stores.
    pub fn global(&mut self, global: Global) -> usize {
        if let Some(k) = self.f.globals.iter().position(|g| *g == global) {
            return k;
        }
        self.f.globals.push(global);
        self.f.globals.len() - 1
    }

    pub fn load(&mut self, global: usize, index: Expr) -> Expr {
        self.push(ExprKind::Load { global, index })
    }

    pub fn lane(&mut self, vector: Expr, lane: Expr) -> Expr {
        self.push(ExprKind::Lane { vector, lane })
    }

    pub fn global_id(&mut self, axis: u8) -> Expr {
        self.push(ExprKind::GlobalId(axis))
    }

    pub fn store(&mut self, global: usize, index: Expr, value: Expr) {
        self.stmt(Stmt::Store {
            global,
            index,
            value,
        });
    }

    pub fn local_index(&mut self) -> Expr {
        self.push(ExprKind::LocalIndex)
    }

    /// `var name: array<ty, len>;`, zeroed.
    pub fn var_array(&mut self, name: &str, ty: Ty, len: u32) -> Local {
        let local = self.declare(name, ty);
        self.f.locals[local.index()].array = Some(len);
        self.stmt(Stmt::VarArray { local });
        local
    }

    pub fn element(&mut self, local: Local, index: Expr) -> Expr {
        self.push(ExprKind::Element { local, index })
    }

    pub fn assign_element(&mut self, local: Local, index: Expr, value: Expr) {
        self.stmt(Stmt::AssignElement {
            local,
            index,
            value,
        });
    }

    /// The value of `f` — a definition whose body is `let`s and a `return` reading its
    /// operands at its own index only (an elementwise op's) — with operand `k` replaced by
    /// `operands[k]`, its expressions copied into this function: fusing a producer into a
    /// consumer by substitution. `None` for any other body.
    pub fn substitute(&mut self, f: &Function, operands: &[Expr]) -> Option<Expr> {
        let (Stmt::Return(Some(value)), lets) = f.body.split_last()? else {
            return None;
        };
        let mut locals: std::collections::HashMap<Local, Expr> = Default::default();
        let mut copied: Vec<Option<Expr>> = vec![None; f.exprs.len()];
        fn copy(
            b: &mut Builder,
            f: &Function,
            e: Expr,
            operands: &[Expr],
            locals: &std::collections::HashMap<Local, Expr>,
            copied: &mut Vec<Option<Expr>>,
        ) -> Option<Expr> {
            if let Some(done) = copied[e.index()] {
                return Some(done);
            }
            let mut sub = |x: Expr, b: &mut Builder| copy(b, f, x, operands, locals, copied);
            let new = match f.expr(e).clone() {
                ExprKind::Operand { k, index } => {
                    if !matches!(f.expr(index), ExprKind::Index) {
                        return None;
                    }
                    *operands.get(k)?
                }
                ExprKind::Local(l) => *locals.get(&l)?,
                ExprKind::Literal(l) => b.lit(l),
                ExprKind::Binary { op, left, right } => {
                    let (l, r) = (sub(left, b)?, sub(right, b)?);
                    b.bin(op, l, r)
                }
                ExprKind::Unary { op, operand } => {
                    let x = sub(operand, b)?;
                    b.unary(op, x)
                }
                ExprKind::Math { fun, args } => {
                    let mut out = Vec::new();
                    for a in args {
                        out.push(sub(a, b)?);
                    }
                    b.math(fun, &out)
                }
                ExprKind::Select {
                    cond,
                    accept,
                    reject,
                } => {
                    let (c, a, r) = (sub(cond, b)?, sub(accept, b)?, sub(reject, b)?);
                    b.select(c, a, r)
                }
                ExprKind::Cast { to, value } => {
                    let x = sub(value, b)?;
                    b.cast(to, x)
                }
                ExprKind::Splat(x) => {
                    let x = sub(x, b)?;
                    b.splat(x)
                }
                _ => return None,
            };
            copied[e.index()] = Some(new);
            Some(new)
        }
        for s in lets {
            let Stmt::Let { local, value } = s else {
                return None;
            };
            let v = copy(self, f, *value, operands, &locals, &mut copied)?;
            locals.insert(*local, v);
        }
        copy(self, f, *value, operands, &locals, &mut copied)
    }

    /// Declares one more operand of type `ty`; returns its number.
    pub fn declare_operand(&mut self, ty: Ty) -> usize {
        self.f.operands.push(ty);
        self.f.operands.len() - 1
    }

    /// Part `part` of `value` (an element of an array, a lane of a `vec4`, or both).
    pub fn part(&mut self, value: Expr, part: Part) -> Expr {
        let mut at = value;
        if let Some(k) = part.index {
            let k = self.lit(Literal::U32(k));
            at = self.lane(at, k);
        }
        if let Some(l) = part.lane {
            let l = self.lit(Literal::U32(l));
            at = self.lane(at, l);
        }
        at
    }

    /// `local[index].lane op= value;` of a constant part.
    pub fn update_part(&mut self, local: Local, part: Part, op: Option<BinOp>, value: Expr) {
        let index = part.index.map(|k| self.lit(Literal::U32(k)));
        self.update(local, (index, part.lane), op, value);
    }

    /// `local[index].lane op= value;` (see [`Stmt::Update`]).
    pub fn update(
        &mut self,
        local: Local,
        (index, lane): (Option<Expr>, Option<u32>),
        op: Option<BinOp>,
        value: Expr,
    ) {
        self.stmt(Stmt::Update {
            local,
            index,
            lane,
            op,
            value,
        });
    }

    /// `{ body }`.
    pub fn scope(&mut self, body: impl FnOnce(&mut Builder)) {
        let block = self.block(body);
        self.stmt(Stmt::Block(block));
    }

    pub fn barrier(&mut self) {
        self.stmt(Stmt::Barrier);
    }

    pub fn comment(&mut self, text: &str) {
        self.stmt(Stmt::Comment(text.to_string()));
    }

    /// `for (var name = start; cond(counter); name += step)`, or `name = name / step` with
    /// `halve`.
    pub fn loop_(
        &mut self,
        name: &str,
        start: Expr,
        (cond, step, halve): (LoopCondition, Expr, bool),
        body: impl FnOnce(&mut Builder, Expr),
    ) {
        let counter = self.declare(name, Ty::U32);
        let read = self.get(counter);
        let cond = cond(self, read);
        let body = self.block(|b| body(b, read));
        self.stmt(Stmt::Loop {
            counter,
            start,
            cond,
            step,
            halve,
            body,
        });
    }

    /// `return;` from an entry point.
    pub fn return_(&mut self) {
        self.stmt(Stmt::Return(None));
    }

    pub fn operand_ty(&self, k: usize) -> Ty {
        self.f.operands[k]
    }

    fn push(&mut self, e: ExprKind) -> Expr {
        self.f.exprs.push(e);
        Expr(self.f.exprs.len() as u32 - 1)
    }

    fn stmt(&mut self, s: Stmt) {
        self.blocks.last_mut().expect("an open block").push(s);
    }

    fn block(&mut self, fill: impl FnOnce(&mut Builder)) -> Block {
        self.blocks.push(Vec::new());
        fill(self);
        self.blocks.pop().expect("the block just opened")
    }

    fn declare(&mut self, name: &str, ty: Ty) -> Local {
        self.f.locals.push(LocalDecl {
            name: name.to_string(),
            ty,
            array: None,
        });
        Local(self.f.locals.len() as u32 - 1)
    }

    pub fn lit(&mut self, l: Literal) -> Expr {
        self.push(ExprKind::Literal(l))
    }

    pub fn f32(&mut self, x: f32) -> Expr {
        self.lit(Literal::F32(x))
    }

    /// A `u32` literal of a compile-time size (shapes are static; a size past `u32` is a
    /// tensor no device binds, refused before codegen).
    pub fn u32(&mut self, n: usize) -> Expr {
        self.lit(Literal::U32(u32::try_from(n).expect("sizes fit u32")))
    }

    pub fn i32(&mut self, n: usize) -> Expr {
        self.lit(Literal::I32(i32::try_from(n).expect("sizes fit i32")))
    }

    pub fn index(&mut self) -> Expr {
        self.push(ExprKind::Index)
    }

    pub fn get(&mut self, l: Local) -> Expr {
        self.push(ExprKind::Local(l))
    }

    pub fn operand(&mut self, k: usize, index: Expr) -> Expr {
        self.push(ExprKind::Operand { k, index })
    }

    /// Operand `k` called with its index and then the values of its extra parameters.
    pub fn call(&mut self, k: usize, args: Vec<Expr>) -> Expr {
        self.push(ExprKind::Call { k, args })
    }

    /// Declares an extra parameter `name: ty` after the index; returns its read.
    pub fn param(&mut self, name: &str, ty: Ty) -> Expr {
        self.f.params.push((name.to_string(), ty));
        self.push(ExprKind::Param(self.f.params.len() - 1))
    }

    pub fn array(&mut self, elements: Vec<Expr>) -> Expr {
        self.push(ExprKind::Array(elements))
    }

    pub fn bin(&mut self, op: BinOp, left: Expr, right: Expr) -> Expr {
        self.push(ExprKind::Binary { op, left, right })
    }

    pub fn add(&mut self, a: Expr, b: Expr) -> Expr {
        self.bin(BinOp::Add, a, b)
    }

    pub fn sub(&mut self, a: Expr, b: Expr) -> Expr {
        self.bin(BinOp::Sub, a, b)
    }

    pub fn mul(&mut self, a: Expr, b: Expr) -> Expr {
        self.bin(BinOp::Mul, a, b)
    }

    pub fn div(&mut self, a: Expr, b: Expr) -> Expr {
        self.bin(BinOp::Div, a, b)
    }

    pub fn rem(&mut self, a: Expr, b: Expr) -> Expr {
        self.bin(BinOp::Rem, a, b)
    }

    pub fn unary(&mut self, op: UnOp, operand: Expr) -> Expr {
        self.push(ExprKind::Unary { op, operand })
    }

    pub fn math(&mut self, fun: MathFn, args: &[Expr]) -> Expr {
        self.push(ExprKind::Math {
            fun,
            args: args.to_vec(),
        })
    }

    pub fn select(&mut self, cond: Expr, accept: Expr, reject: Expr) -> Expr {
        self.push(ExprKind::Select {
            cond,
            accept,
            reject,
        })
    }

    pub fn cast(&mut self, to: Scalar, value: Expr) -> Expr {
        self.push(ExprKind::Cast { to, value })
    }

    pub fn splat(&mut self, x: Expr) -> Expr {
        self.push(ExprKind::Splat(x))
    }

    pub fn compose(&mut self, lanes: [Expr; 4]) -> Expr {
        self.push(ExprKind::Compose(lanes))
    }

    pub fn chunk(&mut self, bound: ChunkBound) -> Expr {
        self.push(ExprKind::Chunk(bound))
    }

    pub fn window_base(&mut self, w: usize) -> Expr {
        self.push(ExprKind::WindowBase(w))
    }

    /// `let name = value;` of type `ty`; returns the read of it.
    pub fn let_(&mut self, name: &str, ty: Ty, value: Expr) -> Expr {
        let local = self.declare(name, ty);
        self.stmt(Stmt::Let { local, value });
        self.get(local)
    }

    /// `var name = value;`
    pub fn var(&mut self, name: &str, ty: Ty, value: Expr) -> Local {
        let local = self.declare(name, ty);
        self.stmt(Stmt::Var { local, value });
        local
    }

    pub fn assign(&mut self, local: Local, value: Expr) {
        self.stmt(Stmt::Assign {
            local,
            op: None,
            value,
        });
    }

    pub fn add_assign(&mut self, local: Local, value: Expr) {
        self.stmt(Stmt::Assign {
            local,
            op: Some(BinOp::Add),
            value,
        });
    }

    /// `for (var name = start; name < end; name++) { body(counter) }`.
    pub fn for_(
        &mut self,
        name: &str,
        start: Expr,
        end: Expr,
        body: impl FnOnce(&mut Builder, Expr),
    ) {
        let counter = self.declare(name, Ty::U32);
        let read = self.get(counter);
        let body = self.block(|b| body(b, read));
        self.stmt(Stmt::For {
            counter,
            start,
            end,
            body,
            unroll: false,
        });
    }

    /// Appends an already built statement (the printer's tests build odd shapes).
    #[cfg(test)]
    pub(crate) fn last_stmt_mut(&mut self) -> Option<&mut Stmt> {
        self.blocks.last_mut().and_then(|b| b.last_mut())
    }

    pub fn if_(&mut self, cond: Expr, accept: impl FnOnce(&mut Builder)) {
        let accept = self.block(accept);
        self.stmt(Stmt::If {
            cond,
            accept,
            reject: Vec::new(),
        });
    }

    /// `if (cond) { continue; }`
    pub fn continue_if(&mut self, cond: Expr) {
        self.if_(cond, |b| b.stmt(Stmt::Continue));
    }

    pub fn ret_(&mut self, value: Expr) {
        self.stmt(Stmt::Return(Some(value)));
    }

    /// `let`s decoding flat index `flat` into one coordinate per axis of `shape`, named
    /// `names` (row-major: the last axis varies fastest).
    pub fn decode(&mut self, flat: Expr, names: &[&str], shape: &[usize]) -> Vec<Expr> {
        let mut stride = 1usize;
        let mut values = vec![None; shape.len()];
        for d in (0..shape.len()).rev() {
            let value = if d == 0 {
                let s = self.u32(stride);
                self.div(flat, s)
            } else if stride == 1 {
                let n = self.u32(shape[d]);
                self.rem(flat, n)
            } else {
                let s = self.u32(stride);
                let q = self.div(flat, s);
                let n = self.u32(shape[d]);
                self.rem(q, n)
            };
            values[d] = Some(value);
            stride *= shape[d];
        }
        values
            .into_iter()
            .enumerate()
            .map(|(d, v)| self.let_(names[d], Ty::U32, v.expect("every axis")))
            .collect()
    }

    /// The row-major flat index of coordinates `coords` in `shape`: `((c0 * s1 + c1) * s2 + c2)`.
    pub fn flat(&mut self, coords: &[Expr], shape: &[usize]) -> Expr {
        let mut at = coords[0];
        for d in 1..shape.len() {
            let n = self.u32(shape[d]);
            let scaled = self.mul(at, n);
            at = self.add(scaled, coords[d]);
        }
        at
    }
}

impl Stmt {
    /// The expressions the statement evaluates itself (a loop's bounds, an `if`'s condition),
    /// not those of the blocks inside it.
    pub fn exprs(&self) -> Vec<Expr> {
        match self {
            Stmt::Let { value, .. } | Stmt::Var { value, .. } | Stmt::Assign { value, .. } => {
                vec![*value]
            }
            Stmt::AssignElement { index, value, .. } | Stmt::Store { index, value, .. } => {
                vec![*index, *value]
            }
            Stmt::Update { index, value, .. } => index.iter().copied().chain([*value]).collect(),
            Stmt::For { start, end, .. } => vec![*start, *end],
            Stmt::Loop {
                start, cond, step, ..
            } => vec![*start, *cond, *step],
            Stmt::If { cond, .. } => vec![*cond],
            Stmt::Return(value) => value.iter().copied().collect(),
            Stmt::Block(_)
            | Stmt::Continue
            | Stmt::VarArray { .. }
            | Stmt::Barrier
            | Stmt::Comment(_) => Vec::new(),
        }
    }

    /// The blocks inside the statement, in order.
    pub fn blocks(&self) -> Vec<&Block> {
        match self {
            Stmt::For { body, .. } | Stmt::Loop { body, .. } | Stmt::Block(body) => vec![body],
            Stmt::If { accept, reject, .. } => vec![accept, reject],
            _ => Vec::new(),
        }
    }
}

/// Calls `f` on every expression the statements of `block` evaluate, at any depth, in order
/// (each statement's own, then its blocks').
pub(crate) fn walk_exprs(block: &[Stmt], f: &mut dyn FnMut(Expr)) {
    for s in block {
        for e in s.exprs() {
            f(e);
        }
        for b in s.blocks() {
            walk_exprs(b, f);
        }
    }
}

/// The `let`s of a block's top level, by local.
pub(crate) fn top_lets(block: &Block) -> Vec<(Local, Expr)> {
    block
        .iter()
        .filter_map(|s| match s {
            Stmt::Let { local, value } => Some((*local, *value)),
            _ => None,
        })
        .collect()
}
