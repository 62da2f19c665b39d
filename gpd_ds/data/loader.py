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
* **Bad data does not stop a run, and nothing goes uncounted**: an undecodable sample (truncated JPEG, zero-byte
  member, missing image or label, a repeated member, an image over ``data.max_image_pixels`` judged from its
  header) is skipped, counted and logged with its shard and key; a damaged shard (truncated, zero bytes) is read
  up to the damage and its missing samples count as bad. Every shard read yields exactly its index count
  (read + bad = expected); an intact shard holding a different count is an error naming it (the index is wrong).
  One rule judges the rate for every loader (:class:`BadRate`): more than ``max_bad_fraction`` bad stops the
  run, checked on each bad sample once ``BAD_RATE_MIN_SAMPLES`` were read and over the whole epoch at its end.
  A worker's error reaches the trainer as the error it is (:class:`LoaderFailure`), not a wrapped traceback.
* **Repeated augmentation** (``data.repeated_aug = R``, DeiT's and RVT's RASampler, which a stream has no place
  for): each sample goes to R consecutive ranks in the same step, each copy augmented with its rank's seed; an
  epoch keeps its batch count and covers a uniform random 1 / R of the samples, as the sampler's permutation does
  (:meth:`TrainShards._stream`).
* Workers emit uint8 batches; normalisation, random erasing and mixup run on the device
  (:mod:`gpd_ds.data.transforms`). With ``decode="device"`` they emit the image files and each sample's drawn
  crop instead, and the rank decodes on its device (:mod:`gpd_ds.data.device_decode`); the stream, the seeds
  and the bad-sample counts are the same.

