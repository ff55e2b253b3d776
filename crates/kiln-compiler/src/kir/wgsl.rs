//! The WGSL printer of the kernel IR: a walk over a validated [`Function`]'s statements,
//! writing each expression where it is used, parenthesised only where WGSL's grammar needs it
//! (its operators do not all mix: `a & b < c`, `a && b || c` and `(a + b) >> c` need
//! parentheses; `a - (b - c)` needs them for its meaning).

use std::collections::HashMap;
use std::fmt::Write as _;

use super::{
    BinOp, Block, ChunkBound, Expr, ExprKind, Function, FunctionInfo, Literal, MathFn, Scalar,
    Stmt, Ty, UnOp, ValidationError, validate,
};

/// How the printer writes a read of one operand at an index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Callee {
    /// `name(index)`.
    Call(String),
    /// `name(index, extra)`: a function that takes a value the caller already has (a blocked
    /// rows epilogue passes its row of the reduction along).
    CallWith(String, String),
    /// A value already at hand, read at the function's own index only.
    Value(String),
}

/// Validates `f` and prints its body (statements at four spaces, ending in a `return`),
/// reading operand `k` as `operands[k]` says.
pub fn body(f: &Function, operands: &[Callee]) -> Result<String, ValidationError> {
    let info = validate(f)?;
    if operands.len() != f.operands.len() {
        return Err(ValidationError(format!(
            "{} operand names for {} operands",
            operands.len(),
            f.operands.len()
        )));
    }
    for e in &f.exprs {
        if let ExprKind::Operand { k, index } = e
            && matches!(operands[*k], Callee::Value(_))
            && !matches!(f.expr(*index), ExprKind::Index)
        {
            return Err(ValidationError(format!(
                "operand {k} is a value at hand but is read at another element"
            )));
        }
    }
    let p = Printer {
        f,
        info: &info,
        operands,
        inline: HashMap::new(),
    };
    let mut out = String::new();
    p.block(&mut out, &f.body, 1);
    Ok(out)
}

/// `f` as one expression, where its body is `let`s and a `return` (an elementwise op's
/// definition): the `let`s substituted where they are read. `None` for a body with loops,
/// branches or `var`s. A schedule that computes a chain of ops in its own loop (the CPU-class
/// convolutions' epilogues) takes each op's formula from its definition this way.
pub fn expression(f: &Function, operands: &[Callee]) -> Result<Option<String>, ValidationError> {
    let info = validate(f)?;
    let mut inline = HashMap::new();
    let Some((Stmt::Return(Some(value)), lets)) = f.body.split_last() else {
        return Ok(None);
    };
    for s in lets {
        let Stmt::Let { local, value } = s else {
            return Ok(None);
        };
        inline.insert(*local, *value);
    }
    let p = Printer {
        f,
        info: &info,
        operands,
        inline,
    };
    Ok(Some(p.expr(*value)))
}

/// The WGSL spelling of a type.
pub fn ty(t: Ty) -> String {
    let s = scalar(t.scalar());
    match t {
        Ty::Scalar(_) => s.to_string(),
        Ty::Vec4(_) => format!("vec4<{s}>"),
        Ty::Array {
            vec4, len, outer, ..
        } => {
            let elem = if vec4 {
                format!("vec4<{s}>")
            } else {
                s.to_string()
            };
            match outer {
                None => format!("array<{elem}, {len}>"),
                Some(n) => format!("array<array<{elem}, {len}>, {n}>"),
            }
        }
    }
}

fn scalar(s: Scalar) -> &'static str {
    match s {
        Scalar::F32 => "f32",
        Scalar::U32 => "u32",
        Scalar::I32 => "i32",
        Scalar::Bool => "bool",
    }
}

/// A literal that round-trips exactly (`{:?}` of an f32 is its shortest exact decimal).
pub fn literal(l: Literal) -> String {
    match l {
        Literal::F32(x) => format!("{x:?}f"),
        Literal::U32(n) => format!("{n}u"),
        Literal::I32(n) => format!("{n}i"),
        Literal::Bool(b) => b.to_string(),
    }
}

