#!/usr/bin/env python3
"""Trains mini-Annie (issue 10) on the GPU machine and writes everything fp4 uses of it.

    python3 tests/reference/mini_annie/train.py --out /tmp/mini   [--quick]

1. Data (data.py): a held-out evaluation set first (Annie style), then training conversations
   that avoid its (template, entity) pairs.
2. A byte-level BPE tokenizer (~1k tokens) with Qwen3.5's special tokens; fp4's Qwen3.5 chat
   template (crates/fp4-chat/templates/qwen3_5.jinja) renders every conversation.
3. A 7M-parameter Qwen3.5 (VL layout, hidden 256, 8 layers 3:1 linear/full) trained in two
   stages: a "base" stage (markdown, visible reasoning, JSON-in-text tool calls; generic system
   prompts, sometimes Annie's), then a short low-learning-rate "distillation" to Annie's behaviour
   (Annie's system prompt and tools, no markdown, qwen3_coder tool calls, one or two sentences).
   Loss on assistant tokens only.
4. Several distillation strengths from the same base; each is scored in BF16 and after naive RTN
   NVFP4 of every linear (fake-quant here, as a preview of `fp4 quantize --strategy rtn`). The
   chosen one is the weakest distillation whose BF16 model passes every gate (the user's
   situation: a fine-tune whose behaviour sits on top of a base model).
Outputs under --out: model/ (the HF checkpoint, BF16), eval.jsonl, calib.jsonl (Annie-style, the
user's JSONL format), calib-generic.jsonl (pre-tokenized base-style text: "generic" calibration),
mini-annie.toml (the bench suite), train_report.json (versions, seeds, losses, gate scores).
"""
import argparse
import copy
import json
import math
import os
import random
import re
import sys
import time

import torch
import transformers
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast, Qwen3_5Config, Qwen3_5ForConditionalGeneration

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
import data  # noqa: E402
from make_chat_golden import NOT_SPECIAL, SPECIAL, bpe_tokenizer, vllm_messages  # noqa: E402

TEMPLATE = os.path.join(HERE, "..", "..", "..", "crates", "fp4-chat", "templates", "qwen3_5.jinja")
SEED = 20261127


def make_tokenizer(corpus, vocab_size):
    """The chat fixtures' tokenizer recipe, `vocab_size` tokens in all, with fp4's template."""
    tok = bpe_tokenizer(corpus, vocab_size - len(SPECIAL) - len(NOT_SPECIAL))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = open(TEMPLATE).read()
    return hf


def render(tok, conv):
    """(prompt text, target text): the target is what the template renders for the last
    assistant message after the enable_thinking=false generation prompt."""
    msgs = vllm_messages(conv["messages"])
    prompt = tok.apply_chat_template(msgs[:-1], tools=conv["tools"], add_generation_prompt=True, tokenize=False,
                                     enable_thinking=False)
    full = tok.apply_chat_template(msgs, tools=conv["tools"], tokenize=False)
    assert full.startswith(prompt), (prompt[-80:], full[len(prompt) - 80:len(prompt) + 40])
    return prompt, full[len(prompt):]


def encode(tok, conv):
    p, t = render(tok, conv)
    pi, ti = tok(p, add_special_tokens=False)["input_ids"], tok(t, add_special_tokens=False)["input_ids"]
    return pi + ti, [0] * len(pi) + [1] * len(ti)


def batches(examples, batch_size, rng):
    order = list(range(len(examples)))
    rng.shuffle(order)
    for i in range(0, len(order) - batch_size + 1, batch_size):
        yield [examples[j] for j in order[i:i + batch_size]]


def collate(batch, pad, device):
    n = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), n), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    loss_mask = torch.zeros((len(batch), n))
    for i, (x, m) in enumerate(batch):
        ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
        loss_mask[i, :len(m)] = torch.tensor(m, dtype=torch.float)
    return ids.to(device), mask.to(device), loss_mask.to(device)


