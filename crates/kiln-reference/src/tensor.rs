//! Host tensors: a shape and a flat row-major buffer of one element type.
//!
//! Float elements are generic over [`Real`] so the same executor can run in f32 (what the GPU
//! computes) or in f64 (the yardstick for finite-difference gradient checks).

use std::fmt::Debug;

use kiln_ir::{DType, TensorType};

/// The precision float tensors are held in: `f32` normally, `f64` for gradient checks.
pub trait Real: Copy + PartialOrd + Debug + Default + Send + Sync + 'static {
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

impl Real for f32 {
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Real for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// A tensor's elements. `Float` holds the IR's f32 dtype at precision `T`.
#[derive(Clone, Debug, PartialEq)]
pub enum Data<T: Real = f32> {
    Float(Vec<T>),
    U8(Vec<u8>),
    U32(Vec<u32>),
    I32(Vec<i32>),
}

impl<T: Real> Data<T> {
    pub fn dtype(&self) -> DType {
        match self {
            Data::Float(_) => DType::F32,
            Data::U8(_) => DType::U8,
            Data::U32(_) => DType::U32,
            Data::I32(_) => DType::I32,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Data::Float(v) => v.len(),
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
pub struct Tensor<T: Real = f32> {
    shape: Vec<usize>,
    data: Data<T>,
}

/// The element count does not match the shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("shape {shape:?} holds {expected} elements, but {got} were given")]
pub struct ShapeMismatch {
    pub shape: Vec<usize>,
    pub expected: usize,
    pub got: usize,
}

impl<T: Real> Tensor<T> {
    pub fn new(shape: impl Into<Vec<usize>>, data: Data<T>) -> Result<Self, ShapeMismatch> {
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

    pub fn from_float(shape: impl Into<Vec<usize>>, v: Vec<T>) -> Result<Self, ShapeMismatch> {
        Tensor::new(shape, Data::Float(v))
    }

    pub fn from_u8(shape: impl Into<Vec<usize>>, v: Vec<u8>) -> Result<Self, ShapeMismatch> {
        Tensor::new(shape, Data::U8(v))
    }

    pub fn from_u32(shape: impl Into<Vec<usize>>, v: Vec<u32>) -> Result<Self, ShapeMismatch> {
        Tensor::new(shape, Data::U32(v))
    }

    pub fn from_i32(shape: impl Into<Vec<usize>>, v: Vec<i32>) -> Result<Self, ShapeMismatch> {
        Tensor::new(shape, Data::I32(v))
    }

    /// A zero-filled tensor of the given type.
    pub fn zeros(ty: &TensorType) -> Self {
        let n = ty.numel();
        let data = match ty.dtype {
            DType::F32 => Data::Float(vec![T::default(); n]),
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

    pub fn data(&self) -> &Data<T> {
        &self.data
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn ty(&self) -> TensorType {
        TensorType::new(self.dtype(), self.shape.clone())
    }

    /// The float elements, or `None` for another element type.
    pub fn as_float(&self) -> Option<&[T]> {
        match &self.data {
            Data::Float(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_float_mut(&mut self) -> Option<&mut [T]> {
        match &mut self.data {
            Data::Float(v) => Some(v),
            _ => None,
        }
    }

    /// The integer elements (u8, u32 or i32) widened to i64, or `None` for floats.
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        match &self.data {
            Data::Float(_) => None,
            Data::U8(v) => Some(v.iter().map(|&x| x as i64).collect()),
            Data::U32(v) => Some(v.iter().map(|&x| x as i64).collect()),
            Data::I32(v) => Some(v.iter().map(|&x| x as i64).collect()),
        }
    }

    /// The same elements under another shape with the same element count.
    pub fn reshaped(self, shape: impl Into<Vec<usize>>) -> Result<Self, ShapeMismatch> {
        Tensor::new(shape, self.data)
    }

    /// The same tensor with float elements converted to precision `U`.
    pub fn cast<U: Real>(&self) -> Tensor<U> {
        let data = match &self.data {
            Data::Float(v) => Data::Float(v.iter().map(|x| U::from_f64(x.to_f64())).collect()),
            Data::U8(v) => Data::U8(v.clone()),
            Data::U32(v) => Data::U32(v.clone()),
            Data::I32(v) => Data::I32(v.clone()),
        };
        Tensor {
            shape: self.shape.clone(),
            data,
        }
    }
}

impl Tensor<f32> {
    pub fn from_f32(shape: impl Into<Vec<usize>>, v: Vec<f32>) -> Result<Self, ShapeMismatch> {
        Tensor::from_float(shape, v)
    }

    /// The elements as f32, or `None` for another element type.
    pub fn as_f32(&self) -> Option<&[f32]> {
        self.as_float()
    }

    pub fn as_f32_mut(&mut self) -> Option<&mut [f32]> {
        self.as_float_mut()
    }
}
