//! The front end and compiler on arbitrary IR text: parse, verify, derive the training step
//! (or the evaluation graph, or keep the forward graph), read its batches from a data set as
//! the trainer does, and compile for the portable and a CPU-class target. Every stage may
//! return an error; none may panic, every graph a stage returns verifies, and `compile` fails
//! only with a refusal (a device limit, an unsupported schedule), never with an error that
//! means a compiler bug (a plan its own verifier rejects, WGSL naga rejects, bindings that
//! disagree with the WGSL, uniform-steered control flow).
#![no_main]

use kiln_compiler::{CodegenError, CompileError, DeviceClass, FuseError, Target, compile};
use kiln_ir::{DType, Graph, Model, TensorType, verify};
use libfuzzer_sys::fuzz_target;

/// Bounds that keep one iteration in milliseconds: tiny models only.
const MAX_FORWARD_NODES: usize = 64;
const MAX_DERIVED_NODES: usize = 256;
const MAX_ELEMENTS: usize = 1 << 20;
/// Rows of the stand-in data set the batches are gathered from.
const DATASET_ROWS: usize = 16;

fn bounded(g: &Graph, max_nodes: usize) -> bool {
    g.nodes().len() <= max_nodes
        && g.nodes()
            .iter()
            .all(|n| n.ty.checked_numel().is_some_and(|e| e <= MAX_ELEMENTS))
}

/// A CPU-class target as the runtime makes for lavapipe (see kiln-compiler's plans tests).
fn cpu_target() -> Target {
    Target {
        name: "llvmpipe".into(),
        class: DeviceClass::Cpu,
        max_storage_buffers_per_stage: 32,
        max_uniform_buffers_per_stage: 15,
        min_uniform_buffer_offset_alignment: 32,
        subgroup_size: Some(8),
        max_loop_iterations: Some(kiln_compiler::LAVAPIPE_LOOP_ITERATIONS),
        ..Target::portable()
    }
}

fn compile_both(g: &Graph) {
    if !bounded(g, MAX_DERIVED_NODES) {
        return;
    }
    for target in [Target::portable(), cpu_target()] {
        match compile(g, &target) {
            Ok(c) => assert_eq!(c.modules.len(), c.plan.kernels.len()),
            Err(CompileError::Plan(e)) => panic!("fuse made a plan its verifier rejects: {e}"),
            Err(CompileError::Fuse(FuseError::Invalid(e))) => {
                panic!("fuse rejects a verified graph: {e}")
            }
            Err(CompileError::Codegen(
                e @ (CodegenError::Invalid { .. }
                | CodegenError::Interface { .. }
                | CodegenError::UniformControl { .. }),
            )) => panic!("code generator bug on {target}: {e}"),
            // Refusals: binding and loop limits, schedules the compiler does not support.
            Err(_) => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(forward) = kiln_ir::parse(text) else {
        return;
    };
    verify(&forward).expect("parsed graphs verify");
    if !bounded(&forward, MAX_FORWARD_NODES) {
        return;
    }
    // A text model as the trainers take it: rebuilt for another batch size of u8 images.
    let x = forward
        .inputs()
        .find(|(_, n, _)| *n == "x")
        .map(|(_, _, t)| t.clone());
    let mut forward = forward;
    if let Some(x) = x {
        let mut shape = x.shape;
        if let Some(b) = shape.first_mut() {
            *b = *b % 3 + 1;
        }
        let model = Model::Graph(forward.clone());
        if let Ok(g) = model.forward("model", TensorType::new(DType::U8, shape)) {
            verify(&g).expect("rebatched graphs verify");
            if bounded(&g, MAX_FORWARD_NODES + 1) {
                forward = g;
            }
        }
    }
    let derived = kiln_autodiff::training_step(&forward, 0.1)
        .or_else(|_| kiln_autodiff::evaluation_graph(&forward));
    match derived {
        Ok(g) => {
            verify(&g).expect("derived graphs verify");
            match kiln_autodiff::read_batches_from_dataset(&g, DATASET_ROWS) {
                Ok(d) => {
                    verify(&d).expect("data-set graphs verify");
                    compile_both(&d);
                }
                Err(_) => compile_both(&g),
            }
        }
        Err(_) => compile_both(&forward),
    }
});
