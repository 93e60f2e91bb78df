#!/usr/bin/env python3
"""Train the embedded demo BASE models of bella-vqa from scratch on the shapes world.

    ~/.cache/bella-fixtures-venv/bin/python scripts/demo/train_base.py --device cuda

(the recipe of the shipped models; see scripts/demo/README.md) does everything, in this order (each stage can be re-run alone, see --help):

  1. data        the shapes world with the Rust generator (`bella-vqa data shapes`, fixed seed)
                 into --data (default ~/.cache/bella-vqa/demo-data; regenerated when missing)
  2. tokenizers  a LLaMA-style BPE with byte fallback (LLaVA) and a CLIP-style byte-level BPE
                 (CLIP), both learnt on the shapes questions/answers plus the 5000 most frequent
                 English words (wordfreq), so any English text encodes
  3. llava       a tiny LlavaForConditionalGeneration (CLIP vision tower + 2-layer GELU projector +
                 LLaMA decoder), trained with the objective of `bella-vqa train`
                 (src/train/objective.rs): the llava-1.5 prompt `USER: <image>\\n{q} ASSISTANT:`,
                 then the answer (`multiple_choice_answer`) and `</s>`, loss on the answer only
  4. clip        a tiny CLIPModel trained as a classifier over the answer vocabulary: the logits
                 of one question are the CLIP scores of the texts `question: {q} answer: {a}`
                 (src/answer/candidates.rs::clip_prompt) for every answer a
  5. save        demo/llava and demo/clip in the Hugging Face layout the Rust crate reads
                 (llava-hf hub key names, one model.safetensors, sparse config, tokenizer,
                 chat template, image processor), reloaded with transformers and re-evaluated
  6. eval        VQA accuracy (official rule) on test.jsonl per question family, greedy answers;
                 written to demo/llava/training.json and demo/clip/training.json

Seeded and run with torch.use_deterministic_algorithms (eager attention on CUDA), so a rerun on the
same kind of device with the pinned environment (scripts/demo/requirements.txt) should give the same
weights; CPU and CUDA runs differ. On a CPU it works but takes hours.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (with --device cuda)

import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import make_fixtures as mf  # noqa: E402  (helpers: chat template, hub key names, CLIP BPE learner)
from transformers import (  # noqa: E402
    AutoProcessor,
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
    CLIPVisionConfig,
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

torch.use_deterministic_algorithms(True, warn_only=True)

DEMO = ROOT / "demo"
LLAVA_DIR = DEMO / "llava"
CLIP_DIR = DEMO / "clip"
DEVICE = torch.device("cpu")
ATTN_TRAIN = "sdpa"
IMAGE_SIZE = 32
LLAMA_VOCAB = 1500  # BPE vocabulary incl. <unk>, <s>, </s> and the 256 byte tokens; + <image>, <pad>
CLIP_MERGES = 1000
ENGLISH_WORDS = 5000
FAMILIES = ["color", "shape", "count", "exists", "position"]


def log(msg: str) -> None:
    print(f"[train_base {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# 1. data
# ------------------------------------------------------------------------------------------------


def generate_data(data: Path, seed: int, n: int) -> None:
    meta = data / "shapes.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        if m.get("seed") == seed and m.get("n") == n and m.get("image_size") == IMAGE_SIZE:
            log(f"data: reusing {data} (seed {seed}, n {n})")
            return
    if data.exists():
        shutil.rmtree(data)
    log(f"data: generating the shapes world into {data} (seed {seed}, n {n}) with the Rust CLI")
    cmd = ["cargo", "run", "--quiet", "--", "data", "shapes", "--quiet", "--out", str(data),
           "--seed", str(seed), "--n", str(n), "--image-size", str(IMAGE_SIZE)]
    subprocess.run(cmd, cwd=ROOT, check=True)


def read_split(data: Path, name: str) -> list[dict]:
    with open(data / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


class Images:
    """uint8 [3, H, W] arrays of the split's PNGs, loaded once."""

    def __init__(self, data: Path):
        self.data = data
        self.cache: dict[str, np.ndarray] = {}

    def get(self, rel: str) -> np.ndarray:
        a = self.cache.get(rel)
        if a is None:
            with Image.open(self.data / rel) as im:
                a = np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).copy()
            assert a.shape == (3, IMAGE_SIZE, IMAGE_SIZE), (rel, a.shape)
            self.cache[rel] = a
        return a

    def batch(self, rels: list[str]) -> torch.Tensor:
        """CLIP preprocessing of square IMAGE_SIZE images (no resize/crop needed): rescale, normalise."""
        x = torch.from_numpy(np.stack([self.get(r) for r in rels])).to(torch.float64) * (1 / 255)
        mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1)
        return ((x - mean) / std).to(torch.float32)


