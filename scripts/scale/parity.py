#!/usr/bin/env python3
"""Parity of bella-vqa against transformers on one real-size checkpoint, in the same dtype and device.

    python3 scripts/scale/parity.py --model DIR --rust-logits R.safetensors [--rust-ask ASK.json] \\
        --dtype bf16 --device cuda [--json OUT.json]

R.safetensors is `bella-vqa logits --model DIR --image IMAGE --prompt QUESTION --dtype D --device V
--out R.safetensors`; ASK.json is `bella-vqa ask --model DIR --image IMAGE --json --dtype D --device V
QUESTION` (the base model, one particle, greedy). This script loads DIR with
`LlavaForConditionalGeneration` in the same dtype on the same device and compares:

- input ids: exactly equal;
- logits over the whole prompt: relative error = max |Δ| / max |transformers logit| (the measure of
  tests/precision.rs), tolerance bf16 0.05, f16 0.01, f32 1e-4 (32 layers add up more rounding
  than the 3-layer fixtures' 0.03 / 0.005 / 1e-5), and the share of positions whose arg-max agrees;
- greedy answer (≤ 16 tokens, transformers `generate`) against the answer of `ask --json`, as text.

In half precision (bf16, f16) the script also runs transformers in f32 on the same device (unless
--no-f32-reference) and measures how far transformers' own half precision is from it: with random
weights many arg-maxes are near-ties, so a fixed tolerance and greedy equality alone cannot tell
rounding from a fault. The logits then pass when within the tolerance OR when bella-vqa's half
precision is no further from transformers' f32 than 1.5× transformers' own half precision is; the
greedy answers count only where transformers' half and f32 greedy answers agree.

Prints a Markdown block and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
TOL = {"f32": 1e-4, "bf16": 0.05, "f16": 0.01}
REPO = Path(__file__).resolve().parents[2]


def rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a − ref| / max |ref| (the measure of tests/precision.rs)."""
    return float(np.abs(a - ref).max()) / float(np.abs(ref).max())


def common_words(a: str, b: str) -> int:
    """How many words two greedy answers share before they part."""
    words = list(zip(a.split(), b.split()))
    return next((i for i, (x, y) in enumerate(words) if x != y), len(words))


