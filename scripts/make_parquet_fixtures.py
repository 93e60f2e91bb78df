#!/usr/bin/env python3
"""Write the Parquet fixtures of bella-vqa's Parquet reader under tests/fixtures/parquet/.

Each data file is written twice, by the same rows: as Parquet, the way lmms-eval users have their
benchmarks (Hugging Face `datasets`' `to_parquet`, images embedded as the `Image` feature, a
struct {bytes, path}; or pyarrow directly for the layouts `datasets` does not write), and as our
JSONL (the image a path to the same PNG in tests/fixtures/images/). The Rust tests read both and
compare the examples, so the JSONL reader is the reference the Parquet reader must match.

The column layouts are those of the lmms-lab datasets that lmms-eval's tasks load:
VQAv2 (lmms-lab/VQAv2), TextVQA (lmms-lab/textvqa), VizWiz-VQA test (lmms-lab/VizWiz-VQA),
ChartQA (lmms-lab/ChartQA: no id column, one `answer`), GQA (lmms-lab/GQA
testdev_balanced_instructions: `id`, `imageId`, no image column; its images in another config,
testdev_balanced_images: `id`, `image`).

Rerun by hand (CI reads the files only):

    python3 -m venv /tmp/venv-parquet
    /tmp/venv-parquet/bin/pip install -r scripts/requirements-parquet.txt
    /tmp/venv-parquet/bin/python scripts/make_parquet_fixtures.py

It deletes and rewrites tests/fixtures/parquet/ and is deterministic (the same bytes twice).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# No progress bars in the output.
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import datasets  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "tests/fixtures/images"
OUT = ROOT / "tests/fixtures/parquet"
# The JSONL files sit in OUT: their image paths are relative to it.
REL = "../images"

PNG = {name: (IMAGES / name).read_bytes() for name in ("square.png", "wide.png", "photo.png")}


def hf_image(name: str) -> dict:
    """An embedded image as the `Image` feature stores it: the bytes and the original file name."""
    return {"bytes": PNG[name], "path": name}


def write_jsonl(name: str, records: list[dict]) -> None:
    with open(OUT / name, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def to_parquet(ds: datasets.Dataset, path: Path, compression: str | None = None) -> None:
    """`datasets`' own writer (its choice: image columns uncompressed, the others snappy), or
    pyarrow's on the same table (its `huggingface` schema metadata included) with one
    `compression` for every column, as older `datasets` versions (snappy) and other tools write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if compression is None:
        ds.to_parquet(str(path))
    else:
        pq.write_table(ds.data.table, path, compression=compression)


# --- VQAv2 (lmms-lab/VQAv2, validation) ------------------------------------------------------

VQAV2_FEATURES = datasets.Features(
    {
        "question_type": datasets.Value("string"),
        "multiple_choice_answer": datasets.Value("string"),
        "answers": [
            {
                "answer": datasets.Value("string"),
                "answer_confidence": datasets.Value("string"),
                "answer_id": datasets.Value("int64"),
            }
        ],
        "image_id": datasets.Value("int64"),
        "answer_type": datasets.Value("string"),
        "question_id": datasets.Value("int64"),
        "question": datasets.Value("string"),
        "image": datasets.Image(),
    }
)


def vqav2_rows() -> list[dict]:
    """Four questions; two share an image (it is extracted once)."""
    specs = [
        (262148000, 262148, "square.png", "What shape is it?", "none of the above", "other",
         ["square"] * 7 + ["box", "square", "rectangle"]),
        (262148001, 262148, "square.png", "Is it red?", "is the", "yes/no", ["yes"] * 9 + ["no"]),
        (393225000, 393225, "wide.png", "How many shapes are there?", "how many", "number",
         ["2"] * 6 + ["two", "3", "2", "1"]),
        (393226000, 393226, "photo.png", "What is in the picture?", "what is", "other",
         ["circle", "a circle", "ball", "circle", "circle", "dot", "circle", "sun", "circle",
          "circle"]),
    ]
    rows = []
    for qid, image_id, image, question, qtype, atype, answers in specs:
        rows.append(
            {
                "question_type": qtype,
                "multiple_choice_answer": max(set(answers), key=answers.count),
                "answers": [
                    {"answer": a, "answer_confidence": "yes" if i % 3 else "maybe",
                     "answer_id": i + 1}
                    for i, a in enumerate(answers)
                ],
                "image_id": image_id,
                "answer_type": atype,
                "question_id": qid,
                "question": question,
                "image": image,
            }
        )
    return rows


