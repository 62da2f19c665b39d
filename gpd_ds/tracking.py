"""Run tracking on rank 0: ``metrics.jsonl`` in the run directory always, Weights & Biases when available.

W&B is imported lazily. Mode: ``WANDB_MODE`` if set (``disabled`` honoured), else ``track.wandb`` (``auto``:
online with ``WANDB_API_KEY``, offline without: no account needed). ``wandb.init`` runs with a timeout; if W&B
cannot start, the run continues with ``metrics.jsonl`` only and a warning. The API key is never part of the
config W&B receives, and nothing of ours writes it anywhere. The W&B run id is kept in the checkpoint, so a
resumed run continues the same W&B run.

Resuming keeps every step once (:func:`rewind_metrics`): ``metrics.jsonl`` is cut back to the resumed step (a
torn last line from a kill mid-write is dropped), and W&B, which already holds the steps the killed run logged
after its checkpoint, is sent only the steps beyond those (their values are the same in deterministic mode).

Metric names (the same in both sinks):

* every ``log_every_steps``: ``train/loss``, ``train/<term>`` for every GPDLoss term, ``train/lr``,
  ``train/grad_norm``, ``train/loss_scale`` and ``train/skipped_steps`` (fp16), ``train/images_per_s``,
  ``train/data_wait`` (fraction of time waiting for data), ``train/gpu_mem_gb`` (on a GPU),
  ``train/bad_samples``;
* every evaluation: ``eval/<model>/top1`` and ``/top5`` for ``student``, ``dynamic_teacher``, ``static_teacher``,
  ``student_ema``, ``dynamic_teacher_ema``; ``eval/gap/static_minus_dynamic``, ``eval/gap/dynamic_minus_student``,
  ``eval/dynamic_teacher/growth`` (top-1 gained since the start of training), ``eval/dynamic_teacher/
  replica_divergence`` (how far the replicas of its widened tensors have moved apart:
  :meth:`~gpd_ds.gpd.model.GPDModel.replica_divergence`); plus ``epoch`` and ``samples``
  (images seen), which W&B uses as the x-axes of the eval metrics.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from gpd_ds.config import TrackConfig
from gpd_ds.progress import named_while_waiting

log = logging.getLogger(__name__)

GROWTH_KEYS = ("eval/static_teacher/top1", "eval/dynamic_teacher/top1", "eval/student/top1",
               "eval/gap/static_minus_dynamic", "eval/gap/dynamic_minus_student")


def wandb_mode(cfg: TrackConfig) -> str:
    """online / offline / disabled, from WANDB_MODE, else the config, else the presence of an API key."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    if cfg.wandb != "auto":
        return cfg.wandb
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def eval_metrics(results: dict[str, dict[str, float]], start_dynamic_top1: float | None) -> dict[str, float]:
    """Flat eval metrics, with the two gaps and the dynamic teacher's growth."""
    out = {f"eval/{name}/{k}": v for name, r in results.items() for k, v in r.items()
           if k in ("top1", "top5", "replica_divergence")}
    if "dynamic_teacher" in results:
        dynamic = results["dynamic_teacher"]["top1"]
        out["eval/gap/dynamic_minus_student"] = dynamic - results["student"]["top1"]
        if "static_teacher" in results:
            out["eval/gap/static_minus_dynamic"] = results["static_teacher"]["top1"] - dynamic
        if start_dynamic_top1 is not None:
            out["eval/dynamic_teacher/growth"] = dynamic - start_dynamic_top1
    return out