Eval (``eval_loader``): shards in a fixed order, shard ``j`` to slot ``j % (ranks * workers)``, every sample read
exactly once, last batch partial; ranks may get different batch counts, so evaluation sums its counts locally and
reduces once at the end, and fails when fewer than ``1 - max_bad_fraction`` of the index's samples were evaluated.
"""

from __future__ import annotations

import itertools
import logging
import random
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gpd_ds.data.decode import (
    BadRate,
    BadSample,
    CpuDecode,
    DataError,
    decode,
)
from gpd_ds.data.device_decode import EncodedImages, PlanOnCpu
from gpd_ds.data.shards import INDEX_NAME, MAX_IMAGE_PIXELS, parse_index
from gpd_ds.preemption import ignore_stop_signals

log = logging.getLogger(__name__)

_REMOTE = ("http://", "https://", "s3://", "gs://", "ais://", "hf://", "sftp://", "scp://", "ftps://")


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
    images: torch.Tensor | EncodedImages  # (B, 3, H, W) uint8, or (data.decode=device) the files and crops
    labels: torch.Tensor  # (B,) int64
    keys: list[str]
    worker: int  # the (logical) worker that made it
    position: int  # that worker's stream position after this batch (samples emitted, good or bad)
    bad_samples: int  # that worker's bad samples so far this epoch


def _is_remote(url: str) -> bool:
    return url.startswith(_REMOTE)


def _is_pipe(url: str) -> bool:
    return url.startswith("pipe:")


def _check_scheme(url: str, allow_pipe: bool) -> None:
    """``pipe:`` URLs run a shell command (webdataset's convention): only with ``data.allow_pipe``, and only in
    lower case, which is the only spelling webdataset runs (``PIPE:x`` would be read as a file path)."""
    if url[:5].lower() == "pipe:" and not _is_pipe(url):
        raise DataError(f"shard URL {url!r}: write the pipe prefix in lower case, 'pipe:'")
    if _is_pipe(url) and not allow_pipe:
        raise DataError(f"shard URL {url!r} runs a shell command; if you trust it, allow it with --set "
                        "data.allow_pipe=true (gpd-ds train) or --allow-pipe (gpd-ds eval)")


def _read_text(url: str) -> str:
    with wds.gopen(url, "rb") as f:
        return f.read().decode()


def _dirname(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _load_index(root: str) -> dict:
    """The validated ``_info.json`` under ``root`` (a directory, a URL, or a ``pipe:`` command prefix: the index
    is read with the same command as the shards, ``pipe:CMD ROOT/_info.json``)."""
    url = f"{root.rstrip('/')}/{INDEX_NAME}"
    if not _is_remote(url) and not _is_pipe(url) and not Path(url).is_file():
        raise DataError(f"no dataset index at {url!r}; write shards with `gpd-ds make-shards` (it writes "
                        f"{INDEX_NAME} with the sample counts the loader needs)")
    try:
        text = _read_text(url)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the dataset index {url!r}: {e}") from e
    index = parse_index(text, repr(url), DataError)
    for field in ("classes", "splits"):
        if field not in index:
            raise DataError(f"dataset index {url!r} has no {field!r} field; re-create it with `gpd-ds make-shards`")
    return index


def resolve_shards(spec: str, split: str | None = None, *, allow_pipe: bool = False) -> ShardList:
    """Shards of one split from:

    * a dataset root (directory or URL) holding ``_info.json`` plus ``split``;
    * a brace pattern (``/data/in1k-train-{000000..001281}.tar``), a single ``.tar``, or ``@list.txt`` (one URL
      per line); their counts come from the ``_info.json`` beside the first shard.

    ``pipe:`` URLs and roots (``pipe:curl -sf https://host/in1k-wds``, a command that prints the file whose
    path or URL ends it) run shell commands and are refused unless ``allow_pipe``.
    """
    spec = spec.strip()
    _check_scheme(spec, allow_pipe)
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
    for url in urls:
        _check_scheme(url, allow_pipe)
    missing = [u for u in urls if not _is_remote(u) and not _is_pipe(u) and not Path(u).is_file()]
    if missing:
        raise DataError(f"shard spec {spec!r} matches nothing at {missing[0]!r} ({len(missing)} of {len(urls)} "
                        "missing)")
    index = _load_index(_dirname(urls[0]))
    length_of = {}
    for entry in index.get("splits", {}).values():
        length_of.update(zip(entry["filenames"], entry["shard_lengths"], strict=True))
    unknown = [u for u in urls if u.rsplit("/", 1)[-1] not in length_of]
    if unknown:
        raise DataError(f"shard {unknown[0]!r} is not listed in the index beside it; its sample count is unknown")
    shards = ShardList(tuple(urls), tuple(length_of[u.rsplit("/", 1)[-1]] for u in urls), tuple(index["classes"]))
    if shards.num_samples == 0:
        raise DataError(f"shard spec {spec!r}{f' (split {split!r})' if split else ''} holds no samples by its "
                        "index; write the split with `gpd-ds make-shards`")
    return shards


def _group(files: Iterator[dict], url: str) -> Iterator[dict]:
    """Tar members -> samples (consecutive members sharing a key), as webdataset groups them, except that a
    repeated member makes its one sample bad instead of ending the shard."""
    current: dict | None = None
    for f in files:
        key, suffix = wds.tariterators.base_plus_ext(f["fname"])
        if key is None:
            continue
        suffix = suffix.lower()
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        if suffix in current:
            current["__bad__"] = f"repeated member .{suffix}"
        current[suffix] = f["data"]
    if current is not None:
        yield current


def iter_shard(url: str, expected: int | None = None) -> Iterator[dict]:
    """Exactly ``expected`` samples (the index's count for the shard): dicts of member bytes keyed by extension,
    plus ``__key__`` and ``__url__``; a sample that cannot be used carries its reason in ``__bad__``.

    So a split's samples always add up to its index: read + bad = expected.

    * A damaged shard (truncated, zero bytes, unreadable) yields what it can, warns, and then yields its missing
      samples as bad ones: counted, never silently lost.
    * An intact shard that holds more or fewer samples than its index entry says stops with a
      :class:`DataError` naming the shard: the index is wrong, and so would be every count derived from it
      (batches per epoch, evaluation coverage).

    Without ``expected`` (inspecting a shard) it yields what is there and warns at damage."""
    count = 0
    try:
        with wds.gopen(url, "rb") as stream:
            for sample in _group(wds.tariterators.tar_file_iterator(stream), url):
                count += 1
                if expected is not None and count > expected:
                    raise DataError(f"shard {url!r} holds more samples than the {expected} its index entry says; "
                                    "the index does not describe these shards: re-create it with `gpd-ds "
                                    "make-shards`")
                yield sample
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        lost = f"; the other {expected - count} of its {expected} count as bad" if expected is not None else ""
        log.warning("shard %s is damaged after %d samples (%s: %s)%s", url, count, type(e).__name__, str(e)[:200],
                    lost)
        name = url.rsplit("/", 1)[-1]
        for i in range(count, expected or 0):
            yield {"__key__": f"{name}#{i}", "__url__": url, "__bad__": f"lost: the shard is damaged after "
                   f"{count} samples ({type(e).__name__})"}
        return
    if expected is not None and count != expected:
        raise DataError(f"shard {url!r} holds {count} samples but its index entry says {expected}; the index "
                        "does not describe these shards: re-create it with `gpd-ds make-shards`")


def _mix(*values: int) -> int:
    """A stable 63-bit seed from integers (not Python's salted hash)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class LoaderFailure(NamedTuple):
    """A :class:`DataError` raised in a loader worker, sent as an item: the DataLoader would re-raise it wrapped
    ("Caught DataError in DataLoader worker process 0", the real message at the end of a traceback)."""

    message: str


def _failures_as_items(batches: Iterator[Batch]) -> Iterator[Batch | LoaderFailure]:
    try:
        yield from batches
    except DataError as e:
        yield LoaderFailure(str(e))


def raise_failures(loader: DataLoader) -> Iterator[Batch]:
    """The batches of a DataLoader over a loader dataset; a worker's :class:`LoaderFailure` is raised here as
    the :class:`DataError` it was, with its own message, after the workers are shut down (the traceback of the
    error would otherwise keep them alive)."""
    batches = iter(loader)
    failure = None
    for item in batches:
        if isinstance(item, LoaderFailure):
            failure = item
            break
        yield item
    del batches  # the DataLoader iterator's last reference: it stops its workers now
    if failure is not None:
        raise DataError(failure.message)


def _stack(images: list[torch.Tensor], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


@dataclass(frozen=True)
class Remainder:
    """The rest of an epoch that was interrupted under another topology (elastic resume).

    The old slots' unread samples (each old slot's first pass from where it stopped: ``positions[rank][worker]``
    emissions consumed) are concatenated in slot order and cut into one contiguous block per new slot, so each
    sample not read before the change is read at most once after it, and each new reader reads only the old
    slots its block overlaps. Every new rank makes the batches the epoch still needs (``batches_per_epoch -
    first_batch``); a block that holds fewer samples than its worker's quota continues from its own start (a warning
    counts the repeats; it takes a new topology whose epoch reads more samples than the old one's left unread)."""

    world: int  # the old topology
    workers: int
    positions: list[list[int]]
    first_batch: int  # the epoch's batch (per rank) where the remainder starts


class TrainShards(IterableDataset):
    """The per-worker train stream (see the module docstring). Use :class:`TrainLoader`."""

    def __init__(self, shards: ShardList, *, batch_size: int, rank: int, world_size: int, num_workers: int,
                 seed: int, reader: CpuDecode | PlanOnCpu, shuffle_buffer: int, max_bad_fraction: float,
                 max_pixels: int, repeats: int = 1) -> None:
        self.shards, self.batch_size, self.rank, self.world_size = shards, batch_size, rank, world_size
        self.workers, self.repeats = max(1, num_workers), repeats
        self.seed, self.reader, self.shuffle_buffer = seed, reader, shuffle_buffer
        self.max_bad_fraction, self.max_pixels = max_bad_fraction, max_pixels
        self.epoch, self.start_batch = 0, 0
        self.start_positions, self.start_bad = [0] * self.workers, [0] * self.workers
        self.remainder: Remainder | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Per rank: every worker makes ``floor(smallest possible share / batch)`` batches, where a slot's share
        is at least its ``floor(shards / slots)`` shards; so no worker ever runs out within one pass."""
        per_slot = len(self.shards.urls) // (self.world_size * self.workers)
        smallest_share = sum(sorted(self.shards.lengths)[:per_slot])
        return self.workers * (smallest_share // self.batch_size)

    def _own_shards(self, rank: int, worker: int, world: int | None = None, workers: int | None = None
                    ) -> list[tuple[str, int]]:
        """The shards of slot (``rank``, ``worker``) this epoch, under this topology or (``world``, ``workers``)."""
        world, workers = world or self.world_size, workers or self.workers
        order = list(zip(self.shards.urls, self.shards.lengths, strict=True))
        random.Random(_mix(self.seed, self.epoch)).shuffle(order)
        return order[rank * workers + worker::world * workers]

    def _emissions(self, rank: int, worker: int, world: int | None = None, workers: int | None = None
                   ) -> Iterator[dict]:
        """Raw samples of the shards of slot (``rank``, ``worker``) through the shuffle buffer, pass after pass.

        The buffer is flushed at the end of each pass, so a pass emits each of its samples exactly once; a
        second pass only happens when the worker's quota needs more samples than its shards hold. The order
        depends on the slot alone, so every rank that reads a slot (repeated augmentation) reads the same."""
        own = self._own_shards(rank, worker, world, workers)
        rng = random.Random(_mix(self.seed, self.epoch, rank, worker, 1))
        for passes in range(1000):
            buffer: list[dict] = []
            for url, length in own:
                for sample in iter_shard(url, length):
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(sample)
                        continue
                    j = rng.randrange(len(buffer))
                    buffer[j], sample = sample, buffer[j]
                    yield sample
            if not buffer and passes == 0:
                raise DataError(f"rank {rank} worker {worker}: no samples in its shards "
                                f"{[url for url, _ in own[:3]]}")
            rng.shuffle(buffer)
            yield from buffer
            rng.shuffle(own)
        raise DataError(f"rank {rank} worker {worker} read its shards 1000 times without filling its quota")

    def _stream(self, worker: int) -> Iterator[dict]:
        """The samples this rank's ``worker`` emits, in order.

        Without repeated augmentation: its own slot's samples. With ``repeats = R`` (DeiT's RASampler, emulated
        for shards): emission ``i`` is copy ``j = i % R`` of sample ``i // R`` of the slot of rank
        ``(rank - j) mod W`` (same worker), where a slot's samples are a uniform random 1 / R of it
        (:meth:`_selected`). So sample ``m`` of rank ``s``'s slot is emitted by ranks ``s, s + 1, ..., s + R - 1``
        (mod W) at the same position ``R * m + j``, i.e. in the same step, each copy augmented with its own rank's
        seed, as the sampler puts copies on consecutive ranks; an epoch keeps its number of batches and covers a
        uniform 1 / R of the samples, R times each. Each rank decodes as many images as without repeats; it reads
        (not decodes) its R slots' tar members whole."""
        if self.repeats == 1:
            yield from self._emissions(self.rank, worker)
            return
        sources: dict[int, tuple[Iterator[dict], int, dict | None]] = {}  # slot rank -> (stream, index, sample)
        for i in itertools.count():
            source, index = (self.rank - i % self.repeats) % self.world_size, i // self.repeats
            stream, at, sample = sources.get(source) or (self._selected(source, worker), -1, None)
            while at < index:  # a slot is asked for non-decreasing indices; fewer than R ranks repeat one
                at, sample = at + 1, next(stream)
            sources[source] = (stream, at, sample)
            yield sample

    def _selected(self, rank: int, worker: int) -> Iterator[dict]:
        """Repeated augmentation's draw from slot (``rank``, ``worker``): of each pass over its emissions, the
        ``ceil(n / R)`` at positions drawn uniformly at random (seeded by seed, epoch, slot and pass, so every rank
        reading the slot draws the same). Taking the first ``n / R`` instead would take the first third of the
        slot's shards whenever the shuffle buffer is smaller than the slot (ImageNet's case): samples of the same
        shards together, a shard-correlated third. The skipped samples are read, not decoded."""
        n = sum(length for _, length in self._own_shards(rank, worker))
        emissions = self._emissions(rank, worker)
        for passes in itertools.count():
            draw = random.Random(_mix(self.seed, self.epoch, rank, worker, 5, passes))
            keep = set(draw.sample(range(n), -(-n // self.repeats)))
            for position in range(n):
                sample = next(emissions)
                if position in keep:
                    yield sample

    def _remainder_stream(self, worker: int) -> Iterator[dict]:
        """This rank's ``worker``'s block of the :class:`Remainder` (see there), then the block again."""
        plan = self.remainder
        old_slots = [(r, w) for r in range(plan.world) for w in range(plan.workers)]
        unread = [max(0, sum(n for _, n in self._own_shards(r, w, plan.world, plan.workers)) - plan.positions[r][w])
                  for r, w in old_slots]
        total, slot, slots = sum(unread), self.rank * self.workers + worker, self.world_size * self.workers
        begin, end = slot * total // slots, (slot + 1) * total // slots
        for passes in itertools.count():
            if passes == 1:
                log.warning("rank %d worker %d: the rest of epoch %d holds %d unread samples for %d readers; this "
                            "reader's block of %d is read again to fill its batches", self.rank, worker, self.epoch,
                            total, slots, end - begin)
            if end == begin:
                raise DataError(f"rank {self.rank} worker {worker}: no unread samples left in epoch {self.epoch}")
            offset = 0
            for (r, w), n in zip(old_slots, unread, strict=True):
                lo, hi = max(begin, offset), min(end, offset + n)
                if lo < hi:  # skip what the old reader consumed and what precedes this block, then take the overlap
                    emissions = self._emissions(r, w, plan.world, plan.workers)
                    skip = plan.positions[r][w] + lo - offset
                    yield from itertools.islice(emissions, skip, skip + hi - lo)
                offset += n

    def __iter__(self) -> Iterator[Batch | LoaderFailure]:
        return _failures_as_items(self._batches())

    def _batches(self) -> Iterator[Batch]:
        physical, num_workers = _worker()
        if num_workers != self.workers:
            raise DataError(f"TrainShards was built for {self.workers} workers but runs in {num_workers}")
        # Batch b of the epoch (of its remainder, after an elastic resume) comes from logical worker b % W. The
        # DataLoader always asks physical worker 0 first, so after resuming at batch k physical worker p plays
        # logical worker (p + k) % W.
        first = self.remainder.first_batch if self.remainder else 0
        batches, done_batches = self.batches_per_epoch - first, self.start_batch - first
        worker = (physical + done_batches) % self.workers
        quota = max(0, (batches - worker + self.workers - 1) // self.workers)
        done = max(0, (done_batches - worker + self.workers - 1) // self.workers)
        if done >= quota:
            return
        start = self.start_positions[worker]
        counter = BadRate(self.max_bad_fraction, f"rank {self.rank} worker {worker}", start, self.start_bad[worker])
        base = _mix(self.seed, self.epoch, self.rank, worker, 2 if self.remainder is None else 4)
        images, labels, keys = [], [], []
        stream = self._stream(worker) if self.remainder is None else self._remainder_stream(worker)
        for position, sample in enumerate(stream):
            if position < start:
                continue
            try:
                image, label = self.reader(sample, base + position)
            except BadSample as e:
                counter.record(sample, e)
                continue
            counter.good()
            images.append(image)
            labels.append(label)
            keys.append(sample["__key__"])
            if len(images) == self.batch_size:
                yield Batch(self.reader.collate(images), torch.tensor(labels, dtype=torch.int64), keys, worker,
                            position + 1, counter.bad)
                images, labels, keys = [], [], []
                done += 1
                if done >= quota:
                    return


class TrainLoader:
    """Epoch-aware, resumable train loader: ``set_epoch(e)`` then iterate ``len(loader)`` batches."""

    def __init__(self, shards: ShardList, *, batch_size: int, rank: int, world_size: int, transform: Callable,
                 num_workers: int = 4, seed: int = 0, shuffle_buffer: int = 1000, max_bad_fraction: float = 0.01,
                 max_pixels: int = MAX_IMAGE_PIXELS, pin_memory: bool = False, prefetch_factor: int = 2,
                 repeated_aug: int = 1, decode: str = "cpu") -> None:
        slots = world_size * max(1, num_workers)
        if len(shards.urls) < slots:
            raise DataError(f"{len(shards.urls)} shards cannot feed {world_size} ranks x {max(1, num_workers)} "
                            f"workers = {slots} readers; write smaller shards (make-shards --shard-size) or lower "
                            "data.workers")
        if batch_size < 1:
            raise DataError(f"batch_size {batch_size} must be >= 1")
        if repeated_aug < 1:
            raise DataError(f"data.repeated_aug={repeated_aug} must be >= 1 (1: off; DeiT and RVT use 3)")
        if decode not in ("cpu", "device"):
            raise DataError(f"decode={decode!r}: the train loader decodes on the 'cpu' (its workers) or the "
                            "'device' (the rank's)")
        num_classes = len(shards.classes)
        reader = (PlanOnCpu(transform, num_classes, max_pixels) if decode == "device"
                  else CpuDecode(transform, num_classes, max_pixels))
        self.dataset = TrainShards(shards, batch_size=batch_size, rank=rank, world_size=world_size,
                                   num_workers=num_workers, seed=seed, reader=reader,
                                   shuffle_buffer=shuffle_buffer, max_bad_fraction=max_bad_fraction,
                                   max_pixels=max_pixels, repeats=repeated_aug)
        if self.dataset.batches_per_epoch == 0:
            raise DataError(f"{len(shards.urls)} shards of {min(shards.lengths)}+ samples make no full batch of "
                            f"{batch_size} per worker for {slots} readers; lower optim.global_batch_size (the micro "
                            "batch per rank is global / ranks / accumulation) or data.workers")
        self.max_bad_fraction = max_bad_fraction
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
            self.dataset.remainder = None

    def __iter__(self) -> Iterator[Batch]:
        ds = self.dataset
        ds.epoch, ds.start_batch = self.epoch, self.batch
        ds.start_positions, ds.start_bad = list(self.positions), list(self.bad)
        if self.batch >= len(self):
            return
        loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            worker_init_fn=ignore_stop_signals)
        for batch in raise_failures(loader):
            self.positions[batch.worker] = batch.position
            self.bad[batch.worker] = batch.bad_samples
            self.batch += 1
            yield batch
        if self.batch >= len(self):  # the whole epoch, all workers together
            BadRate(self.max_bad_fraction, f"rank {ds.rank} in epoch {self.epoch}", sum(self.positions),
                    sum(self.bad)).check(final=True)

    @property
    def bad_samples(self) -> int:
        return sum(self.bad)

    def _topology(self) -> list[int]:
        """What makes a saved stream position exact: ranks, workers, batch, seed, samples, repeats."""
        ds = self.dataset
        return [ds.world_size, ds.workers, ds.batch_size, ds.seed, ds.shards.num_samples, ds.repeats]

    def state_dict(self) -> dict:
        """Where this rank's data stream stands (save it with the checkpoint)."""
        plan = self.dataset.remainder
        return {"epoch": self.epoch, "batch": self.batch, "positions": list(self.positions), "bad": list(self.bad),
                "topology": self._topology(), "remainder": None if plan is None else vars(plan)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position this topology saved (same ranks, workers, batch size, seed and data): exact.
        Otherwise the epoch resumes after the same number of batches, approximately; with every rank's saved state,
        :meth:`resume_elastic` is exact."""
        ds = self.dataset
        self.epoch, self.batch = state["epoch"], state["batch"]
        saved = state["topology"] + [1] * (len(self._topology()) - len(state["topology"]))  # before repeated_aug
        if saved == self._topology():
            self.positions, self.bad = list(state["positions"]), list(state["bad"])
            ds.remainder = Remainder(**state["remainder"]) if state.get("remainder") else None
            return
        log.warning("data topology changed since the checkpoint (%s -> %s); resuming epoch %d after batch %d "
                    "approximately", state["topology"], self._topology(), self.epoch, self.batch)
        self.positions = [((self.batch - w + ds.workers - 1) // ds.workers) * ds.batch_size
                          for w in range(ds.workers)]
        self.bad = [0] * ds.workers

    def resume_elastic(self, states: list[dict]) -> None:
        """Continue the epoch that every old rank's ``states`` describe, under this (other) topology: the samples
        the old ranks did not read are split over the new ranks (:class:`Remainder`), so across the change every
        sample of the epoch is read at most once and each rank makes the same number of batches. Exact when the
        data, seed and epoch agree and no repeated augmentation runs (its copies follow the old ranks); otherwise
        approximate, as :meth:`load_state_dict`, with a warning."""
        ds, first = self.dataset, states[0]
        old = first["topology"] + [1] * (len(self._topology()) - len(first["topology"]))
        exact = (old[3:] == self._topology()[3:] and ds.repeats == 1 and old[1] == len(first["positions"])
                 and all(s["epoch"] == first["epoch"] and s["batch"] == first["batch"] and not s.get("remainder")
                         for s in states))
        if not exact:
            self.load_state_dict(first)
            return
        self.epoch, self.batch = first["epoch"], first["batch"]
        self.positions, self.bad = [0] * ds.workers, [0] * ds.workers
        ds.remainder = Remainder(old[0], old[1], [list(s["positions"]) for s in states], self.batch)
        log.info("epoch %d continues after batch %d with the %d old ranks' unread samples split over %d ranks x %d "
                 "workers (each read once)", self.epoch, self.batch, old[0], ds.world_size, ds.workers)


class EvalShards(IterableDataset):
    """Every sample of the split exactly once across ranks and workers; last batch partial."""

    def __init__(self, shards: ShardList, *, batch_size: int, rank: int, world_size: int, transform: Callable,
                 max_bad_fraction: float, max_pixels: int) -> None:
        self.shards, self.batch_size, self.rank, self.world_size = shards, batch_size, rank, world_size
        self.transform, self.max_bad_fraction, self.max_pixels = transform, max_bad_fraction, max_pixels

    def __iter__(self) -> Iterator[Batch | LoaderFailure]:
        return _failures_as_items(self._batches())

    def _batches(self) -> Iterator[Batch]:
        worker, workers = _worker()
        slot, slots = self.rank * workers + worker, self.world_size * workers
        counter = BadRate(self.max_bad_fraction, f"eval rank {self.rank} worker {worker}")
        images, labels, keys, position = [], [], [], 0
        own = list(zip(self.shards.urls, self.shards.lengths, strict=True))[slot::slots]
        for url, length in own:
            for sample in iter_shard(url, length):
                position += 1
                try:
                    image, label = decode(sample, len(self.shards.classes), self.max_pixels)
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
                num_workers: int = 4, max_bad_fraction: float = 0.01, max_pixels: int = MAX_IMAGE_PIXELS,
                pin_memory: bool = False) -> Iterator[Batch]:
    """The batches of ``shards``, every sample read exactly once across ranks and workers (iterate once).

    Evaluation then checks the whole (:func:`gpd_ds.evaluate.evaluate`): fewer than ``1 - max_bad_fraction`` of
    the index's samples evaluated is an error."""
    if batch_size < 1:
        raise DataError(f"eval batch size {batch_size} must be >= 1 (data.eval_batch_size)")
    dataset = EvalShards(shards, batch_size=batch_size, rank=rank, world_size=world_size, transform=transform,
                         max_bad_fraction=max_bad_fraction, max_pixels=max_pixels)
    return raise_failures(DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                     worker_init_fn=ignore_stop_signals))
