//! The training loop on the device.
//!
//! The data set lives on the device as packed u8 (47 MB for Fashion-MNIST's training images, one
//! binding). Each epoch uploads only a permutation; every step copies its slice of it into the
//! step program's `batch.indices` and runs the fused kernels, which gather and scale the batch
//! themselves. Steps are recorded many to a command buffer and submitted without waiting; each
//! step's loss sum and correct count are copied into a per-epoch statistics buffer that the
//! host reads back once per chunk, one chunk behind, so the device never waits for the host.

use std::collections::HashMap;
use std::sync::Arc;

use kiln_autodiff::{
    CORRECT, DATASET_IMAGES, DATASET_LABELS, LOSS_SUM, Optimizer, StateTensor, evaluation_graph,
    read_batches_from_dataset, training_step_with,
};
use kiln_compiler::{Target, compile};
use kiln_data::{CLASS_NAMES, Split};
use kiln_ir::{BATCH_INDICES, DType, Model, TensorType};
use kiln_reference::Tensor;
use kiln_train::{Stats, batch_ranges, epoch_order, init_params};

use crate::gpu::{Gpu, RuntimeError};
use crate::program::{
    Profile, Program, download, map_read, tensor_bytes, tensor_from_bytes, upload,
};

/// Steps recorded into one command buffer.
const STEPS_PER_SUBMIT: usize = 16;

/// A data split resident on the device, with compiled programs for its batch sizes.
struct Resident {
    rows: usize,
    /// `[channels, height, width]` of one image.
    image: [usize; 3],
    images: Arc<wgpu::Buffer>,
    labels: Arc<wgpu::Buffer>,
    order: Arc<wgpu::Buffer>,
    /// Program per batch size (a full batch and the last partial one).
    programs: HashMap<usize, Program>,
}

/// Trains a model on the device, d2l's recipe: `batch_size` examples per step, the last
/// partial batch kept (its own compiled step), loss and accuracy accumulated on the device. The
/// optimizer (plain SGD, SGD with momentum, Adam, AdamW) is part of the compiled step; its state
/// lives in device buffers beside the parameters.
pub struct GpuTrainer<'g> {
    gpu: &'g Gpu,
    batch_size: usize,
    /// Parameters and optimizer state, by leaf name (both are updated in place by the step).
    params: HashMap<String, Arc<wgpu::Buffer>>,
    param_types: Vec<(String, TensorType)>,
    state: Vec<StateTensor>,
    optimizer: Optimizer,
    train: Resident,
    test: Resident,
    seed: u64,
    /// Set by a signal handler: stop at the next chunk boundary.
    interrupt: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// What the kernels are compiled for.
    target: Target,
}

fn stats_from(bytes: &[u8], steps: &[usize]) -> Stats {
    let mut s = Stats::default();
    for (k, &n) in steps.iter().enumerate() {
        let loss = f32::from_le_bytes(bytes[k * 8..k * 8 + 4].try_into().expect("4 bytes"));
        let correct = u32::from_le_bytes(bytes[k * 8 + 4..k * 8 + 8].try_into().expect("4 bytes"));
        s.loss_sum += loss as f64;
        s.correct += correct as u64;
        s.examples += n;
    }
    s
}

impl<'g> GpuTrainer<'g> {
    /// Compiles the model's training step and evaluation graph for `gpu`, uploads both splits
    /// and the initial parameters (Xavier/PyTorch init from `seed`); the optimizer's state
    /// starts at zero. A bare learning rate as `optimizer` is plain SGD.
    pub fn new(
        gpu: &'g Gpu,
        model: impl Into<Model>,
        train: &Split,
        test: &Split,
        batch_size: usize,
        optimizer: impl Into<Optimizer>,
        seed: u64,
    ) -> Result<Self, RuntimeError> {
        let target = gpu.target.clone();
        Self::with_target(gpu, target, model, train, test, batch_size, optimizer, seed)
    }

