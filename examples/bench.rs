//! kiln's throughput benchmark: LeNet-5 training and inference examples/s, cold start and
//! compile time on the GPU wgpu finds.
//!
//! `cargo run --release --example bench` prints one block of figures; README.md keeps the
//! latest ones. Training is timed over whole chunks of steps after a warm-up pass that pays the
//! shader JIT; each figure is the median of `--repeats` runs, with the range beside it. Cold
//! start runs this program again as a child with Mesa's shader cache disabled and times it
//! from spawn to the end of its first training step.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use kiln::autodiff::{evaluation_graph, read_batches_from_dataset, training_step};
use kiln::compiler::compile;
use kiln::data::{self, Split};
use kiln::ir::{DType, TensorType, lenet};
use kiln::runtime::{Gpu, GpuTrainer};
use kiln::train::{Rng, Stream};

#[derive(Parser, Debug)]
#[command(about = "Measure kiln's LeNet-5 training and inference throughput")]
struct Args {
    /// Examples per training step (and per evaluation batch).
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Training steps per timed run.
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Test images per timed inference run.
    #[arg(long, default_value_t = 10_000)]
    infer_examples: usize,
    /// Timed runs of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Compile the kernels one output per invocation (no register blocking), to compare.
    #[arg(long)]
    unblocked: bool,
    /// Which schedules to compile: the device's own (CPU-class kernels on lavapipe) or the
    /// portable WebGPU ones (`--emit`'s), run on the same device.
    #[arg(long, value_enum, default_value_t = Schedule::Device)]
    target: Schedule,
    /// Skip the cold-start measurement (it JIT-compiles every shader from scratch).
    #[arg(long)]
    no_cold_start: bool,
    /// Fashion-MNIST directory (throughput does not depend on the pixels: when the default
    /// search finds no data set, random images are used and the output says so).
    #[arg(long)]
    data: Option<std::path::PathBuf>,
    /// Internal: run as the cold-start child (open the device, compile, one step, exit).
    #[arg(long, hide = true)]
    cold_start_child: bool,
}

/// The schedule set `--target` chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Schedule {
    Device,
    Portable,
}

/// Median and range of a few timings.
fn summary(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    (xs[xs.len() / 2], xs[0], xs[xs.len() - 1])
}

/// The data set (or random stand-ins of its shape) and where it came from. A directory given
/// with `--data` must hold the data set: only the default search falls back to random images.
fn splits(dir: Option<&std::path::Path>) -> Result<(Split, Split, String)> {
    Ok(
        match data::locate(dir).and_then(|d| data::load(&d).map(|f| (f, d))) {
            Ok((f, d)) => (
                f.train,
                f.test,
                format!("Fashion-MNIST from {}", d.display()),
            ),
            Err(e) if dir.is_some() => return Err(e.into()),
            Err(_) => {
                let random = |count: usize, seed: u64| {
                    let mut rng = Rng::new(seed, Stream::Init);
                    Split {
                        count,
                        rows: 28,
                        cols: 28,
                        images: (0..count * 784).map(|_| rng.below(256) as u8).collect(),
                        labels: (0..count).map(|_| rng.below(10) as u8).collect(),
                    }
                };
                (
                    random(60_000, 1),
                    random(10_000, 2),
                    "random images (Fashion-MNIST not found; throughput is the same)".into(),
                )
            }
        },
    )
}

fn cold_start_child(args: &Args) -> Result<()> {
    let (train, test, _) = splits(args.data.as_deref())?;
    let gpu = Gpu::new()?;
    let batch = args.batch_size;
    let trainer = GpuTrainer::new(
        &gpu,
        lenet(),
        &train.truncated(batch),
        &test.truncated(batch),
        batch,
        0.9,
        0,
    )?;
    let order: Vec<u32> = (0..batch as u32).collect();
    trainer.train_order(&order)?;
    Ok(())
}

