"""The trained module of a run, from its config: the GPD model (IR of the student) or the plain student."""

from __future__ import annotations

from torch import nn

from gpd_ds.config import ConfigError, TrainConfig, student_kwargs_error
from gpd_ds.gpd import expand
from gpd_ds.models import create_model
from gpd_ds.models.weights import load_weights


def build_student(cfg: TrainConfig, num_classes: int) -> nn.Module:
    m = cfg.model
    try:
        student = create_model(m.student, num_classes=num_classes, image_size=cfg.data.image_size,
                               **m.student_kwargs)
    except TypeError as e:
        if not m.student_kwargs:  # the builder's own bug, not the user's input
            raise
        raise student_kwargs_error(m, e) from e
    if m.student_checkpoint:
        load_weights(student, m.student_checkpoint, f"student ({m.student})")
    if m.distillation_token:
        if not hasattr(student, "set_distilled_training"):
            raise ConfigError(f"model.distillation_token=true needs a DeiT distilled student (e.g. "
                              f"deit_tiny_distilled_patch16_224); {m.student!r} has no distillation token")
        student.set_distilled_training(True)  # train mode returns (class, distillation) logits; eval averages
    return student


def build_model(cfg: TrainConfig, num_classes: int, noise: bool = True) -> nn.Module:
    """The trained module: the GPD model (IR of the student) or, for ``method=plain``, the student itself."""
    student = build_student(cfg, num_classes)
    if cfg.model.method == "plain":
        return student
    size = cfg.data.image_size
    return expand(student, width_ratio=cfg.model.width_ratio, noise_std=cfg.model.noise_std if noise else 0.0,
                  branches=cfg.model.branches, pretrained_student=cfg.scenario == "finetune",
                  input_size=(3, size, size), verify=noise)
