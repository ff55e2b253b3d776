//! kiln's wgpu runtime: opens a device, turns compiled plans into pipelines and bind groups
//! created once, and runs the SGD training loop with the data set resident on the device.

mod gpu;
mod infer;
mod logging;
mod program;
mod run;
mod trainer;

pub use gpu::{Gpu, RuntimeError, target_for};
pub use infer::{Inference, infer};
pub use logging::init_logging;
pub use program::{
    KernelTiming, Profile, Program, check_limits, download, tensor_bytes, tensor_from_bytes, upload,
};
pub use run::{GraphRun, run_graph, run_graph_on};
pub use trainer::GpuTrainer;
