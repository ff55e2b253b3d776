//! Every kernel of the training step and the evaluation graph, run on the GPU, against the CPU
//! reference executor on the same inputs: forward activations, input gradients, the loss, the
//! correct count and every updated weight.
//!
//! Tolerance: each value within 1e-4 of the reference relative to its size (|g - r| / (1 + |r|)).
//! The GPU sums long reductions (a weight gradient adds N*H*W products) sequentially in f32,
//! the reference in f64; measured on lavapipe the worst error is about 4e-7 for the sigmoid
//! LeNet and 2.5e-5 for the ReLU/max-pool variant, whose gradients are larger. The weight
//! *changes* (lr times the gradient) are compared on their own, within 1e-3 of their largest
//! magnitude, so that a wrong gradient cannot hide behind the weight it is added to.

mod common;

use common::{compare, compare_on, feeds, gpu, schedules};
use kiln_autodiff::{evaluation_graph, read_batches_from_dataset, training_step};
use kiln_compiler::{DeviceClass, Target, compile};
use kiln_ir::testing::{random_layer, random_model};
use kiln_ir::{DType, Graph, Layer, LenetVariant, Sequential, TensorType, lenet};
use kiln_reference::execute;
use kiln_runtime::{Gpu, run_graph_on};
use proptest::prelude::*;

const TOLERANCE: f64 = 1e-4;

/// Compares `p_old - p_new` between the GPU and the reference for every parameter update.
fn compare_updates(gpu: &Gpu, g: &Graph, seed: u64, classes: usize) {
    compare_updates_on(gpu, &schedules(gpu), g, seed, classes);
}

fn compare_updates_on(
    gpu: &Gpu,
    schedules: &[(&str, Target)],
    g: &Graph,
    seed: u64,
    classes: usize,
) {
    let (inputs, params) = feeds(g, seed, classes);
    let reference = execute(g, &inputs, &params).unwrap();
    for (schedule, target) in schedules {
        let run = run_graph_on(gpu, target, g, &inputs, &params).unwrap();
        compare_run_updates(g, &params, &run, &reference, schedule);
    }
}

fn compare_run_updates(
    g: &Graph,
    params: &std::collections::HashMap<String, kiln_reference::Tensor>,
    run: &kiln_runtime::GraphRun,
    reference: &kiln_reference::Values,
    schedule: &str,
) {
    for (_, name, _) in g.params() {
        let old = params[name].as_f32().unwrap();
        let want: Vec<f32> = old
            .iter()
            .zip(reference.output(name).unwrap().as_f32().unwrap())
            .map(|(a, b)| a - b)
            .collect();
        let got: Vec<f32> = old
            .iter()
            .zip(run.outputs[name].as_f32().unwrap())
            .map(|(a, b)| a - b)
            .collect();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-3 * scale,
            "{schedule}: {name}: step differs by {worst:e} (largest step {scale:e})"
        );
    }
}

fn lenet_graphs(model: &Sequential, batch: usize, rows: usize) -> [Graph; 2] {
    let fwd = model
        .build("lenet", TensorType::new(DType::U8, [batch, 1, 28, 28]))
        .unwrap();
    [
        read_batches_from_dataset(&training_step(&fwd, 0.9).unwrap(), rows).unwrap(),
        read_batches_from_dataset(&evaluation_graph(&fwd).unwrap(), rows).unwrap(),
    ]
}

/// A max pooling of overlapping 3x3 windows after a convolution, batch 4: its gradient
/// inlined into the weight gradient looped past lavapipe's limit, so the compiler stores it
/// (found by `random_models_match_reference`).
#[test]
fn an_overlapping_max_pool_after_a_convolution_matches_reference() {
    let Some(gpu) = gpu() else { return };
    let model = Sequential::new()
        .append(Layer::from(kiln_ir::Conv2d::new(1, 1, 2)))
        .append(Layer::max_pool2d(3, 2))
        .append(Layer::Flatten)
        .append(Layer::linear(4, 2));
    let fwd = model
        .build("random", TensorType::new(DType::U8, [4, 1, 7, 7]))
        .unwrap();
    let step = read_batches_from_dataset(&training_step(&fwd, 0.5).unwrap(), 9).unwrap();
    compare(&gpu, &step, 3, 2, TOLERANCE);
}

/// A graph outputting the predicted classes beside the loss and the correct count: no
/// classifier head forms around logits whose argmax is stored (the frontend fuzzer found the
/// plan refused), and every output matches the reference on every schedule.
#[test]
fn an_argmax_output_beside_the_loss_matches_reference() {
    let Some(gpu) = gpu() else { return };
    let g = kiln_ir::parse(include_str!("../../../tests/graphs/argmax_output.kir")).unwrap();
    compare(&gpu, &g, 3, 10, TOLERANCE);
}