def vqav2_jsonl(rows: list[dict]) -> list[dict]:
    return [
        {
            "question_id": r["question_id"],
            "image": f"{REL}/{r['image']}",
            "question": r["question"],
            "answers": r["answers"],
            "answer_type": r["answer_type"],
            "question_type": r["question_type"],
            "multiple_choice_answer": r["multiple_choice_answer"],
            "image_id": r["image_id"],
        }
        for r in rows
    ]


def vqav2_dataset(rows: list[dict]) -> datasets.Dataset:
    columns = {k: [r[k] for r in rows] for k in VQAV2_FEATURES}
    columns["image"] = [hf_image(r["image"]) for r in rows]
    return datasets.Dataset.from_dict(columns, features=VQAV2_FEATURES)


# --- TextVQA (lmms-lab/textvqa, validation) --------------------------------------------------

TEXTVQA_FEATURES = datasets.Features(
    {
        "image_id": datasets.Value("string"),
        "question_id": datasets.Value("int64"),
        "question": datasets.Value("string"),
        "question_tokens": datasets.Sequence(datasets.Value("string")),
        "image": datasets.Image(),
        "image_width": datasets.Value("int64"),
        "image_height": datasets.Value("int64"),
        "flickr_original_url": datasets.Value("string"),
        "flickr_300k_url": datasets.Value("string"),
        "answers": datasets.Sequence(datasets.Value("string")),
        "image_classes": datasets.Sequence(datasets.Value("string")),
        "set_name": datasets.Value("string"),
        "ocr_tokens": datasets.Sequence(datasets.Value("string")),
    }
)


def textvqa_rows() -> list[dict]:
    specs = [
        (34602, "0054c91397f2fe05", "wide.png", 45, 30, "what brand is this?",
         ["nous les gosses"] * 4 + ["dakota", "clos culombu"] + ["nous les gosses"] * 4,
         ["Bottle", "Wine"], ["nous", "les", "gosses"]),
        (34603, "005635e119b9f32f", "photo.png", 64, 48, "what number is on the sign?",
         ["12"] * 10, ["Sign"], ["12", "street"]),
    ]
    return [
        {
            "image_id": image_id,
            "question_id": qid,
            "question": question,
            "question_tokens": question.rstrip("?").split(),
            "image": image,
            "image_width": w,
            "image_height": h,
            "flickr_original_url": f"https://example.invalid/{image_id}_o.jpg",
            "flickr_300k_url": f"https://example.invalid/{image_id}_z.jpg",
            "answers": answers,
            "image_classes": classes,
            "set_name": "val",
            "ocr_tokens": ocr,
        }
        for qid, image_id, image, w, h, question, answers, classes, ocr in specs
    ]


def textvqa_files(rows: list[dict]) -> tuple[datasets.Dataset, list[dict]]:
    columns = {k: [r[k] for r in rows] for k in TEXTVQA_FEATURES}
    columns["image"] = [hf_image(r["image"]) for r in rows]
    ds = datasets.Dataset.from_dict(columns, features=TEXTVQA_FEATURES)
    jsonl = []
    for r in rows:
        rec = {k: v for k, v in r.items() if k != "image"}
        rec["image"] = f"{REL}/{r['image']}"
        jsonl.append(rec)
    return ds, jsonl


# --- VizWiz-VQA test (lmms-lab/VizWiz-VQA, test: no answers) ---------------------------------

