//! Schedule choice, the second stage of a kernel's generation: which recipe a kernel's loop
//! nest takes, as a value. A map kernel tries the rules of [`RULES`] in order, each serving
//! some device classes and deciding from the kernel's op pattern, its shapes and its
//! bindings (`bind.rs`); the first that applies is its [`Schedule`]. The classifier head has
//! a recipe of its own. `lower.rs` builds each recipe's kernel IR, and the module header
//! describes the choice ([`Schedule::describe`]).
//!
//! The order is the precedence the recipes were measured in on lavapipe: the CPU-class
//! convolutions (`conv_quads.rs`) beat register blocking wherever they apply, whole-row
//! weight gradients beat it too, and single-channel kernel columns only replace blocking
//! where it found nothing to block.

use kiln_ir::{DType, Graph, NodeId};

use crate::bind::KernelBindings;
use crate::blocking::{self, Blocking, LANES, LaneFns, Rows, SplitOf};
use crate::chunks;
use crate::conv_quads::{self, ConvQuads};
use crate::nest::{Held, Nest, Split};
use crate::plan::{Kernel, KernelKind, Plan};
use crate::target::{DeviceClass, Target};
use crate::text::{UniformAt, strides};

/// What the rules decide from: the kernel, its target and its bindings (with the views of
/// them that the lane functions address buffers through).
pub(crate) struct Context<'a> {
    pub graph: &'a Graph,
    pub plan: &'a Plan,
    pub kernel: &'a Kernel,
    pub target: &'a Target,
    pub bound: &'a KernelBindings,
    pub binding_of: &'a dyn Fn(usize) -> u32,
    pub uniform_at: UniformAt<'a>,
    pub split_of: SplitOf<'a>,
}

/// A stride-1 convolution weight gradient summed over the batch: `kw` kernel columns of
/// `channels` output channels per invocation, sliding along the input rows.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Columns {
    /// The root the columns reach (elementwise).
    pub main: NodeId,
    /// The `conv2d_grad_weight`.
    pub reduction: NodeId,
    pub kw: usize,
    /// Output channels per invocation; above one, in whole rows (`conv_quads.rs`).
    pub channels: usize,
    /// The buffers of the input and the output gradient where both are read straight from
    /// uniform bindings on a CPU-class target.
    pub operands: Option<(usize, usize)>,
    /// Four output columns a step, as `vec4` loads of both operands' rows.
    pub vec4: bool,
}

/// Register blocking of a map kernel's main root (`blocking.rs`).
pub(crate) struct Blocked<'a> {
    pub main: NodeId,
    pub blocking: Blocking,
    /// The lane (or rows) functions the blocking made.
    pub fns: LaneFns<'a>,
    /// A second blocked axis: the rows and the name of their function.
    pub rows: Option<(Rows, String)>,
}

/// The loop nest a kernel takes.
pub(crate) enum Recipe<'a> {
    /// Direct convolutions over `vec4`s of pixel rows (`conv_quads.rs`): every value loaded
    /// and stored by the entry point itself.
    ConvQuads(ConvQuads),
    Columns(Columns),
    Blocked(Box<Blocked<'a>>),
    /// One invocation per element of the largest root.
    Elements,
    /// The classifier head: one workgroup looping over the rows.
    Head,
}

/// A kernel's schedule: its recipe and what the recipe decides about stores and sums.
pub(crate) struct Schedule<'a> {
    pub recipe: Recipe<'a>,
    /// The name of the rule that chose the recipe.
    pub rule: &'static str,
    /// Buffers stored a `vec4` at a time (declared `array<vec4<f32>>`).
    pub vec4_out: Vec<usize>,
    /// The running sum carried a `vec4` at a time.
    pub quad_sum: Option<NodeId>,
    /// Whether the register blocking shares loads between outputs (blocks a reduction).
    pub shares_loads: bool,
    /// The loop nest the entry point enumerates and the recipe's splits of it; `None` for
    /// the classifier head, whose one workgroup loops over the rows.
    pub nest: Option<Nest>,
}

