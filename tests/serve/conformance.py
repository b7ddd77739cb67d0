#!/usr/bin/env python3
"""OpenAI-client conformance of `fp4 serve`, with the official `openai` package.

    python3 tests/serve/conformance.py --fp4 target/debug/fp4

Starts the server on a free port with a tiny fixture model (tests/fixtures/tiny-quant plus fp4's
Qwen3.5 chat template), then checks streaming and non-streaming chat, tools with tool_choice
auto/required/named, reasoning with thinking on and off, usage, text completions and errors, as a
client library sees them. Exits non-zero on the first failure.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = [{"type": "function", "function": {"name": "search_memory", "description": "Search Annie's memory",
          "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
         {"type": "function", "function": {"name": "web_search", "description": "Search the web",
          "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]
MESSAGES = [{"role": "system", "content": "You are Annie."}, {"role": "user", "content": "What's my sister's name?"}]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(fp4, workdir):
    model = os.path.join(workdir, "model")
    shutil.copytree(os.path.join(ROOT, "tests/fixtures/tiny-quant"), model)
    shutil.copy(os.path.join(ROOT, "crates/fp4-chat/templates/qwen3_5.jinja"), os.path.join(model, "chat_template.jinja"))
    port = free_port()
    proc = subprocess.Popen([fp4, "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
                             "--served-model-name", "annie-tiny", "--max-model-len", "2048", "--api-key", "k",
                             "--reasoning-parser", "qwen3", "--enable-auto-tool-choice", "--tool-call-parser", "qwen3_coder"],
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                return proc, port
        except Exception:
            time.sleep(0.1)
    proc.kill()
    sys.exit("server did not become healthy")


def merge(stream):
    content, reasoning, calls, finish, usage, roles = "", "", {}, None, None, 0
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            d = c.delta
            if d.role:
                roles += 1
            content += d.content or ""
            reasoning += (d.model_extra or {}).get("reasoning_content") or ""
            for tc in d.tool_calls or []:
                if tc.index not in calls:
                    assert tc.id and tc.type == "function" and tc.function.name, tc
                    calls[tc.index] = [tc.function.name, ""]
                else:
                    assert not tc.function.name, "name sent twice"
                calls[tc.index][1] += tc.function.arguments or ""
            finish = c.finish_reason or finish
    assert roles == 1, f"role sent {roles} times"
    return content, reasoning, [calls[i] for i in sorted(calls)], finish, usage


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp4", required=True)
    args = ap.parse_args()
    workdir = tempfile.mkdtemp()
    proc, port = start(os.path.abspath(args.fp4), workdir)
    checks = 0
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["annie-tiny"]

        # Whole vs streamed, greedy, reasoning on (default): the same message and usage.
        kw = dict(model="annie-tiny", messages=MESSAGES, max_tokens=16, temperature=0)
        whole = client.chat.completions.create(**kw)
        m = whole.choices[0].message
        content, reasoning, calls, finish, usage = merge(
            client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        assert content == (m.content or "") and reasoning == (m.model_extra.get("reasoning_content") or ""), (content, m)
        assert finish == whole.choices[0].finish_reason and usage.completion_tokens == whole.usage.completion_tokens
        checks += 1

        # Thinking off: no reasoning at all.
        off = client.chat.completions.create(**kw, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert not off.choices[0].message.model_extra.get("reasoning_content")
        checks += 1

        # Tools: auto (whatever the model does, the message is well formed), required, named.
        for choice in ["auto", "required", {"type": "function", "function": {"name": "web_search"}}]:
            r = client.chat.completions.create(**kw, tools=TOOLS, tool_choice=choice)
            msg = r.choices[0].message
            if choice != "auto":
                assert msg.tool_calls, (choice, msg)
                assert r.choices[0].finish_reason == "tool_calls"
                for tc in msg.tool_calls:
                    json.loads(tc.function.arguments)
                if isinstance(choice, dict):
                    assert msg.tool_calls[0].function.name == "web_search"
                s_content, _, s_calls, s_finish, _ = merge(client.chat.completions.create(**kw, tools=TOOLS, tool_choice=choice, stream=True))
                assert [c[0] for c in s_calls] == [tc.function.name for tc in msg.tool_calls]
                assert [c[1] for c in s_calls] == [tc.function.arguments for tc in msg.tool_calls]
                assert s_finish == "tool_calls"
            checks += 1

        # Text completions.
        c = client.completions.create(model="annie-tiny", prompt="Annie is", max_tokens=5, temperature=0)
        assert c.choices[0].finish_reason in ("length", "stop") and c.usage.completion_tokens <= 5
        checks += 1

        # Errors as the client library raises them.
        for call, exc in [
            (lambda: client.chat.completions.create(model="nope", messages=MESSAGES), openai.NotFoundError),
            (lambda: client.chat.completions.create(model="annie-tiny", messages=MESSAGES, temperature=9), openai.BadRequestError),
            (lambda: client.chat.completions.create(model="annie-tiny", messages=MESSAGES, tools=TOOLS,
                                                    tool_choice={"type": "function", "function": {"name": "missing"}}), openai.BadRequestError),
            (lambda: openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
                .chat.completions.create(model="annie-tiny", messages=MESSAGES), openai.AuthenticationError),
        ]:
            try:
                call()
                raise AssertionError(f"expected {exc.__name__}")
            except exc:
                checks += 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"openai conformance: {checks} checks passed (openai {openai.__version__})")


if __name__ == "__main__":
    main()
