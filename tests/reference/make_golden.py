#!/usr/bin/env python3
"""Golden fixtures for fp4's Qwen3.5 CPU model, made with HF transformers.

Run on a machine with torch + transformers (the GPU box; everything runs on its CPU so that
no TF32/cuDNN path is involved):

    python3 tests/reference/make_golden.py --out /tmp/fixtures

It writes one directory per tiny model, each a normal HF checkpoint (config.json,
generation_config.json, tokenizer.json, safetensors) plus `golden.safetensors` and
`golden.json` with the reference outputs. The Rust tests in tests/golden.rs read them.

Models (random weights, every parameter perturbed so each one matters):
  tiny-vl    VL wrapper layout (Qwen3_5ForConditionalGeneration with a tiny vision tower and
             extra `mtp.*` tensors, both to be ignored), sharded, untied lm_head, 3 value heads
             per key head, dk != dv, irregular layer_types, attention_bias off.
  tiny-quant tiny-vl's shapes with a smooth (contractive) draw, for the NVFP4 tests.
  tiny-text  flat text-only layout (Qwen3_5ForCausalLM), single file, tied embeddings,
             conv kernel 3, partial rotary 0.5, interval layer_types.
Both store weights in BF16 with A_log and linear_attn.norm.weight in F32 (as real checkpoints
do); the fp32 reference loads them exactly with dtype=torch.float32.
"""
import argparse
import importlib.util
import inspect
import json
import math
import os
import platform
import sys

# The pure-torch reference must run: refuse if the fused-kernel packages are importable.
for pkg in ("fla", "causal_conv1d"):
    if importlib.util.find_spec(pkg) is not None:
        sys.exit(f"{pkg} is installed: transformers would use its kernels instead of the torch reference")

import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Qwen3_5Config,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5TextConfig,
)
from transformers.models.qwen3_5 import modeling_qwen3_5

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
LENGTHS = [1, 40, 100, 150]
GREEDY_PROMPT = 40
GREEDY_NEW = 24

CORPUS = """
Annie is a warm voice companion. She answers in one or two short sentences and never uses markdown.
The capital of Japan is Tokyo. The capital of France is Paris. Water boils at one hundred degrees.
Let me check the weather for you: it is sunny in Dallas, Texas, with a light breeze from the south.
Numbers like 12, 345 and 6789 are split into single digits by the Qwen pre-tokenizer regex.
Tool calls look like <tool_call><function=search_memory><parameter=query>birthday</parameter></function></tool_call>.
Unicode matters too: café, naïve, Zürich, 東京, привет, and emoji like 🙂 must round-trip byte for byte.
"""


def make_tokenizer(vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 20, trainer)
    tok.add_special_tokens(SPECIAL)
    return tok


def perturb(model, gen, smooth=False):
    """Re-draw every parameter so that each one visibly changes the output. `smooth` draws a
    contractive model (small gains), whose logits move smoothly with weight noise: the one to
    compare quantized forwards on, where the chaotic default would amplify rounding flips."""
    k = 0.3 if smooth else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(0.5, 8.0 if not smooth else 3.0, generator=gen).log())
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 * k)
            elif name.endswith("linear_attn.norm.weight"):
                p.copy_(torch.empty_like(p).uniform_(1 - 0.5 * k, 1 + 0.5 * k, generator=gen))
            elif "norm" in name and p.dim() == 1:  # zero-centred (1+w) norms, incl. q/k norms
                p.copy_(torch.empty_like(p).uniform_(-0.5 * k, 0.5 * k, generator=gen))
            elif "conv1d" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 * k)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]) * (0.5 if smooth else 1.0))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def to_checkpoint_dtypes(model):
    """BF16 everywhere except A_log and the gated-norm weight, which real checkpoints keep in F32."""
    for name, p in model.named_parameters():
        if not (name.endswith("A_log") or name.endswith("linear_attn.norm.weight")):
            p.data = p.data.to(torch.bfloat16)


def add_mtp_shard(out_dir, hidden, gen):
    """Real VL checkpoints carry an MTP head under `mtp.`: add a few such tensors in their own shard."""
    tensors = {
        "mtp.fc.weight": torch.randn(hidden, 2 * hidden, generator=gen).to(torch.bfloat16),
        "mtp.norm.weight": torch.randn(hidden, generator=gen).to(torch.bfloat16),
        "mtp.layers.0.mlp.up_proj.weight": torch.randn(8, hidden, generator=gen).to(torch.bfloat16),
    }
    save_file(tensors, os.path.join(out_dir, "model-mtp.safetensors"), metadata={"format": "pt"})
    index_path = os.path.join(out_dir, "model.safetensors.index.json")
    index = json.load(open(index_path))
    for k in tensors:
        index["weight_map"][k] = "model-mtp.safetensors"
    json.dump(index, open(index_path, "w"), indent=2)


def greedy_manual(model, prompt, steps):
    """Greedy decoding with the KV/GDN cache, one token per forward (HF's recurrent path).
    Ignores stop tokens. Also records each step's top-1/top-2 margin (near-ties would make the
    comparison fragile)."""
    out = model(input_ids=prompt, use_cache=True)
    pkv, tokens, margins = out.past_key_values, [], []
    logits = out.logits[0, -1]
    for _ in range(steps):
        top = torch.topk(logits.float(), 2)
        margins.append(float(top.values[0] - top.values[1]))
        nxt = int(torch.argmax(logits))
        tokens.append(nxt)
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=pkv, use_cache=True)
        pkv, logits = out.past_key_values, out.logits[0, -1]
    return tokens, margins


