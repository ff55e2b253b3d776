//! A kernel's code as data: its binding declarations, its functions in order and its entry
//! point. Each item is a kernel IR function with the callees its operands name; a module runs
//! on the interpreter (`interp::Runner`) and prints as WGSL in one pass, after checking that
//! every buffer a function reads or writes is declared as the function uses it.

use std::fmt::Write as _;

use super::wgsl::{self, Callee};
use super::{ExprKind, Function, Global, Scalar, Space, Ty, ValidationError};

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

/// A resource bound at module scope: `@group(0) @binding(slot) var<space> name:
/// array<elem, len>;`, runtime-sized where `len` is `None` (storage only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Declaration {
    pub slot: u32,
    pub global: Global,
    pub len: Option<u32>,
}

impl Declaration {
    /// The chunk table's range of span `span` (`chunk`, `chunk_s1`, ...): one `vec4<u32>` of
    /// read-only storage (it steers control flow: `uniform_control.rs`).
    pub fn chunk_range(slot: u32, span: u32) -> Declaration {
        Declaration {
            slot,
            global: Global {
                name: format!("chunk{}", wgsl::span_suffix(span)),
                space: Space::Storage { read_only: true },
                elem: Ty::Vec4(Scalar::U32),
            },
            len: Some(1),
        }
    }

    /// The window bases of span `span` (`bases`, `bases_s1`, ...): `vec4s` uniform
    /// `vec4<u32>`s, four bases to each.
    pub fn window_bases(slot: u32, span: u32, vec4s: u32) -> Declaration {
        Declaration {
            slot,
            global: Global {
                name: format!("bases{}", wgsl::span_suffix(span)),
                space: Space::Uniform,
                elem: Ty::Vec4(Scalar::U32),
            },
            len: Some(vec4s),
        }
    }

    fn print(&self) -> Result<String, ValidationError> {
        let Global { name, space, elem } = &self.global;
        let space = match space {
            Space::Storage { read_only: true } => "storage, read",
            Space::Storage { read_only: false } => "storage, read_write",
            Space::Uniform if self.len.is_some() => "uniform",
            Space::Uniform => {
                return Err(ValidationError(format!("uniform `{name}` has no length")));
            }
            Space::Workgroup => {
                return Err(ValidationError(format!(
                    "workgroup array `{name}` is declared by its entry point"
                )));
            }
        };
        let len = self.len.map(|n| format!(", {n}")).unwrap_or_default();
        Ok(format!(
            "@group(0) @binding({}) var<{space}> {name}: array<{}{len}>;",
            self.slot,
            wgsl::ty(*elem)
        ))
    }
}