/// One recipe's rule: the device classes it serves and whether (and how) it applies to a
/// map kernel's roots.
pub(crate) struct Rule {
    pub name: &'static str,
    pub classes: &'static [DeviceClass],
    /// The recipes the rule gives the kernel: none where it does not apply, else its
    /// choice, then alternatives it holds as good (for the module's loads to decide).
    applies: for<'a> fn(&Context<'a>, &[NodeId]) -> Vec<Recipe<'a>>,
}

const ALL: &[DeviceClass] = &[
    DeviceClass::Cpu,
    DeviceClass::IntegratedGpu,
    DeviceClass::DiscreteGpu,
    DeviceClass::Other,
];

/// The recipes of map kernels, in precedence order; the last always applies.
pub(crate) const RULES: &[Rule] = &[
    Rule {
        name: "conv quads",
        classes: &[DeviceClass::Cpu],
        applies: conv_quads,
    },
    Rule {
        name: "weight-gradient rows",
        classes: &[DeviceClass::Cpu],
        applies: weight_rows,
    },
    Rule {
        name: "register blocking",
        classes: ALL,
        applies: blocked,
    },
    Rule {
        name: "kernel columns",
        classes: ALL,
        applies: kernel_columns,
    },
    Rule {
        name: "elements",
        classes: ALL,
        applies: |_, _| vec![Recipe::Elements],
    },
];

/// The recipes map kernels may take on `class`, in the order they are tried: the names the
/// module header's `// recipe:` line gives.
pub fn recipes(class: DeviceClass) -> Vec<&'static str> {
    RULES
        .iter()
        .filter(|r| r.classes.contains(&class))
        .map(|r| r.name)
        .collect()
}

/// A map kernel's main root: its largest (the first of those), which decides its schedule.
pub(crate) fn main_root(graph: &Graph, roots: &[NodeId]) -> NodeId {
    *roots
        .iter()
        .max_by_key(|r| (graph.ty(**r).numel(), std::cmp::Reverse(r.0)))
        .expect("map kernels have a root")
}

/// A small stride-1 convolution whose input is a uniform binding (whole or a window), when
/// the values it stores as `vec4`s are not read here.
fn conv_quads<'a>(cx: &Context<'a>, roots: &[NodeId]) -> Vec<Recipe<'a>> {
    let (graph, plan, kernel) = (cx.graph, cx.plan, cx.kernel);
    if !cx.target.block_outputs || !cx.bound.sums.is_empty() {
        return Vec::new();
    }
    let main = main_root(graph, roots);
    let uniform_of = |id: NodeId| plan.buffer_of[id.0].and_then(cx.uniform_at);
    conv_quads::find(graph, kernel, roots, main, &uniform_of)
        .filter(|q| {
            q.quads_out.iter().all(|m| {
                let buffer = plan.buffer_of[m.0];
                !kernel.reads.iter().any(|n| plan.buffer_of[n.0] == buffer)
            })
        })
        .map(Recipe::ConvQuads)
        .into_iter()
        .collect()
}

/// The buffer of `id` where the kernel reads it straight from a uniform binding.
fn direct(cx: &Context, id: NodeId) -> Option<usize> {
    if !cx.kernel.reads.contains(&id) || cx.kernel.nodes.contains(&id) {
        return None;
    }
    let buffer = cx.plan.buffer_of[id.0]?;
    (cx.uniform_at)(buffer).map(|_| buffer)
}

