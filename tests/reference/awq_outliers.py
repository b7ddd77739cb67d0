#!/usr/bin/env python3
"""A held-out AWQ check: a tiny Qwen3.5 with activation-outlier channels, and what ModelOpt 0.47
achieves on it in fake-quant (needs CUDA: ModelOpt's NVFP4 fake-quant kernels are GPU-only).

    python3 tests/reference/awq_outliers.py --src tests/fixtures/tiny-quant --out /tmp/awq

Builds <out>/model from --src: per layer, a few fixed hidden channels get (1+w) ≈ 16 in both
norms (the massive-activation channels of real LLMs) and the columns of the linears reading them
are divided by 8, so activations carry outliers while the function stays tame. Writes
calib.jsonl and eval.jsonl (random ids, pre-tokenized), then for NVFP4_DEFAULT_CFG and
NVFP4_AWQ_LITE_CFG: ModelOpt's fake-quant KL(bf16 ‖ quant) on eval.jsonl (mean over positions,
as `fp4 eval kl` computes it) and the HF export (<out>/modelopt_<name>). Results: <out>/modelopt.json.
"""
import argparse
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

OUTLIER_GAIN = 16.0
COLUMN_DIVISOR = 8.0
READERS = {
    "input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                        "linear_attn.in_proj_qkv", "linear_attn.in_proj_z",
                        "linear_attn.in_proj_a", "linear_attn.in_proj_b"],
    "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"],
}


def build(src, dst, channels):
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    for f in sorted(os.listdir(dst)):
        if not f.endswith(".safetensors") or f.startswith("golden"):
            continue
        path = os.path.join(dst, f)
        t = load_file(path)
        for k, v in t.items():
            for norm, readers in READERS.items():
                if k.endswith(f"{norm}.weight") and ".layers." in k and not k.startswith("mtp."):
                    v = v.float()
                    v[channels] = OUTLIER_GAIN - 1.0
                    t[k] = v.to(torch.bfloat16)
                elif any(k.endswith(r + ".weight") for r in readers) and not k.startswith("mtp."):
                    v = v.float()
                    v[:, channels] /= COLUMN_DIVISOR
                    t[k] = v.to(torch.bfloat16)
        save_file(t, path, metadata={"format": "pt"})
    for f in ("golden.json", "golden.safetensors"):
        if os.path.exists(os.path.join(dst, f)):
            os.remove(os.path.join(dst, f))


def kl_mean(ref_logits, q_logits):
    lp = torch.log_softmax(ref_logits.float(), -1)
    lq = torch.log_softmax(q_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    model_dir = os.path.join(args.out, "model")
    cfg = json.load(open(os.path.join(args.src, "config.json")))
    text = cfg.get("text_config", cfg)
    hidden, vocab = text["hidden_size"], text["vocab_size"]
    channels = torch.randperm(hidden, generator=g)[:3]
    build(args.src, model_dir, channels)
    calib = [torch.randint(0, vocab, (64,), generator=g) for _ in range(32)]
    evals = [torch.randint(0, vocab, (64,), generator=g) for _ in range(16)]
    for name, rows in (("calib.jsonl", calib), ("eval.jsonl", evals)):
        with open(os.path.join(args.out, name), "w") as f:
            for ids in rows:
                f.write(json.dumps({"input_ids": ids.tolist()}) + "\n")

    import modelopt
    import modelopt.torch.quantization as mtq
    import transformers
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoConfig, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration

    def load():
        c = AutoConfig.from_pretrained(model_dir)
        cls = Qwen3_5ForConditionalGeneration if c.model_type == "qwen3_5" else Qwen3_5ForCausalLM
        return cls.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()

    def logits(model):
        with torch.no_grad():
            return [model(input_ids=ids[None].cuda()).logits[0].float().cpu() for ids in evals]

    ref = logits(load())
    results = {"outlier_channels": channels.tolist(), "modelopt": modelopt.__version__,
               "transformers": transformers.__version__, "torch": torch.__version__,
               "device": torch.cuda.get_device_name(0)}
    for name, cfg_name in (("nvfp4_default", "NVFP4_DEFAULT_CFG"), ("nvfp4_awq_lite", "NVFP4_AWQ_LITE_CFG")):
        model = load()

        def forward_loop(m):
            with torch.no_grad():
                for ids in calib:
                    m(input_ids=ids[None].cuda())

        mtq.quantize(model, getattr(mtq, cfg_name), forward_loop)
        q = logits(model)
        kl = torch.cat([kl_mean(r, x) for r, x in zip(ref, q)])
        top1 = torch.cat([(r.argmax(-1) == x.argmax(-1)).float() for r, x in zip(ref, q)])
        results[name] = {"fake_quant_kl_mean": kl.mean().item(), "fake_quant_kl_p99": kl.quantile(0.99).item(),
                         "fake_quant_top1": top1.mean().item()}
        out_dir = os.path.join(args.out, f"modelopt_{name}")
        shutil.rmtree(out_dir, ignore_errors=True)
        export_hf_checkpoint(model, export_dir=out_dir, dtype=torch.bfloat16)
        print(name, json.dumps(results[name]), flush=True)
    json.dump(results, open(os.path.join(args.out, "modelopt.json"), "w"), indent=2)


if __name__ == "__main__":
    main()
