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
* An image larger than ``max_pixels`` (width x height read from the header; default PIL's own limit,
  ``MAX_IMAGE_PIXELS``) is left out and listed the same way. Nothing here decodes pixels, so a 774 KB PNG that
  would decode to 768 MB costs one header read, not a worker's memory.
* The source layout is checked before anything is written: class folders without image files (their class
  would have 0 samples), fewer than 2 classes, class folders named like splits (SRC is the dataset root, not a
  split), files without an image extension in class folders and images directly in SRC (both left out). Each
  is a warning, logged and recorded in the split's index entry (``layout_warnings``; ``empty_classes`` lists
  the classes with 0 samples); ``strict`` refuses them all in one error instead. A class left with 0 samples
  because all its files were left out is found only after writing, so it is always a recorded warning.
* ``max_side`` (off by default) bounds the resolution: an image whose longer side exceeds it is decoded once,
  shrunk (aspect kept, Lanczos after libjpeg's DCT-domain pre-shrink, as PIL's ``thumbnail``) and re-encoded as a
  baseline JPEG of ``jpeg_quality``; every other image keeps its bytes. Decoding a smaller JPEG costs
  proportionally less in every epoch (FFCV stores ImageNet at <= 400-500 px for this; ``BENCHMARKS.md`` has the
  measured speed-up). The bound and the count it shrank are recorded in the split's index entry.
* Samples are shuffled across shards (seeded), so a shard holds many classes.
* A shard is written under a temporary name and renamed when complete: a crash never leaves a truncated shard
  under its final name. Re-running over an output that holds shards of the split refuses, unless ``resume``,
  which checks that the plan is the same and writes only the missing shards.
* The index is validated whenever it is read (:func:`validate_index`, shared with the loaders), so a damaged
  ``_info.json`` gives an error naming the file and the field instead of a traceback.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import multiprocessing.pool
import os
import random
import re
import signal
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import webdataset as wds
from PIL import Image, UnidentifiedImageError

from gpd_ds.errors import UserInputError, json_type
from gpd_ds.progress import Progress

log = logging.getLogger(__name__)

INDEX_NAME = "_info.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
SHARD_MTIME = 1_700_000_000
# PIL's decompression-bomb limit (~9459 x 9459; 268 MB decoded as RGB): far above any ImageNet photo, far below
# what one worker can afford (a 65535 x 65535 JPEG would need 13 GB). make-shards leaves larger images out and the
# loaders skip and count them, both judged from the header before decoding.
MAX_IMAGE_PIXELS = 89_478_485
# Folder names that mean SRC is a dataset root (SRC/train/<class>/...), not one split of it.
SPLIT_FOLDER_NAMES = frozenset({"train", "val", "validation", "test"})
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_NAMED = 5  # how many paths or names one message lists before "and N more"
_INDEX_FIX = "restore the file, or re-create the dataset with gpd-ds make-shards into a new directory"


class ShardWriteError(UserInputError, ValueError):
    """Bad input or state for the shard writer (names the input and the fix)."""


def _some(items: list[str], n: int = _NAMED) -> str:
    """``'a', 'b' and 3 more``: a readable excerpt of a long list (no list repr in messages)."""
    shown = ", ".join(repr(x) for x in items[:n])
    return f"{shown} and {len(items) - n} more" if len(items) > n else shown


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def _parse_json(text: str, where: str, error: type[Exception], fix: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); {fix}") from None


def _read_text(path: Path, what: str, error: type[Exception], fix: str) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError as e:
        raise error(f"{what} {str(path)!r} is not UTF-8 text (byte {e.start}); {fix}") from None


def load_class_mapping(path: str | Path) -> list[str]:
    """Class names in index order from a JSON list, a JSON ``{name: index}`` object, or a text file with one
    name per line."""
    path = Path(path)
    if not path.is_file():
        raise ShardWriteError(f"class mapping file {str(path)!r} does not exist")
    where = f"class mapping {str(path)!r}"
    fix = "write a JSON list of class names, a JSON object {name: index}, or a text file with one name per line"
    text = _read_text(path, "class mapping", ShardWriteError, fix)
    if path.suffix == ".json":
        names = _mapping_names(_parse_json(text, where, ShardWriteError, fix), where, fix)
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ShardWriteError(f"{where} names no classes; {fix}")
    twice = sorted(name for name, n in Counter(names).items() if n > 1)
    if twice:
        raise ShardWriteError(f"{where} names {_some(twice)} more than once; each class must appear once")
    return names


