//! Fashion-MNIST: finding the four IDX files and loading them as u8 images and labels.

use std::path::{Path, PathBuf};

use crate::DataError;
use crate::idx::read_idx;

/// The class names in label order, as d2l's `get_fashion_mnist_labels` prints them.
pub const CLASS_NAMES: [&str; 10] = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
];

/// Image side length of Fashion-MNIST.
pub const SIDE: usize = 28;

/// The environment variable that names a data directory.
pub const ENV_VAR: &str = "FASHION_MNIST_DIR";

/// Where Debian's `dataset-fashion-mnist` package installs the files.
pub const DEBIAN_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The project-local default directory.
pub const LOCAL_DIR: &str = "data/fashion-mnist";

const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// One split: `count` images of `rows x cols` u8 pixels (row-major, image after image) and
/// their labels in `0..10`. Pixels stay u8; scaling to `[0, 1]` happens on the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Split {
    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows * self.cols;
        &self.images[i * n..(i + 1) * n]
    }

    /// The first `n` examples (all of them when `n >= count`).
    pub fn truncated(&self, n: usize) -> Split {
        let n = n.min(self.count);
        let px = self.rows * self.cols;
        Split {
            count: n,
            rows: self.rows,
            cols: self.cols,
            images: self.images[..n * px].to_vec(),
            labels: self.labels[..n].to_vec(),
        }
    }
}

/// Fashion-MNIST: 60,000 training and 10,000 test examples.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FashionMnist {
    pub dir: PathBuf,
    pub train: Split,
    pub test: Split,
}

/// Where the data set was looked for, and why each place did not have it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Searched {
    /// How the place was chosen: `--data`, `$FASHION_MNIST_DIR`, `default`.
    pub source: &'static str,
    pub dir: PathBuf,
    pub problem: String,
}

/// Finds the directory holding the four Fashion-MNIST files (each either `.gz` or raw).
///
/// An explicit choice is authoritative: `--data DIR` (passed as `explicit`) is the only place
/// looked at when given, then `$FASHION_MNIST_DIR` when set; otherwise `./data/fashion-mnist`,
/// then `/usr/share/datasets/fashion-mnist` (Debian's `dataset-fashion-mnist`). The error lists
/// every place looked at and how to get the files.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, DataError> {
    let env = std::env::var_os(ENV_VAR).filter(|v| !v.is_empty());
    let candidates: Vec<(&'static str, PathBuf)> = match (explicit, env) {
        (Some(dir), _) => vec![("--data", dir.to_path_buf())],
        (None, Some(dir)) => vec![("$FASHION_MNIST_DIR", PathBuf::from(dir))],
        (None, None) => vec![
            ("default", PathBuf::from(LOCAL_DIR)),
            ("default", PathBuf::from(DEBIAN_DIR)),
        ],
    };
    let mut searched = Vec::new();
    for (source, dir) in candidates {
        match missing_files(&dir) {
            None => return Ok(dir),
            Some(problem) => searched.push(Searched {
                source,
                dir,
                problem,
            }),
        }
    }
    Err(DataError::NotFound { searched })
}

fn missing_files(dir: &Path) -> Option<String> {
    if !dir.is_dir() {
        return Some("no such directory".into());
    }
    let missing: Vec<&str> = FILES
        .iter()
        .filter(|f| resolve(dir, f).is_none())
        .copied()
        .collect();
    if missing.is_empty() {
        None
    } else {
        Some(format!("missing {}", missing.join(", ")))
    }
}

/// `dir/name.gz` if present, else `dir/name`.
fn resolve(dir: &Path, name: &str) -> Option<PathBuf> {
    [dir.join(format!("{name}.gz")), dir.join(name)]
        .into_iter()
        .find(|p| p.is_file())
}

/// Loads both splits from `dir`, checking magic numbers, dimensions (28x28), that image and
/// label counts agree and that every label is one of the 10 classes.
pub fn load(dir: &Path) -> Result<FashionMnist, DataError> {
    let path = |name: &str| {
        resolve(dir, name).ok_or_else(|| DataError::NotFound {
            searched: vec![Searched {
                source: "load",
                dir: dir.to_path_buf(),
                problem: format!("missing {name}"),
            }],
        })
    };
    let train = load_split(&path(FILES[0])?, &path(FILES[1])?)?;
    let test = load_split(&path(FILES[2])?, &path(FILES[3])?)?;
    Ok(FashionMnist {
        dir: dir.to_path_buf(),
        train,
        test,
    })
}

/// Loads one split from an image file and a label file.
pub fn load_split(images_path: &Path, labels_path: &Path) -> Result<Split, DataError> {
    let images = read_idx(images_path, 3)?;
    let labels = read_idx(labels_path, 1)?;
    let [count, rows, cols] = [images.dims[0], images.dims[1], images.dims[2]];
    if rows != SIDE || cols != SIDE {
        return Err(DataError::Format {
            path: images_path.to_path_buf(),
            problem: format!("images are {rows}x{cols}, Fashion-MNIST's are {SIDE}x{SIDE}"),
        });
    }
    if labels.dims[0] != count {
        return Err(DataError::CountMismatch {
            images: images_path.to_path_buf(),
            image_count: count,
            labels: labels_path.to_path_buf(),
            label_count: labels.dims[0],
        });
    }
    if let Some((i, &l)) = labels
        .data
        .iter()
        .enumerate()
        .find(|(_, l)| **l as usize >= CLASS_NAMES.len())
    {
        return Err(DataError::Format {
            path: labels_path.to_path_buf(),
            problem: format!("label {l} of example {i} is not one of the 10 classes"),
        });
    }
    Ok(Split {
        count,
        rows,
        cols,
        images: images.data,
        labels: labels.data,
    })
}
