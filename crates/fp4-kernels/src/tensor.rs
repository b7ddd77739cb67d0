#[cfg(feature = "cuda")]
use crate::cuda::DeviceBuf;
use fp4_format::dtype::round_bf16;

/// Where a tensor's elements live; every op matches on this.
#[derive(Debug, Clone)]
pub enum Storage {
    Cpu(Vec<f32>),
    /// Device memory of the process's GPU (`cuda::gpu()`), same row-major layout.
    #[cfg(feature = "cuda")]
    Cuda(DeviceBuf<f32>),
}

/// Which device a model and its tensors live on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// The GPU set up by `cuda::init` (only in builds with the `cuda` feature).
    Cuda,
}

/// A dense row-major f32 tensor.
#[derive(Debug, Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
    /// GPU only: the same values already in the tensor-core GEMV's input format, written by the
    /// kernel that produced them (a norm, SwiGLU), so the linear that reads this tensor next
    /// skips its own conversion. Dropped whenever the values change.
    #[cfg(feature = "cuda")]
    gemv_input: Option<std::sync::Arc<crate::cuda::MmaActivations>>,
}

impl Tensor {
    fn new(shape: Vec<usize>, storage: Storage) -> Tensor {
        Tensor {
            shape,
            storage,
            #[cfg(feature = "cuda")]
            gemv_input: None,
        }
    }

