//! The GPU training loop against the CPU reference trainer, and a short real training run.

mod common;

use common::{gpu, synthetic};
use kiln_data::{load, locate};
use kiln_ir::lenet;
use kiln_runtime::GpuTrainer;
use kiln_train::CpuTrainer;

#[test]
fn consecutive_steps_track_the_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    let train = synthetic(40, 3);
    let test = synthetic(10, 4);
    let model = lenet();
    // 40 examples at batch 16: two full steps and a partial one of 8, twice over.
    let gpu_trainer = GpuTrainer::new(&gpu, &model, &train, &test, 16, 0.9, 5).unwrap();
    let mut cpu = CpuTrainer::new(model, [1, 28, 28], 0.9, 5).unwrap();
    assert_eq!(
        gpu_trainer.params().unwrap(),
        cpu.params,
        "same initial weights"
    );
    let order: Vec<u32> = (0..40).rev().collect();
    for round in 0..2 {
        for chunk in order.chunks(16) {
            let g = gpu_trainer.train_order(chunk).unwrap();
            let (loss, correct) = cpu.step(&train, chunk).unwrap();
            assert!(
                (g.loss_sum - loss).abs() <= 1e-4 * loss.abs().max(1.0),
                "round {round}: loss {} vs {loss}",
                g.loss_sum
            );
            assert_eq!(g.correct, correct);
            let gp = gpu_trainer.params().unwrap();
            for (name, want) in &cpu.params {
                let e = common::max_error(&gp[name], want);
                assert!(e <= 1e-5, "round {round}: {name} drifted by {e:e}");
            }
        }
    }
    let ge = gpu_trainer.evaluate().unwrap();
    let ce = cpu.evaluate(&test, 16).unwrap();
    assert_eq!(ge.correct, ce.correct);
    assert!((ge.loss_sum - ce.loss_sum).abs() < 1e-4 * ce.loss_sum.max(1.0));
}

#[test]
fn short_real_training_run_learns() {
    let Some(gpu) = gpu() else { return };
    let data = match locate(None) {
        Ok(dir) => load(&dir).unwrap(),
        Err(e) if std::env::var_os("KILN_REQUIRE_DATA").is_none() => {
            eprintln!("SKIPPED: no Fashion-MNIST: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let model = kiln_ir::LenetVariant::ReluMaxPool.model();
    let train = data.train.truncated(2560);
    let test = data.test.truncated(500);
    let t = GpuTrainer::new(&gpu, &model, &train, &test, 32, 0.1, 0).unwrap();
    let before = t.evaluate().unwrap();
    let mut last = None;
    let start = std::time::Instant::now();
    for epoch in 0..3 {
        last = Some(t.train_epoch(epoch, true, |_| {}).unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    let after = t.evaluate().unwrap();
    let last = last.unwrap();
    eprintln!(
        "before: acc {:.3}; after 240 steps: train loss {:.3} acc {:.3}, test loss {:.3} acc {:.3}; {:.0} examples/s on {}",
        before.accuracy(),
        last.loss(),
        last.accuracy(),
        after.loss(),
        after.accuracy(),
        3.0 * 2560.0 / secs,
        gpu.describe()
    );
    assert!(before.accuracy() < 0.25);
    assert!(last.loss() < 1.0, "train loss {}", last.loss());
    assert!(after.accuracy() > 0.6, "test accuracy {}", after.accuracy());
}

#[test]
fn a_batch_too_large_for_the_device_is_refused_naming_the_limit() {
    let Some(gpu) = gpu() else { return };
    let cap = gpu.limits.max_storage_buffer_binding_size;
    // The first layer's saved activations take 6*28*28*4 bytes per example.
    let batch = (cap / (6 * 28 * 28 * 4) + 1) as usize;
    let train = synthetic(batch, 1);
    let test = synthetic(10, 2);
    let e = match GpuTrainer::new(&gpu, lenet(), &train, &test, batch, 0.1, 0) {
        Ok(_) => panic!("a {batch}-example batch should not fit a {cap}-byte binding"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("max_storage_buffer_binding_size"), "{e}");
    assert!(e.contains(&format!("allows only {cap}")), "{e}");
    assert!(e.contains(&format!("f32[{batch},6,28,28]")), "{e}");
}

#[test]
fn divergence_stops_training_with_a_clear_message() {
    let Some(gpu) = gpu() else { return };
    let model = kiln_ir::LenetVariant::Relu.model();
    let train = synthetic(64, 7);
    let test = synthetic(8, 8);
    let t = GpuTrainer::new(&gpu, &model, &train, &test, 8, 1e4, 0).unwrap();
    let mut error = None;
    for epoch in 0..5 {
        if let Err(e) = t.train_epoch(epoch, true, |_| {}) {
            error = Some(e.to_string());
            break;
        }
    }
    let e = error.expect("lr 1e4 must blow the loss up");
    assert!(e.starts_with("training diverged: the loss became"), "{e}");
    assert!(e.contains("in epoch ") && e.contains(", step "), "{e}");
    assert!(e.ends_with("Try a lower learning rate (--lr)"), "{e}");
}

#[test]
fn edge_batch_sizes_work() {
    let Some(gpu) = gpu() else { return };
    let train = synthetic(3, 9);
    let test = synthetic(2, 10);
    // Batch size 1: three steps per epoch.
    let t = GpuTrainer::new(&gpu, lenet(), &train, &test, 1, 0.1, 0).unwrap();
    let mut ticks = Vec::new();
    let s = t.train_epoch(0, true, |s| ticks.push(s.examples)).unwrap();
    assert_eq!(s.examples, 3);
    assert_eq!(ticks.last(), Some(&3));
    assert_eq!(t.evaluate().unwrap().examples, 2);
    // A batch larger than the data set is one partial batch.
    let t = GpuTrainer::new(&gpu, lenet(), &train, &test, 100, 0.1, 0).unwrap();
    assert_eq!(t.train_epoch(0, true, |_| {}).unwrap().examples, 3);
    assert!(
        t.params()
            .unwrap()
            .values()
            .all(|p| p.as_f32().unwrap().iter().all(|v| v.is_finite()))
    );
}

#[test]
fn same_seed_gives_bit_identical_weights() {
    let Some(gpu) = gpu() else { return };
    let train = synthetic(48, 11);
    let test = synthetic(8, 12);
    let run = |seed| {
        let t = GpuTrainer::new(&gpu, lenet(), &train, &test, 16, 0.9, seed).unwrap();
        for epoch in 0..2 {
            t.train_epoch(epoch, true, |_| {}).unwrap();
        }
        t.params().unwrap()
    };
    let a = run(21);
    assert_eq!(a, run(21), "same seed, same device: identical bits");
    assert_ne!(a["0.weight"], run(22)["0.weight"]);
}