# ------------------------------------------------------------------------------------------------
# official VQA accuracy (vqaEval.py rule; same as src/metrics.rs NormalizeMode::Official)
# ------------------------------------------------------------------------------------------------

_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punct(s: str) -> str:
    out = s
    for p in _PUNCT:
        if (p + " " in s or " " + p in s) or (re.search(_COMMA_STRIP, s) is not None):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)


def _digit_article(s: str) -> str:
    words = []
    for w in s.lower().split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(w)
    return " ".join(words)


def vqa_accuracy(answer: str, humans: list[str]) -> float:
    n = len(humans)
    if n == 0:
        return 0.0
    clean = lambda s: " ".join(s.replace("\n", " ").replace("\t", " ").strip().split())  # noqa: E731
    hs = [clean(h) for h in humans]
    a = clean(answer)
    if any(h != hs[0] for h in hs):
        norm = lambda s: _digit_article(_punct(s))  # noqa: E731
        a = norm(a)
        hs = [norm(h) for h in hs]
    matches = sum(h == a for h in hs)
    if n == 1:
        return float(matches == 1)
    quota = min(3, n - 1)
    return sum(min((matches - (h == a)) / quota, 1.0) for h in hs) / n


def summarize(records: list[dict], answers: list[str]) -> dict:
    per = collections.defaultdict(list)
    for r, a in zip(records, answers):
        acc = vqa_accuracy(a, r["answers"])
        per["all"].append(acc)
        per[r.get("family", "?")].append(acc)
    return {k: {"accuracy": float(np.mean(v)), "n": len(v)} for k, v in sorted(per.items())}


def fmt_summary(s: dict) -> str:
    keys = ["all"] + [f for f in FAMILIES if f in s]
    return "  ".join(f"{k} {100 * s[k]['accuracy']:.2f}% (n={s[k]['n']})" for k in keys)


# ------------------------------------------------------------------------------------------------
# 2. tokenizers
# ------------------------------------------------------------------------------------------------


