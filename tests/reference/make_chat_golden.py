#!/usr/bin/env python3
"""Golden chat-template renderings made with transformers' `apply_chat_template`.

    python3 tests/reference/make_chat_golden.py --out tests/fixtures/chat

Writes a tokenizer directory (Qwen3.5-style byte-level BPE with Qwen's pre-tokenizer regex, NFC,
and Qwen's added tokens with their `special` flags; fp4's Qwen3.5 template as
chat_template.jinja) and `golden.json`: for each case the client-side request (messages as an
OpenAI client sends them: tool-call arguments as JSON strings), the rendered prompt text and ids,
or the error the template raised. Tool-call arguments are json-loaded before rendering, as vLLM
does.
"""
import argparse
import copy
import json
import os

import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = os.path.join(HERE, "..", "..", "crates", "fp4-chat", "templates", "qwen3_5.jinja")
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
NOT_SPECIAL = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
CORPUS = open(os.path.join(HERE, "make_golden.py")).read() + """
Annie is a warm voice companion. What's the weather in Paris? It is 18 degrees and sunny.
café naïve Zürich 東京 привет 🙂 — “quotes” and ‘apostrophes’ you're we'll I'd
"""

W = {"type": "function", "function": {"name": "get_current_weather", "description": "Get the weather (°C or °F) in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "state": {"type": "string"},
                    "unit": {"type": "string", "enum": ["fahrenheit", "celsius"]}}, "required": ["city", "state"]}}}
A = {"type": "function", "function": {"name": "calculate_area", "description": "Area of a shape",
     "parameters": {"type": "object", "properties": {"shape": {"type": "string"}, "dimensions": {"type": "object"},
                    "precision": {"type": "integer"}}}}}
