//! The textual form of a graph: a printer and a parser that round-trip exactly.
//!
//! ```text
//! graph "lenet" {
//!   %0 = input "x" : f32[1,1,28,28]
//!   %1 = param "0.weight" : f32[6,1,5,5] @0:Conv2d
//!   %2 = param "0.bias" : f32[6] @0:Conv2d
//!   %3 = conv2d(%0, %1) stride=[1,1] padding=[2,2] : f32[1,6,28,28] @0:Conv2d
//!   ...
//!   output "logits" = %22
//! }
//! ```
//! Every node shows its result type; the parser re-infers it and rejects a mismatch, so a text
//! file cannot lie about shapes. `@index:Kind` records the model layer a node came from. Value
//! names may be any `%identifier`; the printer numbers them in definition order. `//` starts a
//! comment that runs to the end of the line.
//!
//! The parser is hand-written rather than generated: it is small, and it lets every error say
//! exactly what was expected at which line and column.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::path::Path;

use crate::graph::{Graph, GraphError, LayerRef, NodeId};
use crate::op::{AttrValue, Op, Scalar};
use crate::types::{DType, TensorType};
use crate::verify::verify;

/// Prints `graph` in the text form.
pub fn print(graph: &Graph) -> String {
    graph.to_string()
}

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "graph {} {{", quote(&self.name))?;
        for (id, node) in self.iter() {
            write!(f, "  {id} = {}", node.op.name())?;
            match &node.op {
                Op::Input { name } | Op::Param { name } => write!(f, " {}", quote(name))?,
                op => {
                    f.write_str("(")?;
                    for (i, input) in node.inputs.iter().enumerate() {
                        if i > 0 {
                            f.write_str(", ")?;
                        }
                        write!(f, "{input}")?;
                    }
                    f.write_str(")")?;
                    for (k, v) in op.attrs() {
                        write!(f, " {k}={v}")?;
                    }
                }
            }
            write!(f, " : {}", node.ty)?;
            if let Some(layer) = &node.layer {
                write!(f, " @{}:{}", layer.index, layer.kind)?;
            }
            f.write_str("\n")?;
        }
        for out in self.outputs() {
            writeln!(f, "  output {} = {}", quote(&out.name), out.node)?;
        }
        f.write_str("}\n")
    }
}

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A parse failure with its position (1-based line and column, in characters).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{line}:{col}: {message}", file.as_ref().map(|f| format!("{f}:")).unwrap_or_default())]
pub struct ParseError {
    pub file: Option<String>,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// Parses the text form. The result is verified.
pub fn parse(text: &str) -> Result<Graph, ParseError> {
    let tokens = lex(text)?;
    let mut p = Parser {
        tokens,
        pos: 0,
        values: HashMap::new(),
    };
    let graph = p.graph()?;
    // Construction already checked every node; this guards the parser itself.
    verify(&graph).map_err(|e| ParseError {
        file: None,
        line: 1,
        col: 1,
        message: e.to_string(),
    })?;
    Ok(graph)
}

/// Reads and parses a text-form file; errors name the file.
pub fn parse_file(path: &Path) -> Result<Graph, ParseError> {
    let file = Some(path.display().to_string());
    let text = std::fs::read_to_string(path).map_err(|e| ParseError {
        file: file.clone(),
        line: 0,
        col: 0,
        message: format!("cannot read: {e}"),
    })?;
    parse(&text).map_err(|e| ParseError { file, ..e })
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Value(String),
    Ident(String),
    Int(String),
    Float(String),
    Str(String),
    Punct(char),
    Eof,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Value(v) => write!(f, "`%{v}`"),
            Tok::Ident(i) => write!(f, "`{i}`"),
            Tok::Int(i) | Tok::Float(i) => write!(f, "`{i}`"),
            Tok::Str(s) => write!(f, "{}", quote(s)),
            Tok::Punct(c) => write!(f, "`{c}`"),
            Tok::Eof => f.write_str("end of input"),
        }
    }
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    line: usize,
    col: usize,
}

/// A character cursor that tracks 1-based line and column.
struct Cursor<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    line: usize,
    col: usize,
}

