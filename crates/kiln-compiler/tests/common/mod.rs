//! What the interpreter tests share: deterministic inputs for a step graph, the tolerance
//! they compare with, and the model zoo.
#![allow(dead_code)]

use std::collections::HashMap;

use kiln_compiler::kir::interp::{Buffers, Value};
use kiln_compiler::{Access, Compiled};
use kiln_ir::{DType, Graph, Model, NodeId, parse_file};
use kiln_reference::{Data, Tensor};

/// Within this much of the reference relative to its size: the interpreter adds in f32 in
/// loop order, the reference in f64.
pub const TOLERANCE: f64 = 1e-4;

pub fn noise(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed ^ 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

/// Inputs and parameters for `g`: pixels, labels below `classes`, batch indices inside the
/// data set, weights in [-0.5, 0.5), optimizer state positive (Adam's second moment is
/// square-rooted, its step count starts the bias correction).
pub fn feeds(
    g: &Graph,
    seed: u64,
    classes: usize,
) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let rows = g
        .inputs()
        .find(|(_, n, _)| n.starts_with("dataset."))
        .map_or(1, |(_, _, t)| t.shape[0]);
    let mut inputs = HashMap::new();
    for (k, (_, name, ty)) in g.inputs().enumerate() {
        let r = noise(seed + k as u64, ty.numel());
        let shape = ty.shape.clone();
        let t = match ty.dtype {
            DType::F32 => Tensor::from_f32(shape, r.iter().map(|v| v - 0.5).collect()),
            DType::U8 if name.contains("label") => Tensor::from_u8(
                shape,
                r.iter().map(|v| (v * classes as f32) as u8).collect(),
            ),
            DType::U8 => Tensor::from_u8(shape, r.iter().map(|v| (v * 256.0) as u8).collect()),
            DType::U32 => {
                Tensor::from_u32(shape, r.iter().map(|v| (v * rows as f32) as u32).collect())
            }
            DType::I32 => Tensor::from_i32(
                shape,
                r.iter().map(|v| (v * classes as f32) as i32).collect(),
            ),
        };
        inputs.insert(name.to_string(), t.unwrap());
    }
    let mut params = HashMap::new();
    for (k, (_, name, ty)) in g.params().enumerate() {
        let r = noise(seed * 7 + 100 + k as u64, ty.numel());
        let v: Vec<f32> = if name == "optim.step" {
            vec![3.0; ty.numel()]
        } else if name.starts_with("optim.") {
            r.iter().map(|v| 0.1 + v).collect()
        } else {
            r.iter().map(|v| v - 0.5).collect()
        };
        params.insert(
            name.to_string(),
            Tensor::from_f32(ty.shape.clone(), v).unwrap(),
        );
    }
    (inputs, params)
}

/// Equal integers; floats within [`TOLERANCE`], NaN where the reference is NaN.
pub fn close(got: Value, want: Value) -> bool {
    match (got, want) {
        (Value::F32(g), Value::F32(w)) => {
            (g.is_nan() && w.is_nan())
                || (f64::from(g) - f64::from(w)).abs() <= TOLERANCE * (1.0 + f64::from(w).abs())
        }
        _ => got == want,
    }
}

/// The zoo's models (`tests/zoo/*.kir`), by file name, in name order.
pub fn zoo() -> Vec<(String, Model)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/zoo");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "kir"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            (name, parse_file(&p).unwrap().into())
        })
        .collect()
}

/// A tensor as the scalars of its buffer: u8 packed four to a `u32` word little-endian, and
/// room to whole `vec4`s (what a uniform binding of it reads).
pub fn words(t: &Tensor, packed: bool) -> Vec<Value> {
    let mut out: Vec<Value> = match t.data() {
        Data::Float(v) => v.iter().map(|&x| Value::F32(x)).collect(),
        Data::U8(v) if packed => v
            .chunks(4)
            .map(|c| {
                let mut w = [0u8; 4];
                w[..c.len()].copy_from_slice(c);
                Value::U32(u32::from_le_bytes(w))
            })
            .collect(),
        Data::U8(v) => v.iter().map(|&x| Value::U32(u32::from(x))).collect(),
        Data::U32(v) => v.iter().map(|&x| Value::U32(x)).collect(),
        Data::I32(v) => v.iter().map(|&x| Value::I32(x)).collect(),
    };
    let fill = out.first().copied().unwrap_or(Value::F32(0.0));
    while out.len() % 4 != 0 || out.is_empty() {
        out.push(fill);
    }
    out
}

/// The buffers kernel `k` of `compiled` runs over: each binding's global holding what the
/// kernel reads from it (all of it, for a window), else `fill` of its dtype; split uniform
/// parts one global each. Also each binding's whole data by global name.
pub fn bind(
    compiled: &Compiled,
    k: usize,
    value_of: &dyn Fn(NodeId) -> Tensor,
    fill: &dyn Fn(DType) -> Value,
) -> (Buffers, Vec<(String, Vec<Value>)>) {
    let plan = &compiled.plan;
    let (kernel, module) = (&plan.kernels[k], &compiled.modules[k]);
    let mut buffers = Buffers::new();
    let mut whole = Vec::new();
    for b in &module.bindings {
        let buf = &plan.buffers[b.buffer];
        let read = kernel
            .reads
            .iter()
            .find(|r| plan.buffer_of[r.0] == Some(b.buffer));
        let data = match read {
            Some(&r) => words(&value_of(r), buf.packed_u8),
            None => vec![fill(buf.ty.dtype); (buf.bytes() / 4).max(4) as usize],
        };
        match b.access {
            Access::Split { parts, part_bytes } => {
                let per = (part_bytes / 4) as usize;
                for p in 0..parts as usize {
                    let mut part =
                        data[(p * per).min(data.len())..((p + 1) * per).min(data.len())].to_vec();
                    part.resize(part.len().div_ceil(4).max(1) * 4, Value::F32(0.0));
                    buffers.insert(format!("buf{}_{p}", b.binding), part);
                }
            }
            _ => {
                buffers.insert(format!("buf{}", b.binding), data.clone());
            }
        }
        whole.push((format!("buf{}", b.binding), data));
    }
    (buffers, whole)
}