def _mapping_names(data: object, where: str, fix: str) -> list[str]:
    if isinstance(data, dict):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
            raise ShardWriteError(f"{where}: the indices of a {{name: index}} object must be whole numbers")
        if sorted(data.values()) != list(range(len(data))):
            raise ShardWriteError(f"{where}: indices must be 0..{len(data) - 1}, each once")
        return [name for name, _ in sorted(data.items(), key=lambda kv: kv[1])]
    if isinstance(data, list):
        # Numbers are accepted as names because folder names such as 0..9 (CIFAR) read naturally as numbers.
        bad = [i for i, name in enumerate(data) if isinstance(name, bool) or not isinstance(name, str | int)]
        if bad:
            raise ShardWriteError(f"{where}: entry {bad[0]} is a {json_type(data[bad[0]])}, not a class name; "
                                  f"{fix}")
        return [str(name) for name in data]
    raise ShardWriteError(f"{where} holds a JSON {json_type(data)}; {fix}")


@dataclass(frozen=True)
class Sample:
    path: str
    label: int
    key: str


@dataclass(frozen=True)
class FolderScan:
    """What :func:`scan_image_folder` found: classes in label order, the image files (sorted by label, path),
    the layout problems (one sentence each, naming paths and the fix) and the classes without image files."""

    classes: list[str]
    samples: list[Sample]
    problems: list[str]
    empty_classes: list[str]


