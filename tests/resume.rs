//! Checkpoints resume training exactly: two epochs in one run equal one epoch, a save, a load
//! into a fresh trainer and one more epoch, bit for bit (parameters and optimizer state).

use std::collections::BTreeMap;

use kiln::{Gpu, LenetVariant, Optimizer, Split, TrainConfig, Trainer};

fn split(count: usize, seed: u32) -> Split {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        s
    };
    Split {
        count,
        rows: 28,
        cols: 28,
        images: (0..count * 784).map(|_| next() as u8).collect(),
        labels: (0..count).map(|_| (next() % 10) as u8).collect(),
    }
}

fn gpu() -> Option<Gpu> {
    match Gpu::new() {
        Ok(g) => Some(g),
        Err(e) if std::env::var_os("KILN_REQUIRE_GPU").is_none() => {
            eprintln!("SKIPPED: GPU test, no adapter: {e}");
            None
        }
        Err(e) => panic!("KILN_REQUIRE_GPU is set but no device opened: {e}"),
    }
}

#[test]
fn one_epoch_and_a_resumed_one_equal_two_epochs_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    // 300 examples at batch 128: two full steps and a partial one per epoch, shuffled.
    let train = split(300, 1);
    let test = split(16, 2);
    let dir = tempfile::tempdir().unwrap();
    for (what, optimizer) in [
        ("adam", Optimizer::adam(1e-3)),
        (
            "momentum",
            Optimizer::Sgd {
                lr: 0.1,
                momentum: 0.9,
                nesterov: true,
                weight_decay: 1e-4,
            },
        ),
    ] {
        let config = TrainConfig {
            batch_size: 128,
            optimizer,
            seed: 7,
            ..TrainConfig::default()
        };
        let model = LenetVariant::ReluMaxPool.model();
        let mut straight =
            Trainer::new(&gpu, model.clone(), &train, &test, config.clone()).unwrap();
        let two = straight.fit(2, |_| {}).unwrap();

        let mut first = Trainer::new(&gpu, model.clone(), &train, &test, config.clone()).unwrap();
        first.fit(1, |_| {}).unwrap();
        let path = dir.path().join(format!("{what}.safetensors"));
        first.save(&path, &BTreeMap::new()).unwrap();
        let mut resumed = Trainer::new(&gpu, model, &train, &test, config).unwrap();
        resumed.load(&path).unwrap();
        assert_eq!(resumed.epochs_done(), 1, "{what}");
        let second = resumed.fit(1, |_| {}).unwrap();

        assert_eq!(second[0].epoch, 2, "{what}");
        assert_eq!(
            second[0].train, two[1].train,
            "{what}: the second epoch's figures"
        );
        assert_eq!(
            resumed.params().unwrap(),
            straight.params().unwrap(),
            "{what}: parameters"
        );
        let state = resumed.optimizer_state().unwrap();
        assert!(!state.is_empty(), "{what} keeps state");
        assert_eq!(state, straight.optimizer_state().unwrap(), "{what}: state");
    }
}

#[test]
fn a_checkpoint_of_another_optimizer_is_refused_naming_both() {
    let Some(gpu) = gpu() else { return };
    let train = split(64, 3);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adam.safetensors");
    let adam = TrainConfig {
        batch_size: 64,
        optimizer: Optimizer::adam(1e-3),
        ..TrainConfig::default()
    };
    let model = LenetVariant::Relu.model();
    let t = Trainer::new(&gpu, model.clone(), &train, &train, adam).unwrap();
    t.save(&path, &BTreeMap::new()).unwrap();
    let momentum = TrainConfig {
        batch_size: 64,
        optimizer: Optimizer::Sgd {
            lr: 0.1,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
        },
        ..TrainConfig::default()
    };
    let mut other = Trainer::new(&gpu, model, &train, &train, momentum).unwrap();
    let e = other.load(&path).unwrap_err().to_string();
    assert!(e.contains("adam.safetensors"), "{e}");
    assert!(e.contains("Adam") && e.contains("SGD"), "{e}");
}
