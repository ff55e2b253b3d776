//! Train d2l's LeNet-5 on Fashion-MNIST with kiln.
//!
//! `cargo run --release --example lenet_fashion -- --summary` prints the layer table,
//! `--emit ir` prints the model's graph IR. The training stages (autodiff, fusion, WGSL
//! codegen, the wgpu runtime) are not built yet; until they are, a plain run says so.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use kiln::data;
use kiln::ir::{self, TensorType};

/// A compiler stage whose output `--emit` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Stage {
    /// The forward graph IR, with every shape (the text parses back with `kiln::ir::parse`).
    Ir,
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
    /// SGD learning rate.
    #[arg(long, default_value_t = 0.9)]
    lr: f32,
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
    /// Print a compiler stage's output instead of training.
    #[arg(long, value_enum)]
    emit: Option<Stage>,
    /// Print the per-layer output shapes and parameter counts for one 1x28x28 image.
    #[arg(long)]
    summary: bool,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let model = ir::lenet();
    if args.summary {
        let summary = model
            .summary(TensorType::f32([1, 1, data::SIDE, data::SIDE]))
            .context("building LeNet")?;
        print!("{summary}");
    }
    if let Some(Stage::Ir) = args.emit {
        let input = TensorType::f32([args.batch_size as usize, 1, data::SIDE, data::SIDE]);
        let graph = model.build("lenet", input).context("building LeNet")?;
        print!("{}", ir::print(&graph));
    }
    if args.summary || args.emit.is_some() {
        return Ok(());
    }

    let dir = data::locate(args.data.as_deref())?;
    let fashion = data::load(&dir)?;
    let train = match args.limit {
        Some(n) => fashion.train.truncated(n),
        None => fashion.train,
    };
    println!(
        "Fashion-MNIST from {}: {} training and {} test images",
        dir.display(),
        train.count,
        fashion.test.count
    );
    bail!(
        "training is not implemented yet: kiln can build, check and print LeNet (--summary, \
         --emit ir), but the autodiff, fusion, WGSL codegen and GPU runtime stages are still to \
         come (epochs {}, batch size {}, lr {}, seed {} were accepted)",
        args.epochs,
        args.batch_size,
        args.lr,
        args.seed
    )
}