def scan_image_folder(src: str | Path, classes: list[str] | None = None) -> FolderScan:
    """Classes, samples and layout problems of an ImageFolder tree ``src/<class>/<image>``.

    ``classes`` fixes the class order (a mapping file, or the classes of a split already written); the tree's
    class folders must then be exactly those classes. Without it, classes are the sorted folder names. A tree
    that cannot be converted at all raises; a doubtful one returns its ``problems`` for the caller to warn about
    or refuse.
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
    samples, others = [], []
    for name in folders:
        for dirpath, _, files in os.walk(root / name):
            for f in sorted(files):
                path = Path(dirpath) / f
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    rel = path.relative_to(root).with_suffix("")
                    samples.append(Sample(str(path), label_of[name], _KEY_UNSAFE.sub("_", str(rel))))
                elif not f.startswith("."):  # hidden files (.DS_Store) are the OS's, not a layout mistake
                    others.append(str(path.relative_to(root)))
    if not samples:
        found = f"; it holds {_plural(len(others), 'other file')}: {_some(others)}" if others else ""
        raise ShardWriteError(f"source {str(root)!r} has class folders but no images "
                              f"({', '.join(IMAGE_EXTENSIONS)}){found}")
    keys = Counter(s.key for s in samples)
    dupes = [k for k, n in keys.items() if n > 1]
    if dupes:
        raise ShardWriteError(f"file names map to the same sample key after sanitising: {_some(dupes, 3)}; "
                              "rename them")
    samples.sort(key=lambda s: (s.label, s.path))
    with_images = {classes[s.label] for s in samples}
    empty = [name for name in classes if name not in with_images]
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))
    problems = _layout_problems(root, classes, empty, others, loose)
    return FolderScan(classes, samples, problems, empty)


def _layout_problems(root: Path, classes: list[str], empty: list[str], others: list[str],
                     loose: list[str]) -> list[str]:
    """Layouts that convert but are almost certainly a mistake, one sentence (with the fix) each."""
    src = str(root)
    problems = []
    splits = [name for name in classes if name.lower() in SPLIT_FOLDER_NAMES]
    if splits:
        problems.append(f"source {src!r} looks like a dataset root holding splits (class folders "
                        f"{_some(splits)}); pass the split directory, e.g. {str(root / splits[0])!r}")
    if len(classes) < 2:
        problems.append(f"source {src!r} has only {_plural(len(classes), 'class folder')} ({_some(classes)}); a "
                        "classifier needs at least 2: pass the directory that holds one folder per class")
    if empty:
        problems.append(f"class folders of {src!r} without image files ({len(empty):,}): {_some(empty)}; each such "
                        "class has 0 samples in this split: add its images, or remove the folder (and the class "
                        "from the class mapping in use)")
    if others:
        problems.append(f"files without an image extension ({', '.join(IMAGE_EXTENSIONS)}) in the class folders "
                        f"of {src!r}, left out ({len(others):,}): {_some(others)}; move them out of the tree, or "
                        "rename images to their real extension")
    if loose:
        problems.append(f"image files directly in {src!r}, outside any class folder, left out ({len(loose):,}): "
                        f"{_some(loose)}; move them into their class folders (ImageNet val: finish valprep.sh)")
    return problems


def _refuse_layout(src: str | Path, problems: list[str]) -> None:
    listed = "".join(f"\n  - {p}" for p in problems)
    raise ShardWriteError(f"--strict: the source {str(src)!r} has {_plural(len(problems), 'layout problem')}:"
                          f"{listed}\nfix them, or run without --strict to convert anyway (the problems are then "
                          "recorded in the index as layout_warnings)")


def validate_index(index: object, where: str, error: type[Exception] = ShardWriteError) -> dict:
    """``index`` (a parsed ``_info.json``) unchanged if it has the fields readers rely on, else ``error`` naming
    ``where`` (the file or URL it came from) and the field.

    Checked: a JSON object; ``classes``, if present, a list of distinct strings (and ``num_classes``, if also
    present, its length); ``splits`` an object whose every entry is an object with ``filenames`` (distinct plain
    file names: no directory, so nothing outside the dataset root is read) and ``shard_lengths`` (list of
    non-negative integers) of the same length and ``num_samples`` their sum. Other fields are left to their users
    (timm writes a few more).
    """
    if not isinstance(index, dict):
        raise error(f"{where} must hold a JSON object {{...}}, not a JSON {json_type(index)}; {_INDEX_FIX}")
    _check_classes(index, where, error)
    splits = index.get("splits")
    if splits is None:
        raise error(f"{where}: field 'splits' is missing; {_INDEX_FIX}")
    if not isinstance(splits, dict):
        raise error(f"{where}: field 'splits' must be an object {{split name: entry}}, not a "
                    f"{json_type(splits)}; {_INDEX_FIX}")
    for name, entry in splits.items():
        _check_split(entry, f"splits.{name}", where, error)
    return index


def _check_classes(index: dict, where: str, error: type[Exception]) -> None:
    if "classes" not in index:
        return
    classes = index["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        what = json_type(classes) if not isinstance(classes, list) else "list with non-string entries"
        raise error(f"{where}: field 'classes' must be a list of class names (strings), not a {what}; {_INDEX_FIX}")
    twice = sorted(c for c, n in Counter(classes).items() if n > 1)
    if twice:
        raise error(f"{where}: field 'classes' names {_some(twice)} more than once; {_INDEX_FIX}")
    num = index.get("num_classes", len(classes))
    if num != len(classes) or isinstance(num, bool):
        raise error(f"{where}: field 'num_classes' is {num!r} but 'classes' lists {len(classes)}; {_INDEX_FIX}")


def _check_split(entry: object, field_name: str, where: str, error: type[Exception]) -> None:
    if not isinstance(entry, dict):
        raise error(f"{where}: field {field_name!r} must be an object, not a {json_type(entry)}; {_INDEX_FIX}")
    for key in ("filenames", "shard_lengths", "num_samples"):
        if key not in entry:
            raise error(f"{where}: field '{field_name}.{key}' is missing; {_INDEX_FIX}")
    names, lengths, total = entry["filenames"], entry["shard_lengths"], entry["num_samples"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise error(f"{where}: field '{field_name}.filenames' must be a list of shard file names (strings); "
                    f"{_INDEX_FIX}")
    if not isinstance(lengths, list) or not all(_is_count(n) for n in lengths):
        raise error(f"{where}: field '{field_name}.shard_lengths' must be a list of sample counts (whole numbers "
                    f">= 0); {_INDEX_FIX}")
    outside = [n for n in names if n in ("", ".", "..") or "/" in n or "\\" in n]
    if outside:
        raise error(f"{where}: field '{field_name}.filenames' names {outside[0]!r}, not a file beside the index "
                    f"(shard names are plain file names, no directories); {_INDEX_FIX}")
    twice = sorted(n for n, k in Counter(names).items() if k > 1)
    if twice:
        raise error(f"{where}: field '{field_name}.filenames' lists {_some(twice)} more than once (each shard would "
                    f"be read, and counted, twice); {_INDEX_FIX}")
    if len(names) != len(lengths):
        raise error(f"{where}: field '{field_name}.filenames' lists {_plural(len(names), 'shard')} but "
                    f"'{field_name}.shard_lengths' has {_plural(len(lengths), 'count')}; {_INDEX_FIX}")
    if not _is_count(total) or total != sum(lengths):
        raise error(f"{where}: field '{field_name}.num_samples' is {total!r} but '{field_name}.shard_lengths' sum "
                    f"to {sum(lengths)}; {_INDEX_FIX}")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_index(text: str, where: str, error: type[Exception] = ShardWriteError) -> dict:
    """The index in ``text`` (an ``_info.json``'s content read from ``where``), parsed and validated."""
    return validate_index(_parse_json(text, where, error, _INDEX_FIX), where, error)


def read_index(out: str | Path) -> dict:
    """The validated index in ``out``, or ``{}`` when there is none yet."""
    path = Path(out) / INDEX_NAME
    if not path.is_file():
        return {}
    return parse_index(_read_text(path, "dataset index", ShardWriteError, _INDEX_FIX), repr(str(path)))


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


@dataclass
class _ShardResult:
    index: int
    labels: Counter = field(default_factory=Counter)  # samples written per label
    skipped: list[str] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)
    shrunk: int = 0  # images re-encoded to the max_side bound


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


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (they carry the frame size): C0-CF except DHT (C4), JPG (C8) and DAC (CC)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class JpegFrame(NamedTuple):
    width: int
    height: int
    components: int  # 1 grayscale, 3 YCbCr (or RGB), 4 CMYK / YCCK
    scan: int  # byte offset of the first start-of-scan marker (the compressed data follows it)


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """A JPEG's frame header and where its first scan starts, by walking the marker segments (microseconds; no
    decoding); None for anything else, or a header this walk does not understand."""
    if data[:2] != b"\xff\xd8":
        return None
    i, frame = 2, None
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif marker == 0xDA:  # start of scan: the frame header came before it
            return frame._replace(scan=i) if frame is not None else None
        else:
            if marker in _JPEG_SOF and frame is None and i + 10 <= len(data):  # FF Cn, length, precision, h, w, Nf
                frame = JpegFrame(int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big"),
                                  data[i + 9], -1)
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header. JPEG and PNG (nearly every sample) are read directly, walking the JPEG
    marker segments to the frame header: a few microseconds, where PIL's identification costs as much as
    decoding a CIFAR thumbnail (``bench/header_check.py``). Anything else, or a header this walk does not
    understand, goes through :func:`image_header` (PIL), which raises ``OSError`` for bytes it cannot identify."""
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 <= len(data) and data[i] == 0xFF:
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
            elif marker in _JPEG_SOF:  # FF Cn, length, precision, height, width
                return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
            elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
                i += 2
            else:
                i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    _, _, width, height = image_header(data)
    return width, height


# The smallest --max-side accepted: below it a 224/256-px crop would come from a heavily upsampled image.
MIN_SIDE = 64


@dataclass(frozen=True)
class ImageRules:
    """What the writer does with each image: leave out those over ``max_pixels``; shrink those whose longer side
    is over ``max_side`` (None: never) and store them as JPEGs of ``jpeg_quality``."""

    max_pixels: int = MAX_IMAGE_PIXELS
    max_side: int | None = None
    jpeg_quality: int = 90

    def check(self) -> None:
        if self.max_pixels < 1:
            raise ShardWriteError(f"--max-pixels {self.max_pixels} must be >= 1 (default {MAX_IMAGE_PIXELS:,}, "
                                  "PIL's limit)")
        if self.max_side is not None and self.max_side < MIN_SIDE:
            raise ShardWriteError(f"--max-side {self.max_side} must be >= {MIN_SIDE} (FFCV stores ImageNet at "
                                  "400-500; below ~342 the 256-px eval resize upsamples a 4:3 image)")
        if not 1 <= self.jpeg_quality <= 95:
            raise ShardWriteError(f"--jpeg-quality {self.jpeg_quality} must be in 1..95 (default 90; above 95 "
                                  "libjpeg only grows the file)")



def _shrunk(data: bytes, width: int, height: int, rules: ImageRules) -> bytes | None:
    """The image re-encoded with its longer side at ``rules.max_side`` (a baseline RGB JPEG), or None when it
    is within the bound (its bytes are kept)."""
    if rules.max_side is None or max(width, height) <= rules.max_side:
        return None
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # max_pixels has judged the size already
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)  # an animated image: its first frame, as the loader reads it
            im.thumbnail((rules.max_side, rules.max_side), Image.Resampling.LANCZOS)
            rgb = im.convert("RGB")
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=rules.jpeg_quality)
    return out.getvalue()


def _too_large(width: int, height: int, max_pixels: int) -> str | None:
    """Why an image of this size is left out, or None when it is kept."""
    if width * height <= max_pixels:
        return None
    return f"{width}x{height} = {width * height:,} pixels > --max-pixels {max_pixels:,}"


_WORKER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def _default_signals() -> None:
    """Pool worker start: the default SIGTERM/SIGINT/SIGUSR1 dispositions, then unblock them (see
    :func:`_worker_pool`). A worker forked from a training rank inherits its stop handler, which only records a
    request; ``Pool.terminate`` (the end of the ``with`` block) holds the task queue's lock and then relies on
    SIGTERM, so a worker still waiting for that lock would never exit and the rank would hang in the join."""
    for s in _WORKER_SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_SIGNALS)


def _worker_pool(workers: int) -> multiprocessing.pool.Pool:
    """A pool whose workers die on SIGTERM whenever it comes. The stop signals are blocked while the workers are
    forked, so one that arrives before a worker's initializer has run stays pending instead of reaching the
    inherited record-only handler (which would leave that worker alive and ``terminate`` hanging); the initializer
    unblocks them once the default dispositions are in place. The parent's own mask is restored right after, so a
    signal sent to the rank meanwhile is delivered to its handler then, not lost."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)
    try:
        return multiprocessing.Pool(workers, initializer=_default_signals)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _write_shard(task: tuple[int, str, list[Sample], ImageRules]) -> _ShardResult:
    index, final, samples, rules = task
    result = _ShardResult(index)
    tmp = f"{final}.partial-{os.getpid()}"
    # A fixed integer mtime: reproducible shards, and no PAX header per member (a float mtime needs one).
    with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=SHARD_MTIME) as sink:
        for s in samples:
            try:
                data = Path(s.path).read_bytes()
                fmt, mode, width, height = image_header(data)
            except UnidentifiedImageError:  # its own message names a BytesIO object, not the file
                result.skipped.append(f"{s.path}: UnidentifiedImageError: not an image format PIL can read")
                continue
            # An unreadable file (OSError), or a damaged header some PIL plugins reject with ValueError or
            # EOFError: either way the file is left out and listed, never a traceback.
            except (OSError, ValueError, EOFError) as e:
                result.skipped.append(f"{s.path}: {type(e).__name__}: {e}")
                continue
            reason = _too_large(width, height, rules.max_pixels)
            if reason:
                result.skipped.append(f"{s.path}: {reason}")
                continue
            try:
                shrunk = _shrunk(data, width, height, rules)
            except (OSError, ValueError, EOFError) as e:  # a header PIL reads but pixels it cannot
                result.skipped.append(f"{s.path}: cannot shrink to --max-side {rules.max_side}: "
                                      f"{type(e).__name__}: {e}")
                continue
            if shrunk is not None:
                data = shrunk
                result.shrunk += 1
            elif (fmt, mode) != ("JPEG", "RGB"):
                result.kinds[f"{fmt}/{mode}"] += 1
            sink.write({"__key__": s.key, "jpg": data, "cls": str(s.label).encode()})
            result.labels[s.label] += 1
    os.replace(tmp, final)
    return result


