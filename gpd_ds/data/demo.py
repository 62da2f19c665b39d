"""The offline demo dataset: ten classes of drawn shapes, made on first use and written with the shard writer.

No download and no extra package: each image is a shape (circle, square, triangle...) drawn with PIL at a
random size, position, rotation and colour on a random background, with pixel noise, saved as a JPEG in an
ImageFolder tree, then converted to shards by :func:`gpd_ds.data.shards.make_shards`. Deterministic for a seed.
It is small enough to train real timm models on a CPU in minutes, and hard enough that they do not reach 100%.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gpd_ds.data.shards import INDEX_NAME, make_shards

CLASSES = ("circle", "square", "triangle", "diamond", "cross", "ring", "hbars", "vbars", "xmark", "hexagon")
VERSION = 2


def cache_dir() -> Path:
    """Where generated data lives: ``$GPD_DS_CACHE`` or ``~/.cache/gpd_ds``."""
    return Path(os.environ.get("GPD_DS_CACHE", Path.home() / ".cache" / "gpd_ds"))


def _polygon(cx: float, cy: float, r: float, sides: int, angle: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(angle + 2 * math.pi * k / sides), cy + r * math.sin(angle + 2 * math.pi * k / sides))
            for k in range(sides)]


def draw_shape(label: int, size: int, rng: random.Random) -> Image.Image:
    """One image of class ``label``, drawn at 4x and downsampled (anti-aliased)."""
    big = size * 4
    bg = tuple(rng.randrange(256) for _ in range(3))
    fg = tuple((c + 96 + rng.randrange(64)) % 256 for c in bg)  # far from the background on every channel
    im = Image.new("RGB", (big, big), bg)
    d = ImageDraw.Draw(im)
    r = big * rng.uniform(0.26, 0.42)
    cx, cy = (big / 2 + rng.uniform(-1, 1) * (big / 2 - r) for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)
    tilt = rng.uniform(-0.15, 0.15)  # square vs diamond: 45 degrees apart, never confusable
    w = max(2, int(r * rng.uniform(0.25, 0.4)))
    name = CLASSES[label]
    if name == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif name == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=w)
    elif name in ("square", "diamond"):
        d.polygon(_polygon(cx, cy, r, 4, tilt + (math.pi / 4 if name == "square" else 0)), fill=fg)
    elif name == "triangle":
        d.polygon(_polygon(cx, cy, r, 3, angle), fill=fg)
    elif name == "hexagon":
        d.polygon(_polygon(cx, cy, r, 6, angle), fill=fg)
    elif name in ("cross", "xmark"):
        base = rng.uniform(-0.15, 0.15) + (0 if name == "cross" else math.pi / 4)
        for a in (base, base + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            d.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=fg, width=w)
    elif name in ("hbars", "vbars"):
        for k in range(3):
            offset = (k - 1) * r * 0.7
            if name == "hbars":
                d.line([cx - r, cy + offset, cx + r, cy + offset], fill=fg, width=w)
            else:
                d.line([cx + offset, cy - r, cx + offset, cy + r], fill=fg, width=w)
    im = im.resize((size, size), Image.Resampling.LANCZOS)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def write_image_folder(root: Path, per_class: int, size: int, seed: int) -> None:
    rng = random.Random(seed)
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(label, size, rng).save(folder / f"{name}_{i:05d}.jpg", quality=90)


def demo_dataset(root: str | Path | None = None, *, train_per_class: int = 300, val_per_class: int = 60,
                 size: int = 32, shard_size: int = 100, seed: int = 0, progress: bool = False) -> Path:
    """Shards of the demo dataset (splits ``train`` and ``val``), made on first use; returns their directory.

    Built in a temporary directory and renamed into place, so concurrent callers (several ranks) never see a
    half-written dataset.
    """
    name = f"demo-shapes-v{VERSION}-{train_per_class}-{val_per_class}-{size}px-s{seed}"
    final = Path(root) if root is not None else cache_dir() / name
    if (final / INDEX_NAME).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        for split, per_class, split_seed in (("train", train_per_class, seed), ("val", val_per_class, seed + 1)):
            write_image_folder(work / "images" / split, per_class, size, split_seed)
            make_shards(work / "images" / split, work / "shards", split, shard_size=shard_size, workers=1,
                        shuffle_seed=seed, prefix="demo", progress=progress)
        try:
            os.replace(work / "shards", final)
        except OSError:
            if not (final / INDEX_NAME).is_file():  # not a concurrent winner: a real error
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final
