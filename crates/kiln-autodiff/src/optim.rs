//! Optimizers as IR: the update of every parameter, and of the optimizer's own state, appended
//! to the training step after the gradients, so that the compiler fuses it into the gradient
//! kernels like any other epilogue.
//!
//! The formulas are `torch.optim`'s single-tensor implementations, op for op, so that a step
//! from the same weights and state computes what PyTorch computes:
//! - `SGD`: `g = dp + wd * p`; with momentum `buf = momentum * buf + g` (on the first step
//!   `buf = g`: the buffer starts at zero, and `momentum * 0 + g` is exactly `g`), then
//!   `g = g + momentum * buf` with Nesterov or `g = buf` without; `p = p - lr * g`. PyTorch's
//!   `dampening` is not offered (0, its default; Nesterov requires it).
//! - `Adam`: `t = t + 1`; `g = dp + wd * p`; `m = m.lerp(g, 1 - beta1)`;
//!   `v = beta2 * v + (1 - beta2) * g * g`; `p = p - (lr / (1 - beta1^t)) * m /
//!   (sqrt(v) / sqrt(1 - beta2^t) + eps)`.
//! - `AdamW`: `p = p * (1 - lr * wd)` first, then Adam without weight decay.
//!
//! State lives in parameters of the step graph (leaves named by [`state_name`] and [`STEP`])
//! whose updated values are outputs of the same name, so the compiler writes them in place like
//! the parameters. The step count is an `f32[]` on the device (as PyTorch keeps it), and the
//! bias corrections are computed from it in the kernels: an epoch needs no host round trip.

use kiln_ir::{Graph, GraphError, LayerRef, NodeId, Op, Scalar, TensorType};

/// The step-count leaf shared by every parameter's Adam update.
pub const STEP: &str = "optim.step";

/// The leaf holding `key` (`momentum_buffer`, `exp_avg`, `exp_avg_sq`) of parameter `param`.
pub fn state_name(param: &str, key: &str) -> String {
    format!("optim.{param}.{key}")
}

/// An optimizer and its hyperparameters, with `torch.optim`'s meaning and defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    /// `torch.optim.SGD` (dampening 0).
    Sgd {
        lr: f32,
        momentum: f32,
        nesterov: bool,
        weight_decay: f32,
    },
    /// `torch.optim.Adam` (L2 weight decay added to the gradient; no amsgrad).
    Adam {
        lr: f32,
        betas: [f32; 2],
        eps: f32,
        weight_decay: f32,
    },
    /// `torch.optim.AdamW` (decoupled weight decay; no amsgrad).
    AdamW {
        lr: f32,
        betas: [f32; 2],
        eps: f32,
        weight_decay: f32,
    },
}

/// One tensor of optimizer state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateTensor {
    /// The step graph's leaf.
    pub name: String,
    /// The parameter it belongs to; `None` for the shared step count.
    pub param: Option<String>,
    /// PyTorch's key in `optimizer.state_dict()["state"][i]`.
    pub key: &'static str,
    pub ty: TensorType,
}

/// A bare learning rate is plain SGD.
impl From<f32> for Optimizer {
    fn from(lr: f32) -> Self {
        Optimizer::sgd(lr)
    }
}