    /// [`GpuTrainer::new`] with the kernels compiled for `target` instead of the device's own
    /// (e.g. [`Target::portable_for`] the device: `--target portable`). `target` must not
    /// promise more than the device's limits.
    #[allow(clippy::too_many_arguments)]
    pub fn with_target(
        gpu: &'g Gpu,
        target: Target,
        model: impl Into<Model>,
        train: &Split,
        test: &Split,
        batch_size: usize,
        optimizer: impl Into<Optimizer>,
        seed: u64,
    ) -> Result<Self, RuntimeError> {
        let optimizer: Optimizer = optimizer.into();
        optimizer
            .validate()
            .map_err(|e| RuntimeError::Setup(format!("optimizer: {e}")))?;
        if batch_size == 0 {
            return Err(RuntimeError::Setup("batch size must be positive".into()));
        }
        let model: Model = model.into();
        model
            .check_task([1, train.rows, train.cols], CLASS_NAMES.len())
            .map_err(RuntimeError::Setup)?;
        let probe = model
            .forward(
                "model",
                TensorType::new(DType::U8, [1, 1, train.rows, train.cols]),
            )
            .map_err(RuntimeError::Setup)?;
        let init = init_params(&probe, seed).map_err(|e| RuntimeError::Setup(e.to_string()))?;
        let mut params = HashMap::new();
        let mut param_types = Vec::new();
        for (_, name, ty) in probe.params() {
            params.insert(
                name.to_string(),
                upload(gpu, name, &tensor_bytes(&init[name], false))?,
            );
            param_types.push((name.to_string(), ty.clone()));
        }
        let state = optimizer.state(probe.params().map(|(_, n, t)| (n, t)));
        for s in &state {
            params.insert(
                s.name.clone(),
                upload(gpu, &s.name, &vec![0u8; (s.ty.numel().max(1)) * 4])?,
            );
        }
        let resident = |split: &Split, what: &str| -> Result<Resident, RuntimeError> {
            let images =
                Tensor::from_u8([split.images.len()], split.images.clone()).expect("bytes");
            let labels =
                Tensor::from_u8([split.labels.len()], split.labels.clone()).expect("bytes");
            Ok(Resident {
                rows: split.count,
                image: [1, split.rows, split.cols],
                images: upload(gpu, &format!("{what} images"), &tensor_bytes(&images, true))?,
                labels: upload(gpu, &format!("{what} labels"), &tensor_bytes(&labels, true))?,
                order: upload(
                    gpu,
                    &format!("{what} order"),
                    &vec![0u8; split.count.max(1) * 4],
                )?,
                programs: HashMap::new(),
            })
        };
        let mut t = GpuTrainer {
            gpu,
            batch_size,
            params,
            param_types,
            state,
            optimizer,
            train: resident(train, "training")?,
            test: resident(test, "test")?,
            seed,
            interrupt: None,
            target,
        };
        // Compile every program up front: errors and device limits surface before training.
        for (training, rows) in [(true, t.train.rows), (false, t.test.rows)] {
            for r in batch_ranges(rows, batch_size) {
                t.program(&model, training, r.len())?;
            }
        }
        Ok(t)
    }

    fn program(&mut self, model: &Model, training: bool, batch: usize) -> Result<(), RuntimeError> {
        let resident = if training { &self.train } else { &self.test };
        if resident.programs.contains_key(&batch) {
            return Ok(());
        }
        let setup = |e: String| RuntimeError::Setup(e);
        let rows = resident.rows;
        let [c, h, w] = resident.image;
        let fwd = model
            .forward("model", TensorType::new(DType::U8, [batch, c, h, w]))
            .map_err(setup)?;
        let graph = if training {
            training_step_with(&fwd, &self.optimizer).map_err(|e| setup(e.to_string()))?
        } else {
            evaluation_graph(&fwd).map_err(|e| setup(e.to_string()))?
        };
        let graph = read_batches_from_dataset(&graph, rows).map_err(|e| setup(e.to_string()))?;
        let compiled = compile(&graph, &self.target).map_err(|e| setup(e.to_string()))?;
        let mut external = self.params.clone();
        external.insert(DATASET_IMAGES.into(), resident.images.clone());
        external.insert(DATASET_LABELS.into(), resident.labels.clone());
        let program = Program::new(self.gpu, compiled, &external)?;
        let resident = if training {
            &mut self.train
        } else {
            &mut self.test
        };
        resident.programs.insert(batch, program);
        Ok(())
    }

    /// Kernels per training step of a full batch.
    pub fn kernels_per_step(&self) -> usize {
        self.train
            .programs
            .values()
            .map(|p| p.compiled.modules.len())
            .max()
            .unwrap_or(0)
    }

