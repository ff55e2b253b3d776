//! A kernel's code as data: its functions in order and its entry point. Each item is a kernel
//! IR function with the callees its operands name; a module runs on the interpreter
//! (`interp::Runner`) and prints as WGSL in one pass.

use std::fmt::Write as _;

use super::wgsl::{self, Callee};
use super::{Function, Ty, ValidationError};

/// One top-level item of a module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// `// comment` (if any), then `fn name(i: u32) -> ret { ... }`.
    Function {
        name: String,
        comment: Option<String>,
        function: Function,
        callees: Vec<Callee>,
    },
}

/// An entry point `main` over `@builtin(global_invocation_id) gid`, or over
/// `@builtin(local_invocation_index) lid` for a kernel of one workgroup sharing `workgroup`
/// arrays (name, element type, length).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub workgroup_size: u32,
    pub function: Function,
    pub callees: Vec<Callee>,
    pub workgroup: Vec<(String, Ty, u32)>,
    /// The entry point's body for each further chunk the dispatch runs (`spans.rs`), with
    /// its callees: `main` then runs the first chunk's body (`chunk_main`) and these in order
    /// (`chunk_main_s1`, ...).
    pub spans: Vec<(Function, Vec<Callee>)>,
}

/// A kernel's functions and entry point (its header and binding declarations are the
/// generator's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    pub items: Vec<Item>,
    pub entry: Entry,
}

impl Item {
    /// The item's name, function and callees.
    pub fn function(&self) -> (&str, &Function, &[Callee]) {
        let Item::Function {
            name,
            function,
            callees,
            ..
        } = self;
        (name, function, callees)
    }
}

/// The WGSL of `items`, one after another.
pub fn print_items(items: &[Item]) -> Result<String, ValidationError> {
    let mut out = String::new();
    for item in items {
        match item {
            Item::Function {
                name,
                comment,
                function,
                callees,
            } => {
                if let Some(c) = comment {
                    let _ = writeln!(out, "// {c}");
                }
                let ret = function.ret.ok_or_else(|| {
                    ValidationError(format!("item `{name}` is an entry point's body"))
                })?;
                let params: String = function
                    .params
                    .iter()
                    .map(|(p, t)| format!(", {p}: {}", wgsl::ty(*t)))
                    .collect();
                let _ = writeln!(
                    out,
                    "fn {name}(i: u32{params}) -> {} {{\n{}}}",
                    wgsl::ty(ret),
                    wgsl::body(function, callees)?
                );
            }
        }
    }
    Ok(out)
}

impl Entry {
    pub fn print(&self) -> Result<String, ValidationError> {
        if self.function.ret.is_some() {
            return Err(ValidationError("an entry point returns a value".into()));
        }
        let mut out = String::new();
        for (name, elem, len) in &self.workgroup {
            let _ = writeln!(
                out,
                "var<workgroup> {name}: array<{}, {len}>;",
                wgsl::ty(*elem)
            );
        }
        if !self.workgroup.is_empty() {
            out.push('\n');
        }
        let builtin = if self.workgroup.is_empty() {
            "@builtin(global_invocation_id) gid: vec3<u32>"
        } else {
            "@builtin(local_invocation_index) lid: u32"
        };
        if self.spans.is_empty() {
            let _ = write!(
                out,
                "@compute @workgroup_size({})\nfn main({builtin}) {{\n{}}}\n",
                self.workgroup_size,
                wgsl::body(&self.function, &self.callees)?
            );
            return Ok(out);
        }
        if !self.workgroup.is_empty() {
            return Err(ValidationError(
                "a workgroup's entry point runs one chunk".into(),
            ));
        }
        let mut calls = String::new();
        let bodies = std::iter::once((&self.function, &self.callees))
            .chain(self.spans.iter().map(|(f, c)| (f, c)));
        for (s, (function, callees)) in bodies.enumerate() {
            let name = format!("chunk_main{}", wgsl::span_suffix(s as u32));
            let _ = writeln!(
                out,
                "fn {name}(gid: vec3<u32>) {{\n{}}}",
                wgsl::body(function, callees)?
            );
            let _ = writeln!(calls, "    {name}(gid);");
        }
        let _ = write!(
            out,
            "@compute @workgroup_size({})\nfn main({builtin}) {{\n{calls}}}\n",
            self.workgroup_size
        );
        Ok(out)
    }
}