/// A summing kernel whose main root is (elementwise) a stride-1 conv weight gradient: the
/// kernel columns of one `(o, c, ky)` per invocation, or, on a CPU-class target reading both
/// operands straight from uniform bindings where the rows allow, of several output channels
/// in whole rows.
fn columns(cx: &Context, roots: &[NodeId]) -> Option<Columns> {
    let graph = cx.graph;
    if !cx.target.block_outputs || cx.bound.batch.is_none() {
        return None;
    }
    let main = main_root(graph, roots);
    let &(red, _) = cx.bound.sums.iter().find(|(_, r)| *r == main)?;
    let kw = chunks::kernel_columns(graph, red)?;
    let ins = &graph.node(red).inputs;
    let operands = match (direct(cx, ins[0]), direct(cx, ins[1])) {
        (Some(x), Some(dy)) if cx.target.class == DeviceClass::Cpu => Some((x, dy)),
        _ => None,
    };
    if graph.ty(main).numel() != graph.ty(red).numel() {
        return None;
    }
    let rows = operands.and_then(|_| conv_quads::weight_rows_channels(graph, red));
    let channels = rows.into_iter().chain([1]).find(|&channels| {
        let per = graph.ty(main).numel() / (kw * channels);
        roots
            .iter()
            .all(|r| *r == main || graph.ty(*r).numel() <= per)
    })?;
    Some(Columns {
        main,
        reduction: red,
        kw,
        channels,
        operands,
        vec4: channels == 1 && operands.is_some() && chunks::columns_in_vec4s(graph, red),
    })
}

/// Kernel columns of several output channels in whole rows (`conv_quads::weight_rows_fn`).
fn weight_rows<'a>(cx: &Context<'a>, roots: &[NodeId]) -> Vec<Recipe<'a>> {
    columns(cx, roots)
        .filter(|c| c.channels > 1)
        .map(Recipe::Columns)
        .into_iter()
        .collect()
}

/// Kernel columns of one output channel (`chunks::kernel_columns_fn`).
fn kernel_columns<'a>(cx: &Context<'a>, roots: &[NodeId]) -> Vec<Recipe<'a>> {
    columns(cx, roots)
        .filter(|c| c.channels == 1)
        .map(Recipe::Columns)
        .into_iter()
        .collect()
}

/// Register blocking: the largest root, four elements per invocation, when that gives a
/// reduction a blocked rule and the other roots fit in the fewer invocations; rows too
/// where they still fit. Every blocking that gives as much blocked work is a recipe, the
/// preferred first (`blocking::choose`).
fn blocked<'a>(cx: &Context<'a>, roots: &[NodeId]) -> Vec<Recipe<'a>> {
    let graph = cx.graph;
    if !cx.target.block_outputs {
        return Vec::new();
    }
    let main = main_root(graph, roots);
    let quads = graph.ty(main).numel() / LANES;
    if !roots
        .iter()
        .all(|r| *r == main || graph.ty(*r).numel() <= quads)
    {
        return Vec::new();
    }
    let cpu = cx.target.class == DeviceClass::Cpu;
    let summed = cx.bound.summed();
    let (plan, kernel, binding_of, uniform_at, split_of) = (
        cx.plan,
        cx.kernel,
        cx.binding_of,
        cx.uniform_at,
        cx.split_of,
    );
    let fresh = || {
        let mut fns = LaneFns::new(graph, plan, kernel, binding_of, uniform_at, split_of);
        fns.chunked = summed.clone();
        fns.inner_rows = cpu;
        fns.max_image_rows = window_images(cx);
        fns
    };
    blocking::choose(&fresh, main, cpu)
        .into_iter()
        .map(|(blocking, fns)| blocked_recipe(cx, roots, main, (blocking, fns), &fresh))
        .collect()
}

/// The most images a chunk's uniform windows hold (no limit for a kernel without them, or
/// one summing over the batch, whose invocations each take one image of the chunk).
fn window_images(cx: &Context) -> usize {
    let Some(n) = cx.bound.batch.filter(|_| cx.bound.sums.is_empty()) else {
        return usize::MAX;
    };
    let align = cx.target.uniform_offset_alignment();
    let max = cx.target.max_uniform_buffer_binding_size;
    let words: Vec<usize> = cx
        .bound
        .windowed
        .iter()
        .map(|&b| cx.plan.buffers[b].ty.numel() / n)
        .collect();
    (1..=n)
        .take_while(|&m| {
            words
                .iter()
                .all(|&w| chunks::window_vec4s(m, w, align) as u64 * 16 <= max)
        })
        .last()
        .unwrap_or(0)
}

