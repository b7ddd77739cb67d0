//! Linear layers and their per-layer "method": how the weight is stored and multiplied. The
//! method is chosen per layer from the checkpoint's tensors (validated against its quantization
//! config), as vLLM does, never by a separate model class.
//!
//! On the CPU every method keeps its checkpoint tensors and a dequantized f32 copy of the weight:
//! NVFP4/FP8 run as W4A16/W8A16 (dequantize, matmul) or, with `quantize_activations`, emulate
//! W4A4/W8A8 by fake-quantizing the activations with the checkpoint's `input_scale` first.

use fp4_format::nvfp4::{self, Fp8Weight, Nvfp4Weight};
use fp4_format::{Checkpoint, DType, FormatError, LayerAlgo, TextConfig};
use fp4_kernels::{ops, Device, Precision, Tensor};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// How a model is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    pub precision: Precision,
    /// Quantize activations of NVFP4/FP8 layers with their `input_scale` (W4A4/W8A8, what
    /// Blackwell kernels compute); off = weight-only (W4A16, what Hopper kernels compute).
    pub quantize_activations: bool,
    /// Where weights and activations live. GPU models compute in f32 with W4A16/W8A16 kernels.
    pub device: Device,
}

impl LoadOptions {
    pub fn new(precision: Precision) -> LoadOptions {
        LoadOptions { precision, quantize_activations: false, device: Device::Cpu }
    }

    pub fn on(mut self, device: Device) -> LoadOptions {
        self.device = device;
        self
    }
}

/// Where a model's weights come from: a checkpoint directory, or random weights of a given
/// shape (`--synthetic`, for performance runs). The model definition loads through this only.
pub trait WeightSource {
    fn config(&self) -> &TextConfig;
    /// Full tensor name of a text-model tensor (`layers.0...` → `model.language_model.layers.0...`).
    fn text_name(&self, suffix: &str) -> String;
    /// Linear module `name` (`[n_out, n_in]`), placed on `o.device`.
    fn linear(&self, name: &str, n_in: usize, n_out: usize, bias: bool, o: LoadOptions) -> crate::Result<Linear>;
    /// A float parameter, placed on `o.device`.
    fn param(&self, name: &str, shape: &[usize], o: LoadOptions) -> crate::Result<Tensor>;
    /// Whether tensor `name` (a full name) is there: optional parts such as the MTP head.
    fn has(&self, name: &str) -> bool;
}

impl WeightSource for Checkpoint {
    fn config(&self) -> &TextConfig {
        &self.config
    }

    fn text_name(&self, suffix: &str) -> String {
        Checkpoint::text_name(self, suffix)
    }

    fn linear(&self, name: &str, n_in: usize, n_out: usize, bias: bool, o: LoadOptions) -> crate::Result<Linear> {
        Linear::load(self, name, n_in, n_out, bias, o)
    }

    fn param(&self, name: &str, shape: &[usize], o: LoadOptions) -> crate::Result<Tensor> {
        Ok(load_param(self, name, shape, o.precision)?.into_device(o.device))
    }

    fn has(&self, name: &str) -> bool {
        self.contains(name)
    }
}

#[derive(Debug, Clone)]
pub enum LinearMethod {
    /// Full-precision weight `[out, in]` held as f32 (exact for BF16/F16/F32 checkpoints).
    Dense { weight: Tensor, bias: Option<Tensor> },
    /// NVFP4 (ModelOpt or compressed-tensors). `weight` is the dequantized copy.
    Nvfp4 {
        q: Nvfp4Weight,
        input_scale: Option<f32>,
        pre_quant_scale: Option<Tensor>,
        weight: Tensor,
        bias: Option<Tensor>,
    },
    /// FP8 E4M3 with a per-tensor scale.
    Fp8 { q: Fp8Weight, input_scale: Option<f32>, weight: Tensor, bias: Option<Tensor> },
    /// Any of the above held on the GPU in the form its kernels read (NVFP4 as stored; BF16 and
    /// FP8 as bf16 with a scale), activations in f32 (W4A16 / W8A16) unless `act` quantizes them
    /// (W4A4 / W8A8). `format` names the checkpoint's format.
    #[cfg(feature = "cuda")]
    Gpu {
        weight: std::sync::Arc<fp4_kernels::cuda::GpuWeight>,
        pre_quant_scale: Option<Tensor>,
        bias: Option<Tensor>,
        act: Option<fp4_kernels::cuda::ActQuant>,
        format: &'static str,
    },
}

