//! Shared helpers of the GPU tests.
#![allow(dead_code)]

use std::collections::HashMap;

use kiln_compiler::{DeviceClass, Target};
use kiln_data::Split;
use kiln_ir::{DType, Graph, NodeId};
use kiln_reference::{Tensor, execute};
use kiln_runtime::{Gpu, run_graph_on};

/// The device, or `None` (loudly) when there is none and `KILN_REQUIRE_GPU` is unset.
pub fn gpu() -> Option<Gpu> {
    match Gpu::new() {
        Ok(g) => Some(g),
        Err(e) if std::env::var_os("KILN_REQUIRE_GPU").is_none() => {
            eprintln!("SKIPPED: GPU test, no adapter: {e}");
            None
        }
        Err(e) => panic!("KILN_REQUIRE_GPU is set but no device opened: {e}"),
    }
}

/// The schedules every comparison runs, all on the device at hand: the device's own (register
/// blocked), the same without blocking, the discrete-GPU schedule (256-invocation
/// workgroups) and the CPU schedule with image chunks, so that each code path is checked
/// whatever device the tests get.
pub fn schedules(gpu: &Gpu) -> Vec<(&'static str, Target)> {
    let own = gpu.target.clone();
    vec![
        ("device", own.clone()),
        (
            "unblocked",
            Target {
                block_outputs: false,
                ..own.clone()
            },
        ),
        (
            "discrete-gpu",
            Target {
                class: DeviceClass::DiscreteGpu,
                ..own.clone()
            },
        ),
        // The CPU schedule with 20 KiB uniform bindings, so that a test batch of 8 exceeds
        // them and runs both convolutions as image chunks through uniform windows,
        // as batch 256 does with 64 KiB (see the compiler's plans tests).
        (
            "cpu-small-windows",
            Target {
                class: DeviceClass::Cpu,
                max_uniform_buffer_binding_size: 20 << 10,
                ..own
            },
        ),
    ]
}

/// Deterministic values in [lo, hi).
pub fn noise(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed ^ 0x2545_f491_4f6c_dd1d;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

/// `count` deterministic 28x28 u8 images with labels below 10, a stand-in data set.
pub fn synthetic(count: usize, seed: u64) -> Split {
    Split {
        count,
        rows: 28,
        cols: 28,
        images: noise(seed, count * 784, 0.0, 256.0)
            .iter()
            .map(|v| *v as u8)
            .collect(),
        labels: noise(seed + 1, count, 0.0, 10.0)
            .iter()
            .map(|v| *v as u8)
            .collect(),
    }
}

/// Random feeds for every leaf: f32 in [-0.5, 0.5), u8 images, labels < `classes`, indices
/// within the data set's rows.
pub fn feeds(
    g: &Graph,
    seed: u64,
    classes: usize,
) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let rows = g
        .inputs()
        .find(|(_, n, _)| n.starts_with("dataset."))
        .map(|(_, _, t)| t.shape[0])
        .unwrap_or(1);
    let mut inputs = HashMap::new();
    for (i, (_, name, ty)) in g.inputs().enumerate() {
        let n = ty.numel();
        let r = noise(seed + i as u64, n, 0.0, 1.0);
        let t = match ty.dtype {
            DType::F32 => Tensor::from_f32(ty.shape.clone(), r.iter().map(|v| v - 0.5).collect()),
            DType::U8 if name.contains("label") => Tensor::from_u8(
                ty.shape.clone(),
                r.iter().map(|v| (v * classes as f32) as u8).collect(),
            ),
            DType::U8 => Tensor::from_u8(
                ty.shape.clone(),
                r.iter().map(|v| (v * 256.0) as u8).collect(),
            ),
            DType::U32 if name == "batch.indices" => Tensor::from_u32(
                ty.shape.clone(),
                r.iter().map(|v| (v * rows as f32) as u32).collect(),
            ),
            DType::U32 => Tensor::from_u32(
                ty.shape.clone(),
                r.iter().map(|v| (v * classes as f32) as u32).collect(),
            ),
            DType::I32 => Tensor::from_i32(
                ty.shape.clone(),
                r.iter().map(|v| (v * classes as f32) as i32).collect(),
            ),
        };
        inputs.insert(name.to_string(), t.unwrap());
    }
    let params = g
        .params()
        .enumerate()
        .map(|(i, (_, name, ty))| {
            let v = noise(seed * 7 + 100 + i as u64, ty.numel(), -0.5, 0.5);
            (
                name.to_string(),
                Tensor::from_f32(ty.shape.clone(), v).unwrap(),
            )
        })
        .collect();
    (inputs, params)
}

/// Largest error of `got` against `want`, relative to `want`'s scale: |g - w| / (1 + |w|).
pub fn max_error(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.ty(), want.ty());
    match (got.as_f32(), want.as_f32()) {
        (Some(g), Some(w)) => g
            .iter()
            .zip(w)
            .map(|(a, b)| {
                if a.is_nan() && b.is_nan() {
                    0.0
                } else {
                    ((a - b).abs() / (1.0 + b.abs())) as f64
                }
            })
            .fold(0.0, f64::max),
        _ => {
            if got == want {
                0.0
            } else {
                f64::INFINITY
            }
        }
    }
}

/// Runs `g` on the GPU and on the CPU reference with the same feeds and returns the worst
/// error per stored node and output, after asserting each is within `tolerance`.
pub fn compare(
    gpu: &Gpu,
    g: &Graph,
    seed: u64,
    classes: usize,
    tolerance: f64,
) -> Vec<(String, f64)> {
    compare_on(gpu, &schedules(gpu), g, seed, classes, tolerance)
}

/// [`compare`] for the given schedules only.
pub fn compare_on(
    gpu: &Gpu,
    schedules: &[(&str, Target)],
    g: &Graph,
    seed: u64,
    classes: usize,
    tolerance: f64,
) -> Vec<(String, f64)> {
    let (inputs, params) = feeds(g, seed, classes);
    let reference = execute(g, &inputs, &params).unwrap();
    let mut report = Vec::new();
    for (schedule, target) in schedules {
        let run = run_graph_on(gpu, target, g, &inputs, &params).unwrap();
        let mut ids: Vec<&NodeId> = run.stored.keys().collect();
        ids.sort();
        for id in ids {
            let e = max_error(&run.stored[id], reference.get(*id));
            report.push((format!("{schedule}: {id} {}", g.node(*id).op.name()), e));
        }
        for o in g.outputs() {
            let e = max_error(&run.outputs[&o.name], reference.get(o.node));
            report.push((format!("{schedule}: output {}", o.name), e));
        }
    }
    for (what, e) in &report {
        assert!(
            *e <= tolerance,
            "{what}: GPU differs from the reference by {e:e} (tolerance {tolerance:e})\n{report:?}"
        );
    }
    report
}
