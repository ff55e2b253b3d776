//! The IDX reader and the Fashion-MNIST loader against small crafted files, good and bad.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use flate2::Compression;
use flate2::write::GzEncoder;
use kiln_data::{DataError, load, load_split, locate, read_idx};
use proptest::prelude::*;

fn idx(type_code: u8, dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, type_code, dims.len() as u8];
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    v.extend(payload);
    v
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn images(count: u32, side: u32) -> Vec<u8> {
    let payload: Vec<u8> = (0..count * side * side).map(|i| (i % 251) as u8).collect();
    idx(0x08, &[count, side, side], &payload)
}

fn labels(values: &[u8]) -> Vec<u8> {
    idx(0x08, &[values.len() as u32], values)
}

fn err(path: &Path, ndims: usize) -> String {
    read_idx(path, ndims).unwrap_err().to_string()
}

#[test]
fn reads_raw_and_gzip_alike() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = idx(0x08, &[2, 3], &[1, 2, 3, 4, 5, 6]);
    let raw = read_idx(&write(dir.path(), "a", &bytes), 2).unwrap();
    let zipped = read_idx(&write(dir.path(), "a.gz", &gz(&bytes)), 2).unwrap();
    assert_eq!(raw.dims, [2, 3]);
    assert_eq!(raw.data, [1, 2, 3, 4, 5, 6]);
    assert_eq!(raw, zipped);
    // Compression is detected from content, not from the name.
    assert_eq!(
        read_idx(&write(dir.path(), "b", &gz(&bytes)), 2).unwrap(),
        raw
    );
}

#[test]
fn header_problems_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = write(d, "magic", &[1, 2, 8, 1, 0, 0, 0, 0]);
    assert_eq!(
        err(&p, 1),
        format!(
            "{}: not an IDX file: magic number starts 01 02, expected 00 00",
            p.display()
        )
    );
    let p = write(d, "f32", &idx(0x0D, &[1], &[0; 4]));
    assert_eq!(
        err(&p, 1),
        format!(
            "{}: element type 0x0d (f32) is not supported; expected 0x08 (u8)",
            p.display()
        )
    );
    let p = write(d, "dims", &labels(&[1, 2]));
    assert_eq!(
        err(&p, 3),
        format!(
            "{}: has 1 dimension(s), expected 3 (magic number 0x00000801)",
            p.display()
        )
    );
    let p = write(d, "short", &[0, 0]);
    assert_eq!(
        err(&p, 1),
        format!(
            "{}: truncated: 2 byte(s), too short for an IDX header",
            p.display()
        )
    );
    let p = write(d, "short-dims", &[0, 0, 8, 3, 0, 0, 0, 1, 0, 0]);
    assert_eq!(
        err(&p, 3),
        format!("{}: truncated in the header, at dimension 1", p.display())
    );
}

#[test]
fn payload_length_must_match_dimensions() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let full = images(2, 28);
    let p = write(d, "truncated", &full[..full.len() - 10]);
    assert_eq!(
        err(&p, 3),
        format!(
            "{}: truncated: dimensions [2, 28, 28] promise 1568 byte(s) of data, the file holds 1558",
            p.display()
        )
    );
    let mut long = full.clone();
    long.push(7);
    let p = write(d, "trailing", &long);
    assert!(
        err(&p, 3)
            .ends_with("trailing data after the 1568 byte(s) that dimensions [2, 28, 28] promise")
    );
    let p = write(d, "truncated.gz", &gz(&full[..100]));
    assert!(
        err(&p, 3).contains("truncated: dimensions [2, 28, 28] promise 1568"),
        "{}",
        err(&p, 3)
    );
}

#[test]
fn corrupt_gzip_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let zipped = gz(&images(50, 28));
    // Cut the compressed stream short.
    let p = write(dir.path(), "cut.gz", &zipped[..zipped.len() / 2]);
    let e = err(&p, 3);
    assert!(
        e.starts_with(&p.display().to_string()) && e.contains("truncated"),
        "{e}"
    );
    // Flip bytes in the middle of the deflate stream.
    let mut bad = zipped.clone();
    for b in &mut bad[40..60] {
        *b ^= 0x5a;
    }
    let p = write(dir.path(), "flipped.gz", &bad);
    let e = err(&p, 3);
    assert!(e.starts_with(&p.display().to_string()), "{e}");
    // A damaged CRC in the gzip trailer is caught after the whole payload was read.
    let mut crc = zipped.clone();
    let n = crc.len();
    crc[n - 8] ^= 0xff;
    let p = write(dir.path(), "crc.gz", &crc);
    let e = err(&p, 3);
    assert!(e.contains("corrupt compressed data"), "{e}");
}