impl Module {
    /// The items, a blank line, the entry point.
    pub fn print(&self) -> Result<String, ValidationError> {
        Ok(format!(
            "{}\n{}",
            print_items(&self.items)?,
            self.entry.print()?
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::interp::{Buffers, Runner, Value};
    use super::super::{Builder, Global, Space, Ty};
    use super::*;

    /// `row(i, red) = red * 2 + f32(i)`; `rows(i)` two rows of it handed their own `red`;
    /// the entry point stores lane 1 of row 1 and lane 0 of row 0 of `rows(gid.x)`.
    fn rows_module() -> Module {
        let mut row = Builder::new(Ty::VEC4_F32, Vec::new());
        let i = row.index();
        let red = row.param("red", Ty::VEC4_F32);
        let two = row.f32(2.0);
        let scaled = row.mul(red, two);
        let fi = row.cast(super::super::Scalar::F32, i);
        let value = row.add(scaled, fi);
        row.ret_(value);
        let pair = Ty::array(Ty::VEC4_F32, 2).unwrap();
        let mut rows = Builder::new(pair, vec![Ty::VEC4_F32]);
        let i = rows.index();
        let (one, two) = (rows.f32(1.0), rows.f32(2.0));
        let (red0, red1) = (rows.splat(one), rows.splat(two));
        let r0 = rows.call(0, vec![i, red0]);
        let next = rows.u32(1);
        let i1 = rows.add(i, next);
        let r1 = rows.call(0, vec![i1, red1]);
        let both = rows.array(vec![r0, r1]);
        rows.ret_(both);
        let rows = rows.finish();
        let mut entry = Builder::entry(vec![pair]);
        let out = entry.global(Global {
            name: "out".into(),
            space: Space::Storage { read_only: false },
            elem: Ty::F32,
        });
        let x = entry.global_id(0);
        let all = entry.operand(0, x);
        let all = entry.let_("all", pair, all);
        let (zero, one) = (entry.u32(0), entry.u32(1));
        let row1 = entry.lane(all, one);
        let y = entry.lane(row1, one);
        entry.store(out, zero, y);
        let row0 = entry.lane(all, zero);
        let x0 = entry.lane(row0, zero);
        entry.store(out, one, x0);
        Module {
            items: vec![
                Item::Function {
                    name: "row".into(),
                    comment: None,
                    function: row.finish(),
                    callees: Vec::new(),
                },
                Item::Function {
                    name: "rows".into(),
                    comment: None,
                    function: rows,
                    callees: vec![Callee::Call("row".into())],
                },
            ],
            entry: Entry {
                workgroup_size: 1,
                function: entry.finish(),
                callees: vec![Callee::Call("rows".into())],
                workgroup: Vec::new(),
                spans: Vec::new(),
            },
        }
    }

    #[test]
    fn functions_take_extra_parameters_and_return_arrays() {
        let module = rows_module();
        let text = module.print().unwrap();
        assert!(
            text.contains("fn row(i: u32, red: vec4<f32>) -> vec4<f32> {"),
            "{text}"
        );
        assert!(
            text.contains(
                "return array<vec4<f32>, 2>(row(i, vec4<f32>(1.0f)), row(i + 1u, vec4<f32>(2.0f)));"
            ),
            "{text}"
        );
        assert!(text.contains("out[0u] = all[1u].y;"), "{text}");
        let src =
            format!("@group(0) @binding(0) var<storage, read_write> out: array<f32>;\n{text}");
        let parsed = naga::front::wgsl::parse_str(&src).unwrap_or_else(|e| panic!("{e}\n{src}"));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        )
        .validate(&parsed)
        .unwrap_or_else(|e| panic!("{e:?}\n{src}"));
        // Invocation 3: row 1 = 2 * 2 + 4 in every lane, row 0 = 1 * 2 + 3.
        let mut buffers = Buffers::new();
        buffers.insert("out".into(), vec![Value::F32(0.0); 2]);
        Runner::new(&module)
            .unwrap()
            .run([3, 0], &mut buffers)
            .unwrap();
        assert_eq!(buffers["out"], [Value::F32(8.0), Value::F32(5.0)]);
    }

    #[test]
    fn arrays_are_refused_where_wgsl_refuses_them() {
        let mut b = Builder::new(Ty::F32, Vec::new());
        let one = b.f32(1.0);
        let a = b.array(vec![one, one]);
        let sum = b.add(a, one);
        b.ret_(sum);
        let e = super::super::validate(&b.finish()).unwrap_err();
        assert!(e.0.contains("Add of Array"), "{e}");
        let mut b = Builder::new(Ty::F32, Vec::new());
        let red = b.param("i", Ty::F32);
        b.ret_(red);
        let e = super::super::validate(&b.finish()).unwrap_err();
        assert!(e.0.contains("parameter `i` is declared twice"), "{e}");
    }
}