/// Running max |x| of a layer's inputs, shared by clones (calibration).
#[derive(Debug, Clone, Default)]
pub struct AmaxObserver(Arc<AtomicU32>);

impl AmaxObserver {
    pub fn observe(&self, x: &[f32]) {
        // Non-negative floats order like their bit patterns.
        self.0.fetch_max(nvfp4::amax(x).to_bits(), Ordering::Relaxed);
    }

    pub fn get(&self) -> f32 {
        f32::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Per-input-channel statistics of a layer's inputs (AWQ): the mean |x| of each call averaged
/// over calls, the per-channel max, and up to `keep_rows` input rows for the search loss.
#[derive(Debug, Clone)]
pub struct ChannelRecorder(Arc<std::sync::Mutex<ChannelStats>>);

#[derive(Debug, Clone, Default)]
pub struct ChannelStats {
    pub mean_abs_sum: Vec<f64>,
    pub calls: usize,
    pub amax: Vec<f32>,
    pub rows: Vec<f32>,
    pub keep_rows: usize,
}

impl ChannelRecorder {
    pub fn new(channels: usize, keep_rows: usize) -> ChannelRecorder {
        ChannelRecorder(Arc::new(std::sync::Mutex::new(ChannelStats {
            mean_abs_sum: vec![0.0; channels],
            amax: vec![0.0; channels],
            keep_rows,
            ..Default::default()
        })))
    }

    fn observe(&self, x: &[f32]) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let c = s.amax.len();
        let t = x.len() / c;
        let mut sums = vec![0f64; c];
        for row in x.chunks_exact(c) {
            for (j, v) in row.iter().enumerate() {
                sums[j] += v.abs() as f64;
                s.amax[j] = s.amax[j].max(v.abs());
            }
        }
        for (acc, v) in s.mean_abs_sum.iter_mut().zip(sums) {
            *acc += v / t.max(1) as f64;
        }
        s.calls += 1;
        let room = (s.keep_rows * c).saturating_sub(s.rows.len());
        let take = room.min(x.len()) / c * c;
        s.rows.extend_from_slice(&x[..take]);
    }

    pub fn stats(&self) -> ChannelStats {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[derive(Debug, Clone)]
pub struct Linear {
    /// Module name in the checkpoint (e.g. `model.layers.0.mlp.up_proj`).
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    pub method: LinearMethod,
    pub quantize_activations: bool,
    /// Records input amax when set (calibration).
    pub observer: Option<AmaxObserver>,
    /// Records per-channel input statistics when set (AWQ calibration).
    pub recorder: Option<ChannelRecorder>,
}

impl Linear {
    /// Loads module `name` (`[out, in]`), in whatever format its tensors are stored.
    pub fn load(
        ckpt: &Checkpoint,
        name: &str,
        n_in: usize,
        n_out: usize,
        bias: bool,
        opts: LoadOptions,
    ) -> crate::Result<Linear> {
        let p = opts.precision;
        let t = |s: &str| format!("{name}.{s}");
        let bias = if bias { Some(load_param(ckpt, &t("bias"), &[n_out], p)?) } else { None };
        let compressed = ckpt.contains(&t("weight_packed"));
        let stored = if compressed { DType::U8 } else { ckpt.tensor(&t("weight"))?.dtype };
        let algo = match stored {
            DType::U8 => Some(LayerAlgo::Nvfp4),
            DType::F8E4M3 => Some(LayerAlgo::Fp8),
            _ => None,
        };
        check_against_config(ckpt, name, algo)?;
        let method = match stored {
            DType::U8 => {
                if !n_in.is_multiple_of(nvfp4::BLOCK) {
                    return Err(unsupported(ckpt, &t("weight"), "NVFP4 needs in_features divisible by 16"));
                }
                let (w_name, ws2, input_scale) = if compressed {
                    let global = ckpt.load_scalar(&t("weight_global_scale"))?;
                    let input = opt(ckpt, &t("input_global_scale"))?.map(|g| 1.0 / g);
                    (t("weight_packed"), 1.0 / global, input)
                } else {
                    (t("weight"), ckpt.load_scalar(&t("weight_scale_2"))?, opt(ckpt, &t("input_scale"))?)
                };
                let packed = ckpt.load_raw(&w_name, DType::U8, &[n_out, n_in / 2])?.to_vec();
                let scales = ckpt.load_raw(&t("weight_scale"), DType::F8E4M3, &[n_out, n_in / nvfp4::BLOCK])?.to_vec();
                let q = Nvfp4Weight { rows: n_out, cols: n_in, packed, scales, scale_2: ws2 };
                let pre_quant_scale = if ckpt.contains(&t("pre_quant_scale")) {
                    Some(load_param(ckpt, &t("pre_quant_scale"), &[n_in], p)?)
                } else {
                    None
                };
                // The GPU reads the packed weight: no f32 copy is made for it.
                #[cfg(feature = "cuda")]
                if opts.device == Device::Cuda {
                    let act = input_scale
                        .filter(|_| opts.quantize_activations)
                        .map(|input_scale| fp4_kernels::cuda::ActQuant::Nvfp4 { input_scale });
                    let method = LinearMethod::gpu_nvfp4(&q, pre_quant_scale.as_ref(), bias.as_ref(), act);
                    return Ok(Linear::from_method(name, n_in, n_out, method, false));
                }
                let weight = Tensor::from_vec(q.dequantize(), &[n_out, n_in]).round(p);
                LinearMethod::Nvfp4 { q, input_scale, pre_quant_scale, weight, bias }
            }
            DType::F8E4M3 => {
                let codes = ckpt.load_raw(&t("weight"), DType::F8E4M3, &[n_out, n_in])?.to_vec();
                let q = Fp8Weight { codes, scale: ckpt.load_scalar(&t("weight_scale"))? };
                let input_scale = opt(ckpt, &t("input_scale"))?;
                #[cfg(feature = "cuda")]
                if opts.device == Device::Cuda {
                    let act = input_scale
                        .filter(|_| opts.quantize_activations)
                        .map(|input_scale| fp4_kernels::cuda::ActQuant::Fp8 { input_scale });
                    let method = LinearMethod::gpu_fp8(&q, n_out, n_in, bias.as_ref(), act);
                    return Ok(Linear::from_method(name, n_in, n_out, method, false));
                }
                let weight = Tensor::from_vec(q.dequantize(), &[n_out, n_in]).round(p);
                LinearMethod::Fp8 { q, input_scale, weight, bias }
            }
            _ => LinearMethod::Dense { weight: load_param(ckpt, &t("weight"), &[n_out, n_in], p)?, bias },
        };
        if opts.device == Device::Cuda {
            #[cfg(not(feature = "cuda"))]
            return Err(crate::ModelError::Unsupported("this fp4 was built without the `cuda` feature".into()));
            #[cfg(feature = "cuda")]
            {
                // Quantized layers returned above; this is a dense one.
                if stored != DType::BF16 {
                    tracing::warn!("{name}: {stored:?} weight rounded to bf16 for the GPU");
                }
                return Ok(Linear::from_method(name, n_in, n_out, method.to_gpu(false), false));
            }
        }
        Ok(Linear {
            name: name.to_string(),
            in_features: n_in,
            out_features: n_out,
            method,
            quantize_activations: opts.quantize_activations,
            observer: None,
            recorder: None,
        })
    }

    /// A dense layer over an f32 weight `[out, in]`.
    pub fn dense(name: &str, weight: Tensor) -> Linear {
        let (n_out, n_in) = (weight.shape()[0], weight.shape()[1]);
        Linear::from_method(name, n_in, n_out, LinearMethod::Dense { weight, bias: None }, false)
    }

    pub fn from_method(
        name: &str,
        n_in: usize,
        n_out: usize,
        method: LinearMethod,
        quantize_activations: bool,
    ) -> Linear {
        Linear {
            name: name.to_string(),
            in_features: n_in,
            out_features: n_out,
            method,
            quantize_activations,
            observer: None,
            recorder: None,
        }
    }

    /// The f32 weight the CPU multiplies by (dequantized for quantized methods). Calibration
    /// and export work on CPU-loaded models only, so a GPU layer here is a programming error.
    pub fn weight(&self) -> &Tensor {
        match &self.method {
            LinearMethod::Dense { weight, .. }
            | LinearMethod::Nvfp4 { weight, .. }
            | LinearMethod::Fp8 { weight, .. } => weight,
            #[cfg(feature = "cuda")]
            LinearMethod::Gpu { .. } => panic!("{}: the weight of a GPU layer has no CPU copy", self.name),
        }
    }

    /// An NVFP4 copy of a dense layer without bias (round to nearest under its amax's per-tensor
    /// scale, as `fp4 quantize --strategy rtn` would store it), on the same device: the cheaper
    /// LM head speculative drafting reads. `None` for a quantized layer or one with a bias.
    pub fn nvfp4_copy(&self, name: &str) -> Option<Linear> {
        let (n_in, n_out) = (self.in_features, self.out_features);
        if !n_in.is_multiple_of(nvfp4::BLOCK) {
            return None;
        }
        let method = match &self.method {
            LinearMethod::Dense { weight, bias: None } => {
                let w = weight.as_slice();
                let q = Nvfp4Weight::quantize(w, n_out, n_in, nvfp4::nvfp4_global_scale(nvfp4::amax(w)));
                let weight = Tensor::from_vec(q.dequantize(), &[n_out, n_in]);
                LinearMethod::Nvfp4 { q, input_scale: None, pre_quant_scale: None, weight, bias: None }
            }
            #[cfg(feature = "cuda")]
            LinearMethod::Gpu { weight, bias: None, pre_quant_scale: None, act: None, .. } => match &**weight {
                fp4_kernels::cuda::GpuWeight::Bf16 { w, rows, cols, scale } if *scale == 1.0 => {
                    let q = fp4_kernels::cuda::gpu()
                        .nvfp4_from_bf16(w, *rows, *cols)
                        .unwrap_or_else(|e| panic!("{name}: NVFP4 copy on the GPU: {e}"));
                    LinearMethod::gpu(fp4_kernels::cuda::GpuWeight::Nvfp4(q), None, None, None, "nvfp4")
                }
                _ => return None,
            },
            _ => return None,
        };
        Some(Linear::from_method(name, n_in, n_out, method, false))
    }

    /// Bytes of device memory the weight takes (what a decode step reads); 0 on the CPU.
    pub fn gpu_weight_bytes(&self) -> usize {
        match &self.method {
            #[cfg(feature = "cuda")]
            LinearMethod::Gpu { weight, .. } => weight.bytes(),
            _ => 0,
        }
    }

    /// The dense f32 weight, for calibration algorithms that rescale it (None if quantized).
    pub fn dense_weight_mut(&mut self) -> Option<&mut Tensor> {
        match &mut self.method {
            LinearMethod::Dense { weight, .. } => Some(weight),
            _ => None,
        }
    }

    /// `x [T, in] → [T, out]`, output rounded to `p`.
    pub fn forward(&self, x: &Tensor, p: Precision) -> Tensor {
        #[cfg(feature = "cuda")]
        if let LinearMethod::Gpu { weight, pre_quant_scale, bias, act, .. } = &self.method {
            return ops::linear_gpu(x, weight, bias.as_ref(), pre_quant_scale.as_ref(), *act);
        }
        if let Some(o) = &self.observer {
            o.observe(x.as_slice());
        }
        if let Some(r) = &self.recorder {
            r.observe(x.as_slice());
        }
        match &self.method {
            LinearMethod::Dense { weight, bias } => ops::linear(x, weight, bias.as_ref(), p),
            LinearMethod::Nvfp4 { input_scale, pre_quant_scale, weight, bias, .. } => {
                let mut x = x.clone();
                if let Some(s) = pre_quant_scale {
                    let n = s.elem_count();
                    for row in x.as_mut_slice().chunks_mut(n) {
                        row.iter_mut().zip(s.as_slice()).for_each(|(v, m)| *v = p.round(*v * m));
                    }
                }
                if let (true, Some(is)) = (self.quantize_activations, input_scale) {
                    nvfp4::fake_quantize_activations(x.as_mut_slice(), *is);
                    x = x.round(p);
                }
                ops::linear(&x, weight, bias.as_ref(), p)
            }
            LinearMethod::Fp8 { input_scale, weight, bias, .. } => match (self.quantize_activations, input_scale) {
                (true, Some(is)) => {
                    let mut x = x.clone();
                    for v in x.as_mut_slice() {
                        let q = nvfp4::e4m3_encode((*v / is).clamp(-nvfp4::E4M3_MAX, nvfp4::E4M3_MAX));
                        *v = p.round(nvfp4::e4m3_decode(q) * is);
                    }
                    ops::linear(&x, weight, bias.as_ref(), p)
                }
                _ => ops::linear(x, weight, bias.as_ref(), p),
            },
            #[cfg(feature = "cuda")]
            LinearMethod::Gpu { .. } => unreachable!("handled above"),
        }
    }

    /// `residual + self.forward(x)` (a decoder layer's residual branch); on the GPU a W4A16
    /// NVFP4 weight adds in the GEMV's epilogue.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor, p: Precision) -> Tensor {
        #[cfg(feature = "cuda")]
        if let LinearMethod::Gpu { weight, pre_quant_scale: None, bias: None, act: None, .. } = &self.method {
            if let fp4_kernels::cuda::GpuWeight::Nvfp4(q) = weight.as_ref() {
                if let Some(y) = ops::nvfp4_linear_add(x, q, residual) {
                    return y;
                }
            }
        }
        ops::add(residual, &self.forward(x, p), p)
    }
}

/// `x` through several linears of the same input (q/k/v, gate/up, the GDN input projections):
/// the same as each one's [`Linear::forward`]; on the GPU, the W4A16 NVFP4 ones among them share
/// one conversion of the activations and one launch, two small bf16 ones (the GDN's in_proj_b
/// and in_proj_a) one launch, the others run one by one.
pub fn forward_many<const N: usize>(x: &Tensor, linears: [&Linear; N], p: Precision) -> [Tensor; N] {
    #[cfg(feature = "cuda")]
    {
        use fp4_kernels::cuda::GpuWeight;
        let plain: Vec<Option<&GpuWeight>> = linears
            .iter()
            .map(|l| match &l.method {
                LinearMethod::Gpu { weight, pre_quant_scale: None, bias: None, act: None, .. } => Some(weight.as_ref()),
                _ => None,
            })
            .collect();
        let mut out: [Option<Tensor>; N] = std::array::from_fn(|_| None);
        let nvfp4: Vec<usize> = (0..N).filter(|&i| matches!(plain[i], Some(GpuWeight::Nvfp4(_)))).collect();
        if nvfp4.len() > 1 {
            let ws: Vec<_> = nvfp4
                .iter()
                .map(|&i| match plain[i] {
                    Some(GpuWeight::Nvfp4(q)) => q,
                    _ => unreachable!("filtered above"),
                })
                .collect();
            if let Some(ys) = ops::nvfp4_same_input(x, &ws) {
                for (&i, y) in nvfp4.iter().zip(ys) {
                    out[i] = Some(y);
                }
            }
        }
        let bf16: Vec<usize> = (0..N).filter(|&i| matches!(plain[i], Some(GpuWeight::Bf16 { .. }))).collect();
        if let [b, a] = bf16[..] {
            let pair = [plain[b], plain[a]].map(|w| w.expect("filtered above"));
            if let Some([yb, ya]) = ops::bf16_small_pair(x, pair) {
                (out[b], out[a]) = (Some(yb), Some(ya));
            }
        }
        return std::array::from_fn(|i| out[i].take().unwrap_or_else(|| linears[i].forward(x, p)));
    }
    #[allow(unreachable_code)]
    linears.map(|l| l.forward(x, p))
}

impl LinearMethod {
    /// The GPU form of this method (W4A16 for NVFP4, W8A16 for FP8, bf16 for dense weights;
    /// W4A4 / W8A8 when `quantize_activations` and the layer has an input_scale).
    #[cfg(feature = "cuda")]
    pub fn to_gpu(&self, quantize_activations: bool) -> LinearMethod {
        use fp4_kernels::cuda::ActQuant;
        match self {
            LinearMethod::Gpu { .. } => self.clone(),
            LinearMethod::Dense { weight, bias } => {
                let (r, c) = (weight.shape()[0], weight.shape()[1]);
                let w = fp4_kernels::cuda::gpu().upload_bf16(weight.as_slice(), r, c, 1.0);
                LinearMethod::gpu(w, None, bias.as_ref(), None, "bf16")
            }
            LinearMethod::Nvfp4 { q, pre_quant_scale, bias, input_scale, .. } => {
                let act =
                    input_scale.filter(|_| quantize_activations).map(|input_scale| ActQuant::Nvfp4 { input_scale });
                LinearMethod::gpu_nvfp4(q, pre_quant_scale.as_ref(), bias.as_ref(), act)
            }
            LinearMethod::Fp8 { q, bias, weight, input_scale } => {
                let act = input_scale.filter(|_| quantize_activations).map(|input_scale| ActQuant::Fp8 { input_scale });
                LinearMethod::gpu_fp8(q, weight.shape()[0], weight.shape()[1], bias.as_ref(), act)
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn gpu_nvfp4(
        q: &Nvfp4Weight,
        pre_quant_scale: Option<&Tensor>,
        bias: Option<&Tensor>,
        act: Option<fp4_kernels::cuda::ActQuant>,
    ) -> LinearMethod {
        // W4A4 layers keep ModelOpt's layout (their prefill GEMM reads it); W4A16 ones the GEMV's.
        let g = fp4_kernels::cuda::gpu();
        let q = if act.is_some() { g.upload_nvfp4_modelopt(q) } else { g.upload_nvfp4(q) };
        LinearMethod::gpu(fp4_kernels::cuda::GpuWeight::Nvfp4(q), pre_quant_scale, bias, act, "nvfp4")
    }

    /// E4M3 values are exact in bf16; the per-tensor scale rides along as the GEMM's alpha.
    #[cfg(feature = "cuda")]
    fn gpu_fp8(
        q: &Fp8Weight,
        rows: usize,
        cols: usize,
        bias: Option<&Tensor>,
        act: Option<fp4_kernels::cuda::ActQuant>,
    ) -> LinearMethod {
        let codes: Vec<f32> = q.codes.iter().map(|&c| nvfp4::e4m3_decode(c)).collect();
        let w = fp4_kernels::cuda::gpu().upload_bf16(&codes, rows, cols, q.scale);
        LinearMethod::gpu(w, None, bias, act, "fp8")
    }

    #[cfg(feature = "cuda")]
    fn gpu(
        weight: fp4_kernels::cuda::GpuWeight,
        pre_quant_scale: Option<&Tensor>,
        bias: Option<&Tensor>,
        act: Option<fp4_kernels::cuda::ActQuant>,
        format: &'static str,
    ) -> LinearMethod {
        let dev = |t: Option<&Tensor>| t.map(|t| t.to_device(Device::Cuda));
        LinearMethod::Gpu {
            weight: std::sync::Arc::new(weight),
            pre_quant_scale: dev(pre_quant_scale),
            bias: dev(bias),
            act,
            format,
        }
    }
}

fn opt(ckpt: &Checkpoint, name: &str) -> crate::Result<Option<f32>> {
    Ok(if ckpt.contains(name) { Some(ckpt.load_scalar(name)?) } else { None })
}

fn unsupported(ckpt: &Checkpoint, tensor: &str, msg: &str) -> crate::ModelError {
    FormatError::Config { path: ckpt.dir.clone(), field: tensor.to_string(), msg: msg.to_string() }.into()
}

/// The tensors must agree with the quantization config (a mismatch means a broken export or a
/// wrong exclusion list, which vLLM would silently mis-load).
fn check_against_config(ckpt: &Checkpoint, name: &str, stored: Option<LayerAlgo>) -> crate::Result<()> {
    let promised = ckpt.quant.as_ref().and_then(|q| q.algo_for(name));
    let ok = matches!(
        (stored, promised),
        (None, None)
            | (Some(LayerAlgo::Nvfp4), Some(LayerAlgo::Nvfp4 | LayerAlgo::Nvfp4Awq | LayerAlgo::W4A16Nvfp4))
            | (Some(LayerAlgo::Fp8), Some(LayerAlgo::Fp8))
    );
    if ok {
        return Ok(());
    }
    let path = ckpt.quant.as_ref().map_or_else(|| ckpt.dir.join("config.json"), |q| q.source().to_path_buf());
    let msg = match (stored, promised) {
        (Some(s), None) if ckpt.quant.is_none() => {
            format!("stores {} tensors but the checkpoint has no quantization config", s.name())
        }
        (Some(s), None) => format!("stores {} tensors but the quantization config leaves it unquantized", s.name()),
        (None, Some(p)) => format!("the quantization config says {} but the weight is not quantized", p.name()),
        (Some(s), Some(p)) => format!("stores {} tensors but the quantization config says {}", s.name(), p.name()),
        (None, None) => unreachable!(),
    };
    Err(FormatError::Config { path, field: name.to_string(), msg }.into())
}

/// Loads a float parameter as it would sit in a transformers model of dtype `p`: exact in f32,
/// rounded to bf16 for a bf16 model (transformers has no keep-in-fp32 list for Qwen3.5, so even
/// the F32 `A_log` and gated-norm weights are rounded).
pub fn load_param(ckpt: &Checkpoint, name: &str, shape: &[usize], p: Precision) -> crate::Result<Tensor> {
    Ok(Tensor::from_vec(ckpt.load_f32(name, shape)?, shape).round(p))
}
