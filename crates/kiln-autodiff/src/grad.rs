//! Reverse-mode differentiation of a scalar over the graph IR.
//!
//! Each forward op has a vector-Jacobian rule below that emits ordinary IR ops (many of them
//! the `*_grad` ops); gradients of values read by several consumers are summed with `add`.
//! Emitted nodes carry the layer of the forward node they differentiate, so the printed step
//! reads layer by layer and fusion can group by layer.

use kiln_ir::{Graph, GraphError, LayerRef, NodeId, Op, Scalar, TensorType};

/// Why a gradient could not be derived.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AutodiffError {
    #[error("the loss {node} must be an f32 scalar (f32[]), got {ty}")]
    LossNotScalar { node: NodeId, ty: TensorType },
    #[error("cannot differentiate through {node} ({op}): {why}")]
    Unsupported {
        node: NodeId,
        op: &'static str,
        why: &'static str,
    },
    #[error("the forward graph has no output named `{0}`")]
    MissingOutput(String),
    #[error("the model's output must be logits f32[N,C], got {0}")]
    NotLogits(TensorType),
    #[error("optimizer: {0}")]
    Optimizer(String),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Invalid(#[from] kiln_ir::VerifyError),
}

/// Appends nodes that emit gradient ops, folding constants so that e.g. the gradient of a
/// mean is one `full` rather than a chain of broadcasts and scales.
struct Emitter<'g> {
    graph: &'g mut Graph,
    layer: Option<LayerRef>,
}

impl Emitter<'_> {
    fn op(&mut self, op: Op, inputs: &[NodeId]) -> Result<NodeId, GraphError> {
        let folded = match (&op, inputs.first().map(|&i| &self.graph.node(i).op)) {
            (Op::Scale { factor }, Some(Op::Full { shape, value })) => Some(Op::Full {
                shape: shape.clone(),
                value: Scalar(value.0 * factor.0),
            }),
            (Op::Broadcast { shape, .. } | Op::Reshape { shape }, Some(Op::Full { value, .. })) => {
                Some(Op::Full {
                    shape: shape.clone(),
                    value: *value,
                })
            }
            _ => None,
        };
        match folded {
            Some(full) => self.graph.add_in_layer(full, &[], self.layer.clone()),
            None => self.graph.add_in_layer(op, inputs, self.layer.clone()),
        }
    }

    fn full(&mut self, shape: Vec<usize>, value: f32) -> Result<NodeId, GraphError> {
        self.op(
            Op::Full {
                shape,
                value: Scalar(value),
            },
            &[],
        )
    }
}

/// Appends to `graph` the gradient of the scalar `loss` with respect to each node of `wrt`,
/// returning the gradient nodes in the same order. A node the loss does not depend on gets a
/// zero gradient.
pub fn gradients(
    graph: &mut Graph,
    loss: NodeId,
    wrt: &[NodeId],
) -> Result<Vec<NodeId>, AutodiffError> {
    let loss_ty = graph.ty(loss).clone();
    if loss_ty != TensorType::f32([]) {
        return Err(AutodiffError::LossNotScalar {
            node: loss,
            ty: loss_ty,
        });
    }
    let n = loss.0 + 1;
    // A node needs a gradient when it is float and some wrt node flows into it.
    let mut needed = vec![false; n];
    for (id, node) in graph.iter().take(n) {
        needed[id.0] = node.ty.dtype == kiln_ir::DType::F32
            && (wrt.contains(&id) || node.inputs.iter().any(|i| needed[i.0]));
    }
    let mut contributions: Vec<Vec<NodeId>> = vec![Vec::new(); n];
    let mut grad: Vec<Option<NodeId>> = vec![None; n];
    let mut e = Emitter { graph, layer: None };
    if needed[loss.0] {
        contributions[loss.0].push(e.full(vec![], 1.0)?);
    }
    for i in (0..n).rev() {
        let id = NodeId(i);
        if contributions[i].is_empty() {
            continue;
        }
        let node = e.graph.node(id).clone();
        e.layer = node.layer.clone();
        let mut g = contributions[i][0];
        for &c in &contributions[i][1..] {
            g = e.op(Op::Add, &[g, c])?;
        }
        grad[i] = Some(g);
        for (k, d) in vjp(&mut e, id, g)? {
            let operand = node.inputs[k];
            if needed[operand.0] {
                contributions[operand.0].push(d);
            }
        }
    }
    wrt.iter()
        .map(|&w| match grad.get(w.0).copied().flatten() {
            Some(g) => Ok(g),
            None => {
                let shape = e.graph.ty(w).shape.clone();
                e.layer = e.graph.node(w).layer.clone();
                Ok(e.full(shape, 0.0)?)
            }
        })
        .collect()
}

