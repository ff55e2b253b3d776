//! The operations of the graph IR and their typing rules.
//!
//! Ops are kept primitive (a `Linear` layer is `matmul` + `bias_add`) so that autodiff and fusion
//! see few, simple cases, yet named after what they do so the printed IR reads like the model.
//! The backward ops (`*_grad`) are what autodiff emits; they are ordinary ops with shapes, so a
//! training step prints, parses and runs like any other graph. Each op's meaning is defined by
//! the CPU reference executor (`kiln-reference`).

use std::fmt;
use std::hash::{Hash, Hasher};

use crate::types::{DType, ShapeDisplay, TensorType};

/// A finite f32 attribute (learning rate, scale factor, fill value). Compared and hashed by bit
/// pattern so ops can be keys (common-subexpression elimination); printed in Rust's shortest
/// round-trip form so the text form is exact.
#[derive(Clone, Copy, Debug)]
pub struct Scalar(pub f32);

impl PartialEq for Scalar {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for Scalar {}

impl Hash for Scalar {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state);
    }
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

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
    /// `silu(x) = x * sigmoid(x)` (PyTorch's `SiLU`, also called swish).
    Silu,
    /// Same elements, new shape (row-major); `Flatten` lowers to this.
    Reshape {
        shape: Vec<usize>,
    },
    /// `matmul(a, b)` on 2-D operands, each optionally transposed: `op(a)[M,K] x op(b)[K,N]`.
    MatMul {
        transpose_a: bool,
        transpose_b: bool,
    },
    /// `softmax_cross_entropy(logits: f32[N,C], labels: u8|u32|i32[N]) -> f32[N]`, the per-example
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
    /// A constant tensor of `shape` filled with `value`; takes no operands.
    Full {
        shape: Vec<usize>,
        value: Scalar,
    },
    /// The inverse of a reduction: inserts `axes` (positions in `shape`) by repeating `x`.
    Broadcast {
        shape: Vec<usize>,
        axes: Vec<usize>,
    },
    /// `x * factor`.
    Scale {
        factor: Scalar,
    },
    /// Elementwise `a + b` (same shapes); autodiff accumulates gradients with it.
    Add,
    /// Elementwise `a - b` (same shapes); the SGD update is `sub(p, scale(g, lr))`.
    Sub,
    /// Elementwise `a * b` (same shapes); optimizers square gradients with it.
    Mul,
    /// Elementwise `a / b` (same shapes), IEEE division (`x / 0` is infinite or NaN).
    Div,
    /// Elementwise square root (NaN below zero).
    Sqrt,
    /// Elementwise `e^x`; Adam's bias corrections are `1 - exp(t * ln(beta))`.
    Exp,
    /// `sigmoid_grad(y, dy) = dy * y * (1 - y)`, where `y` is the sigmoid's output.
    SigmoidGrad,
    /// `relu_grad(y, dy) = dy` where `y > 0`, else 0; `y` is the ReLU's output.
    ReluGrad,
    /// `tanh_grad(y, dy) = dy * (1 - y^2)`, where `y` is the tanh's output.
    TanhGrad,
    /// `silu_grad(x, dy) = dy * s * (1 + x * (1 - s))` with `s = sigmoid(x)`, where `x` is the
    /// SiLU's input (its output does not determine it).
    SiluGrad,
    /// Gradient of `conv2d` with respect to its input: `(dy: f32[N,O,H',W'], w) -> f32[N,C,H,W]`.
    /// `input_size` is `[H, W]`, which strides make ambiguous from `dy` alone.
    Conv2dGradInput {
        stride: [usize; 2],
        padding: [usize; 2],
        input_size: [usize; 2],
    },
    /// Gradient of `conv2d` with respect to its weight: `(x, dy) -> f32[O,C,KH,KW]`, summed
    /// over the batch.
    Conv2dGradWeight {
        stride: [usize; 2],
        padding: [usize; 2],
        kernel: [usize; 2],
    },
    /// Gradient of `avg_pool2d`: `(dy) -> f32[N,C,H,W]`, each window's gradient spread evenly.
    AvgPool2dGrad {
        kernel: [usize; 2],
        stride: [usize; 2],
        input_size: [usize; 2],
    },
    /// Gradient of `max_pool2d`: `(x, dy) -> f32[N,C,H,W]`; each window's gradient goes to the
    /// element `max_pool2d` picked (the first maximum), accumulating where windows overlap.
    MaxPool2dGrad {
        kernel: [usize; 2],
        stride: [usize; 2],
    },
    /// Gradient of `softmax_cross_entropy`: `(logits, labels, dloss: f32[N]) -> f32[N,C]`,
    /// `(softmax(logits[n]) - onehot(labels[n])) * dloss[n]`.
    SoftmaxCrossEntropyGrad,
    /// Index of the first maximum of each row: `f32[N,C] -> u32[N]`.
    Argmax,
    /// Rows of `data` picked by `indices`: `(data: T[M, ...], indices: u32[B]) -> T[B, ...]`.
    /// This is how a batch is read from a data set that stays on the device.
    Gather,
    /// Number of positions where two integer tensors agree: `-> u32[]`.
    CountEqual,
}

