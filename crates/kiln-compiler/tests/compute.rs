//! Each op's definition in the kernel IR (`compute::element`), run on the kernel IR's
//! interpreter, against the reference executor: every node of whole training steps (LeNet and
//! its variants, SGD and Adam, the zoo's models at 28x28 with their real channel counts),
//! element by element, reading each operand's reference value. Elementwise ops are also run
//! four lanes at a time, each lane its own element, as register blocking calls them.
//!
//! Tolerance: within 1e-4 of the reference relative to its size; the interpreter adds in f32
//! in loop order, the reference in f64. Integers (argmax, counts) must be equal.

mod common;

use common::{close, feeds, zoo};
use kiln_autodiff::{Optimizer, read_batches_from_dataset, training_step_with};
use kiln_compiler::compute::{element, scalar_element, value_ty};
use kiln_compiler::kir::interp::{Env, Lanes, Value, eval_valid};
use kiln_compiler::kir::parts::{IndexFacts, Parts, read_parts};
use kiln_compiler::kir::slide::slide;
use kiln_compiler::kir::unroll::{HeldAxis, lane_reads, unroll};
use kiln_compiler::kir::{ChunkBound, Global, Space, Ty, validate};
use kiln_ir::testing::{random_layer, random_model};
use kiln_ir::{DType, Graph, LenetVariant, Model, NodeId, Op, OpPattern, TensorType};
use kiln_reference::{Data, Tensor, execute};
use proptest::prelude::*;

/// Elements checked per node at most (evenly spread, first and last included).
const SAMPLES: usize = 400;

fn scalar(t: &Tensor, at: u32) -> Value {
    let at = at as usize;
    match t.data() {
        Data::Float(v) => Value::F32(v[at]),
        Data::U8(v) => Value::U32(u32::from(v[at])),
        Data::U32(v) => Value::U32(v[at]),
        Data::I32(v) => Value::I32(v[at]),
    }
}

/// Operand `k` reads the reference's value of the node's `k`-th input; with `stride`, four
/// lanes `stride` elements apart.
struct Operands<'a> {
    values: Vec<&'a Tensor>,
    stride: Option<u32>,
}

/// [`Operands`], with operand 1 also bound as uniform parts `part<l>` of `words` elements
/// (`kir::parts`), as `vec4`s.
struct WithParts<'a> {
    operands: Operands<'a>,
    words: usize,
}

impl Env for WithParts<'_> {
    fn operand(&mut self, k: usize, index: u32) -> Lanes {
        self.operands.operand(k, index)
    }
    fn chunk(&self, b: ChunkBound) -> u32 {
        self.operands.chunk(b)
    }
    fn load(&mut self, global: &str, index: u32) -> Lanes {
        let part: usize = global.strip_prefix("part").unwrap().parse().unwrap();
        let t = self.operands.values[1];
        assert!(
            4 * (index as usize) < self.words,
            "{global}[{index}] is past its part"
        );
        let first = part * self.words + 4 * index as usize;
        Lanes::Vec4(std::array::from_fn(|l| {
            let at = first + l;
            if at < t.ty().numel() {
                scalar(t, at as u32)
            } else {
                Value::F32(0.0)
            }
        }))
    }
}

impl Env for Operands<'_> {
    fn operand(&mut self, k: usize, index: u32) -> Lanes {
        let t = self.values[k];
        match self.stride {
            None => Lanes::Scalar(scalar(t, index)),
            Some(s) => Lanes::Vec4(std::array::from_fn(|l| scalar(t, index + s * l as u32))),
        }
    }
    fn chunk(&self, _: ChunkBound) -> u32 {
        unreachable!("whole-batch definitions do not read a chunk")
    }
}