def _shard_labels(shard: Path) -> Counter:
    """Samples per label in a finished shard (resume counts what an earlier run wrote)."""
    with tarfile.open(shard, "r:") as tar:
        return Counter(int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls"))


def _plan_signature(samples: list[Sample], classes: list[str], shard_size: int, seed: int, rules: ImageRules) -> str:
    h = hashlib.sha256()
    bound = [] if rules.max_side is None else [rules.max_side, rules.jpeg_quality]  # old plans stay resumable
    h.update(json.dumps([classes, shard_size, seed, rules.max_pixels, *bound]).encode())
    for s in samples:
        h.update(f"{s.path}\0{s.label}\n".encode())
    return h.hexdigest()


def _planned_signature(plan_path: Path, out: Path) -> str | None:
    """The signature in an interrupted run's plan file, or None when there is none."""
    if not plan_path.is_file():
        return None
    fix = f"remove {plan_path.name} and the split's shards from {str(out)!r}, or choose another OUT"
    plan = _parse_json(plan_path.read_text(errors="replace"), f"plan file {str(plan_path)!r}", ShardWriteError, fix)
    if not isinstance(plan, dict) or not isinstance(plan.get("signature"), str):
        raise ShardWriteError(f"plan file {str(plan_path)!r} has no field 'signature'; {fix}")
    return plan["signature"]


def make_shards(src: str | Path, out: str | Path, split: str, *, shard_size: int = 1000, workers: int | None = None,
                shuffle_seed: int = 0, prefix: str | None = None, class_mapping: str | Path | None = None,
                resume: bool = False, progress: bool = True, max_pixels: int = MAX_IMAGE_PIXELS,
                strict: bool = False, max_side: int | None = None, jpeg_quality: int = 90) -> dict:
    """Convert the ImageFolder tree ``src`` into shards of ``split`` under ``out``; return the split's index entry.

    The class order comes from ``class_mapping``, else from a split already in ``out``'s index, else from the
    sorted folder names; every split in one ``out`` shares it. Images over ``max_pixels`` (width x height) are
    left out and listed in ``skipped_files``; images whose longer side is over ``max_side`` are stored shrunk to
    it (JPEG of ``jpeg_quality``), counted in ``shrunk_files``. Layout problems are logged and returned in
    ``layout_warnings``, or refused all at once with ``strict``.
    """
    if shard_size < 1:
        raise ShardWriteError(f"--shard-size {shard_size} must be >= 1 (ImageNet: 1000 gives ~110 MB shards)")
    rules = ImageRules(max_pixels, max_side, jpeg_quality)
    rules.check()
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise ShardWriteError(f"--split {split!r} must be a simple name such as train or val")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # OUT is a file, or a parent is read-only: the user's path, not a bug
        raise ShardWriteError(f"cannot create the output directory {str(out)!r}: {e.strerror or e}; pass a "
                              "directory path you can write to") from None
    prefix = prefix or out.resolve().name
    index = read_index(out)
    classes = load_class_mapping(class_mapping) if class_mapping else index.get("classes")
    if class_mapping and index.get("classes") not in (None, classes):
        raise ShardWriteError(f"--class-mapping {str(class_mapping)!r} differs from the classes already in "
                              f"{str(out / INDEX_NAME)!r}; use the same mapping for every split")
    scan = scan_image_folder(src, classes)
    if scan.problems and strict:
        _refuse_layout(src, scan.problems)
    for problem in scan.problems:
        log.warning("%s", problem)
    classes, samples = scan.classes, scan.samples

    if split in index.get("splits", {}):
        raise ShardWriteError(f"{str(out)!r} already holds a complete {split!r} split "
                              f"({index['splits'][split]['num_samples']} samples); choose another OUT")
    rng = random.Random(shuffle_seed)
    order = samples[:]
    rng.shuffle(order)
    chunks = [order[i:i + shard_size] for i in range(0, len(order), shard_size)]
    names = [f"{prefix}-{split}-{i:06d}.tar" for i in range(len(chunks))]
    plan_path = out / f".{prefix}-{split}.plan.json"
    signature = _plan_signature(samples, classes, shard_size, shuffle_seed, rules)
    existing = sorted(out.glob(f"{prefix}-{split}-*.tar"))
    if existing and not resume:
        raise ShardWriteError(f"{str(out)!r} already holds {len(existing)} shards of split {split!r} from an "
                              "interrupted run; pass --resume to finish it, or choose another OUT")
    planned = _planned_signature(plan_path, out) if resume else None
    if planned not in (None, signature):
        raise ShardWriteError(f"cannot resume into {str(out)!r}: the source files, classes, --shard-size, "
                              "--shuffle-seed, --max-pixels, --max-side or --jpeg-quality differ from the "
                              "interrupted run; rerun with the same arguments")
    if resume and existing and planned is None:
        raise ShardWriteError(f"cannot resume into {str(out)!r}: shards exist but no plan file "
                              f"{plan_path.name}; choose another OUT")
    for stale in out.glob(f"{prefix}-{split}-*.tar.partial-*"):
        stale.unlink()
    _write_json_atomic(plan_path, {"signature": signature, "split": split, "num_shards": len(chunks)})

    done = {p.name for p in existing}
    tasks = [(i, str(out / n), c, rules) for i, (n, c) in enumerate(zip(names, chunks, strict=True))
             if n not in done]
    labels = {i: _shard_labels(out / n) for i, n in enumerate(names) if n in done}
    skipped: list[str] = []
    kinds: Counter = Counter()
    shrunk = 0
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks) or 1))
    initial = sum(len(chunks[i]) for i in labels)
    with (Progress(len(samples), f"shards {split}", unit="img", enabled=progress, initial=initial) as bar,
          _worker_pool(workers) as pool):
        for result in pool.imap_unordered(_write_shard, tasks):
            labels[result.index] = result.labels
            skipped += result.skipped
            kinds.update(result.kinds)
            shrunk += result.shrunk
            bar.update(len(chunks[result.index]))
    skipped.sort()  # shards finish in any order; the index should not
    for line in skipped:
        log.warning("left out an image: %s", line)

    written = sum(labels.values(), Counter())
    empty = [name for label, name in enumerate(classes) if not written[label]]
    warnings = scan.problems + _emptied_classes(empty, scan.empty_classes, split)
    entry = {"name": split, "num_samples": sum(written.values()), "filenames": names,
             "shard_lengths": [sum(labels[i].values()) for i in range(len(names))], "shuffle_seed": shuffle_seed,
             "source": str(Path(src).resolve()), "max_pixels": max_pixels, "max_side": max_side,
             "jpeg_quality": jpeg_quality if max_side else None, "shrunk_files": shrunk, "skipped_files": skipped,
             "non_rgb_jpeg_files": dict(sorted(kinds.items())), "empty_classes": empty,
             "layout_warnings": warnings}
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


