"""Loader throughput: shards -> decode -> RandomResizedCrop -> flip -> uint8 batch, images/s per worker core.

ImageNet-size JPEGs (about 500x375, ~100 KB, smooth content plus detail so they compress like photos) are
generated once into a cache directory and written with the project's shard writer. Measures 1 and 2 workers,
and, for 2 workers, a float-normalising worker (ToTensor + Normalize in the worker) against the uint8 default.
With ``--cifar PATH_TO_TGZ`` also CIFAR-10 (32 px) from the shared JPEG copy. Goal: >= 600 img/s per core.
The ViT recipe's repeated augmentation (x3) is measured against the same rank without it.

The cheaper modes (issue: feed the GPUs), each against the CPU pipeline in the same run:

* ``data.decode=device``: the workers' CPU work per image (read the tar member, check it, draw its crop); the
  decode and crop then run on the rank's GPU. Also timed: that rank-side work on this CPU (what a GPU takes over).
* bounded-resolution shards (``make-shards --max-side N``): the same images stored at a longer side of N, decoded
  on the CPU. Goal for the cheapest mode: >= 800 img/s per core of CPU work for the CNN recipe.

    python bench/loader_throughput.py [--images 2000] [--cifar ../shared/data/cifar10-jpeg.tar.gz]
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from gpd_ds.data.device_decode import DeviceDecoder
from gpd_ds.data.loader import TrainLoader, resolve_shards
from gpd_ds.data.shards import INDEX_NAME, make_shards
from gpd_ds.data.transforms import Augment, train_transform


def _photo_like(rng: np.random.Generator, width: int = 500, height: int = 375) -> bytes:
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    detail = rng.normal(0, 10, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(smooth + detail, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def imagenet_like_shards(root: Path, images: int, max_side: int | None = None) -> Path:
    out = root / f"imagenet-like-{images}" if max_side is None else root / f"imagenet-like-{images}-max{max_side}"
    if (out / INDEX_NAME).is_file():
        return out
    if max_side is not None:
        imagenet_like_shards(root, images)  # the source tree
        make_shards(root / f"imagenet-like-src-{images}", out, "train", shard_size=max(1, images // 20),
                    progress=False, max_side=max_side)
        return out
    rng = np.random.default_rng(0)
    src = root / f"imagenet-like-src-{images}"
    for i in range(images):
        folder = src / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:06d}.JPEG").write_bytes(_photo_like(rng))
    make_shards(src, out, "train", shard_size=max(1, images // 20), progress=False)
    return out


def cifar_shards(root: Path, tgz: Path) -> Path:
    out = root / "cifar10"
    if (out / INDEX_NAME).is_file():
        return out
    with tarfile.open(tgz) as t:
        t.extractall(root / "cifar10-src", filter="data")
    make_shards(root / "cifar10-src" / "train", out, "train", shard_size=1000, progress=False)
    return out


class FloatInWorker:
    """The alternative to uint8 batches: normalise to float32 inside the worker."""

    def __init__(self, transform) -> None:
        self.transform = transform
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1) * 255

    def __call__(self, image):
        return (self.transform(image).float() - self.mean) / self.std


def measure(shards_dir: Path, size: int, workers: int, batch: int, float_in_worker: bool = False,
            augment: Augment | None = None, world: int = 1, repeats: int = 1, decode: str = "cpu") -> float:
    shards = resolve_shards(str(shards_dir), "train")
    transform = train_transform(size, augment or Augment())
    if float_in_worker:
        transform = FloatInWorker(transform)
    loader = TrainLoader(shards, batch_size=batch, rank=0, world_size=world, num_workers=workers,
                         transform=transform, shuffle_buffer=256, repeated_aug=repeats, decode=decode)
    start, n, first = time.perf_counter(), 0, None
    for b in loader:
        if first is None:  # exclude worker start-up and the first batch
            first, start = True, time.perf_counter()
            continue
        n += len(b.keys)
    return n / (time.perf_counter() - start)


def measure_rank_decode(shards_dir: Path, size: int, batch: int) -> float:
    """img/s of the rank's side of data.decode=device (decode, crop, flip, stack) on this CPU, one thread."""
    shards = resolve_shards(str(shards_dir), "train")
    transform = train_transform(size, Augment())
    loader = TrainLoader(shards, batch_size=batch, rank=0, world_size=1, num_workers=1, transform=transform,
                         shuffle_buffer=256, decode="device")
    decoder, seconds, n = DeviceDecoder(transform, "cpu"), 0.0, 0
    for b in loader:
        start = time.perf_counter()
        decoder(b.images, b.labels)
        seconds, n = seconds + time.perf_counter() - start, n + len(b.keys)
    return n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "gpd_ds_bench"))
    parser.add_argument("--cifar", default=None, help="path to cifar10-jpeg.tar.gz (optional)")
    parser.add_argument("--max-sides", type=int, nargs="*", default=[400, 320],
                        help="bounded-resolution shards to measure (make-shards --max-side)")
    parser.add_argument("--only-new", action="store_true", help="only the device-decode and bounded-shard rows "
                        "(with the CPU pipeline's row to compare)")
    args = parser.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    print(f"cpu cores {os.cpu_count()}, torch {torch.__version__}, PIL {Image.__version__}")
    imagenet = imagenet_like_shards(cache, args.images)
    sizes = [p.stat().st_size for p in list((cache / f"imagenet-like-src-{args.images}").rglob("*.JPEG"))[:200]]
    print(f"ImageNet-like JPEGs: 500x375, mean {np.mean(sizes) / 1024:.0f} KB")
    print(f"{'data':16}{'workers':>8}{'output':>10}{'img/s':>9}{'img/s/worker':>14}")
    if args.only_new:
        rate = measure(imagenet, 224, 2, args.batch)
        print(f"{'imagenet-like':16}{2:8d}{'uint8':>10}{rate:9.0f}{rate / 2:14.0f}   (CPU pipeline, the baseline)")
        new_modes(cache, imagenet, args)
        return
    for workers in (1, 2):
        rate = measure(imagenet, 224, workers, args.batch)
        print(f"{'imagenet-like':16}{workers:8d}{'uint8':>10}{rate:9.0f}{rate / workers:14.0f}")
    rate = measure(imagenet, 224, 2, args.batch, float_in_worker=True)
    print(f"{'imagenet-like':16}{2:8d}{'float32':>10}{rate:9.0f}{rate / 2:14.0f}")
    deit = Augment(auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic")
    rate = measure(imagenet, 224, 2, args.batch, augment=deit)
    print(f"{'+RandAugment':16}{2:8d}{'uint8':>10}{rate:9.0f}{rate / 2:14.0f}   (ViT recipe)")
    # repeated augmentation x3 on rank 0 of 3: it reads its 3 slots' tar members whole and decodes a third of each
    for repeats in (1, 3):
        rate = measure(imagenet, 224, 2, args.batch, augment=deit, world=3, repeats=repeats)
        print(f"{'+RA x' + str(repeats) + ' (0 of 3)':16}{2:8d}{'uint8':>10}{rate:9.0f}{rate / 2:14.0f}   (ViT recipe, "
              "rank 0 of 3)")
    new_modes(cache, imagenet, args)
    if args.cifar:
        cifar = cifar_shards(cache, Path(args.cifar))
        for workers in (1, 2):
            rate = measure(cifar, 32, workers, 256)
            print(f"{'cifar10 32px':16}{workers:8d}{'uint8':>10}{rate:9.0f}{rate / workers:14.0f}")


def new_modes(cache: Path, imagenet: Path, args: argparse.Namespace) -> None:
    """data.decode=device (the workers' share) and bounded-resolution shards, CNN and ViT recipes."""
    for workers in (1, 2):
        rate = measure(imagenet, 224, workers, args.batch, decode="device")
        print(f"{'imagenet-like':16}{workers:8d}{'files':>10}{rate:9.0f}{rate / workers:14.0f}   (data.decode=device: "
              "the workers' share)")
    rate = measure_rank_decode(imagenet, 224, args.batch)
    print(f"{'imagenet-like':16}{'rank':>8}{'uint8':>10}{rate:9.0f}{rate:14.0f}   (data.decode=device: the rank's "
          "decode + crop, here on 1 CPU thread)")
    deit = Augment(auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic")
    for side in args.max_sides:
        bounded = imagenet_like_shards(cache, args.images, max_side=side)
        mean_kb = np.mean(_member_sizes(bounded)) / 1024
        rate = measure(bounded, 224, 2, args.batch)
        print(f"{f'max-side {side}':16}{2:8d}{'uint8':>10}{rate:9.0f}{rate / 2:14.0f}   (CNN recipe; "
              f"{mean_kb:.0f} KB per image)")
        rate = measure(bounded, 224, 2, args.batch, augment=deit)
        print(f"{f'max-side {side}':16}{2:8d}{'uint8':>10}{rate:9.0f}{rate / 2:14.0f}   (+RandAugment, ViT recipe)")


def _member_sizes(shards_dir: Path) -> list[int]:
    sizes = []
    for shard in sorted(shards_dir.glob("*.tar"))[:2]:
        with tarfile.open(shard) as t:
            sizes += [m.size for m in t if m.name.endswith(".jpg")]
    return sizes


if __name__ == "__main__":
    main()