/// Checks every computed node of `g` (fed by `seed`) on the interpreter; returns how many
/// elements were compared.
fn check_graph(what: &str, g: &Graph, seed: u64, classes: usize) -> usize {
    let (inputs, params) = feeds(g, seed, classes);
    let values = execute(g, &inputs, &params).unwrap();
    let mut compared = 0;
    for (id, node) in g.iter() {
        if matches!(node.op, Op::Input { .. } | Op::Param { .. }) {
            continue;
        }
        let f = scalar_element(g, id, false);
        validate(&f).unwrap_or_else(|e| panic!("{what}: {id}: {e}"));
        let want = values.get(id);
        let n = node.ty.numel();
        let step = n.div_ceil(SAMPLES).max(1);
        let mut at: Vec<usize> = (0..n).step_by(step).collect();
        at.push(n - 1);
        let env_values: Vec<&Tensor> = node.inputs.iter().map(|&x| values.get(x)).collect();
        for &e in &at {
            let mut env = Operands {
                values: env_values.clone(),
                stride: None,
            };
            let got = eval_valid(&f, e as u32, &mut env).unwrap();
            let Some(Lanes::Scalar(got)) = got else {
                panic!("{what}: {id} returned lanes")
            };
            let w = scalar(want, e as u32);
            assert!(
                close(got, w),
                "{what}: {id} = {} : {}, element {e}: interpreter {got:?}, reference {w:?}",
                node.op.name(),
                node.ty
            );
            compared += 1;
        }
        let all_f32 = node.inputs.iter().all(|&x| g.ty(x).dtype == DType::F32);
        if node.op.is_elementwise() && node.ty.dtype == DType::F32 && all_f32 && n >= 8 {
            check_lanes(what, g, id, &env_values, want);
        }
    }
    compared
}

/// The elementwise definition with four lanes (operands as lanes `stride` apart, as register
/// blocking reads them) gives each lane its element.
fn check_lanes(what: &str, g: &Graph, id: NodeId, operands: &[&Tensor], want: &Tensor) {
    let node = g.node(id);
    let tys = vec![Ty::VEC4_F32; node.inputs.len()];
    let f = element(g, id, Some(Ty::VEC4_F32), &tys, false);
    validate(&f).unwrap_or_else(|e| panic!("{what}: {id} as lanes: {e}"));
    let n = node.ty.numel() as u32;
    for stride in [1, n / 4] {
        for e in [0, n - 3 * stride - 1] {
            let mut env = Operands {
                values: operands.to_vec(),
                stride: Some(stride),
            };
            let Some(Lanes::Vec4(lanes)) = eval_valid(&f, e, &mut env).unwrap() else {
                panic!("{what}: {id} returned a scalar for lanes")
            };
            for (l, got) in lanes.into_iter().enumerate() {
                let w = scalar(want, e + stride * l as u32);
                assert!(
                    close(got, w),
                    "{what}: {id} = {} lanes at stride {stride}, element {e} lane {l}: {got:?} vs {w:?}",
                    node.op.name()
                );
            }
        }
    }
}

fn step(model: &Model, name: &str, batch: usize, optimizer: &Optimizer) -> Graph {
    let forward = model
        .forward(name, TensorType::new(DType::U8, [batch, 1, 28, 28]))
        .unwrap();
    read_batches_from_dataset(&training_step_with(&forward, optimizer).unwrap(), 64).unwrap()
}

#[test]
fn lenet_variants_steps_match_reference_op_by_op() {
    for v in LenetVariant::ALL {
        for optimizer in [Optimizer::from(0.9), Optimizer::adam(1e-3)] {
            let what = format!("{v:?} {}", optimizer.torch_name());
            let g = step(&v.model().into(), "lenet", 3, &optimizer);
            assert!(
                check_graph(&what, &g, 1, 10) > 1000,
                "{what}: compared too little"
            );
        }
    }
}

