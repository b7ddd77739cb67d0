//! Device buffers, and the memory of captured graphs.
//!
//! Outside a capture a [`DeviceBuf`] is cudarc's stream-ordered allocation. Inside one
//! ([`super::Gpu::capture`]), cudarc's allocations would become graph memory nodes between the
//! kernels, and a graph with memory nodes can neither be rewired for programmatic launch nor
//! avoid allocating on every replay. So there every buffer comes from the [`GraphPool`]: blocks
//! allocated once (synchronously, which a capture does not record), handed out by exact size,
//! returned to the pool when the buffer drops, and never given to anything but a capture. A
//! block freed during a capture may serve a later op of the same graph (as graph memory would)
//! or another graph: graphs replay one at a time on one stream, and their temporaries live
//! within one replay.

use cudarc::driver::{sys, CudaSlice, CudaStream, LaunchArgs, PushKernelArg};
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A device buffer of `T`s (derefs to cudarc's `CudaSlice`).
pub struct DeviceBuf<T> {
    slice: ManuallyDrop<CudaSlice<T>>,
    /// The pool the memory returns to, for a buffer allocated during a capture.
    pool: Option<(Arc<GraphPool>, usize)>,
}

impl<T> DeviceBuf<T> {
    pub(super) fn owned(slice: CudaSlice<T>) -> DeviceBuf<T> {
        DeviceBuf { slice: ManuallyDrop::new(slice), pool: None }
    }
}

impl<T> Deref for DeviceBuf<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T> DerefMut for DeviceBuf<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

impl<T> Drop for DeviceBuf<T> {
    fn drop(&mut self) {
        // SAFETY: the slice is taken once, here.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        match self.pool.take() {
            None => drop(slice),
            Some((pool, bytes)) => pool.give_back(bytes, slice.leak()),
        }
    }
}

/// A device-side copy (through [`super::Gpu::alloc`], so a clone made during a capture is graph memory too).
impl<T: cudarc::driver::DeviceRepr> Clone for DeviceBuf<T> {
    fn clone(&self) -> DeviceBuf<T> {
        let g = super::gpu();
        let mut out = g.alloc::<T>(self.len()).unwrap_or_else(|e| panic!("GPU copy of {} elements: {e}", self.len()));
        g.stream
            .memcpy_dtod(&*self.slice, &mut *out.slice)
            .unwrap_or_else(|e| panic!("GPU copy of {} elements: {e}", self.len()));
        out
    }
}

impl<T> std::fmt::Debug for DeviceBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceBuf({} × {}, {})",
            self.len(),
            std::any::type_name::<T>(),
            if self.pool.is_some() { "graph pool" } else { "owned" }
        )
    }
}

// Kernel arguments: a buffer passes as its slice.
unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b DeviceBuf<T>> for LaunchArgs<'a> {
    fn arg(&mut self, arg: &'b DeviceBuf<T>) -> &mut Self {
        self.arg(&*arg.slice)
    }
}

unsafe impl<'a, 'b: 'a, T> PushKernelArg<&'b mut DeviceBuf<T>> for LaunchArgs<'a> {
    fn arg(&mut self, arg: &'b mut DeviceBuf<T>) -> &mut Self {
        self.arg(&mut *arg.slice)
    }
}

/// The memory captured graphs run in (see the module comment).
#[derive(Default)]
pub(super) struct GraphPool {
    free: Mutex<HashMap<usize, Vec<sys::CUdeviceptr>>>,
    reserved: AtomicUsize,
}

impl GraphPool {
    /// A buffer of `n` `T`s from the pool (a new block when none of its size is free).
    pub(super) fn take<T>(self: &Arc<Self>, stream: &Arc<CudaStream>, n: usize) -> super::Result<DeviceBuf<T>> {
        let bytes = (n.max(1) * std::mem::size_of::<T>()).next_multiple_of(256);
        let reused = self.free.lock().expect("graph pool").get_mut(&bytes).and_then(Vec::pop);
        let ptr = match reused {
            Some(p) => p,
            None => {
                let mut p: sys::CUdeviceptr = 0;
                // SAFETY: p receives a fresh allocation of `bytes`. cuMemAlloc is not stream work
                // (a capture does not record it); a capture refuses it unless this thread's mode
                // is relaxed for the call, which is what CUDA's mode exchange is for.
                let r = unsafe {
                    let mut mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
                    sys::cuThreadExchangeStreamCaptureMode(&mut mode);
                    let r = sys::cuMemAlloc_v2(&mut p, bytes);
                    sys::cuThreadExchangeStreamCaptureMode(&mut mode);
                    r
                };
                if r != sys::CUresult::CUDA_SUCCESS {
                    return Err(super::CudaError(format!("graph memory: cannot allocate {bytes} bytes: {r:?}")));
                }
                self.reserved.fetch_add(bytes, Ordering::Relaxed);
                p
            }
        };
        // SAFETY: ptr holds `bytes` ≥ n · size_of::<T>() bytes that nothing else uses until the
        // buffer gives them back; the slice is leaked (never freed) when it drops.
        let slice = unsafe { stream.upgrade_device_ptr::<T>(ptr, n.max(1)) };
        Ok(DeviceBuf { slice: ManuallyDrop::new(slice), pool: Some((self.clone(), bytes)) })
    }

    fn give_back(&self, bytes: usize, ptr: sys::CUdeviceptr) {
        self.free.lock().expect("graph pool").entry(bytes).or_default().push(ptr);
    }

    /// Bytes of device memory the pool holds.
    pub fn reserved_bytes(&self) -> usize {
        self.reserved.load(Ordering::Relaxed)
    }
}