/// A kernel's binding declarations, functions and entry point (its header comments are the
/// generator's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    pub declarations: Vec<Declaration>,
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
    /// The declarations, a blank line, the items, a blank line, the entry point.
    pub fn print(&self) -> Result<String, ValidationError> {
        self.check_declarations()?;
        let mut out = String::new();
        for d in &self.declarations {
            let _ = writeln!(out, "{}", d.print()?);
        }
        if !self.declarations.is_empty() {
            out.push('\n');
        }
        let _ = write!(
            out,
            "{}\n{}",
            print_items(&self.items)?,
            self.entry.print()?
        );
        Ok(out)
    }

    /// Every function's functions in the module: items, entry point, its spans.
    fn functions(&self) -> impl Iterator<Item = (&str, &Function)> {
        self.items
            .iter()
            .map(|i| {
                let (name, f, _) = i.function();
                (name, f)
            })
            .chain(std::iter::once(("main", &self.entry.function)))
            .chain(self.entry.spans.iter().map(|(f, _)| ("main", f)))
    }

    /// Slots and names are unique, and every buffer a function uses is declared as it uses
    /// it, the chunk tables its chunk bounds and window bases read included.
    fn check_declarations(&self) -> Result<(), ValidationError> {
        let mut slots = std::collections::BTreeSet::new();
        let mut names = std::collections::BTreeMap::new();
        for d in &self.declarations {
            if !slots.insert(d.slot) {
                return Err(ValidationError(format!(
                    "binding {} is declared twice",
                    d.slot
                )));
            }
            if names.insert(d.global.name.as_str(), d).is_some() {
                return Err(ValidationError(format!(
                    "`{}` is declared twice",
                    d.global.name
                )));
            }
        }
        let declared = |name: &str, fname: &str| {
            names.get(name).copied().ok_or_else(|| {
                ValidationError(format!("`{fname}` uses `{name}`, which is not declared"))
            })
        };
        for (fname, f) in self.functions() {
            for g in &f.globals {
                if g.space == Space::Workgroup {
                    continue;
                }
                let d = declared(&g.name, fname)?;
                if d.global != *g {
                    return Err(ValidationError(format!(
                        "`{fname}` uses `{}` as {:?} of {}, declared {:?} of {}",
                        g.name,
                        g.space,
                        wgsl::ty(g.elem),
                        d.global.space,
                        wgsl::ty(d.global.elem)
                    )));
                }
            }
            let suffix = wgsl::span_suffix(f.span);
            for e in &f.exprs {
                match e {
                    ExprKind::Chunk(_) => declared(&format!("chunk{suffix}"), fname)?,
                    ExprKind::WindowBase(_) => declared(&format!("bases{suffix}"), fname)?,
                    _ => continue,
                };
            }
        }
        Ok(())
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
            declarations: vec![Declaration {
                slot: 0,
                global: Global {
                    name: "out".into(),
                    space: Space::Storage { read_only: false },
                    elem: Ty::F32,
                },
                len: None,
            }],
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
        assert!(
            text.starts_with("@group(0) @binding(0) var<storage, read_write> out: array<f32>;\n"),
            "{text}"
        );
        let src = text;
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

    #[test]
    fn every_buffer_a_function_uses_is_declared_as_it_uses_it() {
        let module = rows_module();
        let refused = |m: &Module| m.print().unwrap_err().0;
        let mut m = module.clone();
        m.declarations.clear();
        assert_eq!(refused(&m), "`main` uses `out`, which is not declared");
        let mut m = module.clone();
        m.declarations[0].global.space = Space::Storage { read_only: true };
        assert!(refused(&m).contains("declared Storage { read_only: true }"));
        let mut m = module.clone();
        m.declarations[0].global.space = Space::Uniform;
        m.declarations[0].len = Some(4);
        assert!(refused(&m).contains("`main` uses `out` as Storage"));
        let mut m = module.clone();
        m.declarations.push(Declaration::chunk_range(0, 0));
        assert_eq!(refused(&m), "binding 0 is declared twice");
        // A chunk bound reads its span's table.
        let mut f = Builder::entry(Vec::new());
        let out = f.global(Global {
            name: "out".into(),
            space: Space::Storage { read_only: false },
            elem: Ty::U32,
        });
        let first = f.chunk(super::super::ChunkBound::FirstImage);
        let zero = f.u32(0);
        f.store(out, zero, first);
        let mut function = f.finish();
        function.span = 2;
        let mut m = Module {
            declarations: vec![
                Declaration {
                    slot: 0,
                    global: Global {
                        name: "out".into(),
                        space: Space::Storage { read_only: false },
                        elem: Ty::U32,
                    },
                    len: None,
                },
                Declaration::chunk_range(1, 0),
            ],
            items: Vec::new(),
            entry: Entry {
                workgroup_size: 1,
                function,
                callees: Vec::new(),
                workgroup: Vec::new(),
                spans: Vec::new(),
            },
        };
        assert_eq!(refused(&m), "`main` uses `chunk_s2`, which is not declared");
        m.declarations.push(Declaration::chunk_range(2, 2));
        let text = m.print().unwrap();
        assert!(
            text.contains(
                "@group(0) @binding(2) var<storage, read> chunk_s2: array<vec4<u32>, 1>;"
            ),
            "{text}"
        );
        assert!(text.contains("out[0u] = chunk_s2[0].z;"), "{text}");
    }
}
