"""Image transforms: crop/resize/augment in the loader workers (-> uint8 tensor), the rest on the device.

torchvision decodes each JPEG straight to a uint8 tensor (libjpeg-turbo) and crops/resizes it with antialiasing,
about 2x faster than PIL decode + PIL resize here (``bench/loader_throughput.py``). timm's RandAugment, which
works on PIL images, then runs on the small crop only. The ops and their order are timm's ``create_transform``.

Workers stop at a uint8 CHW tensor: a quarter of the bytes of a float tensor through the worker
queues and pinned memory. :class:`DeviceTransform` then converts to float, normalises, makes the batch
channels_last and applies random erasing and mixup/cutmix on the device, as timm's prefetcher does.
"""

from __future__ import annotations

import math

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_pil_interp
from torchvision.transforms import InterpolationMode, v2

from gpd_ds.config import Augment
from gpd_ds.data.device_decode import DeviceDecoder, EncodedImages


class TensorTransform:
    """Decoded (3, H, W) uint8 tensor -> (3, S, S) uint8 tensor."""

    def __init__(self, ops: list) -> None:
        self.ops = v2.Compose(ops)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.ops(image)

    def __repr__(self) -> str:
        return f"TensorTransform({self.ops})"


def _interpolation(name: str) -> InterpolationMode:
    modes = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
    if name not in modes:
        raise ValueError(f"interpolation {name!r} is not supported; use one of {sorted(modes)}")
    return modes[name]


def train_transform(image_size: int, augment: Augment, mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
                    ) -> TensorTransform:
    """Decoded image -> (3, S, S) uint8 tensor: RandomResizedCrop, flip, then (if set) colour jitter and timm's
    RandAugment/AutoAugment, in timm's order. Cropping happens on the tensor; only the S x S crop is handed to
    timm's PIL-based auto-augment."""
    crop = (v2.RandomCrop(image_size, padding=augment.pad_crop, pad_if_needed=True) if augment.pad_crop > 0 else
            v2.RandomResizedCrop(image_size, scale=augment.scale, ratio=augment.ratio,
                                 interpolation=_interpolation(augment.interpolation), antialias=True))
    ops = [crop, v2.RandomHorizontalFlip(augment.hflip)]
    if augment.color_jitter:
        ops.append(v2.ColorJitter(augment.color_jitter, augment.color_jitter, augment.color_jitter))
    if augment.auto_augment:
        params = {"translate_const": int(image_size * 0.45), "img_mean": tuple(round(255 * m) for m in mean),
                  "interpolation": str_to_pil_interp(augment.interpolation)}
        name = augment.auto_augment
        policy = (rand_augment_transform(name, params) if name.startswith("rand")
                  else augment_and_mix_transform(name, params) if name.startswith("augmix")
                  else auto_augment_transform(name, params))
        ops += [v2.ToPILImage(), policy, v2.PILToTensor()]
    return TensorTransform(ops)


def eval_transform(image_size: int, crop_pct: float = 0.875, interpolation: str = "bilinear") -> TensorTransform:
    """Decoded image -> (3, S, S) uint8 tensor: shorter side to floor(S / crop_pct) (256 for 224), center crop S
    (timm's eval transform)."""
    return TensorTransform([
        v2.Resize(math.floor(image_size / crop_pct), interpolation=_interpolation(interpolation), antialias=True),
        v2.CenterCrop(image_size),
    ])


class DeviceTransform:
    """uint8 batch -> normalised float batch (channels_last) and targets, with erasing and mixup if set.

    Targets are class indices, or soft (B, K) distributions when mixup/cutmix or label smoothing is on. A batch of
    encoded files (``data.decode=device``) is decoded and cropped first, by ``decoder``.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", augment: Augment | None = None,
                 mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN, std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
                 channels_last: bool = True, decoder: DeviceDecoder | None = None) -> None:
        self.device, self.decoder = torch.device(device), decoder
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255
        self.channels_last = channels_last
        augment = augment or Augment()
        self.erasing = (RandomErasing(augment.random_erasing, mode="pixel", device=str(self.device))
                        if augment.random_erasing > 0 else None)
        self.mixup = None
        if augment.mixup > 0 or augment.cutmix > 0 or augment.label_smoothing > 0:
            self.mixup = Mixup(mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix,
                               prob=1.0 if (augment.mixup > 0 or augment.cutmix > 0) else 0.0,
                               switch_prob=augment.mixup_switch_prob, label_smoothing=augment.label_smoothing,
                               num_classes=num_classes)

    def __call__(self, images: torch.Tensor | EncodedImages, labels: torch.Tensor, train: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(images, EncodedImages):
            if self.decoder is None:
                raise ValueError("a batch of encoded images (data.decode=device) needs a DeviceTransform built with "
                                 "a decoder")
            images, labels = self.decoder(images, labels)
        x = images.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels.to(self.device, non_blocking=True)
        if train and self.erasing is not None:
            x = self.erasing(x)
        if train and self.mixup is not None:
            if x.shape[0] % 2:
                raise ValueError(f"mixup/cutmix needs an even batch size, got {x.shape[0]}")
            x, y = self.mixup(x, y)
        return x, y
