#!/usr/bin/env python3
"""Generate the numerical-parity fixtures under tests/fixtures/ for bella-vqa.

Everything is built from scratch (no model hub, no downloads) with seeded random weights:

  tests/fixtures/images/           three small deterministic PNGs
  tests/fixtures/clip-tiny/        tiny CLIPModel + CLIP-style BPE tokenizer + image processor
  tests/fixtures/llava-tiny-hub/   tiny LLaVA-1.5 in the layout of llava-hf/llava-1.5-7b-hf
                                   (hub key names, 2 safetensors shards + index, sparse 4.x-era config,
                                   chat_template.json)
  tests/fixtures/llava-tiny-v5/    the same model exactly as transformers 5 save_pretrained writes it
  tests/fixtures/reference/        reference outputs computed with transformers (f32, eager attention)
  tests/fixtures/peft/llava-lora/  a LoRA adapter on llava-tiny-hub's language model saved by the real `peft`
                                   (reference/peft.safetensors: the logits of the PEFT-wrapped model)

Rerun by hand (CI only runs the Rust side):

    ~/.cache/bella-fixtures-venv/bin/python scripts/make_fixtures.py

To check that PEFT loads adapters written by `bella-vqa export-peft` (each directory is compared
with the logits of the PEFT fixture when it holds the same factors, and always loaded key by key):

    ~/.cache/bella-fixtures-venv/bin/python scripts/make_fixtures.py --check-peft-export DIR [DIR ...]

The script is deterministic: rerunning it with the pinned environment
(scripts/requirements-fixtures.txt) reproduces the same files.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil  # noqa: E402
from tokenizers import AddedToken  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
IMG_DIR = FIX / "images"
CLIP_DIR = FIX / "clip-tiny"
HUB_DIR = FIX / "llava-tiny-hub"
V5_DIR = FIX / "llava-tiny-v5"
REF_DIR = FIX / "reference"
PEFT_DIR = FIX / "peft"
PEFT_LORA_DIR = PEFT_DIR / "llava-lora"

SEED = 20240611
ATTN = "eager"

# The chat template of llava-hf/llava-1.5-7b-hf (its chat_template.json), verbatim.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Small training corpus shared by both tokenizers (questions about coloured shapes).
CORPUS = [
    "a photo of a red circle",
    "a photo of a blue square",
    "a photo of a green triangle",
    "a photo of a cat",
    "a photo of a dog on the grass",
    "what color is the square",
    "what color is the circle",
    "what color is the triangle",
    "what is the color of the big shape",
    "how many shapes are there",
    "how many circles are there in the picture",
    "how many squares are in the image",
    "is there a blue square in the picture",
    "is there a red circle in the image",
    "is the circle left or right of the square",
    "the answer is red",
    "the answer is blue",
    "the answer is green",
    "the answer is yellow",
    "there are three shapes",
    "there are two circles and one square",
    "question: what is in the picture? answer: a cat.",
    "question: which shape is green? answer: the triangle.",
    "USER: What color is the circle? ASSISTANT: The circle is red.",
    "USER: How many shapes are there? ASSISTANT: There are three shapes.",
    "USER: Is there a blue square in the picture? ASSISTANT: Yes, there is.",
    "USER: Describe the image. ASSISTANT: A small red circle next to a blue square on a white background.",
    "The cat sits on the mat. The dog runs in the park.",
    "Yes. No. Maybe. One, two, three, four, five.",
    "the sky is blue and the grass is green",
    "a yellow line crosses the picture from left to right",
    "small shapes with bright colors",
]
CORPUS = CORPUS * 2  # frequencies matter for BPE; duplicate to make merges stable

# different lengths (-> right padding); "chequered" is not in the BPE corpus, so it is split into sub-words
CLIP_TEXTS = ["a photo of a red circle on a chequered mat", "what color is the square?"]
LLAVA_Q_IMAGE = "What color is the circle?"
LLAVA_Q_TEXT = "How many shapes are there?"
LLAVA_Q_BATCH = ["What color is the circle?", "Is there a blue square in the picture?"]
NEW_TOKENS = 8


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[make_fixtures] {msg}", flush=True)


def reset_dir(d: Path) -> None:
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def f32(t: torch.Tensor) -> torch.Tensor:
    assert t.dtype == torch.float32, t.dtype
    return t.detach().contiguous().clone()


def i64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.int64).contiguous().clone()


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# --------------------------------------------------------------------------------------------------
# 1. images
# --------------------------------------------------------------------------------------------------


def make_images() -> dict[str, Image.Image]:
    reset_dir(IMG_DIR)

    # 30x30: red circle, blue square, green triangle, yellow line
    sq = Image.new("RGB", (30, 30), (236, 233, 222))
    d = ImageDraw.Draw(sq)
    d.ellipse([2, 2, 14, 14], fill=(214, 32, 40))
    d.rectangle([17, 3, 27, 13], fill=(30, 62, 206))
    d.polygon([(3, 27), (13, 17), (23, 27)], fill=(38, 168, 64))
    d.line([(0, 29), (29, 15)], fill=(246, 198, 8), width=1)
    d.point([(28, 28), (27, 28)], fill=(10, 10, 10))

    # 45x30 (width 45, height 30): red circle left, green square middle, blue bar right
    wide = Image.new("RGB", (45, 30), (250, 246, 236))
    d = ImageDraw.Draw(wide)
    d.ellipse([3, 6, 19, 22], fill=(220, 38, 30))
    d.rectangle([22, 8, 32, 18], fill=(44, 160, 70))
    d.rectangle([36, 2, 41, 27], fill=(36, 70, 200))
    d.line([(0, 27), (44, 25)], fill=(120, 60, 150), width=2)

    # 64x48: smooth gradient + shapes (needs a real resize in both processors)
    h, w = 48, 64
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 30 + 190 * xx / (w - 1)
    g = 50 + 160 * yy / (h - 1)
    b = 128 + 90 * np.sin(xx / 9.0) * np.cos(yy / 7.0)
    arr = np.stack([r, g, b], axis=-1).round().clip(0, 255).astype(np.uint8)
    photo = Image.fromarray(arr, mode="RGB")
    d = ImageDraw.Draw(photo)
    d.ellipse([6, 8, 26, 28], fill=(250, 220, 30))
    d.rectangle([36, 20, 56, 40], fill=(20, 40, 120))
    d.polygon([(10, 44), (22, 32), (34, 44)], fill=(245, 245, 245))

    imgs = {"square.png": sq, "wide.png": wide, "photo.png": photo}
    for name, im in imgs.items():
        im.save(IMG_DIR / name, format="PNG", optimize=False)
    # always work from what was written to disk
    return {name: Image.open(IMG_DIR / name).convert("RGB") for name in imgs}


# --------------------------------------------------------------------------------------------------
# weight init: every parameter non-trivial
# --------------------------------------------------------------------------------------------------


def randomize_(model: torch.nn.Module, gen: torch.Generator, emb_std: dict[str, float], logit_scale=None) -> dict:
    """Overwrite EVERY parameter with seeded random values.

    - LayerNorm / RMSNorm weights: 1 + N(0, 0.1^2)
    - biases (incl. LayerNorm biases): N(0, 0.05^2)
    - linear / conv weights: N(0, 1/fan_in)  (keeps activations O(1))
    - embeddings: N(0, emb_std[...]^2) by name suffix
    - CLIP logit_scale: fixed non-default value
    """
    norm_params = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.LayerNorm) or "RMSNorm" in type(mod).__name__:
            for pname, _ in mod.named_parameters(recurse=False):
                norm_params.add(f"{mname}.{pname}" if mname else pname)
    stats = collections.Counter()
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if name.endswith("logit_scale"):
                p.fill_(logit_scale)
                stats["logit_scale"] += 1
                continue
            if name in norm_params and name.endswith(".weight"):
                v = 1.0 + 0.1 * torch.randn(shape, generator=gen)
                stats["norm_weight"] += 1
            elif name.endswith(".bias"):
                v = 0.05 * torch.randn(shape, generator=gen)
                stats["bias"] += 1
            else:
                std = None
                for suffix, s in emb_std.items():
                    if name.endswith(suffix):
                        std = s
                        break
                if std is None:
                    assert p.ndim >= 2, name
                    fan_in = int(np.prod(shape[1:]))
                    std = 1.0 / math.sqrt(fan_in)
                    stats["weight"] += 1
                else:
                    stats["embedding"] += 1
                v = std * torch.randn(shape, generator=gen)
            p.copy_(v.to(p.dtype))
    return dict(stats)


# --------------------------------------------------------------------------------------------------
# 2. CLIP
# --------------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode mapping (in CLIP's vocab order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


CLIP_PRE_PAT = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def learn_bpe(words: collections.Counter, n_merges: int) -> list[tuple[str, str]]:
    """Plain deterministic BPE: most frequent pair, ties broken by the smallest pair."""
    words = {tuple(w): c for w, c in words.items()}
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        new_words = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    return merges


def build_clip_tokenizer() -> CLIPTokenizer:
    b2u = bytes_to_unicode()
    words = collections.Counter()
    for line in CORPUS:
        text = re.sub(r"\s+", " ", line).strip().lower()
        for w in CLIP_PRE_PAT.findall(text):
            wb = "".join(b2u[x] for x in w.encode("utf-8"))
            words[tuple(wb[:-1]) + (wb[-1] + "</w>",)] += 1
    merges = learn_bpe(words, 220)
    base = list(b2u.values())
    tokens = base + [t + "</w>" for t in base]
    # Special tokens are placed right after the 512 byte tokens (NOT at the end of the vocab as in
    # openai/clip): this way "argmax(input_ids)" (legacy eos_token_id == 2 pooling) and "first eos
    # position" pooling give DIFFERENT positions, so the fixtures can tell the two conventions apart.
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    for a, b in merges:
        t = a + b
        if t not in tokens:
            tokens.append(t)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=32)
    return tok


def clip_reference(images: dict[str, Image.Image]) -> None:
    reset_dir(CLIP_DIR)
    tok = build_clip_tokenizer()
    tok.save_pretrained(CLIP_DIR)
    log(f"clip tokenizer: {len(tok)} tokens, bos={tok.bos_token_id} eos={tok.eos_token_id} pad={tok.pad_token_id}")

    ip = CLIPImageProcessorPil(
        size={"shortest_edge": 30},
        crop_size={"height": 30, "width": 30},
        resample=3,
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )
    ip.save_pretrained(CLIP_DIR)

    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            hidden_act="quick_gelu",
            projection_dim=24,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            image_size=30,
            patch_size=6,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            hidden_act="quick_gelu",
            projection_dim=24,
        ),
        projection_dim=24,
        logit_scale_init_value=2.3,
    )
    torch.manual_seed(SEED)
    model = CLIPModel(config)
    gen = torch.Generator().manual_seed(SEED + 1)
    stats = randomize_(
        model,
        gen,
        emb_std={
            "token_embedding.weight": 0.5,
            "text_model.embeddings.position_embedding.weight": 0.5,
            "vision_model.embeddings.position_embedding.weight": 0.5,
            "class_embedding": 0.5,
        },
        logit_scale=2.3,
    )
    log(f"clip init: {stats}")
    model.save_pretrained(CLIP_DIR)

    # ---- reload everything from disk (this is what the Rust side loads) ----
    model = CLIPModel.from_pretrained(CLIP_DIR, attn_implementation=ATTN).eval()
    tok = AutoTokenizer.from_pretrained(CLIP_DIR)
    ip = AutoImageProcessor.from_pretrained(CLIP_DIR, backend="pil")
    assert type(ip).__name__ == "CLIPImageProcessorPil", type(ip)
    assert abs(model.logit_scale.item() - 2.3) < 1e-6
    tcfg = model.config.text_config
    assert tcfg.eos_token_id == tok.eos_token_id != 2

    # tokenizer.json parity: the raw `tokenizers` library must give the same ids (that is what Rust uses)
    raw = tokenizers.Tokenizer.from_file(str(CLIP_DIR / "tokenizer.json"))
    enc = tok(CLIP_TEXTS, padding=True, return_tensors="pt")
    for i, t in enumerate(CLIP_TEXTS):
        ids = raw.encode(t).ids
        n = int(enc.attention_mask[i].sum())
        assert ids == enc.input_ids[i, :n].tolist(), (ids, enc.input_ids[i])
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    input_ids, attention_mask = enc.input_ids, enc.attention_mask

    ref = {}
    ref["text.input_ids"] = i64(input_ids)
    ref["text.attention_mask"] = i64(attention_mask)
    with torch.no_grad():
        tm = model.text_model
        ref["text.embeddings"] = f32(tm.embeddings(input_ids=input_ids))
        hooked = {}
        hs = [tm.encoder.layers[i].register_forward_hook(lambda m, a, o, i=i: hooked.__setitem__(i, layer_output(o))) for i in range(len(tm.encoder.layers))]
        tout = tm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        for h in hs:
            h.remove()
        assert len(tout.hidden_states) == tcfg.num_hidden_layers + 1
        assert max_abs(tout.hidden_states[0], ref["text.embeddings"]) == 0
        for i, hsi in enumerate(tout.hidden_states):
            if i > 0:
                assert max_abs(hsi, hooked[i - 1]) == 0, i
            ref[f"text.hidden_states.{i}"] = f32(hsi)
        ref["text.last_hidden_state"] = f32(tout.last_hidden_state)
        ref["text.pooled"] = f32(tout.pooler_output)
        eos_pos = (input_ids == tcfg.eos_token_id).int().argmax(-1)
        assert max_abs(tout.pooler_output, tout.last_hidden_state[torch.arange(2), eos_pos]) == 0
        ref["text.embeds"] = f32(model.text_projection(tout.pooler_output))
        # legacy convention (config eos_token_id == 2, as in openai/clip-vit-base-patch32): argmax(input_ids)
        tm.eos_token_id = 2
        legacy = tm(input_ids=input_ids, attention_mask=attention_mask)
        tm.eos_token_id = tcfg.eos_token_id
        argmax_pos = input_ids.argmax(-1)
        assert max_abs(legacy.pooler_output, tout.last_hidden_state[torch.arange(2), argmax_pos]) == 0
        assert not torch.equal(argmax_pos, eos_pos), "vocab layout should make argmax != first eos"
        ref["text.pooled_legacy_eos2"] = f32(legacy.pooler_output)

        pix = ip([images["square.png"], images["wide.png"]], return_tensors="pt").pixel_values
        assert tuple(pix.shape) == (2, 3, 30, 30)
        ref["vision.pixel_values"] = f32(pix)
        vm = model.vision_model
        ref["vision.embeddings"] = f32(vm.embeddings(pix))
        vout = vm(pixel_values=pix, output_hidden_states=True)
        vcfg = model.config.vision_config
        assert len(vout.hidden_states) == vcfg.num_hidden_layers + 1
        assert max_abs(vout.hidden_states[0], vm.pre_layrnorm(ref["vision.embeddings"])) == 0
        for i, hsi in enumerate(vout.hidden_states):
            ref[f"vision.hidden_states.{i}"] = f32(hsi)
        assert max_abs(vout.hidden_states[-1], vout.last_hidden_state) == 0
        ref["vision.last_hidden_state"] = f32(vout.last_hidden_state)
        ref["vision.pooled"] = f32(vout.pooler_output)
        ref["vision.embeds"] = f32(model.visual_projection(vout.pooler_output))

        full = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pix)
        assert max_abs(full.image_embeds, torch.nn.functional.normalize(ref["vision.embeds"], dim=-1)) < 1e-6
        ref["logits_per_image"] = f32(full.logits_per_image)
        ref["logits_per_text"] = f32(full.logits_per_text)

        ref["photo.pixel_values"] = f32(ip(images["photo.png"], return_tensors="pt").pixel_values)

    for k, v in ref.items():
        assert torch.isfinite(v.double()).all(), k
    save_file(ref, REF_DIR / "clip.safetensors", metadata={"format": "pt"})
    log(f"clip logits_per_image: {ref['logits_per_image'].tolist()}")

    meta = {
        "texts": CLIP_TEXTS,
        "tokenized": [tok.convert_ids_to_tokens(r[: int(m.sum())]) for r, m in zip(input_ids.tolist(), attention_mask)],
        "text_images": ["square.png", "wide.png"],
        "photo_image": "photo.png",
        "image_processor_class": type(ip).__name__,
        "image_processor_type_in_json": json.loads((CLIP_DIR / "preprocessor_config.json").read_text())["image_processor_type"],
        "tokenizer_class": type(tok).__name__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokenizers_version": tokenizers.__version__,
        "pillow_version": PIL.__version__,
        "attn_implementation": ATTN,
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "eos_convention": (
            "config.text_config.eos_token_id == tokenizer eos id (%d) != 2, so transformers pools the hidden state at "
            "the FIRST position where input_ids == eos_token_id (pad == eos, so this is the real end of text). If a "
            "config says eos_token_id == 2 (legacy, e.g. openai/clip-vit-base-patch32) transformers pools at "
            "argmax(input_ids) instead; `text.pooled_legacy_eos2` is that legacy result on the same inputs (special "
            "tokens sit at ids %d/%d, below the word tokens, so the two conventions pick different positions here)."
            % (tok.eos_token_id, tok.bos_token_id, tok.eos_token_id)
        ),
        "logit_scale": 2.3,
        "notes": [
            "text.hidden_states.0 is the embeddings output (token + position); text.hidden_states.i (i>=1) is the "
            "output of encoder layer i-1 (before final_layer_norm); text.last_hidden_state is after final_layer_norm.",
            "vision.embeddings is before pre_layrnorm; vision.hidden_states.0 = pre_layrnorm(vision.embeddings); "
            "vision.hidden_states.i (i>=1) is the output of encoder layer i-1; vision.last_hidden_state == "
            "vision.hidden_states.3 (no post_layernorm); vision.pooled = post_layernorm(last_hidden_state[:, 0]).",
            "text.embeds / vision.embeds are the projections, NOT normalised. logits_per_image = exp(logit_scale) * "
            "normalize(image_embeds) @ normalize(text_embeds).T.",
            "Text rows are right-padded with <|endoftext|>; the text model uses a causal mask plus the padding mask. "
            "Hidden states at padded positions (attention_mask == 0) depend on how padding is masked; positions with "
            "attention_mask == 1 do not.",
            "The image processor is the PIL backend (torchvision is not installed); preprocessor_config.json says "
            "'CLIPImageProcessor' because transformers strips the 'Pil' suffix when saving.",
        ],
        "init": stats,
    }
    write_json(REF_DIR / "clip.json", meta)


# --------------------------------------------------------------------------------------------------
# 3/4. LLaVA
# --------------------------------------------------------------------------------------------------


def build_llama_tokenizer() -> LlamaTokenizer:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False, min_frequency=2)
    # no newline in the corpus: "\n" (from the chat template) must go through byte fallback (<0x0A>), as in Llama
    raw.train_from_iterator(CORPUS, trainer)
    model = json.loads(raw.to_str())["model"]
    vocab = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    assert vocab["<unk>"] == 0 and vocab["<s>"] == 1 and vocab["</s>"] == 2 and vocab["<0x0A>"] == 3 + 10
    tok = LlamaTokenizer(
        vocab=vocab, merges=merges, model_max_length=256, padding_side="right", add_bos_token=True, add_eos_token=False
    )
    # like llava-hf: <image> then <pad> appended after the base vocabulary
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def make_llava_processor(tok) -> LlavaProcessor:
    ip = LlavaImageProcessorPil(
        do_pad=True,
        size={"shortest_edge": 30},
        crop_size={"height": 30, "width": 30},
        resample=3,
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=6,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token="<image>",
    )


def v5_to_hub_key(k: str) -> str:
    """transformers-5 on-disk key -> llava-hf hub key (the only difference is `vision_model.`)."""
    if k.startswith("vision_tower."):
        return "vision_tower.vision_model." + k[len("vision_tower."):]
    assert k.startswith(("language_model.model.", "language_model.lm_head.", "multi_modal_projector.")), k
    return k


def module_to_hub_key(k: str) -> str:
    """transformers-5 in-memory module name -> llava-hf hub key."""
    for a, b in [
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ]:
        if k.startswith(a):
            return b + k[len(a):]
    raise KeyError(k)


def write_hub_weights(model, out_dir: Path) -> dict:
    sd = model.state_dict()
    # llava-hf (4.x) module order: vision_tower, multi_modal_projector, language_model
    order = sorted(
        sd.keys(),
        key=lambda k: (
            0 if k.startswith("model.vision_tower.") else 1 if k.startswith("model.multi_modal_projector.") else 2,
        ),
    )
    tensors = [(module_to_hub_key(k), sd[k].detach().to(torch.float32).contiguous().clone()) for k in order]
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    # transformers-style greedy sharding with max_shard_size = total/2 -> exactly two shards
    limit = total // 2
    shards, cur, cur_size = [], {}, 0
    for name, t in tensors:
        size = t.numel() * t.element_size()
        if cur and cur_size + size > limit and len(shards) == 0:
            shards.append(cur)
            cur, cur_size = {}, 0
        cur[name] = t
        cur_size += size
    shards.append(cur)
    assert len(shards) == 2, len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / fname, metadata={"format": "pt"})
        for name in shard:
            weight_map[name] = fname
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return {"total_size": total, "shards": {f"model-{i + 1:05d}-of-00002.safetensors": sorted(s) for i, s in enumerate(shards)}}


def hub_config(config: LlavaConfig) -> dict:
    tc, vc = config.text_config, config.vision_config
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": config.image_token_index,
        "model_type": "llava",
        "pad_token_id": config.pad_token_id,
        "text_config": {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": tc.hidden_size,
            "intermediate_size": tc.intermediate_size,
            "max_position_embeddings": tc.max_position_embeddings,
            "model_type": "llama",
            "num_attention_heads": tc.num_attention_heads,
            "num_hidden_layers": tc.num_hidden_layers,
            "num_key_value_heads": tc.num_key_value_heads,
            "rms_norm_eps": tc.rms_norm_eps,
            "rope_theta": tc.rope_parameters["rope_theta"],
            "torch_dtype": "float32",
            "vocab_size": tc.vocab_size,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "vision_config": {
            "hidden_size": vc.hidden_size,
            "image_size": vc.image_size,
            "intermediate_size": vc.intermediate_size,
            "model_type": "clip_vision_model",
            "num_attention_heads": vc.num_attention_heads,
            "num_hidden_layers": vc.num_hidden_layers,
            "patch_size": vc.patch_size,
            "projection_dim": vc.projection_dim,
        },
        "vocab_size": tc.vocab_size,
    }


def render(processor, question: str, with_image: bool) -> str:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def check_raw_tokenizer(raw: tokenizers.Tokenizer, text: str, ids: list[int]) -> None:
    got = raw.encode(text).ids
    assert got == ids, (text, got, ids)


def greedy_by_hand(model, inputs: dict, steps: int) -> torch.Tensor:
    """Plain argmax decoding with full recomputation (no cache), mask-aware position ids like generate()."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    new = []
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=inputs.get("pixel_values"))
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        new.append(nxt)
        ids = torch.cat([ids, nxt], dim=-1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=-1)
    return torch.cat(new, dim=-1)


