//! The operations of the graph IR and their typing rules.
//!
//! Ops are kept primitive (a `Linear` layer is `matmul` + `bias_add`) so that autodiff and fusion
//! see few, simple cases, yet named after what they do so the printed IR reads like the model.
//! Each op's meaning is defined by the CPU reference executor (`kiln-reference`).

use crate::types::{DType, ShapeDisplay, TensorType};

/// One IR operation with its compile-time attributes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// A value fed by the caller each run (images, labels). The node's type is its declaration.
    Input {
        name: String,
    },
    /// A trainable parameter, named like PyTorch's state dict (`0.weight`, `3.bias`).
    Param {
        name: String,
    },
    /// `conv2d(x: f32[N,C,H,W], w: f32[O,C,KH,KW]) -> f32[N,O,H',W']`, cross-correlation as in
    /// PyTorch, zero padding, `H' = (H + 2*pad - KH) / stride + 1`.
    Conv2d {
        stride: [usize; 2],
        padding: [usize; 2],
    },
    /// `bias_add(x, b: f32[x.shape[axis]])`: adds `b` broadcast along every other axis.
    BiasAdd {
        axis: usize,
    },
    /// Average over non-overlapping or strided windows, no padding: `f32[N,C,H,W] -> f32[N,C,H',W']`.
    AvgPool2d {
        kernel: [usize; 2],
        stride: [usize; 2],
    },
    /// Maximum over windows; ties resolve to the first (row-major) element of the window.
    MaxPool2d {
        kernel: [usize; 2],
        stride: [usize; 2],
    },
    Sigmoid,
    Relu,
    Tanh,
    /// Same elements, new shape (row-major); `Flatten` lowers to this.
    Reshape {
        shape: Vec<usize>,
    },
    /// `matmul(a, b)` on 2-D operands, each optionally transposed: `op(a)[M,K] x op(b)[K,N]`.
    MatMul {
        transpose_a: bool,
        transpose_b: bool,
    },
    /// `softmax_cross_entropy(logits: f32[N,C], labels: u32|i32[N]) -> f32[N]`, the per-example
    /// loss `logsumexp(logits[n]) - logits[n, labels[n]]`.
    SoftmaxCrossEntropy,
    /// Sum over the listed axes (strictly increasing), which are removed from the shape.
    ReduceSum {
        axes: Vec<usize>,
    },
    /// Mean over the listed axes (strictly increasing), which are removed from the shape.
    ReduceMean {
        axes: Vec<usize>,
    },
    /// `u8 -> f32` scaled to `[0, 1]`: `x / 255`, as torchvision's `ToTensor`.
    ScaleU8,
}

/// An attribute value in the text form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttrValue {
    Int(usize),
    Bool(bool),
    Ints(Vec<usize>),
}

impl std::fmt::Display for AttrValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttrValue::Int(i) => write!(f, "{i}"),
            AttrValue::Bool(b) => write!(f, "{b}"),
            AttrValue::Ints(v) => write!(f, "{}", ShapeDisplay(v)),
        }
    }
}

/// Every op's text-form name, in the order ops are documented.
pub const OP_NAMES: &[&str] = &[
    "input",
    "param",
    "conv2d",
    "bias_add",
    "avg_pool2d",
    "max_pool2d",
    "sigmoid",
    "relu",
    "tanh",
    "reshape",
    "matmul",
    "softmax_cross_entropy",
    "reduce_sum",
    "reduce_mean",
    "scale_u8",
];

