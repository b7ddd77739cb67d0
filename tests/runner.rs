//! The batch decode runner on the CPU (the reference its GPU twin is checked against by
//! `fp4 selftest --gpu`): sequences of different lengths decoded together through state slots
//! and paged KV blocks give exactly the tokens each gives alone, and the block and slot
//! accounting holds.

use fp4_format::Checkpoint;
use fp4_model::runner::RunnerError;
use fp4_model::{
    generate, DecodeRunner, GenerateOptions, LoadOptions, Logits, Precision, Qwen35, RunnerConfig, Sampler,
    SamplingParams, SeqState,
};
use std::path::Path;

fn model(name: &str) -> Qwen35 {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    Qwen35::load(&Checkpoint::open(&dir).unwrap(), LoadOptions::new(Precision::F32)).unwrap()
}

fn prompts(n: usize, vocab: u64) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            (0..(1 + (i * 7 + 3) % 40) as u64).map(|j| ((j * 2654435761 + 17 + 31 * i as u64) % vocab) as u32).collect()
        })
        .collect()
}

fn prefill(model: &Qwen35, runner: &mut DecodeRunner, prompt: &[u32]) -> (SeqState, u32) {
    let mut cache = model.new_cache();
    let logits = model.forward(prompt, &mut cache, Logits::Last).unwrap();
    let first = Sampler::new(SamplingParams::default()).unwrap().sample_tensor(&logits);
    (runner.admit(&cache).unwrap(), first)
}

#[test]
fn batched_decode_equals_each_sequence_alone() {
    for name in ["tiny-text", "modelopt/tiny-quant/nvfp4_default"] {
        let model = model(name);
        let steps = 10;
        let all = prompts(9, model.config.vocab_size as u64);
        let opts = GenerateOptions { max_tokens: steps, stop_ids: vec![] };
        let mut sampler = Sampler::new(SamplingParams::default()).unwrap();
        let want: Vec<Vec<u32>> =
            all.iter().map(|p| generate(&model, p, &opts, &mut sampler, |_| {}).unwrap()).collect();
        // Block size 4: every sequence crosses several blocks while decoding.
        let cfg = RunnerConfig { max_seqs: 9, max_model_len: 64, kv_blocks: 9 * 16, block_size: 4, graphs: false };
        let mut runner = DecodeRunner::new(&model, cfg);
        let (mut seqs, mut out): (Vec<SeqState>, Vec<Vec<u32>>) = all
            .iter()
            .map(|p| {
                let (s, first) = prefill(&model, &mut runner, p);
                (s, vec![first])
            })
            .unzip();
        for _ in 1..steps {
            let inputs: Vec<u32> = out.iter().map(|o| *o.last().unwrap()).collect();
            let mut refs: Vec<&mut SeqState> = seqs.iter_mut().collect();
            for (o, t) in out.iter_mut().zip(runner.step_greedy(&model, &mut refs, &inputs).unwrap()) {
                o.push(t);
            }
        }
        assert_eq!(out, want, "{name}");
        // Logits steps pick the same tokens as greedy steps (one more step on every sequence).
        let inputs: Vec<u32> = out.iter().map(|o| *o.last().unwrap()).collect();
        let mut refs: Vec<&mut SeqState> = seqs.iter_mut().take(3).collect();
        let logits = runner.step_logits(&model, &mut refs, &inputs[..3]).unwrap();
        assert_eq!(logits.shape(), [3, model.config.vocab_size]);
        assert_eq!(runner.free_slots(), 0);
        for s in seqs {
            runner.release(s);
        }
        assert_eq!((runner.free_blocks(), runner.free_slots()), (9 * 16, 9), "every block and slot comes back");
    }
}

#[test]
fn runner_refuses_what_does_not_fit() {
    let model = model("tiny-text");
    let cfg = RunnerConfig { max_seqs: 2, max_model_len: 12, kv_blocks: 3, block_size: 4, graphs: false };
    let mut runner = DecodeRunner::new(&model, cfg);
    let (mut a, t) = prefill(&model, &mut runner, &[1, 2, 3, 4, 5, 6, 7]);
    // 7 tokens + the next one need 2 blocks; a second 7-token sequence needs 2 more of the 1 left.
    let mut cache = model.new_cache();
    model.forward(&[1, 2, 3, 4, 5, 6, 7], &mut cache, Logits::Last).unwrap();
    assert_eq!(runner.admit(&cache).unwrap_err(), RunnerError::OutOfBlocks { need: 2, free: 1 });
    // Decoding to the context limit fails cleanly there.
    let mut next = t;
    let mut err = None;
    for _ in 0..8 {
        match runner.step_greedy(&model, &mut [&mut a], &[next]) {
            Ok(ids) => next = ids[0],
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    assert_eq!(err, Some(RunnerError::ContextFull(12)));
    assert_eq!(a.len, 12);
    let too_many = RunnerConfig::from_budget(&model.config, 4, 64, 16, 10, false);
    assert!(matches!(too_many, Err(RunnerError::BudgetTooSmall { .. })));
}
