"""Feeding the device: images/s of normalised batches landing on the device, CPU vs device decoding, and a summary
of training runs (img/s, and the losses of a compiled run against an eager one).

    python bench/feed_throughput.py write DIR --images 4096          # ImageNet-like JPEG shards, train + val
    python bench/feed_throughput.py teacher resnet34 FILE.safetensors  # a random static teacher (timing only)
    python bench/feed_throughput.py loader DIR --device cuda --workers 4 8
    python bench/feed_throughput.py pixels DIR --device cuda           # device-decoded crops vs the CPU pipeline's
    python bench/feed_throughput.py runs RUN_DIR [RUN_DIR ...] [--compare EAGER COMPILED]

``loader``: for each ``data.decode`` (cpu: workers decode and crop; device: workers read and draw, the device
decodes and crops) and worker count, the CNN recipe's loader plus ``DeviceTransform`` (normalise, channels_last)
on the device, timed from the second batch to the last with the device synchronised: the rate a training step
could be fed at. ``runs``: each run's median ``train/images_per_s`` after the first logs, and with ``--compare``
the largest relative difference of ``train/loss`` between two runs step by step (the compiled-vs-eager check of
``gpd_ds/train/compile_policy.py``: verified when it is within ``--rtol`` over all steps and the compiled run is
faster). ``bench/gpu_feed.sh`` runs all three on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loader_throughput import imagenet_like_shards

from gpd_ds.config import Augment
from gpd_ds.data.device_decode import DeviceDecoder
from gpd_ds.data.loader import TrainLoader, resolve_shards
from gpd_ds.data.shards import make_shards
from gpd_ds.data.transforms import DeviceTransform, train_transform


def write(out: Path, images: int) -> Path:
    """``out`` with a train split of ``images`` ImageNet-like JPEGs (500x375) and a val split of an eighth."""
    cache = out / "cache"
    train_src = imagenet_like_shards(cache, images).parent / f"imagenet-like-src-{images}"
    val_src = imagenet_like_shards(cache, max(64, images // 8)).parent / f"imagenet-like-src-{max(64, images // 8)}"
    data = out / "shards"
    if not (data / "_info.json").is_file() or "val" not in json.loads((data / "_info.json").read_text())["splits"]:
        shard = max(1, images // 64)
        make_shards(train_src, data, "train", shard_size=shard, progress=False)
        make_shards(val_src, data, "val", shard_size=shard, progress=False)
    return data


def loader_rate(data: Path, device: torch.device, decode: str, workers: int, batch: int, size: int,
                max_batches: int) -> float:
    shards = resolve_shards(str(data), "train")
    transform = train_transform(size, Augment())
    loader = TrainLoader(shards, batch_size=batch, rank=0, world_size=1, num_workers=workers, transform=transform,
                         pin_memory=device.type == "cuda", decode=decode, shuffle_buffer=256)
    decoder = DeviceDecoder(transform, device) if decode == "device" else None
    to_device = DeviceTransform(len(shards.classes), device, decoder=decoder)
    start, n = None, 0
    for i, batch_ in enumerate(loader):
        x, _ = to_device(batch_.images, batch_.labels)
        if start is None:  # after worker start-up and the first batch
            _sync(device)
            start = time.perf_counter()
            continue
        n += x.shape[0]
        if i >= max_batches:
            break
    _sync(device)
    return n / (time.perf_counter() - start)


def pixel_difference(data: Path, device: torch.device, batches: int, size: int) -> str:
    """How far the device path's uint8 crops are from the CPU pipeline's for the same samples and draws."""
    shards = resolve_shards(str(data), "train")
    transform = train_transform(size, Augment(color_jitter=0.4))
    args = {"batch_size": 32, "rank": 0, "world_size": 1, "num_workers": 2, "transform": transform, "seed": 0}
    on_cpu, on_device = TrainLoader(shards, **args), TrainLoader(shards, **args, decode="device")
    decoder = DeviceDecoder(transform, device)
    diffs = []
    for i, (a, b) in enumerate(zip(on_cpu, on_device, strict=False)):
        images, _ = decoder(b.images, b.labels)
        diffs.append((images.cpu().int() - a.images.int()).abs().flatten())
        if i + 1 == batches:
            break
    d = torch.cat(diffs)
    return (f"{d.numel():,} pixel values of {len(diffs) * 32} crops at {size} px: max |difference| {int(d.max())}, "
            f"mean {d.float().mean():.3f} levels, {100 * (d > 0).float().mean():.2f}% differ, "
            f"{100 * (d > 2).float().mean():.3f}% by more than 2")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_summary(run: Path, skip: int) -> tuple[float, list[tuple[int, float]]]:
    """(median img/s after ``skip`` logs, [(step, loss)]); (nan, []) for a run that wrote no metrics (see its log)."""
    metrics = run / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    rates = [r["train/images_per_s"] for r in rows if "train/images_per_s" in r][skip:]
    losses = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    return (statistics.median(rates) if rates else float("nan")), losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("write")
    p.add_argument("out", type=Path)
    p.add_argument("--images", type=int, default=4096)
    p = sub.add_parser("teacher")
    p.add_argument("name")
    p.add_argument("out", type=Path)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--image-size", type=int, default=224, help="a ViT's input size (its position embedding)")
    p = sub.add_parser("loader")
    p.add_argument("data", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--workers", type=int, nargs="+", default=[4, 8])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batches", type=int, default=15, help="batches timed (after the first)")
    p = sub.add_parser("pixels")
    p.add_argument("data", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p = sub.add_parser("runs")
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--skip", type=int, default=1, help="first logged rates left out (start-up, compile)")
    p.add_argument("--compare", type=Path, nargs=2, metavar=("EAGER", "COMPILED"))
    p.add_argument("--rtol", type=float, default=0.02)
    args = parser.parse_args()

    if args.cmd == "write":
        print(write(args.out, args.images))
    elif args.cmd == "teacher":
        from safetensors.torch import save_file

        from gpd_ds.models import create_model

        torch.manual_seed(0)
        try:
            model = create_model(args.name, num_classes=args.num_classes, img_size=args.image_size)
        except TypeError:  # not a ViT: no input size in its constructor
            model = create_model(args.name, num_classes=args.num_classes)
        save_file(model.state_dict(), str(args.out))
    elif args.cmd == "pixels":
        print(pixel_difference(args.data, torch.device(args.device), args.batches, args.image_size))
    elif args.cmd == "loader":
        device = torch.device(args.device)
        print(f"cpu cores {os.cpu_count()}, device {device}, torch {torch.__version__}")
        print(f"{'decode':8}{'workers':>8}{'img/s':>9}{'img/s per worker':>18}")
        for decode in ("cpu", "device"):
            for workers in args.workers:
                rate = loader_rate(args.data, device, decode, workers, args.batch, args.image_size, args.batches)
                print(f"{decode:8}{workers:8d}{rate:9.0f}{rate / workers:18.0f}", flush=True)
    else:
        summaries = {run: run_summary(run, args.skip) for run in args.runs}
        for run, (rate, losses) in summaries.items():
            print(f"{run.name:28} {rate:9.0f} img/s  {len(losses)} logged steps")
        if args.compare:
            (eager_rate, eager), (compiled_rate, compiled) = (run_summary(r, args.skip) for r in args.compare)
            steps = min(len(eager), len(compiled))
            worst = max((abs(a[1] - b[1]) / max(abs(a[1]), 1e-12) for a, b in zip(eager, compiled, strict=False)),
                        default=float("nan"))
            verified = steps > 0 and worst <= args.rtol and compiled_rate > eager_rate
            print(f"compiled / eager: {compiled_rate / eager_rate:.3f}x img/s (nan: a run failed, see its log); "
                  f"largest relative loss difference over {steps} steps {worst:.2e} (tolerance {args.rtol}): "
                  f"{'verified' if verified else 'NOT verified'}")


if __name__ == "__main__":
    main()
