//! Training on the CPU reference executor: the derived step graph, run as-is. Slow, but it
//! is the same graph the GPU runs, so it is the reference for the GPU runtime's trajectories.

use std::collections::HashMap;

use kiln_autodiff::{
    AutodiffError, CORRECT, LABELS, LOSS_SUM, Optimizer, StateTensor, evaluation_graph,
    training_step_with,
};
use kiln_data::Split;
use kiln_ir::{DType, Graph, Model, ShapeError, TensorType};
use kiln_reference::{ExecError, Tensor, execute};

use crate::batches::batch_ranges;
use crate::init::{InitError, init_params};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Shape(#[from] ShapeError),
    #[error(transparent)]
    Autodiff(#[from] AutodiffError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    Init(#[from] InitError),
    #[error("batch size must be positive")]
    ZeroBatch,
    #[error("{0}")]
    Model(String),
}

/// Mean loss and accuracy over some examples.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stats {
    pub examples: usize,
    pub loss_sum: f64,
    pub correct: u64,
}

impl Stats {
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.examples.max(1) as f64
    }

    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.examples.max(1) as f64
    }

    fn add(&mut self, loss_sum: f64, correct: u64, examples: usize) {
        self.loss_sum += loss_sum;
        self.correct += correct;
        self.examples += examples;
    }
}

/// Trains a model on u8 images with any [`Optimizer`], one derived step graph per batch size
/// (a full batch and the last partial one).
pub struct CpuTrainer {
    model: Model,
    optimizer: Optimizer,
    image: [usize; 3],
    steps: HashMap<usize, Graph>,
    evals: HashMap<usize, Graph>,
    /// The current parameters by PyTorch name.
    pub params: HashMap<String, Tensor>,
    /// The optimizer's state by leaf name ([`StateTensor::name`]), zero at the start.
    pub state: HashMap<String, Tensor>,
    state_tensors: Vec<StateTensor>,
}

impl CpuTrainer {
    /// Builds the model for `[channels, rows, cols]` u8 images and initialises its parameters
    /// from `seed`. A bare learning rate as `optimizer` is plain SGD.
    pub fn new(
        model: impl Into<Model>,
        image: [usize; 3],
        optimizer: impl Into<Optimizer>,
        seed: u64,
    ) -> Result<Self, TrainError> {
        let optimizer: Optimizer = optimizer.into();
        optimizer
            .validate()
            .map_err(|e| TrainError::Autodiff(AutodiffError::Optimizer(e)))?;
        let mut t = CpuTrainer {
            model: model.into(),
            optimizer,
            image,
            steps: HashMap::new(),
            evals: HashMap::new(),
            params: HashMap::new(),
            state: HashMap::new(),
            state_tensors: Vec::new(),
        };
        let forward = t.forward(1)?;
        t.params = init_params(&forward, seed)?;
        t.state_tensors = optimizer.state(forward.params().map(|(_, n, ty)| (n, ty)));
        t.state = t
            .state_tensors
            .iter()
            .map(|s| {
                let zeros = vec![0.0; s.ty.numel()];
                let t = Tensor::from_f32(s.ty.shape.clone(), zeros).expect("numel zeros");
                (s.name.clone(), t)
            })
            .collect();
        Ok(t)
    }

    /// What the optimizer keeps, in order.
    pub fn state_tensors(&self) -> &[StateTensor] {
        &self.state_tensors
    }

    fn forward(&self, batch: usize) -> Result<Graph, TrainError> {
        let [c, h, w] = self.image;
        let input = TensorType::new(DType::U8, [batch, c, h, w]);
        self.model
            .forward("model", input)
            .map_err(TrainError::Model)
    }

    /// The training-step graph for one batch size, derived on first use.
    pub fn step_graph(&mut self, batch: usize) -> Result<&Graph, TrainError> {
        if !self.steps.contains_key(&batch) {
            let step = training_step_with(&self.forward(batch)?, &self.optimizer)?;
            self.steps.insert(batch, step);
        }
        Ok(&self.steps[&batch])
    }

    fn feeds(&self, split: &Split, indices: &[u32]) -> HashMap<String, Tensor> {
        let px = split.rows * split.cols;
        let [c, h, w] = self.image;
        let mut images = Vec::with_capacity(indices.len() * px);
        for &i in indices {
            images.extend_from_slice(split.image(i as usize));
        }
        let labels = indices
            .iter()
            .map(|&i| split.labels[i as usize] as u32)
            .collect();
        let n = indices.len();
        HashMap::from([
            (
                "x".to_string(),
                Tensor::from_u8([n, c, h, w], images).expect("n images"),
            ),
            (
                LABELS.to_string(),
                Tensor::from_u32([n], labels).expect("n labels"),
            ),
        ])
    }

    /// One optimizer step on the examples `indices` of `split`; returns the batch's loss sum and
    /// correct count (measured before the update, as d2l's accumulator does).
    pub fn step(&mut self, split: &Split, indices: &[u32]) -> Result<(f64, u64), TrainError> {
        let inputs = self.feeds(split, indices);
        self.step_graph(indices.len())?;
        let step = &self.steps[&indices.len()];
        let mut leaves = self.params.clone();
        leaves.extend(self.state.iter().map(|(k, v)| (k.clone(), v.clone())));
        let values = execute(step, &inputs, &leaves)?;
        for map in [&mut self.params, &mut self.state] {
            for (name, value) in map.iter_mut() {
                *value = values
                    .output(name)
                    .expect("the step outputs every parameter and state tensor")
                    .clone();
            }
        }
        Ok(scalars(&values))
    }

    /// One epoch over `split` in the given example order, `batch_size` examples per step and
    /// the remainder as a last smaller step. `on_step` sees each step's running totals.
    pub fn train_epoch(
        &mut self,
        split: &Split,
        order: &[u32],
        batch_size: usize,
        mut on_step: impl FnMut(&Stats),
    ) -> Result<Stats, TrainError> {
        if batch_size == 0 {
            return Err(TrainError::ZeroBatch);
        }
        let mut stats = Stats::default();
        for r in batch_ranges(order.len(), batch_size) {
            let n = r.len();
            let (loss_sum, correct) = self.step(split, &order[r])?;
            stats.add(loss_sum, correct, n);
            on_step(&stats);
        }
        Ok(stats)
    }

    /// Loss and accuracy of the current parameters on all of `split`.
    pub fn evaluate(&mut self, split: &Split, batch_size: usize) -> Result<Stats, TrainError> {
        if batch_size == 0 {
            return Err(TrainError::ZeroBatch);
        }
        let mut stats = Stats::default();
        let order: Vec<u32> = (0..split.count as u32).collect();
        for r in batch_ranges(split.count, batch_size) {
            let n = r.len();
            if !self.evals.contains_key(&n) {
                let eval = evaluation_graph(&self.forward(n)?)?;
                self.evals.insert(n, eval);
            }
            let inputs = self.feeds(split, &order[r]);
            let values = execute(&self.evals[&n], &inputs, &self.params)?;
            let (loss_sum, correct) = scalars(&values);
            stats.add(loss_sum, correct, n);
        }
        Ok(stats)
    }
}

fn scalars(values: &kiln_reference::Values) -> (f64, u64) {
    let loss = values
        .output(LOSS_SUM)
        .and_then(|t| t.as_f32())
        .expect("loss_sum is f32[]")[0];
    let correct = values
        .output(CORRECT)
        .and_then(|t| t.to_i64())
        .expect("correct is u32[]")[0];
    (loss as f64, correct as u64)
}
