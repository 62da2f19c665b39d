"""Repeated augmentation's loader cost: rank 0 of 3 with ``data.repeated_aug=3`` against the same rank without it.

With repeats a rank reads its three slots' tar members whole and decodes a uniform third of each (the ViT recipe:
RandAugment); without, it reads and decodes its own slot. Rounds alternate the two in one process on the
ImageNet-like shards of ``bench/loader_throughput.py``; prints the medians and their ratio.

    python bench/repeated_aug_cost.py [--images 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader_throughput import imagenet_like_shards, measure

from gpd_ds.data.transforms import Augment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "gpd_ds_bench"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    shards = imagenet_like_shards(Path(args.cache), args.images)
    vit = Augment(auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic")
    rates: dict[int, list[float]] = {1: [], 3: []}
    for _ in range(args.rounds):
        for repeats in rates:
            rates[repeats].append(measure(shards, 224, 2, args.batch, augment=vit, world=3, repeats=repeats))
    for repeats, values in rates.items():
        print(f"repeated_aug={repeats}: {statistics.median(values):6.0f} img/s (rank 0 of 3, 2 workers)  "
              f"rounds {[round(v) for v in values]}")
    print(f"ratio x3 / x1: {statistics.median(rates[3]) / statistics.median(rates[1]):.2f}")


if __name__ == "__main__":
    main()