    /// Per-kernel time of the full-batch training step (see [`Program::profile`]). This
    /// runs the update kernels, so the parameters change; profile instead of training.
    pub fn profile_step(&self, reps: usize) -> Result<Profile, RuntimeError> {
        let program = self
            .train
            .programs
            .iter()
            .max_by_key(|(batch, _)| **batch)
            .map(|(_, p)| p)
            .ok_or_else(|| {
                RuntimeError::Setup("no training step compiled (empty training set)".into())
            })?;
        program.profile(self.gpu, reps)
    }

    /// Makes training stop cleanly, between whole steps, once `flag` is set (by a Ctrl-C
    /// handler): the running epoch returns [`RuntimeError::Interrupted`].
    pub fn set_interrupt(&mut self, flag: Arc<std::sync::atomic::AtomicBool>) {
        self.interrupt = Some(flag);
    }

    /// Kernels per evaluation batch.
    pub fn kernels_per_eval(&self) -> usize {
        self.test
            .programs
            .values()
            .map(|p| p.compiled.modules.len())
            .max()
            .unwrap_or(0)
    }

    /// Runs one pass over `order` (indices into the split). `on_chunk` sees running totals
    /// about every [`STEPS_PER_SUBMIT`] steps.
    fn run_epoch(
        &self,
        training: bool,
        context: &str,
        order: &[u32],
        mut on_chunk: impl FnMut(&Stats),
    ) -> Result<Stats, RuntimeError> {
        let gpu = self.gpu;
        let resident = if training { &self.train } else { &self.test };
        gpu.queue
            .write_buffer(&resident.order, 0, bytemuck::cast_slice(order));
        let ranges = batch_ranges(order.len(), self.batch_size);
        let sizes: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
        let stats_buf = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("step statistics"),
            size: (ranges.len().max(1) * 8) as u64,
            usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut total = Stats::default();
        // The previous chunk's statistics, read once the next chunk is queued behind it.
        let mut pending: Option<(wgpu::Buffer, std::ops::Range<usize>)> = None;
        let mut finish = |pending: Option<(wgpu::Buffer, std::ops::Range<usize>)>,
                          total: &mut Stats|
         -> Result<(), RuntimeError> {
            if let Some((staging, steps)) = pending {
                let bytes = map_read(gpu, &staging, "step statistics")?;
                if let Some(k) = (0..steps.len()).find(|k| {
                    !f32::from_le_bytes(bytes[k * 8..k * 8 + 4].try_into().expect("4 bytes"))
                        .is_finite()
                }) {
                    let loss =
                        f32::from_le_bytes(bytes[k * 8..k * 8 + 4].try_into().expect("4 bytes"));
                    // Let queued work finish before reporting; its results are discarded.
                    gpu.wait()?;
                    return Err(RuntimeError::Diverged {
                        where_: format!("{context}step {} of {}", steps.start + k + 1, sizes.len()),
                        loss,
                    });
                }
                let s = stats_from(&bytes, &sizes[steps]);
                total.loss_sum += s.loss_sum;
                total.correct += s.correct;
                total.examples += s.examples;
                on_chunk(total);
            }
            Ok(())
        };
        for (c, chunk) in ranges.chunks(STEPS_PER_SUBMIT).enumerate() {
            let first = c * STEPS_PER_SUBMIT;
            if self
                .interrupt
                .as_ref()
                .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
            {
                // Finish what is in flight; every recorded step completes, none is cut.
                finish(pending.take(), &mut total)?;
                return Err(RuntimeError::Interrupted {
                    where_: format!("{context}after step {first} of {}", ranges.len()),
                });
            }
            let mut enc = gpu
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("steps"),
                });
            for (k, r) in chunk.iter().enumerate() {
                let step = first + k;
                let program = &resident.programs[&r.len()];
                let indices = program
                    .buffer(BATCH_INDICES)
                    .expect("step programs read batch.indices");
                enc.copy_buffer_to_buffer(
                    &resident.order,
                    (r.start * 4) as u64,
                    indices,
                    0,
                    (r.len() * 4) as u64,
                );
                {
                    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("step"),
                        timestamp_writes: None,
                    });
                    program.record(&mut pass);
                }
                let loss = program.buffer(LOSS_SUM).expect("loss_sum output");
                let correct = program.buffer(CORRECT).expect("correct output");
                enc.copy_buffer_to_buffer(loss, 0, &stats_buf, (step * 8) as u64, 4);
                enc.copy_buffer_to_buffer(correct, 0, &stats_buf, (step * 8 + 4) as u64, 4);
            }
            let bytes = (chunk.len() * 8) as u64;
            let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("statistics readback"),
                size: bytes,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            enc.copy_buffer_to_buffer(&stats_buf, (first * 8) as u64, &staging, 0, bytes);
            gpu.queue.submit([enc.finish()]);
            finish(pending.take(), &mut total)?;
            pending = Some((staging, first..first + chunk.len()));
        }
        finish(pending.take(), &mut total)?;
        gpu.check(if training { "training" } else { "evaluation" })?;
        Ok(total)
    }

    /// One epoch of SGD over the whole training split, shuffled with the seed (or in data-set
    /// order when `shuffle` is false).
    pub fn train_epoch(
        &self,
        epoch: usize,
        shuffle: bool,
        on_chunk: impl FnMut(&Stats),
    ) -> Result<Stats, RuntimeError> {
        let order = epoch_order(self.train.rows, self.seed, epoch, shuffle);
        self.run_epoch(true, &format!("epoch {}, ", epoch + 1), &order, on_chunk)
    }

    /// SGD steps over training examples in exactly this order (batched as in an epoch).
    pub fn train_order(&self, order: &[u32]) -> Result<Stats, RuntimeError> {
        self.run_epoch(true, "", order, |_| {})
    }

    /// Loss and accuracy on the whole test split.
    pub fn evaluate(&self) -> Result<Stats, RuntimeError> {
        let order: Vec<u32> = (0..self.test.rows as u32).collect();
        self.run_epoch(false, "evaluation, ", &order, |_| {})
    }

    /// The current parameters, read back from the device.
    pub fn params(&self) -> Result<HashMap<String, Tensor>, RuntimeError> {
        let mut out = HashMap::new();
        for (name, ty) in &self.param_types {
            let buf = &self.params[name];
            let bytes = download(self.gpu, buf, 0, (ty.numel().max(1) * 4) as u64, name)?;
            out.insert(name.clone(), tensor_from_bytes(&bytes, ty, false));
        }
        Ok(out)
    }

    /// The optimizer the step was compiled with.
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// What the optimizer keeps (momentum buffers, Adam's moments and step count).
    pub fn state_tensors(&self) -> &[StateTensor] {
        &self.state
    }

    /// The optimizer's state, read back from the device, by leaf name ([`StateTensor::name`]).
    pub fn state(&self) -> Result<HashMap<String, Tensor>, RuntimeError> {
        let mut out = HashMap::new();
        for s in &self.state {
            let bytes = download(
                self.gpu,
                &self.params[&s.name],
                0,
                (s.ty.numel().max(1) * 4) as u64,
                &s.name,
            )?;
            out.insert(s.name.clone(), tensor_from_bytes(&bytes, &s.ty, false));
        }
        Ok(out)
    }

    /// Replaces the optimizer's state (every tensor of [`GpuTrainer::state_tensors`], by leaf
    /// name and type), e.g. to resume from a checkpoint.
    pub fn set_state(&self, state: &HashMap<String, Tensor>) -> Result<(), RuntimeError> {
        for s in &self.state {
            let t = state.get(&s.name).ok_or_else(|| {
                RuntimeError::Setup(format!("no value for optimizer state `{}`", s.name))
            })?;
            if t.ty() != s.ty {
                return Err(RuntimeError::Setup(format!(
                    "optimizer state `{}` is {}, got {}",
                    s.name,
                    s.ty,
                    t.ty()
                )));
            }
            self.gpu
                .queue
                .write_buffer(&self.params[&s.name], 0, &tensor_bytes(t, false));
        }
        Ok(())
    }

    /// Replaces the parameters (same names and types as the model's).
    pub fn set_params(&self, params: &HashMap<String, Tensor>) -> Result<(), RuntimeError> {
        for (name, ty) in &self.param_types {
            let t = params
                .get(name)
                .ok_or_else(|| RuntimeError::Setup(format!("no value for parameter `{name}`")))?;
            if &t.ty() != ty {
                return Err(RuntimeError::Setup(format!(
                    "parameter `{name}` is {ty}, got {}",
                    t.ty()
                )));
            }
            self.gpu
                .queue
                .write_buffer(&self.params[name], 0, &tensor_bytes(t, false));
        }
        Ok(())
    }
}
