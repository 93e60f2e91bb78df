#!/usr/bin/env python3
"""Write the demo images under eval/demo/.

    ~/.cache/bella-fixtures-venv/bin/python scripts/demo/make_demo_images.py [--data DIR]

1. Shapes-world scenes with obvious answers (32x32 PNGs), painted exactly as the Rust generator
   paints them (src/data/shapes.rs: `Scene::render`, `Shape::covers`, `Color::rgb`, `BACKGROUND`).
   With --data (a folder written by `bella-vqa data shapes`, e.g. ~/.cache/bella-vqa/demo-data)
   the renderer is first checked pixel for pixel against the generator's own images.
2. Natural photographs for the out-of-distribution checks: sample images that scikit-image ships
   (public domain or CC0, see eval/demo/LICENSES.md), taken from the scikit-image wheel (downloaded
   with pip, not installed) and resized to at most 128 px on the longer side.

The output is deterministic (fixed scenes, Pillow's LANCZOS resize, PNG without timestamps).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "eval" / "demo"
SIZE = 32
BACKGROUND = (240, 240, 240)
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 180),
    "orange": (250, 130, 20),
}
HELD_OUT = {("red", "triangle"), ("green", "square"), ("blue", "circle"), ("yellow", "diamond")}
SKIMAGE = "scikit-image==0.26.0"
PHOTOS = {  # file in skimage/data -> name under eval/demo
    "astronaut.png": "photo-astronaut.png",
    "coffee.png": "photo-coffee.png",
    "chelsea.png": "photo-cat.png",
    "rocket.jpg": "photo-rocket.jpg",
}

# name -> (objects as (shape, color, [x0, y0, x1, y1]), example questions with the expected answer)
SCENES = {
    "red-circle.png": (
        [("circle", "red", [10, 10, 22, 22])],
        {"What color is the circle?": "red", "How many shapes are there?": "1", "Is there a red circle?": "yes"},
    ),
    "two-blue-squares.png": (
        [("square", "blue", [3, 4, 13, 14]), ("square", "blue", [18, 17, 28, 27])],
        {"How many squares are there?": "2", "How many blue shapes are there?": "2"},
    ),
    "green-triangle-left-of-orange-cross.png": (
        [("triangle", "green", [2, 10, 13, 21]), ("cross", "orange", [19, 10, 30, 21])],
        {"What color is the triangle?": "green", "What shape is the orange object?": "cross",
         "Is the triangle left of the cross?": "yes", "What is left of the cross?": "triangle"},
    ),
    "purple-diamond.png": (
        [("diamond", "purple", [9, 9, 21, 21])],
        {"What shape is the purple object?": "diamond", "What color is the diamond?": "purple"},
    ),
    "three-shapes.png": (
        [("cross", "red", [4, 4, 14, 14]), ("circle", "yellow", [18, 6, 28, 16]), ("diamond", "green", [10, 19, 20, 29])],
        {"How many shapes are there?": "3", "What color is the circle?": "yellow", "Is there a blue object?": "no"},
    ),
    # out of distribution: a held-out colour-shape pair (never drawn or named in training)
    "ood-blue-circle.png": (
        [("circle", "blue", [10, 10, 22, 22])],
        {"What color is the circle?": "blue (never seen in training)"},
    ),
}


def covers(shape: str, u: np.float32, v: np.float32) -> bool:
    """src/data/shapes.rs Shape::covers, in f32 like the Rust code."""
    half = np.float32(0.5)
    du = abs(u - half)
    dv = abs(v - half)
    if shape == "circle":
        return bool(du * du + dv * dv <= np.float32(0.25))
    if shape == "square":
        return True
    if shape == "triangle":
        return bool(du <= v / np.float32(2.0))
    if shape == "diamond":
        return bool(du + dv <= half)
    if shape == "cross":
        sixth = np.float32(1.0) / np.float32(6.0)
        return bool(du <= sixth or dv <= sixth)
    raise ValueError(shape)


def render(objects, width: int = SIZE, height: int = SIZE) -> Image.Image:
    """src/data/shapes.rs Scene::render: background, then each object's covered pixel centres."""
    img = np.zeros((height, width, 3), dtype=np.uint8)
    img[:, :] = BACKGROUND
    for shape, color, (x0, y0, x1, y1) in objects:
        w = np.float32(max(x1 - x0, 1))
        h = np.float32(max(y1 - y0, 1))
        for y in range(y0, min(y1, height)):
            for x in range(x0, min(x1, width)):
                u = (np.float32(x - x0) + np.float32(0.5)) / w
                v = (np.float32(y - y0) + np.float32(0.5)) / h
                if covers(shape, u, v):
                    img[y, x] = COLORS[color]
    return Image.fromarray(img, mode="RGB")


def check_against_generator(data: Path, n: int = 300) -> None:
    seen = set()
    checked = 0
    with open(data / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["image"] in seen:
                continue
            seen.add(r["image"])
            sc = r["scene"]
            objs = [(o["shape"], o["color"], o["bbox"]) for o in sc["objects"]]
            mine = np.asarray(render(objs, sc["width"], sc["height"]))
            theirs = np.asarray(Image.open(data / r["image"]).convert("RGB"))
            assert np.array_equal(mine, theirs), f"renderer differs from the generator on {r['image']}"
            checked += 1
            if checked >= n:
                break
    print(f"renderer matches the generator on {checked} scenes")


def skimage_data(wheel: Path | None) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            SKIMAGE, "-d", tmp], check=True)
            wheel = next(Path(tmp).glob("scikit_image-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            return {name: z.read(f"skimage/data/{name}") for name in PHOTOS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="shapes-world folder to check the renderer against")
    ap.add_argument("--skimage-wheel", type=Path, help=f"a {SKIMAGE} wheel (default: pip download it)")
    args = ap.parse_args()
    if args.data:
        check_against_generator(args.data.expanduser())
    OUT.mkdir(parents=True, exist_ok=True)
    index = {}
    for name, (objects, questions) in SCENES.items():
        ood = name.startswith("ood-")
        for shape, color, _ in objects:
            assert ((color, shape) in HELD_OUT) == ood, (name, color, shape)
        render(objects).save(OUT / name, format="PNG")
        index[name] = {"objects": [{"shape": s, "color": c, "bbox": b} for s, c, b in objects], "questions": questions}
    import io

    for src, bytes_ in skimage_data(args.skimage_wheel).items():
        im = Image.open(io.BytesIO(bytes_)).convert("RGB")
        scale = 128 / max(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
        dst = PHOTOS[src]
        if dst.endswith(".jpg"):
            im.save(OUT / dst, format="JPEG", quality=90)
        else:
            im.save(OUT / dst, format="PNG")
        index[dst] = {"source": f"{SKIMAGE} skimage/data/{src}", "size": list(im.size)}
    (OUT / "images.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {len(index)} images to {OUT}")


if __name__ == "__main__":
    main()