/// The CPU-class WGSL snapshots (`tests/wgsl.rs` at the root) are of `Target::lavapipe()`:
/// on lavapipe the runtime must derive exactly that target, or they pin a schedule CI does
/// not run.
#[test]
fn lavapipe_gives_the_snapshotted_cpu_target() {
    let Some(gpu) = gpu() else { return };
    if !gpu.target.name.starts_with("llvmpipe") {
        eprintln!("SKIPPED: not lavapipe ({})", gpu.target);
        return;
    }
    let expected = Target::lavapipe();
    if gpu.target.name != expected.name {
        // Another LLVM or vector width: the limits are lavapipe's all the same.
        eprintln!("note: {} (snapshots: {})", gpu.target.name, expected.name);
    }
    assert_eq!(
        Target {
            name: expected.name.clone(),
            ..gpu.target.clone()
        },
        expected
    );
}

#[test]
fn lenet_step_and_evaluation_match_reference() {
    let Some(gpu) = gpu() else { return };
    // Batch 8: the batch axis is a multiple of four, so kernels whose channels are not (conv1's
    // six) block over images instead.
    let [step, eval] = lenet_graphs(&lenet(), 8, 20);
    let report = compare(&gpu, &step, 1, 10, TOLERANCE);
    assert!(
        report.iter().any(|(w, _)| w.contains("conv2d_grad_input")),
        "{report:?}"
    );
    compare_updates(&gpu, &step, 2, 10);
    compare(&gpu, &eval, 3, 10, TOLERANCE);
}

#[test]
fn lenet_running_several_chunks_per_dispatch_matches_reference() {
    let Some(gpu) = gpu() else { return };
    // Batch 17 through 20 KiB windows: conv1's activation and weight gradients run 17 chunks
    // of one image, several to a dispatch (five and two, the last dispatch with spans past
    // the last chunk), as batch 256 does through 64 KiB windows; the fc layers' weight
    // gradients run two chunks, carrying their running sums as vec4s.
    let target = Target {
        class: DeviceClass::Cpu,
        max_uniform_buffer_binding_size: 20 << 10,
        ..gpu.target.clone()
    };
    let [step, _] = lenet_graphs(&lenet(), 17, 30);
    let compiled = compile(&step, &target).unwrap();
    let spanned: Vec<(&str, usize, usize)> = compiled
        .modules
        .iter()
        .filter_map(|m| {
            let c = m.chunks.as_ref()?;
            (c.spans.len() > 1).then_some((m.name.as_str(), c.count, c.spans.len()))
        })
        .collect();
    assert_eq!(
        spanned,
        [("k11_sigmoid_grad_l1", 17, 5), ("k12_update_layer0", 17, 2)]
    );
    let schedules = [("cpu-spans", target)];
    compare_on(&gpu, &schedules, &step, 7, 10, TOLERANCE);
    compare_updates_on(&gpu, &schedules, &step, 8, 10);
}

#[test]
fn lenet_relu_maxpool_variant_matches_reference() {
    let Some(gpu) = gpu() else { return };
    let model = kiln_ir::LenetVariant::ReluMaxPool.model();
    let [step, eval] = lenet_graphs(&model, 5, 12);
    compare(&gpu, &step, 4, 10, TOLERANCE);
    compare_updates(&gpu, &step, 5, 10);
    compare(&gpu, &eval, 6, 10, TOLERANCE);
}

#[test]
fn every_lenet_variant_matches_reference() {
    let Some(gpu) = gpu() else { return };
    for (k, variant) in LenetVariant::ALL.into_iter().enumerate() {
        let [step, eval] = lenet_graphs(&variant.model(), 3, 8);
        compare(&gpu, &step, 10 + k as u64, 10, TOLERANCE);
        compare_updates(&gpu, &step, 20 + k as u64, 10);
        compare(&gpu, &eval, 30 + k as u64, 10, TOLERANCE);
    }
}

proptest! {
    // Each case compiles and JIT-compiles a dozen shaders on lavapipe: few cases.
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn random_models_match_reference(
        convs in proptest::collection::vec(random_layer(), 1..4),
        hidden in proptest::collection::vec((1usize..9, any::<u8>()), 0..2),
        classes in 2usize..12,
        batch in 1usize..5,
        side in 4usize..9,
        seed in any::<u64>(),
    ) {
        let Some(gpu) = gpu() else { return Ok(()) };
        let Some(model) = random_model(1, side, convs, hidden, classes) else {
            return Err(TestCaseError::reject("layers do not fit"));
        };
        let fwd = model.build("random", TensorType::new(DType::U8, [batch, 1, side, side])).unwrap();
        let step = read_batches_from_dataset(&training_step(&fwd, 0.5).unwrap(), 9).unwrap();
        compare(&gpu, &step, seed % 1000, classes, TOLERANCE);
        let eval = read_batches_from_dataset(&evaluation_graph(&fwd).unwrap(), 9).unwrap();
        compare(&gpu, &eval, seed % 1000 + 1, classes, TOLERANCE);
    }
}