def corpus_texts(data: Path) -> tuple[collections.Counter, list[tuple[str, int]]]:
    """Shapes texts (questions, answers, the chat template's words) with counts, and English words
    with counts from their frequency (wordfreq)."""
    import wordfreq

    shapes = collections.Counter()
    for split in ["train", "val", "ood-unseen-pairs", "ood-absent", "ood-unanswerable"]:
        for r in read_split(data, split):
            shapes[r["question"]] += 1
            for a in r["answers"]:
                shapes[a] += 1
    shapes["USER: ASSISTANT:"] += 1000
    shapes["question: answer:"] += 1000
    english = []
    for w in wordfreq.top_n_list("en", ENGLISH_WORDS):
        c = max(1, round(wordfreq.word_frequency(w, "en") * 2e5))
        english.append((w, c))
    # capitalised forms of the most frequent words (sentence starts)
    for w, c in english[:300]:
        if w.isalpha():
            english.append((w.capitalize(), max(1, c // 10)))
    return shapes, english


def build_llama_tokenizer(data: Path) -> LlamaTokenizer:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    shapes, english = corpus_texts(data)

    def lines():
        for text, c in sorted(shapes.items()):
            for _ in range(c):
                yield text
        for w, c in english:
            for _ in range(c):
                yield w

    raw = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=LLAMA_VOCAB, special_tokens=specials, show_progress=False, min_frequency=2)
    raw.train_from_iterator(lines(), trainer)
    model = json.loads(raw.to_str())["model"]
    vocab = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    assert vocab["<unk>"] == 0 and vocab["<s>"] == 1 and vocab["</s>"] == 2 and vocab["<0x0A>"] == 13
    tok = LlamaTokenizer(vocab=vocab, merges=merges, model_max_length=256, padding_side="right",
                         add_bos_token=True, add_eos_token=False)
    # like llava-hf: <image> then <pad> appended after the base vocabulary
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def build_clip_tokenizer(data: Path) -> CLIPTokenizer:
    shapes, english = corpus_texts(data)
    b2u = mf.bytes_to_unicode()
    words = collections.Counter()

    def add(text: str, count: int) -> None:
        text = re.sub(r"\s+", " ", text).strip().lower()
        for w in mf.CLIP_PRE_PAT.findall(text):
            wb = "".join(b2u[x] for x in w.encode("utf-8"))
            words[tuple(wb[:-1]) + (wb[-1] + "</w>",)] += count

    for text, c in shapes.items():
        add(text, c)
    for w, c in english:
        add(w, c)
    merges = mf.learn_bpe(words, CLIP_MERGES)
    base = list(b2u.values())
    tokens = base + [t + "</w>" for t in base] + ["<|startoftext|>", "<|endoftext|>"]
    seen = set(tokens)
    for a, b in merges:
        t = a + b
        if t not in seen:
            tokens.append(t)
            seen.add(t)
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=32)


def tokenizers_stage(data: Path, tokdir: Path):
    """Builds both tokenizers into tokdir/{llama,clip} (once; needs wordfreq) and loads them back."""
    if not (tokdir / "llama" / "tokenizer.json").exists() or not (tokdir / "clip" / "tokenizer.json").exists():
        log(f"tokenizers: learning the BPEs into {tokdir}")
        build_llama_tokenizer(data).save_pretrained(tokdir / "llama")
        build_clip_tokenizer(data).save_pretrained(tokdir / "clip")
    else:
        log(f"tokenizers: reusing {tokdir}")
    tok = AutoTokenizer.from_pretrained(tokdir / "llama")
    ctok = AutoTokenizer.from_pretrained(tokdir / "clip")
    assert tok.convert_tokens_to_ids("<image>") == len(tok) - 2 and tok.pad_token_id == len(tok) - 1
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert ctok.pad_token_id == ctok.eos_token_id
    return tok, ctok


# ------------------------------------------------------------------------------------------------
# 3. LLaVA
# ------------------------------------------------------------------------------------------------


def llava_configs(tok, args) -> LlavaConfig:
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=args.patch,
        hidden_size=args.vision_hidden,
        intermediate_size=4 * args.vision_hidden,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=4,
        projection_dim=args.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.text_hidden,
        intermediate_size=args.text_intermediate,
        num_hidden_layers=args.text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        image_seq_length=(IMAGE_SIZE // args.patch) ** 2,
    )


def make_llava_processor(tok, patch: int) -> LlavaProcessor:
    ip = LlavaImageProcessorPil(
        do_pad=True,
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
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
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=mf.LLAVA_CHAT_TEMPLATE, image_token="<image>")


class LlavaEncoder:
    """Token ids exactly as src/train/objective.rs::encode_example builds them (raw tokenizer.json)."""

    def __init__(self, raw: tokenizers.Tokenizer, n_image: int, eos: int):
        self.raw, self.n_image, self.eos = raw, n_image, eos
        self.cache: dict[tuple[str, str | None], tuple[list[int], int]] = {}

    def prompt(self, question: str) -> str:
        return f"USER: <image>\n{question} ASSISTANT:"

    def encode(self, text: str) -> list[int]:
        return self.raw.encode(text.replace("<image>", "<image>" * self.n_image), add_special_tokens=True).ids

    def example(self, question: str, answer: str | None) -> tuple[list[int], int]:
        key = (question, answer)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        prompt = self.prompt(question)
        pids = self.encode(prompt)
        if answer is None:
            out = (pids, len(pids))
        else:
            full = self.encode(f"{prompt} {answer.strip()}")
            if full[: len(pids)] == pids:
                aids = full[len(pids):]
            else:
                aids = self.raw.encode(f" {answer.strip()}", add_special_tokens=False).ids
            assert aids, answer
            out = (pids + aids + [self.eos], len(pids))
        self.cache[key] = out
        return out


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def llava_loss(model, ids: torch.Tensor, pix: torch.Tensor, sel_rows, sel_pos, targets) -> torch.Tensor:
    out = model.model(input_ids=ids, pixel_values=pix, use_cache=False)
    h = out.last_hidden_state[sel_rows, sel_pos]
    logits = model.lm_head(h)
    return F.cross_entropy(logits, targets)


def collate_llava(batch, enc: LlavaEncoder, images: Images, pad_id: int):
    seqs = [enc.example(r["question"], r["multiple_choice_answer"]) for r in batch]
    L = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    rows, pos, tgt = [], [], []
    for i, (s, plen) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        for t in range(plen, len(s)):
            rows.append(i)
            pos.append(t - 1)
            tgt.append(s[t])
    pix = images.batch([r["image"] for r in batch])
    d = DEVICE
    return ids.to(d), pix.to(d), torch.tensor(rows).to(d), torch.tensor(pos).to(d), torch.tensor(tgt).to(d)


@torch.no_grad()
def llava_answers(model, records, enc: LlavaEncoder, images: Images, raw, pad_id: int, eos: int,
                  batch_size: int = 256, max_new: int = 6) -> list[str]:
    """Greedy answers (argmax loop with full recomputation, left padding, mask-aware positions)."""
    model.eval()
    out = []
    for b0 in range(0, len(records), batch_size):
        batch = records[b0: b0 + batch_size]
        seqs = [enc.example(r["question"], None)[0] for r in batch]
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, L - len(s):] = torch.tensor(s)
            mask[i, L - len(s):] = 1
        pix = images.batch([r["image"] for r in batch]).to(DEVICE)
        ids, mask = ids.to(DEVICE), mask.to(DEVICE)
        done = torch.zeros(len(seqs), dtype=torch.bool, device=DEVICE)
        new = []
        for _ in range(max_new):
            pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=pix,
                           use_cache=False, logits_to_keep=1).logits[:, -1]
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            new.append(nxt)
            done |= nxt == eos
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(nxt[:, None])], 1)
            if done.all():
                break
        toks = torch.stack(new, 1).tolist()
        for t in toks:
            if eos in t:
                t = t[: t.index(eos)]
            out.append(raw.decode(t, skip_special_tokens=True).strip())
    return out


