//! The executor: every op written out as plain loops, with f64 accumulation, so that each one
//! can be checked by eye. Speed is not a goal here; being obviously right is.

use std::collections::HashMap;

use kiln_ir::{Graph, NodeId, Op, TensorType, VerifyError, verify};

use crate::tensor::{Data, Tensor};

/// Why a graph could not be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Invalid(#[from] VerifyError),
    #[error("no value fed for {kind} `{name}` ({ty})")]
    MissingFeed {
        kind: &'static str,
        name: String,
        ty: TensorType,
    },
    #[error("{kind} `{name}` is declared {expected} but was fed {got}")]
    FeedType {
        kind: &'static str,
        name: String,
        expected: TensorType,
        got: TensorType,
    },
    #[error(
        "{node} (softmax_cross_entropy): label {label} of example {row} is not a class in 0..{classes}"
    )]
    BadLabel {
        node: NodeId,
        row: usize,
        label: i64,
        classes: usize,
    },
}

/// The value of every node of one run, indexed by node id.
#[derive(Clone, Debug)]
pub struct Values {
    values: Vec<Tensor>,
    outputs: Vec<(String, NodeId)>,
}

impl Values {
    pub fn get(&self, id: NodeId) -> &Tensor {
        &self.values[id.0]
    }

    /// The value of a named graph output.
    pub fn output(&self, name: &str) -> Option<&Tensor> {
        self.outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| &self.values[id.0])
    }

    pub fn into_vec(self) -> Vec<Tensor> {
        self.values
    }
}

/// Runs `graph` on the CPU. `inputs` and `params` feed the graph's leaves by name; each fed
/// tensor must have exactly the declared type. The graph is verified first.
pub fn execute(
    graph: &Graph,
    inputs: &HashMap<String, Tensor>,
    params: &HashMap<String, Tensor>,
) -> Result<Values, ExecError> {
    verify(graph)?;
    let mut values: Vec<Tensor> = Vec::with_capacity(graph.nodes().len());
    for (id, node) in graph.iter() {
        let args: Vec<&Tensor> = node.inputs.iter().map(|i| &values[i.0]).collect();
        let value = match &node.op {
            Op::Input { name } => feed("input", name, &node.ty, inputs)?,
            Op::Param { name } => feed("param", name, &node.ty, params)?,
            op => eval(id, op, &args, &node.ty)?,
        };
        debug_assert_eq!(
            value.ty(),
            node.ty,
            "{id} computed a value of the wrong type"
        );
        values.push(value);
    }
    let outputs = graph
        .outputs()
        .iter()
        .map(|o| (o.name.clone(), o.node))
        .collect();
    Ok(Values { values, outputs })
}

fn feed(
    kind: &'static str,
    name: &str,
    ty: &TensorType,
    feeds: &HashMap<String, Tensor>,
) -> Result<Tensor, ExecError> {
    let t = feeds.get(name).ok_or_else(|| ExecError::MissingFeed {
        kind,
        name: name.to_string(),
        ty: ty.clone(),
    })?;
    if &t.ty() != ty {
        return Err(ExecError::FeedType {
            kind,
            name: name.to_string(),
            expected: ty.clone(),
            got: t.ty(),
        });
    }
    Ok(t.clone())
}

fn f32s(t: &Tensor) -> &[f32] {
    t.as_f32()
        .expect("the verifier guarantees f32 operands here")
}

fn out(ty: &TensorType, v: Vec<f32>) -> Tensor {
    Tensor::from_f32(ty.shape.clone(), v).expect("kernels produce exactly numel(ty) elements")
}

