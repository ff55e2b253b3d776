//! Data sets for kiln: a validating IDX reader and Fashion-MNIST discovery and loading.
//! Images stay u8 in host memory; scaling to [0, 1] is the compiled graph's job.

mod fashion;
mod idx;

use std::fmt::Write as _;
use std::path::PathBuf;

pub use fashion::{
    CLASS_NAMES, DEBIAN_DIR, ENV_VAR, FashionMnist, LOCAL_DIR, SIDE, Searched, Split, load,
    load_split, locate,
};
pub use idx::{IdxArray, read_idx, read_idx_bytes};

/// A data file that cannot be found, read or trusted. Every variant names the file(s).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {problem}", path.display())]
    Format { path: PathBuf, problem: String },
    #[error(
        "{} holds {image_count} images but {} holds {label_count} labels",
        images.display(),
        labels.display()
    )]
    CountMismatch {
        images: PathBuf,
        image_count: usize,
        labels: PathBuf,
        label_count: usize,
    },
    #[error("{}", not_found_message(searched))]
    NotFound { searched: Vec<Searched> },
}

fn not_found_message(searched: &[Searched]) -> String {
    let mut m = String::from("Fashion-MNIST not found. Looked in:\n");
    for s in searched {
        let _ = writeln!(m, "  {} ({}): {}", s.dir.display(), s.source, s.problem);
    }
    m.push_str(
        "Get it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs to \
         /usr/share/datasets/fashion-mnist), or download train-images-idx3-ubyte.gz, \
         train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz \
         from https://github.com/zalandoresearch/fashion-mnist (data/fashion) into \
         ./data/fashion-mnist, or point --data DIR or $FASHION_MNIST_DIR at them.",
    );
    m
}