def train_llava(args, tok, data: Path, images: Images):
    seed_all(args.seed + 1)
    config = llava_configs(tok, args)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(ATTN_TRAIN)
    model.to(DEVICE)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"llava: {n_params:,} parameters; vision {args.vision_layers}x{args.vision_hidden} patch {args.patch}, "
        f"decoder {args.text_layers}x{args.text_hidden} (ffn {args.text_intermediate}), vocab {len(tok)}")
    raw = tokenizers.Tokenizer.from_str(tok.backend_tokenizer.to_str())
    n_image = (IMAGE_SIZE // args.patch) ** 2
    enc = LlavaEncoder(raw, n_image, tok.eos_token_id)
    train = read_split(data, "train")
    val = read_split(data, "val")[: args.eval_n]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n and "embed_tokens" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    rng = random.Random(args.seed + 2)
    order: list[int] = []
    history = []
    t0 = time.time()
    model.train()
    ema = None
    stopped = None
    for step in range(args.llava_steps):
        if step == args.llava_stop_step or (args.max_seconds and time.time() - t0 > args.max_seconds):
            stopped = step
            why = "--llava-stop-step" if step == args.llava_stop_step else f"time budget of {args.max_seconds}s"
            log(f"llava: stopping at step {step} ({why})")
            break
        if len(order) < args.batch:
            perm = list(range(len(train)))
            rng.shuffle(perm)
            order.extend(perm)
        idx, order = order[: args.batch], order[args.batch:]
        ids, pix, rows, pos, tgt = collate_llava([train[i] for i in idx], enc, images, tok.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.llava_steps, args.lr, args.warmup)
        loss = llava_loss(model, ids, pix, rows, pos, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if (step + 1) % 50 == 0:
            log(f"llava step {step + 1}/{args.llava_steps} loss {ema:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{time.time() - t0:.0f}s")
        if (step + 1) % args.eval_every == 0:
            answers = llava_answers(model, val, enc, images, raw, tok.pad_token_id, tok.eos_token_id)
            s = summarize(val, answers)
            history.append({"step": step + 1, "loss_ema": ema, "seconds": time.time() - t0, "val": s})
            log(f"llava val @ {step + 1}: {fmt_summary(s)}")
            model.train()
    model.eval()
    info = {"parameters": n_params, "train_seconds": time.time() - t0, "history": history, "steps": args.llava_steps,
            "stopped_early_at": stopped, "device": str(DEVICE), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__}
    return model, info


# ------------------------------------------------------------------------------------------------
# 4. CLIP
# ------------------------------------------------------------------------------------------------


def clip_prompt(question: str, answer: str) -> str:
    return f"question: {question.strip()} answer: {answer.strip()}"


def build_clip(tok, args) -> CLIPModel:
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=args.clip_text_hidden,
            intermediate_size=4 * args.clip_text_hidden,
            num_hidden_layers=args.clip_text_layers,
            num_attention_heads=4,
            max_position_embeddings=32,
            hidden_act="quick_gelu",
            projection_dim=args.clip_proj,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            image_size=IMAGE_SIZE,
            patch_size=args.clip_patch,
            hidden_size=args.clip_vision_hidden,
            intermediate_size=4 * args.clip_vision_hidden,
            num_hidden_layers=args.clip_vision_layers,
            num_attention_heads=4,
            hidden_act="quick_gelu",
            projection_dim=args.clip_proj,
        ),
        projection_dim=args.clip_proj,
        logit_scale_init_value=math.log(1 / 0.07),
    )
    return CLIPModel(config)