def build(name, out_root, make_model, seed, tokenizer, smooth=False):
    out_dir = os.path.join(out_root, name)
    os.makedirs(out_dir, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model, cls, shard = make_model()
    perturb(model, gen, smooth)
    to_checkpoint_dtypes(model)
    model.save_pretrained(out_dir, max_shard_size=shard)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    text_cfg = model.config.get_text_config()
    if name in ("tiny-vl", "tiny-quant"):
        add_mtp_shard(out_dir, text_cfg.hidden_size, gen)

    vocab = text_cfg.vocab_size
    golden, info = {}, {"model": name, "class": cls.__name__, "lengths": LENGTHS}
    ref = cls.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids_gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n in LENGTHS:
            ids = torch.randint(0, vocab, (1, n), generator=ids_gen)
            golden[f"ids_{n}"] = ids[0].to(torch.int64)
            golden[f"logits_{n}"] = ref(input_ids=ids).logits[0].float().contiguous()
        prompt = golden[f"ids_{GREEDY_PROMPT}"][None]
        tokens, margins = greedy_manual(ref, prompt, GREEDY_NEW)
        info["greedy_prompt_len"] = GREEDY_PROMPT
        info["greedy_tokens"] = tokens
        info["greedy_min_margin"] = min(margins)
        # transformers' own generate (stops at generation_config's eos ids).
        hf = ref.generate(prompt, max_new_tokens=GREEDY_NEW, do_sample=False)
        info["generate_tokens"] = hf[0, GREEDY_PROMPT:].tolist()
        info["generate_text"] = tokenizer.decode(info["generate_tokens"], skip_special_tokens=True)
        # bf16 run (HF rounds every parameter, A_log and norm included, to bf16).
        ref16 = cls.from_pretrained(out_dir, dtype=torch.bfloat16, attn_implementation="eager").eval()
        # Short inputs: every reduction is tiny, so the bf16 mode should agree bit for bit.
        golden["logits_bf16_5"] = ref16(input_ids=golden["ids_100"][None, :5]).logits[0].float().contiguous()
        golden["logits_bf16_100"] = ref16(input_ids=golden["ids_100"][None]).logits[0].float().contiguous()
    save_file(golden, os.path.join(out_dir, "golden.safetensors"))
    json.dump(info, open(os.path.join(out_dir, "golden.json"), "w"), indent=2)
    print(name, json.dumps(info))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(4)
    os.makedirs(args.out, exist_ok=True)
    tokenizer = make_tokenizer(384)
    vocab = tokenizer.get_vocab_size()
    im_end, eot = tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")

    def vl():
        text = dict(
            vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
            layer_types=["linear_attention", "full_attention", "linear_attention",
                         "linear_attention", "linear_attention", "full_attention"],
            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            linear_num_key_heads=2, linear_num_value_heads=6,
            linear_key_head_dim=16, linear_value_head_dim=24, linear_conv_kernel_dim=4,
            rope_parameters=dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=0.25,
                                 mrope_section=[2, 1, 1], mrope_interleaved=True),
            eos_token_id=im_end, tie_word_embeddings=False,
        )
        vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4,
                      out_hidden_size=64, num_position_embeddings=16)
        cfg = Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=False)
        m = Qwen3_5ForConditionalGeneration(cfg)
        m.generation_config.eos_token_id = [im_end, eot]
        return m, Qwen3_5ForConditionalGeneration, "150KB"

    def text():
        cfg = Qwen3_5TextConfig(
            vocab_size=vocab, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=1, head_dim=16,
            linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=3,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                 mrope_section=[2, 1, 1], mrope_interleaved=True),
            eos_token_id=im_end, tie_word_embeddings=True,
        )
        m = Qwen3_5ForCausalLM(cfg)
        m.generation_config.eos_token_id = [im_end, eot]
        return m, Qwen3_5ForCausalLM, "50MB"

    build("tiny-vl", args.out, vl, 1234, tokenizer)
    build("tiny-text", args.out, text, 5678, tokenizer)
    # The model the NVFP4 tests compare quantized forwards on (same shapes as tiny-vl, smooth).
    build("tiny-quant", args.out, vl, 4321, tokenizer, smooth=True)

    import tokenizers
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "fla": None,
        "causal_conv1d": None,
        "chunk_rule_uses_solve_triangular": "solve_triangular"
        in inspect.getsource(modeling_qwen3_5.torch_chunk_gated_delta_rule),
        "chunk_rule_is_torch_reference": modeling_qwen3_5.torch_chunk_gated_delta_rule.__module__,
    }
    json.dump(versions, open(os.path.join(args.out, "versions.json"), "w"), indent=2)
    with open(os.path.join(args.out, "modeling_qwen3_5.py.txt"), "w") as f:
        f.write(inspect.getsource(modeling_qwen3_5))
    print(json.dumps(versions))


if __name__ == "__main__":
    main()
