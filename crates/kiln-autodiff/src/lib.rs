//! Reverse-mode autodiff over kiln's graph IR. The backward pass is derived from the forward
//! graph, never written by hand per layer: [`gradients`] differentiates any scalar, and
//! [`training_step`] turns a forward model into one SGD step graph (forward, loss, gradients,
//! parameter updates), cleaned by dead-code and common-subexpression elimination and verified;
//! [`training_step_with`] does it for any [`Optimizer`] (SGD with momentum, Adam, AdamW), whose
//! state becomes parameters of the step updated in place like the weights.

mod grad;
mod optim;
mod step;

pub use grad::{AutodiffError, gradients};
pub use optim::{Optimizer, STEP, StateTensor, state_name};
pub use step::{
    CORRECT, DATASET_IMAGES, DATASET_LABELS, LABELS, LOSS_SUM, MODEL_OUTPUT, evaluation_graph,
    read_batches_from_dataset, training_step, training_step_with,
};