impl Optimizer {
    /// Plain SGD, as d2l trains.
    pub fn sgd(lr: f32) -> Self {
        Optimizer::Sgd {
            lr,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }

    /// Adam with PyTorch's defaults (betas 0.9, 0.999; eps 1e-8; no weight decay).
    pub fn adam(lr: f32) -> Self {
        Optimizer::Adam {
            lr,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    /// AdamW with PyTorch's defaults (betas 0.9, 0.999; eps 1e-8; weight decay 0.01).
    pub fn adamw(lr: f32) -> Self {
        Optimizer::AdamW {
            lr,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }

    pub fn lr(&self) -> f32 {
        match *self {
            Optimizer::Sgd { lr, .. }
            | Optimizer::Adam { lr, .. }
            | Optimizer::AdamW { lr, .. } => lr,
        }
    }

    /// PyTorch's class name.
    pub fn torch_name(&self) -> &'static str {
        match self {
            Optimizer::Sgd { .. } => "SGD",
            Optimizer::Adam { .. } => "Adam",
            Optimizer::AdamW { .. } => "AdamW",
        }
    }

    /// The hyperparameters as PyTorch's `param_groups[0]` (JSON, without `params`).
    pub fn param_group_json(&self) -> String {
        match *self {
            Optimizer::Sgd {
                lr,
                momentum,
                nesterov,
                weight_decay,
            } => format!(
                "{{\"lr\": {lr:?}, \"momentum\": {momentum:?}, \"dampening\": 0.0, \
                 \"weight_decay\": {weight_decay:?}, \"nesterov\": {nesterov}, \
                 \"maximize\": false}}"
            ),
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
            } => format!(
                "{{\"lr\": {lr:?}, \"betas\": [{:?}, {:?}], \"eps\": {eps:?}, \
                 \"weight_decay\": {weight_decay:?}, \"amsgrad\": false, \"maximize\": false}}",
                betas[0], betas[1]
            ),
        }
    }

    /// PyTorch's argument checks, with its wording where it has one.
    pub fn validate(&self) -> Result<(), String> {
        let finite_nonneg = |v: f32, what: &str| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!(
                    "Invalid {what} value: {v} (must be finite and >= 0)"
                ))
            }
        };
        finite_nonneg(self.lr(), "learning rate")?;
        match *self {
            Optimizer::Sgd {
                momentum,
                nesterov,
                weight_decay,
                ..
            } => {
                finite_nonneg(momentum, "momentum")?;
                finite_nonneg(weight_decay, "weight_decay")?;
                if nesterov && momentum <= 0.0 {
                    return Err("Nesterov momentum requires a momentum above 0".into());
                }
            }
            Optimizer::Adam {
                betas,
                eps,
                weight_decay,
                ..
            }
            | Optimizer::AdamW {
                betas,
                eps,
                weight_decay,
                ..
            } => {
                for (k, b) in betas.iter().enumerate() {
                    if !(0.0..1.0).contains(b) {
                        return Err(format!(
                            "Invalid beta parameter at index {k}: {b} (must be in [0, 1))"
                        ));
                    }
                }
                finite_nonneg(eps, "epsilon")?;
                finite_nonneg(weight_decay, "weight_decay")?;
            }
        }
        Ok(())
    }

    /// The state this optimizer keeps for parameters `params` (name, type), in order, the
    /// shared step count (if any) last.
    pub fn state<'a>(
        &self,
        params: impl IntoIterator<Item = (&'a str, &'a TensorType)>,
    ) -> Vec<StateTensor> {
        let keys: &[&'static str] = match self {
            Optimizer::Sgd { momentum, .. } if *momentum > 0.0 => &["momentum_buffer"],
            Optimizer::Sgd { .. } => &[],
            Optimizer::Adam { .. } | Optimizer::AdamW { .. } => &["exp_avg", "exp_avg_sq"],
        };
        let mut out = Vec::new();
        for (param, ty) in params {
            for &key in keys {
                out.push(StateTensor {
                    name: state_name(param, key),
                    param: Some(param.to_string()),
                    key,
                    ty: ty.clone(),
                });
            }
        }
        if matches!(self, Optimizer::Adam { .. } | Optimizer::AdamW { .. }) {
            out.push(StateTensor {
                name: STEP.into(),
                param: None,
                key: "step",
                ty: TensorType::f32(Vec::<usize>::new()),
            });
        }
        out
    }
}

