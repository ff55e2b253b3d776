//! kiln's graph IR: tensor ops with static shapes and dtypes in SSA form, with shape inference,
//! a verifier, a text form that round-trips exactly, and a `Sequential` model builder.
//!
//! The pipeline's first stages live here: a model ([`Sequential`], or text via [`parse`]) becomes
//! a [`Graph`] whose every node carries its inferred [`TensorType`]; [`verify`] re-checks every
//! invariant after each pass.

mod graph;
mod model;
mod op;
mod passes;
mod sequential;
#[cfg(feature = "testing")]
pub mod testing;
mod text;
mod types;
mod verify;

pub use graph::{Graph, GraphError, GraphOutput, LayerRef, Node, NodeId};
pub use model::Model;
pub use op::{AttrValue, Op, OpPattern, Scalar, op_names, without_axes};
pub use passes::{
    BATCH_INDICES, GatherInput, eliminate_common_subexpressions, eliminate_dead_code, gather_inputs,
};
pub use sequential::{
    Conv2d, Layer, LayerSummary, LenetVariant, Sequential, ShapeError, Summary, lenet, thousands,
};
pub use text::{ParseError, parse, parse_file, print};
pub use types::{DType, ShapeDisplay, TensorType};
pub use verify::{VerifyError, unused_nodes, verify};