/// Grammar classes of WGSL expressions, loosest last; what each operator accepts as operands
/// is a set of them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Primary,
    Unary,
    Multiplicative,
    /// `%`: multiplicative to WGSL, but kept apart so that `(i / 784u) % 6u` keeps the
    /// parentheses a reader expects.
    Remainder,
    Additive,
    Shift,
    Relational,
    And,
    Or,
    BitAnd,
}

use Class::*;

const ARITHMETIC: &[Class] = &[Primary, Unary, Multiplicative, Remainder, Additive, Shift];

struct Printer<'a> {
    f: &'a Function,
    info: &'a FunctionInfo,
    operands: &'a [Callee],
    /// `let`s printed as their values where they are read ([`expression`]).
    inline: HashMap<super::Local, Expr>,
}

impl Printer<'_> {
    fn block(&self, out: &mut String, block: &Block, depth: usize) {
        for s in block {
            self.stmt(out, s, depth);
        }
    }

    fn stmt(&self, out: &mut String, s: &Stmt, depth: usize) {
        let pad = "    ".repeat(depth);
        let name = |l: super::Local| self.f.local(l).name.as_str();
        match s {
            Stmt::Let { local, value } => {
                let _ = writeln!(out, "{pad}let {} = {};", name(*local), self.expr(*value));
            }
            Stmt::Var { local, value } => {
                let _ = writeln!(out, "{pad}var {} = {};", name(*local), self.expr(*value));
            }
            Stmt::Assign { local, op, value } => {
                let op = op.map_or("", |op| binary_op(op));
                let _ = writeln!(out, "{pad}{} {op}= {};", name(*local), self.expr(*value));
            }
            Stmt::For {
                counter,
                start,
                end,
                body,
                unroll: false,
            } => {
                let c = name(*counter);
                let _ = writeln!(
                    out,
                    "{pad}for (var {c} = {}; {c} < {}; {c}++) {{",
                    self.expr(*start),
                    self.expr(*end)
                );
                self.block(out, body, depth + 1);
                let _ = writeln!(out, "{pad}}}");
            }
            Stmt::For {
                counter,
                start,
                end,
                body,
                unroll: true,
            } => {
                let bound = |e: Expr| match self.f.expr(e) {
                    ExprKind::Literal(Literal::U32(n)) => *n,
                    _ => unreachable!("validated: unrolled bounds are literals"),
                };
                // Each iteration its own scope, the counter a constant in it (the validator
                // refuses a `continue` here: it would not mean the next copy).
                for k in bound(*start)..bound(*end) {
                    let _ = writeln!(out, "{pad}{{\n{pad}    let {} = {k}u;", name(*counter));
                    self.block(out, body, depth + 1);
                    let _ = writeln!(out, "{pad}}}");
                }
            }
            Stmt::If {
                cond,
                accept,
                reject,
            } => {
                // A branch of plain assignments (or a `continue`) stays on one line.
                let simple = |s: &Stmt| matches!(s, Stmt::Assign { .. } | Stmt::Continue);
                if reject.is_empty() && accept.iter().all(simple) {
                    let mut line = String::new();
                    for s in accept {
                        self.stmt(&mut line, s, 0);
                    }
                    let inner = line.lines().collect::<Vec<_>>().join(" ");
                    let _ = writeln!(out, "{pad}if ({}) {{ {inner} }}", self.expr(*cond));
                    return;
                }
                let _ = writeln!(out, "{pad}if ({}) {{", self.expr(*cond));
                self.block(out, accept, depth + 1);
                if !reject.is_empty() {
                    let _ = writeln!(out, "{pad}}} else {{");
                    self.block(out, reject, depth + 1);
                }
                let _ = writeln!(out, "{pad}}}");
            }
            Stmt::Continue => {
                let _ = writeln!(out, "{pad}continue;");
            }
            Stmt::Return(Some(value)) => {
                let _ = writeln!(out, "{pad}return {};", self.expr(*value));
            }
            Stmt::Return(None) => {
                let _ = writeln!(out, "{pad}return;");
            }
            Stmt::Loop {
                counter,
                start,
                cond,
                step,
                halve,
                body,
            } => {
                let c = name(*counter);
                let update = if *halve {
                    format!("{c} = {c} / {}", self.expr(*step))
                } else {
                    format!("{c} += {}", self.expr(*step))
                };
                let _ = writeln!(
                    out,
                    "{pad}for (var {c} = {}; {}; {update}) {{",
                    self.expr(*start),
                    self.expr(*cond)
                );
                self.block(out, body, depth + 1);
                let _ = writeln!(out, "{pad}}}");
            }
            Stmt::VarArray { local } => {
                let decl = self.f.local(*local);
                let _ = writeln!(
                    out,
                    "{pad}var {}: array<{}, {}>;",
                    decl.name,
                    ty(decl.ty),
                    decl.array.expect("validated: arrays have a length")
                );
            }
            Stmt::Update {
                local,
                index,
                lane,
                op,
                value,
            } => {
                let index = index.map_or(String::new(), |i| format!("[{}]", self.expr(i)));
                let lane = lane.map_or(String::new(), |l| {
                    format!(".{}", ["x", "y", "z", "w"][l as usize])
                });
                let op = op.map_or("", binary_op);
                let _ = writeln!(
                    out,
                    "{pad}{}{index}{lane} {op}= {};",
                    name(*local),
                    self.expr(*value)
                );
            }
            Stmt::Block(body) => {
                let _ = writeln!(out, "{pad}{{");
                self.block(out, body, depth + 1);
                let _ = writeln!(out, "{pad}}}");
            }
            Stmt::AssignElement {
                local,
                index,
                value,
            } => {
                let _ = writeln!(
                    out,
                    "{pad}{}[{}] = {};",
                    name(*local),
                    self.expr(*index),
                    self.expr(*value)
                );
            }
            Stmt::Barrier => {
                let _ = writeln!(out, "{pad}workgroupBarrier();");
            }
            Stmt::Comment(text) => {
                let _ = writeln!(out, "{pad}// {text}");
            }
            Stmt::Store {
                global,
                index,
                value,
            } => {
                let _ = writeln!(
                    out,
                    "{pad}{}[{}] = {};",
                    self.f.globals[*global].name,
                    self.expr(*index),
                    self.expr(*value)
                );
            }
        }
    }

    fn ty(&self, e: Expr) -> Ty {
        self.info.types[e.index()].expect("validated: printed expressions are typed")
    }

    fn expr(&self, e: Expr) -> String {
        self.classed(e).0
    }

    /// `e` as an operand that may be of the classes `allowed`, in parentheses otherwise.
    fn operand(&self, e: Expr, allowed: &[Class]) -> String {
        let (text, class) = self.classed(e);
        // `&&`/`||` take relational operands, and so everything tighter.
        let tighter = allowed.contains(&Relational) && ARITHMETIC.contains(&class);
        if allowed.contains(&class) || tighter {
            text
        } else {
            format!("({text})")
        }
    }

    fn classed(&self, e: Expr) -> (String, Class) {
        match self.f.expr(e) {
            ExprKind::Literal(l) => {
                let negative = match *l {
                    Literal::F32(x) => x.is_sign_negative(),
                    Literal::I32(n) => n < 0,
                    _ => false,
                };
                (literal(*l), if negative { Unary } else { Primary })
            }
            ExprKind::Index => ("i".into(), Primary),
            ExprKind::Local(l) => match self.inline.get(l) {
                Some(&value) => self.classed(value),
                None => (self.f.local(*l).name.clone(), Primary),
            },
            ExprKind::Operand { k, index } => (
                match &self.operands[*k] {
                    Callee::Call(name) => format!("{name}({})", self.expr(*index)),
                    Callee::CallWith(name, extra) => {
                        format!("{name}({}, {extra})", self.expr(*index))
                    }
                    Callee::Value(name) => name.clone(),
                },
                Primary,
            ),
            ExprKind::Call { k, args } => {
                let mut args: Vec<String> = args.iter().map(|&a| self.expr(a)).collect();
                let name = match &self.operands[*k] {
                    Callee::Call(name) | Callee::Value(name) => name,
                    Callee::CallWith(name, extra) => {
                        args.push(extra.clone());
                        name
                    }
                };
                (format!("{name}({})", args.join(", ")), Primary)
            }
            ExprKind::Param(k) => (self.f.params[*k].0.clone(), Primary),
            ExprKind::Array(elements) => {
                let elements: Vec<String> = elements.iter().map(|&e| self.expr(e)).collect();
                (
                    format!("{}({})", ty(self.ty(e)), elements.join(", ")),
                    Primary,
                )
            }
            ExprKind::Binary { op, left, right } => {
                let (class, l, r): (Class, &[Class], &[Class]) = match op {
                    BinOp::Mul | BinOp::Div => (
                        Multiplicative,
                        &[Primary, Unary, Multiplicative],
                        &[Primary, Unary],
                    ),
                    BinOp::Rem => (Remainder, &[Primary, Unary], &[Primary, Unary]),
                    BinOp::Add | BinOp::Sub => (
                        Additive,
                        &[Primary, Unary, Multiplicative, Remainder, Additive],
                        &[Primary, Unary, Multiplicative, Remainder],
                    ),
                    BinOp::ShiftRight => (Shift, &[Primary, Unary], &[Primary, Unary]),
                    BinOp::And => (And, &[Relational, And], &[Relational]),
                    BinOp::Or => (Or, &[Relational, Or], &[Relational]),
                    BinOp::BitAnd => (BitAnd, &[Primary, Unary, BitAnd], &[Primary, Unary]),
                    _ => (Relational, ARITHMETIC, ARITHMETIC),
                };
                (
                    format!(
                        "{} {} {}",
                        self.operand(*left, l),
                        binary_op(*op),
                        self.operand(*right, r)
                    ),
                    class,
                )
            }
            ExprKind::Unary { op, operand } => {
                let sym = match op {
                    UnOp::Neg => "-",
                    UnOp::Not => "!",
                };
                (
                    format!("{sym}{}", self.operand(*operand, &[Primary])),
                    Unary,
                )
            }
            ExprKind::Math { fun, args } => {
                let name = match fun {
                    MathFn::Exp => "exp",
                    MathFn::Log => "log",
                    MathFn::Sqrt => "sqrt",
                    MathFn::Tanh => "tanh",
                    MathFn::Max => "max",
                    MathFn::Min => "min",
                    MathFn::Clamp => "clamp",
                    MathFn::Dot => "dot",
                };
                let args: Vec<String> = args.iter().map(|&a| self.expr(a)).collect();
                (format!("{name}({})", args.join(", ")), Primary)
            }
            ExprKind::Select {
                cond,
                accept,
                reject,
            } => (
                format!(
                    "select({}, {}, {})",
                    self.expr(*reject),
                    self.expr(*accept),
                    self.expr(*cond)
                ),
                Primary,
            ),
            ExprKind::Cast { value, .. } => (
                format!("{}({})", ty(self.ty(e)), self.expr(*value)),
                Primary,
            ),
            ExprKind::Splat(x) => (format!("{}({})", ty(self.ty(e)), self.expr(*x)), Primary),
            ExprKind::Compose(lanes) => {
                let lanes: Vec<String> = lanes.iter().map(|&l| self.expr(l)).collect();
                (format!("{}({})", ty(self.ty(e)), lanes.join(", ")), Primary)
            }
            ExprKind::Load { global, index } => (
                format!("{}[{}]", self.f.globals[*global].name, self.expr(*index)),
                Primary,
            ),
            ExprKind::Lane { vector, lane } => (
                match self.f.expr(*lane) {
                    // A lane known here reads as a swizzle.
                    ExprKind::Literal(Literal::U32(k @ 0..=3)) if !self.ty(*vector).is_array() => {
                        format!(
                            "{}.{}",
                            self.operand(*vector, &[Primary]),
                            ["x", "y", "z", "w"][*k as usize]
                        )
                    }
                    _ => format!(
                        "{}[{}]",
                        self.operand(*vector, &[Primary]),
                        self.expr(*lane)
                    ),
                },
                Primary,
            ),
            ExprKind::GlobalId(axis) => (format!("gid.{}", ["x", "y"][*axis as usize]), Primary),
            ExprKind::LocalIndex => ("lid".into(), Primary),
            ExprKind::Element { local, index } => (
                format!("{}[{}]", self.f.local(*local).name, self.expr(*index)),
                Primary,
            ),
            ExprKind::WindowBase(w) => (
                window_base(*w).replacen("bases", &format!("bases{}", span_suffix(self.f.span)), 1),
                Primary,
            ),
            ExprKind::Chunk(bound) => (
                format!(
                    "chunk{}[0].{}",
                    span_suffix(self.f.span),
                    match bound {
                        ChunkBound::FirstInvocation => "x",
                        ChunkBound::EndInvocation => "y",
                        ChunkBound::FirstImage => "z",
                        ChunkBound::EndImage => "w",
                    }
                ),
                Primary,
            ),
        }
    }
}