/// Evaluates one non-leaf op whose operands the verifier has already type-checked.
pub fn eval(id: NodeId, op: &Op, args: &[&Tensor], ty: &TensorType) -> Result<Tensor, ExecError> {
    Ok(match op {
        Op::Input { .. } | Op::Param { .. } => unreachable!("leaves are fed, not evaluated"),
        Op::Conv2d { stride, padding } => out(ty, conv2d(args[0], args[1], *stride, *padding)),
        Op::BiasAdd { axis } => {
            let (x, b) = (f32s(args[0]), f32s(args[1]));
            let inner: usize = args[0].shape()[axis + 1..].iter().product();
            let dim = args[0].shape()[*axis];
            let v = x
                .iter()
                .enumerate()
                .map(|(i, &x)| x + b[(i / inner) % dim])
                .collect();
            out(ty, v)
        }
        Op::AvgPool2d { kernel, stride } => out(ty, pool2d(args[0], *kernel, *stride, Pool::Avg)),
        Op::MaxPool2d { kernel, stride } => out(ty, pool2d(args[0], *kernel, *stride, Pool::Max)),
        Op::Sigmoid => out(ty, map(args[0], |x| 1.0 / (1.0 + (-x).exp()))),
        Op::Relu => out(ty, map(args[0], |x| if x < 0.0 { 0.0 } else { x })),
        Op::Tanh => out(ty, map(args[0], f64::tanh)),
        Op::Reshape { shape } => args[0]
            .clone()
            .reshaped(shape.clone())
            .expect("the verifier checked the element count"),
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => out(ty, matmul(args[0], args[1], *transpose_a, *transpose_b)),
        Op::SoftmaxCrossEntropy => out(ty, softmax_cross_entropy(id, args[0], args[1])?),
        Op::ReduceSum { axes } => out(ty, reduce(args[0], axes, false)),
        Op::ReduceMean { axes } => out(ty, reduce(args[0], axes, true)),
        Op::ScaleU8 => match args[0].data() {
            Data::U8(v) => out(ty, v.iter().map(|&b| b as f32 / 255.0).collect()),
            _ => unreachable!("the verifier guarantees a u8 operand"),
        },
    })
}

/// Applies `f` elementwise, in f64.
fn map(x: &Tensor, f: impl Fn(f64) -> f64) -> Vec<f32> {
    f32s(x).iter().map(|&v| f(v as f64) as f32).collect()
}

fn dims4(t: &Tensor) -> [usize; 4] {
    t.shape()
        .try_into()
        .expect("the verifier guarantees rank 4")
}

/// PyTorch's `conv2d` (cross-correlation) with zero padding, no bias.
fn conv2d(x: &Tensor, w: &Tensor, stride: [usize; 2], pad: [usize; 2]) -> Vec<f32> {
    let [n, c, h, wd] = dims4(x);
    let [o, _, kh, kw] = dims4(w);
    let oh = (h + 2 * pad[0] - kh) / stride[0] + 1;
    let ow = (wd + 2 * pad[1] - kw) / stride[1] + 1;
    let (xv, wv) = (f32s(x), f32s(w));
    let mut y = Vec::with_capacity(n * o * oh * ow);
    for ni in 0..n {
        for oi in 0..o {
            for yi in 0..oh {
                for xi in 0..ow {
                    let mut acc = 0f64;
                    for ci in 0..c {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                // Input coordinates in the unpadded image; outside is zero.
                                let iy = (yi * stride[0] + ky).wrapping_sub(pad[0]);
                                let ix = (xi * stride[1] + kx).wrapping_sub(pad[1]);
                                if iy < h && ix < wd {
                                    let xval = xv[((ni * c + ci) * h + iy) * wd + ix];
                                    let wval = wv[((oi * c + ci) * kh + ky) * kw + kx];
                                    acc += xval as f64 * wval as f64;
                                }
                            }
                        }
                    }
                    y.push(acc as f32);
                }
            }
        }
    }
    y
}

#[derive(Clone, Copy)]
enum Pool {
    Avg,
    Max,
}

