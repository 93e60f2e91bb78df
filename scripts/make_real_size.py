#!/usr/bin/env python3
"""Random checkpoints with the exact layout of real hub models, without torch.

    python3 -m venv ~/.cache/bella-vqa/venv-real-size
    ~/.cache/bella-vqa/venv-real-size/bin/pip install -r scripts/requirements-real-size.txt
    ~/.cache/bella-vqa/venv-real-size/bin/python scripts/make_real_size.py llava --layers 2
    ~/.cache/bella-vqa/venv-real-size/bin/python scripts/make_real_size.py llava            # all 32 layers
    ~/.cache/bella-vqa/venv-real-size/bin/python scripts/make_real_size.py clip-b32 clip-l14-336

Models (written under --root, default ~/.cache/bella-vqa/real-size, NEVER into the repository):

  llava        llava-hf/llava-1.5-7b-hf: config.json (the hub's sparse 4.x file), generation_config,
               preprocessor/processor config, chat_template.json, tokenizer files, f16 weights in the
               transformers-4 key layout (`language_model.model.*`, `vision_tower.vision_model.*`),
               sharded like the hub (max 5 GB a file -> model-0000K-of-00003.safetensors) with
               model.safetensors.index.json. 7,063,427,072 parameters, 14,126,854,144 bytes.
               `--layers N` keeps N language-model layers (directory llava-1.5-7b-hf-LN, also 3 shards);
               everything else stays at full size (the whole CLIP ViT-L/14-336 tower).
  clip-b32     openai/clip-vit-base-patch32 (CLIPModel, f32, one model.safetensors).
  clip-l14-336 openai/clip-vit-large-patch14-336 (CLIPModel, f32, one model.safetensors).

Weights are random (f16/f32 normal, std 0.02; layer-norm / RMS-norm weights 1, their biases 0, so
activations stay finite through all 32 layers in f16). Values come from one seeded pool of normal
numbers read at random offsets: generating 7 G normal values would cost minutes of CPU for nothing.
Tokenizers are built with the `tokenizers` library: a LLaMA-style BPE with byte fallback (<unk>=0,
<s>=1, </s>=2, 32000 pieces, added <image>=32000 and <pad>=32001) and a CLIP byte-level BPE of 49408
(<|startoftext|>=49406, <|endoftext|>=49407); the pieces are learned from a small generated English
corpus and padded with filler pieces, so sizes and special ids are exact, the merges are not the
real ones. The sentencepiece `tokenizer.model` of the hub repository is not written.

Idempotent: a weight file whose size and header already match is kept; every file is written to a
temporary name and renamed. The safetensors files are streamed (header, then each tensor in chunks),
so a 5 GB shard never sits in memory; the result is checked by reading it back with `safetensors`.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np

LLAVA_7B_PARAMS = 7_063_427_072
DEFAULT_ROOT = Path(os.environ.get("BELLA_REAL_SIZE_DIR", Path.home() / ".cache" / "bella-vqa" / "real-size"))
HUB_MAX_SHARD = 5_000_000_000  # transformers' "5GB" (decimal), what the hub's 3 files were cut with
STD = 0.02
POOL_SIZE = (1 << 25) + 12_289  # odd size so offsets do not line up with matrix rows
CHUNK = 1 << 24  # values per write

# ---------------------------------------------------------------------------------------------
# configs (as the hub has them)

LLAVA_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.36.0.dev0",
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}
# LlamaConfig class defaults the sparse text_config relies on
LLAMA_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32}
CLIP_VISION_DEFAULTS = {"layer_norm_eps": 1e-5, "hidden_act": "quick_gelu", "num_channels": 3}

LLAVA_GENERATION = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                    "pad_token_id": 32001, "transformers_version": "4.36.0.dev0"}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def clip_preprocessor(size: int, processor_class: str) -> dict:
    return {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "processor_class": processor_class,
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": size},
    }


LLAVA_PROCESSOR = {"image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 14,
                   "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"}
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def clip_config(name: str) -> dict:
    if name == "clip-b32":
        text = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, projection_dim=512)
        vision = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                      image_size=224, patch_size=32, projection_dim=512)
        projection, version = 512, "4.21.3"
    else:
        text = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768)
        vision = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                      image_size=336, patch_size=14, projection_dim=768)
        projection, version = 768, "4.21.3"
    common = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "initializer_factor": 1.0,
              "initializer_range": 0.02, "layer_norm_eps": 1e-05}
    return {
        "_name_or_path": HUB_IDS[name],
        "architectures": ["CLIPModel"],
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "clip",
        "projection_dim": projection,
        "text_config": {**common, **text, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
                        "max_position_embeddings": 77, "model_type": "clip_text_model",
                        "num_hidden_layers": 12, "vocab_size": 49408},
        "torch_dtype": "float32",
        "transformers_version": version,
        "vision_config": {**common, **vision, "model_type": "clip_vision_model", "num_channels": 3},
    }


HUB_IDS = {"llava": "llava-hf/llava-1.5-7b-hf", "clip-b32": "openai/clip-vit-base-patch32",
           "clip-l14-336": "openai/clip-vit-large-patch14-336"}
DIR_NAMES = {"llava": "llava-1.5-7b-hf", "clip-b32": "clip-vit-base-patch32",
             "clip-l14-336": "clip-vit-large-patch14-336"}

# ---------------------------------------------------------------------------------------------
# tensor lists: (name, shape, dtype, init) in the module order transformers saves them


def clip_tower(prefix: str, c: dict, kind: str, with_post: bool, dtype: str) -> list:
    h, inter = c["hidden_size"], c["intermediate_size"]
    out = []
    if kind == "vision":
        p, grid = c["patch_size"], c["image_size"] // c["patch_size"]
        out += [(f"{prefix}.embeddings.class_embedding", [h], dtype, "normal"),
                (f"{prefix}.embeddings.patch_embedding.weight", [h, 3, p, p], dtype, "normal"),
                (f"{prefix}.embeddings.position_embedding.weight", [grid * grid + 1, h], dtype, "normal"),
                (f"{prefix}.pre_layrnorm.weight", [h], dtype, "ones"),
                (f"{prefix}.pre_layrnorm.bias", [h], dtype, "zeros")]
    else:
        out += [(f"{prefix}.embeddings.token_embedding.weight", [c["vocab_size"], h], dtype, "normal"),
                (f"{prefix}.embeddings.position_embedding.weight", [c["max_position_embeddings"], h], dtype,
                 "normal")]
    for i in range(c["num_hidden_layers"]):
        lp = f"{prefix}.encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            out += [(f"{lp}.self_attn.{proj}.weight", [h, h], dtype, "normal"),
                    (f"{lp}.self_attn.{proj}.bias", [h], dtype, "normal")]
        out += [(f"{lp}.layer_norm1.weight", [h], dtype, "ones"), (f"{lp}.layer_norm1.bias", [h], dtype, "zeros"),
                (f"{lp}.mlp.fc1.weight", [inter, h], dtype, "normal"), (f"{lp}.mlp.fc1.bias", [inter], dtype, "normal"),
                (f"{lp}.mlp.fc2.weight", [h, inter], dtype, "normal"), (f"{lp}.mlp.fc2.bias", [h], dtype, "normal"),
                (f"{lp}.layer_norm2.weight", [h], dtype, "ones"), (f"{lp}.layer_norm2.bias", [h], dtype, "zeros")]
    if kind == "vision" and with_post:
        out += [(f"{prefix}.post_layernorm.weight", [h], dtype, "ones"),
                (f"{prefix}.post_layernorm.bias", [h], dtype, "zeros")]
    if kind == "text":
        out += [(f"{prefix}.final_layer_norm.weight", [h], dtype, "ones"),
                (f"{prefix}.final_layer_norm.bias", [h], dtype, "zeros")]
    return out


def llava_tensors(cfg: dict) -> list:
    t = {**LLAMA_DEFAULTS, **cfg["text_config"]}
    v = {**CLIP_VISION_DEFAULTS, **cfg["vision_config"]}
    dt = "F16"
    h, inter, vocab = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    hd = h // t["num_attention_heads"]
    kv = t["num_key_value_heads"] * hd
    out = clip_tower("vision_tower.vision_model", v, "vision", True, dt)
    out += [("multi_modal_projector.linear_1.weight", [h, v["hidden_size"]], dt, "normal"),
            ("multi_modal_projector.linear_1.bias", [h], dt, "normal"),
            ("multi_modal_projector.linear_2.weight", [h, h], dt, "normal"),
            ("multi_modal_projector.linear_2.bias", [h], dt, "normal"),
            ("language_model.model.embed_tokens.weight", [vocab, h], dt, "normal")]
    for i in range(t["num_hidden_layers"]):
        lp = f"language_model.model.layers.{i}"
        out += [(f"{lp}.self_attn.q_proj.weight", [h, h], dt, "normal"),
                (f"{lp}.self_attn.k_proj.weight", [kv, h], dt, "normal"),
                (f"{lp}.self_attn.v_proj.weight", [kv, h], dt, "normal"),
                (f"{lp}.self_attn.o_proj.weight", [h, h], dt, "normal"),
                (f"{lp}.mlp.gate_proj.weight", [inter, h], dt, "normal"),
                (f"{lp}.mlp.up_proj.weight", [inter, h], dt, "normal"),
                (f"{lp}.mlp.down_proj.weight", [h, inter], dt, "normal"),
                (f"{lp}.input_layernorm.weight", [h], dt, "ones"),
                (f"{lp}.post_attention_layernorm.weight", [h], dt, "ones")]
    out += [("language_model.model.norm.weight", [h], dt, "ones"),
            ("language_model.lm_head.weight", [vocab, h], dt, "normal")]
    return out


def clip_tensors(cfg: dict) -> list:
    dt = "F32"
    t, v = cfg["text_config"], cfg["vision_config"]
    out = clip_tower("text_model", t, "text", False, dt)
    out += clip_tower("vision_model", v, "vision", True, dt)
    out += [("visual_projection.weight", [cfg["projection_dim"], v["hidden_size"]], dt, "normal"),
            ("text_projection.weight", [cfg["projection_dim"], t["hidden_size"]], dt, "normal"),
            ("logit_scale", [], dt, "logit_scale"),
            # persistent buffers of the transformers-4.21 checkpoints
            ("text_model.embeddings.position_ids", [1, t["max_position_embeddings"]], "I64", "arange"),
            ("vision_model.embeddings.position_ids",
             [1, (v["image_size"] // v["patch_size"]) ** 2 + 1], "I64", "arange")]
    return out


def llava_param_count(layers: int) -> int:
    """Parameters of llava-1.5-7b with `layers` language-model layers (closed form, from the shapes)."""
    h, inter, vocab = 4096, 11008, 32064
    per_layer = 4 * h * h + 3 * h * inter + 2 * h
    vh, vi, vl = 1024, 4096, 24
    vision = vh + vh * 3 * 14 * 14 + 577 * vh + 2 * vh + vl * (4 * (vh * vh + vh) + vi * vh + vi + vh * vi + vh + 4 * vh) + 2 * vh
    projector = vh * h + h + h * h + h
    return 2 * vocab * h + h + layers * per_layer + vision + projector


assert llava_param_count(32) == LLAVA_7B_PARAMS

# ---------------------------------------------------------------------------------------------
# streaming safetensors writer

NP_DTYPES = {"F16": np.float16, "F32": np.float32, "I64": np.int64}
DT_BYTES = {"F16": 2, "F32": 4, "I64": 8}


def nbytes(t) -> int:
    return int(np.prod(t[1], dtype=np.int64)) * DT_BYTES[t[2]]


def header_for(tensors: list) -> tuple[bytes, int]:
    """The safetensors header (padded to 8 bytes) for `tensors` laid out in name order."""
    meta = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dt, _ in sorted(tensors, key=lambda t: t[0]):
        n = nbytes((name, shape, dt, None))
        meta[name] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


class Pool:
    """Seeded normal values (std 1) read at random offsets: fast random-looking tensors."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.values = {"F16": None, "F32": None}
        base = self.rng.standard_normal(POOL_SIZE, dtype=np.float32) * STD
        self.values["F32"] = base
        self.values["F16"] = base.astype(np.float16)

    def chunks(self, dt: str, count: int, init: str, length: int):
        np_dt = NP_DTYPES[dt]
        if init in ("ones", "zeros", "logit_scale", "arange"):
            if init == "arange":
                yield np.arange(length, dtype=np.int64)
                return
            value = {"ones": 1.0, "zeros": 0.0, "logit_scale": 2.6592}[init]
            yield np.full(count, value, dtype=np_dt)
            return
        pool = self.values[dt]
        done = 0
        while done < count:
            n = min(CHUNK, count - done, POOL_SIZE)
            start = int(self.rng.integers(0, POOL_SIZE - n + 1))
            yield pool[start:start + n]
            done += n


