"""In-memory train loader for small datasets (CIFAR-size): decode the split once, then augment from RAM.

For a dataset of tens of thousands of thumbnails, JPEG decoding costs as much CPU as a small model's step, every
epoch. :class:`MemoryTrainLoader` reads the same shards as :class:`~gpd_ds.data.loader.TrainLoader` once at start
(every rank decodes the whole split, in parallel across ``workers`` processes), keeps the uint8 images, and then
draws batches from a per-epoch permutation. It has the streaming loader's interface and guarantees:

* every rank gets ``floor(N / ranks / batch)`` batches an epoch (rank ``r`` takes every ``ranks``-th sample of
  the epoch's permutation; the tail is dropped);
* the order depends only on (seed, epoch) and augmentation is seeded per batch (seed, epoch, rank, batch), so a
  run is deterministic and a resumed run continues with exactly the batches an uninterrupted one would see;
* undecodable samples are skipped and counted at load, under the same rule as the streaming loader
  (:class:`~gpd_ds.data.loader.BadRate`): loaded + bad = the index's count.

Turn it on with ``data.in_memory=true``; it refuses a split whose decoded size exceeds ``data.in_memory_max_gb``.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gpd_ds.data.decode import BadRate, BadSample, DataError, decode, seed_everything
from gpd_ds.data.loader import Batch, ShardList, _mix, _stack, iter_shard
from gpd_ds.data.shards import MAX_IMAGE_PIXELS
from gpd_ds.preemption import ignore_stop_signals
from gpd_ds.progress import Progress

log = logging.getLogger(__name__)


def _decode_shard(url: str, length: int, num_classes: int, max_pixels: int
                  ) -> tuple[list[np.ndarray], list[int], list[tuple[str, str]]]:
    """Runs in a pool process. Returns numpy arrays: torch would pass each tensor back through a shared-memory
    file descriptor, and tens of thousands of them exhaust the descriptor limit."""
    images, labels, bad = [], [], []
    for sample in iter_shard(url, length):
        try:
            image, label = decode(sample, num_classes, max_pixels)
        except BadSample as e:
            bad.append((sample.get("__key__", "?"), str(e)))
            continue
        images.append(image.numpy())
        labels.append(label)
    return images, labels, bad


def load_split(shards: ShardList, *, workers: int, max_gb: float, max_bad_fraction: float,
               max_pixels: int = MAX_IMAGE_PIXELS, show_progress: bool = False
               ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Decode every sample of ``shards``: (images as (3, H, W) uint8 tensors, labels)."""
    images: list[torch.Tensor] = []
    labels: list[int] = []
    counter = BadRate(max_bad_fraction, "the in-memory loader")
    n = len(shards.urls)
    with (Progress(shards.num_samples, "decoding into memory", unit="img", enabled=show_progress) as bar,
          ProcessPoolExecutor(max(1, workers), initializer=ignore_stop_signals) as pool):
        decoded = pool.map(_decode_shard, shards.urls, shards.lengths, [len(shards.classes)] * n, [max_pixels] * n)
        for url, (imgs, labs, bad) in zip(shards.urls, decoded, strict=True):
            counter.seen += len(imgs)  # the shard's good samples count before its bad ones are judged
            for key, reason in bad:
                counter.record({"__key__": key, "__url__": url}, BadSample(reason))
            if imgs and not images:  # the first shard tells the size: refuse before filling the RAM
                need = sum(i.size for i in imgs) / len(imgs) * shards.num_samples / 2**30
                if need > max_gb:
                    raise DataError(f"decoding the split into memory needs about {need:.1f} GiB per rank, over "
                                    f"data.in_memory_max_gb={max_gb}; set data.in_memory=false to stream it")
            images += [torch.from_numpy(i) for i in imgs]
            labels += labs
            bar.update(len(imgs) + len(bad))
    counter.check(final=True)
    return images, torch.tensor(labels, dtype=torch.int64)


class _EpochBatches(Dataset):
    """Batch ``b`` of one rank in one epoch: indices from the epoch permutation, augmentation seeded per batch."""

    def __init__(self, loader: MemoryTrainLoader, order: list[int]) -> None:
        self.loader, self.order = loader, order

    def __len__(self) -> int:
        return len(self.loader)

    def __getitem__(self, b: int) -> Batch:
        ld = self.loader
        idx = self.order[b * ld.batch_size:(b + 1) * ld.batch_size]
        seed_everything(_mix(ld.seed, ld.epoch, ld.rank, b, 3))
        images, labels = _stack([ld.transform(ld.images[i]) for i in idx], ld.labels[idx].tolist())
        return Batch(images, labels, [str(i) for i in idx], 0, b + 1, ld.bad_samples)


