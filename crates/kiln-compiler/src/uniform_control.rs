//! No kernel decides control flow from uniform-buffer values alone.
//!
//! Mesa's lavapipe before 23.1 (Debian 12 ships 22.3, the GPU of CI) has a pass that
//! specialises a shader on the uniform values its branches, loop bounds and stored locals
//! depend on. It records them in a table indexed by binding x 32 instead of x 4, so from the
//! fourth uniform binding on it writes past the table while `vkCreateComputePipelines` runs:
//! the process's heap is corrupted, and the run dies later with `corrupted double-linked list`
//! or a segmentation fault in a driver thread (measured under valgrind; the trigger was the
//! chunk tables, then uniform). The pass looks only at loads from uniform buffers at constant
//! offsets, so kernels keep such values (chunk tables) in read-only storage, and this check
//! refuses a module that does otherwise, so that no schedule brings the crash back.
//!
//! The check is made on naga's IR, before the driver's own optimisations: an `if` condition, a
//! `switch` selector, a loop's `break if`, or a value stored into a function-local variable,
//! that is computed only from constants and uniform loads at constant indices.

use naga::{AddressSpace, Expression, Function, Handle, Module, Statement};

/// Checks every function of `module`; the error names the function and the uniform global.
pub(crate) fn check(module: &Module) -> Result<(), String> {
    let functions = module
        .functions
        .iter()
        .map(|(_, f)| f)
        .chain(module.entry_points.iter().map(|e| &e.function));
    for f in functions {
        let walker = Walker {
            module,
            function: f,
        };
        walker.block(&f.body)?;
    }
    Ok(())
}

struct Walker<'a> {
    module: &'a Module,
    function: &'a Function,
}