#[test]
fn zoo_models_steps_match_reference_op_by_op() {
    let zoo = zoo();
    assert!(zoo.len() >= 8, "the zoo is there");
    for (name, model) in zoo {
        let g = step(
            &model,
            &name,
            2,
            &Optimizer::Sgd {
                lr: 0.05,
                momentum: 0.9,
                nesterov: true,
                weight_decay: 1e-3,
            },
        );
        check_graph(&name, &g, 2, 10);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Random conv/pool/activation stacks (strides, padding, odd sizes) and hidden layers.
    #[test]
    fn random_models_match_reference_op_by_op(
        channels in 1usize..3,
        side in 5usize..12,
        convs in proptest::collection::vec(random_layer(), 0..4),
        hidden in proptest::collection::vec((1usize..12, 0u8..3), 0..2),
        seed in 0u64..1000,
    ) {
        let Some(model) = random_model(channels, side, convs, hidden, 4) else {
            return Err(TestCaseError::reject("layers do not fit"));
        };
        let forward = model
            .build("random", TensorType::new(DType::U8, [2, channels, side, side]))
            .unwrap();
        let step = training_step_with(&forward, &Optimizer::adam(1e-2)).unwrap();
        let g = read_batches_from_dataset(&step, 5).unwrap();
        check_graph("random", &g, seed, 4);
    }
}

/// Holds each computed node's definition along each of its axes (`kir::unroll`, the rows of
/// register blocking) and, where it can, along two at once, then slides its windows
/// (`kir::slide`); every copy must be exactly the definition at its own element. Returns the `(op, axes)` held.
fn check_held(what: &str, g: &Graph, seed: u64, classes: usize) -> Vec<(String, Vec<usize>)> {
    let (inputs, params) = feeds(g, seed, classes);
    let values = execute(g, &inputs, &params).unwrap();
    let mut held = Vec::new();
    for (id, node) in g.iter() {
        if matches!(node.op, Op::Input { .. } | Op::Param { .. }) || node.ty.shape.is_empty() {
            continue;
        }
        let f = scalar_element(g, id, false);
        let shape = &node.ty.shape;
        let st = strides(shape);
        let axes: Vec<usize> = (0..shape.len()).filter(|&a| shape[a] >= 2).collect();
        let mut choices: Vec<Vec<usize>> = axes.iter().map(|&a| vec![a]).collect();
        if let [a, .., b] = axes[..] {
            choices.push(vec![a, b]);
        }
        let env_values: Vec<&Tensor> = node.inputs.iter().map(|&x| values.get(x)).collect();
        for &a in &axes {
            if check_lanes_of(what, g, id, &f, &env_values, (a, &st)) {
                held.push((format!("{} lanes", node.op.name()), vec![a]));
            }
        }
        for on in choices {
            let counts: Vec<usize> = on
                .iter()
                .map(|&a| {
                    [4, 3, 2]
                        .into_iter()
                        .find(|c| shape[a] % c == 0)
                        .unwrap_or(1)
                })
                .collect();
            let held_axes: Vec<HeldAxis> = on
                .iter()
                .map(|&a| HeldAxis {
                    stride: st[a],
                    extent: shape[a],
                })
                .collect();
            let copies: Vec<Vec<usize>> = match counts[..] {
                [c] => (0..c).map(|k| vec![k]).collect(),
                [c, d] => (0..c)
                    .flat_map(|k| (0..d).map(move |l| vec![k, l]))
                    .collect(),
                _ => unreachable!(),
            };
            let Ok(u) = unroll(&f, &held_axes, &copies) else {
                continue;
            };
            validate(&u).unwrap_or_else(|e| panic!("{what}: {id} held on {on:?}: {e}"));
            // Blocking slides what it holds: whatever windows line up must change no value.
            let (u, windows) =
                slide(&u).unwrap_or_else(|e| panic!("{what}: {id} slid on {on:?}: {e}"));
            if windows > 0 {
                held.push((format!("{} slid", node.op.name()), on.clone()));
            }
            held.push((node.op.name().to_string(), on.clone()));
            // A matmul's right-hand matrix bound in parts of whole rows, read part by part.
            let parts = match node.op {
                Op::MatMul { .. } => Some(g.ty(node.inputs[1]).shape.clone()),
                _ => None,
            }
            .and_then(|b| {
                let rows = (1..=b[0]).find(|r| b[0].div_ceil(*r) <= 4 && r * b[1] % 4 == 0)?;
                let words = rows * b[1];
                let globals = (0..b[0].div_ceil(rows))
                    .map(|l| Global {
                        name: format!("part{l}"),
                        space: Space::Uniform,
                        elem: Ty::VEC4_F32,
                    })
                    .collect();
                let facts = IndexFacts {
                    len: node.ty.numel() as u64,
                    multiple: 1,
                };
                let parts = Parts {
                    operand: 1,
                    globals,
                    words,
                };
                let (read, split) = read_parts(&u, &parts, facts).unwrap_or_else(|e| {
                    panic!("{what}: {id} held on {on:?}, read from parts: {e}")
                });
                (split > 0).then_some((read, words))
            });
            if parts.is_some() {
                held.push((format!("{} parts", node.op.name()), on.clone()));
            }
            let n = node.ty.numel();
            let step = n.div_ceil(40).max(1);
            for e in (0..n).step_by(step).chain([n - 1]) {
                // The first element of its block of copies.
                let e = on
                    .iter()
                    .zip(&counts)
                    .fold(e, |e, (&a, &c)| e - (e / st[a] % shape[a] % c) * st[a]);
                let mut env = Operands {
                    values: env_values.clone(),
                    stride: None,
                };
                let Some(Lanes::Array(got)) = eval_valid(&u, e as u32, &mut env).unwrap() else {
                    panic!("{what}: {id} held returned no array")
                };
                if let Some((read, words)) = &parts {
                    let mut env = WithParts {
                        operands: Operands {
                            values: env_values.clone(),
                            stride: None,
                        },
                        words: *words,
                    };
                    let from_parts = eval_valid(read, e as u32, &mut env).unwrap();
                    assert_eq!(
                        from_parts,
                        Some(Lanes::Array(got.clone())),
                        "{what}: {id} held on {on:?} and read from parts, element {e}"
                    );
                }
                for (k, copy) in copies.iter().enumerate() {
                    let at = e + copy.iter().zip(&on).map(|(o, &a)| o * st[a]).sum::<usize>();
                    let want = eval_valid(&f, at as u32, &mut env).unwrap().unwrap();
                    assert_eq!(
                        got[k],
                        want,
                        "{what}: {id} = {} : {} held on {on:?}, element {e} copy {copy:?}",
                        node.op.name(),
                        node.ty
                    );
                }
            }
        }
    }
    held
}

/// The operand reads of `f` by operand.
fn reads_of(f: &kiln_compiler::kir::Function) -> Vec<usize> {
    let mut reads = vec![0; f.operands.len()];
    for e in &f.exprs {
        if let kiln_compiler::kir::ExprKind::Operand { k, .. } = e {
            reads[*k] += 1;
        }
    }
    reads
}

#[test]
fn held_definitions_give_every_copy_its_element() {
    let mut held = Vec::new();
    for v in [LenetVariant::Lenet, LenetVariant::ReluMaxPool] {
        let g = step(&v.model().into(), "lenet", 4, &Optimizer::from(0.9));
        held.extend(check_held(&format!("{v:?}"), &g, 3, 10));
    }
    for (name, model) in zoo() {
        let g = step(&model, &name, 4, &Optimizer::from(0.9));
        held.extend(check_held(&name, &g, 4, 10));
    }
    // The reductions register blocking holds in rows.
    for (op, axes) in [
        ("conv2d lanes", vec![0]),
        ("conv2d lanes", vec![1]),
        ("matmul lanes", vec![1]),
        ("conv2d_grad_input lanes", vec![0]),
        ("conv2d_grad_weight lanes", vec![0]),
        ("bias_add lanes", vec![1]),
        ("avg_pool2d lanes", vec![1]),
        ("conv2d", vec![0]),
        ("conv2d", vec![1]),
        ("matmul", vec![0]),
        // fc layers' input gradients read `W` (`[out, in]`) row by row.
        ("matmul parts", vec![0]),
        ("conv2d_grad_input", vec![1]),
        ("conv2d_grad_weight", vec![3]),
        // A stride-1 weight gradient's kernel columns read pixels `ox + kx`.
        ("conv2d_grad_weight slid", vec![3]),
    ] {
        assert!(
            held.iter().any(|(o, a)| *o == op && *a == axes),
            "{op} held on {axes:?}"
        );
    }
    assert!(held.iter().any(|(_, a)| a.len() == 2), "two axes at once");
}

/// Held rows share what does not depend on them: a convolution's rows over images read
/// each weight once for all rows, its rows over output channels each pixel once.
#[test]
fn held_rows_share_the_loads_that_do_not_depend_on_them() {
    let forward = Model::from(LenetVariant::Lenet.model())
        .forward("lenet", TensorType::new(DType::F32, [8, 1, 28, 28]))
        .unwrap();
    let (id, node) = forward
        .iter()
        .find(|(_, n)| matches!(n.op, Op::Conv2d { .. }))
        .unwrap();
    let f = element(&forward, id, None, &[Ty::F32, Ty::F32], false);
    assert_eq!(reads_of(&f), [1, 1]);
    let st = strides(&node.ty.shape);
    for (axis, want) in [(0, [4, 1]), (1, [1, 4])] {
        let u = unroll(
            &f,
            &[HeldAxis {
                stride: st[axis],
                extent: node.ty.shape[axis],
            }],
            &(0..4).map(|k| vec![k]).collect::<Vec<_>>(),
        )
        .unwrap();
        assert_eq!(reads_of(&u), want, "conv2d rows on axis {axis}");
    }
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut st = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        st[d] = st[d + 1] * shape[d + 1];
    }
    st
}