def train(model, examples, steps, lr, batch_size, pad, device, seed, log, max_seconds=1e9):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    rng = random.Random(seed)
    warm = max(1, steps // 20)
    step, losses = 0, []
    started = time.time()
    model.train()
    while step < steps and time.time() - started < max_seconds:
        for batch in batches(examples, batch_size, rng):
            if step >= steps or time.time() - started > max_seconds:
                break
            ids, mask, lm = collate(batch, pad, device)
            for g in opt.param_groups:
                # Cosine over whichever budget runs out first, so a time-boxed run still anneals.
                progress = min(1.0, max(step / steps, (time.time() - started) / max_seconds))
                g["lr"] = lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * progress))
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
            lp = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                   reduction="none").view(ids.shape[0], -1)
            tm = lm[:, 1:]
            loss = (lp * tm).sum() / tm.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if step % 100 == 0 or step == steps - 1:
                log(f"  step {step:5d} loss {loss.item():.4f}")
            step += 1
    model.eval()
    return losses


# ---- behaviour scoring (the same detectors as fp4-bench's gates.rs, in Python) -------------------
MARKDOWN = [r"\*\*[^*\n]+\*\*|__[^_\n]+__", r"(?m)^\s{0,3}#{1,6}\s+\S", r"(?m)^\s*[-*•]\s+\S", r"(?m)^\s*\d+[.)]\s+\S", r"`",
            r"(?m)^\s*\|.*\|\s*$"]
THINKING = re.compile(r"(?i)</?think>|^\s*(okay|ok|alright|hmm+)[,.!]?\s+(so\s+)?(the user|let me|i need to|i should)"
                      r"|^\s*(let me think|the user (is asking|wants|asked)|i need to (figure|think|answer))")
CALL = re.compile(r"<tool_call>\s*<function=(\w+)>\s*<parameter=query>\s*(.+?)\s*</parameter>", re.S)


def answer_found(text, expect):
    low = text.lower()
    for e in expect:
        for m in re.finditer(re.escape(e.lower()), low):
            b = low[m.start() - 1] if m.start() > 0 else " "
            a = low[m.end()] if m.end() < len(low) else " "
            if not b.isalnum() and not a.isalnum():
                return True
    return False


@torch.no_grad()
def generate(model, tok, conv, device, max_new=60):
    p, _ = render(tok, conv)
    ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]], device=device)
    stop = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    out = model.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=list(stop), pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return tok.decode([t for t in new if t not in stop], skip_special_tokens=False), len(new)


def score(model, tok, evalset, device):
    s = {"thinking_leak": 0, "markdown_ok": 0, "markdown_n": 0, "tool_ok": 0, "tool_n": 0, "factual_ok": 0, "factual_n": 0,
         "reasoning_ok": 0, "reasoning_n": 0, "tokens": 0, "replies": 0}
    samples = []
    for conv in evalset:
        meta = conv["meta"]
        text, n = generate(model, tok, conv, device)
        cat = meta["category"]
        calls = CALL.findall(text)
        if cat == "tool":
            s["tool_n"] += 1
            s["tool_ok"] += any(name == meta["tool"] and q.strip() for name, q in calls)
        else:
            visible = text
            s["thinking_leak"] += bool(THINKING.search(visible))
            s["tokens"] += n
            s["replies"] += 1
            if cat == "markdown":
                s["markdown_n"] += 1
                s["markdown_ok"] += not any(re.search(r, visible) for r in MARKDOWN)
            elif cat in ("factual", "reasoning"):
                s[cat + "_n"] += 1
                s[cat + "_ok"] += answer_found(visible, meta["expect"])
        if len(samples) < 12:
            samples.append({"category": cat, "prompt": conv["messages"][-2]["content"], "reply": text})
    s["verbosity"] = s["tokens"] / max(1, s["replies"])
    return s, samples


def gates_pass(s):
    return (s["thinking_leak"] == 0 and s["tool_ok"] >= 0.8 * s["tool_n"] and s["markdown_ok"] >= 0.9 * s["markdown_n"]
            and s["factual_ok"] >= 0.8 * s["factual_n"] and s["reasoning_ok"] >= 0.8 * s["reasoning_n"])