class ClipText:
    """Tokenised candidate prompts per question, padded like the Rust side (right, pad = eos)."""

    def __init__(self, tok, vocab: list[str]):
        self.tok, self.vocab = tok, vocab
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def of(self, question: str):
        hit = self.cache.get(question)
        if hit is None:
            enc = self.tok([clip_prompt(question, a) for a in self.vocab], padding=True, truncation=True,
                           max_length=32, return_tensors="pt")
            hit = (enc.input_ids, enc.attention_mask)
            self.cache[question] = hit
        return hit


def clip_logits(model, text: ClipText, questions: list[str], pix: torch.Tensor) -> torch.Tensor:
    """[B, K] scaled cosine similarities of each image with the K candidate prompts of its question."""
    uniq = sorted(set(questions))
    where = {q: i for i, q in enumerate(uniq)}
    encs = [text.of(q) for q in uniq]
    L = max(e[0].shape[1] for e in encs)
    pad = text.tok.pad_token_id
    ids = torch.cat([F.pad(e[0], (0, L - e[0].shape[1]), value=pad) for e in encs]).to(DEVICE)
    mask = torch.cat([F.pad(e[1], (0, L - e[1].shape[1]), value=0) for e in encs]).to(DEVICE)
    k = len(text.vocab)
    # transformers 5: get_*_features return the model output with the PROJECTED pooler_output
    t = F.normalize(model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)
    t = t.view(len(uniq), k, -1)
    im = F.normalize(model.get_image_features(pixel_values=pix).pooler_output, dim=-1)
    sel = t[torch.tensor([where[q] for q in questions], device=DEVICE)]  # [B, K, D]
    return model.logit_scale.exp() * torch.einsum("bd,bkd->bk", im, sel)


