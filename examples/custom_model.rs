//! A model of your own through kiln's library API: a small VGG-style net (not LeNet) built
//! with the `Sequential` builder, trained with AdamW on Fashion-MNIST and evaluated.
//!
//! `cargo run --release --example custom_model -- [EPOCHS] [TRAIN_EXAMPLES]`

use kiln::{Conv2d, Gpu, Layer, Optimizer, Sequential, TrainConfig, Trainer, data};

fn main() -> anyhow::Result<()> {
    kiln::runtime::init_logging();
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let epochs = args.next().transpose()?.unwrap_or(3);
    let limit = args.next().transpose()?.unwrap_or(60_000);

    let model = Sequential::new()
        .append(Conv2d::new(1, 16, 3).padding(1))
        .append(Layer::ReLU)
        .append(Conv2d::new(16, 16, 3).padding(1))
        .append(Layer::ReLU)
        .append(Layer::max_pool2d(2, 2))
        .append(Conv2d::new(16, 32, 3).padding(1))
        .append(Layer::ReLU)
        .append(Layer::max_pool2d(2, 2))
        .append(Layer::Flatten)
        .append(Layer::linear(32 * 7 * 7, 64))
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
        println!(
            "epoch {}: loss {:.3}, train acc {:.3}, test acc {:.3}, {:.0} examples/s",
            r.epoch,
            r.train.loss(),
            r.train.accuracy(),
            r.test.accuracy(),
            r.train.examples as f64 / r.elapsed.as_secs_f64()
        );
    })?;
    let first = fashion.test.image(0);
    let p = trainer.predict(first)?;
    let best = (0..10)
        .max_by(|&a, &b| p[0][a].total_cmp(&p[0][b]))
        .unwrap_or(0);
    println!(
        "test image 0 ({}): predicted {} with p = {:.3}",
        data::CLASS_NAMES[fashion.test.labels[0] as usize],
        data::CLASS_NAMES[best],
        p[0][best]
    );
    Ok(())
}