/// The recipe of one blocking of `main`.
fn blocked_recipe<'a>(
    cx: &Context<'a>,
    roots: &[NodeId],
    main: NodeId,
    (blocking, fns): (Blocking, LaneFns<'a>),
    fresh: &dyn Fn() -> LaneFns<'a>,
) -> Recipe<'a> {
    let graph = cx.graph;
    let rows = fns.rows_for(main, blocking.stride).filter(|r| {
        let n = graph.ty(main).numel() / (LANES * r.accumulators());
        roots
            .iter()
            .all(|x| *x == main || graph.ty(*x).numel() <= n)
    });
    Recipe::Blocked(Box::new(match rows {
        // The rows functions replace the lane functions of the choice: start from none, so
        // the module carries no unused ones.
        Some(r) => {
            let mut rows_fns = fresh();
            rows_fns.quarter = blocking.quarter;
            match rows_fns.rows_fn(main, blocking.stride, r) {
                Some(name) => Blocked {
                    main,
                    blocking,
                    fns: rows_fns,
                    rows: Some((r, name)),
                },
                // The reduction's definition cannot be held along the rows.
                None => Blocked {
                    main,
                    blocking,
                    fns,
                    rows: None,
                },
            }
        }
        None => Blocked {
            main,
            blocking,
            fns,
            rows: None,
        },
    }))
}

/// The schedules `cx.kernel` may take: the first applicable rule's recipes, its choice
/// first.
pub(crate) fn choose_schedules<'a>(cx: &Context<'a>) -> Vec<Schedule<'a>> {
    let roots = match &cx.kernel.kind {
        KernelKind::Head(_) => {
            return vec![Schedule {
                recipe: Recipe::Head,
                rule: "classifier head",
                vec4_out: Vec::new(),
                quad_sum: None,
                shares_loads: false,
                nest: None,
            }];
        }
        KernelKind::Map { roots } => roots,
    };
    let (rule, recipes) = RULES
        .iter()
        .filter(|r| r.classes.contains(&cx.target.class))
        .map(|r| (r.name, (r.applies)(cx, roots)))
        .find(|(_, recipes)| !recipes.is_empty())
        .expect("one invocation per element always applies");
    recipes
        .into_iter()
        .map(|recipe| schedule_of(cx, roots, rule, recipe))
        .collect()
}

