#!/usr/bin/env python3
"""Talks to `bella-vqa serve` with the real `openai` Python client (scripts/requirements-openai.txt).

    python scripts/openai_check.py --bin "$CARGO_TARGET_DIR/debug/bella-vqa"

Starts `serve --port 0 --api-key test-key` on the embedded demo, sends eval/demo images as data URLs
without and with streaming, reads the `bella` extension, and checks the error classes the client maps
(401 -> AuthenticationError, 404 -> NotFoundError). The server is stopped in every case. The last line
is `openai client: N passed, M failed`; the exit status is non-zero when a check failed.
"""
import argparse
import base64
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import openai
from openai import OpenAI

from bella_server import Server

REPO = Path(__file__).resolve().parent.parent
KEY = "test-key"
QUESTION = "What color is the circle?"


def data_url(path: Path) -> str:
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def messages(image: Path, question: str = QUESTION):
    return [{"role": "user", "content": [
        {"type": "text", "text": question},
        {"type": "image_url", "image_url": {"url": data_url(image)}},
    ]}]

def bella_of(obj) -> dict:
    """The `bella` extension of a completion or chunk (pydantic keeps unknown fields in model_extra)."""
    extra = getattr(obj, "model_extra", None) or {}
    if "bella" in extra:
        return extra["bella"]
    return obj.to_dict().get("bella")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="path to the bella-vqa binary")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds for the server to start, and per request")
    args = ap.parse_args()
    if not os.access(args.bin, os.X_OK):
        print(f"openai_check: no executable at {args.bin} (build it first: cargo build)", file=sys.stderr)
        print("openai client: 0 passed, 1 failed")
        return 1

    passed = failed = 0
    print(f"openai_check: openai {openai.__version__}, server {args.bin}", flush=True)
    try:
        server = Server(args.bin, ["--api-key", KEY], args.timeout)
    except Exception as e:  # noqa: BLE001
        print(f"openai_check: {e}", file=sys.stderr)
        print("openai client: 0 passed, 1 failed")
        return 1
    try:
        print(f"openai_check: server at {server.base}, /health {json.dumps(server.health)}", flush=True)
        client = OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=args.timeout)
        red = REPO / "eval/demo/red-circle.png"
        photo = REPO / "eval/demo/photo-cat.png"
        state = {}

        def check(name, fn):
            nonlocal passed, failed
            t0 = time.monotonic()
            try:
                detail = fn()
                passed += 1
                print(f"  ok    {name} ({time.monotonic() - t0:.2f} s){': ' + detail if detail else ''}", flush=True)
            except Exception as e:  # noqa: BLE001
                failed += 1
                print(f"  FAIL  {name}: {type(e).__name__}: {e}", flush=True)
                if not isinstance(e, AssertionError):
                    traceback.print_exc(limit=3)

        def coherent(b: dict, content: str, show_particles: bool = False):
            for k in ("answer", "abstained", "confidence", "threshold", "uncertainty", "particles", "candidates"):
                assert k in b, f"bella has no '{k}': {sorted(b)}"
            assert 0.0 <= b["confidence"] <= 1.0, f"confidence {b['confidence']} outside [0, 1]"
            assert 0.0 <= b["threshold"] <= 1.0, f"threshold {b['threshold']} outside [0, 1]"
            u = b["uncertainty"]
            assert u["total"] >= -1e-6 and u["aleatoric"] >= -1e-6 and u["epistemic"] >= -1e-6, f"negative uncertainty {u}"
            assert abs(u["total"] - u["aleatoric"] - u["epistemic"]) < 1e-3, f"total != aleatoric + epistemic: {u}"
            particles = server.health.get("particles")
            if particles:
                assert len(b["particles"]) == particles, f"{len(b['particles'])} particle answers, /health says {particles}"
            if show_particles:
                # bella.show_particles: the content is the response, then one line per particle
                lines = content.split("\n")
                assert lines[0] == b["response"], f"content {content!r} does not start with {b['response']!r}"
                assert len(lines) == 1 + len(b["particles"]) and all(ln.startswith("particle ") for ln in lines[1:]), \
                    f"content {content!r} does not list the {len(b['particles'])} particles"
            else:
                assert content == b["response"], f"content {content!r} != bella.response {b['response']!r}"

        def models():
            ids = [m.id for m in client.models.list().data]
            assert ids, "GET /v1/models listed no model"
            state["model"] = ids[0]

        def plain():
            c = client.chat.completions.create(model=state["model"], messages=messages(red), max_tokens=16, temperature=0)
            content = c.choices[0].message.content
            b = bella_of(c)
            assert b is not None, "the response has no 'bella' object"
            coherent(b, content)
            assert b["answer"] == "red" and not b["abstained"], f"answer {b['answer']!r} abstained={b['abstained']}"
            assert content == "red", f"content {content!r}"
            assert b["confidence"] >= b["threshold"], f"answered with confidence {b['confidence']} < threshold {b['threshold']}"
            assert c.choices[0].finish_reason == "stop", c.choices[0].finish_reason
            assert c.usage and c.usage.completion_tokens > 0 and c.usage.prompt_tokens > 0, f"usage {c.usage}"
            assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens, f"usage {c.usage}"
            state["plain"] = (content, b)
            return f"{content!r}, confidence {b['confidence']:.3f} >= threshold {b['threshold']:.3f}, {len(b['particles'])} particles"

        def streamed():
            stream = client.chat.completions.create(
                model=state["model"], messages=messages(red), max_tokens=16, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"bella": {"show_particles": True}})
            chunks = list(stream)
            assert chunks, "no chunks"
            assert all(ch.object == "chat.completion.chunk" for ch in chunks), {ch.object for ch in chunks}
            assert len({ch.id for ch in chunks}) == 1, "chunks carry different ids"
            with_choices = [ch for ch in chunks if ch.choices]
            assert with_choices[0].choices[0].delta.role == "assistant", "first delta has no role"
            content = "".join(ch.choices[0].delta.content or "" for ch in with_choices)
            finishes = [ch.choices[0].finish_reason for ch in with_choices if ch.choices[0].finish_reason]
            assert finishes == ["stop"], f"finish reasons {finishes}"
            bellas = [(i, bella_of(ch)) for i, ch in enumerate(chunks) if bella_of(ch)]
            assert len(bellas) == 1, f"{len(bellas)} chunks carry 'bella'"
            where, b = bellas[0]
            assert where >= len(chunks) - 2, f"'bella' in chunk {where} of {len(chunks)}, not at the end"
            coherent(b, content, show_particles=True)
            usage = [ch.usage for ch in chunks if ch.usage]
            assert usage and not chunks[-1].choices and chunks[-1].usage, "no final usage chunk with choices: []"
            if "plain" in state:
                pc, pb = state["plain"]
                assert content.split("\n")[0] == pc, f"streamed {content!r} does not start with the plain {pc!r}"
                assert b["answer"] == pb["answer"] and abs(b["confidence"] - pb["confidence"]) < 1e-4, \
                    f"streamed {b['answer']} {b['confidence']} != plain {pb['answer']} {pb['confidence']}"
            return f"{len(chunks)} chunks, {content!r}, bella in chunk {where + 1}, usage {usage[-1].total_tokens} tokens"

        def photo_abstains():
            c = client.chat.completions.create(model=state["model"], messages=messages(photo), max_tokens=16, temperature=0)
            content = c.choices[0].message.content
            b = bella_of(c)
            coherent(b, content)
            assert b["abstained"] is True, f"answered {b['answer']!r} with confidence {b['confidence']} on a photograph"
            assert b["confidence"] < b["threshold"], f"abstained with confidence {b['confidence']} >= {b['threshold']}"
            assert content.startswith("I'm not sure"), f"content {content!r}"
            # bella.threshold overrides the calibrated one: at 0 the same question is answered
            c0 = client.chat.completions.create(model=state["model"], messages=messages(photo), max_tokens=16,
                                                temperature=0, extra_body={"bella": {"threshold": 0.0}})
            b0 = bella_of(c0)
            assert b0["threshold"] == 0.0 and b0["abstained"] is False, f"threshold 0: {b0['threshold']} abstained={b0['abstained']}"
            assert c0.choices[0].message.content == b0["answer"] == b["answer"], \
                f"threshold 0 answered {c0.choices[0].message.content!r}, most likely was {b['answer']!r}"
            return f"{content!r}; with bella.threshold 0: {c0.choices[0].message.content!r}"

        def wrong_key():
            bad = OpenAI(base_url=server.base + "/v1", api_key="wrong-key", max_retries=0, timeout=args.timeout)
            try:
                bad.chat.completions.create(model=state["model"], messages=messages(red))
            except openai.AuthenticationError as e:
                assert e.status_code == 401, e.status_code
                err = (e.body or {}) if isinstance(e.body, dict) else {}
                assert err.get("type") == "authentication_error", f"error body {e.body}"
                return f"401 {str(e)[:80]}"
            raise AssertionError("a wrong API key was accepted")

        def unknown_model():
            try:
                client.chat.completions.create(model="no-such-model", messages=messages(red))
            except openai.NotFoundError as e:
                assert e.status_code == 404, e.status_code
                return f"404 {str(e)[:80]}"
            raise AssertionError("an unknown model was accepted")

        check("GET /v1/models", models)
        if "model" not in state:
            state["model"] = server.health.get("model") or "bella-vqa-demo"
        check("plain answer (red-circle.png): red, answered, bella coherent", plain)
        check("streamed answer with bella.show_particles: chunks, bella in the last one, usage chunk", streamed)
        check("photograph (photo-cat.png): not sure; answered with bella.threshold 0", photo_abstains)
        check("wrong API key -> openai.AuthenticationError", wrong_key)
        check("unknown model -> openai.NotFoundError", unknown_model)
    finally:
        server.stop()
        if failed:
            print("openai_check: last server output:\n  " + "\n  ".join(server.log[-20:]), file=sys.stderr)
    print(f"openai client: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    # SIGTERM (e.g. from CI's timeout) unwinds like Ctrl-C, so the server is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