def _emptied_classes(empty: list[str], without_files: list[str], split: str) -> list[str]:
    """The warning for classes that had image files but got 0 samples because every one was left out."""
    emptied = [name for name in empty if name not in without_files]
    if not emptied:
        return []
    warning = (f"classes with 0 samples in split {split!r} because all their image files were left out "
               f"({len(emptied):,}; see skipped_files): {_some(emptied)}")
    log.warning("%s", warning)
    return [warning]


def summary_lines(entry: dict, out: str | Path) -> list[str]:
    """What ``gpd-ds make-shards`` prints about a split it wrote (``entry`` as :func:`make_shards` returns it)."""
    lengths = entry["shard_lengths"]
    each = f"{lengths[0]:,}" if min(lengths) == max(lengths) else f"{min(lengths):,}-{max(lengths):,}"
    lines = [f"wrote {_plural(entry['num_samples'], 'sample')} of split {entry['name']!r} into "
             f"{_plural(len(lengths), 'shard')} ({each} samples each) under {out}; index: {Path(out) / INDEX_NAME}"]
    skipped = entry["skipped_files"]
    if skipped:
        lines.append(f"left out {_plural(len(skipped), 'file')} (listed in the index under skipped_files):")
        lines += [f"  {line}" for line in skipped[:_NAMED]]
        if len(skipped) > _NAMED:
            lines.append(f"  ... and {len(skipped) - _NAMED:,} more")
    if entry.get("shrunk_files"):
        lines.append(f"shrank {_plural(entry['shrunk_files'], 'image')} to a longer side of {entry['max_side']} px "
                     f"(JPEG quality {entry['jpeg_quality']})")
    kinds = entry["non_rgb_jpeg_files"]
    if kinds:
        parts = [f"{n:,} {kind}" for kind, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))]
        listed = parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"
        lines.append(f"kept {listed} {'file' if sum(kinds.values()) == 1 else 'files'} (converted to RGB when read)")
    lines += [f"warning: {w}" for w in entry["layout_warnings"]]
    return lines