MEM = {"type": "function", "function": {"name": "search_memory", "description": "Search Annie's memory of the user",
       "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}


def call(name, args, id_="call_1"):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


SYS = {"role": "system", "content": "You are Annie, a warm voice companion. Answer in one or two sentences."}
CASES = [
    ("user_only", [{"role": "user", "content": "Hello there!"}], None, True, {}),
    ("system_user_no_think", [SYS, {"role": "user", "content": "What's the capital of Japan?"}], None, True,
     {"enable_thinking": False}),
    ("think_explicit_true", [{"role": "user", "content": "2+2?"}], None, True, {"enable_thinking": True}),
    ("multi_turn", [SYS, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                    {"role": "user", "content": "Tell me a joke."}], None, True, {}),
    ("no_generation_prompt", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey!"}], None, False, {}),
    ("tools_with_system", [SYS, {"role": "user", "content": "Weather in Dallas?"}], [W, A], True, {}),
    ("tools_no_system", [{"role": "user", "content": "Area of a 3x4 rectangle?"}], [A], True, {"enable_thinking": False}),
    ("tool_round_trip", [SYS, {"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
                          "tool_calls": [call("get_current_weather", {"city": "Paris", "state": "IDF"})]},
                         {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 18}"}], [W], True, {}),
    ("reasoning_kept_after_last_query", [{"role": "user", "content": "Q1"},
                                         {"role": "assistant", "content": "A1", "reasoning_content": "thinking 1"}],
     None, False, {}),
    ("reasoning_dropped_before_last_query", [{"role": "user", "content": "Q1"},
                                             {"role": "assistant", "content": "A1", "reasoning_content": "thinking 1"},
                                             {"role": "user", "content": "Q2"}], None, True, {}),
    ("inline_think_split", [{"role": "user", "content": "Q"},
                            {"role": "assistant", "content": "<think>\nstep one\nstep two\n</think>\n\nThe answer is 4."}],
     None, False, {}),
    ("parallel_calls_and_responses", [{"role": "user", "content": "Weather in Dallas and Orlando?"},
                                      {"role": "assistant", "content": "Checking both.",
                                       "tool_calls": [call("get_current_weather", {"city": "Dallas", "state": "TX"}),
                                                      call("get_current_weather", {"city": "Orlando", "state": "FL"}, "call_2")]},
                                      {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                                      {"role": "tool", "tool_call_id": "call_2", "content": "rain"}], [W], True, {}),
    ("typed_arguments", [{"role": "user", "content": "Compute."},
                         {"role": "assistant", "content": None,
                          "tool_calls": [call("calculate_area", {"shape": "circle", "dimensions": {"radius": 1.5, "tags": ["a", "é"]},
                                                                 "precision": 3, "exact": True, "note": None, "ratio": 2.0,
                                                                 "list": [1, 2.5, None]})]},
                         {"role": "tool", "content": "7.069"}], [A], True, {}),
    ("unicode", [{"role": "system", "content": "Réponds en français. 東京"}, {"role": "user", "content": "Ça va? 🙂"}],
     [MEM], True, {}),
    ("content_parts", [{"role": "user", "content": [{"type": "text", "text": "Part one. "}, {"type": "text", "text": "Part two."}]}],
     None, True, {}),
    ("whitespace_trimmed", [{"role": "system", "content": "  spaced system \n"}, {"role": "user", "content": "\n\n hi \n"},
                            {"role": "assistant", "content": "  ok  "}, {"role": "user", "content": " again "}], None, True, {}),
    ("multi_step_tools", [{"role": "user", "content": "What do you remember about my birthday, and the weather?"},
                          {"role": "assistant", "content": "", "tool_calls": [call("search_memory", {"query": "birthday"})]},
                          {"role": "tool", "content": "May 3rd"},
                          {"role": "assistant", "content": "Now the weather.", "reasoning_content": "Second tool.",
                           "tool_calls": [call("get_current_weather", {"city": "Austin", "state": "TX", "unit": "celsius"}, "c2")]},
                          {"role": "tool", "content": "hot"}], [MEM, W], True, {}),
    ("reasoning_field_alias", [{"role": "user", "content": "Q"},
                               {"role": "assistant", "content": "A", "reasoning": "via the reasoning field"}], None, False, {}),
    # Errors raised by the template.
    ("error_system_not_first", [{"role": "user", "content": "Hi"}, {"role": "system", "content": "late"}], None, True, {}),
    ("error_no_user_query", [SYS], None, True, {}),
    ("error_unexpected_role", [{"role": "user", "content": "Hi"}, {"role": "narrator", "content": "x"}], None, True, {}),
    ("error_no_messages", [], None, True, {}),
]


def vllm_messages(messages):
    """vLLM json-loads tool-call arguments and maps `reasoning` to `reasoning_content` before rendering."""
    out = copy.deepcopy(messages)
    for m in out:
        if "reasoning" in m and "reasoning_content" not in m:
            m["reasoning_content"] = m.pop("reasoning")
        for c in m.get("tool_calls") or []:
            if isinstance(c["function"]["arguments"], str):
                c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return out


def bpe_tokenizer(corpus, vocab_size):
    """Qwen3.5-style byte-level BPE (Qwen's pre-tokenizer regex, NFC) trained on `corpus` to
    `vocab_size` tokens, then Qwen's added tokens with their `special` flags."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NOT_SPECIAL])
    return tok


def make_tokenizer():
    return bpe_tokenizer([CORPUS] * 4, 600)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    raw = make_tokenizer()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = open(TEMPLATE).read()
    hf.save_pretrained(args.out)
    hf = transformers.AutoTokenizer.from_pretrained(args.out)
    cases = []
    for name, messages, tools, gen, kwargs in CASES:
        case = {"name": name, "messages": messages, "tools": tools, "add_generation_prompt": gen, "kwargs": kwargs}
        try:
            text = hf.apply_chat_template(vllm_messages(messages), tools=tools, add_generation_prompt=gen,
                                          tokenize=False, **kwargs)
            case["text"] = text
            case["ids"] = hf(text, add_special_tokens=False)["input_ids"]
        except Exception as e:  # the template's raise_exception
            case["error"] = str(e)
        cases.append(case)
    versions = {"transformers": transformers.__version__, "tokenizers": __import__("tokenizers").__version__}
    json.dump({"versions": versions, "cases": cases}, open(os.path.join(args.out, "golden.json"), "w"),
              indent=1, ensure_ascii=False)
    print(len(cases), "cases;", sum("error" in c for c in cases), "errors")


if __name__ == "__main__":
    main()
