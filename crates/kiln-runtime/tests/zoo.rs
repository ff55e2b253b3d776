//! The model zoo (`tests/zoo/*.kir`: models that are not LeNet, at Fashion-MNIST's real size)
//! trained on the device against the CPU reference trainer, for the device's own schedules
//! and the portable ones: three SGD steps of 256 images from the same weights, then every
//! parameter, each step's loss and correct count, and the evaluation's loss and count.
//!
//! The portable schedule sums a convolution's weight gradient over the whole batch in one
//! invocation, which on lavapipe runs past its 65,535-iteration loop limit; there the
//! compiler cuts the batch into chunks that carry running sums, and the models must train
//! alike on both schedule sets.

mod common;

use common::{gpu, max_error, synthetic};
use kiln_compiler::Target;
use kiln_ir::{Model, parse_file};
use kiln_runtime::{Gpu, GpuTrainer, RuntimeError};
use kiln_train::CpuTrainer;

const BATCH: usize = 256;
const STEPS: usize = 3;
const TOLERANCE: f64 = 1e-4;

pub fn zoo() -> Vec<(String, Model)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/zoo");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "kir"))
        // `KILN_ZOO=name` runs one model (hunting a failure).
        .filter(|p| {
            std::env::var("KILN_ZOO").map_or(true, |only| {
                p.file_stem().is_some_and(|s| s == only.as_str())
            })
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            (name, parse_file(&p).unwrap().into())
        })
        .collect()
}

/// Trains `model` for [`STEPS`] steps on `target` and on the reference; `Err` only for a
/// refusal at compile time.
fn train_against_reference(
    gpu: &Gpu,
    target: &Target,
    name: &str,
    model: &Model,
) -> Result<(), RuntimeError> {
    let train = synthetic(BATCH * STEPS, 11);
    let test = synthetic(BATCH, 12);
    let lr = 0.05;
    let g = GpuTrainer::with_target(
        gpu,
        target.clone(),
        model.clone(),
        &train,
        &test,
        BATCH,
        lr,
        3,
    )?;
    let mut cpu = CpuTrainer::new(model.clone(), [1, 28, 28], lr, 3).unwrap();
    assert_eq!(
        g.params().unwrap(),
        cpu.params,
        "{name}: same initial weights"
    );
    let order: Vec<u32> = (0..(BATCH * STEPS) as u32).rev().collect();
    for (step, chunk) in order.chunks(BATCH).enumerate() {
        let got = g.train_order(chunk).unwrap();
        let (loss, correct) = cpu.step(&train, chunk).unwrap();
        assert!(
            (got.loss_sum - loss).abs() <= TOLERANCE * loss.abs().max(1.0),
            "{name} ({}), step {step}: loss {} vs {loss}",
            target.name,
            got.loss_sum
        );
        assert_eq!(got.correct, correct, "{name}, step {step}: correct count");
    }
    let params = g.params().unwrap();
    for (p, want) in &cpu.params {
        let e = max_error(&params[p], want);
        assert!(
            e <= TOLERANCE,
            "{name} ({}): {p} differs by {e:e}",
            target.name
        );
    }
    let ge = g.evaluate().unwrap();
    let ce = cpu.evaluate(&test, BATCH).unwrap();
    assert_eq!(ge.correct, ce.correct, "{name}: evaluation's correct count");
    assert!(
        (ge.loss_sum - ce.loss_sum).abs() <= TOLERANCE * ce.loss_sum.max(1.0),
        "{name}: evaluation loss {} vs {}",
        ge.loss_sum,
        ce.loss_sum
    );
    Ok(())
}

#[test]
fn the_zoo_covers_what_it_promises() {
    if std::env::var_os("KILN_ZOO").is_some() {
        eprintln!("SKIPPED: KILN_ZOO picks one model; the coverage check needs them all");
        return;
    }
    let names: Vec<String> = zoo().into_iter().map(|(n, _)| n).collect();
    assert!(names.len() >= 8, "{names:?}");
    let text: String = zoo()
        .iter()
        .map(|(_, m)| match m {
            Model::Graph(g) => kiln_ir::print(g),
            Model::Sequential(_) => unreachable!(),
        })
        .collect();
    for needle in [
        "stride=[2,2] padding",
        "padding=[0,0]",
        "padding=[1,1]",
        "padding=[2,2]",
        "padding=[3,3]",
        "kernel=[3,3] stride=[2,2]",
        "kernel=[3,3] stride=[3,3]",
        "f32[5,1,7,7]",
        "f32[33,7,3,3]",
        "f32[1,1,3,3]",
        "f32[10,3920]",
        "sigmoid(",
        "tanh(",
        "relu(",
        "silu(",
        "max_pool2d(",
        "avg_pool2d(",
    ] {
        assert!(text.contains(needle), "no zoo model has `{needle}`");
    }
}

// deep4 used to die with SIGSEGV in a lavapipe thread and the others now and then with heap
// corruption while their pipelines were created: lavapipe's uniform-inlining bug (see
// kiln_compiler's uniform_control module), triggered by chunk tables in uniform buffers.
// Every zoo model training here is the regression test.
#[test]
fn zoo_models_train_like_the_reference_on_the_device_schedules() {
    let Some(gpu) = gpu() else { return };
    for (name, model) in zoo() {
        train_against_reference(&gpu, &gpu.target, &name, &model)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn zoo_models_train_like_the_reference_on_the_portable_schedules() {
    let Some(gpu) = gpu() else { return };
    let target = Target::portable_for(&gpu.target);
    for (name, model) in zoo() {
        train_against_reference(&gpu, &target, &name, &model)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
