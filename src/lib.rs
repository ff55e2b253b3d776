//! kiln: a static-graph compiler for training small neural networks on any GPU.
//!
//! A model (a [`Sequential`] like PyTorch's `nn.Sequential`, or IR text) becomes a graph with
//! every shape inferred; kiln derives the backward pass and the optimizer's update, fuses the
//! training step into a few WGSL kernels specialised to the shapes and the device, and runs
//! them through wgpu with the data set resident on the device. [`Trainer`] is the whole path:
//!
//! ```
//! use kiln::{Conv2d, Gpu, Layer, Optimizer, Sequential, Split, TrainConfig, Trainer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = Sequential::new()
//!     .append(Conv2d::new(1, 8, 3).padding(1))
//!     .append(Layer::ReLU)
//!     .append(Layer::max_pool2d(2, 2))
//!     .append(Layer::Flatten)
//!     .append(Layer::linear(8 * 14 * 14, 10));
//! // 64 stand-in 28x28 images (use kiln::data::load for Fashion-MNIST).
//! let split = Split {
//!     count: 64,
//!     rows: 28,
//!     cols: 28,
//!     images: (0..64 * 784).map(|i| (i * 7 % 251) as u8).collect(),
//!     labels: (0..64).map(|i| (i % 10) as u8).collect(),
//! };
//! let Ok(gpu) = Gpu::new() else { return Ok(()) }; // no adapter here: nothing to show
//! let config = TrainConfig {
//!     batch_size: 32,
//!     optimizer: Optimizer::adam(1e-3),
//!     ..TrainConfig::default()
//! };
//! let mut trainer = Trainer::new(&gpu, model, &split, &split, config)?;
//! let reports = trainer.fit(2, |r| println!("epoch {}: loss {:.3}", r.epoch, r.train.loss()))?;
//! assert_eq!(reports.len(), 2);
//! let probabilities = trainer.predict(split.image(0))?;
//! assert_eq!(probabilities[0].len(), 10);
//! # Ok(())
//! # }
//! ```
//!
//! The stage crates are here too, for finer control: [`ir`] (graphs, text form, `Sequential`),
//! [`autodiff`] (gradients, training step, optimizers), [`compiler`] (fusion, WGSL),
//! [`runtime`] (wgpu), [`reference`](mod@reference) (the CPU oracle), [`train`] (initialisation, the CPU
//! trainer), [`data`] (Fashion-MNIST), [`checkpoint`] (safetensors). ARCHITECTURE.md maps them.

mod trainer;

pub use kiln_autodiff as autodiff;
pub use kiln_checkpoint as checkpoint;
pub use kiln_compiler as compiler;
pub use kiln_data as data;
pub use kiln_ir as ir;
pub use kiln_reference as reference;
pub use kiln_runtime as runtime;
pub use kiln_train as train;

pub use kiln_autodiff::Optimizer;
pub use kiln_data::{FashionMnist, Split};
pub use kiln_ir::{Conv2d, Layer, LenetVariant, Model, Sequential, lenet};
pub use kiln_reference::Tensor;
pub use kiln_runtime::Gpu;
pub use kiln_train::Stats;
pub use trainer::{EpochReport, Error, TrainConfig, Trainer};