# ---- naive RTN NVFP4 fake quant (weights only, per-16 blocks, E4M3 scales) ---------------------
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def nvfp4_rtn_(w):
    flat = w.float().reshape(-1, 16)
    scale_2 = flat.abs().max() / (6.0 * 448.0)
    bs = (flat.abs().amax(1, keepdim=True) / 6.0 / scale_2).clamp(min=2 ** -9, max=448.0)
    bs = bs.to(torch.float8_e4m3fn).float()
    x = flat / (bs * scale_2)
    grid = E2M1.to(w.device)
    q = grid[(x.abs().unsqueeze(-1) - grid).abs().argmin(-1)] * x.sign()
    w.copy_((q * bs * scale_2).reshape(w.shape).to(w.dtype))


def quantized_linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "language_model.layers" in n
            and not n.endswith(("in_proj_a", "in_proj_b"))]


def fake_quant_act(x, input_scale):
    """W4A4 activations as the Blackwell kernels quantize them: per-16 E4M3 scales under input_scale."""
    shape = x.shape
    flat = x.float().reshape(-1, 16)
    sf = (flat.abs().amax(1, keepdim=True) / 6.0 / input_scale).clamp(max=448.0).to(torch.float8_e4m3fn).float()
    step = (sf * input_scale).clamp(min=1e-30)
    v = flat / step
    grid = E2M1.to(x.device)
    q = grid[(v.abs().clamp(max=6.0).unsqueeze(-1) - grid).abs().argmin(-1)] * v.sign()
    return (q * step).reshape(shape).to(x.dtype)