/// The gradient contributions of node `id` (whose output gradient is `g`) to its operands, as
/// `(operand position, gradient node)`. Only float operands get one.
fn vjp(e: &mut Emitter, id: NodeId, g: NodeId) -> Result<Vec<(usize, NodeId)>, AutodiffError> {
    let node = e.graph.node(id).clone();
    let ins = &node.inputs;
    let shape_of = |e: &Emitter, k: usize| e.graph.ty(ins[k]).shape.clone();
    let hw = |s: &[usize]| [s[2], s[3]];
    let unsupported = |why| AutodiffError::Unsupported {
        node: id,
        op: node.op.name(),
        why,
    };
    Ok(match &node.op {
        Op::Input { .. } | Op::Param { .. } | Op::Full { .. } => vec![],
        Op::Conv2d { stride, padding } => {
            let (xs, ws) = (shape_of(e, 0), shape_of(e, 1));
            let dx = e.op(
                Op::Conv2dGradInput {
                    stride: *stride,
                    padding: *padding,
                    input_size: hw(&xs),
                },
                &[g, ins[1]],
            )?;
            let dw = e.op(
                Op::Conv2dGradWeight {
                    stride: *stride,
                    padding: *padding,
                    kernel: hw(&ws),
                },
                &[ins[0], g],
            )?;
            vec![(0, dx), (1, dw)]
        }
        Op::BiasAdd { axis } => {
            let rank = shape_of(e, 0).len();
            let axes = (0..rank).filter(|a| a != axis).collect();
            let db = e.op(Op::ReduceSum { axes }, &[g])?;
            vec![(0, g), (1, db)]
        }
        Op::AvgPool2d { kernel, stride } => {
            let input_size = hw(&shape_of(e, 0));
            let dx = e.op(
                Op::AvgPool2dGrad {
                    kernel: *kernel,
                    stride: *stride,
                    input_size,
                },
                &[g],
            )?;
            vec![(0, dx)]
        }
        Op::MaxPool2d { kernel, stride } => {
            let dx = e.op(
                Op::MaxPool2dGrad {
                    kernel: *kernel,
                    stride: *stride,
                },
                &[ins[0], g],
            )?;
            vec![(0, dx)]
        }
        Op::Sigmoid => vec![(0, e.op(Op::SigmoidGrad, &[id, g])?)],
        Op::Relu => vec![(0, e.op(Op::ReluGrad, &[id, g])?)],
        Op::Tanh => vec![(0, e.op(Op::TanhGrad, &[id, g])?)],
        // From the input: SiLU is not monotonic, so its output does not give it.
        Op::Silu => vec![(0, e.op(Op::SiluGrad, &[ins[0], g])?)],
        Op::Reshape { .. } => {
            let shape = shape_of(e, 0);
            vec![(0, e.op(Op::Reshape { shape }, &[g])?)]
        }
        Op::MatMul {
            transpose_a: ta,
            transpose_b: tb,
        } => {
            let (ta, tb) = (*ta, *tb);
            let mm = |transpose_a, transpose_b| Op::MatMul {
                transpose_a,
                transpose_b,
            };
            // Y = op(A) op(B): dA = dY op(B)^T (or its transpose when A is read transposed),
            // dB = op(A)^T dY (likewise).
            let da = if ta {
                e.op(mm(tb, true), &[ins[1], g])?
            } else {
                e.op(mm(false, !tb), &[g, ins[1]])?
            };
            let db = if tb {
                e.op(mm(true, ta), &[g, ins[0]])?
            } else {
                e.op(mm(!ta, false), &[ins[0], g])?
            };
            vec![(0, da), (1, db)]
        }
        Op::SoftmaxCrossEntropy => {
            vec![(0, e.op(Op::SoftmaxCrossEntropyGrad, &[ins[0], ins[1], g])?)]
        }
        Op::ReduceSum { axes } => {
            let shape = shape_of(e, 0);
            let axes = axes.clone();
            vec![(0, e.op(Op::Broadcast { shape, axes }, &[g])?)]
        }
        Op::ReduceMean { axes } => {
            let shape = shape_of(e, 0);
            let count: usize = axes.iter().map(|&a| shape[a]).product();
            let axes = axes.clone();
            let b = e.op(Op::Broadcast { shape, axes }, &[g])?;
            let factor = Scalar(1.0 / count as f32);
            vec![(0, e.op(Op::Scale { factor }, &[b])?)]
        }
        Op::Broadcast { axes, .. } => {
            let axes = axes.clone();
            vec![(0, e.op(Op::ReduceSum { axes }, &[g])?)]
        }
        Op::Scale { factor } => vec![(0, e.op(Op::Scale { factor: *factor }, &[g])?)],
        Op::Add => vec![(0, g), (1, g)],
        Op::Sub => {
            let neg = e.op(
                Op::Scale {
                    factor: Scalar(-1.0),
                },
                &[g],
            )?;
            vec![(0, g), (1, neg)]
        }
        Op::Mul => {
            let da = e.op(Op::Mul, &[g, ins[1]])?;
            let db = e.op(Op::Mul, &[g, ins[0]])?;
            vec![(0, da), (1, db)]
        }
        Op::Div => {
            // y = a / b: da = g / b, db = -g * y / b.
            let da = e.op(Op::Div, &[g, ins[1]])?;
            let gy = e.op(Op::Mul, &[g, id])?;
            let q = e.op(Op::Div, &[gy, ins[1]])?;
            let db = e.op(
                Op::Scale {
                    factor: Scalar(-1.0),
                },
                &[q],
            )?;
            vec![(0, da), (1, db)]
        }
        Op::Sqrt => {
            // y = sqrt(x): dx = g / (2 y).
            let half = e.op(
                Op::Scale {
                    factor: Scalar(0.5),
                },
                &[g],
            )?;
            vec![(0, e.op(Op::Div, &[half, id])?)]
        }
        Op::Exp => vec![(0, e.op(Op::Mul, &[g, id])?)],
        // Integer-valued results never carry a gradient, and u8 inputs have none to receive.
        Op::ScaleU8 | Op::Argmax | Op::CountEqual => vec![],
        // Only float rows can need one, and their gradient would be a scatter-add.
        Op::Gather => {
            return Err(unsupported(
                "the gradient of gather (a scatter-add) is not supported",
            ));
        }
        Op::SigmoidGrad
        | Op::ReluGrad
        | Op::TanhGrad
        | Op::SiluGrad
        | Op::Conv2dGradInput { .. }
        | Op::Conv2dGradWeight { .. }
        | Op::AvgPool2dGrad { .. }
        | Op::MaxPool2dGrad { .. }
        | Op::SoftmaxCrossEntropyGrad => {
            return Err(unsupported("second derivatives are not supported"));
        }
    })
}