/// What an op's output reads of its operands, in the spirit of TVM's op patterns: the one
/// table that fusion (`kiln-compiler`'s plan) and scheduling (blocking, chunking) read, so
/// that a new op cannot compile without a category, and falls into its category's rules
/// instead of silently into none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpPattern {
    /// A graph leaf: declared, loaded, never computed.
    Leaf,
    /// A constant of its type: reads nothing.
    Constant,
    /// Element `j` of the result reads element `j` of each operand, all of its shape, and
    /// nothing else.
    Elementwise,
    /// Elementwise on its first operand, the others broadcast along the missing axes
    /// (`bias_add`).
    Broadcast,
    /// Data movement: each output element is one element of an operand (`reshape`, `gather`,
    /// `broadcast`).
    Injective,
    /// Each output element reads a small fixed window of an operand (pools, their gradients).
    Window,
    /// Sums or scans whole rows or axes of an operand (`reduce_sum`, `reduce_mean`, softmax
    /// cross-entropy and its gradient, `argmax`, `count_equal`).
    Reduction,
    /// A reduction whose inner products are the expensive part and whose consumers fuse as its
    /// epilogue (convolutions and their gradients, `matmul`): TVM's "out-elementwise-fusable".
    Anchor,
}

/// An attribute value in the text form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttrValue {
    Int(usize),
    Bool(bool),
    Ints(Vec<usize>),
    Float(Scalar),
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Int(i) => write!(f, "{i}"),
            AttrValue::Bool(b) => write!(f, "{b}"),
            AttrValue::Ints(v) => write!(f, "{}", ShapeDisplay(v)),
            AttrValue::Float(x) => write!(f, "{x}"),
        }
    }
}

/// Every op's text-form name with its attribute names, in the order ops are documented.
const SIGNATURES: &[(&str, &[&str])] = &[
    ("input", &[]),
    ("param", &[]),
    ("conv2d", &["stride", "padding"]),
    ("bias_add", &["axis"]),
    ("avg_pool2d", &["kernel", "stride"]),
    ("max_pool2d", &["kernel", "stride"]),
    ("sigmoid", &[]),
    ("relu", &[]),
    ("tanh", &[]),
    ("silu", &[]),
    ("reshape", &["shape"]),
    ("matmul", &["transpose_a", "transpose_b"]),
    ("softmax_cross_entropy", &[]),
    ("reduce_sum", &["axes"]),
    ("reduce_mean", &["axes"]),
    ("scale_u8", &[]),
    ("full", &["shape", "value"]),
    ("broadcast", &["shape", "axes"]),
    ("scale", &["factor"]),
    ("add", &[]),
    ("sub", &[]),
    ("mul", &[]),
    ("div", &[]),
    ("sqrt", &[]),
    ("exp", &[]),
    ("sigmoid_grad", &[]),
    ("relu_grad", &[]),
    ("tanh_grad", &[]),
    ("silu_grad", &[]),
    ("conv2d_grad_input", &["stride", "padding", "input_size"]),
    ("conv2d_grad_weight", &["stride", "padding", "kernel"]),
    ("avg_pool2d_grad", &["kernel", "stride", "input_size"]),
    ("max_pool2d_grad", &["kernel", "stride"]),
    ("softmax_cross_entropy_grad", &[]),
    ("argmax", &[]),
    ("count_equal", &[]),
    ("gather", &[]),
];

