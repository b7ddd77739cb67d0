//! The CPU model against transformers' golden outputs (tests/reference/make_golden.py).

use fp4_format::Checkpoint;
use fp4_model::{generate, GdnAlgo, GenerateOptions, Logits, Precision, Qwen35, Sampler, SamplingParams};
use std::path::{Path, PathBuf};

const MODELS: [&str; 3] = ["tiny-vl", "tiny-text", "tiny-quant"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

struct Golden {
    tensors: std::collections::HashMap<String, (Vec<usize>, Vec<u8>)>,
    info: serde_json::Value,
}

impl Golden {
    fn load(name: &str) -> Golden {
        let dir = fixture(name);
        let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let tensors = st.tensors().into_iter().map(|(n, v)| (n, (v.shape().to_vec(), v.data().to_vec()))).collect();
        let info = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
        Golden { tensors, info }
    }

    fn f32s(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (shape, b) = &self.tensors[name];
        (shape.clone(), b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    fn ids(&self, n: usize) -> Vec<u32> {
        let (_, b) = &self.tensors[&format!("ids_{n}")];
        b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect()
    }

    fn lengths(&self) -> Vec<usize> {
        self.info["lengths"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect()
    }

    fn tokens(&self, key: &str) -> Vec<u32> {
        self.info[key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
    }
}

fn load(name: &str, p: Precision) -> (Checkpoint, Qwen35) {
    let ckpt = Checkpoint::open(&fixture(name)).unwrap();
    let model = Qwen35::load(&ckpt, fp4_model::LoadOptions::new(p)).unwrap();
    (ckpt, model)
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// max |a − b| / max |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / max_abs(b)
}

fn logits(model: &Qwen35, ids: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache();
    model.forward(ids, &mut cache, Logits::All).unwrap().into_vec()
}

#[test]
fn f32_logits_match_transformers() {
    for name in MODELS {
        let g = Golden::load(name);
        let (_, model) = load(name, Precision::F32);
        for n in g.lengths() {
            let (shape, want) = g.f32s(&format!("logits_{n}"));
            let got = logits(&model, &g.ids(n));
            assert_eq!(shape, vec![n, model.config.vocab_size]);
            let err = rel_err(&got, &want);
            eprintln!("{name} T={n}: max|Δlogit|/max|logit| = {err:.2e}");
            assert!(err < 1e-4, "{name} T={n}: relative error {err:.2e}");
        }
    }
}

#[test]
fn greedy_continuation_matches_transformers() {
    for name in MODELS {
        let g = Golden::load(name);
        let (ckpt, model) = load(name, Precision::F32);
        let prompt = g.ids(g.info["greedy_prompt_len"].as_u64().unwrap() as usize);
        let want = g.tokens("greedy_tokens");
        let mut sampler = Sampler::new(SamplingParams::default()).unwrap();
        let opts = GenerateOptions { max_tokens: want.len(), stop_ids: vec![] };
        let got = generate(&model, &prompt, &opts, &mut sampler, |_| {}).unwrap();
        assert_eq!(got, want, "{name}: greedy continuation (stop tokens ignored)");
        // transformers' generate stops at the generation_config eos ids; so must we.
        let want = g.tokens("generate_tokens");
        let opts = GenerateOptions { max_tokens: 24, stop_ids: ckpt.eos_token_ids.clone() };
        let got = generate(&model, &prompt, &opts, &mut sampler, |_| {}).unwrap();
        assert_eq!(got, want, "{name}: greedy generate with stop ids {:?}", ckpt.eos_token_ids);
    }
}

/// `got` (a second way of computing the 150-token logits) matches both `base` and transformers.
fn assert_same_150(g: &Golden, name: &str, what: &str, got: &[f32], base: &[f32]) {
    let err = rel_err(got, base);
    let err_hf = rel_err(got, &g.f32s("logits_150").1);
    eprintln!("{name}: {what} {err:.2e}; vs transformers {err_hf:.2e}");
    assert!(err < 1e-4 && err_hf < 1e-4, "{name}: {what} {err:.2e}, vs HF {err_hf:.2e}");
}

#[test]
fn chunked_prefill_equals_recurrent() {
    for name in MODELS {
        let g = Golden::load(name);
        let (_, mut model) = load(name, Precision::F32);
        let ids = g.ids(150);
        let chunked = logits(&model, &ids);
        model.prefill_algo = GdnAlgo::Recurrent;
        let recurrent = logits(&model, &ids);
        assert_same_150(&g, name, "recurrent vs chunked", &recurrent, &chunked);
    }
}

#[test]
fn prefill_in_pieces_equals_one_shot() {
    for name in MODELS {
        let g = Golden::load(name);
        let (_, model) = load(name, Precision::F32);
        let ids = g.ids(150);
        let one_shot = logits(&model, &ids);
        let mut cache = model.new_cache();
        let mut pieces = Vec::new();
        // Pieces cross chunk boundaries and include a single-token (recurrent) step.
        for range in [0..37, 37..38, 38..101, 101..150] {
            pieces.extend(model.forward(&ids[range], &mut cache, Logits::All).unwrap().into_vec());
        }
        assert_eq!(cache.seq_len, 150);
        assert_same_150(&g, name, "pieces vs one shot", &pieces, &one_shot);
    }
}

/// bf16 mode rounds where transformers' bf16 forward rounds. On 5 tokens every reduction is
/// tiny and the logits agree bit for bit; on 100 tokens f32 summation order (GEMMs, the UT solve)
/// flips occasional bf16 roundings, which a random model amplifies, so the bound is looser.
#[test]
fn bf16_logits_track_transformers_bf16() {
    for name in MODELS {
        let g = Golden::load(name);
        let (_, model) = load(name, Precision::Bf16);
        let ids = g.ids(100);
        let (_, want) = g.f32s("logits_bf16_5");
        let got = logits(&model, &ids[..5]);
        let err = rel_err(&got, &want);
        eprintln!("{name}: bf16 mode vs HF bf16, T=5: {err:.2e}");
        assert!(err < 1e-3, "{name}: bf16 T=5 error {err:.2e}");

        let (_, want) = g.f32s("logits_bf16_100");
        let got = logits(&model, &ids);
        let err = rel_err(&got, &want);
        let (_, f32_ref) = g.f32s("logits_100");
        let f32_gap = rel_err(&f32_ref, &want);
        let vocab = model.config.vocab_size;
        let argmax = |v: &[f32]| -> Vec<usize> {
            v.chunks_exact(vocab).map(|r| (0..vocab).fold(0, |b, i| if r[i] > r[b] { i } else { b })).collect()
        };
        let agree = argmax(&got).iter().zip(argmax(&want)).filter(|(a, b)| **a == *b).count();
        eprintln!("{name}: T=100: {err:.2e} (HF f32 vs HF bf16 {f32_gap:.2e}), top-1 agreement {agree}/100");
        assert!(err < f32_gap, "{name}: bf16 mode error {err:.2e} exceeds the f32/bf16 gap {f32_gap:.2e}");
        assert!(agree >= 95, "{name}: top-1 agreement {agree}/100");
    }
}
