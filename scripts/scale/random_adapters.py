#!/usr/bin/env python3
"""P random PEFT LoRA adapters for a LLaVA checkpoint, without torch (numpy + safetensors).

For the real-size figures (eval/SCALE.md): `bella-vqa import-peft` stacks them into a particle
directory, so a 7B-shaped checkpoint gets P particles without training it on this machine. The
keys, shapes and config are those `peft` 0.21 writes for LlavaForConditionalGeneration (the
fixture tests/fixtures/peft was written by peft itself); B is random (std --b-std) so the
particles differ.

  random_adapters.py --model DIR --out DIR --particles 4 [--rank 8] [--alpha 16] [--from-layer K]
"""
import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--particles", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--b-std", type=float, default=0.01)
    ap.add_argument("--from-layer", type=int, default=0, help="first language-model layer adapted")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = json.loads((args.model / "config.json").read_text())
    text = cfg["text_config"]
    # the hub's llava-1.5 config is sparse: absent keys take LlamaConfig's defaults
    hidden = text.get("hidden_size", 4096)
    layers = text.get("num_hidden_layers", 32)
    heads = text.get("num_attention_heads", 32)
    kv = text.get("num_key_value_heads") or heads
    head_dim = hidden // heads
    outs = {"q_proj": hidden, "k_proj": kv * head_dim, "v_proj": kv * head_dim, "o_proj": hidden}
    chosen = list(range(args.from_layer, layers))
    if not chosen:
        raise SystemExit(f"--from-layer {args.from_layer}: the model has {layers} layers")
    rng = np.random.default_rng(args.seed)
    for p in range(args.particles):
        tensors = {}
        for layer in chosen:
            for proj in PROJ:
                key = f"base_model.model.model.language_model.layers.{layer}.self_attn.{proj}"
                bound = 1 / np.sqrt(hidden)
                tensors[f"{key}.lora_A.weight"] = rng.uniform(
                    -bound, bound, (args.rank, hidden)).astype(np.float32)
                tensors[f"{key}.lora_B.weight"] = (
                    rng.standard_normal((outs[proj], args.rank)) * args.b_std).astype(np.float32)
        d = args.out / f"p{p}"
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        (d / "adapter_config.json").write_text(json.dumps({
            "base_model_name_or_path": str(args.model),
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": args.rank,
            "lora_alpha": args.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "target_modules": ".*language_model.*\\.(q_proj|k_proj|v_proj|o_proj)",
            "layers_to_transform": chosen if args.from_layer > 0 else None,
            "use_dora": False,
            "use_rslora": False,
            "modules_to_save": None,
        }, indent=2))
    print(f"wrote {args.particles} adapter(s), r={args.rank}, layers {chosen[0]}-{chosen[-1]}: {args.out}")


if __name__ == "__main__":
    main()