/// Window pooling without padding. Max takes the first maximum in row-major window order and
/// propagates NaN, as PyTorch does.
fn pool2d(x: &Tensor, kernel: [usize; 2], stride: [usize; 2], pool: Pool) -> Vec<f32> {
    let [n, c, h, w] = dims4(x);
    let oh = (h - kernel[0]) / stride[0] + 1;
    let ow = (w - kernel[1]) / stride[1] + 1;
    let xv = f32s(x);
    let mut y = Vec::with_capacity(n * c * oh * ow);
    for plane in 0..n * c {
        for yi in 0..oh {
            for xi in 0..ow {
                let window = (0..kernel[0]).flat_map(|ky| {
                    (0..kernel[1]).map(move |kx| {
                        xv[(plane * h + yi * stride[0] + ky) * w + xi * stride[1] + kx]
                    })
                });
                let v = match pool {
                    Pool::Avg => {
                        let sum: f64 = window.map(|v| v as f64).sum();
                        (sum / (kernel[0] * kernel[1]) as f64) as f32
                    }
                    Pool::Max => window
                        .reduce(|best, v| if best.is_nan() || v <= best { best } else { v })
                        .unwrap_or(f32::NAN),
                };
                y.push(v);
            }
        }
    }
    y
}

fn matmul(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Vec<f32> {
    let [a0, a1]: [usize; 2] = a.shape().try_into().expect("rank 2");
    let [b0, b1]: [usize; 2] = b.shape().try_into().expect("rank 2");
    let (m, k) = if ta { (a1, a0) } else { (a0, a1) };
    let n = if tb { b0 } else { b1 };
    let (av, bv) = (f32s(a), f32s(b));
    // Element (i, j) of op(a) and op(b), reading through the transposes.
    let at = |i: usize, j: usize| if ta { av[j * a1 + i] } else { av[i * a1 + j] };
    let bt = |i: usize, j: usize| if tb { bv[j * b1 + i] } else { bv[i * b1 + j] };
    let mut y = Vec::with_capacity(m * n);
    for i in 0..m {
        for j in 0..n {
            let acc: f64 = (0..k).map(|p| at(i, p) as f64 * bt(p, j) as f64).sum();
            y.push(acc as f32);
        }
    }
    y
}

fn softmax_cross_entropy(
    id: NodeId,
    logits: &Tensor,
    labels: &Tensor,
) -> Result<Vec<f32>, ExecError> {
    let [n, c]: [usize; 2] = logits.shape().try_into().expect("rank 2");
    let lv = f32s(logits);
    let label = |row: usize| -> i64 {
        match labels.data() {
            Data::U32(v) => v[row] as i64,
            Data::I32(v) => v[row] as i64,
            _ => unreachable!("the verifier guarantees integer labels"),
        }
    };
    (0..n)
        .map(|row| {
            let l = label(row);
            if l < 0 || l >= c as i64 {
                return Err(ExecError::BadLabel {
                    node: id,
                    row,
                    label: l,
                    classes: c,
                });
            }
            let z = &lv[row * c..(row + 1) * c];
            let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let sum: f64 = z.iter().map(|&v| (v as f64 - max).exp()).sum();
            let logsumexp = max + sum.ln();
            Ok((logsumexp - z[l as usize] as f64) as f32)
        })
        .collect()
}

/// Sum (or mean) over `axes`, which the result drops.
fn reduce(x: &Tensor, axes: &[usize], mean: bool) -> Vec<f32> {
    let shape = x.shape();
    let kept: Vec<usize> = (0..shape.len()).filter(|a| !axes.contains(a)).collect();
    let out_len: usize = kept.iter().map(|&a| shape[a]).product();
    let count: usize = axes.iter().map(|&a| shape[a]).product();
    let mut acc = vec![0f64; out_len];
    let mut index = vec![0usize; shape.len()];
    for &v in f32s(x) {
        let o = kept.iter().fold(0, |o, &a| o * shape[a] + index[a]);
        acc[o] += v as f64;
        // Advance the row-major multi-index.
        for a in (0..shape.len()).rev() {
            index[a] += 1;
            if index[a] < shape[a] {
                break;
            }
            index[a] = 0;
        }
    }
    acc.into_iter()
        .map(|s| if mean { s / count as f64 } else { s } as f32)
        .collect()
}
