"""Generated image trees and shards for the data tests (no dependency on ../shared)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image


def jpeg_bytes(width: int, height: int, seed: int, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    buf = io.BytesIO()
    image.save(buf, fmt, quality=85) if fmt == "JPEG" else image.save(buf, fmt)
    return buf.getvalue()


def image_tree(root: Path, classes: tuple[str, ...] = ("cat", "dog", "fish"), per_class: int = 12,
               seed: int = 0) -> dict[str, tuple[bytes, int]]:
    """ImageFolder tree of small random JPEGs of odd sizes; returns {sample key: (file bytes, label)}."""
    rng = random.Random(seed)
    written = {}
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            data = jpeg_bytes(rng.randint(5, 40), rng.randint(5, 40), seed=rng.randrange(10**9))
            (root / name / f"{name}_{i:03d}.JPEG").write_bytes(data)
            written[f"{name}_{name}_{i:03d}"] = (data, label)
    return written


def write_shard(path: Path, samples: list[dict]) -> None:
    """A shard with exactly the given members (for corrupted-data tests)."""
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False) as sink:
        for s in samples:
            sink.write(s)


def good_sample(key: str, label: int, seed: int, size: int = 16) -> dict:
    return {"__key__": key, "jpg": jpeg_bytes(size, size, seed), "cls": str(label).encode()}


def write_index(root: Path, split: str, shard_lengths: dict[str, int], classes: list[str]) -> None:
    import json
    index = {"name": "test", "classes": classes, "num_classes": len(classes),
             "splits": {split: {"name": split, "num_samples": sum(shard_lengths.values()),
                                "filenames": list(shard_lengths), "shard_lengths": list(shard_lengths.values())}}}
    (root / "_info.json").write_text(json.dumps(index))


def synthetic_shards(root: Path, split: str, lengths: list[int], num_classes: int = 4, size: int = 16) -> Path:
    """Shards of small random JPEGs with the given per-shard counts, plus the index."""
    root.mkdir(parents=True, exist_ok=True)
    counts = {}
    n = 0
    for i, length in enumerate(lengths):
        name = f"syn-{split}-{i:06d}.tar"
        write_shard(root / name, [good_sample(f"s{n + j:05d}", (n + j) % num_classes, n + j, size)
                                  for j in range(length)])
        counts[name] = length
        n += length
    write_index(root, split, counts, [f"c{k}" for k in range(num_classes)])
    return root