    /// Panics if `data.len()` is not the product of `shape` (a programming error, not input).
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Tensor {
        assert_eq!(data.len(), shape.iter().product::<usize>(), "data length does not match shape {shape:?}");
        Tensor::new(shape.to_vec(), Storage::Cpu(data))
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

    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => Device::Cuda,
        }
    }

    /// The elements of a CPU tensor (panics for a GPU tensor: use [`Tensor::to_vec`]).
    pub fn as_slice(&self) -> &[f32] {
        match &self.storage {
            Storage::Cpu(v) => v,
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => panic!("as_slice on a GPU tensor {:?}: copy it with to_vec", self.shape),
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        match &mut self.storage {
            Storage::Cpu(v) => v,
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => panic!("as_mut_slice on a GPU tensor {:?}", self.shape),
        }
    }

    /// The elements on the host (a copy from the GPU for GPU tensors).
    pub fn to_vec(&self) -> Vec<f32> {
        match &self.storage {
            Storage::Cpu(v) => v.clone(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => crate::cuda::gpu().download(s),
        }
    }

    pub fn into_vec(self) -> Vec<f32> {
        match self.storage {
            Storage::Cpu(v) => v,
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => crate::cuda::gpu().download(&s),
        }
    }

    /// The same tensor on `device` (a copy when it moves).
    pub fn to_device(&self, device: Device) -> Tensor {
        match (device, &self.storage) {
            (Device::Cpu, Storage::Cpu(_)) => self.clone(),
            #[cfg(feature = "cuda")]
            (Device::Cuda, Storage::Cuda(_)) => self.clone(),
            #[cfg(feature = "cuda")]
            (Device::Cpu, Storage::Cuda(_)) => Tensor::from_vec(self.to_vec(), &self.shape),
            #[cfg(feature = "cuda")]
            (Device::Cuda, Storage::Cpu(v)) => Tensor::from_cuda(crate::cuda::gpu().upload(v), &self.shape),
            #[cfg(not(feature = "cuda"))]
            (Device::Cuda, _) => panic!("this build has no CUDA support (feature `cuda`)"),
        }
    }

    /// This tensor on `device`: itself when it is already there (no copy), else a copy.
    pub fn into_device(self, device: Device) -> Tensor {
        if self.device() == device {
            self
        } else {
            self.to_device(device)
        }
    }

    /// Zeros on `device`.
    pub fn zeros_on(shape: &[usize], device: Device) -> Tensor {
        match device {
            Device::Cpu => Tensor::zeros(shape),
            #[cfg(feature = "cuda")]
            Device::Cuda => Tensor::from_cuda(crate::cuda::gpu().zeros(shape.iter().product()), shape),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => panic!("this build has no CUDA support (feature `cuda`)"),
        }
    }

    #[cfg(feature = "cuda")]
    pub fn from_cuda(data: DeviceBuf<f32>, shape: &[usize]) -> Tensor {
        assert_eq!(data.len(), shape.iter().product::<usize>(), "device buffer length does not match {shape:?}");
        Tensor::new(shape.to_vec(), Storage::Cuda(data))
    }

    /// The device buffer of a GPU tensor (panics for a CPU tensor: operands on mixed devices are
    /// a programming error).
    #[cfg(feature = "cuda")]
    pub fn cuda(&self) -> &DeviceBuf<f32> {
        match &self.storage {
            Storage::Cuda(s) => s,
            Storage::Cpu(_) => panic!("expected a GPU tensor, got a CPU tensor {:?}", self.shape),
        }
    }

    #[cfg(feature = "cuda")]
    pub fn cuda_mut(&mut self) -> &mut DeviceBuf<f32> {
        self.gemv_input = None;
        match &mut self.storage {
            Storage::Cuda(s) => s,
            Storage::Cpu(_) => panic!("expected a GPU tensor, got a CPU tensor {:?}", self.shape),
        }
    }

    /// This tensor with `a`, its values in the tensor-core GEMV's format, attached.
    #[cfg(feature = "cuda")]
    pub fn with_gemv_input(mut self, a: crate::cuda::MmaActivations) -> Tensor {
        self.gemv_input = Some(std::sync::Arc::new(a));
        self
    }

    /// The attached GEMV input (see [`Tensor::with_gemv_input`]) when it still describes this
    /// tensor's rows (a reshape that changes them makes it stale).
    #[cfg(feature = "cuda")]
    pub fn gemv_input(&self) -> Option<&crate::cuda::MmaActivations> {
        let rows = if self.shape.is_empty() { 0 } else { self.rows() };
        self.gemv_input.as_deref().filter(|a| a.rows() == rows && a.cols() == self.row_len())
    }

    /// Same elements, new shape (panics if the element count differs).
    pub fn reshape(self, shape: &[usize]) -> Tensor {
        assert_eq!(self.elem_count(), shape.iter().product::<usize>(), "reshape {:?} -> {shape:?}", self.shape);
        Tensor { shape: shape.to_vec(), ..self }
    }

    /// Rounds every element to `p` in place (a no-op for f32; GPU models run in f32 only).
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

/// A buffer of u32 (token ids, positions, slot and block indices) on the CPU or the GPU: the
/// per-step inputs of a decode batch. On the GPU it keeps its allocation across steps
/// ([`Ids::write`] copies into it), so a captured CUDA graph can read it on every replay.
#[derive(Debug, Clone)]
pub enum Ids {
    Cpu(Vec<u32>),
    #[cfg(feature = "cuda")]
    Cuda(DeviceBuf<u32>),
}

impl Ids {
    pub fn new(v: Vec<u32>, device: Device) -> Ids {
        match device {
            Device::Cpu => Ids::Cpu(v),
            #[cfg(feature = "cuda")]
            Device::Cuda => Ids::Cuda(crate::cuda::gpu().upload(&v)),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => panic!("this build has no CUDA support (feature `cuda`)"),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Ids::Cpu(v) => v.len(),
            #[cfg(feature = "cuda")]
            Ids::Cuda(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Overwrites the first `v.len()` entries (the buffer keeps its size and, on the GPU, its address).
    pub fn write(&mut self, v: &[u32]) {
        assert!(v.len() <= self.len(), "Ids::write of {} into {}", v.len(), self.len());
        match self {
            Ids::Cpu(d) => d[..v.len()].copy_from_slice(v),
            #[cfg(feature = "cuda")]
            Ids::Cuda(d) => {
                let g = crate::cuda::gpu();
                g.stream
                    .memcpy_htod(v, &mut d.slice_mut(..v.len()))
                    .unwrap_or_else(|e| panic!("upload of {} ids: {e}", v.len()));
            }
        }
    }

    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Ids::Cpu(v) => v.clone(),
            #[cfg(feature = "cuda")]
            Ids::Cuda(s) => crate::cuda::gpu().download(s),
        }
    }

    pub fn as_slice(&self) -> &[u32] {
        match self {
            Ids::Cpu(v) => v,
            #[cfg(feature = "cuda")]
            Ids::Cuda(_) => panic!("as_slice on GPU ids: copy them with to_vec"),
        }
    }

    #[cfg(feature = "cuda")]
    pub fn cuda(&self) -> &DeviceBuf<u32> {
        match self {
            Ids::Cuda(s) => s,
            Ids::Cpu(_) => panic!("expected GPU ids, got CPU ids"),
        }
    }

    #[cfg(feature = "cuda")]
    pub fn cuda_mut(&mut self) -> &mut DeviceBuf<u32> {
        match self {
            Ids::Cuda(s) => s,
            Ids::Cpu(_) => panic!("expected GPU ids, got CPU ids"),
        }
    }
}
