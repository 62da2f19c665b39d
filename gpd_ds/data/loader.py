"""Streaming train and eval loaders over WebDataset shards.

Train (``TrainLoader``), decisions and why:

* **Split, not resample.** Every epoch the shard list is shuffled with ``(seed, epoch)`` and shard ``j`` goes to
  exactly one slot ``j % (ranks * workers)`` (slot = ``rank * workers + worker``): each sample is read once per
  epoch, where resampling would miss ~37% of the shards in a nominal epoch. There must be at least
  ``ranks * workers`` shards (checked at start, instead of idle workers hanging a collective).
* **The same number of batches on every rank**, every epoch: each worker makes ``floor(m / batch_size)`` batches,
  where ``m`` is the fewest samples any slot can get (the sum of the ``floor(shards / slots)`` smallest shards),
  and the DataLoader interleaves workers round-robin (worker ``w`` makes batches ``w, w + W, ...``). So no worker
  runs out within a pass (no sample repeats in an epoch) and no rank waits forever in a collective at the end of
  an epoch. The price: a slot's samples beyond its quota are left for that epoch (shard shuffling changes which);
  with a shard count that is a multiple of ``ranks * workers`` and equal shards this is under one batch per worker.
  A worker only starts a second pass over its shards if bad samples leave it short.
* **Deterministic and resumable.** The sample order depends only on (seed, epoch, rank, worker); augmentation is
  seeded per sample (``seed, epoch, rank, worker, position``). Each batch carries its worker's stream position,
  so :meth:`TrainLoader.state_dict` knows exactly where every worker stopped; a resumed loader skips that many
  samples per worker without decoding them and continues with the same batches an uninterrupted run would see.
* **Bad data does not stop a run**: an undecodable sample (truncated JPEG, zero-byte member, missing image or
  label) is skipped, counted and logged with its shard and key; a truncated shard is read up to the damage with
  a warning; above ``max_bad_fraction`` of the samples a worker aborts with a clear error. There is no sleeping.
* Workers emit uint8 batches; normalisation, random erasing and mixup run on the device
  (:mod:`gpd_ds.data.transforms`).

Eval (``eval_loader``): shards in a fixed order, shard ``j`` to slot ``j % (ranks * workers)``, every sample read
exactly once, last batch partial; ranks may get different batch counts, so evaluation sums its counts locally and
reduces once at the end.
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import braceexpand
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image

from gpd_ds.data.shards import INDEX_NAME
from gpd_ds.errors import UserInputError
from gpd_ds.preemption import ignore_stop_signals

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_REMOTE = ("http://", "https://", "s3://", "gs://", "ais://", "hf://", "sftp://", "scp://", "ftps://")


class DataError(UserInputError, RuntimeError):
    """The data cannot be used as configured (names the input and the fix)."""


class BadSample(Exception):
    """One sample that cannot be decoded."""


@dataclass(frozen=True)
class ShardList:
    """Shard URLs of one split with their sample counts (from the index) and the class names."""

    urls: tuple[str, ...]
    lengths: tuple[int, ...]
    classes: tuple[str, ...]

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)


class Batch(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W) uint8
    labels: torch.Tensor  # (B,) int64
    keys: list[str]
    worker: int  # the (logical) worker that made it
    position: int  # that worker's stream position after this batch (samples emitted, good or bad)
    bad_samples: int  # that worker's bad samples so far this epoch


def _is_remote(url: str) -> bool:
    return url.startswith(_REMOTE)


def _read_text(url: str) -> str:
    with wds.gopen(url, "rb") as f:
        return f.read().decode()


def _dirname(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _load_index(root: str) -> dict:
    url = f"{root.rstrip('/')}/{INDEX_NAME}"
    if not _is_remote(url) and not Path(url).is_file():
        raise DataError(f"no dataset index at {url!r}; write shards with `gpd-ds make-shards` (it writes "
                        f"{INDEX_NAME} with the sample counts the loader needs)")
    return json.loads(_read_text(url))


def resolve_shards(spec: str, split: str | None = None, *, allow_pipe: bool = False) -> ShardList:
    """Shards of one split from:

    * a dataset root (directory or URL) holding ``_info.json`` plus ``split``;
    * a brace pattern (``/data/in1k-train-{000000..001281}.tar``), a single ``.tar``, or ``@list.txt`` (one URL
      per line); their counts come from the ``_info.json`` beside the first shard.

    ``pipe:`` URLs run shell commands and are refused unless ``allow_pipe``.
    """
    spec = spec.strip()
    if spec.startswith("@"):
        list_file = Path(spec[1:])
        if not list_file.is_file():
            raise DataError(f"shard list file {str(list_file)!r} does not exist")
        urls = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    elif spec.endswith(".tar") or "{" in spec:
        urls = list(braceexpand.braceexpand(spec))
    else:
        index = _load_index(spec)
        splits = index.get("splits", {})
        if split not in splits:
            raise DataError(f"split {split!r} is not in {spec.rstrip('/')}/{INDEX_NAME}; it has {sorted(splits)}")
        root = spec.rstrip("/")
        urls = [f"{root}/{name}" for name in splits[split]["filenames"]]
    if not urls:
        raise DataError(f"shard spec {spec!r} names no shards")
    piped = [u for u in urls if u.startswith("pipe:")]
    if piped and not allow_pipe:
        raise DataError(f"shard URL {piped[0]!r} runs a shell command; pass allow_pipe=True (--allow-pipe) if you "
                        "trust it")
    missing = [u for u in urls if not _is_remote(u) and not u.startswith("pipe:") and not Path(u).is_file()]
    if missing:
        raise DataError(f"shard spec {spec!r} matches nothing at {missing[0]!r} ({len(missing)} of {len(urls)} "
                        "missing)")
    index = _load_index(_dirname(urls[0]) if not urls[0].startswith("pipe:") else spec)
    length_of = {}
    for entry in index.get("splits", {}).values():
        length_of.update(zip(entry["filenames"], entry["shard_lengths"], strict=True))
    unknown = [u for u in urls if u.rsplit("/", 1)[-1] not in length_of]
    if unknown:
        raise DataError(f"shard {unknown[0]!r} is not listed in the index beside it; its sample count is unknown")
    return ShardList(tuple(urls), tuple(length_of[u.rsplit("/", 1)[-1]] for u in urls), tuple(index["classes"]))


def iter_shard(url: str) -> Iterator[dict]:
    """Samples (dicts of member bytes keyed by extension, plus ``__key__`` and ``__url__``) of one shard.

    A truncated or damaged shard yields what it can and then stops with a warning."""
    count = 0
    try:
        with wds.gopen(url, "rb") as stream:
            files = ({**f, "__url__": url} for f in wds.tariterators.tar_file_iterator(stream))
            for sample in wds.tariterators.group_by_keys(files):
                count += 1
                yield sample
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        log.warning("shard %s is damaged after %d samples (%s: %s); skipping the rest of it", url, count,
                    type(e).__name__, e)


def decode(sample: dict, num_classes: int) -> tuple[torch.Tensor, int]:
    """(3, H, W) uint8 RGB image and label of one sample; raises :class:`BadSample` with the reason.

    torchvision (libjpeg-turbo) reads by content, so a PNG named .jpg is fine, and converts grayscale and CMYK
    to RGB; a truncated JPEG raises."""
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None:
        found = sorted(k for k in sample if not k.startswith("__"))
        raise BadSample(f"no image member (found {found})")
    if "cls" not in sample:
        raise BadSample("no .cls label member")
    try:
        label = int(sample["cls"])
    except ValueError as e:
        raise BadSample(f"label {sample['cls'][:20]!r} is not an integer") from e
    if not 0 <= label < num_classes:
        raise BadSample(f"label {label} outside [0, {num_classes})")
    data = sample[image_key]
    if not data:
        raise BadSample(f"zero-byte .{image_key}")
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB), label
    except (RuntimeError, ValueError) as e:
        raise BadSample(f"cannot decode .{image_key}: {str(e).splitlines()[0][:200]}") from e


def _seed_everything(seed: int) -> None:
    """Seed the RNGs torchvision and timm transforms draw from (torch CPU, random, numpy).

    Only the CPU generator: ``torch.manual_seed`` also queues lazy CUDA/XPU/MTIA seeding, formatting a stack
    trace each call (~1 ms per sample)."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _mix(*values: int) -> int:
    """A stable 63-bit seed from integers (not Python's salted hash)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class _BadCounter:
    def __init__(self, max_fraction: float, min_samples: int, where: str) -> None:
        self.bad = self.seen = 0
        self.max_fraction, self.min_samples, self.where = max_fraction, min_samples, where

    def good(self) -> None:
        self.seen += 1

    def record(self, sample: dict, reason: BadSample) -> None:
        self.seen += 1
        self.bad += 1
        log.warning("skipping bad sample %r in %s: %s", sample.get("__key__"), sample.get("__url__"), reason)
        if self.seen >= self.min_samples and self.bad > self.max_fraction * self.seen:
            raise DataError(
                f"{self.bad} of {self.seen} samples read by {self.where} were bad (> max_bad_fraction "
                f"{self.max_fraction}); check the shards (see the warnings above) or raise max_bad_fraction")


def _stack(images: list[torch.Tensor], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TrainShards(IterableDataset):
    """The per-worker train stream (see the module docstring). Use :class:`TrainLoader`."""

    def __init__(self, shards: ShardList, *, batch_size: int, rank: int, world_size: int, num_workers: int,
                 seed: int, transform: Callable, shuffle_buffer: int, max_bad_fraction: float,
                 min_samples_for_rate: int) -> None:
        self.shards, self.batch_size, self.rank, self.world_size = shards, batch_size, rank, world_size
        self.workers = max(1, num_workers)
        self.seed, self.transform, self.shuffle_buffer = seed, transform, shuffle_buffer
        self.max_bad_fraction, self.min_samples_for_rate = max_bad_fraction, min_samples_for_rate
        self.epoch, self.start_batch = 0, 0
        self.start_positions, self.start_bad = [0] * self.workers, [0] * self.workers

    @property
    def batches_per_epoch(self) -> int:
        """Per rank: every worker makes ``floor(smallest possible share / batch)`` batches, where a slot's share
        is at least its ``floor(shards / slots)`` shards; so no worker ever runs out within one pass."""
        per_slot = len(self.shards.urls) // (self.world_size * self.workers)
        smallest_share = sum(sorted(self.shards.lengths)[:per_slot])
        return self.workers * (smallest_share // self.batch_size)

    def _own_shards(self, worker: int) -> list[str]:
        order = list(self.shards.urls)
        random.Random(_mix(self.seed, self.epoch)).shuffle(order)
        slot, slots = self.rank * self.workers + worker, self.world_size * self.workers
        return order[slot::slots]

    def _emissions(self, worker: int) -> Iterator[dict]:
        """Raw samples of this worker's shards through the shuffle buffer, pass after pass.

        The buffer is flushed at the end of each pass, so a pass emits each of its samples exactly once; a
        second pass only happens when the worker's quota needs more samples than its shards hold."""
        own = self._own_shards(worker)
        rng = random.Random(_mix(self.seed, self.epoch, self.rank, worker, 1))
        for passes in range(1000):
            buffer: list[dict] = []
            for url in own:
                for sample in iter_shard(url):
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(sample)
                        continue
                    j = rng.randrange(len(buffer))
                    buffer[j], sample = sample, buffer[j]
                    yield sample
            if not buffer and passes == 0:
                raise DataError(f"rank {self.rank} worker {worker}: no readable samples in its shards {own[:3]}")
            rng.shuffle(buffer)
            yield from buffer
            rng.shuffle(own)
        raise DataError(f"rank {self.rank} worker {worker} read its shards 1000 times without filling its quota")

    def __iter__(self) -> Iterator[Batch]:
        physical, num_workers = _worker()
        if num_workers != self.workers:
            raise DataError(f"TrainShards was built for {self.workers} workers but runs in {num_workers}")
        # Batch b of the epoch comes from logical worker b % W. The DataLoader always asks physical worker 0
        # first, so after resuming at batch k physical worker p plays logical worker (p + k) % W.
        worker = (physical + self.start_batch) % self.workers
        quota = self.batches_per_epoch // self.workers
        done = max(0, (self.start_batch - worker + self.workers - 1) // self.workers)
        if done >= quota:
            return
        start = self.start_positions[worker]
        counter = _BadCounter(self.max_bad_fraction, self.min_samples_for_rate, f"rank {self.rank} worker {worker}")
        counter.bad = self.start_bad[worker]
        base = _mix(self.seed, self.epoch, self.rank, worker, 2)
        num_classes = len(self.shards.classes)
        images, labels, keys = [], [], []
        for position, sample in enumerate(self._emissions(worker)):
            if position < start:
                continue
            try:
                image, label = decode(sample, num_classes)
            except BadSample as e:
                counter.record(sample, e)
                continue
            counter.good()
            _seed_everything(base + position)
            images.append(self.transform(image))
            labels.append(label)
            keys.append(sample["__key__"])
            if len(images) == self.batch_size:
                yield Batch(*_stack(images, labels), keys, worker, position + 1, counter.bad)
                images, labels, keys = [], [], []
                done += 1
                if done >= quota:
                    return


class TrainLoader:
    """Epoch-aware, resumable train loader: ``set_epoch(e)`` then iterate ``len(loader)`` batches."""

    def __init__(self, shards: ShardList, *, batch_size: int, rank: int, world_size: int, transform: Callable,
                 num_workers: int = 4, seed: int = 0, shuffle_buffer: int = 1000, max_bad_fraction: float = 0.01,
                 min_samples_for_rate: int = 200, pin_memory: bool = False, prefetch_factor: int = 2) -> None:
        slots = world_size * max(1, num_workers)
        if len(shards.urls) < slots:
            raise DataError(f"{len(shards.urls)} shards cannot feed {world_size} ranks x {max(1, num_workers)} "
                            f"workers = {slots} readers; write smaller shards (--shard-size) or use fewer workers")
        if batch_size < 1:
            raise DataError(f"batch_size {batch_size} must be >= 1")
        self.dataset = TrainShards(shards, batch_size=batch_size, rank=rank, world_size=world_size,
                                   num_workers=num_workers, seed=seed, transform=transform,
                                   shuffle_buffer=shuffle_buffer, max_bad_fraction=max_bad_fraction,
                                   min_samples_for_rate=min_samples_for_rate)
        if self.dataset.batches_per_epoch == 0:
            raise DataError(f"{len(shards.urls)} shards of {min(shards.lengths)}+ samples make no full batch of "
                            f"{batch_size} per worker for {slots} readers; lower the batch size or the workers")
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self.epoch, self.batch, self.positions, self.bad = 0, 0, [0] * max(1, num_workers), [0] * max(1, num_workers)

    def __len__(self) -> int:
        return self.dataset.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` (from its beginning, unless :meth:`load_state_dict` put it mid-way)."""
        if epoch != self.epoch:
            self.epoch, self.batch = epoch, 0
            self.positions = [0] * len(self.positions)
            self.bad = [0] * len(self.bad)

    def __iter__(self) -> Iterator[Batch]:
        ds = self.dataset
        ds.epoch, ds.start_batch = self.epoch, self.batch
        ds.start_positions, ds.start_bad = list(self.positions), list(self.bad)
        if self.batch >= len(self):
            return
        loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            worker_init_fn=ignore_stop_signals)
        for batch in loader:
            self.positions[batch.worker] = batch.position
            self.bad[batch.worker] = batch.bad_samples
            self.batch += 1
            yield batch

    @property
    def bad_samples(self) -> int:
        return sum(self.bad)

    def state_dict(self) -> dict:
        """Where this rank's data stream stands (save it with the checkpoint)."""
        ds = self.dataset
        return {"epoch": self.epoch, "batch": self.batch, "positions": list(self.positions), "bad": list(self.bad),
                "topology": [ds.world_size, ds.workers, ds.batch_size, ds.seed, ds.shards.num_samples]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position. With the same ranks, workers, batch size, seed and data it is exact;
        otherwise the epoch resumes after the same number of batches (approximately the same samples)."""
        ds = self.dataset
        self.epoch, self.batch = state["epoch"], state["batch"]
        if state["topology"] == [ds.world_size, ds.workers, ds.batch_size, ds.seed, ds.shards.num_samples]:
            self.positions, self.bad = list(state["positions"]), list(state["bad"])
            return
        log.warning("data topology changed since the checkpoint (%s -> %s); resuming epoch %d after batch %d "
                    "approximately", state["topology"], [ds.world_size, ds.workers, ds.batch_size, ds.seed,
                                                         ds.shards.num_samples], self.epoch, self.batch)
        self.positions = [((self.batch - w + ds.workers - 1) // ds.workers) * ds.batch_size
                          for w in range(ds.workers)]
        self.bad = [0] * ds.workers


class EvalShards(IterableDataset):
    """Every sample of the split exactly once across ranks and workers; last batch partial."""

    def __init__(self, shards: ShardList, *, batch_size: int, rank: int, world_size: int, transform: Callable,
                 max_bad_fraction: float, min_samples_for_rate: int) -> None:
        self.shards, self.batch_size, self.rank, self.world_size = shards, batch_size, rank, world_size
        self.transform, self.max_bad_fraction, self.min_samples_for_rate = (transform, max_bad_fraction,
                                                                            min_samples_for_rate)

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        slot, slots = self.rank * workers + worker, self.world_size * workers
        counter = _BadCounter(self.max_bad_fraction, self.min_samples_for_rate, f"eval rank {self.rank}")
        images, labels, keys, position = [], [], [], 0
        for url in self.shards.urls[slot::slots]:
            for sample in iter_shard(url):
                position += 1
                try:
                    image, label = decode(sample, len(self.shards.classes))
                except BadSample as e:
                    counter.record(sample, e)
                    continue
                counter.good()
                images.append(self.transform(image))
                labels.append(label)
                keys.append(sample["__key__"])
                if len(images) == self.batch_size:
                    yield Batch(*_stack(images, labels), keys, worker, position, counter.bad)
                    images, labels, keys = [], [], []
        if images:
            yield Batch(*_stack(images, labels), keys, worker, position, counter.bad)


def eval_loader(shards: ShardList, *, batch_size: int, rank: int, world_size: int, transform: Callable,
                num_workers: int = 4, max_bad_fraction: float = 0.01, min_samples_for_rate: int = 200,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``shards`` that reads every sample exactly once across ranks and workers."""
    dataset = EvalShards(shards, batch_size=batch_size, rank=rank, world_size=world_size, transform=transform,
                         max_bad_fraction=max_bad_fraction, min_samples_for_rate=min_samples_for_rate)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      worker_init_fn=ignore_stop_signals)
