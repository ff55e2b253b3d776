//! Each optimizer's step graph, run on the CPU reference for a few steps from fixed weights,
//! against values computed here independently: a linear classifier's softmax cross-entropy
//! gradient in closed form, and `torch.optim`'s update rules written out in f64.

use std::collections::HashMap;

use kiln_autodiff::{LABELS, Optimizer, STEP, state_name, training_step_with};
use kiln_ir::{Graph, Op, TensorType};
use kiln_reference::{Tensor, execute};

const N: usize = 4;
const D: usize = 3;
const C: usize = 3;

/// `output = x W^T + b`, W `[C, D]`, b `[C]`.
fn linear_model() -> Graph {
    let mut g = Graph::new("linear");
    let x = g.add_input("x", TensorType::f32([N, D])).unwrap();
    let w = g
        .add_param("0.weight", TensorType::f32([C, D]), None)
        .unwrap();
    let b = g.add_param("0.bias", TensorType::f32([C]), None).unwrap();
    let z = g
        .add(
            Op::MatMul {
                transpose_a: false,
                transpose_b: true,
            },
            &[x, w],
        )
        .unwrap();
    let out = g.add(Op::BiasAdd { axis: 1 }, &[z, b]).unwrap();
    g.add_output("output", out).unwrap();
    g
}

const X: [f64; N * D] = [
    0.5, -1.0, 2.0, 1.5, 0.25, -0.5, -2.0, 1.0, 0.75, 0.1, 0.2, -0.3,
];
const Y: [u32; N] = [2, 0, 1, 2];

/// Mean softmax cross-entropy's gradient in closed form: `dz = (softmax(z) - onehot) / N`,
/// `dW = dz^T x`, `db = sum_n dz`. Parameters as one vector: W row-major, then b.
fn gradient(theta: &[f64]) -> Vec<f64> {
    let (w, b) = theta.split_at(C * D);
    let mut grad = vec![0.0; C * D + C];
    for n in 0..N {
        let z: Vec<f64> = (0..C)
            .map(|c| b[c] + (0..D).map(|d| w[c * D + d] * X[n * D + d]).sum::<f64>())
            .collect();
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        for c in 0..C {
            let dz = (e[c] / s - if Y[n] as usize == c { 1.0 } else { 0.0 }) / N as f64;
            for d in 0..D {
                grad[c * D + d] += dz * X[n * D + d];
            }
            grad[C * D + c] += dz;
        }
    }
    grad
}

/// `torch.optim`'s rules, one step, on flat vectors; `state` holds what each keeps.
fn torch_step(opt: &Optimizer, theta: &mut [f64], state: &mut [Vec<f64>], t: usize) {
    let g0 = gradient(theta);
    let len = theta.len();
    match *opt {
        Optimizer::Sgd {
            lr,
            momentum,
            nesterov,
            weight_decay,
        } => {
            for i in 0..len {
                let mut g = g0[i] + weight_decay as f64 * theta[i];
                if momentum != 0.0 {
                    let buf = &mut state[0][i];
                    // The first step's buffer is the gradient itself.
                    *buf = if t == 1 {
                        g
                    } else {
                        momentum as f64 * *buf + g
                    };
                    g = if nesterov {
                        g + momentum as f64 * *buf
                    } else {
                        *buf
                    };
                }
                theta[i] -= lr as f64 * g;
            }
        }
        Optimizer::Adam {
            lr,
            betas,
            eps,
            weight_decay,
        }
        | Optimizer::AdamW {
            lr,
            betas,
            eps,
            weight_decay,
        } => {
            let (b1, b2) = (betas[0] as f64, betas[1] as f64);
            let decoupled = matches!(opt, Optimizer::AdamW { .. });
            for i in 0..len {
                let mut g = g0[i];
                if decoupled {
                    theta[i] *= 1.0 - lr as f64 * weight_decay as f64;
                } else {
                    g += weight_decay as f64 * theta[i];
                }
                state[0][i] = b1 * state[0][i] + (1.0 - b1) * g;
                state[1][i] = b2 * state[1][i] + (1.0 - b2) * g * g;
                let m_hat = state[0][i] / (1.0 - b1.powi(t as i32));
                let v_hat = state[1][i] / (1.0 - b2.powi(t as i32));
                theta[i] -= lr as f64 * m_hat / (v_hat.sqrt() + eps as f64);
            }
        }
    }
}

fn flat(params: &HashMap<String, Tensor>, w: &str, b: &str) -> Vec<f64> {
    let mut v: Vec<f64> = params[w]
        .as_f32()
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect();
    v.extend(params[b].as_f32().unwrap().iter().map(|&x| x as f64));
    v
}