/// Every op's text-form name.
pub fn op_names() -> impl Iterator<Item = &'static str> {
    SIGNATURES.iter().map(|(n, _)| *n)
}

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
            Op::Silu => "silu",
            Op::Reshape { .. } => "reshape",
            Op::MatMul { .. } => "matmul",
            Op::SoftmaxCrossEntropy => "softmax_cross_entropy",
            Op::ReduceSum { .. } => "reduce_sum",
            Op::ReduceMean { .. } => "reduce_mean",
            Op::ScaleU8 => "scale_u8",
            Op::Full { .. } => "full",
            Op::Broadcast { .. } => "broadcast",
            Op::Scale { .. } => "scale",
            Op::Add => "add",
            Op::Sub => "sub",
            Op::Mul => "mul",
            Op::Div => "div",
            Op::Sqrt => "sqrt",
            Op::Exp => "exp",
            Op::SigmoidGrad => "sigmoid_grad",
            Op::ReluGrad => "relu_grad",
            Op::TanhGrad => "tanh_grad",
            Op::SiluGrad => "silu_grad",
            Op::Conv2dGradInput { .. } => "conv2d_grad_input",
            Op::Conv2dGradWeight { .. } => "conv2d_grad_weight",
            Op::AvgPool2dGrad { .. } => "avg_pool2d_grad",
            Op::MaxPool2dGrad { .. } => "max_pool2d_grad",
            Op::SoftmaxCrossEntropyGrad => "softmax_cross_entropy_grad",
            Op::Argmax => "argmax",
            Op::CountEqual => "count_equal",
            Op::Gather => "gather",
        }
    }

    /// The op's category ([`OpPattern`]). No wildcard: a new op must take a place here.
    pub fn pattern(&self) -> OpPattern {
        match self {
            Op::Input { .. } | Op::Param { .. } => OpPattern::Leaf,
            Op::Full { .. } => OpPattern::Constant,
            Op::Sigmoid
            | Op::Relu
            | Op::Tanh
            | Op::Silu
            | Op::SigmoidGrad
            | Op::ReluGrad
            | Op::TanhGrad
            | Op::SiluGrad
            | Op::Add
            | Op::Sub
            | Op::Mul
            | Op::Div
            | Op::Sqrt
            | Op::Exp
            | Op::Scale { .. }
            | Op::ScaleU8 => OpPattern::Elementwise,
            Op::BiasAdd { .. } => OpPattern::Broadcast,
            Op::Reshape { .. } | Op::Gather | Op::Broadcast { .. } => OpPattern::Injective,
            Op::AvgPool2d { .. }
            | Op::MaxPool2d { .. }
            | Op::AvgPool2dGrad { .. }
            | Op::MaxPool2dGrad { .. } => OpPattern::Window,
            Op::ReduceSum { .. }
            | Op::ReduceMean { .. }
            | Op::SoftmaxCrossEntropy
            | Op::SoftmaxCrossEntropyGrad
            | Op::Argmax
            | Op::CountEqual => OpPattern::Reduction,
            Op::Conv2d { .. }
            | Op::Conv2dGradInput { .. }
            | Op::Conv2dGradWeight { .. }
            | Op::MatMul { .. } => OpPattern::Anchor,
        }
    }

    /// Whether the op is elementwise over operands of its own shape
    /// ([`OpPattern::Elementwise`]).
    pub fn is_elementwise(&self) -> bool {
        self.pattern() == OpPattern::Elementwise
    }

    /// Whether the node is a graph leaf whose type is declared rather than inferred.
    pub fn is_leaf(&self) -> bool {
        self.pattern() == OpPattern::Leaf
    }

    /// Number of operands the op takes.
    pub fn arity(&self) -> usize {
        match self {
            Op::Input { .. } | Op::Param { .. } | Op::Full { .. } => 0,
            Op::AvgPool2d { .. }
            | Op::MaxPool2d { .. }
            | Op::Sigmoid
            | Op::Relu
            | Op::Tanh
            | Op::Silu
            | Op::Reshape { .. }
            | Op::ReduceSum { .. }
            | Op::ReduceMean { .. }
            | Op::ScaleU8
            | Op::Broadcast { .. }
            | Op::Scale { .. }
            | Op::Sqrt
            | Op::Exp
            | Op::AvgPool2dGrad { .. }
            | Op::Argmax => 1,
            Op::Conv2d { .. }
            | Op::BiasAdd { .. }
            | Op::MatMul { .. }
            | Op::SoftmaxCrossEntropy
            | Op::Add
            | Op::Sub
            | Op::Mul
            | Op::Div
            | Op::SigmoidGrad
            | Op::ReluGrad
            | Op::TanhGrad
            | Op::SiluGrad
            | Op::Conv2dGradInput { .. }
            | Op::Conv2dGradWeight { .. }
            | Op::MaxPool2dGrad { .. }
            | Op::CountEqual
            | Op::Gather => 2,
            Op::SoftmaxCrossEntropyGrad => 3,
        }
    }

    /// The op's attributes in text-form order (leaf names are not attributes).
    pub fn attrs(&self) -> Vec<(&'static str, AttrValue)> {
        let pair = |v: &[usize; 2]| AttrValue::Ints(v.to_vec());
        let ints = |v: &Vec<usize>| AttrValue::Ints(v.clone());
        match self {
            Op::Conv2d { stride, padding } => {
                vec![("stride", pair(stride)), ("padding", pair(padding))]
            }
            Op::BiasAdd { axis } => vec![("axis", AttrValue::Int(*axis))],
            Op::AvgPool2d { kernel, stride }
            | Op::MaxPool2d { kernel, stride }
            | Op::MaxPool2dGrad { kernel, stride } => {
                vec![("kernel", pair(kernel)), ("stride", pair(stride))]
            }
            Op::Reshape { shape } => vec![("shape", ints(shape))],
            Op::MatMul {
                transpose_a,
                transpose_b,
            } => vec![
                ("transpose_a", AttrValue::Bool(*transpose_a)),
                ("transpose_b", AttrValue::Bool(*transpose_b)),
            ],
            Op::ReduceSum { axes } | Op::ReduceMean { axes } => vec![("axes", ints(axes))],
            Op::Full { shape, value } => {
                vec![("shape", ints(shape)), ("value", AttrValue::Float(*value))]
            }
            Op::Broadcast { shape, axes } => vec![("shape", ints(shape)), ("axes", ints(axes))],
            Op::Scale { factor } => vec![("factor", AttrValue::Float(*factor))],
            Op::Conv2dGradInput {
                stride,
                padding,
                input_size,
            } => vec![
                ("stride", pair(stride)),
                ("padding", pair(padding)),
                ("input_size", pair(input_size)),
            ],
            Op::Conv2dGradWeight {
                stride,
                padding,
                kernel,
            } => vec![
                ("stride", pair(stride)),
                ("padding", pair(padding)),
                ("kernel", pair(kernel)),
            ],
            Op::AvgPool2dGrad {
                kernel,
                stride,
                input_size,
            } => vec![
                ("kernel", pair(kernel)),
                ("stride", pair(stride)),
                ("input_size", pair(input_size)),
            ],
            Op::Input { .. }
            | Op::Param { .. }
            | Op::Sigmoid
            | Op::Relu
            | Op::Tanh
            | Op::Silu
            | Op::SoftmaxCrossEntropy
            | Op::ScaleU8
            | Op::Add
            | Op::Sub
            | Op::Mul
            | Op::Div
            | Op::Sqrt
            | Op::Exp
            | Op::SigmoidGrad
            | Op::ReluGrad
            | Op::TanhGrad
            | Op::SiluGrad
            | Op::SoftmaxCrossEntropyGrad
            | Op::Argmax
            | Op::CountEqual
            | Op::Gather => vec![],
        }
    }

    /// Builds a non-leaf op from its text-form name and attributes. Every attribute the op has
    /// must be given exactly once; the error says which one is missing, unknown or ill-typed.
    pub fn from_attrs(name: &str, attrs: &[(String, AttrValue)]) -> Result<Op, String> {
        let Some((_, known)) = SIGNATURES.iter().find(|(n, _)| *n == name) else {
            let names: Vec<&str> = op_names().collect();
            return Err(format!(
                "unknown op `{name}`; expected one of {}",
                names.join(", ")
            ));
        };
        let mut a = Attrs {
            op: name,
            known,
            given: attrs,
            used: vec![false; attrs.len()],
        };
        let op = match name {
            "input" | "param" => {
                return Err(format!("`{name}` takes a quoted name, not operands"));
            }
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
            "silu" => Op::Silu,
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
            "full" => Op::Full {
                shape: a.ints("shape")?,
                value: a.float("value")?,
            },
            "broadcast" => Op::Broadcast {
                shape: a.ints("shape")?,
                axes: a.ints("axes")?,
            },
            "scale" => Op::Scale {
                factor: a.float("factor")?,
            },
            "add" => Op::Add,
            "sub" => Op::Sub,
            "mul" => Op::Mul,
            "div" => Op::Div,
            "sqrt" => Op::Sqrt,
            "exp" => Op::Exp,
            "sigmoid_grad" => Op::SigmoidGrad,
            "relu_grad" => Op::ReluGrad,
            "tanh_grad" => Op::TanhGrad,
            "silu_grad" => Op::SiluGrad,
            "conv2d_grad_input" => Op::Conv2dGradInput {
                stride: a.pair("stride")?,
                padding: a.pair("padding")?,
                input_size: a.pair("input_size")?,
            },
            "conv2d_grad_weight" => Op::Conv2dGradWeight {
                stride: a.pair("stride")?,
                padding: a.pair("padding")?,
                kernel: a.pair("kernel")?,
            },
            "avg_pool2d_grad" => Op::AvgPool2dGrad {
                kernel: a.pair("kernel")?,
                stride: a.pair("stride")?,
                input_size: a.pair("input_size")?,
            },
            "max_pool2d_grad" => Op::MaxPool2dGrad {
                kernel: a.pair("kernel")?,
                stride: a.pair("stride")?,
            },
            "softmax_cross_entropy_grad" => Op::SoftmaxCrossEntropyGrad,
            "argmax" => Op::Argmax,
            "count_equal" => Op::CountEqual,
            "gather" => Op::Gather,
            _ => unreachable!("every name in SIGNATURES is matched above"),
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
            Op::Sigmoid | Op::Relu | Op::Tanh | Op::Silu | Op::Sqrt | Op::Exp => {
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
                        "labels must be integers (u8, u32 or i32) of shape [{n}] to match logits {logits}, got {labels}"
                    ));
                }
                Ok(TensorType::f32([n]))
            }
            Op::ReduceSum { axes } | Op::ReduceMean { axes } => {
                let x = operands[0];
                expect_f32(x, "input")?;
                check_axes(axes, x.rank(), x)?;
                if matches!(self, Op::ReduceMean { .. }) && axes.iter().any(|&a| x.shape[a] == 0) {
                    return Err(format!("mean over an empty axis of {x}"));
                }
                Ok(TensorType::f32(without_axes(&x.shape, axes)))
            }
            Op::ScaleU8 => {
                let x = operands[0];
                if x.dtype != DType::U8 {
                    return Err(format!("input must be u8, got {x}"));
                }
                Ok(TensorType::f32(x.shape.clone()))
            }
            Op::Full { shape, value } => {
                finite(*value, "value")?;
                let ty = TensorType::f32(shape.clone());
                if ty.checked_numel().is_none() {
                    return Err(format!("type {ty} has too many elements"));
                }
                Ok(ty)
            }
            Op::Broadcast { shape, axes } => {
                let x = operands[0];
                expect_f32(x, "input")?;
                let to = TensorType::f32(shape.clone());
                check_axes(axes, shape.len(), &to)?;
                if to.checked_numel().is_none() {
                    return Err(format!("type {to} has too many elements"));
                }
                let kept = without_axes(shape, axes);
                if x.shape != kept {
                    return Err(format!(
                        "input {x} must have shape {} to broadcast to {to} along axes {}",
                        ShapeDisplay(&kept),
                        ShapeDisplay(axes)
                    ));
                }
                Ok(to)
            }
            Op::Scale { factor } => {
                finite(*factor, "factor")?;
                expect_f32(operands[0], "input")?;
                Ok(operands[0].clone())
            }
            Op::Add
            | Op::Sub
            | Op::Mul
            | Op::Div
            | Op::SigmoidGrad
            | Op::ReluGrad
            | Op::TanhGrad
            | Op::SiluGrad => {
                let (a, b) = (operands[0], operands[1]);
                expect_f32(a, "first operand")?;
                expect_f32(b, "second operand")?;
                if a.shape != b.shape {
                    return Err(format!("operands differ in shape: {a} and {b}"));
                }
                Ok(a.clone())
            }
            Op::Conv2dGradInput {
                stride,
                padding,
                input_size,
            } => {
                let (dy, w) = (operands[0], operands[1]);
                let [n, _, _, _] = rank4(dy, "output gradient", "[N,O,H',W']")?;
                let [_, c, _, _] = rank4(w, "weight", "[O,C,KH,KW]")?;
                let x = TensorType::f32([n, c, input_size[0], input_size[1]]);
                let conv = Op::Conv2d {
                    stride: *stride,
                    padding: *padding,
                };
                expect_forward(&conv, &[&x, w], dy)?;
                Ok(x)
            }
            Op::Conv2dGradWeight {
                stride,
                padding,
                kernel,
            } => {
                let (x, dy) = (operands[0], operands[1]);
                let [_, c, _, _] = rank4(x, "input", "[N,C,H,W]")?;
                let [_, o, _, _] = rank4(dy, "output gradient", "[N,O,H',W']")?;
                let w = TensorType::f32([o, c, kernel[0], kernel[1]]);
                let conv = Op::Conv2d {
                    stride: *stride,
                    padding: *padding,
                };
                expect_forward(&conv, &[x, &w], dy)?;
                Ok(w)
            }
            Op::AvgPool2dGrad {
                kernel,
                stride,
                input_size,
            } => {
                let dy = operands[0];
                let [n, c, _, _] = rank4(dy, "output gradient", "[N,C,H',W']")?;
                let x = TensorType::f32([n, c, input_size[0], input_size[1]]);
                let pool = Op::AvgPool2d {
                    kernel: *kernel,
                    stride: *stride,
                };
                expect_forward(&pool, &[&x], dy)?;
                Ok(x)
            }
            Op::MaxPool2dGrad { kernel, stride } => {
                let (x, dy) = (operands[0], operands[1]);
                let pool = Op::MaxPool2d {
                    kernel: *kernel,
                    stride: *stride,
                };
                expect_forward(&pool, &[x], dy)?;
                Ok(x.clone())
            }
            Op::SoftmaxCrossEntropyGrad => {
                let (logits, labels, dloss) = (operands[0], operands[1], operands[2]);
                expect_forward(&Op::SoftmaxCrossEntropy, &[logits, labels], dloss)?;
                Ok(logits.clone())
            }
            Op::Argmax => {
                let x = operands[0];
                expect_f32(x, "input")?;
                let [n, c] = rank2(x, "input")?;
                if c == 0 {
                    return Err(format!("input {x} has empty rows"));
                }
                Ok(TensorType::new(DType::U32, [n]))
            }
            Op::CountEqual => {
                let (a, b) = (operands[0], operands[1]);
                if !a.dtype.is_integer_label() || !b.dtype.is_integer_label() || a.shape != b.shape
                {
                    return Err(format!(
                        "operands must be integer tensors (u8, u32 or i32) of one shape, got {a} and {b}"
                    ));
                }
                Ok(TensorType::new(DType::U32, []))
            }
            Op::Gather => {
                let (data, indices) = (operands[0], operands[1]);
                if data.rank() == 0 {
                    return Err(format!("data {data} has no rows to gather"));
                }
                if indices.dtype != DType::U32 || indices.rank() != 1 {
                    return Err(format!("indices must be u32[B], got {indices}"));
                }
                let mut shape = data.shape.clone();
                shape[0] = indices.shape[0];
                Ok(TensorType::new(data.dtype, shape))
            }
        }
    }
}

