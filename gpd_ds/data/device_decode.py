"""Decoding on the device (``data.decode=device``): the loader workers read each sample's file and draw its crop; the
rank decodes the batch on its device and crops it there.

Why: decoding is most of a worker's CPU time (a 500x375 JPEG takes 1.3-1.6 ms of libjpeg-turbo on this project's
CPUs, BENCHMARKS.md), so a GPU eating 3,000-8,000 img/s needs 10-20 loader cores. On a GPU, torchvision's batched
``decode_jpeg(..., device="cuda")`` (nvJPEG, and the A100/H100 hardware JPEG decoder) takes that work; a worker is
left with reading tar members and drawing random numbers.

How the result stays the CPU pipeline's:

* **The same parameters.** The worker (:class:`PlanOnCpu`) seeds each sample as the CPU reader does and draws each
  op's parameters exactly as torchvision's ``v2.Transform.forward`` would (``make_params`` on a meta tensor of the
  image's size, read from its header; the ``p`` draw of a random-apply op first). So crop box, flip and jitter
  factors are those the CPU pipeline draws for that sample, and the stream, positions and bad-sample counts do
  not change: resume stays exact.
* **The same ops.** The rank (:class:`DeviceDecoder`) applies the same transform objects with those parameters
  (``op.transform(image, params)``). On a CPU device the kernels are the CPU pipeline's, so batches are equal
  bit for bit; on CUDA torchvision resizes uint8 images through float32 and rounds, and nvJPEG's IDCT and
  chroma upsampling differ from libjpeg-turbo's, so pixels may differ by a few levels.
* **Which ops.** RandomResizedCrop, pad-and-RandomCrop, horizontal flip and colour jitter (:data:`DEVICE_OPS`). timm's
  RandAugment/AutoAugment/AugMix work on PIL images in the worker, which must then decode: such a run stays on
  ``cpu`` (``auto`` chooses it and says so; ``device`` is refused). Normalisation, random erasing and
  mixup/cutmix were on the device already (``DeviceTransform``). Evaluation decodes on the CPU (4% of an ImageNet
  epoch's images).

Which images go to the device decoder: JPEGs of 1 or 3 components. PNG, GIF, WebP and CMYK JPEGs (22 of ImageNet's
1.28 M train images are CMYK, 1 is a PNG) are decoded by the rank on its CPU. Bad samples: the worker makes every
check the CPU reader makes before decoding (label, header, pixel limit), and one more that needs no decoding: a
JPEG must have an end-of-image marker after its scan data (a truncated file has none). A file that still fails
on the device is decoded on the CPU; one that fails there too is logged, counted against
``data.max_bad_fraction``, and replaced in its batch by the batch's previous good image and label.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2._transform import _RandomApplyTransform

from gpd_ds.data.decode import BadRate, BadSample, DataError, checked_image, decode_bytes, seed_everything
from gpd_ds.data.shards import MAX_IMAGE_PIXELS, jpeg_frame

# The ops whose parameters the worker can draw from the image's size alone, and which run on a device tensor.
DEVICE_OPS = (v2.RandomResizedCrop, v2.RandomCrop, v2.RandomHorizontalFlip, v2.ColorJitter)
_END_OF_IMAGE = b"\xff\xd9"


class EncodedImages(NamedTuple):
    """A batch as the workers ship it with ``data.decode=device``."""

    data: torch.Tensor  # uint8: every sample's file, end to end
    offsets: torch.Tensor  # (B + 1,) int64: sample i is data[offsets[i]:offsets[i + 1]]
    on_device: list[bool]  # for the device's JPEG decoder; else decoded on the rank's CPU
    params: list[tuple]  # per sample, per op: its drawn parameters, or None where a random-apply op skipped
    keys: list[str]  # for the messages about a sample


class PlannedImage(NamedTuple):
    key: str
    data: bytes
    on_device: bool
    params: tuple


def device_ops(transform) -> list[v2.Transform]:
    """The ops of a train transform (:class:`gpd_ds.data.transforms.TensorTransform`), if every one can run on the
    device from parameters drawn in the worker; else a :class:`DataError` naming the first that cannot."""
    ops = list(transform.ops.transforms)
    for op in ops:
        if type(op) not in DEVICE_OPS:
            raise DataError(f"data.decode=device runs {', '.join(t.__name__ for t in DEVICE_OPS)} on the device; "
                            f"this transform has {type(op).__name__} (timm's auto-augment policies run on PIL "
                            "images in the workers): use data.decode=cpu or auto")
    return ops


def draw_params(ops: Sequence[v2.Transform], height: int, width: int) -> tuple:
    """Each op's parameters for an image of ``height`` x ``width``, drawn from the global RNGs in the order and
    with the calls of ``v2.Compose(ops)(image)``; None for a random-apply op whose ``p`` draw skipped it."""
    drawn, size = [], (height, width)
    for op in ops:
        if isinstance(op, _RandomApplyTransform) and torch.rand(1) >= op.p:
            drawn.append(None)
        else:
            params = op.make_params([torch.empty((3, *size), dtype=torch.uint8, device="meta")])
            # tensors (ColorJitter's order) travel as lists: one shared-memory handle per sample would cost more
            drawn.append({k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in params.items()})
        if isinstance(op, v2.RandomResizedCrop | v2.RandomCrop):
            size = tuple(op.size)
    return tuple(drawn)


class PlanOnCpu:
    """The worker's reader for ``data.decode=device``: sample -> (:class:`PlannedImage`, label), no decoding."""

    def __init__(self, transform, num_classes: int, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.ops, self.num_classes, self.max_pixels = device_ops(transform), num_classes, max_pixels

    def __call__(self, sample: dict, seed: int) -> tuple[PlannedImage, int]:
        image = checked_image(sample, self.num_classes, self.max_pixels)
        frame = jpeg_frame(image.data)
        # from the end, where the marker is: a forward search stalls on the 0xFF bytes of the scan data (~0.4 ms)
        if frame is not None and image.data.rfind(_END_OF_IMAGE) < frame.scan:
            raise BadSample(f"truncated .{image.key}: no end-of-image marker after its scan data")
        seed_everything(seed)
        params = draw_params(self.ops, image.height, image.width)
        on_device = frame is not None and frame.components in (1, 3)
        return PlannedImage(sample["__key__"], image.data, on_device, params), image.label

    @staticmethod
    def collate(images: list[PlannedImage]) -> EncodedImages:
        sizes = torch.tensor([0] + [len(im.data) for im in images], dtype=torch.int64)
        data = torch.frombuffer(bytearray(b"".join(im.data for im in images)), dtype=torch.uint8)
        return EncodedImages(data, sizes.cumsum(0), [im.on_device for im in images], [im.params for im in images],
                             [im.key for im in images])


class DeviceDecoder:
    """The rank's side: :class:`EncodedImages` -> (B, 3, S, S) uint8 images on ``device`` and their labels."""

    def __init__(self, transform, device: torch.device | str, max_bad_fraction: float = 0.01, rank: int = 0) -> None:
        self.ops, self.device = device_ops(transform), torch.device(device)
        self.bad = BadRate(max_bad_fraction, f"the device decoder of rank {rank}")

    def __call__(self, images: EncodedImages, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bounds = images.offsets.tolist()
        files = [images.data[a:b] for a, b in itertools.pairwise(bounds)]
        decoded = self._decode_jpegs(files, images.on_device)
        augmented: list[torch.Tensor | None] = []
        for i, file in enumerate(files):
            image = decoded[i]
            if image is None:
                try:
                    image = decode_bytes(file.numpy().tobytes(), images.keys[i]).to(self.device)
                except BadSample as e:
                    self.bad.record({"__key__": images.keys[i], "__url__": "a batch decoded on the device"}, e)
                    augmented.append(None)
                    continue
            self.bad.good()
            augmented.append(self._augment(image, images.params[i]))
        good = [i for i, image in enumerate(augmented) if image is not None]
        if not good:
            raise DataError(f"no image of a batch could be decoded ({', '.join(images.keys[:3])}, ...); check "
                            "the shards, or use data.decode=cpu")
        # a failed sample's place: the previous good sample of the batch (the first good one, at its start)
        source = [i if augmented[i] is not None else max((g for g in good if g < i), default=good[0])
                  for i in range(len(files))]
        return torch.stack([augmented[i] for i in source]), labels[torch.tensor(source)]

    def _decode_jpegs(self, files: list[torch.Tensor], on_device: list[bool]) -> list[torch.Tensor | None]:
        """The device's decode of the files marked for it (one batched call; file by file if that fails, a file
        that fails then left None for the CPU)."""
        decoded: list[torch.Tensor | None] = [None] * len(files)
        chosen = [i for i, flag in enumerate(on_device) if flag]
        if not chosen:
            return decoded
        try:
            images = decode_jpeg([files[i] for i in chosen], mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            images = [self._decode_one(files[i]) for i in chosen]
        for i, image in zip(chosen, images, strict=True):
            decoded[i] = image
        return decoded

    def _decode_one(self, file: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg(file, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None

    def _augment(self, image: torch.Tensor, params: tuple) -> torch.Tensor:
        for op, p in zip(self.ops, params, strict=True):
            if p is not None:
                image = op.transform(image, p)
        return image