impl Cursor<'_> {
    fn peek(&mut self) -> Option<char> {
        self.chars.peek().copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.chars.next();
        if c == Some('\n') {
            self.line += 1;
            self.col = 1;
        } else if c.is_some() {
            self.col += 1;
        }
        c
    }

    fn take_while(&mut self, pred: impl Fn(char) -> bool) -> String {
        let mut s = String::new();
        while let Some(c) = self.peek().filter(|&c| pred(c)) {
            s.push(c);
            self.bump();
        }
        s
    }

    fn error(&self, line: usize, col: usize, message: String) -> ParseError {
        ParseError {
            file: None,
            line,
            col,
            message,
        }
    }

    /// The rest of a string literal after its opening quote.
    fn string_body(&mut self, line: usize, col: usize) -> Result<String, ParseError> {
        let mut s = String::new();
        loop {
            let (el, ec) = (self.line, self.col);
            match self.bump() {
                None | Some('\n') => {
                    return Err(self.error(line, col, "unterminated string".into()));
                }
                Some('"') => return Ok(s),
                Some('\\') => match self.bump() {
                    Some('"') => s.push('"'),
                    Some('\\') => s.push('\\'),
                    Some('n') => s.push('\n'),
                    Some('t') => s.push('\t'),
                    Some('r') => s.push('\r'),
                    Some('u') => {
                        let bad = |c: &Self| c.error(el, ec, "expected `\\u{hex}`".into());
                        if self.bump() != Some('{') {
                            return Err(bad(self));
                        }
                        let hex = self.take_while(|c| c.is_ascii_hexdigit());
                        if self.bump() != Some('}') || hex.is_empty() || hex.len() > 6 {
                            return Err(bad(self));
                        }
                        match u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                            Some(c) => s.push(c),
                            None => {
                                let m = format!("`\\u{{{hex}}}` is not a character");
                                return Err(self.error(el, ec, m));
                            }
                        }
                    }
                    other => {
                        let m = format!(
                            "unknown escape `\\{}`; expected one of \\\" \\\\ \\n \\t \\r \\u{{..}}",
                            other.map(String::from).unwrap_or_default()
                        );
                        return Err(self.error(el, ec, m));
                    }
                },
                Some(c) => s.push(c),
            }
        }
    }
}

/// An integer (`42`) or a float (`-0.5`, `1e-3`, `2.0`); a float is anything with a sign, a
/// point or an exponent.
fn number(cur: &mut Cursor) -> Tok {
    let mut s = String::new();
    if cur.peek() == Some('-') {
        s.push('-');
        cur.bump();
    }
    s.push_str(&cur.take_while(|c| c.is_ascii_digit()));
    if cur.peek() == Some('.') {
        cur.bump();
        s.push('.');
        s.push_str(&cur.take_while(|c| c.is_ascii_digit()));
    }
    if let Some(e) = cur.peek().filter(|&c| c == 'e' || c == 'E') {
        cur.bump();
        s.push(e);
        if let Some(sign) = cur.peek().filter(|&c| c == '-' || c == '+') {
            cur.bump();
            s.push(sign);
        }
        s.push_str(&cur.take_while(|c| c.is_ascii_digit()));
    }
    if s.chars().all(|c| c.is_ascii_digit()) {
        Tok::Int(s)
    } else {
        Tok::Float(s)
    }
}

fn lex(text: &str) -> Result<Vec<Token>, ParseError> {
    let mut cur = Cursor {
        chars: text.chars().peekable(),
        line: 1,
        col: 1,
    };
    let mut out = Vec::new();
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
    while let Some(c) = cur.peek() {
        let (line, col) = (cur.line, cur.col);
        if c.is_whitespace() {
            cur.bump();
            continue;
        }
        let tok = if c == '/' {
            cur.bump();
            if cur.peek() != Some('/') {
                return Err(cur.error(line, col, "expected `//` to start a comment".into()));
            }
            cur.take_while(|c| c != '\n');
            continue;
        } else if c == '%' {
            cur.bump();
            let name = cur.take_while(is_ident);
            if name.is_empty() {
                return Err(cur.error(line, col, "expected a value name after `%`".into()));
            }
            Tok::Value(name)
        } else if c.is_ascii_digit() || c == '-' {
            number(&mut cur)
        } else if c.is_ascii_alphabetic() || c == '_' {
            Tok::Ident(cur.take_while(is_ident))
        } else if c == '"' {
            cur.bump();
            Tok::Str(cur.string_body(line, col)?)
        } else if "=(),:[]{}@".contains(c) {
            cur.bump();
            Tok::Punct(c)
        } else {
            return Err(cur.error(line, col, format!("unexpected character `{c}`")));
        };
        out.push(Token { tok, line, col });
    }
    out.push(Token {
        tok: Tok::Eof,
        line: cur.line,
        col: cur.col,
    });
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    values: HashMap<String, NodeId>,
}

