//! An upper bound on the loop iterations one invocation of a kernel runs, read off the module
//! naga parsed.
//!
//! Why: lavapipe (Mesa 22.3's llvmpipe) stops every loop of an invocation once the
//! invocation has run 65,535 loop iterations in all, counting every loop, nested or not, and
//! says nothing: the kernel finishes with partial sums. Measured with one-workgroup kernels:
//! a loop of 70,000 iterations ran 65,535; two loops of 40,000 ran 65,534 together; nested
//! loops of 100 x 1,000 and 1,000 x 100 ran ~65,400 and ~64,250 inner iterations. kiln's
//! classifier head over 5,000 rows (79 rows per invocation, 850 iterations each) and a conv
//! weight gradient summing 256 images of 28x28 per invocation both crossed it and returned
//! wrong numbers without an error. So every kernel's bound is computed here and the code
//! generator keeps it under [`crate::Target::max_loop_iterations`] or refuses the kernel.
//!
//! The bound walks the entry point: a `for` loop (naga: a `Loop` whose body starts with `if
//! (cond) {} else { break; }` and whose continuing block adds a constant to the counter) runs
//! at most `(upper(end) - lower(start)) / step` times, with `upper`/`lower` evaluated over
//! literals, arithmetic, `min`/`max` and `select`; a loop from `chunk[k].z` to `chunk[k].w`
//! (an image chunk's range) runs at most the chunk's images; a call adds the callee's bound
//! times the iterations around it; of an `if` or `switch` the larger branch counts. A loop
//! the walk cannot bound makes the whole bound `None`.
//!
//! The same walk bounds the loads an invocation issues ([`loads`]), by address space: every
//! `Load` of a global the code evaluates, times the loops around it. On lavapipe each
//! storage or workgroup load is a loop over the SIMD lanes and a uniform load one gather, so
//! these counts, not bytes, are what a kernel's time there follows; the profiler reports
//! them beside its GFLOP/s and GB/s.

use naga::{
    AddressSpace, BinaryOperator, Block, Expression, Function, Handle, Literal, LocalVariable,
    MathFunction, Module, Statement,
};

/// The most loop iterations one invocation of `module`'s entry point can run, or `None` when
/// a loop's trip count cannot be bounded. `chunk_images` bounds loops over a chunk's image
/// range (`chunk[k].z .. chunk[k].w`).
#[cfg(test)]
pub(crate) fn loop_iterations(module: &Module, chunk_images: Option<u64>) -> Option<u64> {
    bounds(module, chunk_images).map(|(iterations, _)| iterations)
}

/// The most loads of globals one invocation of `module`'s entry point issues, by address
/// space (a `vec4` load counts once), or `None` where a loop cannot be bounded.
pub(crate) fn loads(module: &Module, chunk_images: Option<u64>) -> Option<Loads> {
    bounds(module, chunk_images).map(|(_, loads)| loads)
}

/// Both bounds of one invocation from one walk: its loop iterations and its loads.
pub(crate) fn bounds(module: &Module, chunk_images: Option<u64>) -> Option<(u64, Loads)> {
    cost(module, chunk_images).map(|c| (c.iterations, c.loads))
}

fn cost(module: &Module, chunk_images: Option<u64>) -> Option<Cost> {
    let entry = module.entry_points.first()?;
    let mut walk = Walk {
        module,
        chunk_images,
        memo: Vec::new(),
    };
    walk.function(&entry.function)
}

/// Loads of globals, by address space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loads {
    pub storage: u64,
    pub uniform: u64,
    pub workgroup: u64,
}

impl Loads {
    fn add(self, o: Loads) -> Loads {
        Loads {
            storage: self.storage.saturating_add(o.storage),
            uniform: self.uniform.saturating_add(o.uniform),
            workgroup: self.workgroup.saturating_add(o.workgroup),
        }
    }