def llava_reference(images: dict[str, Image.Image]) -> None:
    reset_dir(HUB_DIR)
    reset_dir(V5_DIR)

    tok = build_llama_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    pad_id = tok.pad_token_id
    vocab_size = len(tok)
    assert (image_id, pad_id) == (vocab_size - 2, vocab_size - 1)
    log(f"llama tokenizer: {vocab_size} tokens, <image>={image_id} <pad>={pad_id}")
    processor = make_llava_processor(tok)

    vision_config = CLIPVisionConfig(
        image_size=30,
        patch_size=6,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        projection_dim=24,
    )
    text_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_id,
        pad_token_id=pad_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        image_seq_length=25,
    )
    torch.manual_seed(SEED + 2)
    model = LlavaForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(SEED + 3)
    stats = randomize_(
        model,
        gen,
        emb_std={
            "embed_tokens.weight": 1.0,
            "vision_tower.embeddings.position_embedding.weight": 0.5,
            "class_embedding": 0.5,
        },
    )
    log(f"llava init: {stats}")
    model.set_attn_implementation(ATTN)
    model.eval()

    # ---- llava-tiny-v5: exactly what transformers writes ----
    model.save_pretrained(V5_DIR)
    processor.save_pretrained(V5_DIR)

    # ---- llava-tiny-hub: llava-hf/llava-1.5-7b-hf layout ----
    shard_info = write_hub_weights(model, HUB_DIR)
    write_json(HUB_DIR / "config.json", hub_config(config))
    write_json(
        HUB_DIR / "generation_config.json",
        {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": pad_id},
    )
    tok.save_pretrained(HUB_DIR)
    processor.image_processor.save_pretrained(HUB_DIR)
    write_json(HUB_DIR / "chat_template.json", {"chat_template": LLAVA_CHAT_TEMPLATE})
    write_json(
        HUB_DIR / "processor_config.json",
        {
            "image_token": "<image>",
            "num_additional_image_tokens": 1,
            "patch_size": 6,
            "processor_class": "LlavaProcessor",
            "vision_feature_select_strategy": "default",
        },
    )

    # ---- reload the hub layout and check it is the same model ----
    hub_model, info = LlavaForConditionalGeneration.from_pretrained(
        HUB_DIR, attn_implementation=ATTN, output_loading_info=True
    )
    hub_model.eval()
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(k), (k, info.get(k))
    ref_sd, hub_sd = model.state_dict(), hub_model.state_dict()
    assert set(ref_sd) == set(hub_sd)
    for k in ref_sd:
        assert torch.equal(ref_sd[k], hub_sd[k]), k
    hc = hub_model.config
    assert hc.vision_feature_layer == -2 and hc.vision_feature_select_strategy == "default"
    assert hc.projector_hidden_act == "gelu" and hc.image_token_index == image_id
    assert hc.text_config.rope_parameters["rope_theta"] == 50000.0, hc.text_config.rope_parameters
    assert hc.text_config.rms_norm_eps == 1e-5 and hc.text_config.num_key_value_heads == 2
    assert hc.vision_config.hidden_act == "quick_gelu" and hc.vision_config.layer_norm_eps == 1e-5
    assert hub_model.dtype == torch.float32

    hub_proc = AutoProcessor.from_pretrained(HUB_DIR, backend="pil")
    assert type(hub_proc).__name__ == "LlavaProcessor"
    assert type(hub_proc.image_processor).__name__ == "LlavaImageProcessorPil", type(hub_proc.image_processor)
    assert hub_proc.chat_template == LLAVA_CHAT_TEMPLATE
    assert hub_proc.image_processor.do_pad is True
    raw = tokenizers.Tokenizer.from_file(str(HUB_DIR / "tokenizer.json"))

    mem_model = model
    model = hub_model  # all references come from the model loaded back from llava-tiny-hub/
    ref = {}
    meta_prompts = {}
    hub_proc.tokenizer.padding_side = "right"

    with torch.no_grad():
        # ---------------- single image prompt ----------------
        prompt = render(hub_proc, LLAVA_Q_IMAGE, with_image=True)
        assert prompt == f"USER: <image>\n{LLAVA_Q_IMAGE} ASSISTANT:", repr(prompt)
        inputs = hub_proc(images=images["wide.png"], text=prompt, return_tensors="pt")
        ids = inputs["input_ids"]
        assert int((ids == image_id).sum()) == 25
        assert ids[0, 0].item() == tok.bos_token_id
        check_raw_tokenizer(raw, prompt.replace("<image>", "<image>" * 25), ids[0].tolist())
        ref["image.input_ids"] = i64(ids)
        ref["image.attention_mask"] = i64(inputs["attention_mask"])
        ref["image.pixel_values"] = f32(inputs["pixel_values"])
        vout = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        assert len(vout.hidden_states) == model.config.vision_config.num_hidden_layers + 1
        for i, h in enumerate(vout.hidden_states):
            ref[f"image.vision_hidden_states.{i}"] = f32(h)
        feats = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        assert tuple(feats.shape) == (1, 25, 64), feats.shape
        manual = model.model.multi_modal_projector(vout.hidden_states[-2][:, 1:])
        assert max_abs(manual, feats) == 0
        ref["image.image_features"] = f32(feats)

        captured, hooks = {}, []
        lm = model.model.language_model
        hooks.append(lm.register_forward_pre_hook(lambda m, a, kw: captured.__setitem__("embeds", kw["inputs_embeds"]), with_kwargs=True))
        for i, layer in enumerate(lm.layers):
            hooks.append(layer.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, layer_output(o))))
        hooks.append(lm.norm.register_forward_hook(lambda m, a, o: captured.__setitem__("norm", o)))
        out = model(**inputs)
        for h in hooks:
            h.remove()
        emb = captured["embeds"]
        manual_emb = lm.embed_tokens(ids).clone()
        manual_emb[ids == image_id] = feats.reshape(-1, 64)
        assert max_abs(manual_emb, emb) == 0
        ref["image.inputs_embeds"] = f32(emb)
        for i in range(len(lm.layers)):
            ref[f"image.layer_outputs.{i}"] = f32(captured[i])
        ref["image.last_hidden_state"] = f32(captured["norm"])
        ref["image.logits"] = f32(out.logits)
        mem_vs_hub = max_abs(mem_model(**inputs).logits, out.logits)
        log(f"in-memory vs llava-tiny-hub logits max abs diff: {mem_vs_hub:.3e}")
        assert mem_vs_hub < 1e-6
        assert max_abs(model.lm_head(captured["norm"]), out.logits) == 0
        meta_prompts["image"] = {"question": LLAVA_Q_IMAGE, "image": "wide.png", "prompt": prompt}
        img_inputs = inputs

        # ---------------- text-only prompt ----------------
        prompt = render(hub_proc, LLAVA_Q_TEXT, with_image=False)
        assert prompt == f"USER: {LLAVA_Q_TEXT} ASSISTANT:", repr(prompt)
        inputs = hub_proc(text=prompt, return_tensors="pt")
        check_raw_tokenizer(raw, prompt, inputs["input_ids"][0].tolist())
        ref["text.input_ids"] = i64(inputs["input_ids"])
        ref["text.attention_mask"] = i64(inputs["attention_mask"])
        ref["text.logits"] = f32(model(**inputs).logits)
        meta_prompts["text"] = {"question": LLAVA_Q_TEXT, "image": None, "prompt": prompt}
        txt_inputs = inputs

        # ---------------- left-padded batch ----------------
        prompts = [render(hub_proc, q, with_image=True) for q in LLAVA_Q_BATCH]
        hub_proc.tokenizer.padding_side = "left"
        inputs = hub_proc(images=[images["square.png"], images["wide.png"]], text=prompts, padding=True, return_tensors="pt")
        hub_proc.tokenizer.padding_side = "right"
        mask = inputs["attention_mask"]
        assert mask[0, 0] == 0 and mask[1].all(), mask  # first row is left-padded
        assert (inputs["input_ids"][mask == 0] == pad_id).all()
        for r, p in enumerate(prompts):
            n = int(mask[r].sum())
            check_raw_tokenizer(raw, p.replace("<image>", "<image>" * 25), inputs["input_ids"][r, -n:].tolist())
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        ref["batch.input_ids"] = i64(inputs["input_ids"])
        ref["batch.attention_mask"] = i64(mask)
        ref["batch.position_ids"] = i64(pos)
        ref["batch.pixel_values"] = f32(inputs["pixel_values"])
        bout = model(**inputs, position_ids=pos)
        ref["batch.logits"] = f32(bout.logits)
        meta_prompts["batch"] = [
            {"question": q, "image": im, "prompt": p} for q, im, p in zip(LLAVA_Q_BATCH, ["square.png", "wide.png"], prompts)
        ]
        batch_inputs = inputs

        # consistency: the unpadded second row of the batch equals a single run of the same prompt
        single = hub_proc(images=images["wide.png"], text=prompts[1], return_tensors="pt")
        s_logits = model(**single).logits
        batch_vs_single = max_abs(s_logits[0], bout.logits[1, -s_logits.shape[1]:])
        n0 = int(mask[0].sum())
        single0 = hub_proc(images=images["square.png"], text=prompts[0], return_tensors="pt")
        s0_logits = model(**single0).logits
        batch_vs_single0 = max_abs(s0_logits[0], bout.logits[0, -n0:])
        log(f"batch vs single logits: row0 {batch_vs_single0:.2e}, row1 {batch_vs_single:.2e}")
        assert batch_vs_single < 1e-4 and batch_vs_single0 < 1e-4

        # ---------------- preprocessing ----------------
        ref["preprocess.photo"] = f32(hub_proc.image_processor(images["photo.png"], return_tensors="pt").pixel_values)
        ref["preprocess.square"] = f32(hub_proc.image_processor(images["square.png"], return_tensors="pt").pixel_values)

        # ---------------- greedy decoding ----------------
        gcfg = GenerationConfig(
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=pad_id,
        )
        decoded = {}
        for name, inp in (("image", img_inputs), ("text", txt_inputs), ("batch", batch_inputs)):
            g = model.generate(**inp, generation_config=gcfg, output_logits=True, return_dict_in_generate=True)
            new = g.sequences[:, inp["input_ids"].shape[1]:]
            assert new.shape[1] == NEW_TOKENS, new.shape
            by_hand = greedy_by_hand(model, dict(inp), NEW_TOKENS)
            assert torch.equal(new, by_hand), (name, new, by_hand)  # pure argmax: min_new_tokens never kicked in
            assert max_abs(g.logits[0], ref[f"{name}.logits"][:, -1]) < 1e-4
            for row in new.tolist():
                assert len(set(row)) >= 4, (name, row)
            ref[f"{name}.greedy_tokens"] = i64(new)
            decoded[name] = [hub_proc.tokenizer.decode(r, skip_special_tokens=False) for r in new.tolist()]
            log(f"greedy {name}: {new.tolist()} {decoded[name]!r}")

    # ---------------- llava-tiny-v5 loads to the same logits ----------------
    v5_model = LlavaForConditionalGeneration.from_pretrained(V5_DIR, attn_implementation=ATTN).eval()
    v5_proc = AutoProcessor.from_pretrained(V5_DIR, backend="pil")
    assert type(v5_proc.image_processor).__name__ == "LlavaImageProcessorPil", type(v5_proc.image_processor)
    with torch.no_grad():
        v5_inputs = v5_proc(images=images["wide.png"], text=meta_prompts["image"]["prompt"], return_tensors="pt")
        assert torch.equal(v5_inputs["input_ids"], ref["image.input_ids"])
        assert max_abs(v5_inputs["pixel_values"], ref["image.pixel_values"]) == 0
        v5_logits = v5_model(**v5_inputs).logits
        v5_text = v5_model(input_ids=ref["text.input_ids"], attention_mask=ref["text.attention_mask"]).logits
    d_img, d_txt = max_abs(v5_logits, ref["image.logits"]), max_abs(v5_text, ref["text.logits"])
    log(f"v5 vs hub logits max abs diff: image {d_img:.3e}, text {d_txt:.3e}")
    assert d_img < 1e-6 and d_txt < 1e-6

    for k, v in ref.items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k
    save_file(ref, REF_DIR / "llava.safetensors", metadata={"format": "pt"})

    with safe_open(V5_DIR / "model.safetensors", "pt") as f:
        v5_keys = sorted(f.keys())
    hub_keys = sorted(json.loads((HUB_DIR / "model.safetensors.index.json").read_text())["weight_map"])
    assert sorted(v5_to_hub_key(k) for k in v5_keys) == hub_keys

    meta = {
        "prompts": meta_prompts,
        "greedy_decoded": decoded,
        "images": ["square.png", "wide.png", "photo.png"],
        "preprocess": {"photo": "photo.png", "square": "square.png"},
        "processor_class": type(hub_proc).__name__,
        "image_processor_class": type(hub_proc.image_processor).__name__,
        "image_processor_type_in_json": json.loads((HUB_DIR / "preprocessor_config.json").read_text())["image_processor_type"],
        "tokenizer_class": type(hub_proc.tokenizer).__name__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokenizers_version": tokenizers.__version__,
        "pillow_version": PIL.__version__,
        "attn_implementation": ATTN,
        "vocab_size": vocab_size,
        "image_token_index": image_id,
        "pad_token_id": pad_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "unk_token_id": tok.unk_token_id,
        "num_image_tokens": 25,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vision_feature_layer_semantics": (
            "vision tower hidden_states has num_hidden_layers + 1 = 4 entries: [0] = pre_layrnorm(embeddings), "
            "[i] = output of CLIP encoder layer i-1. vision_feature_layer = -2 selects hidden_states[-2] = "
            "hidden_states[2] = output of encoder layer 1 (the second of three), i.e. the last encoder layer and "
            "post_layernorm are NOT used. 'default' strategy drops the CLS token (position 0) -> 25 patch tokens, "
            "then multi_modal_projector = linear_2(gelu(linear_1(x))) with exact (erf) GELU. "
            "image.vision_hidden_states.{i} are those hidden_states."
        ),
        "projector_hidden_act": "gelu (erf)",
        "key_mapping": {
            "v5_on_disk_to_hub": {
                "vision_tower.": "vision_tower.vision_model.",
                "multi_modal_projector.": "multi_modal_projector.",
                "language_model.model.": "language_model.model.",
                "language_model.lm_head.": "language_model.lm_head.",
            },
            "v5_in_memory_module_names_to_hub": {
                "model.vision_tower.": "vision_tower.vision_model.",
                "model.multi_modal_projector.": "multi_modal_projector.",
                "model.language_model.": "language_model.model.",
                "lm_head.": "language_model.lm_head.",
            },
        },
        "hub_shards": shard_info,
        "v5_vs_hub_logits_max_abs_diff": {"image": d_img, "text": d_txt},
        "in_memory_vs_hub_logits_max_abs_diff": mem_vs_hub,
        "chat_template_source": (
            "chat_template.json of llava-hf/llava-1.5-7b-hf (the '\\n' after <image> is a real newline character "
            "inside the Jinja string literal; the template uses {% generation %} for assistant turns)"
        ),
        "batch_vs_single_logits_max_abs_diff": [batch_vs_single0, batch_vs_single],
        "notes": [
            "All references are computed with the model and processor loaded back from llava-tiny-hub/.",
            "image.layer_outputs.i is the output of decoder layer i (forward hook, before the final RMSNorm); "
            "image.last_hidden_state is after the final RMSNorm; image.logits = lm_head(last_hidden_state).",
            "image.inputs_embeds = embed_tokens(input_ids) with the 25 rows at <image> positions replaced by "
            "image.image_features (in order).",
            "Single prompts use position_ids = arange(L). The left-padded batch uses position_ids = "
            "cumsum(attention_mask) - 1 with padded positions set to 0 (what generate() does); they are saved as "
            "batch.position_ids and batch.logits was computed with them. Logits at padded positions "
            "(attention_mask == 0) are not meaningful: compare only where attention_mask == 1.",
            "greedy_tokens are the 8 new tokens of generate(do_sample=False, max_new_tokens=8, min_new_tokens=8); "
            "the script asserts they equal plain argmax decoding (no EOS suppression was needed), so a Rust greedy "
            "loop without EOS stopping must reproduce them exactly.",
            "The prompt string is rendered by the chat template BEFORE <image> expansion; the processor then "
            "replaces each <image> by 25 <image> tokens and the tokenizer adds <s> (via its TemplateProcessing "
            "post-processor).",
            "Preprocessing (LlavaImageProcessorPil, do_pad=True): pad to square with the mean colour "
            "(int(255*mean) per channel = (122, 116, 104)), centred, then resize shortest edge to 30 (PIL bicubic), "
            "centre crop 30x30, rescale 1/255, normalise with the OpenAI CLIP mean/std.",
        ],
        "init": stats,
    }
    write_json(REF_DIR / "llava.json", meta)


