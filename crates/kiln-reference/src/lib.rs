//! kiln's CPU reference executor: runs a graph op by op in plain Rust (f32 values, f64
//! accumulation; or all-f64 for gradient checks). It defines what each IR op means and is the
//! oracle for every GPU kernel and every fusion.

mod exec;
mod tensor;

pub use exec::{ExecError, Values, eval, execute};
pub use tensor::{Data, Real, ShapeMismatch, Tensor};
