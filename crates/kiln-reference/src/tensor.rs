//! Host tensors: a shape and a flat row-major buffer of one element type.

use kiln_ir::{DType, TensorType};

/// A tensor's elements.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    U8(Vec<u8>),
    U32(Vec<u32>),
    I32(Vec<i32>),
}

impl Data {
    pub fn dtype(&self) -> DType {
        match self {
            Data::F32(_) => DType::F32,
            Data::U8(_) => DType::U8,
            Data::U32(_) => DType::U32,
            Data::I32(_) => DType::I32,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::U8(v) => v.len(),
            Data::U32(v) => v.len(),
            Data::I32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A dense host tensor whose element count always matches its shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Data,
}

/// The element count does not match the shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("shape {shape:?} holds {expected} elements, but {got} were given")]
pub struct ShapeMismatch {
    pub shape: Vec<usize>,
    pub expected: usize,
    pub got: usize,
}

impl Tensor {
    pub fn new(shape: impl Into<Vec<usize>>, data: Data) -> Result<Tensor, ShapeMismatch> {
        let shape = shape.into();
        let expected = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if expected != Some(data.len()) {
            return Err(ShapeMismatch {
                expected: expected.unwrap_or(usize::MAX),
                got: data.len(),
                shape,
            });
        }
        Ok(Tensor { shape, data })
    }

    pub fn from_f32(shape: impl Into<Vec<usize>>, v: Vec<f32>) -> Result<Tensor, ShapeMismatch> {
        Tensor::new(shape, Data::F32(v))
    }

    pub fn from_u8(shape: impl Into<Vec<usize>>, v: Vec<u8>) -> Result<Tensor, ShapeMismatch> {
        Tensor::new(shape, Data::U8(v))
    }

    pub fn from_u32(shape: impl Into<Vec<usize>>, v: Vec<u32>) -> Result<Tensor, ShapeMismatch> {
        Tensor::new(shape, Data::U32(v))
    }

    pub fn from_i32(shape: impl Into<Vec<usize>>, v: Vec<i32>) -> Result<Tensor, ShapeMismatch> {
        Tensor::new(shape, Data::I32(v))
    }

    /// A zero-filled tensor of the given type.
    pub fn zeros(ty: &TensorType) -> Tensor {
        let n = ty.numel();
        let data = match ty.dtype {
            DType::F32 => Data::F32(vec![0.0; n]),
            DType::U8 => Data::U8(vec![0; n]),
            DType::U32 => Data::U32(vec![0; n]),
            DType::I32 => Data::I32(vec![0; n]),
        };
        Tensor {
            shape: ty.shape.clone(),
            data,
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn data(&self) -> &Data {
        &self.data
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn ty(&self) -> TensorType {
        TensorType::new(self.dtype(), self.shape.clone())
    }

    /// The elements as f32, or `None` for another element type.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_f32_mut(&mut self) -> Option<&mut [f32]> {
        match &mut self.data {
            Data::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The same elements under another shape with the same element count.
    pub fn reshaped(self, shape: impl Into<Vec<usize>>) -> Result<Tensor, ShapeMismatch> {
        Tensor::new(shape, self.data)
    }
}
