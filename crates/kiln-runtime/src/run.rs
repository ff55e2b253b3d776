//! Running one graph once on the device, for tests and tools that compare it with the CPU
//! reference executor.

use std::collections::HashMap;
use std::sync::Arc;

use kiln_compiler::{Placement, Target, compile};
use kiln_ir::{Graph, NodeId, Op};
use kiln_reference::Tensor;

use crate::gpu::{Gpu, RuntimeError};
use crate::program::{Program, download, tensor_bytes, tensor_from_bytes, upload};

/// What one run produced: every value kept in memory, by node, and the outputs by name.
pub struct GraphRun {
    /// Stored intermediate values (forward activations, input gradients, ...) by node.
    pub stored: HashMap<NodeId, Tensor>,
    pub outputs: HashMap<String, Tensor>,
    /// Kernels the graph was fused into.
    pub kernels: usize,
}

/// Compiles `graph` for `gpu`, feeds its leaves by name, runs every kernel once and reads back
/// every stored value and output.
pub fn run_graph(
    gpu: &Gpu,
    graph: &Graph,
    inputs: &HashMap<String, Tensor>,
    params: &HashMap<String, Tensor>,
) -> Result<GraphRun, RuntimeError> {
    run_graph_on(gpu, &gpu.target, graph, inputs, params)
}

/// [`run_graph`] with kernels compiled for `target` instead of the device's own: how the
/// tests run another device class's schedule (or the unblocked one) on the device at hand.
/// `target` must not promise more than the device's limits.
pub fn run_graph_on(
    gpu: &Gpu,
    target: &Target,
    graph: &Graph,
    inputs: &HashMap<String, Tensor>,
    params: &HashMap<String, Tensor>,
) -> Result<GraphRun, RuntimeError> {
    let compiled = compile(graph, target).map_err(|e| RuntimeError::Setup(e.to_string()))?;
    let launch = compiled.launch();
    let mut external: HashMap<String, Arc<wgpu::Buffer>> = HashMap::new();
    for (id, node) in graph.iter() {
        let (feeds, kind, name) = match &node.op {
            Op::Input { name } => (inputs, "input", name),
            Op::Param { name } => (params, "param", name),
            _ => continue,
        };
        let t = feeds.get(name).ok_or_else(|| {
            RuntimeError::Setup(format!("no value fed for {kind} `{name}` ({})", node.ty))
        })?;
        if t.ty() != node.ty {
            return Err(RuntimeError::Setup(format!(
                "{kind} `{name}` is declared {} but was fed {}",
                node.ty,
                t.ty()
            )));
        }
        let packed = compiled.plan.buffer(id).is_some_and(|b| b.packed_u8);
        let mut bytes = tensor_bytes(t, packed);
        // A buffer read through windows extends past its data, so that the last chunk's
        // aligned window stays inside it (`Chunks::window_slack`).
        if let Some(b) = compiled.plan.buffer_of[id.0] {
            let needed = launch.buffer_bytes[b] as usize;
            bytes.resize(bytes.len().max(needed), 0);
        }
        external.insert(name.clone(), upload(gpu, name, &bytes)?);
    }
    let program = Program::new(gpu, compiled, &external)?;
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    {
        let mut pass = enc.begin_compute_pass(&Default::default());
        program.record(&mut pass);
    }
    gpu.queue.submit([enc.finish()]);
    gpu.wait()?;
    gpu.check(&format!("running graph `{}`", graph.name))?;
    let plan = &program.compiled.plan;
    let read = |id: NodeId| -> Result<Tensor, RuntimeError> {
        let b = plan.buffer_of[id.0].expect("stored nodes and leaves have buffers");
        let buf = &plan.buffers[b];
        let bytes = download(
            gpu,
            program.buffer_at(b),
            0,
            buf.bytes(),
            &format!("{id} of `{}`", graph.name),
        )?;
        Ok(tensor_from_bytes(&bytes, graph.ty(id), buf.packed_u8))
    };
    let mut stored = HashMap::new();
    for (id, _) in graph.iter() {
        if matches!(
            plan.placement[id.0],
            Placement::Stored | Placement::Side { .. }
        ) {
            stored.insert(id, read(id)?);
        }
    }
    let mut outputs = HashMap::new();
    for o in graph.outputs() {
        outputs.insert(o.name.clone(), read(o.node)?);
    }
    Ok(GraphRun {
        stored,
        outputs,
        kernels: plan.kernels.len(),
    })
}
