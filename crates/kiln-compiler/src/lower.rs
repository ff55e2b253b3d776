//! Lowering, the third stage of a kernel's generation: a [`Schedule`]'s recipe as a kernel
//! IR module (its element, lane and rows functions and its entry point), for the launch
//! `lay_out` decided (workgroups, dispatch, chunks). One function per recipe; what they share
//! (storing roots, running sums, the last chunk's epilogue) are methods of [`Lowering`].

use kiln_ir::{Graph, NodeId};

use crate::bind::KernelBindings;
use crate::blocking::lane_fn;
use crate::chunks;
use crate::compute;
use crate::conv_quads::ConvQuads;
use crate::elements::{Addressing, element_functions};
use crate::head::head_main;
use crate::kir::module::{Item, Module};
use crate::kir::wgsl::Callee;
use crate::kir::{self, BinOp};
use crate::nest::{Held, Invocations, first_element};
use crate::plan::{Kernel, KernelKind, Plan};
use crate::schedule::{Blocked, Columns, Recipe, Schedule};
use crate::text::v;

/// What lowering a kernel's schedule needs.
pub(crate) struct Lowering<'a> {
    pub graph: &'a Graph,
    pub plan: &'a Plan,
    pub kernel: &'a Kernel,
    pub bound: &'a KernelBindings,
    pub schedule: &'a Schedule<'a>,
    pub workgroup_size: u32,
    pub dispatch: [u32; 3],
    /// Whether the kernel runs image chunk by chunk (invocations offset by the chunk's).
    pub chunked: bool,
    /// The classifier head's workgroup size.
    pub head_workgroup: u32,
    /// The element functions (`elements.rs`), before the schedule's own.
    items: Vec<Item>,
}

impl<'a> Lowering<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        graph: &'a Graph,
        plan: &'a Plan,
        kernel: &'a Kernel,
        bound: &'a KernelBindings,
        schedule: &'a Schedule<'a>,
        (workgroup_size, dispatch): (u32, [u32; 3]),
        chunked: bool,
        head_workgroup: u32,
        cpu: bool,
    ) -> Self {
        // A convolution over vec4 quads loads and stores everything in its entry point.
        let items = if matches!(schedule.recipe, Recipe::ConvQuads(_)) {
            Vec::new()
        } else {
            let binding_of = |b: usize| bound.binding_of(b);
            let uniform_at = |b: usize| bound.uniform_at(b);
            let split = |b: usize| bound.split(b);
            let global = |b: usize| bound.global(plan, b, &schedule.vec4_out);
            let at = Addressing {
                binding_of: &binding_of,
                uniform_at: &uniform_at,
                split: &split,
                global: &global,
            };
            element_functions(graph, plan, kernel, &at, &bound.summed(), cpu)
        };
        Lowering {
            graph,
            plan,
            kernel,
            bound,
            schedule,
            workgroup_size,
            dispatch,
            chunked,
            head_workgroup,
            items,
        }
    }

    /// The kernel IR's view of `buffer`'s binding.
    fn global(&self, buffer: usize) -> kir::Global {
        self.bound
            .global(self.plan, buffer, &self.schedule.vec4_out)
    }

    /// Invocations in one row of the dispatch grid (`gid.y` counts rows).
    fn row(&self) -> usize {
        self.dispatch[0] as usize * self.workgroup_size as usize
    }

    /// After the running sums, only the chunk that ends the batch runs the epilogue.
    fn last_chunk_only(&self, f: &mut kir::Builder) {
        let end = f.chunk(kir::ChunkBound::EndImage);
        let batch = f.u32(self.bound.batch.unwrap_or(0));
        let before = f.bin(BinOp::Lt, end, batch);
        f.if_(before, |f| f.return_());
    }

    /// Stores `root`'s element `at` (operand `k`) into its buffer.
    fn store_root(&self, f: &mut kir::Builder, root: NodeId, k: usize, at: kir::Expr) {
        let g = f.global(self.global(self.plan.buffer_of[root.0].expect("roots are stored")));
        let value = f.operand(k, at);
        f.store(g, at, value);
    }

    /// The other roots, one element per invocation `j` below their size (operands from
    /// `first`, in the roots' order).
    fn other_roots(&self, f: &mut kir::Builder, others: &[NodeId], first: usize, j: kir::Expr) {
        for (k, &r) in others.iter().enumerate() {
            let n = f.u32(self.graph.ty(r).numel());
            let inside = f.bin(BinOp::Lt, j, n);
            f.if_(inside, |f| self.store_root(f, r, first + k, j));
        }
    }

    /// The loaders of a summed reduction's finished sums, under the names of its forms.
    fn loaders(
        &self,
        red: NodeId,
        lanes: Vec<usize>,
        rows: Option<Vec<usize>>,
        quads: bool,
    ) -> Vec<Item> {
        let forms = chunks::SummedForms {
            scalar: self.kernel.nodes.contains(&red),
            lanes,
            rows,
        };
        chunks::sum_loaders(red, &forms, quads)
    }

    /// The schedule's loop nest, split.
    fn invocations(&self) -> Invocations {
        let nest = self
            .schedule
            .nest
            .as_ref()
            .expect("map recipes have a nest");
        nest.invocations()
            .unwrap_or_else(|e| panic!("{}: the recipe's nest {nest}: {e}", self.kernel.name))
    }

    fn roots(&self) -> &'a [NodeId] {
        match &self.kernel.kind {
            KernelKind::Map { roots } => roots,
            KernelKind::Head(_) => &[],
        }
    }
}