def transformers_run(args, processor, dtype: str):
    """transformers' logits over the prompt and greedy answer (≤ 16 tokens) in `dtype`."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=DTYPES[dtype],
                                                          attn_implementation=args.attn).to(args.device).eval()
    image = Image.open(REPO / args.image).convert("RGB")
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
    prompt = processor.apply_chat_template(conv, add_generation_prompt=True)
    enc = processor(images=[image], text=[prompt], return_tensors="pt")
    enc = {k: v.to(args.device) for k, v in enc.items()}
    enc["pixel_values"] = enc["pixel_values"].to(DTYPES[dtype])
    with torch.inference_mode():
        logits = model(**enc).logits.float().cpu().numpy()[0]
        gen = model.generate(**enc, max_new_tokens=16, do_sample=False, num_beams=1,
                             pad_token_id=processor.tokenizer.pad_token_id)
    new = gen[0, enc["input_ids"].shape[1]:].tolist()
    answer = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return logits, answer, new, enc


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--rust-logits", required=True, type=Path)
    ap.add_argument("--rust-ask", type=Path, default=None)
    ap.add_argument("--image", default="tests/fixtures/images/photo.png")
    ap.add_argument("--question", default="What color is the circle?")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--attn", default="eager")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-f32-reference", action="store_true",
                    help="in half precision, do not also run transformers in f32")
    args = ap.parse_args()

    from transformers import AutoProcessor

    t0 = time.perf_counter()
    processor = AutoProcessor.from_pretrained(args.model)
    logits, answer, new, enc = transformers_run(args, processor, args.dtype)
    load_s = time.perf_counter() - t0  # load, logits and greedy answer

    rust = load_file(str(args.rust_logits))
    r_ids = rust["input_ids"].reshape(-1).astype(np.int64)
    t_ids = enc["input_ids"][0].cpu().numpy().astype(np.int64)
    ids_equal = r_ids.shape == t_ids.shape and bool((r_ids == t_ids).all())
    r_logits = rust["logits"].reshape(logits.shape) if rust["logits"].size == logits.size else None
    result = {"dtype": args.dtype, "device": args.device, "prompt_tokens": int(t_ids.size), "transformers_s": load_s,
              "input_ids_equal": ids_equal, "tolerance": TOL[args.dtype], "transformers_answer": answer,
              "transformers_tokens": new}
    ok = ids_equal
    # Logits of another image cannot be compared: say so rather than report a large error.
    if "pixel_values" in rust:
        t_pixels = enc["pixel_values"].float().cpu().numpy()
        r_pixels = rust["pixel_values"].astype(np.float32)
        same = r_pixels.shape == t_pixels.shape and float(np.abs(r_pixels - t_pixels).max()) <= 1e-2
        result["pixel_values_equal"] = same
        if not same:
            print(f"{args.rust_logits} holds the pixel values of another image than {args.image}: "
                  "pass --image as given to `bella-vqa logits`", file=sys.stderr)
            ok = False
    reference = None
    if args.dtype != "f32" and not args.no_f32_reference:
        ref_logits, ref_answer, _, _ = transformers_run(args, processor, "f32")
        reference = {
            "transformers_relative_error": rel_error(logits, ref_logits),
            "transformers_top1_agreement": float((logits.argmax(-1) == ref_logits.argmax(-1)).mean()),
            "transformers_f32_answer": ref_answer,
            "transformers_greedy_equals_f32": answer == ref_answer,
        }
        if r_logits is not None:
            reference["bella_relative_error"] = rel_error(r_logits, ref_logits)
            reference["bella_top1_agreement"] = float((r_logits.argmax(-1) == ref_logits.argmax(-1)).mean())
        result["f32_reference"] = reference
    if r_logits is not None:
        rel = rel_error(r_logits, logits)
        last_rel = rel_error(r_logits[-1], logits[-1])
        top1 = float((r_logits.argmax(-1) == logits.argmax(-1)).mean())
        within = rel <= TOL[args.dtype]
        as_close = (reference is not None
                    and reference["bella_relative_error"] <= 1.5 * reference["transformers_relative_error"])
        result.update(relative_error=rel, last_position_relative_error=last_rel, top1_agreement=top1,
                      logits_within_tolerance=within, logits_as_close_to_f32_as_transformers=as_close)
        ok = ok and (within or as_close)
    else:
        result["logits_shape_mismatch"] = [list(rust["logits"].shape), list(logits.shape)]
        ok = False
    if args.rust_ask:
        js = json.loads(args.rust_ask.read_text())
        r_answer = js["particles"][0]["answer"].strip()
        result["bella_answer"] = r_answer
        result["greedy_equal"] = r_answer == answer
        # Where they part (random weights make near-ties in half precision): the shared words.
        result["greedy_common_words"] = common_words(r_answer, answer)
        # Greedy decoding decides only where transformers' own half precision keeps its f32 answer.
        decisive = reference is None or reference["transformers_greedy_equals_f32"]
        result["greedy_decisive"] = decisive
        ok = ok and (r_answer == answer or not decisive)
    result["ok"] = ok
    lines = [f"#### Parity, {args.dtype} on {args.device}", "",
             f"- input ids ({t_ids.size} tokens): {'equal' if ids_equal else 'DIFFERENT'}"]
    if "relative_error" in result:
        lines.append(f"- logits over the prompt: relative error {result['relative_error']:.2e} "
                     f"(last position {result['last_position_relative_error']:.2e}; tolerance "
                     f"{TOL[args.dtype]:g}); arg-max agrees at {100 * result['top1_agreement']:.1f} % of positions")
    if "greedy_equal" in result:
        lines.append(f"- greedy answer: bella-vqa {result['bella_answer']!r}, transformers {answer!r}: "
                     f"{'equal' if result['greedy_equal'] else 'DIFFERENT'}"
                     f"{'' if result['greedy_equal'] else ' after ' + str(result['greedy_common_words']) + ' equal words'}")
    if reference is not None:
        ref = reference
        line = (f"- against transformers in f32: transformers {args.dtype} relative error "
                f"{ref['transformers_relative_error']:.2e} (arg-max {100 * ref['transformers_top1_agreement']:.1f} %)")
        if "bella_relative_error" in ref:
            line += (f", bella-vqa {args.dtype} {ref['bella_relative_error']:.2e} "
                     f"(arg-max {100 * ref['bella_top1_agreement']:.1f} %)")
        lines.append(line)
        lines.append(f"- transformers' greedy answer in {args.dtype} "
                     f"{'equals' if ref['transformers_greedy_equals_f32'] else 'differs from'} its f32 answer"
                     f"{'' if ref['transformers_greedy_equals_f32'] else ' after ' + str(common_words(answer, ref['transformers_f32_answer'])) + ' equal words (greedy equality not decisive)'}")
    lines.append(f"- verdict: {'PASS' if ok else 'FAIL'}")
    print("\n".join(lines) + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
