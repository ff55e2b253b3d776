//! The IDX file format (LeCun's MNIST format), raw or gzip-compressed.
//!
//! Layout: two zero bytes, an element-type byte (0x08 = u8), a dimension count, the dimensions
//! as big-endian u32, then the elements in row-major order. Only u8 data is supported, which is
//! what MNIST and Fashion-MNIST use. Nothing is allocated from a header's claims: the payload is
//! read incrementally and must be exactly as long as the dimensions say.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use crate::DataError;

/// A u8 IDX array: its dimensions and its elements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const U8_TYPE: u8 = 0x08;

fn type_name(code: u8) -> &'static str {
    match code {
        0x08 => "u8",
        0x09 => "i8",
        0x0B => "i16",
        0x0C => "i32",
        0x0D => "f32",
        0x0E => "f64",
        _ => "unknown",
    }
}

/// Reads a u8 IDX file with exactly `ndims` dimensions, gzip-compressed or not (detected from
/// the content, not the name). Every error names the file and the problem.
pub fn read_idx(path: &Path, ndims: usize) -> Result<IdxArray, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = BufReader::new(File::open(path).map_err(io)?);
    let mut sniff = [0u8; 2];
    let got = read_up_to(&mut file, &mut sniff).map_err(io)?;
    let prefix = std::io::Cursor::new(sniff[..got].to_vec());
    if got == 2 && sniff == GZIP_MAGIC {
        read_idx_from(path, GzDecoder::new(prefix.chain(file)), ndims)
    } else {
        read_idx_from(path, prefix.chain(file), ndims)
    }
}

/// Parses IDX content already in memory (gzip or raw); errors name `path` as the source. This
/// is the entry point of the fuzz target.
pub fn read_idx_bytes(path: &Path, bytes: &[u8], ndims: usize) -> Result<IdxArray, DataError> {
    if bytes.starts_with(&GZIP_MAGIC) {
        read_idx_from(path, GzDecoder::new(bytes), ndims)
    } else {
        read_idx_from(path, bytes, ndims)
    }
}

/// Reads as many bytes as are available, up to `buf.len()`.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn read_idx_from(path: &Path, mut r: impl Read, ndims: usize) -> Result<IdxArray, DataError> {
    let format = |problem: String| DataError::Format {
        path: path.to_path_buf(),
        problem,
    };
    let io = |source: std::io::Error| DataError::Io {
        path: PathBuf::from(path),
        source,
    };
    let mut magic = [0u8; 4];
    let got = read_up_to(&mut r, &mut magic).map_err(io)?;
    if got < 4 {
        return Err(format(format!(
            "truncated: {got} byte(s), too short for an IDX header"
        )));
    }
    if magic[0] != 0 || magic[1] != 0 {
        return Err(format(format!(
            "not an IDX file: magic number starts {:02x} {:02x}, expected 00 00",
            magic[0], magic[1]
        )));
    }
    if magic[2] != U8_TYPE {
        return Err(format(format!(
            "element type 0x{:02x} ({}) is not supported; expected 0x08 (u8)",
            magic[2],
            type_name(magic[2])
        )));
    }
    if magic[3] as usize != ndims {
        return Err(format(format!(
            "has {} dimension(s), expected {ndims} (magic number 0x{:08x})",
            magic[3],
            u32::from_be_bytes(magic)
        )));
    }
    let mut dims = Vec::with_capacity(ndims);
    for i in 0..ndims {
        let mut d = [0u8; 4];
        if read_up_to(&mut r, &mut d).map_err(io)? < 4 {
            return Err(format(format!("truncated in the header, at dimension {i}")));
        }
        dims.push(u32::from_be_bytes(d) as usize);
    }
    let expected = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n < isize::MAX as usize)
        .ok_or_else(|| format(format!("dimensions {dims:?} are too large")))?;
    // Read at most one byte beyond the promised payload; the Vec grows with the data actually
    // present, so a lying header cannot make us allocate what the file does not hold.
    let mut data = Vec::new();
    r.take(expected as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData => {
                format(format!("corrupt compressed data: {e}"))
            }
            std::io::ErrorKind::UnexpectedEof => format(format!(
                "truncated compressed data after {} byte(s) of the payload",
                data.len()
            )),
            _ => io(e),
        })?;
    if data.len() < expected {
        return Err(format(format!(
            "truncated: dimensions {dims:?} promise {expected} byte(s) of data, the file holds {}",
            data.len()
        )));
    }
    if data.len() > expected {
        return Err(format(format!(
            "trailing data after the {expected} byte(s) that dimensions {dims:?} promise"
        )));
    }
    Ok(IdxArray { dims, data })
}
