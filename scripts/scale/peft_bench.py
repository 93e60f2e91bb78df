#!/usr/bin/env python3
"""The transformers + PEFT peer of bella-vqa: P LoRA adapters on a LLaVA, the way a Python user runs them.

    python3 -m venv ~/.cache/bella-vqa/venv-scale
    ~/.cache/bella-vqa/venv-scale/bin/pip install -r scripts/requirements-scale.txt
    PY=~/.cache/bella-vqa/venv-scale/bin/python
    $PY scripts/scale/peft_bench.py prepare --model DIR --adapters ADIR --particles 8 [--layers-from K]
    $PY scripts/scale/peft_bench.py answer  --model DIR --adapters ADIR --particles 4 --mode sequential|batched
    $PY scripts/scale/peft_bench.py train   --model DIR --adapters ADIR --particles 4

`prepare` writes P rank-8 LoRA adapters (alpha 16, dropout 0, q/k/v/o_proj of the language model,
optionally only layers >= K through `layers_to_transform`) with random B (normal, std 0.1, seed
per adapter, like bella-vqa's benches) as PEFT directories ADIR/p0 … ADIR/p{P-1}
(`save_pretrained`). `bella-vqa import-peft --peft ADIR/p0 … --out PDIR` turns the same adapters into
a particle directory, so both sides answer with identical particles.

`answer` (one configuration per process, so that the peak RSS is its own): loads the checkpoint with
`LlavaForConditionalGeneration.from_pretrained(dtype=…)` and `AutoProcessor`, wraps it with
`PeftModel.from_pretrained(…, ADIR/p0)` and `load_adapter` for the others, then answers one image +
question greedily (`max_new_tokens` 16, stops at </s> like a user's `generate`):
  - sequential: `set_adapter(p_i)` and one `generate` per adapter;
  - batched: the prompt repeated P times in one `generate(…, adapter_names=[p0, …])` (PEFT's mixed
    adapter batch).
It reports (JSON on stdout, line `RESULT {...}`): load time, the median over `--runs` (after
`--warmup` untimed calls) of the time to answer, a prefill time (one forward over the prompt with
the same adapters), decode time per generated token ((answer - prefill) / (tokens - 1)), the peak
RSS while answering (VmHWM reset after loading through /proc/self/clear_refs) and including
loading, and every adapter's answer.

`train`: one optimisation step of P rank-8 adapters trained one after the other (`set_adapter`,
forward with labels on the answer tokens only, backward, AdamW step over that adapter's
parameters) on one image + question + answer; reports the step time (median of --runs after
--warmup) and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
REPO = Path(__file__).resolve().parents[2]
IMAGE = "tests/fixtures/images/photo.png"
QUESTION = "What color is the circle?"
ANSWER = "red"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
B_STD = 0.1


def status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_bytes(device: str) -> dict:
    out = {"peak_rss_bytes": status_kb("VmHWM") * 1024,
           "peak_rss_with_load_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.startswith("cuda"):
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return out


def load_base(args):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    t0 = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=DTYPES[args.dtype],
                                                          attn_implementation=args.attn)
    model.to(args.device)
    model.eval()
    processor = AutoProcessor.from_pretrained(args.model)
    sync(args.device)
    return model, processor, time.perf_counter() - t0


def lora_config(num_layers: int, layers_from: int | None):
    from peft import LoraConfig

    if layers_from:
        # a list of names + layers_to_transform: PEFT's own way to choose layers; the vision tower's
        # q/k/v_proj (CLIP encoder.layers.N) would match too, so it is excluded
        return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                          target_modules=TARGETS, layers_pattern="layers",
                          layers_to_transform=list(range(layers_from, num_layers)),
                          exclude_modules=r".*vision_tower.*")
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)")


def cmd_prepare(args) -> dict:
    from peft import get_peft_model

    out = Path(args.adapters)
    names = [f"p{i}" for i in range(args.particles)]
    if all((out / n / "adapter_model.safetensors").is_file() for n in names):
        return {"adapters": str(out), "kept": True}
    model, _, _ = load_base(args)
    torch.manual_seed(0)  # PEFT draws A (kaiming-uniform) from the global generator
    n_layers = model.config.text_config.num_hidden_layers
    cfg = lora_config(n_layers, args.layers_from)
    peft_model = get_peft_model(model, cfg, adapter_name=names[0])
    for n in names[1:]:
        peft_model.add_adapter(n, cfg)
    modules = 0
    for i, n in enumerate(names):
        g = torch.Generator().manual_seed(1000 + i)
        for name, mod in peft_model.named_modules():
            if hasattr(mod, "lora_B") and n in mod.lora_B:
                w = mod.lora_B[n].weight
                with torch.no_grad():
                    w.copy_((torch.randn(w.shape, generator=g, dtype=torch.float32) * B_STD).to(device=w.device, dtype=w.dtype))
                modules += i == 0
    out.mkdir(parents=True, exist_ok=True)
    for n in names:
        # PEFT writes a non-default adapter into out/<name>/
        peft_model.save_pretrained(str(out), selected_adapters=[n])
        cfg_path = out / n / "adapter_config.json"
        c = json.loads(cfg_path.read_text())
        c["base_model_name_or_path"] = str(Path(args.model).resolve())
        cfg_path.write_text(json.dumps(c, indent=2))
    return {"adapters": str(out), "kept": False, "lora_modules_per_adapter": modules,
            "layers_from": args.layers_from}


def inputs_for(processor, device: str, dtype, batch: int = 1, answer: str | None = None):
    from PIL import Image

    image = Image.open(REPO / IMAGE).convert("RGB")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    if answer is not None:
        prompt = prompt + " " + answer
    enc = processor(images=[image] * batch, text=[prompt] * batch, return_tensors="pt")
    enc = {k: v.to(device) for k, v in enc.items()}
    enc["pixel_values"] = enc["pixel_values"].to(dtype)
    return enc, prompt


def load_peft(args, model):
    from peft import PeftModel

    names = [f"p{i}" for i in range(args.particles)]
    root = Path(args.adapters)
    assert all((root / n / "adapter_config.json").is_file() for n in names), f"run `prepare` first: {root}"
    t0 = time.perf_counter()
    peft_model = PeftModel.from_pretrained(model, str(root / names[0]), adapter_name=names[0],
                                           is_trainable=args.command == "train")
    for n in names[1:]:
        peft_model.load_adapter(str(root / n), adapter_name=n, is_trainable=args.command == "train")
    sync(args.device)
    return peft_model, names, time.perf_counter() - t0


def timed(fn, runs: int, warmup: int, device: str):
    for _ in range(warmup):
        fn()
    times, result = [], None
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def answer_one(args, peft_model, processor, names: list[str], mode: str) -> dict:
    reset_peak()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    dtype = DTYPES[args.dtype]
    tok = processor.tokenizer
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False, num_beams=1,
               pad_token_id=tok.pad_token_id)
    if mode == "batched":
        enc, prompt = inputs_for(processor, args.device, dtype, batch=len(names))

        def answer():
            with torch.inference_mode():
                out = peft_model.generate(**enc, adapter_names=names, **gen)
            return [out[i, enc["input_ids"].shape[1]:] for i in range(len(names))]

        def prefill():
            with torch.inference_mode():
                peft_model(**enc, adapter_names=names, use_cache=True, logits_to_keep=1)
    else:
        enc, prompt = inputs_for(processor, args.device, dtype, batch=1)

        def answer():
            outs = []
            for n in names:
                peft_model.set_adapter(n)
                with torch.inference_mode():
                    out = peft_model.generate(**enc, **gen)
                outs.append(out[0, enc["input_ids"].shape[1]:])
            return outs

        def prefill():
            for n in names:
                peft_model.set_adapter(n)
                with torch.inference_mode():
                    peft_model(**enc, use_cache=True, logits_to_keep=1)

    answer_s, answer_all, outs = timed(answer, args.runs, args.warmup, args.device)
    prefill_s, _, _ = timed(prefill, args.runs, 0 if args.warmup == 0 else 1, args.device)
    tokens = [o.tolist() for o in outs]
    # batched rows pad after </s>: count up to the first end token
    eos = tok.eos_token_id
    lengths = [t.index(eos) + 1 if eos in t else len(t) for t in tokens]
    if mode == "sequential":
        # summed over the adapters: (answer - prefill) over the decode steps after the first token
        decode_per_token = (answer_s - prefill_s) / max(1, sum(n - 1 for n in lengths))
    else:
        decode_per_token = (answer_s - prefill_s) / max(1, max(lengths) - 1)
    return {
        "peer": "transformers+peft", "mode": mode, "particles": len(names), "dtype": args.dtype,
        "device": args.device, "attn": args.attn, "threads": torch.get_num_threads(),
        "prompt_tokens": int(enc["input_ids"].shape[1]),
        "answer_s": answer_s, "answer_runs_s": answer_all, "prefill_s": prefill_s,
        "decode_per_token_s": decode_per_token, "generated_tokens": lengths,
        "answers": [tok.decode(t, skip_special_tokens=True).strip() for t in tokens], "tokens": tokens,
        **peak_bytes(args.device),
        "versions": versions(),
    }


def cmd_answer(args) -> dict:
    """One process, one load: every (P, mode) of --particles × --mode, peaks reset per configuration."""
    torch.manual_seed(0)
    model, processor, load_s = load_base(args)
    peft_model, names, adapters_s = load_peft(args, model)
    peft_model.eval()
    results = []
    for p in args.particle_list:
        for mode in args.modes:
            if mode == "batched" and p == 1 and len(args.modes) > 1:
                continue
            r = answer_one(args, peft_model, processor, names[:p], mode)
            r.update(load_s=load_s, adapters_load_s=adapters_s)
            print(f"peer {mode} P = {p}: answer {r['answer_s']:.2f} s, decode "
                  f"{1e3 * r['decode_per_token_s']:.1f} ms/token", file=sys.stderr, flush=True)
            results.append(r)
    return results[0] if len(results) == 1 else {"results": results}


def cmd_train(args) -> dict:
    torch.manual_seed(0)
    model, processor, load_s = load_base(args)
    peft_model, names, _ = load_peft(args, model)
    peft_model.train()
    dtype = DTYPES[args.dtype]
    enc, prompt = inputs_for(processor, args.device, dtype, batch=1, answer=ANSWER)
    prompt_only, _ = inputs_for(processor, args.device, dtype, batch=1)
    labels = enc["input_ids"].clone()
    labels[:, : prompt_only["input_ids"].shape[1]] = -100
    optims = {}
    for n in names:
        peft_model.set_adapter(n)
        params = [p for name, p in peft_model.named_parameters() if f".{n}." in name and p.requires_grad]
        optims[n] = torch.optim.AdamW(params, lr=1e-4)
    reset_peak()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    losses = []

    def step():
        losses.clear()
        for n in names:
            peft_model.set_adapter(n)
            out = peft_model(**enc, labels=labels)
            out.loss.backward()
            optims[n].step()
            optims[n].zero_grad(set_to_none=True)
            losses.append(float(out.loss))

    step_s, all_s, _ = timed(step, args.runs, args.warmup, args.device)
    return {"peer": "transformers+peft", "mode": "train-sequential", "particles": len(names),
            "dtype": args.dtype, "device": args.device, "threads": torch.get_num_threads(),
            "load_s": load_s, "step_s": step_s, "step_runs_s": all_s, "losses": losses,
            "answer_tokens": int((labels != -100).sum()), **peak_bytes(args.device), "versions": versions()}


def versions() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description="transformers + PEFT peer of bella-vqa")
    ap.add_argument("command", choices=["prepare", "answer", "train"])
    ap.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    ap.add_argument("--adapters", required=True, help="directory of the PEFT adapters p0 … p{P-1}")
    ap.add_argument("--particles", default="4", help="P, or a list (answer: 1,4,8 in one process)")
    ap.add_argument("--layers-from", type=int, default=None, help="adapters only on layers >= K")
    ap.add_argument("--mode", default="sequential", help="sequential, batched, or both: sequential,batched")
    ap.add_argument("--dtype", choices=list(DTYPES), default="f32")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.particle_list = [int(p) for p in str(args.particles).split(",")]
    args.particles = max(args.particle_list)
    args.modes = args.mode.split(",")
    for m in args.modes:
        if m not in ("sequential", "batched"):
            ap.error(f"--mode: {m!r}")
    result = {"prepare": cmd_prepare, "answer": cmd_answer, "train": cmd_train}[args.command](args)
    line = json.dumps(result)
    print("RESULT " + line, flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
