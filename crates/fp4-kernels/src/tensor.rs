use fp4_format::dtype::round_bf16;

/// Where a tensor's elements live. Only the CPU exists so far; a CUDA variant joins it with
/// the `cuda` feature, and every op matches on this.
#[derive(Debug, Clone, PartialEq)]
pub enum Storage {
    Cpu(Vec<f32>),
}

/// A dense row-major f32 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl Tensor {
    /// Panics if `data.len()` is not the product of `shape` (a programming error, not input).
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Tensor {
        assert_eq!(data.len(), shape.iter().product::<usize>(), "data length does not match shape {shape:?}");
        Tensor { shape: shape.to_vec(), storage: Storage::Cpu(data) }
    }

    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor::from_vec(vec![0.0; shape.iter().product()], shape)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the first dimension (tokens, for activations).
    pub fn rows(&self) -> usize {
        self.shape[0]
    }

    /// Product of all dimensions after the first.
    pub fn row_len(&self) -> usize {
        self.shape[1..].iter().product()
    }

    pub fn as_slice(&self) -> &[f32] {
        match &self.storage {
            Storage::Cpu(v) => v,
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        match &mut self.storage {
            Storage::Cpu(v) => v,
        }
    }

    pub fn into_vec(self) -> Vec<f32> {
        match self.storage {
            Storage::Cpu(v) => v,
        }
    }

    /// Same elements, new shape (panics if the element count differs).
    pub fn reshape(self, shape: &[usize]) -> Tensor {
        assert_eq!(self.elem_count(), shape.iter().product::<usize>(), "reshape {:?} -> {shape:?}", self.shape);
        Tensor { shape: shape.to_vec(), storage: self.storage }
    }

    /// Rounds every element to `p` in place (a no-op for f32).
    pub fn round(mut self, p: Precision) -> Tensor {
        if p == Precision::Bf16 {
            self.as_mut_slice().iter_mut().for_each(|x| *x = round_bf16(*x));
        }
        self
    }
}

/// How activations are rounded between ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Everything stays f32: the reference for golden tests.
    F32,
    /// Round to bf16 wherever transformers' bf16 forward stores a bf16 tensor.
    Bf16,
}

impl Precision {
    #[inline]
    pub fn round(self, x: f32) -> f32 {
        match self {
            Precision::F32 => x,
            Precision::Bf16 => round_bf16(x),
        }
    }
}