    fn max(self, o: Loads) -> Loads {
        Loads {
            storage: self.storage.max(o.storage),
            uniform: self.uniform.max(o.uniform),
            workgroup: self.workgroup.max(o.workgroup),
        }
    }

    /// `n` times as many.
    pub fn times(self, n: u64) -> Loads {
        Loads {
            storage: self.storage.saturating_mul(n),
            uniform: self.uniform.saturating_mul(n),
            workgroup: self.workgroup.saturating_mul(n),
        }
    }
}

/// What one run of some code costs at most: loop iterations and loads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Cost {
    iterations: u64,
    loads: Loads,
}

impl Cost {
    fn add(self, o: Cost) -> Cost {
        Cost {
            iterations: self.iterations.saturating_add(o.iterations),
            loads: self.loads.add(o.loads),
        }
    }

    /// The larger of two branches, each count on its own.
    fn max(self, o: Cost) -> Cost {
        Cost {
            iterations: self.iterations.max(o.iterations),
            loads: self.loads.max(o.loads),
        }
    }
}

struct Walk<'a> {
    module: &'a Module,
    chunk_images: Option<u64>,
    memo: Vec<(Handle<Function>, Option<Cost>)>,
}

impl Walk<'_> {
    fn function(&mut self, f: &Function) -> Option<Cost> {
        self.block(f, &f.body)
    }

    fn callee(&mut self, h: Handle<Function>) -> Option<Cost> {
        if let Some((_, v)) = self.memo.iter().find(|(k, _)| *k == h) {
            return *v;
        }
        let f = &self.module.functions[h];
        let v = self.function(f);
        self.memo.push((h, v));
        v
    }

    /// What one run of `block` costs.
    fn block(&mut self, f: &Function, block: &Block) -> Option<Cost> {
        let mut total = Cost::default();
        for (k, s) in block.iter().enumerate() {
            let cost = match s {
                Statement::Emit(range) => Cost {
                    iterations: 0,
                    loads: range
                        .clone()
                        .fold(Loads::default(), |l, e| l.add(self.load(f, e))),
                },
                Statement::Loop {
                    body, continuing, ..
                } => {
                    let trips = self.trips(f, &block[..k], body, continuing)?;
                    let per = self.block(f, body)?.add(self.block(f, continuing)?);
                    Cost {
                        iterations: trips.saturating_mul(per.iterations.saturating_add(1)),
                        loads: per.loads.times(trips),
                    }
                }
                Statement::Block(b) => self.block(f, b)?,
                Statement::If { accept, reject, .. } => {
                    self.block(f, accept)?.max(self.block(f, reject)?)
                }
                Statement::Switch { cases, .. } => {
                    let mut most = Cost::default();
                    for c in cases {
                        most = most.max(self.block(f, &c.body)?);
                    }
                    most
                }
                Statement::Call { function, .. } => self.callee(*function)?,
                _ => Cost::default(),
            };
            total = total.add(cost);
        }
        Some(total)
    }

    /// One load of a global if `e` is one, by the global's address space.
    fn load(&self, f: &Function, e: Handle<Expression>) -> Loads {
        let Expression::Load { pointer } = f.expressions[e] else {
            return Loads::default();
        };
        let mut at = pointer;
        let global = loop {
            match f.expressions[at] {
                Expression::Access { base, .. } | Expression::AccessIndex { base, .. } => at = base,
                Expression::GlobalVariable(g) => break g,
                _ => return Loads::default(),
            }
        };
        let one = Loads::default();
        match self.module.global_variables[global].space {
            AddressSpace::Storage { .. } => Loads { storage: 1, ..one },
            AddressSpace::Uniform => Loads { uniform: 1, ..one },
            AddressSpace::WorkGroup => Loads {
                workgroup: 1,
                ..one
            },
            _ => one,
        }
    }

    /// The trip count of a `for` loop whose statements before it in its block are `before`.
    fn trips(
        &self,
        f: &Function,
        before: &[Statement],
        body: &Block,
        continuing: &Block,
    ) -> Option<u64> {
        let exprs = &f.expressions;
        // The loop's condition: the first statement that is not an `Emit`.
        let cond = body.iter().find(|s| !matches!(s, Statement::Emit(_)))?;
        let Statement::If {
            condition,
            accept,
            reject,
        } = cond
        else {
            return None;
        };
        if !accept.is_empty() || !matches!(reject.first(), Some(Statement::Break)) {
            return None;
        }
        let Expression::Binary { op, left, right } = exprs[*condition] else {
            return None;
        };
        let counter = loaded_local(exprs, left)?;
        let stored = |s: &Statement| match s {
            Statement::Store { pointer, value } if matches!(exprs[*pointer], Expression::LocalVariable(v) if v == counter) => {
                Some(*value)
            }
            _ => None,
        };
        // The start: the last store to the counter before the loop, or its initialiser.
        let start = before
            .iter()
            .rev()
            .find_map(stored)
            .or(f.local_variables[counter].init);
        // The least `k` of the continuing block's `counter = counter <op> k`.
        let update = |want: BinaryOperator| {
            continuing
                .iter()
                .find_map(stored)
                .and_then(|v| match exprs[v] {
                    Expression::Binary { op, left, right }
                        if op == want && loaded_local(exprs, left) == Some(counter) =>
                    {
                        Some(self.interval(f, right).0)
                    }
                    _ => None,
                })
        };
        let inclusive = match op {
            BinaryOperator::Less => 0,
            BinaryOperator::LessEqual => 1,
            // A halving loop (the workgroup tree sum): `while (s > 0) { s = s / d; }`.
            BinaryOperator::Greater if self.interval(f, right) == (0, 0) => {
                let divisor = update(BinaryOperator::Divide)?;
                let (_, mut hi) = self.interval(f, start?);
                if divisor < 2 || hi == u64::MAX {
                    return None;
                }
                let mut trips = 0;
                while hi > 0 {
                    hi /= divisor;
                    trips += 1;
                }
                return Some(trips);
            }
            _ => return None,
        };
        // The step: `counter = counter + step` in the continuing block.
        let step = update(BinaryOperator::Add)?;
        if step == 0 {
            return None;
        }
        if let (Some(images), Some(start)) = (self.chunk_images, start) {
            if chunk_range(self.module, exprs, start, right) {
                return Some(images);
            }
        }
        let lo = start.map_or(0, |s| self.interval(f, s).0);
        let (_, hi) = self.interval(f, right);
        if hi == u64::MAX {
            return None;
        }
        Some((hi + inclusive).saturating_sub(lo).div_ceil(step))
    }

    /// `(lower, upper)` bounds of a u32 expression; an unknown side is 0 or `u64::MAX`.
    fn interval(&self, f: &Function, e: Handle<Expression>) -> (u64, u64) {
        const ANY: (u64, u64) = (0, u64::MAX);
        let exact = |v: u64| (v, v);
        let exprs = &f.expressions;
        match exprs[e] {
            Expression::Literal(l) => match l {
                Literal::U32(v) => exact(v.into()),
                Literal::I32(v) => u64::try_from(v).map_or(ANY, exact),
                Literal::AbstractInt(v) => u64::try_from(v).map_or(ANY, exact),
                _ => ANY,
            },
            Expression::Constant(c) => {
                match self.module.global_expressions[self.module.constants[c].init] {
                    Expression::Literal(Literal::U32(v)) => exact(v.into()),
                    Expression::Literal(Literal::I32(v)) => u64::try_from(v).map_or(ANY, exact),
                    _ => ANY,
                }
            }
            Expression::Binary { op, left, right } => {
                let ((a0, a1), (b0, b1)) = (self.interval(f, left), self.interval(f, right));
                match op {
                    BinaryOperator::Add => (a0.saturating_add(b0), a1.saturating_add(b1)),
                    BinaryOperator::Subtract => (a0.saturating_sub(b1), a1.saturating_sub(b0)),
                    BinaryOperator::Multiply => (a0.saturating_mul(b0), a1.saturating_mul(b1)),
                    BinaryOperator::Divide if b0 > 0 => (a0 / b1.max(1), a1 / b0),
                    BinaryOperator::Modulo if b1 > 0 && b1 < u64::MAX => (0, a1.min(b1 - 1)),
                    BinaryOperator::ShiftRight if b0 == b1 && b0 < 64 => (a0 >> b0, a1 >> b0),
                    BinaryOperator::And => (0, a1.min(b1)),
                    _ => ANY,
                }
            }
            Expression::Math {
                fun,
                arg,
                arg1: Some(arg1),
                ..
            } => {
                let ((a0, a1), (b0, b1)) = (self.interval(f, arg), self.interval(f, arg1));
                match fun {
                    MathFunction::Min => (a0.min(b0), a1.min(b1)),
                    MathFunction::Max => (a0.max(b0), a1.max(b1)),
                    _ => ANY,
                }
            }
            Expression::Select { accept, reject, .. } => {
                let ((a0, a1), (b0, b1)) = (self.interval(f, accept), self.interval(f, reject));
                (a0.min(b0), a1.max(b1))
            }
            Expression::As { expr, .. } => self.interval(f, expr),
            _ => ANY,
        }
    }
}