def write_safetensors(path: Path, tensors: list, pool: Pool) -> None:
    header, data_len = header_for(tensors)
    if path.exists() and path.stat().st_size == len(header) + data_len:
        with open(path, "rb") as f:
            if f.read(len(header)) == header:
                print(f"  {path.name}: complete, kept", flush=True)
                return
    tmp = path.with_name(path.name + ".tmp")
    t0 = time.time()
    with open(tmp, "wb") as f:
        f.write(header)
        for name, shape, dt, init in sorted(tensors, key=lambda t: t[0]):
            count = int(np.prod(shape, dtype=np.int64))
            length = shape[-1] if shape else 1
            for chunk in pool.chunks(dt, count, init, length):
                f.write(chunk.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    mb = (len(header) + data_len) / 1e6
    print(f"  {path.name}: {mb:,.0f} MB in {time.time() - t0:.1f} s", flush=True)


def verify_safetensors(path: Path, tensors: list) -> None:
    """Reads the file back with the safetensors library: names, shapes, dtypes, one small tensor."""
    from safetensors import safe_open

    want = {t[0]: t for t in tensors}
    with safe_open(str(path), framework="numpy") as f:
        keys = set(f.keys())
        assert keys == set(want), f"{path}: keys differ: {sorted(keys ^ set(want))[:5]}"
        small = min(tensors, key=lambda t: (nbytes(t), t[0]))
        arr = f.get_tensor(small[0])
        assert list(arr.shape) == small[1] and arr.dtype == NP_DTYPES[small[2]], (small, arr.shape, arr.dtype)
        for name in keys:
            sl = f.get_slice(name)
            assert list(sl.get_shape()) == want[name][1], name
            assert sl.get_dtype() == want[name][2], (name, sl.get_dtype())


def shard(tensors: list, max_bytes: int | None, shards: int | None) -> list[list]:
    """transformers' greedy split (a new file when the next tensor would pass `max_bytes`), or an
    even split into `shards` files by cumulative size."""
    if max_bytes is not None:
        out, cur, size = [], [], 0
        for t in tensors:
            n = nbytes(t)
            if cur and size + n > max_bytes:
                out.append(cur)
                cur, size = [], 0
            cur.append(t)
            size += n
        out.append(cur)
        return out
    total = sum(nbytes(t) for t in tensors)
    out = [[] for _ in range(shards)]
    acc = 0
    for t in tensors:
        out[min(shards - 1, acc * shards // total)].append(t)
        acc += nbytes(t)
    return [s for s in out if s]


def write_json(path: Path, obj, indent=2) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_weights(out: Path, tensors: list, pool: Pool, max_bytes: int | None, shards: int | None,
                  single: bool) -> None:
    if single:
        path = out / "model.safetensors"
        write_safetensors(path, tensors, pool)
        verify_safetensors(path, tensors)
        return
    parts = shard(tensors, max_bytes, shards)
    n = len(parts)
    weight_map = {}
    for k, part in enumerate(parts, 1):
        name = f"model-{k:05d}-of-{n:05d}.safetensors"
        write_safetensors(out / name, part, pool)
        verify_safetensors(out / name, part)
        weight_map.update({t[0]: name for t in part})
    index = {"metadata": {"total_size": sum(nbytes(t) for t in tensors)},
             "weight_map": dict(sorted(weight_map.items()))}
    write_json(out / "model.safetensors.index.json", index)
    # a stale file of another shard count would confuse a loader that globs
    for p in out.glob("model-*-of-*.safetensors"):
        if p.name not in set(weight_map.values()):
            p.unlink()


# ---------------------------------------------------------------------------------------------
# tokenizers

WORDS = """the a an of to in is on and what which how many color colour shape circle square triangle
star heart red green blue yellow purple orange black white gray grey brown pink left right top bottom
above below next there are picture image photo cat dog sofa table chair man woman child person people
car bus train street road tree sky water sea boat plane bird horse cow sheep grass field house room
kitchen bed window door wall floor light dark big small large little tall short wearing holding sitting
standing playing eating looking riding walking running yes no one two three four five six seven eight
nine ten this that it he she they his her their its be was were has have do does did not can could
would should will with without for from at by as or but if then than so very more most some any all
each every other another same different front back behind between near far inside outside under over
who where when why whose time day night morning evening food pizza cake fruit apple banana sandwich
plate cup bottle glass phone computer laptop keyboard book clock sign number letter word text game ball
frisbee kite umbrella bag hat shirt shorts jacket shoe glasses tie snow skis skateboard surfboard tennis
baseball bat player team field court beach mountain city building bridge river park bench fence animal
elephant giraffe zebra bear mirror sink toilet vase flower plant pot television remote oven fridge""".split()


def corpus(seed: int, lines: int = 60_000) -> list[str]:
    rng = np.random.default_rng(seed)
    syll = ["ka", "lo", "mi", "ter", "sun", "dra", "pel", "vin", "or", "ex", "qua", "zen", "bri", "sto", "ght",
            "ing", "tion", "ment", "able", "ous", "ly", "er", "est", "pre", "con", "dis", "re", "un", "ph"]
    words = WORDS + ["".join(rng.choice(syll, size=rng.integers(2, 5))) for _ in range(6000)]
    out = []
    for _ in range(lines):
        n = int(rng.integers(4, 14))
        w = rng.choice(words, size=n)
        s = " ".join(w)
        s = s[0].upper() + s[1:] + rng.choice([".", "?", "!", ",", ":"])
        if rng.random() < 0.2:
            s += f" {int(rng.integers(0, 10000))}"
        out.append(s)
    return out


def llama_tokenizer(seed: int) -> str:
    """A LLaMA-style tokenizer.json (the transformers-5 form: Metaspace, byte fallback)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers, AddedToken

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=specials, show_progress=False,
                                  min_frequency=2, limit_alphabet=200)
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    i = 0
    while len(vocab) < 32000:
        piece = f"▁unused{i:05d}"
        if piece not in vocab:
            vocab[piece] = len(vocab)
        i += 1
    assert sorted(vocab.values()) == list(range(32000))
    assert vocab["<unk>"] == 0 and vocab["<s>"] == 1 and vocab["</s>"] == 2 and vocab["<0x00>"] == 3
    tok = Tokenizer.from_str(json.dumps(data))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", 1)])
    # the three specials as added (special) tokens, then the two LLaVA additions
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.add_special_tokens([AddedToken("<image>", normalized=False, special=True),
                            AddedToken("<pad>", normalized=False, special=True)])
    assert tok.token_to_id("<image>") == 32000 and tok.token_to_id("<pad>") == 32001
    assert tok.get_vocab_size() == 32002
    ids = tok.encode("USER: <image>\nWhat color is the circle? ASSISTANT:").ids
    assert ids[0] == 1 and 32000 in ids, ids
    return tok.to_str(pretty=True)


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clip_tokenizer(seed: int) -> str:
    """A CLIP-style byte-level BPE of 49408 (the layout of openai/clip-vit-*'s tokenizer.json)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from tokenizers import AddedToken

    def setup(tok):
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])

    probe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    setup(probe)
    trainer = trainers.BpeTrainer(vocab_size=20000, show_progress=False, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  end_of_word_suffix="</w>")
    probe.train_from_iterator(corpus(seed + 1), trainer=trainer)
    merges = json.loads(probe.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    base = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(base)}
    for c in base:
        vocab[c + "</w>"] = len(vocab)
    kept = []
    for a, b in merges:
        if a in vocab and b in vocab and a + b not in vocab and len(vocab) < 49406:
            vocab[a + b] = len(vocab)
            kept.append((a, b))
    i = 0
    while len(vocab) < 49406:
        piece = f"unused{i:05d}</w>"
        if piece not in vocab:
            vocab[piece] = len(vocab)
        i += 1
    vocab["<|startoftext|>"] = 49406
    vocab["<|endoftext|>"] = 49407
    tok = Tokenizer(models.BPE(vocab=vocab, merges=kept, unk_token="<|endoftext|>", continuing_subword_prefix="",
                               end_of_word_suffix="</w>", fuse_unk=False))
    setup(tok)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(("<|endoftext|>", 49407), ("<|startoftext|>", 49406),
                                                      trim_offsets=False, add_prefix_space=False)
    tok.add_special_tokens([AddedToken("<|startoftext|>", normalized=True, special=True),
                            AddedToken("<|endoftext|>", normalized=False, special=True)])
    assert tok.get_vocab_size() == 49408
    ids = tok.encode("a photo of a cat").ids
    assert ids[0] == 49406 and ids[-1] == 49407, ids
    return tok.to_str(pretty=True)


# ---------------------------------------------------------------------------------------------


def sibling_tokenizer(root: Path, prefix: str, seed: int) -> str | None:
    """The tokenizer.json of an already written model of the same family and seed (training the
    tokenizer is the slow part of a small model), or None."""
    for d in sorted(p for p in root.glob(prefix + "*") if p.is_dir()):
        tok, stamp = d / "tokenizer.json", root / f".{d.name}.seed"
        if tok.is_file() and stamp.is_file() and stamp.read_text().strip() == str(seed):
            return tok.read_text()
    return None


def added(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def write_llava(root: Path, layers: int, seed: int, shards: int) -> Path:
    name = DIR_NAMES["llava"] + ("" if layers == 32 else f"-L{layers}")
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(json.dumps(LLAVA_CONFIG))
    if layers != 32:
        cfg["text_config"]["num_hidden_layers"] = layers
    tensors = llava_tensors(cfg)
    params = sum(int(np.prod(t[1], dtype=np.int64)) for t in tensors)
    assert params == llava_param_count(layers), (params, llava_param_count(layers))
    print(f"{HUB_IDS['llava']} with {layers} language-model layers -> {out}\n"
          f"  {params:,} parameters, {params * 2:,} bytes in f16", flush=True)
    write_json(out / "config.json", cfg)
    write_json(out / "generation_config.json", LLAVA_GENERATION)
    write_json(out / "preprocessor_config.json", clip_preprocessor(336, "LlavaProcessor"))
    write_json(out / "processor_config.json", LLAVA_PROCESSOR)
    write_json(out / "chat_template.json", {"chat_template": LLAVA_CHAT_TEMPLATE})
    tok_path = out / "tokenizer.json"
    if not tok_path.exists():
        text = sibling_tokenizer(root, DIR_NAMES["llava"], seed) or llama_tokenizer(seed)
        tmp = tok_path.with_name("tokenizer.json.tmp")
        tmp.write_text(text)
        os.replace(tmp, tok_path)
        (out.parent / f".{out.name}.seed").write_text(f"{seed}\n")  # beside, not in, the model
    write_json(out / "added_tokens.json", {"<image>": 32000, "<pad>": 32001})
    write_json(out / "special_tokens_map.json", {
        "bos_token": {k: v for k, v in added("<s>").items() if k != "special"},
        "eos_token": {k: v for k, v in added("</s>").items() if k != "special"},
        "pad_token": "<pad>",
        "unk_token": {k: v for k, v in added("<unk>").items() if k != "special"},
    })
    write_json(out / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): added(c) for i, c in
                                 [(0, "<unk>"), (1, "<s>"), (2, "</s>"), (32000, "<image>"), (32001, "<pad>")]},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": "<pad>",
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "trust_remote_code": False,
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    })
    pool = Pool(seed)
    if layers == 32:
        write_weights(out, tensors, pool, HUB_MAX_SHARD, None, False)
    else:
        write_weights(out, tensors, pool, None, shards, False)
    files = sorted(out.glob("model-*.safetensors"))
    print(f"  {len(files)} weight files, {sum(p.stat().st_size for p in files) / 1e9:.2f} GB", flush=True)
    return out