impl Parser {
    fn peek(&self) -> &Token {
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn next(&mut self) -> Token {
        let t = self.peek().clone();
        if self.pos < self.tokens.len() - 1 {
            self.pos += 1;
        }
        t
    }

    fn error_at(&self, t: &Token, message: String) -> ParseError {
        ParseError {
            file: None,
            line: t.line,
            col: t.col,
            message,
        }
    }

    fn expected(&self, what: &str) -> ParseError {
        let t = self.peek();
        self.error_at(t, format!("expected {what}, found {}", t.tok))
    }

    fn punct(&mut self, c: char) -> Result<(), ParseError> {
        if self.peek().tok == Tok::Punct(c) {
            self.next();
            Ok(())
        } else {
            Err(self.expected(&format!("`{c}`")))
        }
    }

    fn eat_punct(&mut self, c: char) -> bool {
        let hit = self.peek().tok == Tok::Punct(c);
        if hit {
            self.next();
        }
        hit
    }

    fn keyword(&mut self, kw: &str) -> Result<(), ParseError> {
        if self.peek().tok == Tok::Ident(kw.into()) {
            self.next();
            Ok(())
        } else {
            Err(self.expected(&format!("`{kw}`")))
        }
    }

    fn string(&mut self, what: &str) -> Result<String, ParseError> {
        match self.peek().tok.clone() {
            Tok::Str(s) => {
                self.next();
                Ok(s)
            }
            _ => Err(self.expected(what)),
        }
    }

    fn int(&mut self) -> Result<usize, ParseError> {
        match self.peek().tok.clone() {
            Tok::Int(digits) => {
                let t = self.next();
                digits
                    .parse()
                    .map_err(|_| self.error_at(&t, format!("integer `{digits}` is too large")))
            }
            _ => Err(self.expected("an integer")),
        }
    }

    fn int_list(&mut self) -> Result<Vec<usize>, ParseError> {
        self.punct('[')?;
        let mut v = Vec::new();
        if !self.eat_punct(']') {
            loop {
                v.push(self.int()?);
                if self.eat_punct(']') {
                    break;
                }
                if !self.eat_punct(',') {
                    return Err(self.expected("`,` or `]`"));
                }
            }
        }
        Ok(v)
    }

    fn graph(&mut self) -> Result<Graph, ParseError> {
        self.keyword("graph")?;
        let name = self.string("the graph's name as a quoted string")?;
        self.punct('{')?;
        let mut graph = Graph::new(name);
        loop {
            let t = self.peek().clone();
            match &t.tok {
                Tok::Punct('}') => {
                    self.next();
                    break;
                }
                Tok::Value(v) => {
                    let v = v.clone();
                    self.next();
                    if self.values.contains_key(&v) {
                        return Err(self.error_at(&t, format!("`%{v}` is defined twice")));
                    }
                    self.punct('=')?;
                    let id = self.node(&mut graph)?;
                    self.values.insert(v, id);
                }
                Tok::Ident(kw) if kw == "output" => {
                    self.next();
                    let name = self.string("the output's name as a quoted string")?;
                    self.punct('=')?;
                    let node = self.value_ref()?;
                    graph
                        .add_output(name, node)
                        .map_err(|e| self.error_at(&t, e.to_string()))?;
                }
                _ => return Err(self.expected("a node `%name = ...`, `output` or `}`")),
            }
        }
        if self.peek().tok != Tok::Eof {
            return Err(self.expected("end of input after the graph's `}`"));
        }
        Ok(graph)
    }

    fn value_ref(&mut self) -> Result<NodeId, ParseError> {
        let t = self.peek().clone();
        match &t.tok {
            Tok::Value(v) => {
                self.next();
                self.values.get(v).copied().ok_or_else(|| {
                    self.error_at(&t, format!("`%{v}` is not defined before this use"))
                })
            }
            _ => Err(self.expected("a value like `%3`")),
        }
    }

    fn node(&mut self, graph: &mut Graph) -> Result<NodeId, ParseError> {
        let op_tok = self.peek().clone();
        let Tok::Ident(op_name) = op_tok.tok.clone() else {
            return Err(self.expected("an op name"));
        };
        self.next();
        if op_name == "input" || op_name == "param" {
            let name = self.string(&format!("the {op_name}'s name as a quoted string"))?;
            self.punct(':')?;
            let ty = self.tensor_type()?;
            let layer = self.layer()?;
            let added = if op_name == "input" {
                if layer.is_some() {
                    return Err(self.error_at(&op_tok, "an input belongs to no layer".into()));
                }
                graph.add_input(name, ty)
            } else {
                graph.add_param(name, ty, layer)
            };
            return added.map_err(|e| self.error_at(&op_tok, e.to_string()));
        }
        self.punct('(')?;
        let mut inputs = Vec::new();
        if !self.eat_punct(')') {
            loop {
                inputs.push(self.value_ref()?);
                if self.eat_punct(')') {
                    break;
                }
                if !self.eat_punct(',') {
                    return Err(self.expected("`,` or `)`"));
                }
            }
        }
        let mut attrs = Vec::new();
        while let Tok::Ident(key) = self.peek().tok.clone() {
            self.next();
            self.punct('=')?;
            let value = match self.peek().tok.clone() {
                Tok::Int(_) => AttrValue::Int(self.int()?),
                Tok::Float(text) => {
                    let t = self.next();
                    match text.parse::<f32>() {
                        Ok(x) if x.is_finite() => AttrValue::Float(Scalar(x)),
                        _ => {
                            let m = format!("`{text}` is not a finite f32 number");
                            return Err(self.error_at(&t, m));
                        }
                    }
                }
                Tok::Ident(b) if b == "true" || b == "false" => {
                    self.next();
                    AttrValue::Bool(b == "true")
                }
                Tok::Punct('[') => AttrValue::Ints(self.int_list()?),
                _ => {
                    return Err(self.expected("an attribute value (number, true/false or [..])"));
                }
            };
            attrs.push((key, value));
        }
        let op = Op::from_attrs(&op_name, &attrs).map_err(|m| self.error_at(&op_tok, m))?;
        let op_arity = op.arity();
        if inputs.len() != op_arity {
            return Err(self.error_at(
                &op_tok,
                format!(
                    "{op_name} takes {op_arity} operand(s), got {}",
                    inputs.len()
                ),
            ));
        }
        self.punct(':')?;
        let ty_tok = self.peek().clone();
        let ty = self.tensor_type()?;
        let layer = self.layer()?;
        let id = graph
            .add_in_layer(op, &inputs, layer)
            .map_err(|e| match e {
                GraphError::Type { op, message, .. } => {
                    self.error_at(&op_tok, format!("{op}: {message}"))
                }
                other => self.error_at(&op_tok, other.to_string()),
            })?;
        if graph.ty(id) != &ty {
            return Err(self.error_at(
                &ty_tok,
                format!(
                    "declared type {ty} but {op_name} of these operands gives {}",
                    graph.ty(id)
                ),
            ));
        }
        Ok(id)
    }

    fn tensor_type(&mut self) -> Result<TensorType, ParseError> {
        let t = self.peek().clone();
        let Tok::Ident(name) = &t.tok else {
            return Err(self.expected("a tensor type like `f32[2,3]`"));
        };
        let dtype = DType::from_name(name).ok_or_else(|| {
            self.error_at(
                &t,
                format!("unknown element type `{name}`; expected f32, u8, u32 or i32"),
            )
        })?;
        self.next();
        let shape = self.int_list()?;
        let ty = TensorType::new(dtype, shape);
        if ty.checked_numel().is_none() {
            return Err(self.error_at(&t, format!("type {ty} has too many elements")));
        }
        Ok(ty)
    }

    fn layer(&mut self) -> Result<Option<LayerRef>, ParseError> {
        if !self.eat_punct('@') {
            return Ok(None);
        }
        let index = self.int()?;
        self.punct(':')?;
        match self.peek().tok.clone() {
            Tok::Ident(kind) => {
                self.next();
                Ok(Some(LayerRef { index, kind }))
            }
            _ => Err(self.expected("the layer's kind, like `Conv2d`")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"graph "small" {
  %0 = input "x" : f32[2,3]
  %1 = param "0.weight" : f32[4,3] @0:Linear
  %2 = matmul(%0, %1) transpose_a=false transpose_b=true : f32[2,4] @0:Linear
  %3 = sigmoid(%2) : f32[2,4] @1:Sigmoid
  output "y" = %3
}
"#;

    #[test]
    fn parses_and_prints_back_exactly() {
        let g = parse(SMALL).unwrap();
        assert_eq!(g.nodes().len(), 4);
        assert_eq!(print(&g), SMALL);
    }

    #[test]
    fn accepts_any_value_names_and_comments() {
        let text = "// a comment\ngraph \"g\" { %in = input \"x\" : f32[2]\n %s = relu(%in) : f32[2] // ok\n output \"o\" = %s }";
        let g = parse(text).unwrap();
        assert_eq!(
            print(&g),
            "graph \"g\" {\n  %0 = input \"x\" : f32[2]\n  %1 = relu(%0) : f32[2]\n  output \"o\" = %1\n}\n"
        );
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_line_column_and_expectation() {
        assert_eq!(
            err("graph \"g\" {\n  %0 = input \"x\" f32[2]\n}"),
            "2:18: expected `:`, found `f32`"
        );
        assert_eq!(
            err("graph \"g\" {\n  %0 = relu(%1) : f32[2]\n}"),
            "2:13: `%1` is not defined before this use"
        );
        assert_eq!(
            err("graph \"g\" {\n  %0 = input \"x\" : f32[2]\n  %1 = relu(%0) : f32[3]\n}"),
            "3:19: declared type f32[3] but relu of these operands gives f32[2]"
        );
        assert_eq!(
            err(
                "graph \"g\" {\n  %0 = input \"x\" : f32[2,3]\n  %1 = conv2d(%0, %0) stride=[1,1] padding=[0,0] : f32[1]\n}"
            ),
            "3:8: conv2d: input must be 4-D [N,C,H,W], got f32[2,3]"
        );
        assert_eq!(
            err("graph \"g\" {\n  %0 = input \"x\" : f64[2]\n}"),
            "2:20: unknown element type `f64`; expected f32, u8, u32 or i32"
        );
        assert_eq!(
            err("graph \"g\" {"),
            "1:12: expected a node `%name = ...`, `output` or `}`, found end of input"
        );
        assert_eq!(
            err("graph \"g\" {\n  %0 = input \"x\" : f32[2]\n  %0 = relu(%0) : f32[2]\n}"),
            "3:3: `%0` is defined twice"
        );
        assert_eq!(
            err("graph \"g\" {\n  %0 = input \"x\" : f32[99999999999999999999]\n}"),
            "2:24: integer `99999999999999999999` is too large"
        );
        assert_eq!(
            err("graph \"g\" {\n  %0 = input \"x\" : f32[2]\n  %1 = input \"x\" : f32[2]\n}"),
            "3:8: input name `x` is used twice"
        );
        assert_eq!(
            err("graph \"g\" {} extra"),
            "1:14: expected end of input after the graph's `}`, found `extra`"
        );
        assert_eq!(err("graph \"g\n"), "1:7: unterminated string");
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("kiln-ir-text-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.kir");
        std::fs::write(&path, "graph \"g\" {\n  %0 = sigmoid() : f32[2]\n}\n").unwrap();
        let e = parse_file(&path).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("{}:2:8: sigmoid takes 1 operand(s), got 0", path.display())
        );
        let missing = parse_file(&dir.join("missing.kir")).unwrap_err();
        assert!(
            missing.to_string().contains("missing.kir:0:0: cannot read"),
            "{missing}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn float_attributes_round_trip_exactly() {
        let mut g = Graph::new("f");
        let x = g.add_input("x", TensorType::f32([2])).unwrap();
        for v in [0.9f32, -1e-7, 1.0 / 255.0, 3.0e38, -0.0, 1.0 / 3.0] {
            g.add(Op::Scale { factor: Scalar(v) }, &[x]).unwrap();
        }
        let text = print(&g);
        assert!(text.contains("scale(%0) factor=0.9 : f32[2]"), "{text}");
        assert!(text.contains("factor=-1e-7"), "{text}");
        let parsed = parse(&text).unwrap();
        assert_eq!(parsed, g);
        assert_eq!(
            err("graph \"g\" {\n  %0 = full() shape=[1] value=1e39 : f32[1]\n}"),
            "2:31: `1e39` is not a finite f32 number"
        );
        assert_eq!(
            err("graph \"g\" {\n  %0 = full() shape=[1] value=true : f32[1]\n}"),
            "2:8: attribute `value` must be a number, got true"
        );
    }

    #[test]
    fn quoted_names_escape_and_unescape() {
        let mut g = Graph::new("we\"ird\\ é");
        g.add_input("a'b \\", TensorType::f32([1])).unwrap();
        let text = print(&g);
        assert_eq!(parse(&text).unwrap(), g);
        // Escapes of control characters parse, and the name is then refused.
        let e = parse("graph \"a\\nb\" {\n}\n").unwrap_err().to_string();
        assert!(e.contains("control character"), "{e}");
    }
}