impl Op {
    /// The op's name in the text form.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Param { .. } => "param",
            Op::Conv2d { .. } => "conv2d",
            Op::BiasAdd { .. } => "bias_add",
            Op::AvgPool2d { .. } => "avg_pool2d",
            Op::MaxPool2d { .. } => "max_pool2d",
            Op::Sigmoid => "sigmoid",
            Op::Relu => "relu",
            Op::Tanh => "tanh",
            Op::Reshape { .. } => "reshape",
            Op::MatMul { .. } => "matmul",
            Op::SoftmaxCrossEntropy => "softmax_cross_entropy",
            Op::ReduceSum { .. } => "reduce_sum",
            Op::ReduceMean { .. } => "reduce_mean",
            Op::ScaleU8 => "scale_u8",
        }
    }

    /// Whether the node is a graph leaf whose type is declared rather than inferred.
    pub fn is_leaf(&self) -> bool {
        matches!(self, Op::Input { .. } | Op::Param { .. })
    }

    /// Number of operands the op takes.
    pub fn arity(&self) -> usize {
        match self {
            Op::Input { .. } | Op::Param { .. } => 0,
            Op::Conv2d { .. }
            | Op::BiasAdd { .. }
            | Op::MatMul { .. }
            | Op::SoftmaxCrossEntropy => 2,
            Op::AvgPool2d { .. }
            | Op::MaxPool2d { .. }
            | Op::Sigmoid
            | Op::Relu
            | Op::Tanh
            | Op::Reshape { .. }
            | Op::ReduceSum { .. }
            | Op::ReduceMean { .. }
            | Op::ScaleU8 => 1,
        }
    }

    /// The op's attributes in text-form order (leaf names are not attributes).
    pub fn attrs(&self) -> Vec<(&'static str, AttrValue)> {
        let pair = |v: [usize; 2]| AttrValue::Ints(v.to_vec());
        match self {
            Op::Conv2d { stride, padding } => {
                vec![("stride", pair(*stride)), ("padding", pair(*padding))]
            }
            Op::BiasAdd { axis } => vec![("axis", AttrValue::Int(*axis))],
            Op::AvgPool2d { kernel, stride } | Op::MaxPool2d { kernel, stride } => {
                vec![("kernel", pair(*kernel)), ("stride", pair(*stride))]
            }
            Op::Reshape { shape } => vec![("shape", AttrValue::Ints(shape.clone()))],
            Op::MatMul {
                transpose_a,
                transpose_b,
            } => vec![
                ("transpose_a", AttrValue::Bool(*transpose_a)),
                ("transpose_b", AttrValue::Bool(*transpose_b)),
            ],
            Op::ReduceSum { axes } | Op::ReduceMean { axes } => {
                vec![("axes", AttrValue::Ints(axes.clone()))]
            }
            Op::Input { .. }
            | Op::Param { .. }
            | Op::Sigmoid
            | Op::Relu
            | Op::Tanh
            | Op::SoftmaxCrossEntropy
            | Op::ScaleU8 => vec![],
        }
    }

    /// Builds a non-leaf op from its text-form name and attributes. Every attribute the op has
    /// must be given exactly once; the error says which one is missing, unknown or ill-typed.
    pub fn from_attrs(name: &str, attrs: &[(String, AttrValue)]) -> Result<Op, String> {
        let mut a = Attrs {
            op: name,
            given: attrs,
            used: vec![false; attrs.len()],
        };
        let op = match name {
            "conv2d" => Op::Conv2d {
                stride: a.pair("stride")?,
                padding: a.pair("padding")?,
            },
            "bias_add" => Op::BiasAdd {
                axis: a.int("axis")?,
            },
            "avg_pool2d" => Op::AvgPool2d {
                kernel: a.pair("kernel")?,
                stride: a.pair("stride")?,
            },
            "max_pool2d" => Op::MaxPool2d {
                kernel: a.pair("kernel")?,
                stride: a.pair("stride")?,
            },
            "sigmoid" => Op::Sigmoid,
            "relu" => Op::Relu,
            "tanh" => Op::Tanh,
            "reshape" => Op::Reshape {
                shape: a.ints("shape")?,
            },
            "matmul" => Op::MatMul {
                transpose_a: a.bool("transpose_a")?,
                transpose_b: a.bool("transpose_b")?,
            },
            "softmax_cross_entropy" => Op::SoftmaxCrossEntropy,
            "reduce_sum" => Op::ReduceSum {
                axes: a.ints("axes")?,
            },
            "reduce_mean" => Op::ReduceMean {
                axes: a.ints("axes")?,
            },
            "scale_u8" => Op::ScaleU8,
            "input" | "param" => {
                return Err(format!("`{name}` takes a quoted name, not operands"));
            }
            _ => {
                return Err(format!(
                    "unknown op `{name}`; expected one of {}",
                    OP_NAMES.join(", ")
                ));
            }
        };
        a.finish()?;
        Ok(op)
    }

    /// The result type of applying the op to operands of the given types.
    /// The error text says what the op needed and what it got.
    pub fn infer_type(&self, operands: &[&TensorType]) -> Result<TensorType, String> {
        if operands.len() != self.arity() {
            return Err(format!(
                "takes {} operand(s), got {}",
                self.arity(),
                operands.len()
            ));
        }
        match self {
            Op::Input { .. } | Op::Param { .. } => {
                Err("a leaf has a declared type, not an inferred one".into())
            }
            Op::Conv2d { stride, padding } => {
                let (x, w) = (operands[0], operands[1]);
                expect_f32(x, "input")?;
                expect_f32(w, "weight")?;
                let [n, c, h, wd] = rank4(x, "input", "[N,C,H,W]")?;
                let [o, wc, kh, kw] = rank4(w, "weight", "[O,C,KH,KW]")?;
                if wc != c {
                    return Err(format!(
                        "input {x} has {c} channel(s) but weight {w} expects {wc}"
                    ));
                }
                positive(*stride, "stride")?;
                if kh == 0 || kw == 0 || o == 0 {
                    return Err(format!("weight {w} has an empty dimension"));
                }
                let oh = window_out(h, kh, stride[0], padding[0]);
                let ow = window_out(wd, kw, stride[1], padding[1]);
                match (oh, ow) {
                    (Some(oh), Some(ow)) => Ok(TensorType::f32([n, o, oh, ow])),
                    _ => Err(format!(
                        "kernel {kh}x{kw} with padding {}x{} does not fit input {x}: the output would be empty",
                        padding[0], padding[1]
                    )),
                }
            }
            Op::BiasAdd { axis } => {
                let (x, b) = (operands[0], operands[1]);
                expect_f32(x, "input")?;
                expect_f32(b, "bias")?;
                let Some(&d) = x.shape.get(*axis) else {
                    return Err(format!("axis {axis} is out of range for input {x}"));
                };
                if b.shape != [d] {
                    return Err(format!(
                        "bias {b} must have shape [{d}] to add along axis {axis} of {x}"
                    ));
                }
                Ok(x.clone())
            }
            Op::AvgPool2d { kernel, stride } | Op::MaxPool2d { kernel, stride } => {
                let x = operands[0];
                expect_f32(x, "input")?;
                let [n, c, h, w] = rank4(x, "input", "[N,C,H,W]")?;
                positive(*kernel, "kernel")?;
                positive(*stride, "stride")?;
                let oh = window_out(h, kernel[0], stride[0], 0);
                let ow = window_out(w, kernel[1], stride[1], 0);
                match (oh, ow) {
                    (Some(oh), Some(ow)) => Ok(TensorType::f32([n, c, oh, ow])),
                    _ => Err(format!(
                        "window {}x{} is larger than input {x}",
                        kernel[0], kernel[1]
                    )),
                }
            }
            Op::Sigmoid | Op::Relu | Op::Tanh => {
                expect_f32(operands[0], "input")?;
                Ok(operands[0].clone())
            }
            Op::Reshape { shape } => {
                let x = operands[0];
                let to = TensorType::new(x.dtype, shape.clone());
                if to.checked_numel() != Some(x.numel()) {
                    return Err(format!(
                        "cannot reshape {x} ({} elements) to {}",
                        x.numel(),
                        ShapeDisplay(shape)
                    ));
                }
                Ok(to)
            }
            Op::MatMul {
                transpose_a,
                transpose_b,
            } => {
                let (a, b) = (operands[0], operands[1]);
                expect_f32(a, "left operand")?;
                expect_f32(b, "right operand")?;
                let [a0, a1] = rank2(a, "left operand")?;
                let [b0, b1] = rank2(b, "right operand")?;
                let (m, ka) = if *transpose_a { (a1, a0) } else { (a0, a1) };
                let (kb, n) = if *transpose_b { (b1, b0) } else { (b0, b1) };
                if ka != kb {
                    return Err(format!(
                        "inner dimensions differ: left {a} gives K={ka}, right {b} gives K={kb} \
                         (transpose_a={transpose_a}, transpose_b={transpose_b})"
                    ));
                }
                Ok(TensorType::f32([m, n]))
            }
            Op::SoftmaxCrossEntropy => {
                let (logits, labels) = (operands[0], operands[1]);
                expect_f32(logits, "logits")?;
                let [n, c] = rank2(logits, "logits")?;
                if c == 0 {
                    return Err(format!("logits {logits} have no classes"));
                }
                if !labels.dtype.is_integer_label() || labels.shape != [n] {
                    return Err(format!(
                        "labels must be u32[{n}] or i32[{n}] to match logits {logits}, got {labels}"
                    ));
                }
                Ok(TensorType::f32([n]))
            }
            Op::ReduceSum { axes } | Op::ReduceMean { axes } => {
                let x = operands[0];
                expect_f32(x, "input")?;
                if axes.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(format!(
                        "axes {} must be strictly increasing",
                        ShapeDisplay(axes)
                    ));
                }
                if let Some(&bad) = axes.iter().find(|&&a| a >= x.rank()) {
                    return Err(format!("axis {bad} is out of range for input {x}"));
                }
                if matches!(self, Op::ReduceMean { .. }) && axes.iter().any(|&a| x.shape[a] == 0) {
                    return Err(format!("mean over an empty axis of {x}"));
                }
                let shape: Vec<usize> = (0..x.rank())
                    .filter(|a| !axes.contains(a))
                    .map(|a| x.shape[a])
                    .collect();
                Ok(TensorType::f32(shape))
            }
            Op::ScaleU8 => {
                let x = operands[0];
                if x.dtype != DType::U8 {
                    return Err(format!("input must be u8, got {x}"));
                }
                Ok(TensorType::f32(x.shape.clone()))
            }
        }
    }
}

