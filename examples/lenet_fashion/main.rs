//! Train d2l's LeNet-5 on Fashion-MNIST with kiln.
//!
//! A plain run trains with d2l's recipe on the GPU wgpu finds (lavapipe where there is no GPU):
//! the derived training step fused into a few WGSL kernels, the data set resident on the
//! device. `--summary` prints the layer table; `--emit ir|train-ir|kernels|wgsl` print each
//! compiler stage (`--emit spirv|msl|hlsl`: the kernels through naga's back ends);
//! `--reference` trains on the CPU reference executor instead.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kiln::data;
use kiln::ir::{self, DType, TensorType, thousands};
use kiln::runtime::{Gpu, RuntimeError};
use kiln::train::{CpuTrainer, Stats, epoch_order};
use kiln::{Optimizer, TrainConfig, Trainer};

mod plot;

/// Built-in variants of LeNet from the d2l chapter's exercises; all train through the same
/// compiler path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Variant {
    /// d2l's LeNet-5: sigmoid activations, average pooling.
    Lenet,
    /// ReLU instead of sigmoid.
    Relu,
    /// Max pooling instead of average pooling.
    Maxpool,
    /// ReLU and max pooling.
    ReluMaxpool,
    /// Wider convolutions (16 and 32 channels) with ReLU and max pooling.
    Wide,
}

impl Variant {
    fn model(self) -> ir::Sequential {
        use ir::LenetVariant as V;
        match self {
            Variant::Lenet => V::Lenet,
            Variant::Relu => V::Relu,
            Variant::Maxpool => V::MaxPool,
            Variant::ReluMaxpool => V::ReluMaxPool,
            Variant::Wide => V::Wide,
        }
        .model()
    }
}

/// `--optimizer`: which `torch.optim` update the compiled step applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OptimizerKind {
    /// torch.optim.SGD (with --momentum, --nesterov, --weight-decay).
    Sgd,
    /// torch.optim.Adam (with --betas, --eps, --weight-decay as L2).
    Adam,
    /// torch.optim.AdamW (decoupled --weight-decay, default 0.01).
    Adamw,
}

/// The schedule set `--target` chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Schedule {
    /// The device's own schedules (on a CPU-type adapter such as lavapipe: image chunks and
    /// the CPU-class kernels).
    Device,
    /// The portable WebGPU schedules that `--emit` prints, run on the same device (a way
    /// around a schedule problem; slower on lavapipe).
    Portable,
}

/// A compiler stage whose output `--emit` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Stage {
    /// The forward graph IR at --batch-size, with every shape (parses back with `kiln::ir::parse`).
    Ir,
    /// The training-step graph at --batch-size: forward, loss, derived gradients, SGD update.
    TrainIr,
    /// The fused kernels of the training step and the evaluation graph: the IR ops each
    /// covers, what it reads and writes, buffer sizes.
    Kernels,
    /// The WGSL module of every kernel (with --emit-dir, one file per kernel).
    Wgsl,
    /// Every kernel as SPIR-V 1.0, binary: needs --emit-dir (one .spv file per kernel).
    Spirv,
    /// Every kernel in Metal Shading Language 2.0 (with --emit-dir, one .metal file per kernel).
    Msl,
    /// Every kernel in HLSL, shader model 6.0 (with --emit-dir, one .hlsl file per kernel).
    Hlsl,
}