def read_metrics(path: Path) -> tuple[list[dict], bool]:
    """The rows of a ``metrics.jsonl`` and whether its last line was torn (incomplete JSON, dropped). A bad line
    anywhere else raises ``ValueError`` naming the line."""
    lines = [(n, line) for n, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]
    rows = []
    for i, (number, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                return rows, True
            raise ValueError(f"{path}:{number} is not JSON: {e}") from e
    return rows, False


def rewind_metrics(path: Path, step: int | None) -> int:
    """Cut ``metrics.jsonl`` back to the rows of steps ``<= step`` (``None``: a fresh start, no rows), dropping a
    torn last line; atomic. Returns the highest step it held before (-1 if none): the steps W&B already has."""
    if not path.is_file():
        return -1
    try:
        rows, _ = read_metrics(path)
    except ValueError as e:  # a damaged line inside: keep every readable row rather than stop the resume
        log.warning("%s; keeping its readable rows", e)
        rows = [json.loads(line) for line in path.read_text().splitlines() if _is_json(line)]
    logged = max((r.get("step", -1) for r in rows), default=-1)
    kept = [r for r in rows if step is not None and r.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
    if len(kept) < len(rows):
        log.info("%s: removed %d rows after step %s (they are redone from the checkpoint)", path,
                 len(rows) - len(kept), step)
    return logged


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return bool(line.strip())


class Tracker:
    def __init__(self, run_dir: Path, cfg: TrackConfig, config: dict[str, Any], enabled: bool,
                 run_id: str | None = None, wandb_has_through: int = -1) -> None:
        """``wandb_has_through``: the last step the W&B run already holds (a resumed run skips up to it)."""
        self.enabled, self.cfg = enabled, cfg
        self.wandb_has_through = wandb_has_through
        self.path = run_dir / "metrics.jsonl"
        self.start = time.time()
        self.run = None
        self.run_id = run_id
        self.history: list[dict[str, float]] = []
        if enabled:
            self._start_wandb(run_dir, config)

    def _start_wandb(self, run_dir: Path, config: dict[str, Any]) -> None:
        mode = wandb_mode(self.cfg)
        if mode == "disabled":
            log.info("W&B disabled; metrics go to %s", self.path)
            return
        try:
            import wandb

            with named_while_waiting(lambda: f"W&B to start ({mode}; the run goes on without it after "
                                     f"track.init_timeout={self.cfg.init_timeout:g} s)"):
                self.run = wandb.init(
                    project=self.cfg.project, entity=self.cfg.entity, name=self.cfg.name or run_dir.name,
                    group=self.cfg.group, tags=list(self.cfg.tags) or None, notes=self.cfg.notes, config=config,
                    dir=str(run_dir), id=self.run_id, resume="allow", mode=mode,
                    settings=wandb.Settings(init_timeout=self.cfg.init_timeout, silent=True))
            self.run_id = self.run.id
            self.run.define_metric("epoch")
            self.run.define_metric("samples")
            self.run.define_metric("eval/*", step_metric="epoch")
            for model in ("student", "student_ema", "dynamic_teacher", "dynamic_teacher_ema"):
                self.run.define_metric(f"eval/{model}/top1", step_metric="epoch", summary="max")
            log.info("W&B run %s (%s) in %s", self.run_id, mode, run_dir / "wandb")
        except Exception as e:  # W&B is optional: any failure to start it must not stop a multi-node job
            self.run = None
            log.warning("W&B could not start (%s: %s); logging to %s only", type(e).__name__, e, self.path)

    def log(self, metrics: dict[str, float], step: int, epoch: float, samples: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "epoch": round(epoch, 4), "samples": samples,
                  "time": round(time.time() - self.start, 3), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if any(k.startswith("eval/") for k in metrics):
            self.history.append(record)
        if self.run is not None and step > self.wandb_has_through:
            self.run.log({**metrics, "epoch": epoch, "samples": samples}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = v

    def finish_preempted(self, exit_code: int) -> None:
        """Close the W&B run as preempted (W&B shows it so, and the resumed run continues it)."""
        if self.run is None:
            return
        self.run.mark_preempting()
        self.run.finish(exit_code=exit_code)
        self.run = None

    def finish(self, artifacts: dict[str, Path] | None = None) -> None:
        """Log the growth chart (the three accuracies and the two gaps against epoch) and, if configured, the
        exported student as an artifact; close the W&B run."""
        if self.run is None:
            return
        import wandb

        rows = [r for r in self.history if "eval/dynamic_teacher/top1" in r]
        keys = [k for k in GROWTH_KEYS if all(k in r for r in rows)] if rows else []
        if keys:
            chart = wandb.plot.line_series(xs=[r["epoch"] for r in rows], ys=[[r[k] for r in rows] for k in keys],
                                           keys=keys, title="Dynamic teacher growth", xname="epoch")
            self.run.log({"charts/dynamic_teacher_growth": chart})
        if self.cfg.log_artifacts and artifacts:
            for name, path in artifacts.items():
                artifact = wandb.Artifact(name, type="model")
                artifact.add_file(str(path))
                if path.with_suffix(".json").is_file():
                    artifact.add_file(str(path.with_suffix(".json")))
                self.run.log_artifact(artifact)
        self.run.finish()
        self.run = None
