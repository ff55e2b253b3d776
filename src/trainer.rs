//! The whole path for a Rust user: a model, a device, epochs of training, evaluation,
//! prediction and checkpoints that resume exactly.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_autodiff::{Optimizer, STEP};
use kiln_checkpoint::{CheckpointError, OPTIMIZER_PREFIX};
use kiln_compiler::Target;
use kiln_data::Split;
use kiln_ir::{DType, Model, TensorType};
use kiln_reference::Tensor;
use kiln_runtime::{Gpu, GpuTrainer, RuntimeError, infer};
use kiln_train::Stats;

/// Why a [`Trainer`] call failed; each names what was at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{0}")]
    Model(String),
}

/// How to train: d2l's defaults (batch 256, plain SGD at 0.9, seed 0) unless changed.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    pub batch_size: usize,
    pub optimizer: Optimizer,
    /// Seeds the initial weights and every epoch's shuffle.
    pub seed: u64,
    /// Shuffle the training set every epoch (otherwise its order, for comparisons).
    pub shuffle: bool,
    /// Schedules to compile for; `None` is the device's own.
    pub target: Option<Target>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 256,
            optimizer: Optimizer::sgd(0.9),
            seed: 0,
            shuffle: true,
            target: None,
        }
    }
}

/// One finished epoch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpochReport {
    /// 1-based, counting the epochs of the checkpoint training resumed from.
    pub epoch: usize,
    /// Loss and accuracy over the epoch's steps (each measured before its update).
    pub train: Stats,
    /// Loss and accuracy on the test split after the epoch.
    pub test: Stats,
    /// Time spent in the epoch's training steps.
    pub elapsed: Duration,
}

/// A model compiled for one device with its data, parameters and optimizer state resident
/// there.
pub struct Trainer<'g> {
    gpu: &'g Gpu,
    model: Model,
    inner: GpuTrainer<'g>,
    config: TrainConfig,
    image: [usize; 3],
    epochs_done: usize,
}

impl<'g> Trainer<'g> {
    /// Compiles `model`'s training step and evaluation for `gpu` and uploads both splits and
    /// freshly initialised parameters. Errors name the layer, limit or setting at fault.
    pub fn new(
        gpu: &'g Gpu,
        model: impl Into<Model>,
        train: &Split,
        test: &Split,
        config: TrainConfig,
    ) -> Result<Self, Error> {
        let model: Model = model.into();
        let target = config.target.clone().unwrap_or_else(|| gpu.target.clone());
        let inner = GpuTrainer::with_target(
            gpu,
            target,
            model.clone(),
            train,
            test,
            config.batch_size,
            config.optimizer,
            config.seed,
        )?;
        Ok(Trainer {
            gpu,
            model,
            inner,
            config,
            image: [1, train.rows, train.cols],
            epochs_done: 0,
        })
    }

    /// Trains `epochs` more epochs, calling `on_epoch` after each (with the test split's
    /// figures); returns every epoch's report.
    pub fn fit(
        &mut self,
        epochs: usize,
        mut on_epoch: impl FnMut(&EpochReport),
    ) -> Result<Vec<EpochReport>, Error> {
        let mut reports = Vec::with_capacity(epochs);
        for _ in 0..epochs {
            let report = self.epoch(|_| {})?;
            on_epoch(&report);
            reports.push(report);
        }
        Ok(reports)
    }

    /// One epoch, `on_progress` seeing the running totals every few steps, then evaluation.
    pub fn epoch(&mut self, on_progress: impl FnMut(&Stats)) -> Result<EpochReport, Error> {
        let start = Instant::now();
        let train = self
            .inner
            .train_epoch(self.epochs_done, self.config.shuffle, on_progress)?;
        let elapsed = start.elapsed();
        self.epochs_done += 1;
        let test = self.inner.evaluate()?;
        Ok(EpochReport {
            epoch: self.epochs_done,
            train,
            test,
            elapsed,
        })
    }

    /// Loss and accuracy on the whole test split.
    pub fn evaluate(&self) -> Result<Stats, Error> {
        Ok(self.inner.evaluate()?)
    }

    /// Class probabilities for u8 images (`[channels, rows, cols]` each, concatenated), with
    /// the current parameters.
    pub fn predict(&self, pixels: &[u8]) -> Result<Vec<Vec<f32>>, Error> {
        let params = self.inner.params()?;
        let out = infer(self.gpu, &self.model, &params, pixels, self.image, &[])?;
        Ok(out.probabilities)
    }

    /// Epochs trained so far (including those of a checkpoint loaded with
    /// [`Trainer::load`]).
    pub fn epochs_done(&self) -> usize {
        self.epochs_done
    }

    /// The current parameters by PyTorch name.
    pub fn params(&self) -> Result<HashMap<String, Tensor>, Error> {
        Ok(self.inner.params()?)
    }

    /// The optimizer's state by leaf name (see [`kiln_autodiff::StateTensor`]).
    pub fn optimizer_state(&self) -> Result<HashMap<String, Tensor>, Error> {
        Ok(self.inner.state()?)
    }

    /// Kernels per training step and per evaluation batch.
    pub fn kernels(&self) -> (usize, usize) {
        (self.inner.kernels_per_step(), self.inner.kernels_per_eval())
    }