#[derive(Parser, Debug)]
#[command(about = "Train d2l's LeNet-5 on Fashion-MNIST with kiln")]
struct Args {
    /// Number of passes over the training set.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Examples per SGD step (the last partial batch is kept).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: u32,
    /// Learning rate (default: 0.9 for SGD, d2l's; 0.001 for Adam and AdamW).
    #[arg(long)]
    lr: Option<f32>,
    /// The optimizer compiled into the training step.
    #[arg(long, value_enum, default_value_t = OptimizerKind::Sgd)]
    optimizer: OptimizerKind,
    /// SGD momentum factor (0: plain SGD).
    #[arg(long, default_value_t = 0.0)]
    momentum: f32,
    /// SGD: Nesterov momentum (needs --momentum).
    #[arg(long)]
    nesterov: bool,
    /// Weight decay: added to the gradient (SGD, Adam) or decoupled (AdamW; default 0.01,
    /// otherwise 0).
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Adam/AdamW: the moving averages' coefficients.
    #[arg(long, num_args = 2, value_names = ["BETA1", "BETA2"], default_values_t = [0.9, 0.999])]
    betas: Vec<f32>,
    /// Adam/AdamW: added to the denominator.
    #[arg(long, default_value_t = 1e-8)]
    eps: f32,
    /// Seed for initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Directory holding the four Fashion-MNIST IDX files (otherwise $FASHION_MNIST_DIR,
    /// ./data/fashion-mnist, /usr/share/datasets/fashion-mnist).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Train on the first N training examples only.
    #[arg(long)]
    limit: Option<usize>,
    /// Evaluate on the first N test examples only.
    #[arg(long)]
    eval_limit: Option<usize>,
    /// Print a compiler stage's output instead of training.
    #[arg(long, value_enum)]
    emit: Option<Stage>,
    /// With `--emit wgsl|spirv|msl|hlsl`: write one file per kernel into this directory.
    #[arg(long, requires = "emit")]
    emit_dir: Option<PathBuf>,
    /// With `--emit kernels|wgsl|spirv|msl|hlsl`: compile for the adapter wgpu finds (its
    /// schedules: on a CPU-type adapter such as lavapipe, image chunks and the CPU-class
    /// kernels) instead of the portable target the snapshot tests pin.
    #[arg(long, requires = "emit")]
    for_device: bool,
    /// Train the model in this file, in kiln's IR text form (what `--emit ir` prints; its
    /// input `x` and output `output` are rebuilt for each batch size). Overrides --variant.
    #[arg(long, value_name = "FILE")]
    model: Option<PathBuf>,
    /// Which model to train.
    #[arg(long, value_enum, default_value_t = Variant::Lenet)]
    variant: Variant,
    /// Which schedules the training step and the evaluation are compiled with (also for
    /// --profile).
    #[arg(long, value_enum, default_value_t = Schedule::Device)]
    target: Schedule,
    /// Keep the data set's order instead of shuffling every epoch (reproducible comparisons).
    #[arg(long)]
    no_shuffle: bool,
    /// Write a safetensors checkpoint (PyTorch names and layouts) here at the end.
    #[arg(long)]
    save: Option<PathBuf>,
    /// With --save: also write it after every N epochs.
    #[arg(long, requires = "save", value_parser = clap::value_parser!(u32).range(1..))]
    save_every: Option<u32>,
    /// Start from this checkpoint instead of random initialisation (names, shapes and dtypes
    /// are checked against the model). A checkpoint kiln saved resumes exactly: its optimizer
    /// state and epoch count are restored, and --epochs more epochs follow.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Classify test-set images (by index) or 28x28 8-bit grayscale PNG files with the
    /// checkpoint given by --init, printing the top-3 classes; no training.
    #[arg(long, num_args = 1.., value_name = "INDEX|FILE.png", requires = "init")]
    predict: Vec<String>,
    /// Write PNG grids of the first and second conv layers' outputs for --activation-images
    /// (with the checkpoint given by --init) into this directory; no training.
    #[arg(long, requires = "init")]
    activations: Option<PathBuf>,
    /// Test-set indices for --activations (default: the first pullover and the first coat).
    #[arg(long, value_delimiter = ',')]
    activation_images: Vec<usize>,
    /// Time each kernel of the training step on the device (timestamp queries where the
    /// adapter has them, isolated submits otherwise; after a warm-up that pays the shader JIT)
    /// and print a table with FLOPs, bytes and rates instead of training.
    #[arg(long)]
    profile: bool,
    /// Draw d2l's training chart (loss, train acc, test acc per epoch) to PATH, SVG or PNG by
    /// extension; rewritten after every epoch so a long run can be watched.
    #[arg(long, value_name = "PATH")]
    plot: Option<PathBuf>,
    /// Train on kiln's CPU reference executor instead of the GPU (slow; for comparisons).
    #[arg(long)]
    reference: bool,
    /// Print the per-layer output shapes and parameter counts for one 1x28x28 image.
    #[arg(long)]
    summary: bool,
}

