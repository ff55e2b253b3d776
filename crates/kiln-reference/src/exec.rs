//! The executor: every op written out as plain loops, with f64 accumulation, so that each one
//! can be checked by eye. Speed is not a goal here; being obviously right is.

use std::collections::HashMap;

use kiln_ir::{Graph, NodeId, Op, TensorType, VerifyError, verify};

use crate::tensor::{Data, Real, Tensor};

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
    #[error("{node} (gather): index {index} at position {position} is outside the {rows} rows")]
    BadIndex {
        node: NodeId,
        position: usize,
        index: u32,
        rows: usize,
    },
    #[error("{node} ({op}): label {label} of example {row} is not a class in 0..{classes}")]
    BadLabel {
        node: NodeId,
        op: &'static str,
        row: usize,
        label: i64,
        classes: usize,
    },
}

/// The value of every node of one run, indexed by node id.
#[derive(Clone, Debug)]
pub struct Values<T: Real = f32> {
    values: Vec<Tensor<T>>,
    outputs: Vec<(String, NodeId)>,
}

impl<T: Real> Values<T> {
    pub fn get(&self, id: NodeId) -> &Tensor<T> {
        &self.values[id.0]
    }

    /// The value of a named graph output.
    pub fn output(&self, name: &str) -> Option<&Tensor<T>> {
        self.outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| &self.values[id.0])
    }

    pub fn into_vec(self) -> Vec<Tensor<T>> {
        self.values
    }
}

