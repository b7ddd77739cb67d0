#!/usr/bin/env python3
"""The function a quantized checkpoint's tensors define, computed by transformers in fp32.

    python3 tests/reference/dequant_reference.py --model DIR --ids eval.safetensors --out logits.safetensors

Every NVFP4 linear (ModelOpt `weight`/`weight_scale`/`weight_scale_2`, or compressed-tensors
`weight_packed`/`weight_global_scale`) and FP8 linear is dequantized to a dense fp32 weight; a
`pre_quant_scale` (AWQ) multiplies the input, i.e. scales the weight's columns. Activations are
not quantized (W4A16). Norms and everything else are taken as stored — so for ModelOpt's
NVFP4_AWQ exports this is the function the checkpoint really computes, not ModelOpt's fake-quant
model. Runs on CPU.
"""
import argparse
import glob
import json
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration

E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float32)


def unpack(packed):
    lo, hi = packed & 0xF, packed >> 4
    codes = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1).long()
    return E2M1[codes]


def dense_state(model_dir):
    t = {}
    for f in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        t.update(load_file(f))
    out = {}
    modules = {k[: -len(".weight_scale")] for k in t if k.endswith(".weight_scale")}
    for m in modules:
        packed = t.get(m + ".weight_packed", t.get(m + ".weight"))
        scale = t[m + ".weight_scale"].float()
        if packed.dtype == torch.uint8:
            ws2 = (1.0 / t[m + ".weight_global_scale"].float()) if m + ".weight_global_scale" in t else t[m + ".weight_scale_2"].float()
            w = unpack(packed) * scale.repeat_interleave(16, dim=1) * ws2.reshape(())
        else:  # FP8
            w = packed.float() * scale.reshape(())
        if m + ".pre_quant_scale" in t:
            w = w * t[m + ".pre_quant_scale"].float()[None, :]
        out[m + ".weight"] = w
    skip = (".weight_scale", ".weight_scale_2", ".input_scale", ".pre_quant_scale", ".weight_global_scale",
            ".input_global_scale", ".weight_packed")
    for k, v in t.items():
        if k.endswith(skip) or k in out or (k.endswith(".weight") and k[:-7] in modules):
            continue
        out[k] = v.float()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = AutoConfig.from_pretrained(args.model)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cls = Qwen3_5ForConditionalGeneration if cfg.model_type == "qwen3_5" else Qwen3_5ForCausalLM
    model = cls(cfg).float().eval()
    state = dense_state(args.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not cfg.tie_word_embeddings]
    assert not [k for k in missing if "visual" not in k], missing
    if cfg.get_text_config().tie_word_embeddings:
        model.tie_weights()
    ids = load_file(args.ids)["ids"][None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float().contiguous()
    save_file({"logits": logits}, args.out)
    print(json.dumps({"model": args.model, "unexpected": len(unexpected)}))


if __name__ == "__main__":
    main()