def train_clip(args, tok, data: Path, images: Images, vocab: list[str]):
    seed_all(args.seed + 11)
    model = build_clip(tok, args)
    model.set_attn_implementation(ATTN_TRAIN)
    model.to(DEVICE)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"clip: {n_params:,} parameters; vision {args.clip_vision_layers}x{args.clip_vision_hidden} patch "
        f"{args.clip_patch}, text {args.clip_text_layers}x{args.clip_text_hidden}, proj {args.clip_proj}, vocab {len(tok)}")
    text = ClipText(tok, vocab)
    aidx = {a: i for i, a in enumerate(vocab)}
    train = [r for r in read_split(data, "train") if r["multiple_choice_answer"] in aidx]
    val = read_split(data, "val")[: args.eval_n]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.clip_lr, betas=(0.9, 0.98), eps=1e-8)
    rng = random.Random(args.seed + 12)
    order: list[int] = []
    history = []
    t0 = time.time()
    ema = None
    model.train()
    stopped = None
    for step in range(args.clip_steps):
        if step == args.clip_stop_step or (args.max_seconds and time.time() - t0 > args.max_seconds):
            stopped = step
            why = "--clip-stop-step" if step == args.clip_stop_step else f"time budget of {args.max_seconds}s"
            log(f"clip: stopping at step {step} ({why})")
            break
        if len(order) < args.batch:
            perm = list(range(len(train)))
            rng.shuffle(perm)
            order.extend(perm)
        idx, order = order[: args.batch], order[args.batch:]
        batch = [train[i] for i in idx]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.clip_steps, args.clip_lr, args.warmup)
        logits = clip_logits(model, text, [r["question"] for r in batch], images.batch([r["image"] for r in batch]).to(DEVICE))
        loss = F.cross_entropy(logits, torch.tensor([aidx[r["multiple_choice_answer"]] for r in batch], device=DEVICE))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if (step + 1) % 50 == 0:
            log(f"clip step {step + 1}/{args.clip_steps} loss {ema:.4f} scale {model.logit_scale.exp().item():.1f} "
                f"{time.time() - t0:.0f}s")
        if (step + 1) % args.eval_every == 0:
            s = summarize(val, clip_answers(model, text, val, images))
            history.append({"step": step + 1, "loss_ema": ema, "seconds": time.time() - t0, "val": s})
            log(f"clip val @ {step + 1}: {fmt_summary(s)}")
            model.train()
    model.eval()
    return model, {"parameters": n_params, "train_seconds": time.time() - t0, "history": history, "steps": args.clip_steps,
                   "stopped_early_at": stopped, "device": str(DEVICE), "torch": torch.__version__,
                   "transformers": __import__("transformers").__version__}


@torch.no_grad()
def clip_answers(model, text: ClipText, records, images: Images, batch_size: int = 256) -> list[str]:
    model.eval()
    out = []
    for b0 in range(0, len(records), batch_size):
        batch = records[b0: b0 + batch_size]
        logits = clip_logits(model, text, [r["question"] for r in batch], images.batch([r["image"] for r in batch]).to(DEVICE))
        out.extend(text.vocab[i] for i in logits.argmax(-1).tolist())
    return out


# ------------------------------------------------------------------------------------------------
# 5. save in the Hugging Face layout
# ------------------------------------------------------------------------------------------------


def clean_tokenizer_config(d: Path) -> None:
    """Drops the load-time keys transformers copies into tokenizer_config.json when re-saving."""
    p = d / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    for k in ("is_local", "local_files_only", "name_or_path"):
        cfg.pop(k, None)
    write_json(p, cfg)


def save_llava(model, tok, args, info: dict) -> None:
    if LLAVA_DIR.exists():
        shutil.rmtree(LLAVA_DIR)
    LLAVA_DIR.mkdir(parents=True)
    sd = {k: v.cpu() for k, v in model.state_dict().items()}
    order = sorted(sd.keys(), key=lambda k: (0 if k.startswith("model.vision_tower.") else
                                             1 if k.startswith("model.multi_modal_projector.") else 2))
    tensors = {mf.module_to_hub_key(k): sd[k].detach().to(torch.float32).contiguous().clone() for k in order}
    save_file(tensors, LLAVA_DIR / "model.safetensors", metadata={"format": "pt"})
    cfg = mf.hub_config(model.config)
    write_json(LLAVA_DIR / "config.json", cfg)
    write_json(LLAVA_DIR / "generation_config.json",
               {"_from_model_config": True, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id})
    processor = make_llava_processor(tok, args.patch)
    tok.save_pretrained(LLAVA_DIR)
    clean_tokenizer_config(LLAVA_DIR)
    processor.image_processor.save_pretrained(LLAVA_DIR)
    write_json(LLAVA_DIR / "chat_template.json", {"chat_template": mf.LLAVA_CHAT_TEMPLATE})
    write_json(LLAVA_DIR / "processor_config.json",
               {"image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": args.patch,
                "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"})
    write_json(LLAVA_DIR / "training.json", info)


def save_clip(model, tok, vocab: list[str], info: dict) -> None:
    if CLIP_DIR.exists():
        shutil.rmtree(CLIP_DIR)
    CLIP_DIR.mkdir(parents=True)
    model.to("cpu").save_pretrained(CLIP_DIR)
    model.to(DEVICE)
    tok.save_pretrained(CLIP_DIR)
    clean_tokenizer_config(CLIP_DIR)
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=3,
        do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), do_convert_rgb=True)
    ip.save_pretrained(CLIP_DIR)
    (CLIP_DIR / "answers.txt").write_text("".join(a + "\n" for a in vocab), encoding="utf-8")
    write_json(CLIP_DIR / "training.json", info)