/// Training stopped by Ctrl-C (after saving when asked); exits with 130 like a shell.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// The `--profile` table: time, share, useful work and traffic of each kernel of the step,
/// and the loads it issues (storage and workgroup loads, the costly ones on lavapipe, apart
/// from uniform loads).
fn profile_table(profile: &kiln::runtime::Profile, batch: usize) -> String {
    use std::fmt::Write as _;
    let total = profile.total().as_secs_f64();
    let mut s = format!("timing: {}\n", profile.method);
    let _ = writeln!(
        s,
        "{:<26} {:>9} {:>6} {:>9} {:>8} {:>8} {:>7} {:>10} {:>10} {:>8}",
        "kernel",
        "ms/step",
        "share",
        "MFLOP",
        "MB",
        "GFLOP/s",
        "GB/s",
        "M ld st+wg",
        "M ld unif",
        "G ld/s"
    );
    for k in &profile.kernels {
        let sec = k.time.as_secs_f64();
        let loads = match k.loads {
            Some(l) => {
                let costly = (l.storage + l.workgroup) as f64;
                format!(
                    "{:>10.2} {:>10.2} {:>8.2}",
                    costly / 1e6,
                    l.uniform as f64 / 1e6,
                    (costly + l.uniform as f64) / sec / 1e9
                )
            }
            None => format!("{:>10} {:>10} {:>8}", "?", "?", "?"),
        };
        let _ = writeln!(
            s,
            "{:<26} {:>9.2} {:>5.1}% {:>9.1} {:>8.2} {:>8.2} {:>7.2} {loads}",
            k.name,
            sec * 1e3,
            100.0 * sec / total,
            k.flops as f64 / 1e6,
            k.bytes as f64 / 1e6,
            k.flops as f64 / sec / 1e9,
            k.bytes as f64 / sec / 1e9
        );
    }
    let flops: u64 = profile.kernels.iter().map(|k| k.flops).sum();
    let _ = writeln!(
        s,
        "{:<26} {:>9.2} {:>6} {:>9.1} {:>8} {:>8.2}   ({:.0} examples/s at batch {batch} if nothing else ran)",
        "total",
        total * 1e3,
        "",
        flops as f64 / 1e6,
        "",
        flops as f64 / total / 1e9,
        batch as f64 / total
    );
    s
}

impl Args {
    fn optimizer(&self) -> Result<Optimizer> {
        let decay = |default: f32| self.weight_decay.unwrap_or(default);
        let betas = [self.betas[0], self.betas[1]];
        let sgd_only = self.momentum != 0.0 || self.nesterov;
        let optimizer = match self.optimizer {
            OptimizerKind::Sgd => Optimizer::Sgd {
                lr: self.lr.unwrap_or(0.9),
                momentum: self.momentum,
                nesterov: self.nesterov,
                weight_decay: decay(0.0),
            },
            _ if sgd_only => {
                anyhow::bail!("--momentum and --nesterov are settings of --optimizer sgd")
            }
            OptimizerKind::Adam => Optimizer::Adam {
                lr: self.lr.unwrap_or(1e-3),
                betas,
                eps: self.eps,
                weight_decay: decay(0.0),
            },
            OptimizerKind::Adamw => Optimizer::AdamW {
                lr: self.lr.unwrap_or(1e-3),
                betas,
                eps: self.eps,
                weight_decay: decay(0.01),
            },
        };
        optimizer.validate().map_err(anyhow::Error::msg)?;
        Ok(optimizer)
    }
}

