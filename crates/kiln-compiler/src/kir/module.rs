//! A kernel's code as data: its functions in order and its entry point. Each item is a kernel
//! IR function with the callees its operands name, or — for the schedules still written as
//! text — a piece of WGSL text; a module without text items is all data, and runs on the
//! interpreter (`interp::Runner`).

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
    /// WGSL written by a schedule not yet on the kernel IR, as is.
    Text(String),
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
}

/// A kernel's functions and entry point (its header and binding declarations are the
/// generator's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    pub items: Vec<Item>,
    pub entry: Entry,
}

impl Item {
    /// The item's function, when it is one, with its callees.
    pub fn function(&self) -> Option<(&str, &Function, &[Callee])> {
        match self {
            Item::Function {
                name,
                function,
                callees,
                ..
            } => Some((name, function, callees)),
            Item::Text(_) => None,
        }
    }
}

/// The WGSL of `items`, one after another.
pub fn print_items(items: &[Item]) -> Result<String, ValidationError> {
    let mut out = String::new();
    for item in items {
        match item {
            Item::Text(text) => out.push_str(text),
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
                let _ = writeln!(
                    out,
                    "fn {name}(i: u32) -> {} {{\n{}}}",
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
        let _ = write!(
            out,
            "@compute @workgroup_size({})\nfn main({builtin}) {{\n{}}}\n",
            self.workgroup_size,
            wgsl::body(&self.function, &self.callees)?
        );
        Ok(out)
    }
}

impl Module {
    /// Whether every item is kernel IR (no text): the module can be interpreted.
    pub fn is_data(&self) -> bool {
        self.items
            .iter()
            .all(|i| matches!(i, Item::Function { .. }))
    }

    /// The items, a blank line, the entry point.
    pub fn print(&self) -> Result<String, ValidationError> {
        Ok(format!(
            "{}\n{}",
            print_items(&self.items)?,
            self.entry.print()?
        ))
    }
}
