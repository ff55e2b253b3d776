//! Snapshots of what kiln generates for LeNet: the fused kernel plan and every WGSL module of the
//! training step and the evaluation graph, for a full batch (256) and the last one (96), on the
//! portable target (what `--emit` prints) and on the CPU-class target lavapipe gets
//! (`Target::lavapipe()`, what CI trains with). Review changes with `cargo insta review`.

use kiln::autodiff::{evaluation_graph, read_batches_from_dataset, training_step};
use kiln::compiler::{Compiled, Target, compile, validate_wgsl};
use kiln::ir::{DType, TensorType, lenet};

fn compiled_for(target: &Target, train: bool, batch: usize) -> Compiled {
    let forward = lenet()
        .build("lenet", TensorType::new(DType::U8, [batch, 1, 28, 28]))
        .unwrap();
    let graph = if train {
        read_batches_from_dataset(&training_step(&forward, 0.9).unwrap(), 60_000).unwrap()
    } else {
        read_batches_from_dataset(&evaluation_graph(&forward).unwrap(), 10_000).unwrap()
    };
    let c = compile(&graph, target).unwrap();
    for m in &c.modules {
        validate_wgsl(&m.name, &m.wgsl).unwrap();
    }
    c
}

fn compiled(train: bool, batch: usize) -> Compiled {
    compiled_for(&Target::portable(), train, batch)
}

#[test]
fn lenet_kernel_plan() {
    insta::assert_snapshot!("lenet_step_b256_kernels", compiled(true, 256).describe());
    insta::assert_snapshot!("lenet_eval_b256_kernels", compiled(false, 256).describe());
}

#[test]
fn lenet_training_step_wgsl() {
    insta::assert_snapshot!("lenet_step_b256_wgsl", compiled(true, 256).wgsl());
    insta::assert_snapshot!("lenet_step_b96_wgsl", compiled(true, 96).wgsl());
}

#[test]
fn lenet_evaluation_wgsl() {
    insta::assert_snapshot!("lenet_eval_b256_wgsl", compiled(false, 256).wgsl());
    insta::assert_snapshot!("lenet_eval_b96_wgsl", compiled(false, 96).wgsl());
}

#[test]
fn lenet_cpu_class_kernel_plan() {
    let cpu = Target::lavapipe();
    insta::assert_snapshot!(
        "lenet_step_b256_cpu_kernels",
        compiled_for(&cpu, true, 256).describe()
    );
    insta::assert_snapshot!(
        "lenet_eval_b256_cpu_kernels",
        compiled_for(&cpu, false, 256).describe()
    );
}

#[test]
fn lenet_cpu_class_training_step_wgsl() {
    let cpu = Target::lavapipe();
    insta::assert_snapshot!(
        "lenet_step_b256_cpu_wgsl",
        compiled_for(&cpu, true, 256).wgsl()
    );
    insta::assert_snapshot!(
        "lenet_step_b96_cpu_wgsl",
        compiled_for(&cpu, true, 96).wgsl()
    );
}

#[test]
fn lenet_cpu_class_evaluation_wgsl() {
    let cpu = Target::lavapipe();
    insta::assert_snapshot!(
        "lenet_eval_b256_cpu_wgsl",
        compiled_for(&cpu, false, 256).wgsl()
    );
    insta::assert_snapshot!(
        "lenet_eval_b96_cpu_wgsl",
        compiled_for(&cpu, false, 96).wgsl()
    );
}

/// The zoo's VGG-style model's training step at batch 256 (SGD), compiled for the CPU-class
/// target.
fn vgg_cpu_class_step() -> Compiled {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/zoo/vgg.kir");
    let model: kiln::ir::Model = kiln::ir::parse_file(std::path::Path::new(path))
        .unwrap()
        .into();
    let forward = model
        .forward("vgg", TensorType::new(DType::U8, [256, 1, 28, 28]))
        .unwrap();
    let step = read_batches_from_dataset(&training_step(&forward, 0.9).unwrap(), 60_000).unwrap();
    compile(&step, &Target::lavapipe()).unwrap()
}

/// The zoo's VGG-style model on the CPU-class target, batch 256 (SGD): the kernels whose
/// input gradient computes two adjacent columns per row, its definition widened over the
/// whole kernel (`dy` zero outside), held along channels and columns and slid along the row.
#[test]
fn vgg_cpu_class_input_gradient_columns_wgsl() {
    let c = vgg_cpu_class_step();
    let columns: Vec<String> = c
        .modules
        .iter()
        .filter(|m| {
            m.wgsl
                .lines()
                .any(|l| l.starts_with("// schedule:") && l.contains("on axis 3"))
        })
        .map(|m| {
            validate_wgsl(&m.name, &m.wgsl).unwrap();
            format!("// ---- {}\n{}", m.name, m.wgsl)
        })
        .collect();
    assert_eq!(columns.len(), 1, "one input gradient in columns");
    insta::assert_snapshot!(
        "vgg_step_b256_cpu_input_gradient_columns",
        columns.join("\n")
    );
}

/// VGG's second convolution with its pooling on the CPU-class target (8 -> 8 channels, 3x3,
/// padded, at 28x28): the four taps of each pooling window are its definition, the taps in
/// the padding predicated, held along the window, lanes over channels and rows over as many
/// images as a chunk's uniform window holds (two: four would need 100 KB, over the 64 KiB a
/// uniform binding holds, and read the pixels from storage).
#[test]
fn vgg_cpu_class_pooled_convolution_wgsl() {
    let c = vgg_cpu_class_step();
    let pooled: Vec<_> = c
        .modules
        .iter()
        .filter(|m| m.wgsl.contains("_rows_at_pool_taps(") && m.wgsl.contains("%11 conv2d,"))
        .collect();
    assert_eq!(
        pooled.len(),
        1,
        "one kernel of the second convolution's taps"
    );
    let m = pooled[0];
    validate_wgsl(&m.name, &m.wgsl).unwrap();
    assert!(
        m.wgsl.contains("x 2 rows on axis 0"),
        "rows over two images:\n{}",
        m.wgsl
    );
    let input = m
        .wgsl
        .lines()
        .find(|l| l.starts_with("//   0: %8 f32[256,8,28,28]"))
        .expect("the convolution's input is binding 0");
    assert!(input.ends_with("(uniform window)"), "{input}");
    insta::assert_snapshot!("vgg_step_b256_cpu_pooled_convolution", m.wgsl);
}