def reload_and_check(data: Path, images: Images, vocab: list[str], n: int) -> dict:
    """Load both from disk with transformers; tokenizer.json (what Rust reads) must agree with the
    transformers tokenizers; the image processors must agree with the training preprocessing."""
    test = read_split(data, "test")
    sample = test[: min(n, len(test))]
    # --- LLaVA ---
    model, linfo = LlavaForConditionalGeneration.from_pretrained(LLAVA_DIR, attn_implementation="eager",
                                                                 output_loading_info=True)
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not linfo.get(k), (k, linfo.get(k))
    model.to(DEVICE).eval()
    proc = AutoProcessor.from_pretrained(LLAVA_DIR, backend="pil")
    raw = tokenizers.Tokenizer.from_file(str(LLAVA_DIR / "tokenizer.json"))
    tok = proc.tokenizer
    vc = model.config.vision_config
    n_image = (vc.image_size // vc.patch_size) ** 2  # the sparse hub config leaves image_seq_length at 576
    enc = LlavaEncoder(raw, n_image, tok.eos_token_id)
    for r in sample[:50]:
        prompt = mf.render(proc, r["question"], with_image=True)
        assert prompt == enc.prompt(r["question"]), prompt
        inputs = proc(images=Image.open(data / r["image"]).convert("RGB"), text=prompt, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == enc.example(r["question"], None)[0]
        d = (inputs["pixel_values"] - images.batch([r["image"]])).abs().max().item()
        assert d < 1e-5, f"preprocessing differs by {d}"
    answers = llava_answers(model, sample, enc, images, raw, tok.pad_token_id, tok.eos_token_id)
    llava = summarize(sample, answers)
    log(f"reloaded llava on test[:{len(sample)}]: {fmt_summary(llava)}")
    # --- CLIP ---
    cmodel = CLIPModel.from_pretrained(CLIP_DIR, attn_implementation="eager").to(DEVICE).eval()
    ctok = AutoTokenizer.from_pretrained(CLIP_DIR)
    craw = tokenizers.Tokenizer.from_file(str(CLIP_DIR / "tokenizer.json"))
    cip = CLIPImageProcessorPil.from_pretrained(CLIP_DIR)
    for r in sample[:50]:
        for a in vocab[:3]:
            t = clip_prompt(r["question"], a)
            assert craw.encode(t).ids == ctok(t).input_ids, t
        px = cip(Image.open(data / r["image"]).convert("RGB"), return_tensors="pt").pixel_values
        d = (px - images.batch([r["image"]])).abs().max().item()
        assert d < 1e-5, f"preprocessing differs by {d}"
    clip = summarize(sample, clip_answers(cmodel, ClipText(ctok, vocab), sample, images))
    log(f"reloaded clip on test[:{len(sample)}]: {fmt_summary(clip)}")
    return {"llava": llava, "clip": clip}


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path.home() / ".cache/bella-vqa/demo-data")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--n", type=int, default=100000, help="training questions of the shapes world")
    ap.add_argument("--only", choices=["llava", "clip", "check"],
                    help="train and save one model only; `check`: only reload --out and evaluate it")
    ap.add_argument("--no-save", action="store_true", help="train and evaluate, write nothing under demo/")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto",
                    help="cuda, cpu or auto (cuda when available); the shipped models were trained on one H100")
    ap.add_argument("--tokenizers", type=Path, help="tokenizer cache (default: DATA/tokenizers; built when missing)")
    ap.add_argument("--out", type=Path, default=DEMO, help="where llava/ and clip/ are written (default: demo/)")
    ap.add_argument("--max-seconds", type=float, default=0,
                    help="stop training a model after this long (0: never); the schedule stays that of --*-steps")
    ap.add_argument("--test-n", type=int, default=0, help="evaluate on the first N test questions only (0: all)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--eval-n", type=int, default=1000, help="validation questions evaluated during training")
    # LLaVA
    ap.add_argument("--llava-steps", type=int, default=6500, help="length of the LR schedule")
    ap.add_argument("--llava-stop-step", type=int, default=5968,
                    help="stop after this many steps (the shipped run was stopped there by its time budget)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--vision-hidden", type=int, default=96)
    ap.add_argument("--vision-layers", type=int, default=3)
    ap.add_argument("--text-hidden", type=int, default=128)
    ap.add_argument("--text-intermediate", type=int, default=352)
    ap.add_argument("--text-layers", type=int, default=3)
    # CLIP
    ap.add_argument("--clip-steps", type=int, default=6500)
    ap.add_argument("--clip-stop-step", type=int, default=-1, help="stop after this many steps (-1: never)")
    ap.add_argument("--clip-lr", type=float, default=1e-3)
    ap.add_argument("--clip-patch", type=int, default=4)
    ap.add_argument("--clip-vision-hidden", type=int, default=96)
    ap.add_argument("--clip-vision-layers", type=int, default=3)
    ap.add_argument("--clip-text-hidden", type=int, default=64)
    ap.add_argument("--clip-text-layers", type=int, default=2)
    ap.add_argument("--clip-proj", type=int, default=64)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    global DEVICE, LLAVA_DIR, CLIP_DIR, ATTN_TRAIN
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    DEVICE = torch.device(args.device)
    # eager attention on CUDA: SDPA's fused backward kernels are not deterministic
    ATTN_TRAIN = "sdpa" if DEVICE.type == "cpu" else "eager"
    LLAVA_DIR, CLIP_DIR = args.out.resolve() / "llava", args.out.resolve() / "clip"
    data = args.data.expanduser().resolve()
    generate_data(data, args.seed, args.n)
    images = Images(data)

    vocab = sorted({r["multiple_choice_answer"] for r in read_split(data, "train")},
                   key=lambda a: (not a.isdigit(), a))
    log(f"answer vocabulary ({len(vocab)}): {vocab}")
    test = read_split(data, "test")
    if args.test_n:
        test = test[: args.test_n]
    results = {}

    tok, ctok = tokenizers_stage(data, (args.tokenizers or data / "tokenizers").expanduser().resolve())
    if args.only in (None, "llava"):
        log(f"llama tokenizer: {len(tok)} tokens (<image>={tok.convert_tokens_to_ids('<image>')}, pad={tok.pad_token_id})")
        model, info = train_llava(args, tok, data, images)
        raw = tokenizers.Tokenizer.from_str(tok.backend_tokenizer.to_str())
        enc = LlavaEncoder(raw, (IMAGE_SIZE // args.patch) ** 2, tok.eos_token_id)
        t0 = time.time()
        answers = llava_answers(model, test, enc, images, raw, tok.pad_token_id, tok.eos_token_id)
        info["command"] = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
        info["test"] = summarize(test, answers)
        info["test_seconds"] = time.time() - t0
        info["config"] = {k: v for k, v in vars(args).items() if not k.startswith("clip") and k not in ("data", "out")}
        info["answer_format"] = "USER: <image>\\n{question} ASSISTANT: {multiple_choice_answer}</s> (loss on answer + </s>)"
        log(f"LLaVA test: {fmt_summary(info['test'])}")
        results["llava"] = info
        if not args.no_save:
            save_llava(model, tok, args, info)
    if args.only in (None, "clip"):
        log(f"clip tokenizer: {len(ctok)} tokens (bos={ctok.bos_token_id}, eos=pad={ctok.eos_token_id})")
        cmodel, cinfo = train_clip(args, ctok, data, images, vocab)
        cinfo["command"] = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
        cinfo["test"] = summarize(test, clip_answers(cmodel, ClipText(ctok, vocab), test, images))
        cinfo["answer_vocabulary"] = vocab
        cinfo["config"] = {k: v for k, v in vars(args).items()
                           if k.startswith("clip") or k in ("seed", "n", "batch", "wd", "warmup", "device", "threads")}
        log(f"CLIP test: {fmt_summary(cinfo['test'])}")
        results["clip"] = cinfo
        if not args.no_save:
            save_clip(cmodel, ctok, vocab, cinfo)
    if (not args.no_save and args.only is None) or args.only == "check":
        checked = reload_and_check(data, images, vocab, args.test_n or 2000)
        if args.only == "check":
            print(json.dumps(checked, indent=1))


if __name__ == "__main__":
    main()