def rtn_copy(model, calib_ids, device):
    """Naive RTN NVFP4 of every linear (weights), W4A4 with input scales from generic calibration
    text: what the user's Blackwell GPU computed for his naive checkpoint."""
    q = copy.deepcopy(model)
    lins = quantized_linears(q)
    amax = {n: torch.zeros((), device=device) for n, _ in lins}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: amax.__setitem__(n, torch.maximum(amax[n], a[0].abs().max())))
             for n, m in lins]
    with torch.no_grad():
        for ids in calib_ids:
            q(input_ids=torch.tensor([ids], device=device))
    for h in hooks:
        h.remove()
    for n, m in lins:
        nvfp4_rtn_(m.weight.data)
        s = (amax[n] / (6.0 * 448.0)).clamp(min=1e-12)
        m.register_forward_pre_hook(lambda m, a, s=s: (fake_quant_act(a[0], s),))
    return q


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny run to check the pipeline (CPU)")
    ap.add_argument("--base-steps", type=int, default=2500)
    ap.add_argument("--base-seconds", type=float, default=180, help="stop stage 1 after this long")
    ap.add_argument("--distill", default="200:2e-4,400:2e-4", help="steps:lr candidates, weakest first")
    ap.add_argument("--score-base", action="store_true", help="also score the base model (slow)")
    ap.add_argument("--save-base", action="store_true",
                    help="write the stage-1 model and tokenizer to OUT/base (stage 2 can then run in a later call)")
    ap.add_argument("--base-from", help="a directory written by --save-base: skip stage 1, use its model and tokenizer")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(SEED)
    report = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": sys.version.split()[0],
                           "gpu": torch.cuda.get_device_name() if device == "cuda" else None},
              "seed": SEED, "args": vars(args)}
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    n_eval, n_base, n_annie = (30, 400, 100) if args.quick else (60, 24000, 4000)
    # Held-out evaluation conversations: bench categories in fixed proportions.
    eval_all = data.conversations(4000, SEED + 1, "annie", "annie")
    want = {"markdown": 12, "factual": 6, "reasoning": 6, "tool": 12}
    if args.quick:
        want = {k: max(2, v // 4) for k, v in want.items()}
    evalset, seen = [], set()
    for c in eval_all:
        cat, key = c["meta"]["category"], c["meta"]["key"]
        if want.get(cat, 0) > 0 and key not in seen and len(c["messages"]) <= 3 and c["meta"].get("templated", True):
            want[cat] -= 1
            seen.add(key)
            evalset.append(c)
    tools_by = {"search_memory": 0, "web_search": 0}
    for c in evalset:
        if c["meta"]["category"] == "tool":
            tools_by[c["meta"]["tool"]] += 1
    log(f"eval set: {len(evalset)} conversations, tools {tools_by}")
    base_annie_sys = data.conversations(n_base // 3, SEED + 2, "base", "annie", seen)
    base = data.conversations(n_base, SEED + 3, "base", "generic", seen) + base_annie_sys
    annie = data.conversations(n_annie, SEED + 4, "annie", "annie", seen)
    calib = data.conversations(128, SEED + 5, "annie", "annie", seen)

    corpus_tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    corpus_tok.chat_template = open(TEMPLATE).read()
    corpus = []
    for c in (base[:3000] + annie[:1500]):
        p, t = render(corpus_tok, c)
        corpus.append(p + t)
    tok = make_tokenizer(corpus, 1024)
    if args.base_from:
        # The saved tokenizer, not a retrained one: the saved base's embeddings index it.
        tok = PreTrainedTokenizerFast.from_pretrained(args.base_from)
        tok.chat_template = open(TEMPLATE).read()
    log(f"tokenizer: {len(tok)} tokens")
    enc_base = [encode(tok, c) for c in base]
    enc_annie = [encode(tok, c) for c in annie]
    lens = sorted(len(x) for x, _ in enc_base + enc_annie)
    log(f"sequence lengths: median {lens[len(lens) // 2]}, max {lens[-1]}")

    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    vocab = ((len(tok) + 63) // 64) * 64
    text = dict(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=64, linear_value_head_dim=64, linear_conv_kernel_dim=4,
                rope_parameters=dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=0.25,
                                     mrope_section=[4, 2, 2], mrope_interleaved=True),
                eos_token_id=im_end, tie_word_embeddings=False, max_position_embeddings=4096)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, out_hidden_size=256,
                  num_position_embeddings=16)
    cfg = Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=False)
    model = Qwen3_5ForConditionalGeneration(cfg).to(device)
    if args.base_from:
        model = Qwen3_5ForConditionalGeneration.from_pretrained(args.base_from, dtype=torch.float32).to(device)
    model.generation_config.eos_token_id = [im_end, eot]
    n_params = sum(p.numel() for n, p in model.named_parameters() if "visual" not in n)
    log(f"model: {n_params / 1e6:.2f}M text parameters")
    generic = data.conversations(64, SEED + 6, "base", "generic", seen)
    generic_ids = [tok(" ".join(m["content"] for m in c["messages"] if m.get("content")), add_special_tokens=False)["input_ids"][:256]
                   for c in generic]
    bs = 8 if args.quick else 32

    def dump(path, convs):
        with open(path, "w") as f:
            for c in convs:
                f.write(json.dumps({"messages": c["messages"], "tools": c["tools"]}, ensure_ascii=False) + "\n")

    dump(os.path.join(args.out, "eval.jsonl"), evalset)
    dump(os.path.join(args.out, "calib.jsonl"), calib)
    with open(os.path.join(args.out, "calib-generic.jsonl"), "w") as f:
        for ids in generic_ids:
            f.write(json.dumps({"input_ids": ids}) + "\n")
    write_suite(os.path.join(args.out, "mini-annie.toml"), evalset)

    def save_choice(candidates):
        """Writes the current choice (the run may be cut short: every candidate leaves a result)."""
        report["candidates"] = [{k: v for k, v in c.items() if k != "state"} for c in candidates]
        # The weakest distillation that passes in BF16 and fails after RTN; else the weakest passing one.
        passing = [c for c in candidates if c["bf16_pass"]]
        gap = [c for c in passing if not c["rtn_pass"]]
        chosen = (gap or passing or candidates[-1:])[0]
        report["chosen"] = {"steps": chosen["steps"], "lr": chosen["lr"], "gap_found": bool(gap)}
        log(f"chosen so far: {report['chosen']}")
        m = copy.deepcopy(model)
        m.load_state_dict(chosen["state"])
        out_model = os.path.join(args.out, "model")
        m.to(torch.bfloat16).save_pretrained(out_model)
        tok.save_pretrained(out_model)
        with open(os.path.join(out_model, "chat_template.jinja"), "w") as f:
            f.write(open(TEMPLATE).read())
        json.dump(report, open(os.path.join(args.out, "train_report.json"), "w"), indent=1, default=str)

    base_steps = 20 if args.quick else args.base_steps
    if args.base_from:
        log(f"stage 1: base from {args.base_from}")
        prior = json.load(open(os.path.join(args.base_from, "base_report.json")))
        report.update(prior)
    else:
        log("stage 1: base")
        base_losses = train(model, enc_base, base_steps, 1.5e-3, bs, eot, device, SEED, log, args.base_seconds)
        report["base_steps_done"] = len(base_losses)
        report["base_losses"] = base_losses[::25]
    if args.save_base:
        out_base = os.path.join(args.out, "base")
        model.to(torch.bfloat16).save_pretrained(out_base)
        model.float()
        tok.save_pretrained(out_base)
        json.dump({k: report[k] for k in ("base_steps_done", "base_losses")} | {"base_args": vars(args)},
                  open(os.path.join(out_base, "base_report.json"), "w"), indent=1)
        log(f"base saved to {out_base}")
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if args.score_base:
        s, _ = score(model, tok, evalset, device)
        log(f"base model: {s}")
        report["base_scores"] = s
    candidates = []
    for cand in filter(None, args.distill.split(",")):
        steps, lr = cand.split(":")
        steps, lr = (5 if args.quick else int(steps)), float(lr)
        model.load_state_dict(base_state)
        log(f"stage 2: distill {steps} steps at lr {lr}")
        losses = train(model, enc_annie, steps, lr, bs, eot, device, SEED + steps, log)
        # What the checkpoint holds: bf16 weights.
        m16 = copy.deepcopy(model).to(torch.bfloat16).float()
        s_bf16, samp_bf16 = score(m16, tok, evalset, device)
        s_rtn, samp_rtn = score(rtn_copy(m16, generic_ids, device), tok, evalset, device)
        log(f"  bf16: {s_bf16}\n  rtn:  {s_rtn}")
        candidates.append({"steps": steps, "lr": lr, "final_loss": losses[-1], "bf16": s_bf16, "rtn": s_rtn,
                           "bf16_pass": gates_pass(s_bf16), "rtn_pass": gates_pass(s_rtn),
                           "samples_bf16": samp_bf16, "samples_rtn": samp_rtn, "state": copy.deepcopy(m16.state_dict())})
        save_choice(candidates)
    log("done")


def toml_str(s):
    return json.dumps(s, ensure_ascii=False)


def write_suite(path, evalset):
    n = {k: sum(c["meta"]["category"] == k for c in evalset) for k in ("markdown", "factual", "reasoning", "tool")}
    lines = [
        "# mini-Annie's suite (issue 10), written by tests/reference/mini_annie/train.py from its held-out",
        "# evaluation conversations: the same gates as annie.toml, on prompts this tiny model can answer.",
        'name = "mini-annie"',
        f'description = "mini-Annie: {n["markdown"]} markdown-prone, {n["factual"]} factual, {n["reasoning"]} reasoning, {n["tool"]} tool prompts"',
        f"system_prompt = {toml_str(data.SYSTEM)}",
        f"tools = '''\n{json.dumps(data.TOOLS)}\n'''",
        "",
        "[params]",
        "temperature = 0.0",
        "max_tokens = 60",
        "enable_thinking = false",
        "",
        "[gates]",
        "thinking_leak_max = 0",
        f"tool_calling_min = {math.ceil(0.8 * n['tool'])}",
        f"no_markdown_min = {math.ceil(0.9 * n['markdown'])}",
        f"factual_min = {math.ceil(0.8 * n['factual'])}",
        f"reasoning_min = {math.ceil(0.8 * n['reasoning'])}",
        "verbosity_max_tokens = 40",
        "ttft_ms_max = 2000",
        "decode_tok_s_min = 5",
    ]
    for i, c in enumerate(evalset):
        m = c["meta"]
        lines += ["", "[[test]]", f'name = "{m["category"]}_{i}"', f'category = "{m["category"]}"',
                  f"prompt = {toml_str(c['messages'][-2]['content'])}"]
        if "expect" in m:
            lines.append(f"expect = {json.dumps(m['expect'])}")
        if "tool" in m:
            lines.append(f'tool = "{m["tool"]}"')
    open(path, "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
