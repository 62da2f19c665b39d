"""ImageFolder -> WebDataset shards, plus the dataset index (``_info.json``).

Layout written under OUT::

    OUT/{prefix}-{split}-000000.tar    members <key>.jpg (original file bytes) and <key>.cls (label, ASCII)
    OUT/_info.json                     timm-compatible index: splits -> filenames, shard_lengths, num_samples;
                                       plus the class list (index <-> name), shared by every split
    OUT/.{prefix}-{split}.plan.json    the plan of a conversion in progress (removed when it completes)

Decisions:

* Bytes are stored as they are (no re-encode). Odd files real ImageNet contains (grayscale or CMYK JPEGs, a
  PNG named ``.JPEG``) are kept too: readers decode by content with PIL and convert to RGB. Each file's header
  is checked here, so a file PIL cannot identify is reported and left out instead of failing training later;
  the index counts the non-RGB and non-JPEG files it kept.
* Samples are shuffled across shards (seeded), so a shard holds many classes.
* A shard is written under a temporary name and renamed when complete: a crash never leaves a truncated shard
  under its final name. Re-running over an output that holds shards of the split refuses, unless ``resume``,
  which checks that the plan is the same and writes only the missing shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from PIL import Image, UnidentifiedImageError

from gpd_ds.errors import UserInputError
from gpd_ds.progress import Progress

log = logging.getLogger(__name__)

INDEX_NAME = "_info.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
SHARD_MTIME = 1_700_000_000
# PIL's decompression-bomb limit (~9459 x 9459; 268 MB decoded as RGB): far above any ImageNet photo, far below
# what one worker can afford (a 65535 x 65535 JPEG would need 13 GB). make-shards leaves larger images out and the
# loaders skip and count them, both judged from the header before decoding.
MAX_IMAGE_PIXELS = 89_478_485
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class ShardWriteError(UserInputError, ValueError):
    """Bad input or state for the shard writer (names the input and the fix)."""


def load_class_mapping(path: str | Path) -> list[str]:
    """Class names in index order from a JSON list, a JSON ``{name: index}`` object, or a text file with one
    name per line."""
    path = Path(path)
    if not path.is_file():
        raise ShardWriteError(f"class mapping file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            if sorted(data.values()) != list(range(len(data))):
                raise ShardWriteError(f"class mapping {str(path)!r}: indices must be 0..{len(data) - 1}, each once")
            return [name for name, _ in sorted(data.items(), key=lambda kv: kv[1])]
        return [str(name) for name in data]
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class Sample:
    path: str
    label: int
    key: str


def scan_image_folder(src: str | Path, classes: list[str] | None = None) -> tuple[list[str], list[Sample]]:
    """Classes and samples of an ImageFolder tree ``src/<class>/<image>``.

    ``classes`` fixes the class order (a mapping file, or the classes of a split already written); the tree's
    class folders must then be exactly those classes. Without it, classes are the sorted folder names.
    """
    root = Path(src)
    if not root.is_dir():
        raise ShardWriteError(f"source {str(root)!r} is not a directory; pass an ImageFolder tree SRC/<class>/<image>")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ShardWriteError(f"source {str(root)!r} has no class folders; expected SRC/<class>/<image> "
                              "(ImageNet: train/n01440764/*.JPEG)")
    if classes is None:
        classes = folders
    elif sorted(classes) != folders:
        missing, extra = sorted(set(classes) - set(folders)), sorted(set(folders) - set(classes))
        raise ShardWriteError(
            f"the class folders of {str(root)!r} do not match the class mapping in use: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''} ({len(missing)}), unexpected {extra[:5]}"
            f"{'...' if len(extra) > 5 else ''} ({len(extra)}). Train and val must have the same classes.")
    label_of = {name: i for i, name in enumerate(classes)}
    samples = []
    for name in folders:
        for dirpath, _, files in os.walk(root / name):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    path = Path(dirpath) / f
                    rel = path.relative_to(root).with_suffix("")
                    samples.append(Sample(str(path), label_of[name], _KEY_UNSAFE.sub("_", str(rel))))
    if not samples:
        raise ShardWriteError(f"source {str(root)!r} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
    keys = Counter(s.key for s in samples)
    dupes = [k for k, n in keys.items() if n > 1]
    if dupes:
        raise ShardWriteError(f"file names map to the same sample key after sanitising: {dupes[:3]}; rename them")
    samples.sort(key=lambda s: (s.label, s.path))
    return classes, samples


def read_index(out: str | Path) -> dict:
    path = Path(out) / INDEX_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


@dataclass
class _ShardResult:
    index: int
    count: int
    skipped: list[str] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)


def image_header(data: bytes) -> tuple[str, str, int, int]:
    """(format, mode, width, height) from the header alone (~20 us; nothing is decoded). PIL's own size limit
    is lifted here: callers apply theirs (``MAX_IMAGE_PIXELS`` by default). Raises ``OSError``
    (``UnidentifiedImageError``) for bytes PIL cannot identify."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format, im.mode, im.size[0], im.size[1]
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _image_kind(data: bytes) -> str:
    """'JPEG/RGB' style description from the header; raises if PIL cannot identify the bytes."""
    fmt, mode, _, _ = image_header(data)
    return f"{fmt}/{mode}"


