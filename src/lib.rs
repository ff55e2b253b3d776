//! kiln: a static-graph compiler for training small neural networks on any GPU.
//!
//! This crate is the facade over the stage crates; see ARCHITECTURE.md for the map.

pub use kiln_autodiff as autodiff;
pub use kiln_checkpoint as checkpoint;
pub use kiln_compiler as compiler;
pub use kiln_data as data;
pub use kiln_ir as ir;
pub use kiln_reference as reference;
pub use kiln_runtime as runtime;
pub use kiln_train as train;