fn main() -> Result<()> {
    kiln::runtime::init_logging();
    let args = Args::parse();
    if args.cold_start_child {
        return cold_start_child(&args);
    }
    if args.batch_size == 0 || args.steps == 0 || args.repeats == 0 || args.infer_examples == 0 {
        bail!("--batch-size, --steps, --repeats and --infer-examples must be positive");
    }
    let batch = args.batch_size;
    let mut gpu = Gpu::new()?;
    if args.target == Schedule::Portable {
        gpu.target = kiln::compiler::Target::portable_for(&gpu.target);
    }
    if args.unblocked {
        gpu.target.block_outputs = false;
    }
    println!("kiln bench: LeNet-5, batch {batch}");
    println!("device: {}", gpu.describe());
    println!(
        "schedule: {}{}",
        if gpu.target.block_outputs {
            "register-blocked (4 lanes x up to 8 rows of outputs per invocation where a reduction allows)"
        } else {
            "one output per invocation (--unblocked)"
        },
        match (gpu.target.class, gpu.target.block_outputs) {
            (kiln::compiler::DeviceClass::Cpu, true) => {
                "; image chunks read through uniform windows, convolutions over vec4 pixel rows \
                 (CPU-class device)"
            }
            (kiln::compiler::DeviceClass::Cpu, false) => {
                "; image chunks read through uniform windows (CPU-class device)"
            }
            _ => "",
        }
    );

    // The compiler alone: IR of the whole training step to naga-validated WGSL.
    let fwd = lenet()
        .build("lenet", TensorType::new(DType::U8, [batch, 1, 28, 28]))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let start = Instant::now();
    let step = read_batches_from_dataset(&training_step(&fwd, 0.9)?, 60_000)?;
    let autodiff_ms = start.elapsed().as_secs_f64() * 1e3;
    let eval = read_batches_from_dataset(&evaluation_graph(&fwd)?, 10_000)?;
    let mut times = Vec::new();
    let mut kernels = 0;
    for _ in 0..10 {
        let start = Instant::now();
        kernels = compile(&step, &gpu.target)?.modules.len();
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let (compile_ms, lo, hi) = summary(times);
    let start = Instant::now();
    compile(&eval, &gpu.target)?;
    let eval_ms = start.elapsed().as_secs_f64() * 1e3;
    println!(
        "compile: training step ({kernels} kernels) {compile_ms:.1} ms (range {lo:.1}-{hi:.1}, \
         10 runs), evaluation graph {eval_ms:.1} ms, autodiff {autodiff_ms:.1} ms"
    );

    let (train, test, source) = splits(args.data.as_deref())?;
    println!("data: {source}");
    let train = train.truncated(batch * args.steps);
    let test = test.truncated(args.infer_examples);
    let start = Instant::now();
    let trainer = GpuTrainer::new(&gpu, lenet(), &train, &test, batch, 0.9, 0)?;
    println!(
        "setup: upload and compile every program, create pipelines: {:.0} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    let order: Vec<u32> = (0..train.count as u32).collect();
    let start = Instant::now();
    trainer.train_order(&order[..batch])?;
    trainer.evaluate()?;
    println!(
        "warm-up (first dispatch of every kernel pays the JIT): {:.2} s",
        start.elapsed().as_secs_f64()
    );

    let mut train_rates = Vec::new();
    let mut infer_rates = Vec::new();
    for _ in 0..args.repeats {
        let start = Instant::now();
        trainer.train_order(&order)?;
        train_rates.push(train.count as f64 / start.elapsed().as_secs_f64());
        let start = Instant::now();
        trainer.evaluate()?;
        infer_rates.push(test.count as f64 / start.elapsed().as_secs_f64());
    }
    let (t, tlo, thi) = summary(train_rates);
    println!(
        "training: {t:.0} examples/s (range {tlo:.0}-{thi:.0}; {} steps of {batch} per run, \
         {} runs)",
        args.steps, args.repeats
    );
    let (i, ilo, ihi) = summary(infer_rates);
    println!(
        "inference: {i:.0} examples/s (range {ilo:.0}-{ihi:.0}; {} test images per run, loss \
         and accuracy included)",
        test.count
    );

    if !args.no_cold_start {
        let exe = std::env::current_exe().context("finding this program to rerun it")?;
        let mut child = Command::new(exe);
        child
            .arg("--cold-start-child")
            .arg("--target")
            .arg(
                clap::ValueEnum::to_possible_value(&args.target)
                    .expect("every schedule has a name")
                    .get_name(),
            )
            .arg("--batch-size")
            .arg(batch.to_string())
            .env("MESA_SHADER_CACHE_DISABLE", "true");
        if let Some(d) = &args.data {
            child.arg("--data").arg(d);
        }
        let start = Instant::now();
        let status = child.status().context("running the cold-start child")?;
        let cold: Duration = start.elapsed();
        if !status.success() {
            bail!("the cold-start child failed ({status})");
        }
        println!(
            "cold start: {:.2} s (new process, Mesa shader cache disabled: open the device, \
             load the data, compile, JIT, one training step)",
            cold.as_secs_f64()
        );
    }
    Ok(())
}