fn check(what: &str, opt: Optimizer, keys: &[&str]) {
    let step = training_step_with(&linear_model(), &opt).unwrap();
    let x = Tensor::from_f32([N, D], X.iter().map(|&v| v as f32).collect()).unwrap();
    let labels = Tensor::from_u32([N], Y.to_vec()).unwrap();
    let inputs = HashMap::from([("x".to_string(), x), (LABELS.to_string(), labels)]);
    let w0: Vec<f32> = (0..C * D).map(|i| 0.3 - 0.07 * i as f32).collect();
    let b0 = vec![0.1, -0.2, 0.05];
    let mut leaves = HashMap::from([
        (
            "0.weight".to_string(),
            Tensor::from_f32([C, D], w0).unwrap(),
        ),
        ("0.bias".to_string(), Tensor::from_f32([C], b0).unwrap()),
    ]);
    for key in keys {
        for (p, shape) in [("0.weight", vec![C, D]), ("0.bias", vec![C])] {
            let zeros = vec![0.0; shape.iter().product()];
            leaves.insert(state_name(p, key), Tensor::from_f32(shape, zeros).unwrap());
        }
    }
    let adam = matches!(opt, Optimizer::Adam { .. } | Optimizer::AdamW { .. });
    if adam {
        leaves.insert(
            STEP.into(),
            Tensor::from_f32(Vec::<usize>::new(), vec![0.0]).unwrap(),
        );
    }
    let mut theta = flat(&leaves, "0.weight", "0.bias");
    let mut state = vec![vec![0.0; theta.len()]; keys.len()];
    for t in 1..=4 {
        let values = execute(&step, &inputs, &leaves).unwrap();
        for (name, value) in leaves.iter_mut() {
            *value = values.output(name).unwrap().clone();
        }
        torch_step(&opt, &mut theta, &mut state, t);
        let got = flat(&leaves, "0.weight", "0.bias");
        for (i, (g, w)) in got.iter().zip(&theta).enumerate() {
            assert!(
                (g - w).abs() <= 2e-6 * (1.0 + w.abs()),
                "{what}, step {t}: parameter {i} is {g}, torch's rule gives {w}"
            );
        }
        for (k, key) in keys.iter().enumerate() {
            let got = flat(
                &leaves,
                &state_name("0.weight", key),
                &state_name("0.bias", key),
            );
            for (i, (g, w)) in got.iter().zip(&state[k]).enumerate() {
                assert!(
                    (g - w).abs() <= 2e-6 * (1.0 + w.abs()),
                    "{what}, step {t}: {key}[{i}] is {g}, torch's rule gives {w}"
                );
            }
        }
        if adam {
            assert_eq!(
                leaves[STEP].as_f32().unwrap(),
                [t as f32],
                "{what}: step count"
            );
        }
    }
}

#[test]
fn sgd_with_weight_decay() {
    let opt = Optimizer::Sgd {
        lr: 0.5,
        momentum: 0.0,
        nesterov: false,
        weight_decay: 0.1,
    };
    check("sgd", opt, &[]);
}

#[test]
fn sgd_with_momentum() {
    let opt = Optimizer::Sgd {
        lr: 0.3,
        momentum: 0.9,
        nesterov: false,
        weight_decay: 0.0,
    };
    check("momentum", opt, &["momentum_buffer"]);
}

#[test]
fn sgd_with_nesterov_momentum_and_weight_decay() {
    let opt = Optimizer::Sgd {
        lr: 0.3,
        momentum: 0.8,
        nesterov: true,
        weight_decay: 0.05,
    };
    check("nesterov", opt, &["momentum_buffer"]);
}

#[test]
fn adam_with_bias_correction() {
    check("adam", Optimizer::adam(0.05), &["exp_avg", "exp_avg_sq"]);
}

#[test]
fn adam_with_l2_weight_decay_and_other_betas() {
    let opt = Optimizer::Adam {
        lr: 0.05,
        betas: [0.3, 0.9],
        eps: 1e-3,
        weight_decay: 0.2,
    };
    check("adam+wd", opt, &["exp_avg", "exp_avg_sq"]);
}

#[test]
fn adamw_decouples_weight_decay() {
    let opt = Optimizer::AdamW {
        lr: 0.05,
        betas: [0.9, 0.999],
        eps: 1e-8,
        weight_decay: 0.5,
    };
    check("adamw", opt, &["exp_avg", "exp_avg_sq"]);
}

#[test]
fn invalid_settings_are_refused_with_pytorchs_reason() {
    let bad = Optimizer::Adam {
        lr: 1e-3,
        betas: [0.9, 1.0],
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let e = training_step_with(&linear_model(), &bad).unwrap_err();
    assert!(
        e.to_string().contains("Invalid beta parameter at index 1"),
        "{e}"
    );
    let bad = Optimizer::Sgd {
        lr: 0.1,
        momentum: 0.0,
        nesterov: true,
        weight_decay: 0.0,
    };
    let e = training_step_with(&linear_model(), &bad).unwrap_err();
    assert!(e.to_string().contains("Nesterov"), "{e}");
    let e = training_step_with(&linear_model(), &Optimizer::sgd(f32::NAN)).unwrap_err();
    assert!(e.to_string().contains("learning rate"), "{e}");
}
