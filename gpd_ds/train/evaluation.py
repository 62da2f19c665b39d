"""Evaluation during training and the best weights it finds.

:class:`Evaluator` measures the student and the dynamic teacher (live weights, and the EMA's), and the static
teacher once (its weights never change); it remembers the static teacher's accuracy and the dynamic teacher's at the
start of the run (the baseline of its growth) across restarts. :class:`BestWeights` keeps the weights of the best
student top-1 so far in ``RUN_DIR/best/`` for export.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import deepspeed
import torch
from safetensors.torch import save_file
from torch import nn

from gpd_ds import distributed
from gpd_ds.config import DataConfig
from gpd_ds.data.loader import ShardList, eval_loader
from gpd_ds.data.transforms import DeviceTransform, eval_transform
from gpd_ds.distributed import DistInfo
from gpd_ds.ema import ModelEma, PartitionedEma
from gpd_ds.engine import gathered_state_dict
from gpd_ds.evaluate import evaluate
from gpd_ds.models.teacher import StaticTeacher
from gpd_ds.tracking import eval_metrics

Results = dict[str, dict[str, float]]


def _eval_models(module: nn.Module, gpd: bool, suffix: str = "") -> dict[str, Callable]:
    if not gpd:
        return {f"student{suffix}": module}
    return {f"student{suffix}": lambda x: module(x, mode="student"),
            f"dynamic_teacher{suffix}": lambda x: module(x, mode="teacher")}


def _with_ema(ema: PartitionedEma, fn: Callable) -> Callable:
    def run(x: torch.Tensor) -> torch.Tensor:
        with ema.applied():
            return fn(x)
    return run


class Evaluator:
    """Top-1/top-5 on the validation split of every model the run has, exact across ranks."""

    def __init__(self, engine, ema: ModelEma | PartitionedEma | None, static_teacher: StaticTeacher | None,
                 val_shards: ShardList, data: DataConfig, device_tf: DeviceTransform, autocast: Callable,
                 info: DistInfo, zero3: bool) -> None:
        self.engine, self.ema, self.static_teacher = engine, ema, static_teacher
        self.val_shards, self.data, self.device_tf, self.autocast = val_shards, data, device_tf, autocast
        self.info, self.zero3 = info, zero3
        self.transform = eval_transform(data.image_size, data.crop_pct, data.interpolation)
        self.static_teacher_metrics: dict[str, float] | None = None  # measured once
        self.start_dynamic_top1: float | None = None  # the dynamic teacher's at the run's first evaluation

    @property
    def gpd(self) -> bool:
        return hasattr(self.engine.module, "width_ratio")

    def _models(self, with_ema: bool) -> dict[str, Callable]:
        module, ema = self.engine.module, self.ema
        distributed.average_running_stats(module)
        models = _eval_models(module, self.gpd)
        if isinstance(ema, ModelEma) and with_ema:
            distributed.average_running_stats(ema.module)
            models.update(_eval_models(ema.module, self.gpd, "_ema"))
        elif ema is not None and with_ema:  # the engine's module with the EMA swapped into its partitions
            distributed.average_running_stats(ema.shadow_buffers)
            models.update({name: _with_ema(ema, fn) for name, fn in _eval_models(module, self.gpd, "_ema").items()})
        if self.static_teacher is not None and self.static_teacher_metrics is None:
            models["static_teacher"] = self.static_teacher
        return models

    def __call__(self, with_ema: bool) -> Results:
        """Student and dynamic teacher (live, and EMA if ``with_ema``), and the static teacher unless known."""
        d, info = self.data, self.info
        models = self._models(with_ema)
        self.engine.module.eval()
        val = eval_loader(self.val_shards, batch_size=d.eval_batch_size, rank=info.rank, world_size=info.world_size,
                          transform=self.transform, num_workers=d.workers, max_bad_fraction=d.max_bad_fraction,
                          max_pixels=d.max_image_pixels)
        results = evaluate(models, val, self.device_tf, self.autocast, show_progress=info.is_main,
                           expected=self.val_shards.num_samples, max_bad_fraction=d.max_bad_fraction,
                           split=f"split {d.val_split!r}",
                           lockstep=(3, d.image_size, d.image_size) if self.zero3 else None)
        self.engine.module.train()
        self._remember(results)
        module = self.engine.module
        if "dynamic_teacher" in results and hasattr(module, "replica_divergence"):  # every rank: ZeRO-3 gathers
            results["dynamic_teacher"]["replica_divergence"] = module.replica_divergence(
                deepspeed.zero.GatheredParameters if self.zero3 else None)
        return results

    def _remember(self, results: Results) -> None:
        if self.static_teacher_metrics is None:
            self.static_teacher_metrics = results.get("static_teacher")
        else:
            results["static_teacher"] = self.static_teacher_metrics
        if self.start_dynamic_top1 is None and "dynamic_teacher" in results:
            self.start_dynamic_top1 = results["dynamic_teacher"]["top1"]

    def metrics(self, results: Results) -> dict[str, float]:
        """The flat metrics logged for ``results``: accuracies, the two gaps and the dynamic teacher's growth."""
        return eval_metrics(results, self.start_dynamic_top1)

    def state_dict(self) -> dict[str, Any]:
        return {"static_teacher": self.static_teacher_metrics, "start_dynamic_top1": self.start_dynamic_top1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.static_teacher_metrics, self.start_dynamic_top1 = state["static_teacher"], state["start_dynamic_top1"]


class BestWeights:
    """Best = the highest student top-1 of the live or the EMA weights (the reference's save_metric); those weights
    are written to ``RUN_DIR/best/`` (model.safetensors, and best.json with the record)."""

    def __init__(self, run_dir: Path, info: DistInfo, zero3: bool, step: Callable[[], int]) -> None:
        self.dir, self.info, self.zero3, self.step = run_dir / "best", info, zero3, step
        self.record: dict[str, Any] = {}  # {"top1", "weights": raw|ema, "step"}, empty before the first evaluation

    def update(self, results: Results, step: int, module: nn.Module, ema: ModelEma | PartitionedEma | None) -> None:
        candidates = [("raw", results["student"]["top1"])]
        if ema is not None:
            candidates.append(("ema", results["student_ema"]["top1"]))
        which, top1 = max(candidates, key=lambda c: c[1])
        if self.record and top1 <= self.record["top1"]:
            return
        self.record = {"top1": top1, "weights": which, "step": step}
        if isinstance(ema, ModelEma) and which == "ema":
            state = gathered_state_dict(ema.module, zero3=False, keep=self.info.is_main)
        else:
            with ema.applied() if which == "ema" else contextlib.nullcontext():
                state = gathered_state_dict(module, self.zero3, keep=self.info.is_main)
        if self.info.is_main:
            self._write(state)

    def _write(self, state: dict[str, torch.Tensor]) -> None:
        self.dir.mkdir(exist_ok=True)
        tmp = self.dir / ".model.safetensors.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
        os.replace(tmp, self.dir / "model.safetensors")
        (self.dir / ".best.json.tmp").write_text(json.dumps(self.record, indent=1))
        os.replace(self.dir / ".best.json.tmp", self.dir / "best.json")

    def state_dict(self) -> dict[str, Any]:
        return self.record

    def load_state_dict(self, record: dict[str, Any]) -> None:
        """The checkpoint's record, or RUN_DIR/best/best.json where that is newer: the evaluation at a checkpoint's
        step runs after the checkpoint is written, so a run resumed there has not seen it; its result counts if it is
        from before the resumed step and newer than the checkpoint's own record."""
        self.record, step, path = record, self.step(), self.dir / "best.json"
        if not path.is_file():
            return
        disk = json.loads(path.read_text())
        if disk.get("step", step + 1) <= step and disk["step"] > record.get("step", -1):
            self.record = disk
