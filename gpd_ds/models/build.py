"""The trained module of a run, from its config: the GPD model (IR of the student) or the plain student."""

from __future__ import annotations

import torch
from torch import nn

from gpd_ds.config import ConfigError, TrainConfig, split_kd, student_kwargs_error
from gpd_ds.features import StudentWithConnector, build_connectors
from gpd_ds.gpd import expand
from gpd_ds.gpd.taps import Tap
from gpd_ds.models import create_model
from gpd_ds.models.peer import PeerModel
from gpd_ds.models.weights import load_weights


def build_student(cfg: TrainConfig, num_classes: int) -> nn.Module:
    m = cfg.model
    init = {} if m.zero_init_last is None else {"zero_init_last": m.zero_init_last}
    try:
        student = create_model(m.student, num_classes=num_classes, image_size=cfg.data.image_size,
                               **m.student_kwargs, **init)
    except TypeError as e:
        if init and "zero_init_last" in str(e):
            raise ConfigError(f"model.zero_init_last={m.zero_init_last} is invalid: {m.student}'s builder has no "
                              "zero_init_last (timm ResNets do); use none") from e
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
    """The trained module: the GPD model (IR of the student), for ``method=plain`` the student itself, for
    ``method=peer`` the student and a same-size peer (:mod:`gpd_ds.models.peer`). With
    feature distillation (``loss.kd`` with a feature loss) the connectors join it, created after IR, fresh and random as
    the reference's (:mod:`gpd_ds.features`)."""
    student = build_student(cfg, num_classes)
    features = split_kd(cfg.loss.kd)[1] != "none"
    if cfg.model.method == "plain":
        return StudentWithConnector(student, *_connectors(cfg, student, num_classes, None)) if features else student
    if cfg.model.method == "peer":  # the online-peer control: a second student, its own weights (models/peer.py)
        return PeerModel(student, build_student(cfg, num_classes))
    size = cfg.data.image_size
    model = expand(student, width_ratio=cfg.model.width_ratio, noise_std=cfg.model.noise_std if noise else 0.0,
                   branches=cfg.model.branches, pretrained_student=cfg.scenario == "finetune",
                   input_size=(3, size, size), verify=noise)
    if features:
        model.attach_connectors(*_connectors(cfg, student, num_classes, cfg.model.width_ratio))
    return model


def _connectors(cfg: TrainConfig, student: nn.Module, num_classes: int, width_ratio: int | None
                ) -> tuple[tuple[Tap, ...], nn.ModuleDict]:
    """The student's taps and connectors to the static teacher's widths (its architecture, read on the meta
    device: no weights, no memory)."""
    with torch.device("meta"):
        teacher = create_model(cfg.model.static_teacher, num_classes=num_classes, image_size=cfg.data.image_size)
    return build_connectors(student, cfg.model.student, teacher, cfg.model.static_teacher, cfg.data.image_size,
                            cfg.loss, width_ratio)