/// Output length of a sliding window, `None` when the window does not fit even once.
fn window_out(size: usize, kernel: usize, stride: usize, padding: usize) -> Option<usize> {
    let padded = size.checked_add(padding.checked_mul(2)?)?;
    if kernel == 0 || stride == 0 || padded < kernel {
        return None;
    }
    Some((padded - kernel) / stride + 1)
}

fn expect_f32(t: &TensorType, what: &str) -> Result<(), String> {
    if t.dtype == DType::F32 {
        Ok(())
    } else {
        Err(format!("{what} must be f32, got {t}"))
    }
}

fn rank4(t: &TensorType, what: &str, layout: &str) -> Result<[usize; 4], String> {
    <[usize; 4]>::try_from(t.shape.as_slice())
        .map_err(|_| format!("{what} must be 4-D {layout}, got {t}"))
}

fn rank2(t: &TensorType, what: &str) -> Result<[usize; 2], String> {
    <[usize; 2]>::try_from(t.shape.as_slice()).map_err(|_| format!("{what} must be 2-D, got {t}"))
}

fn positive(v: [usize; 2], what: &str) -> Result<(), String> {
    if v.contains(&0) {
        Err(format!("{what} must be positive, got {}", ShapeDisplay(&v)))
    } else {
        Ok(())
    }
}

