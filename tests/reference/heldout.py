#!/usr/bin/env python3
"""Checks `fp4 logits` and `fp4 generate` against transformers on freshly made model directories
that are not in the repo (unusual but valid shapes, both layouts, sharded and single-file).

    python3 tests/reference/heldout.py --fp4 target/release/fp4 --work /tmp/heldout

Prints one line per model and exits non-zero if any check fails:
  logits: max|fp4 - HF| / max|HF| over every position, lengths 1..200 (bound 1e-4)
  greedy: `fp4 generate --json` (temperature 0) vs HF `generate(do_sample=False)`, token for token
"""
import argparse
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
import make_golden as mg  # noqa: E402
from transformers import Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration, Qwen3_5TextConfig  # noqa: E402

LENGTHS = [1, 63, 64, 65, 200]


def text_cfg(**kw):
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=72, num_hidden_layers=5,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=16,
                linear_value_head_dim=8, linear_conv_kernel_dim=4, eos_token_id=1,
                rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                                     mrope_section=[2, 1, 1], mrope_interleaved=True))
    base.update(kw)
    return base


CASES = {
    # k and v head dims differ, 3 value heads per key head, irregular layer types, sharded VL
    "vl-sharded-dk-ne-dv": ("vl", text_cfg(layer_types=["full_attention", "linear_attention", "linear_attention",
                                                        "full_attention", "linear_attention"]), "40KB"),
    # flat layout, 4 value heads per key head, dv > dk, conv kernel 2, tied, all-linear but one
    "flat-tied-k2": ("text", text_cfg(num_hidden_layers=4, linear_num_key_heads=1, linear_num_value_heads=4,
                                      linear_key_head_dim=8, linear_value_head_dim=24, linear_conv_kernel_dim=2,
                                      tie_word_embeddings=True, head_dim=16, num_key_value_heads=1,
                                      layer_types=["linear_attention"] * 3 + ["full_attention"],
                                      rope_parameters=dict(rope_type="default", rope_theta=5e5,
                                                           partial_rotary_factor=0.5, mrope_section=[2, 1, 1])), None),
    # flat, no layer_types (interval default), MHA attention, equal heads
    "flat-interval": ("text", text_cfg(num_hidden_layers=8, layer_types=None, num_key_value_heads=4,
                                       linear_num_key_heads=3, linear_num_value_heads=3,
                                       linear_value_head_dim=16), None),
}


def build(name, kind, cfg, shard, out, seed):
    gen = torch.Generator().manual_seed(seed * 1000 + sum(map(ord, name)))
    torch.manual_seed(0)
    if kind == "vl":
        c = Qwen3_5Config(text_config=cfg, vision_config=dict(depth=1, hidden_size=16, intermediate_size=32,
                                                              num_heads=2, patch_size=4, out_hidden_size=64),
                          tie_word_embeddings=cfg.get("tie_word_embeddings", False))
        model, cls = Qwen3_5ForConditionalGeneration(c), Qwen3_5ForConditionalGeneration
    else:
        cfg = {k: v for k, v in cfg.items() if v is not None}
        model, cls = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**cfg)), Qwen3_5ForCausalLM
    mg.perturb(model, gen)
    mg.to_checkpoint_dtypes(model)
    d = os.path.join(out, name)
    model.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
    return d, cls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp4", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--seed", type=int, default=0, help="varies the random weights")
    args = ap.parse_args()
    torch.set_num_threads(4)
    ok = True
    for name, (kind, cfg, shard) in CASES.items():
        d, cls = build(name, kind, cfg, shard, args.work, args.seed)
        ref = cls.from_pretrained(d, dtype=torch.float32).eval()
        vocab = ref.config.get_text_config().vocab_size
        g = torch.Generator().manual_seed(7)
        worst = 0.0
        for n in LENGTHS:
            ids = torch.randint(0, vocab, (1, n), generator=g)
            with torch.no_grad():
                want = ref(input_ids=ids).logits[0].float()
            out = os.path.join(args.work, f"{name}-{n}.safetensors")
            subprocess.run([args.fp4, "logits", "--model", d, "--input-ids", ",".join(map(str, ids[0].tolist())),
                            "--out", out], check=True, capture_output=True)
            got = load_file(out)["logits"]
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
        prompt = torch.randint(0, vocab, (1, 50), generator=g)
        with torch.no_grad():
            hf = ref.generate(prompt, max_new_tokens=32, do_sample=False)[0, 50:].tolist()
        res = subprocess.run([args.fp4, "generate", "--model", d, "--input-ids", ",".join(map(str, prompt[0].tolist())),
                              "--max-tokens", "32", "--json"], check=True, capture_output=True, text=True)
        ours = json.loads(res.stdout.strip().splitlines()[-1])["output_ids"]
        good = worst < 1e-4 and ours == hf
        ok &= good
        print(f"{name}: logits rel err {worst:.2e} over lengths {LENGTHS}; greedy {'identical' if ours == hf else 'DIFFERS'}"
              f" ({len(ours)} tokens) -> {'ok' if good else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
