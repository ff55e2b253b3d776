//! Every optimizer compiled into the GPU step against the same step on the CPU reference:
//! parameters and optimizer state after full and partial batches at batch 256, on the
//! device's schedules and the portable ones.

mod common;

use common::{gpu, max_error, synthetic};
use kiln_autodiff::{Optimizer, STEP};
use kiln_compiler::Target;
use kiln_ir::{LenetVariant, Sequential};
use kiln_runtime::GpuTrainer;
use kiln_train::CpuTrainer;

fn optimizers() -> Vec<(&'static str, Optimizer)> {
    vec![
        (
            "sgd+wd",
            Optimizer::Sgd {
                lr: 0.5,
                momentum: 0.0,
                nesterov: false,
                weight_decay: 1e-3,
            },
        ),
        (
            "momentum",
            Optimizer::Sgd {
                lr: 0.1,
                momentum: 0.9,
                nesterov: false,
                weight_decay: 0.0,
            },
        ),
        (
            "nesterov+wd",
            Optimizer::Sgd {
                lr: 0.1,
                momentum: 0.9,
                nesterov: true,
                weight_decay: 5e-4,
            },
        ),
        ("adam", Optimizer::adam(1e-3)),
        (
            "adam+wd",
            Optimizer::Adam {
                lr: 2e-3,
                betas: [0.8, 0.99],
                eps: 1e-6,
                weight_decay: 1e-2,
            },
        ),
        ("adamw", Optimizer::adamw(1e-3)),
    ]
}

/// Sigmoid/average-pool LeNet for most, a wider ReLU/max-pool net for two: the optimizer
/// epilogue lands in different gradient schedules.
fn model(k: usize) -> Sequential {
    if k % 3 != 1 {
        LenetVariant::Lenet.model()
    } else {
        LenetVariant::Wide.model()
    }
}

#[test]
fn every_optimizer_matches_the_reference_on_both_targets() {
    let Some(gpu) = gpu() else { return };
    // 300 examples at batch 256: a full step and a partial one of 44, which shares the state
    // and the step count with the full-batch program.
    let train = synthetic(300, 11);
    let test = synthetic(8, 12);
    let order: Vec<u32> = (0..300).collect();
    for (k, (what, optimizer)) in optimizers().into_iter().enumerate() {
        let mut cpu = CpuTrainer::new(model(k), [1, 28, 28], optimizer, 3).unwrap();
        let mut losses = Vec::new();
        for chunk in order.chunks(256) {
            losses.push(cpu.step(&train, chunk).unwrap().0);
        }
        if let Some(t) = cpu.state.get(STEP) {
            assert_eq!(t.as_f32().unwrap(), [2.0], "{what}: reference step count");
        }
        for (target_name, target) in [
            ("device", gpu.target.clone()),
            ("portable", Target::portable_for(&gpu.target)),
        ] {
            let at = format!("{what}, {target_name} target");
            let t =
                GpuTrainer::with_target(&gpu, target, model(k), &train, &test, 256, optimizer, 3)
                    .unwrap_or_else(|e| panic!("{at}: {e}"));
            let stats = t.train_order(&order).unwrap();
            let loss: f64 = losses.iter().sum();
            assert!(
                (stats.loss_sum - loss).abs() <= 1e-4 * loss,
                "{at}: loss {} vs {loss}",
                stats.loss_sum
            );
            let params = t.params().unwrap();
            for (name, want) in &cpu.params {
                let e = max_error(&params[name], want);
                assert!(e <= 2e-5, "{at}: {name} off by {e:e}");
            }
            let state = t.state().unwrap();
            assert_eq!(state.len(), cpu.state.len(), "{at}: state tensors");
            for (name, want) in &cpu.state {
                let e = max_error(&state[name], want);
                assert!(e <= 2e-5, "{at}: state {name} off by {e:e}");
            }
        }
    }
}
