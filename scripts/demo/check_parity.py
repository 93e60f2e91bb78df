#!/usr/bin/env python3
"""Reference outputs of the shipped demo models (demo/llava, demo/clip) computed with transformers.

    ~/.cache/bella-fixtures-venv/bin/python scripts/demo/check_parity.py

Loads both models from the repository exactly as a user of transformers would (from_pretrained,
AutoProcessor / AutoTokenizer / the PIL image processors, f32, eager attention) and writes

  tests/fixtures/reference/demo.safetensors
      llava.input_ids, llava.attention_mask, llava.pixel_values, llava.logits   one image prompt
      llava.greedy_tokens                                                        greedy answer + </s>
      clip.input_ids, clip.attention_mask                                        the candidate prompts
      clip.pixel_values, clip.logits_per_image                                   `question: q answer: a`
  tests/fixtures/reference/demo.json
      the image, question, prompt, decoded answers and the answer vocabulary

tests/demo.rs loads demo/llava and demo/clip with the Rust crate and compares (tolerance 1e-4).
Run it again whenever the demo models are retrained.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import tokenizers  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoProcessor, AutoTokenizer, CLIPModel, LlavaForConditionalGeneration  # noqa: E402
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

ROOT = Path(__file__).resolve().parents[2]
LLAVA = ROOT / "demo" / "llava"
CLIP = ROOT / "demo" / "clip"
REF = ROOT / "tests" / "fixtures" / "reference"
IMAGE = "eval/demo/red-circle.png"
QUESTION = "What color is the circle?"


def i64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.int64).contiguous().clone()


def f32(t: torch.Tensor) -> torch.Tensor:
    assert t.dtype == torch.float32
    return t.detach().contiguous().clone()


def main() -> None:
    image = Image.open(ROOT / IMAGE).convert("RGB")
    ref, meta = {}, {"image": IMAGE, "question": QUESTION}
    with torch.no_grad():
        # ---------------- LLaVA ----------------
        model = LlavaForConditionalGeneration.from_pretrained(LLAVA, attn_implementation="eager").eval()
        assert model.dtype == torch.float32
        proc = AutoProcessor.from_pretrained(LLAVA, backend="pil")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        prompt = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert prompt == f"USER: <image>\n{QUESTION} ASSISTANT:", repr(prompt)
        inputs = proc(images=image, text=prompt, return_tensors="pt")
        vc = model.config.vision_config
        n_image = (vc.image_size // vc.patch_size) ** 2
        raw = tokenizers.Tokenizer.from_file(str(LLAVA / "tokenizer.json"))
        assert raw.encode(prompt.replace("<image>", "<image>" * n_image)).ids == inputs["input_ids"][0].tolist()
        out = model(**inputs)
        ref["llava.input_ids"] = i64(inputs["input_ids"])
        ref["llava.attention_mask"] = i64(inputs["attention_mask"])
        ref["llava.pixel_values"] = f32(inputs["pixel_values"])
        ref["llava.logits"] = f32(out.logits)
        gen = model.generate(**inputs, do_sample=False, max_new_tokens=8)
        new = gen[0, inputs["input_ids"].shape[1]:]
        ref["llava.greedy_tokens"] = i64(new[None])
        meta["llava"] = {
            "prompt": prompt,
            "image_tokens": n_image,
            "greedy_tokens": new.tolist(),
            "answer": proc.tokenizer.decode(new, skip_special_tokens=True).strip(),
        }

        # ---------------- CLIP ----------------
        cmodel = CLIPModel.from_pretrained(CLIP, attn_implementation="eager").eval()
        ctok = AutoTokenizer.from_pretrained(CLIP)
        cip = CLIPImageProcessorPil.from_pretrained(CLIP)
        vocab = (CLIP / "answers.txt").read_text(encoding="utf-8").split()
        texts = [f"question: {QUESTION} answer: {a}" for a in vocab]
        enc = ctok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        craw = tokenizers.Tokenizer.from_file(str(CLIP / "tokenizer.json"))
        for i, t in enumerate(texts):
            n = int(enc.attention_mask[i].sum())
            assert craw.encode(t).ids == enc.input_ids[i, :n].tolist(), t
        pix = cip(image, return_tensors="pt").pixel_values
        cout = cmodel(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pix)
        ref["clip.input_ids"] = i64(enc.input_ids)
        ref["clip.attention_mask"] = i64(enc.attention_mask)
        ref["clip.pixel_values"] = f32(pix)
        ref["clip.logits_per_image"] = f32(cout.logits_per_image)
        probs = cout.logits_per_image.softmax(-1)[0]
        meta["clip"] = {
            "answer_vocabulary": vocab,
            "answer": vocab[int(probs.argmax())],
            "probability": float(probs.max()),
        }
    assert torch.equal(ref["llava.pixel_values"], ref["clip.pixel_values"]), "same 32 px CLIP preprocessing"
    meta["versions"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                        "tokenizers": tokenizers.__version__}
    REF.mkdir(parents=True, exist_ok=True)
    save_file(ref, REF / "demo.safetensors", metadata={"format": "pt"})
    (REF / "demo.json").write_text(json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in meta.items() if k != "versions"}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