/// `recipe`'s schedule, with what it decides about stores and sums.
fn schedule_of<'a>(
    cx: &Context<'a>,
    roots: &[NodeId],
    rule: &'static str,
    recipe: Recipe<'a>,
) -> Schedule<'a> {
    let (graph, plan, kernel) = (cx.graph, cx.plan, cx.kernel);
    let sums = &cx.bound.sums;
    // On CPU-class targets, lanes that are four consecutive elements at offsets in fours
    // (from the invocation's first element, for every row) can be stored and carried a vec4
    // at a time.
    let lanes_in_quads = match &recipe {
        Recipe::Blocked(b) if cx.target.class == DeviceClass::Cpu && b.blocking.stride == 1 => {
            b.rows.as_ref().is_none_or(|(r, _)| {
                r.offsets(&strides(&graph.ty(r.top()).shape))
                    .iter()
                    .all(|o| o % LANES == 0)
            })
        }
        _ => false,
    };
    // Such a main root is stored a vec4 at a time (lavapipe: 1.3 G floats/s against 0.4-0.5
    // for scalar stores), its binding declared as vec4s; only when the kernel writes that
    // buffer nowhere else and reads it not at all (a parameter updated in place is read too).
    let vec4_out: Vec<usize> = match &recipe {
        Recipe::Blocked(b) if lanes_in_quads && sums.is_empty() => {
            let buffer = plan.buffer_of[b.main.0];
            let read_here = kernel.reads.iter().any(|n| plan.buffer_of[n.0] == buffer);
            let f32_out = graph.ty(b.main).dtype == DType::F32;
            buffer
                .filter(|_| !read_here && f32_out)
                .into_iter()
                .collect()
        }
        Recipe::ConvQuads(q) => q
            .quads_out
            .iter()
            .map(|m| plan.buffer_of[m.0].expect("stored nodes have buffers"))
            .collect(),
        _ => Vec::new(),
    };
    // The running sum of a blocked rows kernel with such lanes is carried a vec4 at a time
    // (fc1's weight gradient: 48,000 sums loaded and stored by each of its 7 chunks; its
    // kernel 6.6-8.4 -> 5.8-6.6 ms per step, `--profile`, five alternating runs).
    let quad_sum = match &recipe {
        Recipe::Blocked(b) if lanes_in_quads => b
            .rows
            .as_ref()
            .filter(|(r, _)| r.pool.is_none())
            .and_then(|(r, _)| {
                sums.iter()
                    .find(|(red, root)| *root == b.main && *red == r.reduction)
            })
            .map(|(red, _)| *red),
        _ => None,
    };
    let shares_loads = match &recipe {
        Recipe::Blocked(b) => b.fns.shares_loads || b.rows.is_some(),
        _ => false,
    };
    let nest = nest_of(graph, &recipe, roots);
    Schedule {
        recipe,
        rule,
        vec4_out,
        quad_sum,
        shares_loads,
        nest,
    }
}

/// The loop nest `recipe` enumerates and its splits.
fn nest_of(graph: &Graph, recipe: &Recipe, roots: &[NodeId]) -> Option<Nest> {
    match recipe {
        Recipe::ConvQuads(q) => Some(q.nest(graph)),
        Recipe::Head => None,
        // Every root, one element per invocation of the largest.
        Recipe::Elements => {
            let numel = roots.iter().map(|r| graph.ty(*r).numel()).max();
            Some(Nest::elements(&[numel.expect("map kernels have a root")]))
        }
        // The weight gradient's [O, C, KH, KW]: every kernel column, and output channels as
        // rows.
        Recipe::Columns(c) => {
            let shape = graph.ty(c.reduction).shape.clone();
            let mut splits = Vec::new();
            if c.channels > 1 {
                splits.push(Split::block(0, c.channels, Held::Rows));
            }
            splits.push(Split::block(3, c.kw, Held::Columns));
            Some(Nest::new(shape, splits))
        }
        Recipe::Blocked(b) => Some(match &b.rows {
            // The rows' node: its rows, inner rows and lanes.
            Some((r, _)) => {
                let mut splits = vec![Split::block(r.row_axis, r.count, Held::Rows)];
                if r.inner > 1 {
                    splits.push(Split::block(r.inner_axis, r.inner, Held::Inner));
                }
                splits.push(if r.lane_gap > 1 {
                    Split::parts(r.lane_axis, LANES, Held::Lanes)
                } else {
                    Split::block(r.lane_axis, LANES, Held::Lanes)
                });
                Nest::new(graph.ty(r.top()).shape.clone(), splits)
            }
            // The main root's flat index around the blocked axis (which may be an axis of
            // the value it flattens): [outer, axis, inner].
            None => {
                let k = &b.blocking;
                let numel = graph.ty(b.main).numel();
                let lanes = if k.quarter {
                    Split::parts(1, LANES, Held::Lanes)
                } else {
                    Split::block(1, LANES, Held::Lanes)
                };
                Nest::new(vec![numel / k.span(), k.extent, k.base()], vec![lanes])
            }
        }),
    }
}