    /// The underlying device trainer (profiling, interrupts).
    pub fn device_trainer(&mut self) -> &mut GpuTrainer<'g> {
        &mut self.inner
    }

    /// Writes parameters, optimizer state and `metadata` (plus the model's IR, the epoch and
    /// the optimizer's settings) to a safetensors file, atomically. The parameters keep
    /// PyTorch's names; the state is `optimizer.state.<param>.<key>` with PyTorch's keys
    /// (`momentum_buffer`, `exp_avg`, `exp_avg_sq`, `step`), and `optimizer.param_group`
    /// holds `param_groups[0]` as JSON, so a script can rebuild `optimizer.state_dict()`.
    pub fn save(&self, path: &Path, metadata: &BTreeMap<String, String>) -> Result<(), Error> {
        let mut tensors = self.inner.params()?;
        tensors.extend(checkpoint_state(
            self.inner.state_tensors(),
            &self.inner.state()?,
        ));
        let mut meta = metadata.clone();
        let probe = self.probe()?;
        meta.insert(
            "format".into(),
            "kiln checkpoint: PyTorch state-dict names and layouts".into(),
        );
        meta.insert("ir".into(), kiln_ir::print(&probe));
        meta.insert("epoch".into(), self.epochs_done.to_string());
        meta.insert("seed".into(), self.config.seed.to_string());
        meta.insert("batch_size".into(), self.config.batch_size.to_string());
        meta.insert(
            "optimizer".into(),
            self.config.optimizer.torch_name().into(),
        );
        meta.insert(
            "optimizer.param_group".into(),
            self.config.optimizer.param_group_json(),
        );
        kiln_checkpoint::save(path, &tensors, &meta)?;
        Ok(())
    }

    /// Loads a checkpoint's parameters and, when it has them, the optimizer state and the
    /// epoch count, so that training continues exactly where the saved run was (the next
    /// epoch's shuffle, the Adam step count). Without state (a plain-SGD or PyTorch
    /// checkpoint) the optimizer starts afresh. A checkpoint of another optimizer is refused.
    pub fn load(&mut self, path: &Path) -> Result<(), Error> {
        let ckpt = kiln_checkpoint::load(path)?;
        let probe = self.probe()?;
        let params = kiln_checkpoint::matching_params(path, &ckpt, &probe)?;
        let saved_state = ckpt.params.keys().any(|k| k.starts_with(OPTIMIZER_PREFIX));
        let wanted = self.inner.state_tensors().to_vec();
        let mismatch = |name: &str, problem: String| CheckpointError::Mismatch {
            path: path.to_path_buf(),
            name: name.to_string(),
            problem,
        };
        let mut state = HashMap::new();
        if saved_state {
            let saved = ckpt.metadata.get("optimizer").map(String::as_str);
            let ours = self.config.optimizer.torch_name();
            if saved != Some(ours) {
                return Err(mismatch(
                    "optimizer",
                    format!(
                        "holds state of optimizer {}, but this run uses {ours}",
                        saved.unwrap_or("(unnamed)")
                    ),
                )
                .into());
            }
            for s in &wanted {
                let name = checkpoint_name(s);
                let t = ckpt.params.get(&name).ok_or_else(|| {
                    mismatch(&name, format!("is missing; {} keeps {}", s.key, s.ty))
                })?;
                if t.ty() != s.ty {
                    return Err(mismatch(
                        &name,
                        format!("is {} but the optimizer keeps {}", t.ty(), s.ty),
                    )
                    .into());
                }
                state.insert(s.name.clone(), t.clone());
            }
            let expected: std::collections::HashSet<String> =
                wanted.iter().map(checkpoint_name).collect();
            let mut extra: Vec<&String> = ckpt
                .params
                .keys()
                .filter(|k| k.starts_with(OPTIMIZER_PREFIX) && !expected.contains(*k))
                .collect();
            extra.sort();
            // Per-parameter step counts all equal the shared one.
            if let Some(n) = extra
                .iter()
                .find(|k| !k.ends_with(".step") || wanted.iter().all(|s| s.name != STEP))
            {
                return Err(mismatch(n, "is not state of this model's optimizer".into()).into());
            }
        } else {
            for s in &wanted {
                let zeros = vec![0.0; s.ty.numel()];
                let t = Tensor::from_f32(s.ty.shape.clone(), zeros).expect("numel zeros");
                state.insert(s.name.clone(), t);
            }
        }
        self.inner.set_params(&params)?;
        self.inner.set_state(&state)?;
        self.epochs_done = match ckpt.metadata.get("epoch") {
            Some(e) => e
                .parse()
                .map_err(|_| mismatch("epoch", format!("metadata `{e}` is not an epoch count")))?,
            None => 0,
        };
        Ok(())
    }

    fn probe(&self) -> Result<kiln_ir::Graph, Error> {
        let [c, h, w] = self.image;
        self.model
            .forward("model", TensorType::new(DType::U8, [1, c, h, w]))
            .map_err(Error::Model)
    }
}

/// Where a state tensor goes in a checkpoint: the shared step count is written once per
/// parameter, as PyTorch keeps it.
fn checkpoint_name(s: &kiln_autodiff::StateTensor) -> String {
    match &s.param {
        Some(p) => format!("{OPTIMIZER_PREFIX}{p}.{}", s.key),
        None => format!("{OPTIMIZER_PREFIX}{}", s.key),
    }
}

/// The state as checkpoint tensors: each parameter's own, plus the step count under every
/// parameter that has Adam moments (PyTorch's layout) and once on its own (what `load` reads).
fn checkpoint_state(
    tensors: &[kiln_autodiff::StateTensor],
    values: &HashMap<String, Tensor>,
) -> HashMap<String, Tensor> {
    let mut out: HashMap<String, Tensor> = tensors
        .iter()
        .map(|s| (checkpoint_name(s), values[&s.name].clone()))
        .collect();
    if let Some(step) = values.get(STEP) {
        for s in tensors.iter().filter(|s| s.key == "exp_avg") {
            let p = s.param.as_deref().expect("moments belong to parameters");
            out.insert(format!("{OPTIMIZER_PREFIX}{p}.step"), step.clone());
        }
    }
    out
}