def write_clip(root: Path, which: str, seed: int) -> Path:
    out = root / DIR_NAMES[which]
    out.mkdir(parents=True, exist_ok=True)
    cfg = clip_config(which)
    tensors = clip_tensors(cfg)
    params = sum(int(np.prod(t[1], dtype=np.int64)) for t in tensors if t[2] != "I64")
    print(f"{HUB_IDS[which]} -> {out}\n  {params:,} parameters (+ position_ids buffers), f32", flush=True)
    write_json(out / "config.json", cfg)
    size = cfg["vision_config"]["image_size"]
    write_json(out / "preprocessor_config.json", clip_preprocessor(size, "CLIPProcessor"))
    tok_path = out / "tokenizer.json"
    if not tok_path.exists():
        text = sibling_tokenizer(root, "clip-vit-", seed) or clip_tokenizer(seed)
        tmp = tok_path.with_name("tokenizer.json.tmp")
        tmp.write_text(text)
        os.replace(tmp, tok_path)
        (out.parent / f".{out.name}.seed").write_text(f"{seed}\n")  # beside, not in, the model
    sot = {"content": "<|startoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
           "single_word": False}
    eot = {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    write_json(out / "special_tokens_map.json",
               {"bos_token": sot, "eos_token": eot, "pad_token": "<|endoftext|>", "unk_token": eot})
    write_json(out / "tokenizer_config.json", {
        "add_prefix_space": False,
        "bos_token": sot,
        "do_lower_case": True,
        "eos_token": eot,
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": HUB_IDS[which],
        "pad_token": "<|endoftext|>",
        "processor_class": "CLIPProcessor",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": eot,
    })
    write_weights(out, tensors, Pool(seed), None, None, True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", default=["llava"], choices=["llava", "clip-b32", "clip-l14-336", "all"])
    ap.add_argument("--layers", type=int, default=32, help="language-model layers of the LLaVA (default 32)")
    ap.add_argument("--shards", type=int, default=3, help="weight files of a reduced LLaVA (default 3)")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"output root (default {DEFAULT_ROOT})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--print-dir", action="store_true", help="only print the directory a model would go to")
    # Options may come before or after the model names (`llava --layers 2 clip-b32`).
    args = ap.parse_intermixed_args()
    models = ["llava", "clip-b32", "clip-l14-336"] if "all" in args.models else args.models
    if not 1 <= args.layers <= 32:
        ap.error("--layers must be within 1..32")
    if args.print_dir:
        for m in models:
            suffix = f"-L{args.layers}" if m == "llava" and args.layers != 32 else ""
            print(args.root / (DIR_NAMES[m] + suffix))
        return 0
    repo = Path(__file__).resolve().parents[1]
    root = args.root.resolve()
    if root == repo or repo in root.parents:
        ap.error(f"{root} is inside the repository: generated checkpoints never go there")
    t0 = time.time()
    for m in models:
        if m == "llava":
            write_llava(root, args.layers, args.seed, args.shards)
        else:
            write_clip(root, m, args.seed)
    print(f"done in {time.time() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