/// Attribute lookup for [`Op::from_attrs`] that remembers which were consumed.
struct Attrs<'a> {
    op: &'a str,
    given: &'a [(String, AttrValue)],
    used: Vec<bool>,
}

impl Attrs<'_> {
    fn take(&mut self, key: &str) -> Result<&AttrValue, String> {
        let mut found = None;
        for (i, (k, v)) in self.given.iter().enumerate() {
            if k == key {
                if found.is_some() {
                    return Err(format!("attribute `{key}` of {} is given twice", self.op));
                }
                self.used[i] = true;
                found = Some(v);
            }
        }
        found.ok_or_else(|| format!("{} needs attribute `{key}`", self.op))
    }

    fn int(&mut self, key: &str) -> Result<usize, String> {
        match self.take(key)? {
            AttrValue::Int(i) => Ok(*i),
            other => Err(format!("attribute `{key}` must be an integer, got {other}")),
        }
    }

    fn bool(&mut self, key: &str) -> Result<bool, String> {
        match self.take(key)? {
            AttrValue::Bool(b) => Ok(*b),
            other => Err(format!(
                "attribute `{key}` must be true or false, got {other}"
            )),
        }
    }

    fn ints(&mut self, key: &str) -> Result<Vec<usize>, String> {
        match self.take(key)? {
            AttrValue::Ints(v) => Ok(v.clone()),
            other => Err(format!(
                "attribute `{key}` must be a list like [1,2], got {other}"
            )),
        }
    }

    fn pair(&mut self, key: &str) -> Result<[usize; 2], String> {
        let v = self.ints(key)?;
        <[usize; 2]>::try_from(v.as_slice()).map_err(|_| {
            format!(
                "attribute `{key}` must have two entries, got {}",
                ShapeDisplay(&v)
            )
        })
    }

    fn finish(self) -> Result<(), String> {
        match self.given.iter().zip(&self.used).find(|(_, used)| !**used) {
            None => Ok(()),
            Some(((k, _), _)) => {
                let known: Vec<&str> = Op::from_attrs_names(self.op);
                Err(if known.is_empty() {
                    format!("{} takes no attributes, got `{k}`", self.op)
                } else {
                    format!(
                        "unknown attribute `{k}` for {}; expected {}",
                        self.op,
                        known.join(", ")
                    )
                })
            }
        }
    }
}