def _write_shard(task: tuple[int, str, list[Sample]]) -> _ShardResult:
    index, final, samples = task
    result = _ShardResult(index, 0)
    tmp = f"{final}.partial-{os.getpid()}"
    # A fixed integer mtime: reproducible shards, and no PAX header per member (a float mtime needs one).
    with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=SHARD_MTIME) as sink:
        for s in samples:
            try:
                data = Path(s.path).read_bytes()
                kind = _image_kind(data)
            except (OSError, UnidentifiedImageError) as e:
                result.skipped.append(f"{s.path}: {type(e).__name__}: {e}")
                continue
            if kind != "JPEG/RGB":
                result.kinds[kind] += 1
            sink.write({"__key__": s.key, "jpg": data, "cls": str(s.label).encode()})
            result.count += 1
    os.replace(tmp, final)
    return result


def _count_samples(shard: Path) -> int:
    with tarfile.open(shard, "r:") as tar:
        return sum(1 for m in tar if m.name.endswith(".cls"))


def _plan_signature(samples: list[Sample], classes: list[str], shard_size: int, seed: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([classes, shard_size, seed]).encode())
    for s in samples:
        h.update(f"{s.path}\0{s.label}\n".encode())
    return h.hexdigest()


def make_shards(src: str | Path, out: str | Path, split: str, *, shard_size: int = 1000, workers: int | None = None,
                shuffle_seed: int = 0, prefix: str | None = None, class_mapping: str | Path | None = None,
                resume: bool = False, progress: bool = True) -> dict:
    """Convert the ImageFolder tree ``src`` into shards of ``split`` under ``out``; return the split's index entry.

    The class order comes from ``class_mapping``, else from a split already in ``out``'s index, else from the
    sorted folder names; every split in one ``out`` shares it.
    """
    if shard_size < 1:
        raise ShardWriteError(f"--shard-size {shard_size} must be >= 1 (ImageNet: 1000 gives ~110 MB shards)")
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise ShardWriteError(f"--split {split!r} must be a simple name such as train or val")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = prefix or out.resolve().name
    index = read_index(out)
    classes = load_class_mapping(class_mapping) if class_mapping else index.get("classes")
    if class_mapping and index.get("classes") not in (None, classes):
        raise ShardWriteError(f"--class-mapping {str(class_mapping)!r} differs from the classes already in "
                              f"{str(out / INDEX_NAME)!r}; use the same mapping for every split")
    classes, samples = scan_image_folder(src, classes)

    if split in index.get("splits", {}):
        raise ShardWriteError(f"{str(out)!r} already holds a complete {split!r} split "
                              f"({index['splits'][split]['num_samples']} samples); choose another OUT")
    rng = random.Random(shuffle_seed)
    order = samples[:]
    rng.shuffle(order)
    chunks = [order[i:i + shard_size] for i in range(0, len(order), shard_size)]
    names = [f"{prefix}-{split}-{i:06d}.tar" for i in range(len(chunks))]
    plan_path = out / f".{prefix}-{split}.plan.json"
    signature = _plan_signature(samples, classes, shard_size, shuffle_seed)
    existing = sorted(out.glob(f"{prefix}-{split}-*.tar"))
    if existing and not resume:
        raise ShardWriteError(f"{str(out)!r} already holds {len(existing)} shards of split {split!r} from an "
                              "interrupted run; pass --resume to finish it, or choose another OUT")
    if resume and plan_path.is_file() and json.loads(plan_path.read_text())["signature"] != signature:
        raise ShardWriteError(f"cannot resume into {str(out)!r}: the source files, classes, --shard-size or "
                              "--shuffle-seed differ from the interrupted run; rerun with the same arguments")
    if resume and existing and not plan_path.is_file():
        raise ShardWriteError(f"cannot resume into {str(out)!r}: shards exist but no plan file "
                              f"{plan_path.name}; choose another OUT")
    for stale in out.glob(f"{prefix}-{split}-*.tar.partial-*"):
        stale.unlink()
    _write_json_atomic(plan_path, {"signature": signature, "split": split, "num_shards": len(chunks)})

    done = {p.name for p in existing}
    tasks = [(i, str(out / n), c) for i, (n, c) in enumerate(zip(names, chunks, strict=True)) if n not in done]
    counts = {i: _count_samples(out / n) for i, n in enumerate(names) if n in done}
    skipped: list[str] = []
    kinds: Counter = Counter()
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
    initial = sum(len(chunks[i]) for i in counts)
    with (Progress(len(samples), f"shards {split}", unit="img", enabled=progress, initial=initial) as bar,
          multiprocessing.Pool(workers) as pool):
        for result in pool.imap_unordered(_write_shard, tasks):
            counts[result.index] = result.count
            skipped += result.skipped
            kinds.update(result.kinds)
            bar.update(len(chunks[result.index]))
    for line in skipped:
        log.warning("left out an unreadable image: %s", line)

    entry = {"name": split, "num_samples": sum(counts.values()), "filenames": names,
             "shard_lengths": [counts[i] for i in range(len(names))], "shuffle_seed": shuffle_seed,
             "source": str(Path(src).resolve()), "skipped_files": skipped, "non_rgb_jpeg_files": dict(kinds)}
    index = read_index(out)  # re-read: another split may have been added meanwhile
    if index.get("classes") not in (None, classes):
        raise ShardWriteError(f"the classes in {str(out / INDEX_NAME)!r} changed during the conversion")
    index.setdefault("name", prefix)
    index["classes"] = classes
    index["num_classes"] = len(classes)
    index.setdefault("splits", {})[split] = entry
    _write_json_atomic(out / INDEX_NAME, index)
    plan_path.unlink()
    return entry
