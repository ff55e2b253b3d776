//! A kernel's binding interface: the one list of `@group(0)` slots that the runtime builds its
//! bind group layout from, checked against the WGSL that naga parsed.
//!
//! Two pieces of code used to agree on a kernel's bindings only by convention: the WGSL
//! declared them, the runtime bound [`crate::KernelModule`]'s list, and wgpu derived the
//! pipeline's layout from the globals the entry point *uses*. A binding that the WGSL declared
//! but never read (a generator bug: a fused function calling the wrong loader) was dropped
//! from the derived layout and surfaced as a bind-group count mismatch far from its cause; with
//! an explicit layout it would instead have run and computed a wrong number. So the compiler
//! refuses a module unless every slot of its layout is declared with the same address space
//! and used by the entry point, and every resource the WGSL declares is in the layout.

use std::collections::BTreeMap;

/// What kind of buffer a slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    Storage { read_only: bool },
    Uniform,
}

/// One `@group(0) @binding(n)` of a kernel's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LayoutEntry {
    pub binding: u32,
    pub slot: Slot,
}

/// Checks `module`'s resources against `layout`: the same bindings with the same address
/// spaces, each one used by entry point 0. The error names the first mismatch.
pub(crate) fn check(
    layout: &[LayoutEntry],
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
) -> Result<(), String> {
    let mut want: BTreeMap<u32, Slot> = BTreeMap::new();
    for e in layout {
        if want.insert(e.binding, e.slot).is_some() {
            return Err(format!("binding {} is in the layout twice", e.binding));
        }
    }
    if module.entry_points.len() != 1 {
        return Err(format!(
            "{} entry points, expected one",
            module.entry_points.len()
        ));
    }
    let uses = info.get_entry_point(0);
    let mut seen: BTreeMap<u32, Slot> = BTreeMap::new();
    for (handle, var) in module.global_variables.iter() {
        let Some(rb) = &var.binding else { continue };
        let name = var.name.as_deref().unwrap_or("?");
        let slot = match var.space {
            naga::AddressSpace::Uniform => Slot::Uniform,
            naga::AddressSpace::Storage { access } => Slot::Storage {
                read_only: !access.contains(naga::StorageAccess::STORE),
            },
            other => {
                return Err(format!(
                    "`{name}` (binding {}) is in address space {other:?}",
                    rb.binding
                ));
            }
        };
        if rb.group != 0 {
            return Err(format!("`{name}` is in group {}, not 0", rb.group));
        }
        match want.get(&rb.binding) {
            None => {
                return Err(format!(
                    "`{name}` (binding {}) is declared but not in the kernel's binding list",
                    rb.binding
                ));
            }
            Some(&w) if w != slot => {
                return Err(format!(
                    "`{name}` (binding {}) is declared {slot:?} but bound as {w:?}",
                    rb.binding
                ));
            }
            Some(_) => {}
        }
        if uses[handle].is_empty() {
            return Err(format!(
                "`{name}` (binding {}) is declared and bound but never used by the entry point",
                rb.binding
            ));
        }
        seen.insert(rb.binding, slot);
    }
    if let Some(missing) = want.keys().find(|b| !seen.contains_key(b)) {
        return Err(format!(
            "binding {missing} is in the kernel's binding list but not declared"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(src: &str, layout: &[LayoutEntry]) -> Result<(), String> {
        let module = naga::front::wgsl::parse_str(src).unwrap();
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        )
        .validate(&module)
        .unwrap();
        check(layout, &module, &info)
    }

    const TWO: &str = "
@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) var<uniform> w: array<vec4<f32>, 2>;
@compute @workgroup_size(8)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    y[gid.x] = w[0].x;
}
";
    const Y: LayoutEntry = LayoutEntry {
        binding: 0,
        slot: Slot::Storage { read_only: false },
    };
    const W: LayoutEntry = LayoutEntry {
        binding: 1,
        slot: Slot::Uniform,
    };

    #[test]
    fn a_matching_interface_passes() {
        checked(TWO, &[Y, W]).unwrap();
    }

    #[test]
    fn an_unused_binding_is_refused() {
        let src = TWO.replace("w[0].x", "1.0");
        assert_eq!(
            checked(&src, &[Y, W]).unwrap_err(),
            "`w` (binding 1) is declared and bound but never used by the entry point"
        );
    }

    #[test]
    fn missing_extra_and_mistyped_bindings_are_refused() {
        assert_eq!(
            checked(TWO, &[Y]).unwrap_err(),
            "`w` (binding 1) is declared but not in the kernel's binding list"
        );
        let extra = LayoutEntry {
            binding: 2,
            slot: Slot::Uniform,
        };
        assert_eq!(
            checked(TWO, &[Y, W, extra]).unwrap_err(),
            "binding 2 is in the kernel's binding list but not declared"
        );
        let read_only = LayoutEntry {
            slot: Slot::Storage { read_only: true },
            ..Y
        };
        assert_eq!(
            checked(TWO, &[read_only, W]).unwrap_err(),
            "`y` (binding 0) is declared Storage { read_only: false } but bound as \
             Storage { read_only: true }"
        );
    }
}
