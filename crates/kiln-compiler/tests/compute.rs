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
use kiln_compiler::compute::{element, value_ty};
use kiln_compiler::kir::interp::{Env, Lanes, Value, eval_valid};
use kiln_compiler::kir::{ChunkBound, Ty, validate};
use kiln_ir::testing::{random_layer, random_model};
use kiln_ir::{DType, Graph, LenetVariant, Model, NodeId, Op, TensorType};
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
        let operands: Vec<Ty> = node
            .inputs
            .iter()
            .map(|&n| value_ty(g.ty(n).dtype))
            .collect();
        let f = element(g, id, None, &operands, false);
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
