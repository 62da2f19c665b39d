"""The cost of the decoded-size limit: reading each image's header (``image_header``) before decoding it.

Every sample the loaders decode is first checked against ``data.max_image_pixels`` from its header, so a
decompression bomb never reaches the decoder. This measures, on ImageNet-like JPEGs (~500x375, the size the
loaders see) and on CIFAR-like 32 px JPEGs, the loader's ``decode`` (header check + decode) against the bare
torchvision decode it wraps, in the same process, and prints the ratio, plus the size check alone
(``image_size``: JPEG/PNG headers parsed directly) and PIL's header read it replaces. Goal: the size check under
2% of an ImageNet-size decode.

    python bench/header_check.py [--images 300] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from gpd_ds.data.loader import decode
from gpd_ds.data.shards import image_header, image_size


def _jpegs(n: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = size
        smooth = np.kron(rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3)), np.ones((25, 25, 1)))[:h, :w]
        pixels = np.clip(smooth + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _time(fn, data: list[bytes], repeats: int) -> float:
    """Median over ``repeats`` of the seconds per image."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for d in data:
            fn(d)
        runs.append((time.perf_counter() - start) / len(data))
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    def bare(d: bytes) -> torch.Tensor:
        return decode_image(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB)

    def checked(d: bytes) -> torch.Tensor:
        return decode({"__key__": "k", "jpg": d, "cls": b"0"}, num_classes=1)[0]

    print(f"{'images':24}{'bare decode':>12}{'loader decode':>14}{'ratio':>7}{'size check':>12}{'PIL header':>12}"
          "   (us per image)")
    for name, size in (("ImageNet-like 500x375", (500, 375)), ("CIFAR-like 32x32", (32, 32))):
        data = _jpegs(args.images, size)
        # alternate the order so neither side always runs on a warm cache
        t_bare = _time(bare, data, args.repeats)
        t_checked = _time(checked, data, args.repeats)
        t_bare = min(t_bare, _time(bare, data, args.repeats))
        t_size, t_pil = _time(image_size, data, args.repeats), _time(image_header, data, args.repeats)
        print(f"{name:24}{t_bare * 1e6:12.1f}{t_checked * 1e6:14.1f}{t_checked / t_bare:7.3f}{t_size * 1e6:12.2f}"
              f"{t_pil * 1e6:12.1f}")


if __name__ == "__main__":
    main()