impl Walker<'_> {
    fn block(&self, block: &naga::Block) -> Result<(), String> {
        for statement in block.iter() {
            match statement {
                Statement::If {
                    condition,
                    accept,
                    reject,
                } => {
                    self.decides(*condition, "a branch")?;
                    self.block(accept)?;
                    self.block(reject)?;
                }
                Statement::Switch { selector, cases } => {
                    self.decides(*selector, "a switch")?;
                    for case in cases {
                        self.block(&case.body)?;
                    }
                }
                Statement::Loop {
                    body,
                    continuing,
                    break_if,
                } => {
                    if let Some(b) = break_if {
                        self.decides(*b, "a loop's end")?;
                    }
                    self.block(body)?;
                    self.block(continuing)?;
                }
                Statement::Block(b) => self.block(b)?,
                Statement::Store { pointer, value } => {
                    if matches!(
                        self.function.expressions[*pointer],
                        Expression::LocalVariable(_)
                    ) {
                        self.decides(*value, "a local variable")?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Refuses `e` if only constants and uniform loads at constant indices decide it.
    fn decides(&self, e: Handle<Expression>, what: &str) -> Result<(), String> {
        let mut uniform = None;
        if self.uniform_only(e, &mut uniform) {
            if let Some(g) = uniform {
                let var = &self.module.global_variables[g];
                let name = var.name.as_deref().unwrap_or("?");
                let binding = var.binding.as_ref().map_or(0, |b| b.binding);
                let function = self.function.name.as_deref().unwrap_or("?");
                return Err(format!(
                    "{what} in `fn {function}` depends only on the uniform buffer `{name}` \
                     (binding {binding}) at a constant index; lavapipe before Mesa 23.1 \
                     corrupts its heap compiling such a shader, so values that steer a kernel \
                     are read from storage"
                ));
            }
        }
        Ok(())
    }

    /// Whether `e` is computed from constants and constant-index uniform loads only; records
    /// a uniform global it loads in `uniform`.
    fn uniform_only(
        &self,
        e: Handle<Expression>,
        uniform: &mut Option<Handle<naga::GlobalVariable>>,
    ) -> bool {
        let exprs = &self.function.expressions;
        match &exprs[e] {
            Expression::Literal(_) | Expression::Constant(_) | Expression::ZeroValue(_) => true,
            Expression::Splat { value, .. } => self.uniform_only(*value, uniform),
            Expression::Swizzle { vector, .. } => self.uniform_only(*vector, uniform),
            Expression::Compose { components, .. } => {
                components.iter().all(|c| self.uniform_only(*c, uniform))
            }
            Expression::AccessIndex { base, .. } => self.uniform_only(*base, uniform),
            Expression::Access { base, index } => {
                self.uniform_only(*base, uniform) && self.uniform_only(*index, uniform)
            }
            Expression::Unary { expr, .. } | Expression::As { expr, .. } => {
                self.uniform_only(*expr, uniform)
            }
            Expression::Binary { left, right, .. } => {
                self.uniform_only(*left, uniform) && self.uniform_only(*right, uniform)
            }
            Expression::Select {
                condition,
                accept,
                reject,
            } => [condition, accept, reject]
                .iter()
                .all(|x| self.uniform_only(**x, uniform)),
            Expression::Math {
                arg,
                arg1,
                arg2,
                arg3,
                ..
            } => [Some(arg), arg1.as_ref(), arg2.as_ref(), arg3.as_ref()]
                .into_iter()
                .flatten()
                .all(|x| self.uniform_only(*x, uniform)),
            Expression::Load { pointer } => self.uniform_pointer(*pointer, uniform),
            _ => false,
        }
    }

    /// Whether `p` points into a uniform global at constant indices.
    fn uniform_pointer(
        &self,
        p: Handle<Expression>,
        uniform: &mut Option<Handle<naga::GlobalVariable>>,
    ) -> bool {
        let exprs = &self.function.expressions;
        match &exprs[p] {
            Expression::GlobalVariable(g)
                if self.module.global_variables[*g].space == AddressSpace::Uniform =>
            {
                *uniform = Some(*g);
                true
            }
            Expression::AccessIndex { base, .. } => self.uniform_pointer(*base, uniform),
            Expression::Access { base, index } => {
                self.uniform_only(*index, uniform) && self.uniform_pointer(*base, uniform)
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(body: &str, table: &str) -> Result<(), String> {
        let src = format!(
            "@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) {table} chunk: array<vec4<u32>, 2>;
@group(0) @binding(2) var<uniform> w: array<vec4<f32>, 4>;
fn part(gid: vec3<u32>) {{
{body}
}}
@compute @workgroup_size(8)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {{
    part(gid);
}}"
        );
        let module = naga::front::wgsl::parse_str(&src).unwrap();
        check(&module)
    }

    #[test]
    fn uniform_loop_bounds_and_branches_are_refused() {
        let bounds = "    for (var n = chunk[0].z; n < chunk[0].w; n++) { y[n] = 1.0; }";
        let err = checked(bounds, "var<uniform>").unwrap_err();
        assert!(
            err.starts_with(
                "a local variable in `fn part` depends only on the uniform buffer `chunk` \
                 (binding 1) at a constant index; lavapipe before Mesa 23.1"
            ),
            "{err}"
        );
        let branch = "    if (chunk[0].w < 256u) { return; }\n    y[gid.x] = 1.0;";
        assert!(
            checked(branch, "var<uniform>")
                .unwrap_err()
                .starts_with("a branch in `fn part`")
        );
        // The same kernels reading their table from storage pass.
        checked(bounds, "var<storage, read>").unwrap();
        checked(branch, "var<storage, read>").unwrap();
    }

    #[test]
    fn uniform_values_in_arithmetic_and_per_invocation_branches_pass() {
        // Weights from a uniform binding feeding arithmetic, and branches that depend on the
        // invocation, are what the kernels do and what the driver's pass leaves alone.
        let body = "    var acc = 0.0f;
    for (var k = 0u; k < 4u; k++) { acc += w[k].x * f32(gid.x); }
    if (gid.x + chunk[0].x >= chunk[0].y) { return; }
    let v = w[gid.x & 3u].y;
    if (v > 0.0) { y[gid.x] = acc; }";
        checked(body, "var<uniform>").unwrap();
    }
}