# --------------------------------------------------------------------------------------------------
# 5. PEFT: a LoRA adapter saved by the real `peft`, and a check for adapters exported by bella-vqa
# --------------------------------------------------------------------------------------------------

# How PEFT users restrict LoRA to LLaVA's language model: a regex `target_modules` (PEFT matches a
# string with re.fullmatch against the in-memory module names, `model.language_model.layers.0.…`).
PEFT_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
PEFT_RANK = 4
PEFT_ALPHA = 8


def lora_factors(model) -> dict[str, torch.Tensor]:
    """Module name (in-memory, without PEFT's `base_model.model.` prefix) -> lora_A / lora_B weight."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            short = name.removeprefix("base_model.model.")
            out[f"{short}.lora_A"] = mod.lora_A["default"].weight
            out[f"{short}.lora_B"] = mod.lora_B["default"].weight
    return out


def peft_logits(model, ref: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(
            input_ids=ref["image.input_ids"],
            attention_mask=ref["image.attention_mask"],
            pixel_values=ref["image.pixel_values"],
        ).logits


def load_llava_ref() -> dict[str, torch.Tensor]:
    with safe_open(REF_DIR / "llava.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def peft_reference() -> None:
    """tests/fixtures/peft/llava-lora/ (adapter_config.json + adapter_model.safetensors, as
    `save_pretrained` writes them) and reference/peft.safetensors (logits of the wrapped model)."""
    import peft
    from peft import LoraConfig, PeftModel, get_peft_model

    reset_dir(PEFT_DIR)
    ref = load_llava_ref()
    base = LlavaForConditionalGeneration.from_pretrained(HUB_DIR, attn_implementation=ATTN).eval()
    base_logits = peft_logits(base, ref)
    assert max_abs(base_logits, ref["image.logits"]) == 0

    config = LoraConfig(
        r=PEFT_RANK,
        lora_alpha=PEFT_ALPHA,
        target_modules=PEFT_TARGETS,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    # a trained adapter: both factors non-zero (PEFT's own init has B = 0), seeded, A like kaiming-uniform
    gen = torch.Generator().manual_seed(SEED + 4)
    factors = lora_factors(model)
    with torch.no_grad():
        for name in sorted(factors):
            w = factors[name]
            if name.endswith(".lora_A"):
                bound = 1.0 / math.sqrt(w.shape[1])
                w.copy_((torch.rand(tuple(w.shape), generator=gen) * 2 - 1) * bound)
            else:
                w.copy_(0.1 * torch.randn(tuple(w.shape), generator=gen))
    model.eval()
    targeted = sorted(n.removesuffix(".lora_A") for n in factors if n.endswith(".lora_A"))
    assert targeted == sorted(
        f"model.language_model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    ), targeted
    logits = peft_logits(model, ref)

    # the path as the Rust tests see it (relative to the repository), not this machine's
    model.peft_config["default"].base_model_name_or_path = HUB_DIR.relative_to(ROOT).as_posix()
    model.save_pretrained(PEFT_LORA_DIR)
    (PEFT_LORA_DIR / "README.md").unlink()  # the generated model card: not needed, not deterministic enough
    assert sorted(p.name for p in PEFT_LORA_DIR.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    # ---- load it back the way users do and check the numbers ----
    fresh = LlavaForConditionalGeneration.from_pretrained(HUB_DIR, attn_implementation=ATTN).eval()
    loaded = PeftModel.from_pretrained(fresh, PEFT_LORA_DIR).eval()
    assert max_abs(peft_logits(loaded, ref), logits) == 0
    # ΔW = (lora_alpha / r) · B · A on each target, nothing else
    manual = LlavaForConditionalGeneration.from_pretrained(HUB_DIR, attn_implementation=ATTN).eval()
    scaling = PEFT_ALPHA / PEFT_RANK
    with torch.no_grad():
        mods = dict(manual.named_modules())
        for name in targeted:
            mods[name].weight += scaling * factors[f"{name}.lora_B"] @ factors[f"{name}.lora_A"]
    merged_diff = max_abs(peft_logits(manual, ref), logits)
    base_diff = max_abs(base_logits, logits)
    log(f"peft: merged-by-hand vs PEFT logits {merged_diff:.2e}; PEFT vs base logits {base_diff:.3f}")
    assert merged_diff < 1e-4 and base_diff > 0.5

    with safe_open(PEFT_LORA_DIR / "adapter_model.safetensors", "pt") as f:
        file_meta = f.metadata()
        keys = {k: (list(f.get_tensor(k).shape), str(f.get_tensor(k).dtype)) for k in sorted(f.keys())}
    save_file({"image.logits": f32(logits)}, REF_DIR / "peft.safetensors", metadata={"format": "pt"})
    write_json(
        REF_DIR / "peft.json",
        {
            "peft_version": peft.__version__,
            "transformers_version": transformers.__version__,
            "adapter": PEFT_LORA_DIR.relative_to(ROOT).as_posix(),
            "base_model": HUB_DIR.relative_to(ROOT).as_posix(),
            "lora_config": {"r": PEFT_RANK, "lora_alpha": PEFT_ALPHA, "target_modules": PEFT_TARGETS, "task_type": "CAUSAL_LM"},
            "targeted_modules_in_memory": targeted,
            "safetensors_metadata": file_meta,
            "safetensors_keys": keys,
            "logits_max_abs_diff": {"merged_by_hand_vs_peft": merged_diff, "peft_vs_base": base_diff},
            "notes": [
                "image.logits: the PEFT-wrapped llava-tiny-hub (PeftModel.from_pretrained) on image.input_ids, "
                "image.attention_mask and image.pixel_values of reference/llava.safetensors.",
                "Keys are `base_model.model.` + the transformers-5 in-memory module name + `.lora_A.weight` "
                "([r, in]) / `.lora_B.weight` ([out, r]); the adapter name `default` is dropped on save.",
                "The factors are seeded random (A ~ U(-1/sqrt(in), 1/sqrt(in)), B ~ N(0, 0.1^2)), not trained.",
                "adapter_config.json: base_model_name_or_path rewritten to the repository-relative path; "
                "README.md (the generated model card) removed.",
            ],
        },
    )


def check_peft_exports(dirs: list[str]) -> None:
    """Loads every adapter directory written by `bella-vqa export-peft` with PEFT onto llava-tiny-hub:
    every tensor of the file must land in the model (no missing, no unexpected key), and the logits are
    compared with reference/peft.safetensors (equal when the directory holds the fixture's factors)."""
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file

    ref = load_llava_ref()
    with safe_open(REF_DIR / "peft.safetensors", "pt") as f:
        expected = f.get_tensor("image.logits")
    for d in dirs:
        cfg = PeftConfig.from_pretrained(d)
        base = LlavaForConditionalGeneration.from_pretrained(HUB_DIR, attn_implementation=ATTN).eval()
        model = PeftModel.from_pretrained(base, d).eval()
        factors = lora_factors(model)
        saved = load_file(str(Path(d) / "adapter_model.safetensors"))
        assert len(saved) == len(factors), (sorted(saved), sorted(factors))
        for key, t in saved.items():
            name = key.removeprefix("base_model.model.").removesuffix(".weight")
            assert torch.equal(factors[name], t), key
        logits = peft_logits(model, ref)
        diff = max_abs(logits, expected)
        log(
            f"{d}: {type(cfg).__name__} r={cfg.r} lora_alpha={cfg.lora_alpha} task_type={cfg.task_type}, "
            f"{len(saved)} tensors all loaded; logits vs reference/peft.safetensors max abs diff {diff:.3e}"
        )


def main() -> None:
    log(f"transformers {transformers.__version__}, torch {torch.__version__}, tokenizers {tokenizers.__version__}")
    FIX.mkdir(parents=True, exist_ok=True)
    # Only this script's references: demo.{safetensors,json} in the same folder come from
    # scripts/demo/check_parity.py and are kept.
    REF_DIR.mkdir(parents=True, exist_ok=True)
    for stem in ("clip", "llava", "peft"):
        for ext in (".safetensors", ".json"):
            (REF_DIR / f"{stem}{ext}").unlink(missing_ok=True)
    images = make_images()
    clip_reference(images)
    llava_reference(images)
    peft_reference()
    mine = [p for p in FIX.rglob("*") if p.is_file() and not p.name.startswith("demo.")]
    total = sum(p.stat().st_size for p in mine)
    log(f"done: {total / 1024:.1f} KiB under {FIX.relative_to(ROOT)} (without the demo reference)")
    assert total < 3 * 1024 * 1024


if __name__ == "__main__":
    if sys.argv[1:2] == ["--check-peft-export"]:
        sys.exit(check_peft_exports(sys.argv[2:]))
    sys.exit(main())
