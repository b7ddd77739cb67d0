#!/usr/bin/env python3
"""NVFP4 goldens made with NVIDIA ModelOpt (0.47) on a tiny Qwen3.5.

    python3 tests/reference/make_modelopt_golden.py --model tests/fixtures/tiny-vl --out /tmp/mo

For each config (NVFP4_DEFAULT_CFG, NVFP4_MLP_ONLY_CFG, NVFP4_AWQ_LITE_CFG) it calibrates with
`max` (or awq_lite) on the same pre-tokenized calibration ids, records ModelOpt's fake-quant logits
on held-out eval ids (before export: export replaces the weights), and exports the checkpoint with
`export_hf_checkpoint(dtype=torch.bfloat16)`. It also writes a compressed-tensors
(`nvfp4-pack-quantized`) copy of the NVFP4_DEFAULT export, converted tensor by tensor
(weight→weight_packed, weight_global_scale = 1/weight_scale_2, input_global_scale = 1/input_scale).

Outputs under --out: calib.jsonl, eval.safetensors (ids), <name>/ (export), <name>.logits.safetensors,
versions.json. Runs on CPU or GPU (device auto).
"""
import argparse
import json
import os
import shutil

import torch
import transformers
from safetensors.torch import load_file, save_file

import modelopt
import modelopt.torch.quantization as mtq
from modelopt.torch.export import export_hf_checkpoint
from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers
from transformers import AutoConfig, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration

CONFIGS = {
    "nvfp4_default": "NVFP4_DEFAULT_CFG",
    "nvfp4_mlp_only": "NVFP4_MLP_ONLY_CFG",
    "nvfp4_awq_lite": "NVFP4_AWQ_LITE_CFG",
}


def load(model_dir, device):
    cfg = AutoConfig.from_pretrained(model_dir)
    cls = Qwen3_5ForConditionalGeneration if cfg.model_type == "qwen3_5" else Qwen3_5ForCausalLM
    return cls.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()


def to_compressed_tensors(src, dst):
    """The same quantized tensors in llm-compressor's nvfp4-pack-quantized layout."""
    shutil.copytree(src, dst)
    index_path = os.path.join(dst, "model.safetensors.index.json")
    files = sorted({f for f in os.listdir(dst) if f.endswith(".safetensors")})
    for f in files:
        t = load_file(os.path.join(dst, f))
        out = {}
        for k, v in t.items():
            if k.endswith(".weight_scale_2"):
                out[k[: -len("weight_scale_2")] + "weight_global_scale"] = (1.0 / v.float()).reshape(1)
            elif k.endswith(".input_scale"):
                out[k[: -len("input_scale")] + "input_global_scale"] = (1.0 / v.float()).reshape(1)
            elif k.endswith(".weight") and v.dtype == torch.uint8:
                out[k[: -len("weight")] + "weight_packed"] = v
            else:
                out[k] = v
        save_file(out, os.path.join(dst, f), metadata={"format": "pt"})
        if os.path.exists(index_path):
            index = json.load(open(index_path))
            index["weight_map"] = {**{k: f for k in out}, **{k: v for k, v in index["weight_map"].items() if v != f}}
            json.dump(index, open(index_path, "w"), indent=2)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    ignore = cfg["quantization_config"].get("ignore", [])
    group = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True}
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "quantization_status": "compressed",
        "ignore": ignore, "kv_cache_scheme": None,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {**group, "dynamic": False},
                                      "input_activations": {**group, "dynamic": "local"}}},
    }
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)
    hq = os.path.join(dst, "hf_quant_config.json")
    if os.path.exists(hq):
        os.remove(hq)


def single_layer_io(model, gen):
    """Inputs and fake-quant outputs of single quantized linears (after fused-scale sharing):
    the W4A4 semantics compared without a whole model's amplification of rounding flips."""
    out = {}
    for name, mod in model.named_modules():
        if not name.endswith(("mlp.down_proj", "mlp.gate_proj", "self_attn.q_proj", "linear_attn.in_proj_qkv",
                              "linear_attn.out_proj", "self_attn.o_proj")):
            continue
        iq = getattr(mod, "input_quantizer", None)
        if iq is None or not iq.is_enabled:
            continue
        amax = float(iq.amax.float().max()) if iq.amax is not None else 1.0
        x = (torch.randn(8, mod.in_features, generator=gen) * amax / 3).to(torch.bfloat16)
        with torch.no_grad():
            y = mod(x.to(mod.weight.device)).float().cpu()
        out[name + ".x"] = x.float().contiguous()
        out[name + ".y"] = y.contiguous()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=48)
    ap.add_argument("--seed", type=int, default=99)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(args.out, exist_ok=True)
    base = load(args.model, device)
    vocab = base.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(args.seed)
    calib = [torch.randint(0, vocab, (args.calib_len,), generator=g) for _ in range(args.calib_samples)]
    with open(os.path.join(args.out, "calib.jsonl"), "w") as f:
        for ids in calib:
            f.write(json.dumps({"input_ids": ids.tolist()}) + "\n")
    eval_ids = torch.randint(0, vocab, (1, 40), generator=g)
    save_file({"ids": eval_ids[0].to(torch.int64)}, os.path.join(args.out, "eval.safetensors"))

    def forward_loop(model):
        with torch.no_grad():
            for ids in calib:
                model(input_ids=ids[None].to(device))

    for name, cfg_name in CONFIGS.items():
        model = load(args.model, device)
        mtq.quantize(model, getattr(mtq, cfg_name), forward_loop)
        # ModelOpt's NVFP4 fake-quant kernels need CUDA; on a CPU-only machine only the export runs.
        if device == "cuda":
            with torch.no_grad():
                logits = model(input_ids=eval_ids.to(device)).logits[0].float().cpu().contiguous()
            save_file({"logits": logits}, os.path.join(args.out, f"{name}.logits.safetensors"))
            # What export does first: fused groups (q/k/v, gate/up, in_proj_qkv/z) get shared
            # weight and input amax (AWQ: shared mean pre-quant scales). The fake-quant model then
            # computes what the exported scales define, up to ModelOpt's own folding at export.
            requantize_resmooth_fused_llm_layers(model)
            with torch.no_grad():
                logits = model(input_ids=eval_ids.to(device)).logits[0].float().cpu().contiguous()
            save_file({"logits": logits}, os.path.join(args.out, f"{name}.fused_logits.safetensors"))
            save_file(single_layer_io(model, g), os.path.join(args.out, f"{name}.layers.safetensors"))
        out_dir = os.path.join(args.out, name)
        shutil.rmtree(out_dir, ignore_errors=True)
        export_hf_checkpoint(model, export_dir=out_dir, dtype=torch.bfloat16)
        print(name, "exported", sorted(os.listdir(out_dir)))
    to_compressed_tensors(os.path.join(args.out, "nvfp4_default"), os.path.join(args.out, "ct_nvfp4"))
    with torch.no_grad():
        ref = base(input_ids=eval_ids.to(device)).logits[0].float().cpu().contiguous()
    save_file({"logits": ref}, os.path.join(args.out, "bf16.logits.safetensors"))
    versions = {"modelopt": modelopt.__version__, "torch": torch.__version__,
                "transformers": transformers.__version__, "device": device}
    json.dump(versions, open(os.path.join(args.out, "versions.json"), "w"), indent=2)
    print(json.dumps(versions))


if __name__ == "__main__":
    main()