/// The kernel IR module of `l.schedule`, and its functions before the entry point.
pub(crate) fn lower(l: &Lowering) -> (Module, Vec<Item>) {
    match &l.schedule.recipe {
        Recipe::ConvQuads(q) => conv_quads(l, q),
        Recipe::Columns(c) => columns(l, c),
        Recipe::Blocked(b) => blocked(l, b),
        Recipe::Elements => elements(l),
        Recipe::Head => {
            let KernelKind::Head(h) = &l.kernel.kind else {
                unreachable!("the head recipe is the head's")
            };
            // A workgroup's barriers: printed from the kernel IR, not interpreted.
            let global = |b: usize| l.global(b);
            let module = Module {
                declarations: Vec::new(),
                items: l.items.clone(),
                entry: head_main(l.graph, l.plan, h, &global, l.head_workgroup),
            };
            (module, l.items.clone())
        }
    }
}

/// Every value loaded and stored by the entry point itself (`conv_quads.rs`).
fn conv_quads(l: &Lowering, q: &ConvQuads) -> (Module, Vec<Item>) {
    let (graph, plan) = (l.graph, l.plan);
    let buffer = |id: NodeId| plan.buffer_of[id.0].expect("bound nodes have buffers");
    let at = |id: NodeId| {
        (
            l.global(buffer(id)),
            l.bound.uniform_at(buffer(id)).flatten(),
        )
    };
    let mut f = kir::Builder::entry(Vec::new());
    let inv = l.invocations();
    let count = (!l.chunked).then_some(inv.count());
    let j = invocation(&mut f, "j", l.row(), count);
    crate::conv_quads::body(&mut f, graph, q, (j, &inv), &at);
    (
        map_module(Vec::new(), l.workgroup_size, f, Vec::new()),
        Vec::new(),
    )
}

/// Kernel columns of a weight gradient summed chunk by chunk, in whole rows for several
/// output channels.
fn columns(l: &Lowering, c: &Columns) -> (Module, Vec<Item>) {
    let graph = l.graph;
    let sums = l.bound.sums.as_slice();
    let roots = l.roots();
    let Columns {
        main,
        reduction: red,
        kw: _,
        channels,
        operands,
        vec4,
    } = *c;
    let mut functions = l.items.clone();
    let ins = &graph.node(red).inputs;
    let (xv, dyv) = (v(ins[0]), v(ins[1]));
    if channels > 1 {
        let (x, dy) = operands.expect("whole rows read uniform bindings");
        let window = |b: usize| l.bound.uniform_at(b).expect("read from a uniform binding");
        functions.push(crate::conv_quads::weight_rows_fn(
            graph,
            red,
            channels,
            (l.bound.binding_of(x), window(x)),
            (l.bound.binding_of(dy), window(dy)),
        ));
    } else {
        let window = |b: usize| l.bound.uniform_at(b).expect("read from a uniform binding");
        let loads = match operands.filter(|_| vec4) {
            Some((x, dy)) => chunks::ColumnLoads::Vec4 {
                x: (l.bound.binding_of(x), window(x)),
                dy: (l.bound.binding_of(dy), window(dy)),
            },
            None => chunks::ColumnLoads::Scalar {
                x: xv.clone(),
                dy: dyv.clone(),
            },
        };
        functions.push(chunks::kernel_columns_fn(graph, red, loads));
    }
    for &(r, _) in sums {
        functions.extend(l.loaders(r, Vec::new(), None, false));
    }
    // The invocation's kernel columns of each of its output channels, as the nest holds
    // them (rows: channels, then columns).
    let inv = l.invocations();
    let offsets: Vec<usize> = inv
        .offsets(&[Held::Rows, Held::Columns])
        .into_iter()
        .map(|(_, off)| off)
        .collect();
    let stores = offsets
        .iter()
        .enumerate()
        .map(|(k, &off)| {
            (
                off,
                kir::Part {
                    index: Some(k as u32),
                    lane: None,
                },
            )
        })
        .collect();
    let point = EntryPoint {
        count: None,
        invocations: inv,
        computed: None,
        carried: Some(Carried {
            red,
            name: "rows",
            part: (
                Callee::Call(crate::text::chunk_part(&format!("v{}_columns", red.0))),
                kir::Ty::array(kir::Ty::F32, offsets.len() as u32).expect("one deep"),
            ),
            stores,
            quads: false,
        }),
        stores: Stores::Root {
            root: main,
            offsets,
        },
        others: roots.iter().copied().filter(|&r| r != main).collect(),
    };
    let (f, callees) = entry(l, &point);
    (
        map_module(functions.clone(), l.workgroup_size, f, callees),
        functions,
    )
}