#[test]
fn lying_header_is_rejected_without_allocating_its_claim() {
    // 2^31 images of 28x28 would be 1.6 TB; the file is 1 KB. The read must fail at once.
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "liar",
        &idx(0x08, &[1 << 31, 28, 28], &[0; 1000]),
    );
    let start = Instant::now();
    let e = err(&p, 3);
    assert!(
        e.contains("promise 1683627180032 byte(s) of data, the file holds 1000"),
        "{e}"
    );
    assert!(start.elapsed().as_secs() < 5);
    let p = write(
        dir.path(),
        "overflow",
        &idx(0x08, &[u32::MAX, u32::MAX, u32::MAX], &[]),
    );
    assert!(err(&p, 3).ends_with("are too large"), "{}", err(&p, 3));
}

#[test]
fn split_checks_side_counts_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = write(d, "img", &images(3, 28));
    let good = load_split(&img, &write(d, "lab", &labels(&[0, 9, 4]))).unwrap();
    assert_eq!((good.count, good.rows, good.cols), (3, 28, 28));
    assert_eq!(good.labels, [0, 9, 4]);
    assert_eq!(good.image(1)[0], (784 % 251) as u8);

    let lab2 = write(d, "lab2", &labels(&[0, 1]));
    assert_eq!(
        load_split(&img, &lab2).unwrap_err().to_string(),
        format!(
            "{} holds 3 images but {} holds 2 labels",
            img.display(),
            lab2.display()
        )
    );
    let bad_label = write(d, "lab10", &labels(&[0, 10, 1]));
    assert_eq!(
        load_split(&img, &bad_label).unwrap_err().to_string(),
        format!(
            "{}: label 10 of example 1 is not one of the 10 classes",
            bad_label.display()
        )
    );
    let small = write(d, "small", &images(3, 14));
    assert!(
        load_split(&small, &lab2)
            .unwrap_err()
            .to_string()
            .ends_with("images are 14x14, Fashion-MNIST's are 28x28")
    );
}

#[test]
fn load_and_locate_a_crafted_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "train-images-idx3-ubyte.gz", &gz(&images(4, 28)));
    write(d, "train-labels-idx1-ubyte", &labels(&[1, 2, 3, 4]));
    write(d, "t10k-images-idx3-ubyte", &images(2, 28));
    assert!(matches!(locate(Some(d)), Err(DataError::NotFound { .. })));
    let e = locate(Some(d)).unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "{} (--data): missing t10k-labels-idx1-ubyte",
            d.display()
        )),
        "{e}"
    );
    assert!(e.contains("apt-get install dataset-fashion-mnist"), "{e}");

    write(d, "t10k-labels-idx1-ubyte.gz", &gz(&labels(&[7, 8])));
    assert_eq!(locate(Some(d)).unwrap(), d);
    let data = load(d).unwrap();
    assert_eq!((data.train.count, data.test.count), (4, 2));
    assert_eq!(data.test.labels, [7, 8]);
    assert_eq!(data.train.truncated(3).labels, [1, 2, 3]);
    assert_eq!(data.train.truncated(3).images.len(), 3 * 784);

    let nowhere = d.join("nope");
    let e = locate(Some(&nowhere)).unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "{} (--data): no such directory",
            nowhere.display()
        )),
        "{e}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Random damage to a valid file (gzip or raw) never panics: it either reads back as a
    /// well-formed array or fails with an error that names the file.
    #[test]
    fn mutated_files_never_panic(
        zip in any::<bool>(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<usize>()),
        random in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let plain = images(3, 28);
        let mut bytes = random.unwrap_or_else(|| if zip { gz(&plain) } else { plain });
        if !bytes.is_empty() {
            for (at, v) in edits {
                let i = at % bytes.len();
                bytes[i] = v;
            }
        }
        if let Some(c) = cut {
            bytes.truncate(c % (bytes.len() + 1));
        }
        let p = write(dir.path(), "f", &bytes);
        match read_idx(&p, 3) {
            Ok(a) => prop_assert_eq!(a.data.len(), a.dims.iter().product::<usize>()),
            Err(e) => prop_assert!(e.to_string().starts_with(&p.display().to_string())),
        }
    }
}
