"""One sample's checks and decoding, and the reader a loader worker runs on each sample.

A reader turns a raw sample (tar member bytes by extension) into what the worker puts in its batch:

* :class:`CpuDecode` (``data.decode=cpu``): decode here, crop and augment here -> a (3, S, S) uint8 tensor;
* :class:`gpd_ds.data.device_decode.PlanOnCpu` (``data.decode=device``): check the sample and draw its augmentation
  parameters here, leave the decoding to the rank's device.

Both check a sample the same way (:func:`checked_image`) and seed its augmentation with the same per-sample seed,
so a run's samples, bad-sample counts and stream positions do not depend on where the pixels are decoded.
"""

from __future__ import annotations

import io
import logging
import random
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from gpd_ds.data.shards import MAX_IMAGE_PIXELS, image_size
from gpd_ds.errors import UserInputError

log = logging.getLogger("gpd_ds.data.loader")  # the loaders' logger: one place to filter data warnings

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class BadSample(Exception):
    """One sample that cannot be decoded."""


class DataError(UserInputError, RuntimeError):
    """The data cannot be used as configured (names the input and the fix)."""


# The bad-sample rule's minimum: before this many samples a reader judges nothing on its own (the first sample
# being bad would be a 100% rate); at the end of an epoch or an evaluation the whole of it is judged regardless.
BAD_RATE_MIN_SAMPLES = 200


class BadRate:
    """The one bad-sample rule of every loader (streaming train, in-memory, eval): each bad sample is logged
    with its shard and key and counted; the run stops with a :class:`DataError` when more than ``max_fraction``
    of the samples read so far were bad: checked on every bad sample once ``BAD_RATE_MIN_SAMPLES`` were read,
    and over everything read at the end of each epoch / evaluation (``check(final=True)``)."""

    def __init__(self, max_fraction: float, where: str, seen: int = 0, bad: int = 0) -> None:
        self.max_fraction, self.where, self.seen, self.bad = max_fraction, where, seen, bad

    def good(self) -> None:
        self.seen += 1

    def record(self, sample: dict, reason: BadSample) -> None:
        self.seen += 1
        self.bad += 1
        log.warning("skipping bad sample %r in %s: %s", sample.get("__key__"), sample.get("__url__"), reason)
        self.check()

    def check(self, final: bool = False) -> None:
        if (final or self.seen >= BAD_RATE_MIN_SAMPLES) and self.bad > self.max_fraction * self.seen:
            raise DataError(
                f"{self.bad} of {self.seen} samples read by {self.where} were bad (> data.max_bad_fraction="
                f"{self.max_fraction}); check the shards (the warnings above name each bad sample), or raise "
                "data.max_bad_fraction")



class CheckedImage(NamedTuple):
    key: str  # the member's extension (jpg, png, ...)
    data: bytes
    label: int
    width: int
    height: int


def checked_image(sample: dict, num_classes: int, max_pixels: int = MAX_IMAGE_PIXELS) -> CheckedImage:
    """A sample's image bytes, label and size (from the header), every check that needs no decoding passed;
    raises :class:`BadSample` with the reason."""
    if "__bad__" in sample:
        raise BadSample(sample["__bad__"])
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
        width, height = image_size(data)
    except (OSError, ValueError, SyntaxError) as e:
        raise BadSample(f"cannot identify .{image_key} as an image: {str(e)[:200]}") from e
    if width * height > max_pixels:
        raise BadSample(f".{image_key} is {width}x{height} = {width * height:,} pixels, over "
                        f"data.max_image_pixels={max_pixels:,}")
    return CheckedImage(image_key, data, label, width, height)


def decode_bytes(data: bytes, what: str = "image") -> torch.Tensor:
    """(3, H, W) uint8 RGB of an image file's bytes on the CPU; raises :class:`BadSample` naming ``what``.

    Read by content (a PNG named .jpg is fine). JPEGs: torchvision (libjpeg-turbo), which converts grayscale and
    CMYK to RGB and raises on a truncated or damaged file. Everything else (PNG, GIF, WebP; rare in photo datasets):
    PIL, as torchvision's and timm's folder datasets read it, because torchvision 0.29's PNG decoder crashes the
    process (SIGSEGV) on a PNG whose compressed data fails its checksum instead of raising. Of an animated image
    the first frame is the sample, and only that frame is decoded, so the pixel limit covers what is decoded."""
    try:
        if data[:3] == b"\xff\xd8\xff":
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return _first_frame(data)
    except (OSError, RuntimeError, ValueError, SyntaxError, EOFError) as e:
        raise BadSample(f"cannot decode {what}: {str(e).splitlines()[0][:200]}") from e


def decode(sample: dict, num_classes: int, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[torch.Tensor, int]:
    """(3, H, W) uint8 RGB image and label of one sample; raises :class:`BadSample` with the reason. An image over
    ``max_pixels`` (width x height, from its header) is refused before anything is decoded."""
    image = checked_image(sample, num_classes, max_pixels)
    return decode_bytes(image.data, f".{image.key}"), image.label


def _first_frame(data: bytes) -> torch.Tensor:
    """The first frame of an image PIL reads, in RGB (PIL's ``Image.open(...).convert("RGB")``, which
    torchvision's and timm's folder datasets use, also takes the first). PIL's own size limit is lifted: the
    caller has applied ``data.max_image_pixels``."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)
            rgb = np.asarray(im.convert("RGB"))
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def seed_everything(seed: int) -> None:
    """Seed the RNGs torchvision and timm transforms draw from (torch CPU, random, numpy).

    Only the CPU generator: ``torch.manual_seed`` also queues lazy CUDA/XPU/MTIA seeding, formatting a stack
    trace each call (~1 ms per sample)."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class CpuDecode:
    """The worker decodes, crops and augments: sample -> ((3, S, S) uint8 tensor, label); batches are stacked."""

    def __init__(self, transform, num_classes: int, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.transform, self.num_classes, self.max_pixels = transform, num_classes, max_pixels

    def __call__(self, sample: dict, seed: int) -> tuple[torch.Tensor, int]:
        image, label = decode(sample, self.num_classes, self.max_pixels)
        seed_everything(seed)
        return self.transform(image), label

    @staticmethod
    def collate(images: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(images)