impl Schedule<'_> {
    /// Invocations of a map kernel whose largest root has `numel` elements, and the
    /// schedule's line of the module header (`root` names the roots).
    pub fn describe(&self, graph: &Graph, numel: u32, root: &str) -> (u32, String) {
        // The nest's grid, where the recipe has one.
        let n = self.nest.as_ref().map_or(numel, |nest| {
            let inv = nest.invocations().expect("the recipes make valid nests");
            inv.count() as u32
        });
        match &self.recipe {
            Recipe::ConvQuads(q) => (q.invocations(graph) as u32, q.describe(graph)),
            Recipe::Columns(c) if c.channels > 1 => (
                n,
                format!(
                    "{} kernel columns x {} output channels of {} per invocation, in whole rows (vec4 rows of the input and dy, each pixel serving {} multiply-adds; {n} invocations; {} conv2d_grad_weight)",
                    c.kw,
                    c.channels,
                    c.main,
                    c.kw * c.channels,
                    c.reduction
                ),
            ),
            Recipe::Columns(c) => (
                n,
                format!(
                    "{} kernel columns of {} per invocation, sliding along the input rows{} ({n} invocations; {} conv2d_grad_weight)",
                    c.kw,
                    c.main,
                    if c.vec4 {
                        " four output columns a step (vec4 loads)"
                    } else {
                        ""
                    },
                    c.reduction
                ),
            ),
            Recipe::Blocked(b) => {
                let per = LANES * b.rows.as_ref().map_or(1, |(r, _)| r.accumulators());
                let what = if b.fns.blocked.is_empty() {
                    "no reduction to block: vec4 reads".to_string()
                } else {
                    format!("blocked: {}", b.fns.blocked.join(", "))
                };
                (
                    n,
                    format!(
                        "{per} elements of {} per invocation, lanes at stride {} ({n} invocations; {what})",
                        b.main, b.blocking.stride,
                    ),
                )
            }
            Recipe::Elements | Recipe::Head => (
                n,
                format!("one invocation per element of {root} ({n} invocations)"),
            ),
        }
    }

    /// Images of a batch of `n` each invocation covers, for cutting the invocations into
    /// image chunks; `None` where invocations straddle images unevenly.
    pub fn images_per_invocation(&self, graph: &Graph, n: usize) -> Option<usize> {
        let Recipe::Blocked(b) = &self.recipe else {
            return Some(1);
        };
        match &b.rows {
            Some((r, _)) => {
                let shape = &graph.ty(r.top()).shape;
                (shape.first() == Some(&n)).then_some(if r.lane_axis == 0 {
                    LANES
                } else if r.row_axis == 0 {
                    r.count
                } else {
                    1
                })
            }
            None => {
                let image = graph.ty(b.main).numel() / n;
                let span = b.blocking.extent * b.blocking.stride;
                if image % span == 0 {
                    Some(1)
                } else if b.blocking.stride % image == 0 && span % image == 0 {
                    Some(LANES * b.blocking.stride / image)
                } else {
                    None
                }
            }
        }
    }

    /// Whether the schedule can carry the running sums `sums`: a blocked rows kernel carries
    /// only its own reduction's (unpooled), as rows.
    pub fn carries(&self, sums: &[(NodeId, NodeId)]) -> bool {
        let Recipe::Blocked(b) = &self.recipe else {
            return true;
        };
        let Some((r, _)) = &b.rows else {
            return true;
        };
        sums.iter()
            .all(|(red, root)| *root != b.main || (*red == r.reduction && r.pool.is_none()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `choose_schedule` relies on it: on every device class the last rule tried is the one
    /// that always applies, and no two rules share a name (the header names the rule).
    #[test]
    fn every_device_class_ends_with_one_invocation_per_element() {
        for class in ALL {
            let last = RULES.iter().rfind(|r| r.classes.contains(class)).unwrap();
            assert_eq!(last.name, "elements", "{class:?}");
        }
        let names: std::collections::BTreeSet<_> = RULES.iter().map(|r| r.name).collect();
        assert_eq!(names.len(), RULES.len());
    }
}