/// Checks that a gradient op's operands are consistent with the forward op it differentiates:
/// applying `forward` to `inputs` must give exactly `dy`'s type.
fn expect_forward(forward: &Op, inputs: &[&TensorType], dy: &TensorType) -> Result<(), String> {
    let y = forward.infer_type(inputs)?;
    if &y != dy {
        return Err(format!(
            "gradient {dy} does not match {}'s output {y}",
            forward.name()
        ));
    }
    Ok(())
}

fn check_axes(axes: &[usize], rank: usize, of: &TensorType) -> Result<(), String> {
    if axes.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!(
            "axes {} must be strictly increasing",
            ShapeDisplay(axes)
        ));
    }
    if let Some(&bad) = axes.iter().find(|&&a| a >= rank) {
        return Err(format!("axis {bad} is out of range for {of}"));
    }
    Ok(())
}

/// `shape` with the listed axes removed.
pub fn without_axes(shape: &[usize], axes: &[usize]) -> Vec<usize> {
    (0..shape.len())
        .filter(|a| !axes.contains(a))
        .map(|a| shape[a])
        .collect()
}

fn finite(v: Scalar, what: &str) -> Result<(), String> {
    if v.0.is_finite() {
        Ok(())
    } else {
        Err(format!("{what} must be finite, got {}", v.0))
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
    known: &'a [&'a str],
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

    fn float(&mut self, key: &str) -> Result<Scalar, String> {
        match self.take(key)? {
            AttrValue::Float(x) => Ok(*x),
            AttrValue::Int(i) => Ok(Scalar(*i as f32)),
            other => Err(format!("attribute `{key}` must be a number, got {other}")),
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
            Some(((k, _), _)) => Err(if self.known.is_empty() {
                format!("{} takes no attributes, got `{k}`", self.op)
            } else {
                format!(
                    "unknown attribute `{k}` for {}; expected {}",
                    self.op,
                    self.known.join(", ")
                )
            }),
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
    fn gradient_ops_check_against_their_forward_op() {
        let op = Op::Conv2dGradInput {
            stride: [2, 2],
            padding: [1, 1],
            input_size: [7, 7],
        };
        // conv of [2,3,7,7] with [4,3,3,3], stride 2, pad 1 gives [2,4,4,4].
        assert_eq!(
            op.infer_type(&[&t(&[2, 4, 4, 4]), &t(&[4, 3, 3, 3])])
                .unwrap(),
            t(&[2, 3, 7, 7])
        );
        let op = Op::Conv2dGradInput {
            stride: [2, 2],
            padding: [1, 1],
            input_size: [9, 9],
        };
        assert_eq!(
            op.infer_type(&[&t(&[2, 4, 4, 4]), &t(&[4, 3, 3, 3])])
                .unwrap_err(),
            "gradient f32[2,4,4,4] does not match conv2d's output f32[2,4,5,5]"
        );
        let op = Op::Conv2dGradWeight {
            stride: [1, 1],
            padding: [0, 0],
            kernel: [3, 3],
        };
        assert_eq!(
            op.infer_type(&[&t(&[2, 3, 5, 5]), &t(&[2, 4, 3, 3])])
                .unwrap(),
            t(&[4, 3, 3, 3])
        );
        let op = Op::AvgPool2dGrad {
            kernel: [2, 2],
            stride: [2, 2],
            input_size: [5, 5],
        };
        assert_eq!(
            op.infer_type(&[&t(&[1, 2, 2, 2])]).unwrap(),
            t(&[1, 2, 5, 5])
        );
        let labels = TensorType::new(DType::U32, [3]);
        assert_eq!(
            Op::SoftmaxCrossEntropyGrad
                .infer_type(&[&t(&[3, 4]), &labels, &t(&[3])])
                .unwrap(),
            t(&[3, 4])
        );
        assert_eq!(Op::Argmax.infer_type(&[&t(&[3, 4])]).unwrap(), labels);
        assert_eq!(
            Op::CountEqual.infer_type(&[&labels, &labels]).unwrap(),
            TensorType::new(DType::U32, [])
        );
        let op = Op::Broadcast {
            shape: vec![2, 3, 4],
            axes: vec![0, 2],
        };
        assert_eq!(op.infer_type(&[&t(&[3])]).unwrap(), t(&[2, 3, 4]));
        assert!(
            op.infer_type(&[&t(&[2])])
                .unwrap_err()
                .starts_with("input f32[2] must have shape [3]")
        );
        assert_eq!(
            Op::Scale {
                factor: Scalar(f32::NAN)
            }
            .infer_type(&[&t(&[1])])
            .unwrap_err(),
            "factor must be finite, got NaN"
        );
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
            Op::Silu,
            Op::Reshape { shape: vec![4, 5] },
            Op::MatMul {
                transpose_a: false,
                transpose_b: true,
            },
            Op::SoftmaxCrossEntropy,
            Op::ReduceSum { axes: vec![0] },
            Op::ReduceMean { axes: vec![] },
            Op::ScaleU8,
            Op::Full {
                shape: vec![2],
                value: Scalar(0.5),
            },
            Op::Broadcast {
                shape: vec![2, 3],
                axes: vec![1],
            },
            Op::Scale {
                factor: Scalar(-0.9),
            },
            Op::Add,
            Op::Sub,
            Op::Mul,
            Op::Div,
            Op::Sqrt,
            Op::Exp,
            Op::SigmoidGrad,
            Op::ReluGrad,
            Op::TanhGrad,
            Op::SiluGrad,
            Op::Conv2dGradInput {
                stride: [1, 2],
                padding: [0, 1],
                input_size: [5, 6],
            },
            Op::Conv2dGradWeight {
                stride: [1, 1],
                padding: [2, 2],
                kernel: [5, 5],
            },
            Op::AvgPool2dGrad {
                kernel: [2, 2],
                stride: [2, 2],
                input_size: [4, 4],
            },
            Op::MaxPool2dGrad {
                kernel: [2, 2],
                stride: [1, 1],
            },
            Op::SoftmaxCrossEntropyGrad,
            Op::Argmax,
            Op::CountEqual,
            Op::Gather,
        ];
        assert_eq!(
            ops.len() + 2,
            op_names().count(),
            "every non-leaf op is listed here"
        );
        for op in ops {
            let attrs: Vec<(String, AttrValue)> = op
                .attrs()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            assert_eq!(Op::from_attrs(op.name(), &attrs).unwrap(), op);
            assert!(op_names().any(|n| n == op.name()));
        }
    }
}