/// The suffix of span `span`'s names: none for the first chunk of a dispatch, `_s<span>` for
/// the others (`spans.rs`).
pub fn span_suffix(span: u32) -> String {
    if span == 0 {
        String::new()
    } else {
        format!("_s{span}")
    }
}

/// Window `w`'s base index in the chunk's table of bases (`bases`, four to a `vec4<u32>`).
pub fn window_base(w: usize) -> String {
    format!("bases[{}].{}", w / 4, ["x", "y", "z", "w"][w % 4])
}

fn binary_op(op: BinOp) -> &'static str {
    match op {
        BinOp::Add => "+",
        BinOp::Sub => "-",
        BinOp::Mul => "*",
        BinOp::Div => "/",
        BinOp::Rem => "%",
        BinOp::Lt => "<",
        BinOp::Le => "<=",
        BinOp::Gt => ">",
        BinOp::Ge => ">=",
        BinOp::Eq => "==",
        BinOp::Ne => "!=",
        BinOp::And => "&&",
        BinOp::Or => "||",
        BinOp::BitAnd => "&",
        BinOp::ShiftRight => ">>",
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Builder, Ty};
    use super::*;

    fn print(b: Builder, operands: &[&str]) -> String {
        let names: Vec<Callee> = operands
            .iter()
            .map(|s| Callee::Call(s.to_string()))
            .collect();
        body(&b.finish(), &names).unwrap()
    }

    /// Wraps a printed body in a function naga can check.
    fn naga_accepts(ret: &str, text: &str, operands: &[(&str, &str)]) {
        let mut src = String::new();
        for (name, t) in operands {
            let _ = writeln!(src, "fn {name}(i: u32) -> {t} {{ return {t}(f32(i)); }}");
        }
        let _ = writeln!(src, "fn f(i: u32) -> {ret} {{\n{text}}}");
        src.push_str(
            "@group(0) @binding(0) var<storage, read_write> out: array<u32>;\n\
             @compute @workgroup_size(1) fn main() { let x = f(0u); out[0] = 0u; }\n",
        );
        let module = naga::front::wgsl::parse_str(&src).unwrap_or_else(|e| panic!("{e}\n{src}"));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{e:?}\n{src}"));
    }

    #[test]
    fn operators_are_parenthesised_where_wgsl_needs_it() {
        let mut b = Builder::new(Ty::U32, vec![Ty::U32]);
        let i = b.index();
        let (two, three) = (b.u32(2), b.u32(3));
        let sum = b.add(i, two);
        let shifted = b.bin(BinOp::ShiftRight, sum, two);
        let diff = b.sub(three, two);
        let nested = b.sub(i, diff);
        let lt = b.bin(BinOp::Lt, shifted, nested);
        let eq = b.bin(BinOp::Eq, i, three);
        let both = b.bin(BinOp::And, lt, eq);
        let either = b.bin(BinOp::Or, both, eq);
        let x = b.operand(0, i);
        let one = b.u32(1);
        let picked = b.select(either, x, one);
        let scaled = b.mul(sum, picked);
        b.ret_(scaled);
        let text = print(b, &["v3"]);
        assert_eq!(
            text,
            "    return (i + 2u) * select(1u, v3(i), ((i + 2u) >> 2u < i - (3u - 2u) && i == 3u) || i == 3u);\n"
        );
        naga_accepts("u32", &text, &[("v3", "u32")]);
    }

    #[test]
    fn loops_ifs_and_lanes_print_as_valid_wgsl() {
        let mut b = Builder::new(Ty::VEC4_F32, vec![Ty::VEC4_F32, Ty::F32]);
        let zero = b.f32(0.0);
        let z = b.splat(zero);
        let acc = b.var("acc", Ty::VEC4_F32, z);
        let (lo, hi) = (b.u32(0), b.u32(4));
        b.for_("k", lo, hi, |b, k| {
            let two = b.u32(2);
            let odd = b.rem(k, two);
            let one = b.u32(1);
            let c = b.bin(BinOp::Eq, odd, one);
            b.continue_if(c);
            let x = b.operand(0, k);
            let w = b.operand(1, k);
            let neg = b.unary(UnOp::Neg, w);
            let e = b.math(MathFn::Exp, &[neg]);
            let t = b.mul(x, e);
            b.add_assign(acc, t);
        });
        let a = b.get(acc);
        let neg = b.bin(BinOp::Lt, a, z);
        let r = b.select(neg, z, a);
        b.ret_(r);
        let text = print(b, &["v1", "v2"]);
        assert!(text.contains("    var acc = vec4<f32>(0.0f);\n"), "{text}");
        assert!(text.contains("if (k % 2u == 1u) { continue; }"), "{text}");
        assert!(text.contains("acc += v1(k) * exp(-v2(k));"), "{text}");
        naga_accepts("vec4<f32>", &text, &[("v1", "vec4<f32>"), ("v2", "f32")]);
    }

    #[test]
    fn unrolled_loops_write_each_iteration() {
        let mut b = Builder::new(Ty::F32, vec![Ty::F32]);
        let zero = b.f32(0.0);
        let acc = b.var("acc", Ty::F32, zero);
        let (lo, hi) = (b.u32(0), b.u32(3));
        b.for_("k", lo, hi, |b, k| {
            let x = b.operand(0, k);
            b.add_assign(acc, x);
        });
        if let Some(Stmt::For { unroll, .. }) = b.last_stmt_mut() {
            *unroll = true;
        }
        let a = b.get(acc);
        b.ret_(a);
        let text = print(b, &["v0"]);
        assert_eq!(text.matches("acc += v0(k);").count(), 3, "{text}");
        assert!(text.contains("let k = 2u;"), "{text}");
        naga_accepts("f32", &text, &[("v0", "f32")]);
    }

    #[test]
    fn values_at_hand_are_read_only_at_the_functions_own_element() {
        let build = |shifted: bool| {
            let mut b = Builder::new(Ty::VEC4_F32, vec![Ty::VEC4_F32, Ty::VEC4_F32]);
            let i = b.index();
            let at = if shifted {
                let one = b.u32(1);
                b.add(i, one)
            } else {
                i
            };
            let (x, y) = (b.operand(0, at), b.operand(1, i));
            let r = b.add(x, y);
            b.ret_(r);
            b.finish()
        };
        let callees = [
            Callee::Value("red".into()),
            Callee::CallWith("v7_row".into(), "red".into()),
        ];
        assert_eq!(
            body(&build(false), &callees).unwrap(),
            "    return red + v7_row(i, red);\n"
        );
        let e = body(&build(true), &callees).unwrap_err();
        assert!(e.0.contains("read at another element"), "{e}");
    }

    #[test]
    fn a_definition_of_lets_and_a_return_prints_as_one_expression() {
        let mut b = Builder::new(Ty::VEC4_F32, vec![Ty::VEC4_F32]);
        let i = b.index();
        let x = b.operand(0, i);
        let a = b.let_("a", Ty::VEC4_F32, x);
        let zero = b.f32(0.0);
        let z = b.splat(zero);
        let neg = b.bin(BinOp::Lt, a, z);
        let r = b.select(neg, z, a);
        b.ret_(r);
        let f = b.finish();
        assert_eq!(
            expression(&f, &[Callee::Value("e0".into())])
                .unwrap()
                .as_deref(),
            Some("select(e0, vec4<f32>(0.0f), e0 < vec4<f32>(0.0f))")
        );

        let mut b = Builder::new(Ty::F32, vec![Ty::F32]);
        let zero = b.f32(0.0);
        let acc = b.var("acc", Ty::F32, zero);
        let a = b.get(acc);
        b.ret_(a);
        assert_eq!(
            expression(&b.finish(), &[Callee::Value("e0".into())]).unwrap(),
            None
        );
    }
}
