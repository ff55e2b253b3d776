//! From a forward model graph to the graphs a training loop runs: the SGD training step and
//! the evaluation graph.

use kiln_ir::{
    DType, GatherInput, Graph, NodeId, Op, Scalar, TensorType, eliminate_common_subexpressions,
    eliminate_dead_code, gather_inputs, verify,
};

use crate::grad::{AutodiffError, gradients};
use crate::optim::{Optimizer, append_updates};

/// Output names of the step and evaluation graphs (updated parameters keep their own names).
pub const LOSS_SUM: &str = "loss_sum";
pub const CORRECT: &str = "correct";
/// The input holding one batch's labels.
pub const LABELS: &str = "labels";
/// The forward graph's output the loss is taken of.
pub const MODEL_OUTPUT: &str = "output";

/// Adds the labels input, the per-example losses, their sum, and the count of correct argmax
/// predictions after the forward graph's logits. Returns `(labels, losses, loss_sum)`.
fn add_loss(g: &mut Graph) -> Result<(NodeId, NodeId, NodeId), AutodiffError> {
    let logits = g
        .output(MODEL_OUTPUT)
        .ok_or_else(|| AutodiffError::MissingOutput(MODEL_OUTPUT.into()))?;
    let ty = g.ty(logits).clone();
    if ty.dtype != DType::F32 || ty.rank() != 2 {
        return Err(AutodiffError::NotLogits(ty));
    }
    let n = ty.shape[0];
    g.clear_outputs();
    let labels = g.add_input(LABELS, TensorType::new(DType::U32, [n]))?;
    let losses = g.add(Op::SoftmaxCrossEntropy, &[logits, labels])?;
    let loss_sum = g.add(Op::ReduceSum { axes: vec![0] }, &[losses])?;
    let predicted = g.add(Op::Argmax, &[logits])?;
    let correct = g.add(Op::CountEqual, &[predicted, labels])?;
    g.add_output(LOSS_SUM, loss_sum)?;
    g.add_output(CORRECT, correct)?;
    Ok((labels, losses, loss_sum))
}

/// Runs the clean-up passes and the verifier after each.
fn clean(g: Graph) -> Result<Graph, AutodiffError> {
    verify(&g)?;
    let g = eliminate_dead_code(&g);
    verify(&g)?;
    let g = eliminate_common_subexpressions(&g);
    verify(&g)?;
    Ok(g)
}

/// Derives one SGD training step from a forward graph whose output `output` is logits
/// `f32[N,C]`: [`training_step_with`] plain SGD at learning rate `lr`.
pub fn training_step(forward: &Graph, lr: f32) -> Result<Graph, AutodiffError> {
    training_step_with(forward, &Optimizer::sgd(lr))
}

/// Derives one training step from a forward graph whose output `output` is logits `f32[N,C]`.
/// The step takes the forward inputs plus `labels: u32[N]`, every parameter and the
/// optimizer's state ([`Optimizer::state`]), and outputs `loss_sum` (sum of per-example softmax
/// cross-entropy), `correct` (count of argmax hits) and, under each parameter's and each state
/// tensor's own name, its value after the optimizer's step on the gradient of the mean loss
/// over the batch. Hyperparameters are baked in, so the step is specialised per batch size and
/// optimizer.
pub fn training_step_with(forward: &Graph, optimizer: &Optimizer) -> Result<Graph, AutodiffError> {
    optimizer.validate().map_err(AutodiffError::Optimizer)?;
    let mut g = forward.clone();
    g.name = format!("{}_step", forward.name);
    verify(&g)?;
    let (_, losses, loss_sum) = add_loss(&mut g)?;
    let n = g.ty(losses).shape[0];
    let loss = g.add(
        Op::Scale {
            factor: Scalar(1.0 / n as f32),
        },
        &[loss_sum],
    )?;
    let params: Vec<(NodeId, String)> = g
        .params()
        .map(|(id, name, _)| (id, name.to_string()))
        .collect();
    let ids: Vec<NodeId> = params.iter().map(|(id, _)| *id).collect();
    let grads = gradients(&mut g, loss, &ids)?;
    let with_grads: Vec<(NodeId, String, NodeId)> = params
        .into_iter()
        .zip(grads)
        .map(|((p, name), dp)| (p, name, dp))
        .collect();
    for (name, updated) in append_updates(&mut g, optimizer, &with_grads)? {
        g.add_output(name, updated)?;
    }
    clean(g)
}

/// The evaluation graph: the forward pass plus `labels`, with outputs `loss_sum` and `correct`.
pub fn evaluation_graph(forward: &Graph) -> Result<Graph, AutodiffError> {
    let mut g = forward.clone();
    g.name = format!("{}_eval", forward.name);
    verify(&g)?;
    add_loss(&mut g)?;
    clean(g)
}

/// The data-set inputs of a graph rewritten by [`read_batches_from_dataset`].
pub const DATASET_IMAGES: &str = "dataset.x";
pub const DATASET_LABELS: &str = "dataset.labels";

/// Rewrites a step or evaluation graph to read its batch from a data set of `rows` examples
/// kept on the device: `x` becomes `gather(dataset.x: u8[rows,...], batch.indices)` and
/// `labels` becomes `gather(dataset.labels: u8[rows], batch.indices)`. Each step then needs
/// only its slice of the epoch's permutation (`batch.indices: u32[B]`).
pub fn read_batches_from_dataset(graph: &Graph, rows: usize) -> Result<Graph, AutodiffError> {
    let x_dtype = graph
        .inputs()
        .find(|(_, n, _)| *n == "x")
        .map(|(_, _, t)| t.dtype)
        .unwrap_or(DType::U8);
    let g = gather_inputs(
        graph,
        rows,
        &[
            GatherInput {
                input: "x".into(),
                dataset: DATASET_IMAGES.into(),
                dtype: x_dtype,
            },
            GatherInput {
                input: LABELS.into(),
                dataset: DATASET_LABELS.into(),
                dtype: DType::U8,
            },
        ],
    )?;
    verify(&g)?;
    Ok(g)
}
