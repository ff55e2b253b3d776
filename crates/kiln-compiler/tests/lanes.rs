//! Register blocking's lane functions run on the kernel IR's interpreter against the reference
//! executor. Every function a blocked kernel evaluates four elements with
//! (`v<id>_x4s<stride>`: a convolution's or a matmul's blocked rule, pooling lanes, split-part
//! and window loads, packed pixel words, chunk parts of reductions summed chunk by chunk) and
//! every scalar element function `v<id>` is called at element indices spread over the node,
//! over buffers holding the reference values of what the kernel reads, and compared lane by
//! lane with the reference's elements `i, i + s, i + 2s, i + 3s`. Chunked kernels run with
//! their whole batch as one chunk and windows over whole buffers. This checks the CPU-class
//! and portable targets' blocked schedules at batch 256 and real channel counts without a
//! device.

mod common;

use common::{bind, close, feeds, words, zoo};
use kiln_autodiff::{Optimizer, read_batches_from_dataset, training_step_with};
use kiln_compiler::kir::interp::{Buffers, ChunkTable, EvalError, Lanes, Library, Value};
use kiln_compiler::{Target, compile};
use kiln_ir::{DType, Graph, LenetVariant, Model, NodeId, TensorType};
use kiln_reference::{Tensor, execute};

/// Element indices tried per function (evenly spread, the last included).
const SAMPLES: usize = 12;

/// What a lane function at `stride` over `shape` may be asked for: the first lanes' indices
/// such that the four lanes are elements along one axis without wrapping. Lanes on an axis of
/// that stride in fours start at a coordinate in fours; lanes a quarter of an axis apart start
/// in its first quarter; any other stride is four independent elements.
fn lane_starts(shape: &[usize], stride: usize) -> Vec<usize> {
    let numel: usize = shape.iter().product();
    let mut st = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        st[d] = st[d + 1] * shape[d + 1];
    }
    let exact = (0..shape.len()).find(|&a| st[a] == stride && shape[a] % 4 == 0);
    let quarter = (1..shape.len())
        .find(|&a| shape[a] % 4 == 0 && st[a] * (shape[a] / 4) == stride && shape[a] >= 8);
    let last = numel.saturating_sub(3 * stride + 1);
    let mut starts: Vec<usize> = (0..SAMPLES)
        .map(|k| k * last / (SAMPLES - 1).max(1))
        .map(|j| match (exact, quarter) {
            (Some(a), _) => j - ((j / st[a]) % shape[a] % 4) * st[a],
            (None, Some(a)) => {
                let q = shape[a] / 4;
                j - ((j / st[a]) % shape[a] / q) * q * st[a]
            }
            (None, None) if stride == 1 => j - j % 4,
            (None, None) => j,
        })
        .filter(|&i| i + 3 * stride < numel)
        .collect();
    starts.dedup();
    starts
}

/// The buffers of kernel `k` (`common::bind`, zeros where it reads nothing), its running
/// sums the reference's finished sums.
fn buffers(
    compiled: &kiln_compiler::Compiled,
    k: usize,
    value_of: &dyn Fn(NodeId) -> Tensor,
) -> Buffers {
    let (mut buffers, _) = bind(compiled, k, value_of, &|_| Value::F32(0.0));
    if let Some(c) = &compiled.modules[k].chunks {
        for s in &c.sums {
            buffers.insert(format!("sum{}", s.node.0), words(&value_of(s.node), false));
        }
    }
    buffers
}

