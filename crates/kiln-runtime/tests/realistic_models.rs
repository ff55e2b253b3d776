//! Random models of realistic size (28x28 single-channel images, one to four convolutions with
//! kernels 3/5/7, strides 1/2, paddings 0-3 and channel counts that are not multiples of
//! four, optional max or average pooling 2/2, 3/2 or 3/3, up to two hidden linear layers of
//! up to 512) at batches up to 256, compiled for the device's own schedules (the CPU-class
//! ones on lavapipe) and for the portable ones, and trained one step and evaluated against
//! the reference.
//!
//! The small random graphs of `gpu_vs_reference` never reach the CPU-class schedules (image
//! chunks, spans, running sums, vec4 rows); these do. The case count is sized for CI;
//! `KILN_REALISTIC_CASES=N` runs more and `KILN_REALISTIC_SEED=S` draws other models (the way
//! to hunt schedule bugs); the default seed keeps CI's cases the same from run to run.

mod common;

use common::{gpu, max_error, synthetic};
use kiln_ir::testing::random_model;
use kiln_ir::{Conv2d, Layer, Op, Sequential, TensorType};
use kiln_runtime::GpuTrainer;
use kiln_train::CpuTrainer;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

const TOLERANCE: f64 = 1e-4;
const TEST_IMAGES: usize = 300;
/// Multiply-adds of one training step's forward pass the reference may run per case (the
/// backward pass is about twice as many): keeps a case within seconds in a debug build.
const MAX_FORWARD_MACS: u64 = 400_000_000;

/// A convolution (its input channels fixed up by `random_model`), an activation and maybe a
/// pooling layer.
fn block() -> impl Strategy<Value = Vec<Layer>> {
    let conv = (
        prop::sample::select(vec![1usize, 4, 5, 6, 7, 8, 12, 16, 33]),
        prop::sample::select(vec![3usize, 5, 7]),
        1usize..=2,
        0usize..=3,
    )
        .prop_map(|(o, k, s, p)| Layer::from(Conv2d::new(0, o, k).stride(s).padding(p)));
    let act = prop::sample::select(vec![Layer::Sigmoid, Layer::ReLU, Layer::Tanh, Layer::SiLU]);
    let pool = prop::option::of((
        any::<bool>(),
        prop::sample::select(vec![(2usize, 2usize), (3, 2), (3, 3)]),
    ));
    (conv, act, pool).prop_map(|(conv, act, pool)| {
        let mut layers = vec![conv, act];
        if let Some((max, (k, s))) = pool {
            layers.push(if max {
                Layer::max_pool2d(k, s)
            } else {
                Layer::avg_pool2d(k, s)
            });
        }
        layers
    })
}

fn case() -> impl Strategy<Value = (Sequential, usize)> {
    let hidden = prop::collection::vec(
        (
            prop::sample::select(vec![10usize, 32, 84, 120, 256, 512]),
            0u8..3,
        ),
        0..=2,
    );
    let batch = prop_oneof![1usize..=256, Just(256usize)];
    (prop::collection::vec(block(), 1..=4), hidden, batch).prop_filter_map(
        "layers do not fit a 28x28 image, or too much work for the reference",
        |(blocks, hidden, batch)| {
            let layers = blocks.into_iter().flatten().collect();
            let model = random_model(1, 28, layers, hidden, 10)?;
            (forward_macs(&model)? * batch as u64 <= MAX_FORWARD_MACS).then_some((model, batch))
        },
    )
}

/// Multiply-adds of one image's forward pass.
fn forward_macs(model: &Sequential) -> Option<u64> {
    let g = model.build("probe", TensorType::f32([1, 1, 28, 28])).ok()?;
    let macs = g
        .nodes()
        .iter()
        .map(|n| match n.op {
            Op::Conv2d { .. } | Op::MatMul { .. } => {
                let w = &g.ty(n.inputs[1]).shape;
                let per_output = match n.op {
                    Op::Conv2d { .. } => w[1..].iter().product::<usize>(),
                    _ => w[w.len() - 1],
                };
                (n.ty.numel() * per_output) as u64
            }
            _ => 0,
        })
        .sum();
    Some(macs)
}

#[test]
fn realistic_random_models_train_and_evaluate_like_the_reference() {
    let Some(gpu) = gpu() else { return };
    let cases = std::env::var("KILN_REALISTIC_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("KILN_REALISTIC_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes);
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            // Every case compiles and runs real kernels; shrinking a failure would take hours.
            max_shrink_iters: 0,
            ..Config::default()
        },
        rng,
    );
    let train = synthetic(256, 31);
    let test = synthetic(TEST_IMAGES, 32);
    let lr = 0.05;
    let targets = [
        gpu.target.clone(),
        kiln_compiler::Target::portable_for(&gpu.target),
    ];
    runner
        .run(&case(), |(model, batch)| {
            // The reference: one step from the initial weights, then the evaluation.
            let mut cpu = CpuTrainer::new(model.clone(), [1, 28, 28], lr, 7).unwrap();
            let order: Vec<u32> = (0..batch as u32).rev().collect();
            let (loss, correct) = cpu.step(&train, &order).unwrap();
            let ce = cpu.evaluate(&test, batch).unwrap();
            for target in &targets {
                let summary = format!("{model:?} at batch {batch} ({})", target.name);
                let g = GpuTrainer::with_target(
                    &gpu,
                    target.clone(),
                    model.clone(),
                    &train,
                    &test,
                    batch,
                    lr,
                    7,
                )
                .map_err(|e| TestCaseError::fail(format!("{summary}: {e}")))?;
                let got = g.train_order(&order).unwrap();
                prop_assert!(
                    (got.loss_sum - loss).abs() <= TOLERANCE * loss.max(1.0),
                    "{summary}: loss {} vs {loss}",
                    got.loss_sum
                );
                prop_assert_eq!(got.correct, correct, "{}: correct count", summary);
                let params = g.params().unwrap();
                for (p, want) in &cpu.params {
                    let e = max_error(&params[p], want);
                    prop_assert!(e <= TOLERANCE, "{summary}: {p} differs by {e:e}");
                }
                // The updated weights evaluated in batches of `batch` (the last one partial).
                let ge = g.evaluate().unwrap();
                prop_assert_eq!(
                    ge.correct,
                    ce.correct,
                    "{}: evaluation's correct count",
                    summary
                );
                prop_assert!(
                    (ge.loss_sum - ce.loss_sum).abs() <= TOLERANCE * ce.loss_sum.max(1.0),
                    "{summary}: evaluation loss {} vs {}",
                    ge.loss_sum,
                    ce.loss_sum
                );
            }
            Ok(())
        })
        .unwrap();
}
