//! Gradient checks: derived gradients against central finite differences, all in f64.
//!
//! Finite differences are taken with step h and h/2; where the two disagree the function is not
//! smooth at that point (a ReLU or max-pool switch inside the step) and the element is skipped.
//! Skips must stay rare, so a broken rule cannot hide behind them.

use std::collections::HashMap;

use kiln_autodiff::{gradients, training_step};
use kiln_ir::testing::{random_layer, random_model};
use kiln_ir::{DType, Graph, NodeId, Op, Scalar, TensorType, lenet};
use kiln_reference::{Tensor, execute};
use proptest::prelude::*;

/// Deterministic values in [-1, 1).
fn noise(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

/// Adds a scalar mean softmax cross-entropy loss over the model's output and returns it.
fn with_loss(forward: &Graph) -> (Graph, NodeId) {
    let mut g = forward.clone();
    let logits = g.output("output").unwrap();
    let n = g.ty(logits).shape[0];
    let labels = g
        .add_input("labels", TensorType::new(DType::U32, [n]))
        .unwrap();
    let losses = g.add(Op::SoftmaxCrossEntropy, &[logits, labels]).unwrap();
    let loss = g.add(Op::ReduceMean { axes: vec![0] }, &[losses]).unwrap();
    g.clear_outputs();
    g.add_output("loss", loss).unwrap();
    (g, loss)
}

struct Feeds {
    inputs: HashMap<String, Tensor<f64>>,
    params: HashMap<String, Tensor<f64>>,
}

fn feeds(g: &Graph, seed: u64, classes: usize) -> Feeds {
    let mut inputs = HashMap::new();
    for (i, (_, name, ty)) in g.inputs().enumerate() {
        let t = match ty.dtype {
            DType::F32 => Tensor::from_float(ty.shape.clone(), noise(seed + i as u64, ty.numel())),
            _ => {
                let labels = noise(seed + 77, ty.numel())
                    .iter()
                    .map(|v| ((v + 1.0) * 0.5 * classes as f64) as u32 % classes as u32)
                    .collect();
                Tensor::from_u32(ty.shape.clone(), labels)
            }
        };
        inputs.insert(name.to_string(), t.unwrap());
    }
    let params = g
        .params()
        .enumerate()
        .map(|(i, (_, name, ty))| {
            let v = noise(seed * 31 + i as u64, ty.numel())
                .iter()
                .map(|v| v * 0.7)
                .collect();
            (
                name.to_string(),
                Tensor::from_float(ty.shape.clone(), v).unwrap(),
            )
        })
        .collect();
    Feeds { inputs, params }
}

fn loss_of(g: &Graph, f: &Feeds) -> f64 {
    execute(g, &f.inputs, &f.params)
        .unwrap()
        .output("loss")
        .unwrap()
        .as_float()
        .unwrap()[0]
}

/// Checks d loss / d every parameter and every f32 input, sampling at most `per_tensor`
/// elements of each. Returns (checked, skipped).
fn check(g: &Graph, loss: NodeId, f: &mut Feeds, per_tensor: usize) -> (usize, usize) {
    let wrt: Vec<(NodeId, String, bool)> = g
        .iter()
        .filter_map(|(id, n)| match &n.op {
            Op::Param { name } => Some((id, name.clone(), true)),
            Op::Input { name } if n.ty.dtype == DType::F32 => Some((id, name.clone(), false)),
            _ => None,
        })
        .collect();
    let mut with_grads = g.clone();
    let ids: Vec<NodeId> = wrt.iter().map(|w| w.0).collect();
    let grads = gradients(&mut with_grads, loss, &ids).unwrap();
    for (k, &d) in grads.iter().enumerate() {
        with_grads.add_output(format!("grad{k}"), d).unwrap();
    }
    kiln_ir::verify(&with_grads).unwrap();
    let values = execute(&with_grads, &f.inputs, &f.params).unwrap();
    let (mut checked, mut skipped) = (0, 0);
    for (k, (_, name, is_param)) in wrt.iter().enumerate() {
        let analytic = values
            .output(&format!("grad{k}"))
            .unwrap()
            .as_float()
            .unwrap()
            .to_vec();
        let len = analytic.len();
        let picks: Vec<usize> = if len <= per_tensor {
            (0..len).collect()
        } else {
            noise(k as u64 + 5, per_tensor)
                .iter()
                .map(|v| ((v + 1.0) * 0.5 * len as f64) as usize % len)
                .collect()
        };
        for i in picks {
            let mut fd = |h: f64| {
                let feeds = if *is_param {
                    &mut f.params
                } else {
                    &mut f.inputs
                };
                let orig = feeds[name].as_float().unwrap()[i];
                feeds.get_mut(name).unwrap().as_float_mut().unwrap()[i] = orig + h;
                let up = loss_of(g, f);
                let feeds = if *is_param {
                    &mut f.params
                } else {
                    &mut f.inputs
                };
                feeds.get_mut(name).unwrap().as_float_mut().unwrap()[i] = orig - h;
                let down = loss_of(g, f);
                let feeds = if *is_param {
                    &mut f.params
                } else {
                    &mut f.inputs
                };
                feeds.get_mut(name).unwrap().as_float_mut().unwrap()[i] = orig;
                (up - down) / (2.0 * h)
            };
            let (coarse, fine) = (fd(1e-5), fd(5e-6));
            let tol = |a: f64, b: f64| 1e-8 + 1e-6 * a.abs().max(b.abs());
            if (coarse - fine).abs() > tol(coarse, fine) {
                skipped += 1; // not smooth within the step: a kink of relu or max pool
                continue;
            }
            let a = analytic[i];
            assert!(
                (a - fine).abs() <= tol(a, fine),
                "d loss / d {name}[{i}]: derived {a:e}, finite difference {fine:e}"
            );
            checked += 1;
        }
    }
    (checked, skipped)
}

#[test]
fn lenet_gradients_match_finite_differences() {
    let forward = lenet()
        .build("lenet", TensorType::f32([2, 1, 28, 28]))
        .unwrap();
    let (g, loss) = with_loss(&forward);
    let mut f = feeds(&g, 3, 10);
    let (checked, skipped) = check(&g, loss, &mut f, 12);
    assert!(
        checked >= 120 && skipped == 0,
        "checked {checked}, skipped {skipped}"
    );
}

#[test]
fn lenet_relu_maxpool_gradients_match_finite_differences() {
    let model = kiln_ir::LenetVariant::ReluMaxPool.model();
    let forward = model
        .build("lenet_relu", TensorType::f32([2, 1, 28, 28]))
        .unwrap();
    let (g, loss) = with_loss(&forward);
    let mut f = feeds(&g, 4, 10);
    let (checked, skipped) = check(&g, loss, &mut f, 12);
    assert!(
        checked >= 120 && skipped <= 3,
        "checked {checked}, skipped {skipped}"
    );
}

#[test]
fn training_step_applies_sgd_with_the_derived_gradients() {
    let forward = lenet()
        .build("lenet", TensorType::f32([3, 1, 28, 28]))
        .unwrap();
    let lr = 0.5f32;
    let step = training_step(&forward, lr).unwrap();
    let (g, loss) = with_loss(&forward);
    let f = feeds(&g, 9, 10);
    let after = execute(&step, &f.inputs, &f.params).unwrap();
    let mut with_grads = g.clone();
    let params: Vec<(NodeId, String)> = g.params().map(|(id, n, _)| (id, n.to_string())).collect();
    let ids: Vec<NodeId> = params.iter().map(|p| p.0).collect();
    let grads = gradients(&mut with_grads, loss, &ids).unwrap();
    for (k, &d) in grads.iter().enumerate() {
        with_grads.add_output(format!("grad{k}"), d).unwrap();
    }
    let values = execute(&with_grads, &f.inputs, &f.params).unwrap();
    for (k, (_, name)) in params.iter().enumerate() {
        let p = f.params[name].as_float().unwrap();
        let d = values
            .output(&format!("grad{k}"))
            .unwrap()
            .as_float()
            .unwrap();
        let updated = after.output(name).unwrap().as_float().unwrap();
        for i in 0..p.len() {
            let want = p[i] - lr as f64 * d[i];
            assert!(
                (updated[i] - want).abs() <= 1e-12,
                "{name}[{i}]: {} vs {want}",
                updated[i]
            );
        }
    }
    // The loss sum and correct count are reported too.
    let loss_sum = after.output("loss_sum").unwrap().as_float().unwrap()[0];
    assert!((loss_sum / 3.0 - loss_of(&g, &f)).abs() < 1e-12);
    let correct = after.output("correct").unwrap();
    assert_eq!(correct.ty(), TensorType::new(DType::U32, []));
}

#[test]
fn gradient_accumulates_over_several_consumers() {
    // loss = sum(tanh(x) + sigmoid(x) - 2 * tanh(x)) reads x three times, tanh(x) twice.
    let mut g = Graph::new("fanout");
    let x = g.add_input("x", TensorType::f32([2, 3])).unwrap();
    let t = g.add(Op::Tanh, &[x]).unwrap();
    let s = g.add(Op::Sigmoid, &[x]).unwrap();
    let a = g.add(Op::Add, &[t, s]).unwrap();
    let t2 = g
        .add(
            Op::Scale {
                factor: Scalar(2.0),
            },
            &[t],
        )
        .unwrap();
    let d = g.add(Op::Sub, &[a, t2]).unwrap();
    let b = g
        .add(
            Op::Broadcast {
                shape: vec![4, 2, 3],
                axes: vec![0],
            },
            &[d],
        )
        .unwrap();
    let loss = g
        .add(
            Op::ReduceMean {
                axes: vec![0, 1, 2],
            },
            &[b],
        )
        .unwrap();
    g.add_output("loss", loss).unwrap();
    let mut f = Feeds {
        inputs: HashMap::from([("x".into(), Tensor::from_float([2, 3], noise(1, 6)).unwrap())]),
        params: HashMap::new(),
    };
    let (checked, skipped) = check(&g, loss, &mut f, 6);
    assert_eq!((checked, skipped), (6, 0));
}

#[test]
fn unrelated_and_integer_nodes_get_no_gradient_flow() {
    let mut g = Graph::new("g");
    let x = g.add_input("x", TensorType::f32([2])).unwrap();
    let unused = g.add_param("unused", TensorType::f32([3]), None).unwrap();
    let loss = g.add(Op::ReduceSum { axes: vec![0] }, &[x]).unwrap();
    let grads = gradients(&mut g, loss, &[unused, x]).unwrap();
    assert_eq!(
        g.node(grads[0]).op,
        Op::Full {
            shape: vec![3],
            value: Scalar(0.0)
        }
    );
    assert_eq!(
        g.node(grads[1]).op,
        Op::Full {
            shape: vec![2],
            value: Scalar(1.0)
        }
    );
    let not_scalar = gradients(&mut g, x, &[x]).unwrap_err();
    assert_eq!(
        not_scalar.to_string(),
        "the loss %0 must be an f32 scalar (f32[]), got f32[2]"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn random_models_gradients_match_finite_differences(
        input in (1usize..3, 1usize..3, 4usize..8),
        convs in proptest::collection::vec(random_layer(), 0..4),
        hidden in proptest::collection::vec((1usize..6, any::<u8>()), 0..3),
        classes in 2usize..5,
        seed in any::<u64>(),
    ) {
        let (n, c, side) = input;
        let Some(forward) = random_model(c, side, convs, hidden, classes)
            .and_then(|m| m.build("random", TensorType::f32([n, c, side, side])).ok())
        else {
            return Err(TestCaseError::reject("layer stack does not fit the input"));
        };
        let (g, loss) = with_loss(&forward);
        let mut f = feeds(&g, seed % 1000, classes);
        let (checked, skipped) = check(&g, loss, &mut f, 8);
        prop_assert!(checked > 0 && skipped * 10 <= checked + skipped, "checked {}, skipped {}", checked, skipped);
    }
}