/// Operand `k` read as four lanes `strides[k]` apart, or (`None`) as one shared scalar.
struct LaneOperands<'a> {
    values: Vec<&'a Tensor>,
    strides: Vec<Option<usize>>,
}

impl Env for LaneOperands<'_> {
    fn operand(&mut self, k: usize, index: u32) -> Lanes {
        let t = self.values[k];
        match self.strides[k] {
            None => Lanes::Scalar(scalar(t, index)),
            Some(s) => Lanes::Vec4(std::array::from_fn(|l| scalar(t, index + (s * l) as u32))),
        }
    }
    fn chunk(&self, _: ChunkBound) -> u32 {
        unreachable!("whole-batch definitions do not read a chunk")
    }
}

/// Where `lane_reads` gives node `id` lanes along axis `a` (blocks of four coordinates) and
/// register blocking would take them (an f32 op that is not a plain reduction, some operand
/// in lanes, those all f32), the definition evaluated once with `vec4` values is each
/// lane's element. Returns whether it had lanes.
fn check_lanes_of(
    what: &str,
    g: &Graph,
    id: NodeId,
    scalar_def: &kiln_compiler::kir::Function,
    operands: &[&Tensor],
    (a, st): (usize, &[usize]),
) -> bool {
    let node = g.node(id);
    let shape = &node.ty.shape;
    if shape[a] % 4 != 0 || node.ty.dtype != DType::F32 || node.op.pattern() == OpPattern::Reduction
    {
        return false;
    }
    let axis = HeldAxis {
        stride: st[a],
        extent: shape[a],
    };
    let Some(reads) = lane_reads(scalar_def, axis, 1) else {
        return false;
    };
    let lanes_f32 = node
        .inputs
        .iter()
        .zip(&reads)
        .all(|(&n, r)| r.is_none() || g.ty(n).dtype == DType::F32);
    if !lanes_f32 || !reads.iter().any(Option::is_some) {
        return false;
    }
    let tys: Vec<Ty> = node
        .inputs
        .iter()
        .zip(&reads)
        .map(|(&n, r)| r.map_or(value_ty(g.ty(n).dtype), |_| Ty::VEC4_F32))
        .collect();
    let f = element(g, id, Some(Ty::VEC4_F32), &tys, false);
    validate(&f).unwrap_or_else(|e| panic!("{what}: {id} lanes on axis {a}: {e}"));
    let n = node.ty.numel();
    let mut env = LaneOperands {
        values: operands.to_vec(),
        strides: reads.clone(),
    };
    let mut scalars = Operands {
        values: operands.to_vec(),
        stride: None,
    };
    for e in (0..n).step_by(n.div_ceil(30).max(1)).chain([n - 1]) {
        let e = e - (e / st[a] % shape[a] % 4) * st[a];
        let Some(Lanes::Vec4(got)) = eval_valid(&f, e as u32, &mut env).unwrap() else {
            panic!("{what}: {id} lanes returned no vec4")
        };
        for (l, got) in got.into_iter().enumerate() {
            let at = (e + l * st[a]) as u32;
            let Some(Lanes::Scalar(want)) = eval_valid(scalar_def, at, &mut scalars).unwrap()
            else {
                panic!("{what}: {id} returned lanes")
            };
            assert!(
                close(got, want),
                "{what}: {id} = {} : {} lanes on axis {a} ({reads:?}), element {e} lane {l}: {got:?} vs {want:?}",
                node.op.name(),
                node.ty
            );
        }
    }
    true
}