fn main() -> ExitCode {
    kiln::runtime::init_logging();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Interrupted>() => ExitCode::from(130),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Compiles the training step and the evaluation graph for the portable target (or, with
/// `--for-device`, the adapter's) and prints (or writes) the requested stage.
fn emit_compiled(model: &ir::Model, args: &Args, stage: Stage) -> Result<()> {
    use kiln::autodiff::{evaluation_graph, read_batches_from_dataset, training_step_with};
    use kiln::compiler::{Target, compile};
    if stage == Stage::Spirv && args.emit_dir.is_none() {
        // Binary on a terminal helps nobody, and naga has no SPIR-V disassembler.
        anyhow::bail!(
            "--emit spirv writes binary SPIR-V, one .spv file per kernel: add --emit-dir DIR \
             (spirv-dis disassembles the files)"
        );
    }
    let side = data::SIDE;
    let batch = args.batch_size as usize;
    let train_rows = args.limit.unwrap_or(60_000).min(60_000);
    let input = TensorType::new(DType::U8, [batch, 1, side, side]);
    // The graphs (and `--emit-dir`'s file names) are named after a `--model` file's graph.
    let name = match model {
        ir::Model::Graph(g) => g.name.as_str(),
        ir::Model::Sequential(_) => "lenet",
    };
    let forward = model.forward(name, input).map_err(anyhow::Error::msg)?;
    let target = if args.for_device {
        Gpu::new()?.target
    } else {
        Target::portable()
    };
    let step = read_batches_from_dataset(
        &training_step_with(&forward, &args.optimizer()?)?,
        train_rows,
    )?;
    let eval = read_batches_from_dataset(&evaluation_graph(&forward)?, 10_000)?;
    let compiled = [compile(&step, &target)?, compile(&eval, &target)?];
    match stage {
        Stage::Kernels => {
            for c in &compiled {
                print!("{}", c.describe());
            }
            println!(
                "training step: {} kernels per step of {batch} examples ({} ops in the step graph); \
                 evaluation: {} kernels per batch",
                compiled[0].modules.len(),
                step.nodes().iter().filter(|n| !n.op.is_leaf()).count(),
                compiled[1].modules.len()
            );
        }
        _ => match &args.emit_dir {
            None => {
                for c in &compiled {
                    // Modules one after another, as `Compiled::wgsl` joins them.
                    let texts = c
                        .kernels()
                        .map(|(m, naga)| Ok(String::from_utf8(kernel_file(stage, m, naga)?)?))
                        .collect::<Result<Vec<String>>>()?;
                    print!("{}", texts.join("\n"));
                }
            }
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let (extension, language) = match backend(stage) {
                    Some(b) => (b.extension(), b.to_string()),
                    None => ("wgsl", "WGSL".to_string()),
                };
                let mut written = 0;
                for c in &compiled {
                    for (m, naga) in c.kernels() {
                        // A graph name is the model file's text: keep it to a plain file name.
                        let stem: String = format!("{}_{}", c.graph.name, m.name)
                            .chars()
                            .map(|ch| {
                                if ch.is_ascii_alphanumeric() || "_-.".contains(ch) {
                                    ch
                                } else {
                                    '_'
                                }
                            })
                            .collect();
                        let path = dir.join(format!("{stem}.{extension}"));
                        write_atomically(&path, &kernel_file(stage, m, naga)?)?;
                        written += 1;
                    }
                }
                println!("wrote {written} {language} files to {}", dir.display());
            }
        },
    }
    Ok(())
}

/// The naga back end of a stage; `None` for WGSL, which needs none.
fn backend(stage: Stage) -> Option<kiln::compiler::backends::Backend> {
    use kiln::compiler::backends::Backend;
    match stage {
        Stage::Spirv => Some(Backend::Spirv),
        Stage::Msl => Some(Backend::Msl),
        Stage::Hlsl => Some(Backend::Hlsl),
        _ => None,
    }
}

/// One kernel's file for `--emit wgsl|spirv|msl|hlsl`: text, or SPIR-V words little-endian
/// (fixed, so a file is the same from every host; readers tell the order by the magic number).
fn kernel_file(
    stage: Stage,
    m: &kiln::compiler::KernelModule,
    naga: &kiln::compiler::NagaModule,
) -> Result<Vec<u8>> {
    use kiln::compiler::backends::{self, Backend};
    Ok(match backend(stage) {
        Some(Backend::Spirv) => backends::spirv(m, naga)?
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect(),
        Some(Backend::Msl) => backends::msl(m, naga)?.text.into_bytes(),
        Some(Backend::Hlsl) => backends::hlsl(m, naga)?.text.into_bytes(),
        None => m.wgsl.clone().into_bytes(),
    })
}

/// Writes `bytes` to a temporary file beside `path`, then renames it into place, so a reader
/// never sees a half-written file.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

fn run(args: Args) -> Result<()> {
    if let Some(path) = &args.plot {
        plot::check_path(path)?;
    }
    let side = data::SIDE;
    let model: ir::Model = match &args.model {
        Some(path) => {
            let model: ir::Model = ir::parse_file(path)?.into();
            // Refused before anything is compiled: the file, and what Fashion-MNIST needs.
            model
                .check_task([1, side, side], data::CLASS_NAMES.len())
                .map_err(|e| {
                    anyhow::anyhow!(
                        "{}: {e} (the model must take `x: f32[N,1,{side},{side}]` and return \
                         `output: f32[N,{}]`)",
                        path.display(),
                        data::CLASS_NAMES.len()
                    )
                })?;
            model
        }
        None => args.variant.model().into(),
    };
    if args.summary {
        let ir::Model::Sequential(layers) = &model else {
            anyhow::bail!(
                "--summary describes the built-in models' layers; --model files have none"
            );
        };
        let summary = layers
            .summary(TensorType::f32([1, 1, side, side]))
            .context("building LeNet")?;
        print!("{summary}");
    }
    let batch = args.batch_size as usize;
    match args.emit {
        Some(Stage::Ir) => {
            let input = TensorType::f32([batch, 1, side, side]);
            let graph = model.forward("lenet", input).map_err(anyhow::Error::msg)?;
            print!("{}", ir::print(&graph));
        }
        Some(Stage::TrainIr) => {
            let input = TensorType::new(DType::U8, [batch, 1, side, side]);
            let forward = model.forward("lenet", input).map_err(anyhow::Error::msg)?;
            let step = kiln::autodiff::training_step_with(&forward, &args.optimizer()?)
                .context("deriving the training step")?;
            print!("{}", ir::print(&step));
        }
        Some(stage) => {
            emit_compiled(&model, &args, stage)?;
        }
        None => {}
    }
    if args.summary || args.emit.is_some() {
        return Ok(());
    }

    if args.limit == Some(0) || args.eval_limit == Some(0) {
        anyhow::bail!("--limit and --eval-limit must leave at least one example");
    }
    let dir = data::locate(args.data.as_deref())?;
    let fashion = data::load(&dir)?;
    let train = match args.limit {
        Some(n) => fashion.train.truncated(n),
        None => fashion.train,
    };
    let test = match args.eval_limit {
        Some(n) => fashion.test.truncated(n),
        None => fashion.test,
    };
    println!(
        "{} ({} parameters) on Fashion-MNIST from {}: {} training, {} test images",
        match args.variant {
            _ if args.model.is_some() => format!(
                "model {}",
                args.model
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
            Variant::Lenet => "LeNet-5".to_string(),
            v => format!(
                "LeNet-5 variant {}",
                v.to_possible_value().expect("a value").get_name()
            ),
        },
        thousands(
            model
                .forward("lenet", TensorType::f32([1, 1, side, side]))
                .map_err(anyhow::Error::msg)?
                .param_count()
        ),
        dir.display(),
        train.count,
        test.count
    );
    let probe = model
        .forward("lenet", TensorType::f32([1, 1, side, side]))
        .map_err(anyhow::Error::msg)?;
    let optimizer = args.optimizer()?;
    let shuffle = !args.no_shuffle;
    let mut epochs = Epochs::new(args.epochs, args.plot.clone());
    // Whether to save after the epoch just finished (the last one, or every --save-every).
    let save_now = |epoch: usize, last: bool| {
        last || args
            .save_every
            .is_some_and(|n| (epoch + 1) % n as usize == 0)
    };
    let metrics = |stats: &Stats, eval: &Stats| {
        std::collections::BTreeMap::from([
            ("loss".to_string(), format!("{:.6}", stats.loss())),
            ("train_acc".to_string(), format!("{:.6}", stats.accuracy())),
            ("test_acc".to_string(), format!("{:.6}", eval.accuracy())),
        ])
    };
    if args.reference {
        println!("device: kiln's CPU reference executor (--reference; correct, but slow)");
        let mut trainer = CpuTrainer::new(model.clone(), [1, side, side], optimizer, args.seed)?;
        if let Some(path) = &args.init {
            let ckpt = kiln::checkpoint::load(path)?;
            trainer.params = kiln::checkpoint::matching_params(path, &ckpt, &probe)?;
            println!("starting from checkpoint {} (weights only)", path.display());
        }
        for epoch in 0..args.epochs {
            let order = epoch_order(train.count, args.seed, epoch, shuffle);
            let bar = epochs.bar(epoch, train.count);
            let start = Instant::now();
            let stats =
                trainer.train_epoch(&train, &order, batch, |s| epochs.tick(&bar, s, start))?;
            let elapsed = start.elapsed();
            bar.finish_and_clear();
            let eval = trainer.evaluate(&test, batch)?;
            epochs.report(epoch, &stats, &eval, elapsed)?;
            if let Some(path) = args
                .save
                .as_ref()
                .filter(|_| save_now(epoch, epoch + 1 == args.epochs))
            {
                let mut metadata = metrics(&stats, &eval);
                metadata.insert("ir".into(), ir::print(&probe));
                metadata.insert("epoch".into(), (epoch + 1).to_string());
                metadata.insert("seed".into(), args.seed.to_string());
                kiln::checkpoint::save(path, &trainer.params, &metadata)?;
                println!("saved {} (epoch {})", path.display(), epoch + 1);
            }
        }
        epochs.summary("the CPU reference executor");
        return Ok(());
    }
    let gpu = Gpu::new()?;
    println!("device: {}", gpu.describe());
    if !args.predict.is_empty() || args.activations.is_some() {
        let path = args
            .init
            .as_ref()
            .context("--predict and --activations need --init")?;
        let ckpt = kiln::checkpoint::load(path)?;
        let params = kiln::checkpoint::matching_params(path, &ckpt, &probe)?;
        if !args.predict.is_empty() {
            predict(&gpu, &model, &params, &test, &args.predict)?;
        }
        if let Some(dir) = &args.activations {
            activations(&gpu, &model, &params, &test, &args.activation_images, dir)?;
        }
        return Ok(());
    }
    if gpu.is_software() {
        println!(
            "note: {} is a CPU emulating a GPU (software Vulkan); it is correct but far slower \
             than real GPU hardware",
            gpu.info.name
        );
    }
    let compile_start = Instant::now();
    let target = match args.target {
        Schedule::Device => None,
        Schedule::Portable => Some(kiln::compiler::Target::portable_for(&gpu.target)),
    };
    let config = TrainConfig {
        batch_size: batch,
        optimizer,
        seed: args.seed,
        shuffle,
        target,
    };
    let mut trainer = Trainer::new(&gpu, model.clone(), &train, &test, config)?;
    if let Some(path) = &args.init {
        trainer.load(path)?;
        println!(
            "starting from checkpoint {} (after epoch {})",
            path.display(),
            trainer.epochs_done()
        );
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting now");
            // SAFETY: `_exit` ends the process without running exit handlers or destructors,
            // which is the point: nothing may touch the device after this.
            unsafe { libc::_exit(130) }
        }
        eprintln!("\ninterrupt: finishing the steps in flight (Ctrl-C again to exit at once)");
    })
    .context("installing the Ctrl-C handler")?;
    trainer.device_trainer().set_interrupt(interrupted);
    let (step_kernels, eval_kernels) = trainer.kernels();
    println!(
        "compiled the training step into {step_kernels} kernels and the evaluation into \
         {eval_kernels} in {:.0} ms",
        compile_start.elapsed().as_secs_f64() * 1e3
    );
    if args.profile {
        let profile = trainer.device_trainer().profile_step(5)?;
        print!("{}", profile_table(&profile, batch));
        return Ok(());
    }
    let first = trainer.epochs_done();
    epochs.offset = first;
    for k in 0..args.epochs {
        let epoch = first + k;
        let bar = epochs.bar(epoch, train.count);
        let start = Instant::now();
        let report = match trainer.epoch(|s| epochs.tick(&bar, s, start)) {
            Ok(report) => report,
            Err(kiln::Error::Runtime(RuntimeError::Interrupted { where_ })) => {
                bar.finish_and_clear();
                // The weights and state of the interrupted epoch's finished steps; the epoch
                // count stays that of the last whole epoch.
                let saved = match &args.save {
                    Some(path) => {
                        let metadata = std::collections::BTreeMap::from([(
                            "interrupted".to_string(),
                            where_.clone(),
                        )]);
                        trainer.save(path, &metadata)?;
                        format!("; saved {}", path.display())
                    }
                    None => String::new(),
                };
                eprintln!("interrupted in {where_}{saved}");
                return Err(Interrupted.into());
            }
            Err(e) => return Err(e.into()),
        };
        bar.finish_and_clear();
        epochs.report(epoch, &report.train, &report.test, report.elapsed)?;
        if let Some(path) = args
            .save
            .as_ref()
            .filter(|_| save_now(epoch, k + 1 == args.epochs))
        {
            trainer.save(path, &metrics(&report.train, &report.test))?;
            println!("saved {} (epoch {})", path.display(), epoch + 1);
        }
    }
    epochs.summary(&gpu.info.name);
    Ok(())
}

