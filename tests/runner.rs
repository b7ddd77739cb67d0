//! The batch decode runner on the CPU (the reference its GPU twin is checked against by
//! `fp4 selftest --gpu`): sequences of different lengths decoded together through state slots
//! and paged KV blocks give exactly the tokens each gives alone, and the block and slot
//! accounting holds.

use fp4_format::Checkpoint;
use fp4_model::runner::RunnerError;
use fp4_model::{
    generate, generate_speculative, DecodeRunner, Drafter, GenerateOptions, LoadOptions, Logits, Mtp, MtpDrafter,
    Precision, Qwen35, RunnerConfig, Sampler, SamplingParams, SeqState, Synthetic, SyntheticFormat, Tensor,
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
        let cfg = RunnerConfig {
            max_seqs: 9,
            max_model_len: 64,
            kv_blocks: 9 * 16,
            block_size: 4,
            graphs: false,
            spec_tokens: 0,
        };
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
    let cfg =
        RunnerConfig { max_seqs: 2, max_model_len: 12, kv_blocks: 3, block_size: 4, graphs: false, spec_tokens: 0 };
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
    let too_many = RunnerConfig::from_budget(&model.config, 4, 64, 16, 10, false, 0);
    assert!(matches!(too_many, Err(RunnerError::BudgetTooSmall { .. })));
}

/// The tiny synthetic model with an MTP head (random weights, f32).
fn tiny_with_head() -> (Qwen35, Mtp) {
    let src = Synthetic::named("tiny", SyntheticFormat::Bf16, 11).unwrap().with_mtp();
    let o = LoadOptions::new(Precision::F32);
    (Qwen35::load(&src, o).unwrap(), Mtp::load(&src, o).unwrap().expect("an MTP head"))
}

/// Every prompt prefilled and handed to the runner; their states and first tokens.
fn admit_all(
    model: &Qwen35,
    mtp: &Mtp,
    runner: &mut DecodeRunner,
    prompts: &[Vec<u32>],
) -> (Vec<SeqState>, Vec<Vec<u32>>) {
    prompts
        .iter()
        .map(|p| {
            let (s, first) = runner.prefill_speculative(model, mtp, p).unwrap();
            (s, vec![first])
        })
        .unzip()
}

/// One greedy speculative step of `seqs` (`DecodeRunner::step_speculative_greedy`).
fn speculative_step(
    model: &Qwen35,
    mtp: &Mtp,
    runner: &mut DecodeRunner,
    seqs: &mut [SeqState],
    inputs: &[u32],
    drafts: Option<Vec<Vec<u32>>>,
) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let mut refs: Vec<&mut SeqState> = seqs.iter_mut().collect();
    let step = runner.step_speculative_greedy(model, mtp, &mut refs, inputs, drafts).unwrap();
    (step.guessed, step.emitted)
}

/// Speculative steps with drafts that are right, partly right and wrong give exactly the plain
/// greedy tokens: a verify keeps the GDN state after each draft and the kept one continues.
#[test]
fn speculative_steps_keep_exactly_the_plain_greedy_tokens() {
    let (model, mtp) = tiny_with_head();
    let (steps, k) = (14, 3);
    let all = prompts(3, model.config.vocab_size as u64);
    let opts = GenerateOptions { max_tokens: steps + 2 * (k + 1), stop_ids: vec![] };
    let mut sampler = Sampler::new(SamplingParams::default()).unwrap();
    let want: Vec<Vec<u32>> = all.iter().map(|p| generate(&model, p, &opts, &mut sampler, |_| {}).unwrap()).collect();
    let cfg = RunnerConfig {
        max_seqs: 3,
        max_model_len: 96,
        kv_blocks: 3 * 24,
        block_size: 4,
        graphs: false,
        spec_tokens: k,
    };
    let mut runner = DecodeRunner::new(&model, cfg);
    let (mut seqs, mut out) = admit_all(&model, &mtp, &mut runner, &all);
    let mut kept_any = [false; 4];
    for step in 0..steps {
        // Sequence b's drafts are the true continuation, wrong from index (step + b) % 4 on
        // (4: all right).
        let drafts: Vec<Vec<u32>> = out
            .iter()
            .enumerate()
            .map(|(b, o)| {
                let wrong_from = (step + b) % (k + 1);
                (0..k).map(|i| want[b][o.len() + i] ^ u32::from(i >= wrong_from)).collect()
            })
            .collect();
        let inputs: Vec<u32> = out.iter().map(|o| *o.last().unwrap()).collect();
        let (_, emitted) = speculative_step(&model, &mtp, &mut runner, &mut seqs, &inputs, Some(drafts));
        for (b, e) in emitted.into_iter().enumerate() {
            kept_any[(e.len() - 1).min(k)] = true;
            out[b].extend(e);
        }
        if out.iter().any(|o| o.len() + k + 1 > want[0].len()) {
            break;
        }
    }
    for (b, o) in out.iter().enumerate() {
        assert_eq!(o[..], want[b][..o.len()], "sequence {b}");
        assert_eq!(seqs[b].len, all[b].len() + o.len() - 1, "cached tokens of sequence {b}");
    }
    assert_eq!(kept_any, [true; 4], "every count of kept drafts, 0 to {k}, was exercised");
    for s in seqs {
        runner.release(s);
    }
    assert_eq!((runner.free_blocks(), runner.free_slots()), (3 * 24, 3 * (k + 1)), "every block and slot comes back");
}