/// Runs `graph` on the CPU. `inputs` and `params` feed the graph's leaves by name; each fed
/// tensor must have exactly the declared type. The graph is verified first. Float values are
/// held at precision `T` (f32 normally, f64 for gradient checks).
pub fn execute<T: Real>(
    graph: &Graph,
    inputs: &HashMap<String, Tensor<T>>,
    params: &HashMap<String, Tensor<T>>,
) -> Result<Values<T>, ExecError> {
    verify(graph)?;
    let mut values: Vec<Tensor<T>> = Vec::with_capacity(graph.nodes().len());
    for (id, node) in graph.iter() {
        let args: Vec<&Tensor<T>> = node.inputs.iter().map(|i| &values[i.0]).collect();
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

fn feed<T: Real>(
    kind: &'static str,
    name: &str,
    ty: &TensorType,
    feeds: &HashMap<String, Tensor<T>>,
) -> Result<Tensor<T>, ExecError> {
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

/// The float elements as f64, which is what every kernel computes in.
fn floats<T: Real>(t: &Tensor<T>) -> Vec<f64> {
    t.as_float()
        .expect("the verifier guarantees float operands here")
        .iter()
        .map(|x| x.to_f64())
        .collect()
}

fn out<T: Real>(ty: &TensorType, v: Vec<f64>) -> Tensor<T> {
    let v = v.into_iter().map(T::from_f64).collect();
    Tensor::from_float(ty.shape.clone(), v).expect("kernels produce exactly numel(ty) elements")
}

fn dims4<T: Real>(t: &Tensor<T>) -> [usize; 4] {
    t.shape()
        .try_into()
        .expect("the verifier guarantees rank 4")
}

/// Evaluates one non-leaf op whose operands the verifier has already type-checked.
pub fn eval<T: Real>(
    id: NodeId,
    op: &Op,
    args: &[&Tensor<T>],
    ty: &TensorType,
) -> Result<Tensor<T>, ExecError> {
    let unary = |f: fn(f64) -> f64| out(ty, floats(args[0]).into_iter().map(f).collect());
    let binary = |f: fn(f64, f64) -> f64| {
        let (a, b) = (floats(args[0]), floats(args[1]));
        out(ty, a.iter().zip(&b).map(|(&a, &b)| f(a, b)).collect())
    };
    Ok(match op {
        Op::Input { .. } | Op::Param { .. } => unreachable!("leaves are fed, not evaluated"),
        Op::Conv2d { stride, padding } => {
            let geo = ConvGeometry::new(dims4(args[0]), dims4(args[1]), *stride, *padding);
            out(ty, geo.forward(&floats(args[0]), &floats(args[1])))
        }
        Op::Conv2dGradInput {
            stride,
            padding,
            input_size,
        } => {
            let [n, _, _, _] = dims4(args[0]);
            let w = dims4(args[1]);
            let x = [n, w[1], input_size[0], input_size[1]];
            let geo = ConvGeometry::new(x, w, *stride, *padding);
            out(ty, geo.grad_input(&floats(args[0]), &floats(args[1])))
        }
        Op::Conv2dGradWeight {
            stride,
            padding,
            kernel,
        } => {
            let x = dims4(args[0]);
            let [_, o, _, _] = dims4(args[1]);
            let geo = ConvGeometry::new(x, [o, x[1], kernel[0], kernel[1]], *stride, *padding);
            out(ty, geo.grad_weight(&floats(args[0]), &floats(args[1])))
        }
        Op::BiasAdd { axis } => {
            let (x, b) = (floats(args[0]), floats(args[1]));
            let inner: usize = args[0].shape()[axis + 1..].iter().product();
            let dim = args[0].shape()[*axis];
            let v = x
                .iter()
                .enumerate()
                .map(|(i, &x)| x + b[(i / inner) % dim])
                .collect();
            out(ty, v)
        }
        Op::AvgPool2d { kernel, stride } => {
            let geo = PoolGeometry::new(dims4(args[0]), *kernel, *stride);
            out(ty, geo.avg(&floats(args[0])))
        }
        Op::MaxPool2d { kernel, stride } => {
            let geo = PoolGeometry::new(dims4(args[0]), *kernel, *stride);
            let x = floats(args[0]);
            let y = geo.windows().map(|w| x[geo.argmax(&x, w)]).collect();
            out(ty, y)
        }
        Op::AvgPool2dGrad {
            kernel,
            stride,
            input_size,
        } => {
            let [n, c, _, _] = dims4(args[0]);
            let geo = PoolGeometry::new([n, c, input_size[0], input_size[1]], *kernel, *stride);
            out(ty, geo.avg_grad(&floats(args[0])))
        }
        Op::MaxPool2dGrad { kernel, stride } => {
            let geo = PoolGeometry::new(dims4(args[0]), *kernel, *stride);
            out(ty, geo.max_grad(&floats(args[0]), &floats(args[1])))
        }
        Op::Sigmoid => unary(|x| 1.0 / (1.0 + (-x).exp())),
        Op::Relu => unary(|x| if x < 0.0 { 0.0 } else { x }),
        Op::Tanh => unary(f64::tanh),
        Op::Silu => unary(|x| x / (1.0 + (-x).exp())),
        Op::SigmoidGrad => binary(|y, dy| dy * y * (1.0 - y)),
        Op::ReluGrad => binary(|y, dy| if y > 0.0 { dy } else { 0.0 }),
        Op::TanhGrad => binary(|y, dy| dy * (1.0 - y * y)),
        Op::SiluGrad => binary(|x, dy| {
            let s = 1.0 / (1.0 + (-x).exp());
            dy * s * (1.0 + x * (1.0 - s))
        }),
        Op::Add => binary(|a, b| a + b),
        Op::Sub => binary(|a, b| a - b),
        Op::Mul => binary(|a, b| a * b),
        Op::Div => binary(|a, b| a / b),
        Op::Sqrt => unary(f64::sqrt),
        Op::Exp => unary(f64::exp),
        Op::Scale { factor } => {
            let f = factor.0 as f64;
            out(ty, floats(args[0]).into_iter().map(|x| x * f).collect())
        }
        Op::Full { value, .. } => out(ty, vec![value.0 as f64; ty.numel()]),
        Op::Reshape { shape } => args[0]
            .clone()
            .reshaped(shape.clone())
            .expect("the verifier checked the element count"),
        Op::MatMul {
            transpose_a,
            transpose_b,
        } => out(ty, matmul(args[0], args[1], *transpose_a, *transpose_b)),
        Op::SoftmaxCrossEntropy => {
            let rows = softmax_rows(id, op, args[0], args[1])?;
            out(ty, rows.into_iter().map(|r| r.loss).collect())
        }
        Op::SoftmaxCrossEntropyGrad => {
            let rows = softmax_rows(id, op, args[0], args[1])?;
            let dloss = floats(args[2]);
            let mut g = Vec::with_capacity(ty.numel());
            for (row, d) in rows.iter().zip(dloss) {
                for (c, p) in row.probs.iter().enumerate() {
                    let onehot = if c == row.label { 1.0 } else { 0.0 };
                    g.push((p - onehot) * d);
                }
            }
            out(ty, g)
        }
        Op::ReduceSum { axes } => out(ty, reduce(args[0], axes, false)),
        Op::ReduceMean { axes } => out(ty, reduce(args[0], axes, true)),
        Op::Broadcast { shape, axes } => {
            let x = floats(args[0]);
            let kept: Vec<usize> = (0..shape.len()).filter(|a| !axes.contains(a)).collect();
            let v = multi_indices(shape)
                .map(|index| x[kept.iter().fold(0, |o, &a| o * shape[a] + index[a])])
                .collect();
            out(ty, v)
        }
        Op::ScaleU8 => match args[0].data() {
            Data::U8(v) => {
                // Divide in f32, exactly as the GPU and torchvision do.
                out(ty, v.iter().map(|&b| (b as f32 / 255.0) as f64).collect())
            }
            _ => unreachable!("the verifier guarantees a u8 operand"),
        },
        Op::Argmax => {
            let [n, c]: [usize; 2] = args[0].shape().try_into().expect("rank 2");
            let x = floats(args[0]);
            let idx = (0..n)
                .map(|r| first_max((r * c..(r + 1) * c).map(|i| x[i])) as u32)
                .collect();
            Tensor::from_u32([n], idx).expect("one index per row")
        }
        Op::Gather => gather(id, args[0], args[1])?,
        Op::CountEqual => {
            let a = args[0].to_i64().expect("integer operand");
            let b = args[1].to_i64().expect("integer operand");
            let n = a.iter().zip(&b).filter(|(x, y)| x == y).count();
            Tensor::from_u32([], vec![n as u32]).expect("a scalar")
        }
    })
}

/// Rows of `data` picked by `indices`, any element type.
fn gather<T: Real>(
    id: NodeId,
    data: &Tensor<T>,
    indices: &Tensor<T>,
) -> Result<Tensor<T>, ExecError> {
    let rows = data.shape()[0];
    let row_len: usize = data.shape()[1..].iter().product();
    let Data::U32(idx) = indices.data() else {
        unreachable!("the verifier guarantees u32 indices")
    };
    if let Some((position, &index)) = idx.iter().enumerate().find(|(_, i)| **i as usize >= rows) {
        return Err(ExecError::BadIndex {
            node: id,
            position,
            index,
            rows,
        });
    }
    fn pick<E: Clone>(v: &[E], idx: &[u32], row_len: usize) -> Vec<E> {
        idx.iter()
            .flat_map(|&i| {
                v[i as usize * row_len..(i as usize + 1) * row_len]
                    .iter()
                    .cloned()
            })
            .collect()
    }
    let out = match data.data() {
        Data::Float(v) => Data::Float(pick(v, idx, row_len)),
        Data::U8(v) => Data::U8(pick(v, idx, row_len)),
        Data::U32(v) => Data::U32(pick(v, idx, row_len)),
        Data::I32(v) => Data::I32(pick(v, idx, row_len)),
    };
    let mut shape = data.shape().to_vec();
    shape[0] = idx.len();
    Ok(Tensor::new(shape, out).expect("row_len elements per index"))
}

/// Position of the first maximum, NaN counting as the maximum (as PyTorch's max pool and argmax
/// do). Shared by `max_pool2d`, its gradient and `argmax` so they always agree.
fn first_max(values: impl Iterator<Item = f64>) -> usize {
    let mut best: Option<(usize, f64)> = None;
    for (i, v) in values.enumerate() {
        best = match best {
            Some((_, b)) if b.is_nan() || v <= b => best,
            _ => Some((i, v)),
        };
    }
    best.map_or(0, |(i, _)| i)
}

/// Iterates the row-major multi-indices of `shape`.
fn multi_indices(shape: &[usize]) -> impl Iterator<Item = Vec<usize>> + '_ {
    let total: usize = shape.iter().product();
    let mut index = vec![0usize; shape.len()];
    (0..total).map(move |k| {
        if k > 0 {
            for a in (0..shape.len()).rev() {
                index[a] += 1;
                if index[a] < shape[a] {
                    break;
                }
                index[a] = 0;
            }
        }
        index.clone()
    })
}

/// Shapes and hyper-parameters of one convolution, shared by its forward and gradient kernels.
struct ConvGeometry {
    x: [usize; 4],
    w: [usize; 4],
    stride: [usize; 2],
    pad: [usize; 2],
    out: [usize; 2],
}

impl ConvGeometry {
    fn new(x: [usize; 4], w: [usize; 4], stride: [usize; 2], pad: [usize; 2]) -> Self {
        let out = [
            (x[2] + 2 * pad[0] - w[2]) / stride[0] + 1,
            (x[3] + 2 * pad[1] - w[3]) / stride[1] + 1,
        ];
        ConvGeometry {
            x,
            w,
            stride,
            pad,
            out,
        }
    }

    /// Visits every (x index, w index, y index) triple that contributes a product to the
    /// convolution; zero padding is simply the pairs that are skipped.
    fn for_each_tap(&self, mut f: impl FnMut(usize, usize, usize)) {
        let [n, c, h, wd] = self.x;
        let [o, _, kh, kw] = self.w;
        let [oh, ow] = self.out;
        for ni in 0..n {
            for oi in 0..o {
                for yi in 0..oh {
                    for xi in 0..ow {
                        let y = ((ni * o + oi) * oh + yi) * ow + xi;
                        for ci in 0..c {
                            for ky in 0..kh {
                                // Coordinates in the unpadded input; outside it is zero.
                                let iy = (yi * self.stride[0] + ky).wrapping_sub(self.pad[0]);
                                if iy >= h {
                                    continue;
                                }
                                for kx in 0..kw {
                                    let ix = (xi * self.stride[1] + kx).wrapping_sub(self.pad[1]);
                                    if ix < wd {
                                        let xk = ((ni * c + ci) * h + iy) * wd + ix;
                                        let wk = ((oi * c + ci) * kh + ky) * kw + kx;
                                        f(xk, wk, y);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn y_len(&self) -> usize {
        self.x[0] * self.w[0] * self.out[0] * self.out[1]
    }

    fn forward(&self, x: &[f64], w: &[f64]) -> Vec<f64> {
        let mut y = vec![0.0; self.y_len()];
        self.for_each_tap(|xk, wk, yk| y[yk] += x[xk] * w[wk]);
        y
    }

    fn grad_input(&self, dy: &[f64], w: &[f64]) -> Vec<f64> {
        let mut dx = vec![0.0; self.x.iter().product()];
        self.for_each_tap(|xk, wk, yk| dx[xk] += dy[yk] * w[wk]);
        dx
    }

    fn grad_weight(&self, x: &[f64], dy: &[f64]) -> Vec<f64> {
        let mut dw = vec![0.0; self.w.iter().product()];
        self.for_each_tap(|xk, wk, yk| dw[wk] += dy[yk] * x[xk]);
        dw
    }
}

/// Shapes and hyper-parameters of one pooling, shared by its forward and gradient kernels.
struct PoolGeometry {
    x: [usize; 4],
    kernel: [usize; 2],
    stride: [usize; 2],
    out: [usize; 2],
}

impl PoolGeometry {
    fn new(x: [usize; 4], kernel: [usize; 2], stride: [usize; 2]) -> Self {
        let out = [
            (x[2] - kernel[0]) / stride[0] + 1,
            (x[3] - kernel[1]) / stride[1] + 1,
        ];
        PoolGeometry {
            x,
            kernel,
            stride,
            out,
        }
    }

    /// For each output element in order, the input indices of its window (row-major).
    fn windows(&self) -> impl Iterator<Item = Vec<usize>> + '_ {
        let [n, c, h, w] = self.x;
        let [oh, ow] = self.out;
        (0..n * c).flat_map(move |plane| {
            (0..oh).flat_map(move |yi| {
                (0..ow).map(move |xi| {
                    (0..self.kernel[0])
                        .flat_map(|ky| {
                            (0..self.kernel[1]).map(move |kx| {
                                (plane * h + yi * self.stride[0] + ky) * w
                                    + xi * self.stride[1]
                                    + kx
                            })
                        })
                        .collect()
                })
            })
        })
    }

    fn area(&self) -> f64 {
        (self.kernel[0] * self.kernel[1]) as f64
    }

    fn argmax(&self, x: &[f64], window: Vec<usize>) -> usize {
        window[first_max(window.iter().map(|&i| x[i]))]
    }

    fn avg(&self, x: &[f64]) -> Vec<f64> {
        self.windows()
            .map(|w| w.iter().map(|&i| x[i]).sum::<f64>() / self.area())
            .collect()
    }

    fn avg_grad(&self, dy: &[f64]) -> Vec<f64> {
        let mut dx = vec![0.0; self.x.iter().product()];
        for (w, &g) in self.windows().zip(dy) {
            for i in w {
                dx[i] += g / self.area();
            }
        }
        dx
    }

    fn max_grad(&self, x: &[f64], dy: &[f64]) -> Vec<f64> {
        let mut dx = vec![0.0; self.x.iter().product()];
        for (w, &g) in self.windows().zip(dy) {
            dx[self.argmax(x, w)] += g;
        }
        dx
    }
}

fn matmul<T: Real>(a: &Tensor<T>, b: &Tensor<T>, ta: bool, tb: bool) -> Vec<f64> {
    let [a0, a1]: [usize; 2] = a.shape().try_into().expect("rank 2");
    let [b0, b1]: [usize; 2] = b.shape().try_into().expect("rank 2");
    let (m, k) = if ta { (a1, a0) } else { (a0, a1) };
    let n = if tb { b0 } else { b1 };
    let (av, bv) = (floats(a), floats(b));
    // Element (i, j) of op(a) and op(b), reading through the transposes.
    let at = |i: usize, j: usize| if ta { av[j * a1 + i] } else { av[i * a1 + j] };
    let bt = |i: usize, j: usize| if tb { bv[j * b1 + i] } else { bv[i * b1 + j] };
    let mut y = Vec::with_capacity(m * n);
    for i in 0..m {
        for j in 0..n {
            y.push((0..k).map(|p| at(i, p) * bt(p, j)).sum());
        }
    }
    y
}

/// One row of softmax cross-entropy: its label, loss and class probabilities.
struct SoftmaxRow {
    label: usize,
    loss: f64,
    probs: Vec<f64>,
}

fn softmax_rows<T: Real>(
    id: NodeId,
    op: &Op,
    logits: &Tensor<T>,
    labels: &Tensor<T>,
) -> Result<Vec<SoftmaxRow>, ExecError> {
    let [n, c]: [usize; 2] = logits.shape().try_into().expect("rank 2");
    let z = floats(logits);
    let labels = labels
        .to_i64()
        .expect("the verifier guarantees integer labels");
    (0..n)
        .map(|row| {
            let l = labels[row];
            if l < 0 || l >= c as i64 {
                return Err(ExecError::BadLabel {
                    node: id,
                    op: op.name(),
                    row,
                    label: l,
                    classes: c,
                });
            }
            let z = &z[row * c..(row + 1) * c];
            let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
            let exps: Vec<f64> = z.iter().map(|&v| (v - max).exp()).collect();
            let sum: f64 = exps.iter().sum();
            Ok(SoftmaxRow {
                label: l as usize,
                loss: max + sum.ln() - z[l as usize],
                probs: exps.iter().map(|e| e / sum).collect(),
            })
        })
        .collect()
}

/// Sum (or mean) over `axes`, which the result drops.
fn reduce<T: Real>(x: &Tensor<T>, axes: &[usize], mean: bool) -> Vec<f64> {
    let shape = x.shape();
    let kept: Vec<usize> = (0..shape.len()).filter(|a| !axes.contains(a)).collect();
    let out_len: usize = kept.iter().map(|&a| shape[a]).product();
    let count: usize = axes.iter().map(|&a| shape[a]).product();
    let mut acc = vec![0f64; out_len];
    for (v, index) in floats(x).into_iter().zip(multi_indices(shape)) {
        acc[kept.iter().fold(0, |o, &a| o * shape[a] + index[a])] += v;
    }
    if mean {
        acc.iter_mut().for_each(|s| *s /= count as f64);
    }
    acc
}