VIZWIZ_FEATURES = datasets.Features(
    {
        "question_id": datasets.Value("string"),
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "answers": datasets.Sequence(datasets.Value("string")),
        "category": datasets.Value("string"),
    }
)


def vizwiz_test_files() -> tuple[datasets.Dataset, list[dict]]:
    specs = [
        ("VizWiz_test_00000000", "photo.png", "What is this?"),
        ("VizWiz_test_00000001", "square.png", "What color is this shirt?"),
    ]
    ds = datasets.Dataset.from_dict(
        {
            "question_id": [s[0] for s in specs],
            "image": [hf_image(s[1]) for s in specs],
            "question": [s[2] for s in specs],
            "answers": [None for _ in specs],
            "category": [None for _ in specs],
        },
        features=VIZWIZ_FEATURES,
    )
    jsonl = [
        {"question_id": qid, "image": f"{REL}/{image}", "question": q, "answers": [],
         "category": None}
        for qid, image, q in specs
    ]
    return ds, jsonl


# --- ChartQA (lmms-lab/ChartQA, test: no id column, one answer) ------------------------------

CHARTQA_FEATURES = datasets.Features(
    {
        "type": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "image": datasets.Image(),
    }
)


def chartqa_files() -> tuple[datasets.Dataset, list[dict]]:
    specs = [
        ("human_test", "How many bars are there?", "3", "wide.png"),
        ("augmented_test", "What is the highest value?", "42", "photo.png"),
    ]
    ds = datasets.Dataset.from_dict(
        {
            "type": [s[0] for s in specs],
            "question": [s[1] for s in specs],
            "answer": [s[2] for s in specs],
            "image": [hf_image(s[3]) for s in specs],
        },
        features=CHARTQA_FEATURES,
    )
    # Without an id column the question's id is its row's position.
    jsonl = [
        {"question_id": str(i), "image": f"{REL}/{image}", "question": q, "answers": [a],
         "type": t}
        for i, (t, q, a, image) in enumerate(specs)
    ]
    return ds, jsonl


# --- GQA (lmms-lab/GQA testdev_balanced_instructions: images in another config) --------------


def gqa_files() -> tuple[pa.Table, list[dict]]:
    specs = [
        ("201307251", "n161313", "square.png", "Is it a square?", "yes", "Yes, it is a square."),
        ("201640614", "n235859", "wide.png", "Which shape is on the left?", "circle",
         "The circle is on the left."),
    ]
    table = pa.table(
        {
            "id": [s[0] for s in specs],
            "imageId": [s[1] for s in specs],
            "question": [s[3] for s in specs],
            "answer": [s[4] for s in specs],
            "fullAnswer": [s[5] for s in specs],
            "isBalanced": [True, True],
            "groups": pa.array(
                [{"global": None, "local": "10c-square"}, {"global": "shape", "local": None}],
                pa.struct([("global", pa.string()), ("local", pa.string())]),
            ),
            "entailed": [[], ["201640615"]],
            "semantic": pa.array(
                [
                    [{"operation": "select", "argument": "square (1)", "dependencies": []}],
                    [{"operation": "select", "argument": "circle (2)", "dependencies": []},
                     {"operation": "relate", "argument": "left", "dependencies": [0]}],
                ],
                pa.list_(pa.struct([("operation", pa.string()), ("argument", pa.string()),
                                    ("dependencies", pa.list_(pa.int64()))])),
            ),
        }
    )
    images = OUT / "gqa-images"
    images.mkdir(parents=True, exist_ok=True)
    jsonl = []
    for row, (qid, image_id, image, *_rest) in zip(table.to_pylist(), specs):
        # GQA names its images IMAGE_ID.jpg; the content decides the format (these are PNGs).
        (images / f"{image_id}.jpg").write_bytes(PNG[image])
        rec = {k: v for k, v in row.items() if k not in ("id", "answer")}
        rec.update({"question_id": qid, "image": f"gqa-images/{image_id}.jpg",
                    "answers": [row["answer"]]})
        jsonl.append(rec)
    return table, jsonl