/// The local variable `e` loads, if it is such a load.
fn loaded_local(
    exprs: &naga::Arena<Expression>,
    e: Handle<Expression>,
) -> Option<Handle<LocalVariable>> {
    match exprs[e] {
        Expression::Load { pointer } => match exprs[pointer] {
            Expression::LocalVariable(v) => Some(v),
            _ => None,
        },
        _ => None,
    }
}

/// Whether `start` and `end` load components `.z` and `.w` of the same entry of a chunk
/// table (a global named `chunk...`).
fn chunk_range(
    module: &Module,
    exprs: &naga::Arena<Expression>,
    start: Handle<Expression>,
    end: Handle<Expression>,
) -> bool {
    // `chunk[k].z` is `Load(AccessIndex(AccessIndex(Global, k), 2))` (or `Access` for k).
    let parts = |e: Handle<Expression>| -> Option<(Handle<naga::GlobalVariable>, u32, u32)> {
        let Expression::Load { pointer } = exprs[e] else {
            return None;
        };
        let Expression::AccessIndex { base, index: lane } = exprs[pointer] else {
            return None;
        };
        let (base, entry) = match exprs[base] {
            Expression::AccessIndex { base, index } => (base, index),
            _ => return None,
        };
        let Expression::GlobalVariable(g) = exprs[base] else {
            return None;
        };
        let named = module.global_variables[g]
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with("chunk"));
        named.then_some((g, entry, lane))
    };
    match (parts(start), parts(end)) {
        (Some((g0, e0, 2)), Some((g1, e1, 3))) => g0 == g1 && e0 == e1,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(body: &str, chunk_images: Option<u64>) -> Option<u64> {
        loop_iterations(&module(body), chunk_images)
    }

    fn module(body: &str) -> Module {
        let src = format!(
            "@group(0) @binding(0) var<storage, read_write> y: array<f32>;
@group(0) @binding(1) var<storage, read> chunk: array<vec4<u32>, 1>;
fn sum(n: u32) -> f32 {{
    var acc = 0.0f;
    for (var k = 0u; k < 10u; k++) {{ acc += f32(k + n); }}
    return acc;
}}
@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32) {{
    var c = 0.0f;
{body}
    y[lid] = c;
}}"
        );
        naga::front::wgsl::parse_str(&src).unwrap()
    }

    #[test]
    fn loads_count_each_global_read_times_the_loops_around_it_by_space() {
        let loads = |body: &str| super::loads(&module(body), Some(3)).unwrap();
        // Each read is a load, two components of one `vec4` two.
        assert_eq!(
            loads("    c = f32(chunk[0].x + chunk[0].y) + y[1];"),
            Loads {
                storage: 3,
                ..Default::default()
            }
        );
        assert_eq!(
            loads("    for (var p = 0u; p < 10u; p++) { c += y[p] * y[p + 1u]; }").storage,
            20
        );
        // Only the larger branch of an `if` counts. The chunk's images bound its loop, whose
        // condition loads the chunk's end on every trip (and its start once).
        assert_eq!(
            loads("    if (lid > 3u) { c = y[0] + y[1]; } else { c = y[2]; }").storage,
            2
        );
        assert_eq!(
            loads("    for (var r = chunk[0].z; r < chunk[0].w; r++) { c += y[r]; }").storage,
            1 + 3 * 2
        );
        let src = "@group(0) @binding(0) var<uniform> u: array<vec4<f32>, 4>;
var<workgroup> w: array<f32, 64>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
fn part(i: u32) -> f32 { return u[i >> 2u][i & 3u]; }
@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32) {
    var c = 0.0f;
    for (var k = 0u; k < 4u; k++) { c += part(k) + w[k]; }
    y[lid] = c;
}";
        let m = naga::front::wgsl::parse_str(src).unwrap();
        assert_eq!(
            super::loads(&m, None),
            Some(Loads {
                storage: 0,
                uniform: 4,
                workgroup: 4
            })
        );
    }

    #[test]
    fn straight_line_code_runs_no_iterations() {
        assert_eq!(bound("    c = 1.0;", None), Some(0));
    }

    #[test]
    fn constant_loops_count_every_iteration_and_nest_by_multiplying() {
        assert_eq!(
            bound("    for (var p = 0u; p < 70000u; p++) { c += 1.0; }", None),
            Some(70000)
        );
        assert_eq!(
            bound(
                "    for (var p = 3u; p <= 10u; p += 2u) { c += 1.0; }",
                None
            ),
            Some(4)
        );
        assert_eq!(
            bound(
                "    for (var q = 0u; q < 100u; q++) { for (var p = 0u; p < 1000u; p++) { c += 1.0; } }",
                None
            ),
            Some(100 * 1001)
        );
        assert_eq!(
            bound(
                "    for (var p = 0u; p < 5u; p++) { c += 1.0; }\n    for (var p = 0u; p < 7u; p++) { c += 1.0; }",
                None
            ),
            Some(12)
        );
    }

    #[test]
    fn calls_cost_their_loops_times_the_loops_around_them() {
        assert_eq!(
            bound(
                "    for (var r = lid; r < 640u; r += 64u) { c += sum(r); }",
                None
            ),
            Some(10 * 11)
        );
    }

    #[test]
    fn bounds_follow_min_and_max_and_chunk_ranges() {
        assert_eq!(
            bound(
                "    let lo = max(i32(lid) - 2, 0);\n    let hi = min(lid + 3u, 28u);\n    for (var p = u32(lo); p < hi; p++) { c += 1.0; }",
                None
            ),
            Some(28)
        );
        let chunk = "    for (var r = chunk[0].z; r < chunk[0].w; r++) { c += 1.0; }";
        assert_eq!(bound(chunk, Some(20)), Some(20));
        assert_eq!(bound(chunk, None), None);
    }

    #[test]
    fn halving_loops_take_a_logarithm() {
        assert_eq!(
            bound(
                "    for (var s = 64u / 2u; s > 0u; s = s / 2u) { c += 1.0; }",
                None
            ),
            Some(6)
        );
    }

    #[test]
    fn unbounded_loops_are_unknown() {
        assert_eq!(
            bound(
                "    for (var p = 0u; p < u32(y[0]); p++) { c += 1.0; }",
                None
            ),
            None
        );
        assert_eq!(
            bound("    loop { c += 1.0; if (c > 3.0) { break; } }", None),
            None
        );
    }
}