/// Calls every lane and scalar element function of every kernel of `g` compiled for `target`
/// at spread indices and compares them with the reference; returns how many lane functions
/// were checked.
fn check(what: &str, g: &Graph, target: &Target) -> usize {
    let compiled = compile(g, target).unwrap();
    let (inputs, params) = feeds(g, 11, 10);
    let values = execute(g, &inputs, &params).unwrap();
    let value_of = |n: NodeId| values.get(n).clone();
    let mut lanes_checked = 0;
    for (k, module) in compiled.modules.iter().enumerate() {
        let kernel = &compiled.plan.kernels[k];
        let library = Library::new(&module.functions)
            .unwrap_or_else(|e| panic!("{what}: {}: {e}", kernel.name));
        let mut buffers = buffers(&compiled, k, &value_of);
        // One chunk over the whole batch, windows over whole buffers.
        let chunk = module.chunks.as_ref().map(|c| ChunkTable {
            first_invocation: 0,
            end_invocation: c.invocations as u32,
            first_image: 0,
            end_image: c.batch as u32,
            window_bases: vec![0; c.windows.len()],
        });
        for (name, _, _) in module.functions.iter().map(|i| i.function()) {
            let plain = name.strip_suffix("_chunk").unwrap_or(name);
            let Some(rest) = plain.strip_prefix('v') else {
                continue;
            };
            let (id, stride) = match rest.split_once("_x4s") {
                Some((id, s)) => (id.parse::<usize>(), s.parse::<usize>().ok()),
                None => (rest.parse::<usize>(), None),
            };
            let Ok(id) = id.map(NodeId) else {
                continue;
            };
            if stride.is_none() && rest.parse::<usize>().is_err() {
                continue;
            }
            let want = words(&value_of(id), false);
            let shape = &g.ty(id).shape;
            let starts = match stride {
                Some(s) => lane_starts(shape, s),
                None => lane_starts(shape, 1).into_iter().map(|i| i + 1).collect(),
            };
            for i in starts {
                let got = match library.call(name, i as u32, &[], &mut buffers, chunk.as_ref()) {
                    Ok(v) => v,
                    // A function calling into a schedule still written as text.
                    Err(EvalError::Module(m)) if m.starts_with("no function") => break,
                    Err(e) => panic!("{what}: {}: {name}({i}): {e}", kernel.name),
                };
                let lanes: Vec<(usize, Value)> = match (&got, stride) {
                    (Lanes::Vec4(l), Some(s)) => (0..4).map(|k| (i + k * s, l[k])).collect(),
                    (Lanes::Scalar(v), None) => vec![(i, *v)],
                    _ => panic!("{what}: {name} returned {got:?}"),
                };
                for (at, v) in lanes {
                    let r = match (g.ty(id).dtype, v) {
                        (DType::U8, Value::U32(x)) => Value::U32(x),
                        (_, v) => v,
                    };
                    assert!(
                        close(r, want[at]),
                        "{what}: {} {name}({i}) element {at} of {id} {}: interpreter {v:?}, reference {:?}",
                        kernel.name,
                        g.node(id).op.name(),
                        want[at]
                    );
                }
            }
            if stride.is_some() {
                lanes_checked += 1;
            }
        }
    }
    lanes_checked
}

fn step(model: &Model, name: &str, batch: usize) -> Graph {
    let forward = model
        .forward(name, TensorType::new(DType::U8, [batch, 1, 28, 28]))
        .unwrap();
    read_batches_from_dataset(
        &training_step_with(&forward, &Optimizer::from(0.1)).unwrap(),
        300,
    )
    .unwrap()
}

#[test]
fn lenet_lane_functions_match_reference_on_both_targets() {
    // d2l's LeNet at batch 256, the variants at 96 (the snapshots' two batches).
    for v in LenetVariant::ALL {
        let batch = if v == LenetVariant::Lenet { 256 } else { 96 };
        let g = step(&v.model().into(), "lenet", batch);
        for target in [Target::lavapipe(), Target::portable()] {
            let what = format!("{v:?} on {target}");
            let n = check(&what, &g, &target);
            assert!(n >= 10, "{what}: only {n} lane functions checked");
        }
    }
}

#[test]
fn zoo_lane_functions_match_reference_on_both_targets() {
    for (name, model) in zoo() {
        let g = step(&model, &name, 64);
        for target in [Target::lavapipe(), Target::portable()] {
            let what = format!("{name} on {target}");
            let n = check(&what, &g, &target);
            assert!(n > 0, "{what}: no lane function checked");
        }
    }
}
