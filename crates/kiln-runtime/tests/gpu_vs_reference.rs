//! Every kernel of LeNet's training step and evaluation graph on the GPU against the CPU
//! reference executor, on the same inputs.

mod common;

use common::{compare, gpu};
use kiln_autodiff::{evaluation_graph, read_batches_from_dataset, training_step};
use kiln_ir::{DType, TensorType, lenet};

#[test]
fn lenet_step_matches_reference() {
    let Some(gpu) = gpu() else { return };
    let fwd = lenet()
        .build("lenet", TensorType::new(DType::U8, [6, 1, 28, 28]))
        .unwrap();
    let step = read_batches_from_dataset(&training_step(&fwd, 0.9).unwrap(), 20).unwrap();
    let report = compare(&gpu, &step, 1, 10, 1e-4);
    eprintln!("{report:?}");
}