GQA_IMAGES_FEATURES = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()})


def gqa_images_dataset() -> datasets.Dataset:
    """lmms-lab/GQA testdev_balanced_images: the images of gqa.parquet's questions (the bytes of
    gqa-images/, in another order) and one that no question names."""
    specs = [("n235859", "wide.png"), ("n000003", "photo.png"), ("n161313", "square.png")]
    return datasets.Dataset.from_dict(
        {"id": [s[0] for s in specs], "image": [hf_image(s[1]) for s in specs]},
        features=GQA_IMAGES_FEATURES,
    )


# Bytes of formats people give as images that bella-vqa does not read: an iPhone's HEIC (an ISO
# base media file of brand heic) and an SVG drawing.
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
SVG = (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8">'
       b'<rect width="8" height="8" fill="red"/></svg>\n')


def png_header(width: int, height: int) -> bytes:
    """A PNG of `width` × `height` as far as its header tells, which is all the size check reads
    (the decoder's header stops at the first image data; there are no pixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


# --- Layouts `datasets` does not write: pyarrow directly -------------------------------------


def plain_binary_files() -> tuple[pa.Table, list[dict]]:
    """`id` string ids, one `answer`, the image a plain binary column named `image`."""
    specs = [("p1", "square.png", "What shape?", "square"),
             ("p2", "photo.png", "What is it?", "circle")]
    table = pa.table(
        {
            "id": [s[0] for s in specs],
            "question": [s[2] for s in specs],
            "answer": [s[3] for s in specs],
            "image": pa.array([PNG[s[1]] for s in specs], pa.binary()),
            "score": pa.array([0.5, 1.0], pa.float64()),
        }
    )
    jsonl = [{"question_id": qid, "image": f"{REL}/{image}", "question": q, "answers": [a],
              "score": score}
             for (qid, image, q, a), score in zip(specs, [0.5, 1.0])]
    return table, jsonl


def image_paths_files() -> tuple[pa.Table, list[dict]]:
    """The `Image` feature with null bytes and a path (images not embedded): the path is looked
    up in the images folder."""
    specs = [("v1", "wide.png", "What is this?", ["shapes", "shapes", "drawing"]),
             ("v2", "square.png", "What color?", ["red", "red", "red"])]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "question_id": [s[0] for s in specs],
            "image": pa.array([{"bytes": None, "path": s[1]} for s in specs], image_type),
            "question": [s[2] for s in specs],
            "answers": [s[3] for s in specs],
        }
    )
    jsonl = [{"question_id": qid, "image": f"{REL}/{image}", "question": q, "answers": a}
             for qid, image, q, a in specs]
    return table, jsonl


def bad_files() -> None:
    """Files the reader must refuse with a clear message."""
    bad = OUT / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    one_image = pa.array([{"bytes": PNG["square.png"], "path": "square.png"}], image_type)
    # No question column: the question is under another name.
    pq.write_table(pa.table({"question_id": [1], "text": ["What is it?"], "image": one_image}),
                   bad / "no-question.parquet")
    # A question column of the wrong type.
    pq.write_table(pa.table({"question_id": [1], "question": [7], "image": one_image}),
                   bad / "question-int.parquet")
    # Compressions bella-vqa does not read.
    for codec in ("zstd", "brotli"):
        pq.write_table(pa.table({"question_id": [1], "question": ["What is it?"],
                                 "answers": [["square"]], "image": one_image}),
                       bad / f"{codec}.parquet", compression=codec)
    # The second row's image bytes are no image.
    two = pa.array([{"bytes": PNG["square.png"], "path": "square.png"},
                    {"bytes": b"this is not an image", "path": "notes.txt"}], image_type)
    pq.write_table(pa.table({"question_id": [1, 2], "question": ["What shape?", "What color?"],
                             "answers": [["square"], ["red"]], "image": two}),
                   bad / "not-an-image.parquet")
    # Images the image checks refuse: the second row's is a HEIC photograph, the third's a PNG
    # of 40000 × 40000 pixels (past the side limit).
    unusable = pa.array([{"bytes": PNG["square.png"], "path": "square.png"},
                         {"bytes": HEIC, "path": "IMG_0001.HEIC"},
                         {"bytes": png_header(40000, 40000), "path": "huge.png"}], image_type)
    pq.write_table(pa.table({"question_id": [1, 2, 3],
                             "question": ["What shape?", "What is it?", "What is it?"],
                             "answers": [["square"], ["a cat"], ["a map"]], "image": unusable}),
                   bad / "unusable-images.parquet")
    # GQA's images for gqa.parquet with the first question's image an SVG drawing and the
    # second's (n235859) missing.
    pq.write_table(pa.table({"id": ["n000003", "n161313"],
                             "image": pa.array([{"bytes": PNG["photo.png"], "path": None},
                                                {"bytes": SVG, "path": None}], image_type)}),
                   bad / "gqa-images.parquet")


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)

    rows = vqav2_rows()
    to_parquet(vqav2_dataset(rows), OUT / "vqav2.parquet")
    write_jsonl("vqav2.jsonl", vqav2_jsonl(rows))

    # The same four questions as two shards of one split, as the hub stores a large split.
    for i, part in enumerate((rows[:2], rows[2:])):
        to_parquet(vqav2_dataset(part), OUT / f"shards/validation-{i:05d}-of-00002.parquet",
                   compression="snappy")

    ds, jsonl = textvqa_files(textvqa_rows())
    to_parquet(ds, OUT / "textvqa.parquet", compression="gzip")
    write_jsonl("textvqa.jsonl", jsonl)

    ds, jsonl = vizwiz_test_files()
    to_parquet(ds, OUT / "vizwiz-test.parquet")
    write_jsonl("vizwiz-test.jsonl", jsonl)

    ds, jsonl = chartqa_files()
    to_parquet(ds, OUT / "chartqa.parquet")
    write_jsonl("chartqa.jsonl", jsonl)

    table, jsonl = gqa_files()
    pq.write_table(table, OUT / "gqa.parquet")
    write_jsonl("gqa.jsonl", jsonl)
    to_parquet(gqa_images_dataset(), OUT / "gqa-testdev-images.parquet")

    table, jsonl = plain_binary_files()
    pq.write_table(table, OUT / "plain.parquet")
    write_jsonl("plain.jsonl", jsonl)

    table, jsonl = image_paths_files()
    pq.write_table(table, OUT / "paths.parquet")
    write_jsonl("paths.jsonl", jsonl)

    bad_files()

    # What each file is, checked as written: the compression of every column chunk, and the
    # column types the Rust reader tells apart.
    expected = {"vqav2.parquet": {"SNAPPY", "UNCOMPRESSED"},
                "shards/validation-00000-of-00002.parquet": {"SNAPPY"},
                "textvqa.parquet": {"GZIP"}, "bad/zstd.parquet": {"ZSTD"},
                "bad/brotli.parquet": {"BROTLI"}}
    for name, codec in expected.items():
        meta = pq.ParquetFile(OUT / name).metadata
        codecs = {meta.row_group(g).column(c).compression
                  for g in range(meta.num_row_groups) for c in range(meta.num_columns)}
        assert codecs == codec, (name, codecs)
    schema = pq.read_schema(OUT / "vqav2.parquet")
    assert str(schema.field("image").type) == "struct<bytes: binary, path: string>", schema
    assert "answer_confidence" in str(schema.field("answers").type), schema
    schema = pq.read_schema(OUT / "gqa-testdev-images.parquet")
    assert str(schema).startswith("id: string\nimage: struct<bytes: binary, path: string>"), schema

    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    assert total < 150_000, f"fixtures too large: {total} bytes"
    print(f"wrote {sum(1 for p in OUT.rglob('*') if p.is_file())} files, {total} bytes, "
          f"with pyarrow {pa.__version__} and datasets {datasets.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
