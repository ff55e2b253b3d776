//! The training recipe of d2l's LeNet chapter, independent of where the step runs: seeded
//! initialisation, the per-epoch data order and batching, and a trainer that runs the derived
//! step graph on the CPU reference executor (slowly, but as the oracle for the GPU runtime).

mod batches;
mod cpu;
mod init;
mod rng;

pub use batches::{batch_ranges, epoch_order};
pub use cpu::{CpuTrainer, Stats, TrainError};
pub use init::{InitError, fans, init_params};
pub use rng::{Rng, Stream};
