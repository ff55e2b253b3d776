//! Batch sizes from one image to the whole training set, on the device's own schedules: at each
//! size LeNet evaluates the same weights like the reference, and trains one step like it or is
//! refused with the name of the device limit it would exceed.
//!
//! Small batches leave the CPU-class schedules (image chunks, spans, running sums) unused;
//! large ones are where they engage and where the classifier head loops over thousands of
//! rows, so the sizes straddle every boundary: one image, odd sizes, one either side of 256,
//! and sizes past the uniform windows, the spans and lavapipe's loop limit.

mod common;

use common::{gpu, max_error, synthetic};
use kiln_data::Split;
use kiln_ir::lenet;
use kiln_runtime::GpuTrainer;
use kiln_train::CpuTrainer;

const SIZES: &[usize] = &[1, 3, 17, 255, 256, 257, 1000, 4096, 10_000];
const TRAINING_SET: usize = 60_000;
const TEST_IMAGES: usize = 10_000;
const LR: f32 = 0.1;
const SEED: u64 = 5;
const TOLERANCE: f64 = 1e-4;
/// Images whose predicted class may differ from the reference's: two logits within rounding
/// of each other (random weights make near ties among 10,000 images likely). A schedule bug
/// moves thousands (batch 10,000 once scored 0.003 instead of 0.167).
const TIES: u64 = 2;

fn first(split: &Split, count: usize) -> Split {
    Split {
        count,
        images: split.images[..count * 784].to_vec(),
        labels: split.labels[..count].to_vec(),
        ..*split
    }
}

/// Whether `message` is a refusal naming one of the device's limits.
fn names_a_limit(message: &str) -> bool {
    message.contains("max_") && message.contains("use a smaller batch")
}

#[test]
fn one_set_of_weights_evaluates_alike_at_every_batch_size() {
    let Some(gpu) = gpu() else { return };
    // The training split only sizes the (unused) step programs: a few images keep them
    // small, so that every evaluation batch compiles.
    let train = synthetic(16, 21);
    let test = synthetic(TEST_IMAGES, 22);
    let mut reference = CpuTrainer::new(lenet(), [1, 28, 28], LR, SEED).unwrap();
    let want = reference.evaluate(&test, 1000).unwrap();
    for &batch in SIZES {
        let g = GpuTrainer::new(&gpu, lenet(), &train, &test, batch, LR, SEED)
            .unwrap_or_else(|e| panic!("batch {batch}: {e}"));
        // The same initial weights, evaluated in batches of `batch` (the last one partial).
        let got = g.evaluate().unwrap();
        assert_eq!(got.examples, TEST_IMAGES, "batch {batch}");
        assert!(
            got.correct.abs_diff(want.correct) <= TIES,
            "batch {batch}: {} of {TEST_IMAGES} correct, the reference {}",
            got.correct,
            want.correct
        );
        assert!(
            (got.loss_sum - want.loss_sum).abs() <= TOLERANCE * want.loss_sum,
            "batch {batch}: evaluation loss {} vs {}",
            got.loss_sum,
            want.loss_sum
        );
    }
}

#[test]
fn every_batch_size_trains_like_the_reference_or_is_refused_by_name() {
    let Some(gpu) = gpu() else { return };
    let all = synthetic(*SIZES.iter().max().unwrap(), 23);
    let test = synthetic(16, 24);
    let mut refused = Vec::new();
    for &batch in SIZES {
        let train = first(&all, batch);
        let g = match GpuTrainer::new(&gpu, lenet(), &train, &test, batch, LR, SEED) {
            Ok(g) => g,
            // lavapipe binds at most 128 MiB: LeNet's first activation is 18,816 bytes an
            // image, so steps of more than ~7,100 images cannot be bound.
            Err(e) if batch > 4096 && names_a_limit(&e.to_string()) => {
                refused.push(batch);
                continue;
            }
            Err(e) => panic!("batch {batch}: {e}"),
        };
        // One step on all `batch` images, from the same weights.
        let order: Vec<u32> = (0..batch as u32).rev().collect();
        let stats = g.train_order(&order).unwrap();
        let mut cpu = CpuTrainer::new(lenet(), [1, 28, 28], LR, SEED).unwrap();
        let (loss, correct) = cpu.step(&train, &order).unwrap();
        assert!(
            (stats.loss_sum - loss).abs() <= TOLERANCE * loss.max(1.0),
            "batch {batch}: step loss {} vs {loss}",
            stats.loss_sum
        );
        assert!(
            stats.correct.abs_diff(correct) <= TIES,
            "batch {batch}: step correct {} vs {correct}",
            stats.correct
        );
        let params = g.params().unwrap();
        for (p, want) in &cpu.params {
            let e = max_error(&params[p], want);
            assert!(e <= TOLERANCE, "batch {batch}: {p} differs by {e:e}");
        }
    }
    if gpu.target.max_loop_iterations.is_none() {
        assert!(
            refused.is_empty(),
            "refused on {}: {refused:?}",
            gpu.info.name
        );
    }
}

#[test]
fn the_whole_training_set_as_one_batch_trains_or_is_refused_by_name() {
    let Some(gpu) = gpu() else { return };
    let train = synthetic(TRAINING_SET, 23);
    let test = synthetic(1000, 24);
    match GpuTrainer::new(&gpu, lenet(), &train, &test, TRAINING_SET, LR, SEED) {
        Ok(g) => {
            let order: Vec<u32> = (0..TRAINING_SET as u32).collect();
            let stats = g.train_order(&order).unwrap();
            assert_eq!(stats.examples, TRAINING_SET);
            assert!(stats.loss_sum.is_finite());
        }
        Err(e) => {
            // lavapipe holds at most 128 MiB per binding (the step's 60,000 input images are
            // 188 MB as f32) and runs 65,535 loop iterations per invocation.
            let message = e.to_string();
            assert!(
                gpu.target.max_loop_iterations.is_some() && names_a_limit(&message),
                "batch {TRAINING_SET}: {message}"
            );
        }
    }
}