impl Op {
    /// The attribute names an op takes, for error messages.
    fn from_attrs_names(name: &str) -> Vec<&'static str> {
        match name {
            "conv2d" => vec!["stride", "padding"],
            "bias_add" => vec!["axis"],
            "avg_pool2d" | "max_pool2d" => vec!["kernel", "stride"],
            "reshape" => vec!["shape"],
            "matmul" => vec!["transpose_a", "transpose_b"],
            "reduce_sum" | "reduce_mean" => vec!["axes"],
            _ => vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize]) -> TensorType {
        TensorType::f32(shape)
    }

    #[test]
    fn conv_output_shape_follows_pytorch_formula() {
        let op = Op::Conv2d {
            stride: [2, 1],
            padding: [1, 0],
        };
        let out = op
            .infer_type(&[&t(&[2, 3, 7, 9]), &t(&[4, 3, 3, 2])])
            .unwrap();
        // H: (7 + 2 - 3) / 2 + 1 = 4; W: (9 - 2) / 1 + 1 = 8
        assert_eq!(out, t(&[2, 4, 4, 8]));
    }

    #[test]
    fn conv_rejects_channel_mismatch_and_empty_output() {
        let op = Op::Conv2d {
            stride: [1, 1],
            padding: [0, 0],
        };
        let err = op
            .infer_type(&[&t(&[1, 3, 8, 8]), &t(&[4, 2, 3, 3])])
            .unwrap_err();
        assert_eq!(
            err,
            "input f32[1,3,8,8] has 3 channel(s) but weight f32[4,2,3,3] expects 2"
        );
        let err = op
            .infer_type(&[&t(&[1, 3, 2, 8]), &t(&[4, 3, 3, 3])])
            .unwrap_err();
        assert!(err.contains("output would be empty"), "{err}");
    }

    #[test]
    fn matmul_transposes() {
        let op = Op::MatMul {
            transpose_a: true,
            transpose_b: false,
        };
        assert_eq!(
            op.infer_type(&[&t(&[5, 3]), &t(&[5, 7])]).unwrap(),
            t(&[3, 7])
        );
        let err = op.infer_type(&[&t(&[4, 3]), &t(&[5, 7])]).unwrap_err();
        assert!(err.starts_with("inner dimensions differ"), "{err}");
    }

    #[test]
    fn reduce_removes_axes_and_checks_order() {
        let op = Op::ReduceSum { axes: vec![0, 2] };
        assert_eq!(op.infer_type(&[&t(&[2, 3, 4])]).unwrap(), t(&[3]));
        let op = Op::ReduceMean { axes: vec![1, 0] };
        assert!(
            op.infer_type(&[&t(&[2, 3])])
                .unwrap_err()
                .contains("strictly increasing")
        );
    }

    #[test]
    fn from_attrs_reports_missing_unknown_and_mistyped() {
        let a = |k: &str, v: AttrValue| (k.to_string(), v);
        assert_eq!(
            Op::from_attrs("conv2d", &[a("stride", AttrValue::Ints(vec![1, 1]))]).unwrap_err(),
            "conv2d needs attribute `padding`"
        );
        assert_eq!(
            Op::from_attrs("sigmoid", &[a("axis", AttrValue::Int(1))]).unwrap_err(),
            "sigmoid takes no attributes, got `axis`"
        );
        assert_eq!(
            Op::from_attrs("bias_add", &[a("axis", AttrValue::Bool(true))]).unwrap_err(),
            "attribute `axis` must be an integer, got true"
        );
        assert!(
            Op::from_attrs("conv3d", &[])
                .unwrap_err()
                .starts_with("unknown op `conv3d`")
        );
    }

    #[test]
    fn every_op_name_round_trips_through_from_attrs() {
        let ops = [
            Op::Conv2d {
                stride: [1, 2],
                padding: [0, 3],
            },
            Op::BiasAdd { axis: 1 },
            Op::AvgPool2d {
                kernel: [2, 2],
                stride: [2, 2],
            },
            Op::MaxPool2d {
                kernel: [3, 1],
                stride: [1, 1],
            },
            Op::Sigmoid,
            Op::Relu,
            Op::Tanh,
            Op::Reshape { shape: vec![4, 5] },
            Op::MatMul {
                transpose_a: false,
                transpose_b: true,
            },
            Op::SoftmaxCrossEntropy,
            Op::ReduceSum { axes: vec![0] },
            Op::ReduceMean { axes: vec![] },
            Op::ScaleU8,
        ];
        for op in ops {
            let attrs: Vec<(String, AttrValue)> = op
                .attrs()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            assert_eq!(Op::from_attrs(op.name(), &attrs).unwrap(), op);
            assert!(OP_NAMES.contains(&op.name()));
        }
    }
}