/// The batched MTP drafts are the single-sequence drafter's, step for step, and greedy output is
/// the plain one, several sequences drafting together: with the weights as loaded and with
/// drafting in NVFP4 (the MTP layer, and a copy of the LM head picking the tokens).
#[test]
fn batched_mtp_drafts_equal_the_sequence_drafter() {
    let mut drafts = Vec::new();
    for nvfp4 in [false, true] {
        let (model, mut mtp) = tiny_with_head();
        if nvfp4 {
            assert!(mtp.quantize_for_drafting(&model), "the tiny model's BF16 LM head has an NVFP4 copy");
        }
        drafts.push(drafts_equal_the_sequence_drafter(&model, &mtp));
    }
    assert_ne!(drafts[0], drafts[1], "drafting in NVFP4 reads other weights");
}

/// The runner's drafts, per sequence and step (checked against the sequence drafter's).
fn drafts_equal_the_sequence_drafter(model: &Qwen35, mtp: &Mtp) -> Vec<Vec<Vec<u32>>> {
    let (max_tokens, k) = (12, 2);
    let all = prompts(3, model.config.vocab_size as u64);
    // The reference: each sequence alone, its drafts recorded.
    struct Recording<'a> {
        inner: MtpDrafter<'a>,
        log: Vec<Vec<u32>>,
    }
    impl Drafter for Recording<'_> {
        fn observe(&mut self, model: &Qwen35, next_ids: &[u32], hidden: &Tensor) -> fp4_model::Result<()> {
            self.inner.observe(model, next_ids, hidden)
        }
        fn draft(&mut self, model: &Qwen35, k: usize) -> fp4_model::Result<Vec<u32>> {
            let d = self.inner.draft(model, k)?;
            self.log.push(d.clone());
            Ok(d)
        }
        fn rollback(&mut self, len: usize) {
            self.inner.rollback(len)
        }
    }
    let opts = GenerateOptions { max_tokens, stop_ids: vec![] };
    let reference: Vec<(Vec<u32>, Vec<Vec<u32>>)> = all
        .iter()
        .map(|p| {
            let mut rec = Recording { inner: MtpDrafter::new(mtp).unwrap(), log: vec![] };
            let (out, _) =
                generate_speculative(model, &mut rec, p, &opts, k, SamplingParams::default(), |_| {}).unwrap();
            (out, rec.log)
        })
        .collect();
    let cfg = RunnerConfig {
        max_seqs: 3,
        max_model_len: 64,
        kv_blocks: 3 * 16,
        block_size: 4,
        graphs: false,
        spec_tokens: k,
    };
    let mut runner = DecodeRunner::new(model, cfg);
    let (mut seqs, mut out) = admit_all(model, mtp, &mut runner, &all);
    let mut guesses = vec![vec![]; all.len()];
    while out.iter().any(|o| o.len() < max_tokens) {
        let inputs: Vec<u32> = out.iter().map(|o| *o.last().unwrap()).collect();
        let (guessed, emitted) = speculative_step(model, mtp, &mut runner, &mut seqs, &inputs, None);
        for b in 0..all.len() {
            if out[b].len() < max_tokens {
                guesses[b].push(guessed[b].clone());
                out[b].extend(&emitted[b]);
            }
        }
    }
    for (b, (want_out, want_drafts)) in reference.iter().enumerate() {
        assert_eq!(out[b][..max_tokens], want_out[..], "sequence {b}'s tokens");
        assert_eq!(guesses[b], *want_drafts, "sequence {b}'s drafts");
    }
    guesses
}