class MemoryTrainLoader:
    """Same interface as :class:`~gpd_ds.data.loader.TrainLoader`: ``set_epoch(e)`` then iterate ``len`` batches."""

    def __init__(self, shards: ShardList, *, batch_size: int, rank: int, world_size: int, transform: Callable,
                 num_workers: int = 2, seed: int = 0, max_bad_fraction: float = 0.01, max_gb: float = 8.0,
                 max_pixels: int = MAX_IMAGE_PIXELS, show_progress: bool = False) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size {batch_size} must be >= 1")
        self.images, self.labels = load_split(shards, workers=num_workers, max_gb=max_gb,
                                              max_bad_fraction=max_bad_fraction, max_pixels=max_pixels,
                                              show_progress=show_progress)
        self.bad_samples = shards.num_samples - len(self.images)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.transform, self.num_workers, self.seed = transform, num_workers, seed
        self.epoch, self.batch = 0, 0
        self.rest: dict | None = None  # after an elastic resume: the epoch's unread samples ({first_batch, order})
        if len(self) == 0:
            raise DataError(f"{len(self.images)} samples make no full batch of {batch_size} on each of "
                            f"{world_size} ranks; lower optim.global_batch_size")

    def __len__(self) -> int:
        return len(self.images) // self.world_size // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batch, self.rest = epoch, 0, None

    def _permutation(self) -> list[int]:
        order = list(range(len(self.images)))
        random.Random(_mix(self.seed, self.epoch)).shuffle(order)
        return order

    def _order(self) -> list[int]:
        """This rank's samples of the epoch, batch after batch (before an elastic resume's first batch: unused)."""
        if self.rest is None:
            return self._permutation()[self.rank::self.world_size][:len(self) * self.batch_size]
        first, need = self.rest["first_batch"], (len(self) - self.rest["first_batch"]) * self.batch_size
        mine = self.rest["order"][self.rank::self.world_size]
        if len(mine) < need:
            log.warning("rank %d: the rest of epoch %d holds %d unread samples for this rank's %d; %d are read again",
                        self.rank, self.epoch, len(mine), need, need - len(mine))
            mine = list(itertools.islice(itertools.cycle(mine), need))
        return [-1] * (first * self.batch_size) + mine[:need]

    def __iter__(self) -> Iterator[Batch]:
        if self.batch >= len(self):
            return
        batches = _EpochBatches(self, self._order())
        loader = DataLoader(batches, batch_size=None, sampler=range(self.batch, len(self)),
                            num_workers=self.num_workers, prefetch_factor=4 if self.num_workers else None,
                            worker_init_fn=ignore_stop_signals)
        for batch in loader:
            self.batch += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "rest": self.rest,
                "topology": [self.world_size, self.batch_size, self.seed, len(self.images)]}

    def resume_elastic(self, states: list[dict]) -> None:
        """Continue the epoch every old rank's ``states`` describe under this (other) number of ranks: the samples
        of the epoch's permutation that no old rank read are dealt to the new ranks, so across the change each is
        read at most once and every rank makes the same number of batches. Exact when seed, data and epoch agree;
        otherwise approximate, as :meth:`load_state_dict`."""
        first = states[0]
        old_world, old_batch = first["topology"][:2]
        if (first["topology"][2:] != [self.seed, len(self.images)] or len(states) != old_world
                or any(s["epoch"] != first["epoch"] or s["batch"] != first["batch"] or s.get("rest") for s in states)):
            self.load_state_dict(first)
            return
        self.epoch, self.batch = first["epoch"], first["batch"]
        order = self._permutation()
        read = {i for r in range(old_world) for i in order[r::old_world][:self.batch * old_batch]}
        self.rest = {"first_batch": self.batch, "order": [i for i in order if i not in read]}
        log.info("epoch %d continues after batch %d with the %d samples %d old ranks did not read, dealt to %d ranks",
                 self.epoch, self.batch, len(self.rest["order"]), old_world, self.world_size)

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position: exact with the same ranks, batch size, seed and data; otherwise the
        epoch resumes after the same number of batches (with this topology's permutation)."""
        self.epoch, self.batch = state["epoch"], state["batch"]
        topology = [self.world_size, self.batch_size, self.seed, len(self.images)]
        self.rest = state.get("rest") if state.get("topology") == topology else None
        if state.get("topology") != topology:
            log.warning("data topology changed since the checkpoint (%s -> %s); resuming epoch %d after batch %d "
                        "approximately", state.get("topology"), topology, self.epoch, self.batch)