/// Register blocking: the lanes (or rows of lanes) of the main root per invocation, carried
/// into running sums where the kernel sums over the batch.
fn blocked(l: &Lowering, blocked: &Blocked) -> (Module, Vec<Item>) {
    let sums = l.bound.sums.as_slice();
    let roots = l.roots();
    let Blocked {
        main,
        blocking: b,
        fns,
        rows,
    } = blocked;
    let mut functions = l.items.clone();
    functions.extend(fns.items().iter().cloned());
    let part = |index: Option<usize>, lane: Option<usize>| kir::Part {
        index: index.map(|k| k as u32),
        lane: lane.map(|l| l as u32),
    };
    // What the invocation computes (`rows` of lanes, or one `value` of four), its lanes'
    // offsets from `i` as the nest holds them, and its vec4s' offsets (accumulators in
    // the order rows, then inner rows).
    let inv = l.invocations();
    let inner = inv.factor(Held::Inner);
    let accumulator = |c: &[usize]| c[0] * inner + c[1];
    type Parts = Vec<(usize, kir::Part)>;
    let (setup, stores, quads): (_, Parts, Parts) = match rows {
        Some((r, rows_fn)) => (
            (
                "rows",
                vec4s_ty(r.accumulators()),
                Callee::Call(rows_fn.clone()),
            ),
            inv.offsets(&[Held::Rows, Held::Inner, Held::Lanes])
                .into_iter()
                .map(|(c, off)| (off, part(Some(accumulator(&c)), Some(c[2]))))
                .collect(),
            inv.offsets(&[Held::Rows, Held::Inner])
                .into_iter()
                .map(|(c, off)| (off, part(Some(accumulator(&c)), None)))
                .collect(),
        ),
        None => (
            (
                "value",
                kir::Ty::VEC4_F32,
                Callee::Call(lane_fn(*main, b.stride)),
            ),
            inv.offsets(&[Held::Lanes])
                .into_iter()
                .map(|(c, off)| (off, part(None, Some(c[0]))))
                .collect(),
            vec![(0, part(None, None))],
        ),
    };
    // Every chunk adds its part to the running sums; the last then runs the epilogue,
    // which loads the finished sums.
    let summed_lanes = |red: NodeId| -> Vec<usize> {
        fns.summed_lanes
            .iter()
            .filter(|(n, _)| *n == red)
            .map(|(_, s)| *s)
            .collect()
    };
    let (setup_name, setup_ty, setup_fn) = setup;
    let quad_sum = |red: NodeId| l.schedule.quad_sum == Some(red);
    let mut carried = None;
    for &(red, root) in sums {
        if root == *main {
            let part = match rows {
                Some((r, _)) if r.reduction == red && r.pool.is_none() => (
                    crate::text::chunk_part(&format!("v{}_rows_of_reduction", red.0)),
                    setup_ty,
                ),
                Some(_) => unreachable!("Schedule::carries refuses other sums"),
                None => (
                    crate::text::chunk_part(&lane_fn(red, b.stride)),
                    kir::Ty::VEC4_F32,
                ),
            };
            carried = Some(Carried {
                red,
                name: setup_name,
                part: (Callee::Call(part.0), part.1),
                stores: if quad_sum(red) {
                    quads.clone()
                } else {
                    stores.clone()
                },
                quads: quad_sum(red),
            });
            let rows_offsets = rows
                .as_ref()
                .filter(|(r, _)| r.reduction == red)
                .map(|_| stores.iter().map(|(off, _)| *off).collect());
            functions.extend(l.loaders(red, summed_lanes(red), rows_offsets, quad_sum(red)));
        } else {
            functions.extend(l.loaders(red, summed_lanes(red), None, false));
        }
    }
    let vec4_out = !l.schedule.vec4_out.is_empty();
    let point = EntryPoint {
        count: (!l.chunked).then_some(inv.count()),
        invocations: inv,
        computed: Some((setup_name, setup_ty, setup_fn)),
        carried,
        stores: Stores::Parts {
            root: *main,
            parts: if vec4_out { quads } else { stores },
            vec4: vec4_out,
        },
        others: roots.iter().copied().filter(|&r| r != *main).collect(),
    };
    let (f, callees) = entry(l, &point);
    (
        map_module(functions.clone(), l.workgroup_size, f, callees),
        functions,
    )
}

