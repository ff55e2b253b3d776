//! Parameter initialisation as d2l does it for LeNet: Xavier-uniform weights, PyTorch-default
//! biases, from one seeded stream.

use std::collections::HashMap;

use kiln_ir::{Graph, TensorType};
use kiln_reference::Tensor;

use crate::rng::{Rng, Stream};

/// A parameter that the initialiser cannot place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InitError {
    #[error("parameter `{name}` ({ty}) is neither a weight (rank >= 2) nor a bias (rank 1)")]
    UnknownKind { name: String, ty: TensorType },
    #[error("bias `{name}` has no matching weight `{weight}` to take its fan-in from")]
    OrphanBias { name: String, weight: String },
}

/// `(fan_in, fan_out)` of a weight shaped `[out, in, k...]` (linear `[out, in]`, conv
/// `[O, C, KH, KW]`), as `torch.nn.init._calculate_fan_in_and_fan_out` computes them.
pub fn fans(shape: &[usize]) -> (usize, usize) {
    let receptive: usize = shape[2..].iter().product();
    (shape[1] * receptive, shape[0] * receptive)
}

/// Initial values for every parameter of `graph`, in the graph's parameter order:
/// - weights (rank >= 2): Xavier/Glorot uniform, `U(-a, a)` with `a = sqrt(6 / (fan_in + fan_out))`
///   (`nn.init.xavier_uniform_`, which d2l's `init_cnn` applies to every Conv2d and Linear);
/// - biases `P.bias`: PyTorch's default `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, with the fan-in of
///   `P.weight`.
///
/// The same seed gives bit-identical values on every platform.
pub fn init_params(graph: &Graph, seed: u64) -> Result<HashMap<String, Tensor>, InitError> {
    let shapes: HashMap<&str, &TensorType> = graph.params().map(|(_, n, t)| (n, t)).collect();
    let mut rng = Rng::new(seed, Stream::Init);
    let mut out = HashMap::new();
    for (_, name, ty) in graph.params() {
        let bound = match ty.rank() {
            r if r >= 2 => {
                let (fan_in, fan_out) = fans(&ty.shape);
                (6.0 / (fan_in + fan_out) as f64).sqrt()
            }
            1 => {
                let weight = match name.strip_suffix("bias") {
                    Some(prefix) => format!("{prefix}weight"),
                    None => format!("{name}.weight"),
                };
                let w = shapes
                    .get(weight.as_str())
                    .filter(|t| t.rank() >= 2)
                    .ok_or_else(|| InitError::OrphanBias {
                        name: name.to_string(),
                        weight: weight.clone(),
                    })?;
                1.0 / (fans(&w.shape).0 as f64).sqrt()
            }
            _ => {
                return Err(InitError::UnknownKind {
                    name: name.to_string(),
                    ty: ty.clone(),
                });
            }
        } as f32;
        let values = (0..ty.numel())
            .map(|_| rng.uniform(-bound, bound))
            .collect();
        let t = Tensor::from_f32(ty.shape.clone(), values).expect("numel values for the shape");
        out.insert(name.to_string(), t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::lenet;

    #[test]
    fn lenet_init_follows_xavier_and_pytorch_bias_bounds() {
        let g = lenet()
            .build("lenet", TensorType::f32([1, 1, 28, 28]))
            .unwrap();
        let p = init_params(&g, 42).unwrap();
        assert_eq!(p.len(), 10);
        let check = |name: &str, bound: f64| {
            let v = p[name].as_f32().unwrap();
            let max = v.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
            assert!(max <= bound, "{name}: {max} > {bound}");
            // Uniform draws fill the interval: the largest magnitude is close to the bound.
            assert!(max > bound * 0.8, "{name}: {max} far below {bound}");
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
            assert!(mean.abs() < bound * 0.5, "{name}: mean {mean}");
        };
        check("0.weight", (6.0f64 / (25.0 + 150.0)).sqrt());
        check("3.weight", (6.0f64 / (150.0 + 400.0)).sqrt());
        check("7.weight", (6.0f64 / (400.0 + 120.0)).sqrt());
        check("11.weight", (6.0f64 / (84.0 + 10.0)).sqrt());
        check("0.bias", 1.0 / 25f64.sqrt());
        check("3.bias", 1.0 / 150f64.sqrt());
        check("7.bias", 1.0 / 400f64.sqrt());
        check("9.bias", 1.0 / 120f64.sqrt());
        // Variance of U(-a, a) is a^2/3: the big fc1 weight matches it closely.
        let v = p["7.weight"].as_f32().unwrap();
        let var = v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / v.len() as f64;
        let a2 = 6.0 / 520.0;
        assert!((var / (a2 / 3.0) - 1.0).abs() < 0.03, "variance {var}");
    }

    #[test]
    fn same_seed_same_weights_different_seed_different_weights() {
        let g = lenet()
            .build("lenet", TensorType::f32([1, 1, 28, 28]))
            .unwrap();
        assert_eq!(init_params(&g, 1).unwrap(), init_params(&g, 1).unwrap());
        assert_ne!(
            init_params(&g, 1).unwrap()["0.weight"],
            init_params(&g, 2).unwrap()["0.weight"]
        );
        // The batch size does not change the initial weights.
        let g256 = lenet()
            .build("lenet", TensorType::f32([256, 1, 28, 28]))
            .unwrap();
        assert_eq!(init_params(&g, 1).unwrap(), init_params(&g256, 1).unwrap());
        // Pinned: the first weights for seed 0 on every platform.
        let first: Vec<f32> =
            init_params(&g, 0).unwrap()["0.weight"].as_f32().unwrap()[..3].to_vec();
        assert_eq!(first, PINNED_FIRST);
    }

    const PINNED_FIRST: [f32; 3] = [0.057_288_677, 0.077_426_48, 0.085_127_25];

    #[test]
    fn orphan_bias_is_an_error() {
        let mut g = Graph::new("g");
        g.add_param("5.bias", TensorType::f32([3]), None).unwrap();
        assert_eq!(
            init_params(&g, 0).unwrap_err().to_string(),
            "bias `5.bias` has no matching weight `5.weight` to take its fan-in from"
        );
    }
}
