//! Checkpoints: a model's parameters in safetensors, under PyTorch's names and layouts (conv
//! weights OIHW, linear weights `[out, in]`, `0.weight`, `0.bias`, ...), so d2l's PyTorch
//! `nn.Sequential` LeNet loads one with `load_state_dict(safetensors.torch.load_file(path))`.
//! Writes go to a temporary file that is renamed into place: a reader never sees half a file,
//! and an interrupted save leaves the previous checkpoint intact.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use kiln_ir::{DType, Graph, TensorType};
use kiln_reference::Tensor;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// A checkpoint that cannot be written, read or used; each names the file or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a valid safetensors file: {message}", path.display())]
    Format { path: PathBuf, message: String },
    #[error("{}: tensor `{name}` {problem}", path.display())]
    Mismatch {
        path: PathBuf,
        name: String,
        problem: String,
    },
}

/// Names of optimizer-state tensors start with this (`optimizer.state.0.weight.exp_avg`): the
/// rest is the parameter's name and PyTorch's key in `optimizer.state_dict()["state"][i]`.
pub const OPTIMIZER_PREFIX: &str = "optimizer.state.";

/// Parameters (and optimizer state, under [`OPTIMIZER_PREFIX`]) and free-form metadata (model
/// IR text, epoch, seed, metrics).
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub params: HashMap<String, Tensor>,
    pub metadata: BTreeMap<String, String>,
}

/// Writes `params` (f32) and `metadata` to `path` atomically (temporary file + rename).
pub fn save(
    path: &Path,
    params: &HashMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<(), CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut names: Vec<&String> = params.keys().collect();
    names.sort();
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = names
        .iter()
        .map(|n| {
            let t = &params[*n];
            let data = t
                .as_f32()
                .map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect())
                .unwrap_or_default();
            ((*n).clone(), data, t.shape().to_vec())
        })
        .collect();
    let mut views = Vec::with_capacity(bytes.len());
    for (name, data, shape) in &bytes {
        let view = TensorView::new(Dtype::F32, shape.clone(), data).map_err(|e| {
            CheckpointError::Mismatch {
                path: path.to_path_buf(),
                name: name.clone(),
                problem: format!("cannot be stored: {e}"),
            }
        })?;
        views.push((name.clone(), view));
    }
    let info: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let encoded =
        safetensors::tensor::serialize(views, Some(info)).map_err(|e| CheckpointError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, &encoded).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads a checkpoint. Only f32 tensors are accepted (kiln's parameters are f32).
pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    load_bytes(path, &bytes)
}

/// Parses checkpoint content already in memory; errors name `path` as the source. This is the
/// entry point of the fuzz target.
pub fn load_bytes(path: &Path, bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
    let bytes = bytes.to_vec();
    let format = |message: String| CheckpointError::Format {
        path: path.to_path_buf(),
        message,
    };
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| format(e.to_string()))?;
    let metadata: BTreeMap<String, String> = header
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let file = SafeTensors::deserialize(&bytes).map_err(|e| format(e.to_string()))?;
    let mut params = HashMap::new();
    for (name, view) in file.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(CheckpointError::Mismatch {
                path: path.to_path_buf(),
                name,
                problem: format!("has dtype {:?}; kiln parameters are F32", view.dtype()),
            });
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let t = Tensor::from_f32(view.shape().to_vec(), values)
            .map_err(|e| format(format!("tensor `{name}`: {e}")))?;
        params.insert(name, t);
    }
    Ok(Checkpoint { params, metadata })
}