/// One invocation per element, every root stored; summing chunk by chunk or cut into image
/// chunks where the layout chunks it.
fn elements(l: &Lowering) -> (Module, Vec<Item>) {
    let roots = l.roots();
    let mut functions = l.items.clone();
    for &(red, _) in &l.bound.sums {
        functions.extend(l.loaders(red, Vec::new(), None, false));
    }
    let (stores, others) = match roots {
        [root] => (
            Stores::Root {
                root: *root,
                offsets: vec![0],
            },
            Vec::new(),
        ),
        _ => (Stores::Nothing, roots.to_vec()),
    };
    let inv = l.invocations();
    let point = EntryPoint {
        count: (!l.chunked).then_some(inv.count()),
        invocations: inv,
        computed: None,
        carried: None,
        stores,
        others,
    };
    let (f, callees) = entry(l, &point);
    (
        map_module(functions.clone(), l.workgroup_size, f, callees),
        functions,
    )
}

/// A map kernel's entry point as data: its invocations, where each one's elements start,
/// the running sums it carries and what it stores. Every map recipe but the convolutions over
/// quads (whose entry point loads and stores everything itself) describes its entry point so,
/// and [`entry`] lowers the description.
struct EntryPoint {
    /// How many invocations run, or `None` for the image chunk's (the chunk table's range).
    count: Option<usize>,
    /// The schedule's loop nest, split: the grid that places an invocation's first element.
    invocations: Invocations,
    /// What the invocation computes (operand 0, read at `i`): its name, type and function.
    computed: Option<(&'static str, kir::Ty, Callee)>,
    /// The running sum of the invocation's own elements; every other sum of the kernel is
    /// carried one element per invocation.
    carried: Option<Carried>,
    stores: Stores,
    /// Roots stored one element per invocation, at the invocation index, below their size.
    others: Vec<NodeId>,
}

/// The running sum of reduction `red` over the invocation's own elements: its chunk's part
/// (the function and its type), read at `i` into the `var` named `name`, carried to the sum
/// buffer at each `(offset from i, part)`, a `vec4` at a time where `quads`.
struct Carried {
    red: NodeId,
    name: &'static str,
    part: (Callee, kir::Ty),
    stores: Vec<(usize, kir::Part)>,
    quads: bool,
}

/// What the invocation stores of its own elements.
enum Stores {
    /// Parts of the computed value into `root`'s buffer at each offset from `i`; with `vec4`,
    /// whole `vec4`s at `(i + offset) >> 2`.
    Parts {
        root: NodeId,
        parts: Vec<(usize, kir::Part)>,
        vec4: bool,
    },
    /// `root`'s element function at each offset from `i`.
    Root {
        root: NodeId,
        offsets: Vec<usize>,
    },
    Nothing,
}

/// The entry point `point` describes, and the callees of its operands: the computed value,
/// each running sum's chunk part (in the kernel's order of sums), the stored root's
/// function, then the other roots'.
fn entry(l: &Lowering, point: &EntryPoint) -> (kir::Builder, Vec<Callee>) {
    let graph = l.graph;
    let sums = l.bound.sums.as_slice();
    let mut operands = Vec::new();
    let mut callees = Vec::new();
    if let Some((_, ty, callee)) = &point.computed {
        operands.push(*ty);
        callees.push(callee.clone());
    }
    let carried = |red: NodeId| point.carried.as_ref().filter(|c| c.red == red);
    let first_sum = operands.len();
    for &(red, _) in sums {
        match carried(red) {
            Some(c) => {
                operands.push(c.part.1);
                callees.push(c.part.0.clone());
            }
            None => {
                operands.push(kir::Ty::F32);
                callees.push(Callee::Call(crate::text::chunk_part(&v(red))));
            }
        }
    }
    let stored_root = operands.len();
    if let Stores::Root { root, .. } = &point.stores {
        element_operands(graph, &[*root], (&mut operands, &mut callees));
    }
    let first_other = operands.len();
    element_operands(graph, &point.others, (&mut operands, &mut callees));
    let mut f = kir::Builder::entry(operands);
    // The invocation index is `i` itself where it is the first element's.
    let var = match point.invocations.grid.as_slice() {
        [a] if a.step == 1 => "i",
        _ => "j",
    };
    let j = invocation(&mut f, var, l.row(), point.count);
    let i = first_element(&mut f, j, &point.invocations);
    for (k, &(red, root)) in sums.iter().enumerate() {
        match carried(red) {
            Some(c) => {
                let value = f.operand(first_sum + k, i);
                let ty = f.operand_ty(first_sum + k);
                chunks::running_sum(&mut f, red, (c.name, ty, value), i, &c.stores, c.quads);
            }
            None => {
                let value = f.operand(first_sum + k, j);
                chunks::element_running_sum(&mut f, red, j, value, graph.ty(root).numel());
            }
        }
    }
    if !sums.is_empty() {
        l.last_chunk_only(&mut f);
    }
    let at = |f: &mut kir::Builder, off: usize| {
        if off == 0 {
            i
        } else {
            let d = f.u32(off);
            f.add(i, d)
        }
    };
    match &point.stores {
        Stores::Parts { root, parts, vec4 } => {
            let (name, ty, _) = point
                .computed
                .as_ref()
                .expect("parts of the computed value");
            let computed = f.operand(0, i);
            let computed = f.let_(name, *ty, computed);
            let g = f.global(l.global(l.plan.buffer_of[root.0].expect("roots are stored")));
            for &(off, p) in parts {
                let mut index = at(&mut f, off);
                if *vec4 {
                    let two = f.u32(2);
                    index = f.bin(BinOp::ShiftRight, index, two);
                }
                let value = f.part(computed, p);
                f.store(g, index, value);
            }
        }
        Stores::Root { root, offsets } => {
            for &off in offsets {
                let index = at(&mut f, off);
                l.store_root(&mut f, *root, stored_root, index);
            }
        }
        Stores::Nothing => {}
    }
    l.other_roots(&mut f, &point.others, first_other, j);
    (f, callees)
}

/// Appends each of `nodes`' element functions `v<id>` to an entry point's operands.
fn element_operands(
    graph: &Graph,
    nodes: &[NodeId],
    (operands, callees): (&mut Vec<kir::Ty>, &mut Vec<Callee>),
) {
    for &n in nodes {
        operands.push(compute::value_ty(graph.ty(n).dtype));
        callees.push(Callee::Call(v(n)));
    }
}

/// A map kernel's module: its functions and, from `f`, its entry point.
fn map_module(
    items: Vec<Item>,
    workgroup_size: u32,
    f: kir::Builder,
    callees: Vec<Callee>,
) -> kir::module::Module {
    kir::module::Module {
        declarations: Vec::new(),
        items,
        entry: kir::module::Entry {
            workgroup_size,
            function: f.finish(),
            callees,
            workgroup: Vec::new(),
            spans: Vec::new(),
        },
    }
}

/// The invocation's index `var`: `gid.x + gid.y * row`, returning past `count`; or, in an
/// image chunk (`count` `None`), plus the chunk's first invocation, returning past its end.
fn invocation(f: &mut kir::Builder, var: &str, row: usize, count: Option<usize>) -> kir::Expr {
    let (x, y) = (f.global_id(0), f.global_id(1));
    let r = f.u32(row);
    let t = f.mul(y, r);
    let mut at = f.add(x, t);
    if count.is_none() {
        let first = f.chunk(kir::ChunkBound::FirstInvocation);
        at = f.add(at, first);
    }
    let j = f.let_(var, kir::Ty::U32, at);
    let end = match count {
        Some(n) => f.u32(n),
        None => f.chunk(kir::ChunkBound::EndInvocation),
    };
    let past = f.bin(BinOp::Ge, j, end);
    f.if_(past, |f| f.return_());
    j
}

/// `array<vec4<f32>, n>`.
fn vec4s_ty(n: usize) -> kir::Ty {
    kir::Ty::array(kir::Ty::VEC4_F32, n as u32).expect("one deep")
}
