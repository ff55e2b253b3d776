//! Your own model through kiln's library API: a net of 3x3 convolutions (not LeNet) built with
//! `Sequential`, trained with AdamW on Fashion-MNIST, evaluated, asked for a prediction.
//! `cargo run --release --example custom_model -- [EPOCHS] [TRAIN_EXAMPLES]`

use kiln::{Conv2d, Gpu, Layer, Optimizer, Sequential, TrainConfig, Trainer, data};

fn main() -> anyhow::Result<()> {
    kiln::runtime::init_logging();
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let epochs = args.next().transpose()?.unwrap_or(3);
    let limit = args.next().transpose()?.unwrap_or(60_000);
    let model = Sequential::new()
        .append(Conv2d::new(1, 8, 3).padding(1))
        .append(Layer::ReLU)
        .append(Layer::max_pool2d(2, 2))
        .append(Conv2d::new(8, 16, 3).padding(1))
        .append(Layer::ReLU)
        .append(Layer::max_pool2d(2, 2))
        .append(Layer::Flatten)
        .append(Layer::linear(16 * 7 * 7, 64))
        .append(Layer::ReLU)
        .append(Layer::linear(64, 10));
    let fashion = data::load(&data::locate(None)?)?;
    let train = fashion.train.truncated(limit);
    let gpu = Gpu::new()?;
    println!(
        "training on {} with {} examples",
        gpu.info.name, train.count
    );
    let config = TrainConfig {
        batch_size: 128,
        optimizer: Optimizer::adamw(2e-3),
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(&gpu, model, &train, &fashion.test, config)?;
    trainer.fit(epochs, |r| {
        let (loss, acc) = (r.train.loss(), r.train.accuracy());
        let rate = r.train.examples as f64 / r.elapsed.as_secs_f64();
        println!(
            "epoch {}: loss {loss:.3}, train acc {acc:.3}, test acc {:.3}, {rate:.0} examples/s",
            r.epoch,
            r.test.accuracy()
        );
    })?;
    let p = &trainer.predict(fashion.test.image(0))?[0];
    let best = (0..10).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap_or(0);
    let truth = data::CLASS_NAMES[fashion.test.labels[0] as usize];
    let guess = data::CLASS_NAMES[best];
    println!(
        "test image 0 ({truth}): predicted {guess} with p = {:.3}",
        p[best]
    );
    Ok(())
}