/// Checks a checkpoint against a model graph: every parameter present with the model's shape
/// and dtype, nothing extra (optimizer state aside). Returns the parameters ready to use.
pub fn matching_params(
    path: &Path,
    ckpt: &Checkpoint,
    graph: &Graph,
) -> Result<HashMap<String, Tensor>, CheckpointError> {
    let mismatch = |name: &str, problem: String| CheckpointError::Mismatch {
        path: path.to_path_buf(),
        name: name.to_string(),
        problem,
    };
    let wanted: HashMap<&str, &TensorType> = graph.params().map(|(_, n, t)| (n, t)).collect();
    for (_, name, ty) in graph.params() {
        let t = ckpt
            .params
            .get(name)
            .ok_or_else(|| mismatch(name, format!("is missing; the model needs {ty}")))?;
        if t.ty() != *ty {
            return Err(mismatch(
                name,
                format!("is {} but the model needs {ty}", t.ty()),
            ));
        }
    }
    let mut extra: Vec<&String> = ckpt
        .params
        .keys()
        .filter(|n| !wanted.contains_key(n.as_str()) && !n.starts_with(OPTIMIZER_PREFIX))
        .collect();
    extra.sort();
    if let Some(n) = extra.first() {
        return Err(mismatch(n, "is not a parameter of this model".into()));
    }
    debug_assert!(graph.params().all(|(_, _, t)| t.dtype == DType::F32));
    Ok(ckpt
        .params
        .iter()
        .filter(|(n, _)| wanted.contains_key(n.as_str()))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::lenet;

    fn lenet_params() -> (Graph, HashMap<String, Tensor>) {
        let g = lenet()
            .build("lenet", TensorType::f32([1, 1, 28, 28]))
            .unwrap();
        let p = g
            .params()
            .map(|(_, n, t)| {
                let v = (0..t.numel()).map(|i| i as f32 * 0.001 - 0.3).collect();
                (n.to_string(), Tensor::from_f32(t.shape.clone(), v).unwrap())
            })
            .collect();
        (g, p)
    }

    #[test]
    fn round_trips_with_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lenet.safetensors");
        let (g, p) = lenet_params();
        let meta = BTreeMap::from([
            ("epoch".to_string(), "3".to_string()),
            ("ir".to_string(), kiln_ir::print(&g)),
        ]);
        save(&path, &p, &meta).unwrap();
        let c = load(&path).unwrap();
        assert_eq!(c.params, p);
        assert_eq!(c.metadata, meta);
        assert_eq!(matching_params(&path, &c, &g).unwrap(), p);
        assert!(!dir.path().join("lenet.safetensors.tmp").exists());
        // The header is safetensors' JSON: names, dtype F32 and PyTorch's OIHW shape.
        let bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
        assert!(
            header.contains(r#""0.weight":{"dtype":"F32","shape":[6,1,5,5]"#),
            "{header}"
        );
    }

    #[test]
    fn mismatches_name_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let (g, mut p) = lenet_params();
        p.insert(
            "7.weight".into(),
            Tensor::from_f32([120, 401], vec![0.0; 120 * 401]).unwrap(),
        );
        save(&path, &p, &BTreeMap::new()).unwrap();
        let e = matching_params(&path, &load(&path).unwrap(), &g)
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("tensor `7.weight` is f32[120,401] but the model needs f32[120,400]"),
            "{e}"
        );
        p.remove("7.weight");
        save(&path, &p, &BTreeMap::new()).unwrap();
        let e = matching_params(&path, &load(&path).unwrap(), &g)
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("tensor `7.weight` is missing; the model needs f32[120,400]"),
            "{e}"
        );
        let (_, mut p) = lenet_params();
        p.insert(
            "12.weight".into(),
            Tensor::from_f32([1], vec![0.0]).unwrap(),
        );
        save(&path, &p, &BTreeMap::new()).unwrap();
        let e = matching_params(&path, &load(&path).unwrap(), &g)
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("tensor `12.weight` is not a parameter of this model"),
            "{e}"
        );
    }

    #[test]
    fn corrupt_and_missing_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: not a valid safetensors file", path.display())),
            "{e}"
        );
        let e = load(&dir.path().join("none.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.safetensors"), "{e}");
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn valid_file() -> Vec<u8> {
        let p = HashMap::from([
            (
                "0.weight".to_string(),
                Tensor::from_f32([2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap(),
            ),
            (
                "0.bias".to_string(),
                Tensor::from_f32([2], vec![0.5, -0.5]).unwrap(),
            ),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.safetensors");
        save(&path, &p, &BTreeMap::from([("epoch".into(), "1".into())])).unwrap();
        std::fs::read(&path).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Random bytes and random damage to a valid checkpoint never panic: the loader either
        /// returns well-formed tensors or an error naming the file.
        #[test]
        fn damaged_checkpoints_never_panic(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            cut in proptest::option::of(any::<usize>()),
            random in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
        ) {
            let mut bytes = random.unwrap_or_else(valid_file);
            if !bytes.is_empty() {
                for (at, v) in edits {
                    let i = at % bytes.len();
                    bytes[i] = v;
                }
            }
            if let Some(c) = cut {
                bytes.truncate(c % (bytes.len() + 1));
            }
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f.safetensors");
            std::fs::write(&path, &bytes).unwrap();
            match load(&path) {
                Ok(c) => {
                    for t in c.params.values() {
                        prop_assert_eq!(t.as_f32().unwrap().len(), t.shape().iter().product::<usize>());
                    }
                }
                Err(e) => prop_assert!(e.to_string().starts_with(&path.display().to_string())),
            }
        }
    }
}
