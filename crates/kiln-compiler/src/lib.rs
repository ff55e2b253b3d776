//! kiln's back half: fusion of a step graph into kernels ([`fuse`]), their order, the plan
//! verifier ([`verify_plan`]) and WGSL generation ([`emit_wgsl`]), validated by naga;
//! [`compile`] runs them all. [`backends`] translates the validated kernels to SPIR-V, MSL and
//! HLSL.

pub mod backends;
mod bind;
mod blocking;
mod chunks;
mod compile;
pub mod compute;
mod conv_quads;
mod elements;
mod head;
mod interface;
pub mod kir;
mod launch;
mod lower;
mod nest;
mod plan;
mod report;
mod schedule;
mod spans;
mod target;
mod text;
mod trips;
mod uniform_control;
mod verify_plan;
mod wgsl;

pub use chunks::{ChunkEntry, Chunks, Span, Sum, Window};
pub use compile::{CompileError, Compiled, compile};
pub use interface::{LayoutEntry, Slot};
pub use launch::{
    BoundResource, Dispatch, KernelLaunch, Launch, Resource, Scratch, ScratchContents, launch,
};
pub use plan::{
    Buffer, BufferKind, FuseError, Head, Kernel, KernelKind, MAX_HEAD_CLASSES, MAX_INLINE_READS,
    MAX_INLINE_REUSE, Placement, Plan, fuse, is_anchor,
};
pub use report::{KernelCost, describe, kernel_cost, node_flops};
pub use schedule::recipes;
pub use target::{DeviceClass, LAVAPIPE_LOOP_ITERATIONS, Target};
pub use trips::Loads;
pub use verify_plan::{PlanError, verify_plan};
pub use wgsl::{
    Access, Binding, CodegenError, KernelModule, NagaModule, emit_kernel, emit_validated,
    emit_wgsl, validate_kernel, validate_wgsl,
};