/// d2l-style reporting: a progress bar per epoch, a line after each, a summary at the end.
struct Epochs {
    total: usize,
    /// Epochs of the checkpoint training resumed from (the bar counts on from them).
    offset: usize,
    train_time: Duration,
    examples: usize,
    last: Option<(Stats, Stats)>,
    /// `--plot`: where the chart goes, and its points so far.
    plot: Option<PathBuf>,
    history: Vec<plot::EpochPoint>,
}

impl Epochs {
    fn new(total: usize, plot: Option<PathBuf>) -> Self {
        Epochs {
            total,
            offset: 0,
            train_time: Duration::ZERO,
            examples: 0,
            last: None,
            plot,
            history: Vec::new(),
        }
    }

    fn bar(&self, epoch: usize, examples: usize) -> ProgressBar {
        let bar = ProgressBar::new(examples as u64).with_style(
            ProgressStyle::with_template(
                "epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({eta} left)",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("{}/{}", epoch + 1, self.offset + self.total));
        bar
    }

    fn tick(&self, bar: &ProgressBar, s: &Stats, start: Instant) {
        bar.set_position(s.examples as u64);
        let rate = s.examples as f64 / start.elapsed().as_secs_f64();
        bar.set_message(format!("loss {:.3}, {rate:.0} ex/s", s.loss()));
    }

    fn report(
        &mut self,
        epoch: usize,
        stats: &Stats,
        eval: &Stats,
        elapsed: Duration,
    ) -> Result<()> {
        self.train_time += elapsed;
        self.examples += stats.examples;
        println!(
            "epoch {}: loss {:.3}, train acc {:.3}, test acc {:.3}, {} examples/sec",
            epoch + 1,
            stats.loss(),
            stats.accuracy(),
            eval.accuracy(),
            thousands((stats.examples as f64 / elapsed.as_secs_f64()) as usize)
        );
        self.last = Some((*stats, *eval));
        self.history.push(plot::EpochPoint {
            loss: stats.loss(),
            train_acc: stats.accuracy(),
            test_acc: eval.accuracy(),
        });
        if let Some(path) = &self.plot {
            plot::write(path, self.total, &self.history)?;
        }
        Ok(())
    }

    fn summary(&self, device: &str) {
        if let Some((stats, eval)) = &self.last {
            println!(
                "loss {:.3}, train acc {:.3}, test acc {:.3}",
                stats.loss(),
                stats.accuracy(),
                eval.accuracy()
            );
            println!(
                "{} examples/sec on {device}",
                thousands((self.examples as f64 / self.train_time.as_secs_f64()) as usize)
            );
        }
    }
}

/// Reads a 28x28 8-bit grayscale PNG; anything else is an error naming the file.
fn read_png(path: &std::path::Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .with_context(|| format!("{}: not a PNG file", path.display()))?;
    let info = reader.info();
    let (w, h, color, depth) = (info.width, info.height, info.color_type, info.bit_depth);
    if (w, h) != (28, 28) || color != png::ColorType::Grayscale || depth != png::BitDepth::Eight {
        anyhow::bail!(
            "{}: needs a 28x28 8-bit grayscale image (light object on a dark background, like \
             Fashion-MNIST), got {w}x{h} {color:?} {depth:?}",
            path.display()
        );
    }
    let mut buf = vec![0; reader.output_buffer_size()];
    let frame = reader
        .next_frame(&mut buf)
        .with_context(|| format!("{}: corrupt PNG", path.display()))?;
    Ok(buf[..frame.buffer_size()].to_vec())
}

/// `--predict`: top-3 classes of test images (by index) and PNG files.
fn predict(
    gpu: &Gpu,
    model: &ir::Model,
    params: &std::collections::HashMap<String, kiln::reference::Tensor>,
    test: &data::Split,
    items: &[String],
) -> Result<()> {
    let mut pixels = Vec::new();
    let mut names = Vec::new();
    for item in items {
        match item.parse::<usize>() {
            Ok(i) if i < test.count => {
                pixels.extend_from_slice(test.image(i));
                names.push(format!(
                    "test image {i} (label {})",
                    data::CLASS_NAMES[test.labels[i] as usize]
                ));
            }
            Ok(i) => anyhow::bail!(
                "test image {i} does not exist (the test set has {})",
                test.count
            ),
            Err(_) => {
                pixels.extend(read_png(std::path::Path::new(item))?);
                names.push(item.clone());
            }
        }
    }
    let out = kiln::runtime::infer(
        gpu,
        model,
        params,
        &pixels,
        [1, data::SIDE, data::SIDE],
        &[],
    )?;
    for (name, probs) in names.iter().zip(&out.probabilities) {
        let mut ranked: Vec<(usize, f32)> = probs.iter().copied().enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        let top: Vec<String> = ranked[..3.min(ranked.len())]
            .iter()
            .map(|(c, p)| {
                format!(
                    "{} {p:.3}",
                    data::CLASS_NAMES.get(*c).copied().unwrap_or("?")
                )
            })
            .collect();
        println!("{name}: {}", top.join(", "));
    }
    Ok(())
}

/// `--activations`: one PNG per chosen image and conv layer, its channels side by side, each
/// scaled to its own range.
fn activations(
    gpu: &Gpu,
    model: &ir::Model,
    params: &std::collections::HashMap<String, kiln::reference::Tensor>,
    test: &data::Split,
    chosen: &[usize],
    dir: &std::path::Path,
) -> Result<()> {
    let first = |class: u8| test.labels.iter().position(|&l| l == class);
    let chosen: Vec<usize> = if chosen.is_empty() {
        [first(2), first(4)].into_iter().flatten().collect()
    } else {
        chosen.to_vec()
    };
    if let Some(&bad) = chosen.iter().find(|&&i| i >= test.count) {
        anyhow::bail!(
            "test image {bad} does not exist (the test set has {})",
            test.count
        );
    }
    // The outputs of the activations after the two convolutions (layers 1 and 4).
    let layers = [1usize, 4];
    let pixels: Vec<u8> = chosen
        .iter()
        .flat_map(|&i| test.image(i).to_vec())
        .collect();
    let out = kiln::runtime::infer(
        gpu,
        model,
        params,
        &pixels,
        [1, data::SIDE, data::SIDE],
        &layers,
    )?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (k, &index) in chosen.iter().enumerate() {
        for l in layers {
            let t = &out.layers[&l];
            let [_, c, h, w] =
                <[usize; 4]>::try_from(t.shape()).context("conv activations are 4-D")?;
            let values =
                &t.as_f32().context("f32 activations")?[k * c * h * w..(k + 1) * c * h * w];
            let cols = (c as f64).sqrt().ceil() as usize;
            let rows = c.div_ceil(cols);
            let (gw, gh) = (cols * (w + 1) - 1, rows * (h + 1) - 1);
            let mut grid = vec![64u8; gw * gh];
            for ch in 0..c {
                let plane = &values[ch * h * w..(ch + 1) * h * w];
                let (lo, hi) = plane
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                let scale = if hi > lo { 255.0 / (hi - lo) } else { 0.0 };
                let (ox, oy) = ((ch % cols) * (w + 1), (ch / cols) * (h + 1));
                for y in 0..h {
                    for x in 0..w {
                        grid[(oy + y) * gw + ox + x] = ((plane[y * w + x] - lo) * scale) as u8;
                    }
                }
            }
            let path = dir.join(format!("image{index}_layer{l}.png"));
            let tmp = path.with_extension("png.tmp");
            {
                let file = std::fs::File::create(&tmp)
                    .with_context(|| format!("creating {}", tmp.display()))?;
                let mut enc =
                    png::Encoder::new(std::io::BufWriter::new(file), gw as u32, gh as u32);
                enc.set_color(png::ColorType::Grayscale);
                enc.set_depth(png::BitDepth::Eight);
                enc.write_header()?.write_image_data(&grid)?;
            }
            std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
            println!(
                "wrote {} ({} channels of {}x{}, test image {index}: {})",
                path.display(),
                c,
                h,
                w,
                data::CLASS_NAMES[test.labels[index] as usize]
            );
        }
    }
    Ok(())
}