/// Appends the optimizer's update of every parameter in `params` (id, name, gradient) and of
/// its state; returns `(output name, updated value)` pairs.
pub(crate) fn append_updates(
    g: &mut Graph,
    optimizer: &Optimizer,
    params: &[(NodeId, String, NodeId)],
) -> Result<Vec<(String, NodeId)>, GraphError> {
    let mut outputs = Vec::new();
    // The step count and the scalars every parameter's update shares.
    let step = match optimizer {
        Optimizer::Adam { .. } | Optimizer::AdamW { .. } => {
            let scalar = TensorType::f32(Vec::<usize>::new());
            let t = g.add_param(STEP, scalar, None)?;
            let one = full(g, &[], 1.0)?;
            let t1 = g.add(Op::Add, &[t, one])?;
            outputs.push((STEP.to_string(), t1));
            Some(t1)
        }
        Optimizer::Sgd { .. } => None,
    };
    for (p, name, dp) in params {
        let (p, dp) = (*p, *dp);
        let layer = g.node(p).layer.clone();
        let ty = g.ty(p).clone();
        let mut u = Updater {
            g,
            layer: layer.clone(),
        };
        let state = |key: &str| state_name(name, key);
        match *optimizer {
            Optimizer::Sgd {
                lr,
                momentum,
                nesterov,
                weight_decay,
            } => {
                let mut grad = dp;
                if weight_decay != 0.0 {
                    let decay = u.scale(p, weight_decay)?;
                    grad = u.op(Op::Add, &[grad, decay])?;
                }
                if momentum != 0.0 {
                    let buf = u.g.add_param(state("momentum_buffer"), ty.clone(), layer)?;
                    let kept = u.scale(buf, momentum)?;
                    let buf1 = u.op(Op::Add, &[kept, grad])?;
                    outputs.push((state("momentum_buffer"), buf1));
                    grad = if nesterov {
                        let ahead = u.scale(buf1, momentum)?;
                        u.op(Op::Add, &[grad, ahead])?
                    } else {
                        buf1
                    };
                }
                let step = u.scale(grad, lr)?;
                outputs.push((name.clone(), u.op(Op::Sub, &[p, step])?));
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
                let decoupled = matches!(optimizer, Optimizer::AdamW { .. });
                let t = step.expect("Adam has a step count");
                let mut grad = dp;
                let mut param = p;
                if weight_decay != 0.0 {
                    if decoupled {
                        param = u.scale(p, (1.0 - lr as f64 * weight_decay as f64) as f32)?;
                    } else {
                        let decay = u.scale(p, weight_decay)?;
                        grad = u.op(Op::Add, &[grad, decay])?;
                    }
                }
                let m = u.g.add_param(state("exp_avg"), ty.clone(), layer.clone())?;
                let v = u.g.add_param(state("exp_avg_sq"), ty.clone(), layer)?;
                // m.lerp(g, w) as PyTorch computes it: from the nearer end.
                let w = 1.0 - betas[0] as f64;
                let m1 = if w < 0.5 {
                    let d = u.op(Op::Sub, &[grad, m])?;
                    let d = u.scale(d, w as f32)?;
                    u.op(Op::Add, &[m, d])?
                } else {
                    let d = u.op(Op::Sub, &[grad, m])?;
                    let d = u.scale(d, (1.0 - w) as f32)?;
                    u.op(Op::Sub, &[grad, d])?
                };
                outputs.push((state("exp_avg"), m1));
                let kept = u.scale(v, betas[1])?;
                let sq = u.op(Op::Mul, &[grad, grad])?;
                let sq = u.scale(sq, (1.0 - betas[1] as f64) as f32)?;
                let v1 = u.op(Op::Add, &[kept, sq])?;
                outputs.push((state("exp_avg_sq"), v1));
                // Scalars from the step count: 1 - beta^t = 1 - exp(t ln beta).
                let correction = |u: &mut Updater, beta: f32| -> Result<NodeId, GraphError> {
                    if beta == 0.0 {
                        // 0^t = 0 from the first step on.
                        return full(u.g, &[], 1.0);
                    }
                    let power = u.scale(t, (beta as f64).ln() as f32)?;
                    let power = u.op(Op::Exp, &[power])?;
                    let one = full(u.g, &[], 1.0)?;
                    u.op(Op::Sub, &[one, power])
                };
                let bc1 = correction(&mut u, betas[0])?;
                let bc2 = correction(&mut u, betas[1])?;
                let lr_t = full(u.g, &[], lr)?;
                let step_size = u.op(Op::Div, &[lr_t, bc1])?;
                let bc2_sqrt = u.op(Op::Sqrt, &[bc2])?;
                let root = u.op(Op::Sqrt, &[v1])?;
                let bc2_sqrt = u.broadcast(bc2_sqrt, &ty.shape)?;
                let denom = u.op(Op::Div, &[root, bc2_sqrt])?;
                let eps = full(u.g, &ty.shape, eps)?;
                let denom = u.op(Op::Add, &[denom, eps])?;
                let ratio = u.op(Op::Div, &[m1, denom])?;
                let step_size = u.broadcast(step_size, &ty.shape)?;
                let delta = u.op(Op::Mul, &[step_size, ratio])?;
                outputs.push((name.clone(), u.op(Op::Sub, &[param, delta])?));
            }
        }
    }
    Ok(outputs)
}

/// A constant.
fn full(g: &mut Graph, shape: &[usize], value: f32) -> Result<NodeId, GraphError> {
    g.add(
        Op::Full {
            shape: shape.to_vec(),
            value: Scalar(value),
        },
        &[],
    )
}

/// Adds a parameter's update ops, tagged with its layer.
struct Updater<'g> {
    g: &'g mut Graph,
    layer: Option<LayerRef>,
}

impl Updater<'_> {
    fn op(&mut self, op: Op, inputs: &[NodeId]) -> Result<NodeId, GraphError> {
        self.g.add_in_layer(op, inputs, self.layer.clone())
    }

    fn scale(&mut self, x: NodeId, factor: f32) -> Result<NodeId, GraphError> {
        self.op(
            Op::Scale {
                factor: Scalar(factor),
            },
            &[x],
        )
    }

    /// A scalar repeated to `shape`.
    fn broadcast(&mut self, x: NodeId, shape: &[usize]) -> Result<NodeId, GraphError> {
        self.op(
            Op::Broadcast {
                shape: shape.to_vec(),
                axes: (0..shape.len()).collect(),
            },
            &[x],
        )
    }
}
