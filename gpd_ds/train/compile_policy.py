"""``run.compile``: whether the trained model and the static teacher are ``torch.compile``d, and why.

``true`` / ``false`` are obeyed. ``auto`` (the default) compiles where it was measured to compute the same losses
and to be faster, and nowhere else: a compile costs ~40 s per model and can fail or slow down on shapes and ZeRO
stages nobody measured. What was measured (BENCHMARKS.md, "torch.compile") is the table below; a new row needs
``bench/gpu_feed.py``'s compiled-vs-eager check on a GPU (losses within its tolerance over its steps, and faster).
"""

from __future__ import annotations

import torch

# (student family, ZeRO stage) -> the measurement that verified it: one GPU, the shipped ds_config of that stage
VERIFIED = {
    ("vit", 0): "DeiT-S -> DeiT-Ti on an H100, bf16, batch 256: 1.63x the eager step, the same losses",
    ("resnet", 0): "ResNet34 -> ResNet18 on an H100, bf16, batch 256: 1.27x the eager step, the same losses",
}
_FAMILIES = (("vit", ("vit_", "deit_", "deit3_")), ("resnet", ("resnet",)))


def family(student: str) -> str | None:
    """The family of a timm student name as :data:`VERIFIED` keys it (None: no row can match)."""
    name = student.split(".")[0]
    return next((fam for fam, prefixes in _FAMILIES if name.startswith(prefixes)), None)


def compile_decision(setting: bool | str, student: str, device: torch.device, zero_stage: int) -> tuple[bool, str]:
    """(compile or not, the reason, for the log) for ``run.compile=setting``."""
    if setting is True or setting is False:
        return setting, f"run.compile={str(setting).lower()}"
    if device.type != "cuda":
        return False, (f"run.compile=auto: off on a {device.type} device (no gain measured on a CPU: ResNet34 -> "
                       "ResNet18 stepped 6.83 s / 3 steps either way; the compile costs ~40 s per model)")
    verified = VERIFIED.get((family(student), zero_stage))
    if verified is None:
        return False, (f"run.compile=auto: off, not verified for {student} at ZeRO-{zero_stage} (verified: "
                       f"{', '.join(f'{f} at ZeRO-{z}' for f, z in VERIFIED)}); set run.compile=true to try it")
    return True, f"run.compile=auto: on ({verified})"
