"""The run: :func:`train` builds the parts, resumes and hands them to :class:`Trainer`, whose step loop reads

    for each optimizer step: train (micro-steps) -> EMA -> log -> checkpoint -> stop check
    at each epoch end (every run.eval_every_epochs) and at the end: evaluate -> keep the best weights

and which exports the best student at the end. Schedules are functions of the step; everything that outlives a
restart is in the :class:`~gpd_ds.train.state.RunState` the checkpoint saves.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

import gpd_ds
from gpd_ds import checkpoint, distributed
from gpd_ds.checkpoint import Resumed
from gpd_ds.config import LossConfig, RunConfig, TrackConfig, TrainConfig
from gpd_ds.distributed import DistInfo
from gpd_ds.ds_config import zero_stage
from gpd_ds.engine import resident_parameters
from gpd_ds.losses import LossOutput
from gpd_ds.preemption import EXIT_PREEMPTED, Preempted, StopRequest, describe
from gpd_ds.progress import Progress
from gpd_ds.run_lock import RunDirInUseError, RunDirLock
from gpd_ds.tracking import Tracker, rewind_metrics
from gpd_ds.train.checkpointer import Checkpointer
from gpd_ds.train.components import Components, build_components
from gpd_ds.train.evaluation import BestWeights, Evaluator, Results
from gpd_ds.train.state import EmaState, Lineage, RankPositions, RunState, TrackerState
from gpd_ds.train.step import NonFiniteWatch, kd_warmup, train_step
from gpd_ds.train.stop_check import StopCheck

log = logging.getLogger("gpd_ds")


@dataclass
class RunResult:
    run_dir: Path
    step: int
    metrics: Results = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    export: str | None = None


class ThroughputWindow:
    """Images and time spent waiting for data since the last training log row."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start, self.samples, self.data_wait = time.perf_counter(), 0, 0.0

    def timed(self, batches: Iterable) -> Iterator:
        """``batches``, adding the time each one took to arrive to ``data_wait``."""
        it = iter(batches)
        while True:
            start = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                return
            self.data_wait += time.perf_counter() - start
            yield batch

    def row(self, c: Components, loss: LossOutput) -> dict[str, float]:
        """The interval's training metrics (the only place the loop syncs with the device)."""
        elapsed = time.perf_counter() - self.start
        engine = c.engine
        row = {f"train/{k}": v.item() for k, v in loss.terms.items()}
        row.update({"train/loss": loss.total.item(), "train/lr": engine.get_lr()[0],
                    "train/images_per_s": self.samples / elapsed, "train/data_wait": self.data_wait / elapsed,
                    "train/bad_samples": c.loader.bad_samples})
        norm = engine.get_global_grad_norm()
        if norm is not None:
            row["train/grad_norm"] = float(norm)
        scaler = getattr(engine.optimizer, "torch_autocast_gradscaler", None)
        if scaler is not None:
            row["train/loss_scale"] = float(scaler.get_scale())
            row["train/skipped_steps"] = engine.skipped_steps
        if torch.cuda.is_available():
            row["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return row


class Trainer:
    """The step loop over built parts (see the module docstring)."""

    def __init__(self, run: RunConfig, loss: LossConfig, c: Components, evaluator: Evaluator, best: BestWeights,
                 checkpointer: Checkpointer, tracker: Tracker, stop: StopRequest, info: DistInfo,
                 run_dir: Path) -> None:
        self.run, self.loss, self.c, self.engine = run, loss, c, c.engine
        self.evaluator, self.best, self.checkpointer, self.tracker = evaluator, best, checkpointer, tracker
        self.stop, self.info, self.run_dir = stop, info, run_dir
        self.spe, self.end = c.steps_per_epoch, c.end_step
        self.watch = NonFiniteWatch(run.max_nonfinite_steps, info.device)
        self.stop_check = StopCheck(stop, run.stop_check_steps, run.stop_latency_s, self.engine.global_steps)
        self.window = ThroughputWindow()
        self.results: Results = {}  # of the newest evaluation

    def fit(self, fresh: bool) -> RunResult:
        """Train from the engine's step to the end step; ``fresh``: the run starts here (not resumed)."""
        with self.stop.deferred():  # from here a stop request is saved at an agreed step (before: it stops at once)
            return self._fit(fresh)

    def _fit(self, fresh: bool) -> RunResult:
        step = self.engine.global_steps
        if fresh and self.run.eval_at_start and step < self.end:
            self.evaluate(step, with_ema=False)
        self.engine.train()
        self.window.reset()
        with Progress(self.end, "train", unit="step", enabled=self.info.is_main, initial=step) as bar:
            while step < self.end:
                step, epoch_end = self.train_epoch(step, bar)
                if step >= self.end or (step == epoch_end and (step // self.spe) % self.run.eval_every_epochs == 0):
                    self.results = self.evaluate(step, with_ema=True)
                    self.best.update(self.results, step, self.engine.module, self.c.ema)
        return self.finish(step)

    def train_epoch(self, step: int, bar: Progress) -> tuple[int, int]:
        """Optimizer steps to the end of ``step``'s epoch (or the end step); returns (step, the epoch's end)."""
        epoch = step // self.spe
        epoch_end = min((epoch + 1) * self.spe, self.end)
        kd_scale = kd_warmup(self.loss, epoch)
        self.c.loader.set_epoch(epoch)
        for batch in self.window.timed(self.c.loader):
            loss = self.micro_step(batch, kd_scale)
            if self.engine.global_steps == step:  # inside a gradient-accumulation cycle
                continue
            step = self.engine.global_steps
            self.after_step(step, loss, epoch, epoch_end, bar)
            if step >= epoch_end:
                break
        return step, epoch_end

    def micro_step(self, batch, kd_scale: float) -> LossOutput:
        c = self.c
        x, y = c.device_tf(batch.images, batch.labels)
        loss = train_step(self.engine, x, y, c.static_teacher, c.loss_fn, c.gpd, c.autocast, c.static_taps, kd_scale)
        self.window.samples += x.shape[0] * self.info.world_size
        return loss

    def after_step(self, step: int, loss: LossOutput, epoch: int, epoch_end: int, bar: Progress) -> None:
        if self.c.ema is not None:
            self.c.ema.update(self.engine.module)
        self.watch.update(loss, step)
        bar.update(1)
        if step % self.run.log_every_steps == 0 or step == epoch_end:
            self.log_train(step, loss, epoch, bar)
        # before any evaluation at this step: evaluating draws from the RNG (DataLoader seeds), and a resumed run
        # must continue from exactly the state an uninterrupted run has here
        if step % self.run.checkpoint_every_steps == 0 or step >= self.end:
            self.save(step)
        if step < self.end:
            self.stop_if_requested(step)

    def log_train(self, step: int, loss: LossOutput, epoch: int, bar: Progress) -> None:
        self.watch.check(self.checkpointer.root)
        row = self.window.row(self.c, loss)
        self.tracker.log(row, step, step / self.spe, step * self.c.global_batch)
        bar.update(0, loss=row["train/loss"], img_s=round(row["train/images_per_s"]), epoch=epoch)
        self.window.reset()

    def save(self, step: int) -> Path:
        self.watch.check(self.checkpointer.root)
        return self.checkpointer.save(step)

    def stop_if_requested(self, step: int) -> None:
        """At the steps the ranks compare requests (:class:`StopCheck`): if any rank was asked to stop, all save here
        (unless just saved) and stop."""
        codes = self.stop_check.at(step)
        if not codes or not any(codes):
            return
        path = self.checkpointer.path_at(step) or self.save(step)
        reason = describe(codes)
        if self.info.is_main:
            log.warning("stopped at step %d on request (%s): checkpoint %s holds every step so far; run the same "
                        "command to resume (exit code %d)", step, reason, path, EXIT_PREEMPTED)
        self.tracker.finish_preempted(EXIT_PREEMPTED)
        raise Preempted(step, path, reason)

    def evaluate(self, step: int, with_ema: bool) -> Results:
        results = self.evaluator(with_ema)
        self.tracker.log(self.evaluator.metrics(results), step, step / self.spe, step * self.c.global_batch)
        if self.info.is_main:
            log.info("step %d (epoch %.2f): %s", step, step / self.spe,
                     ", ".join(f"{k} {d['top1']:.2f}" for k, d in results.items()))
        return results

    def finish(self, step: int) -> RunResult:
        """The final metrics (evaluated now if the loop did not), the export and the tracker's summary."""
        result = RunResult(self.run_dir, step, self.results or self.evaluator(with_ema=True), self.best.record)
        if self.run.export_at_end and self.info.is_main:
            from gpd_ds.export import export_run  # the export builds the plain student: only now

            result.export = str(export_run(self.run_dir, self.run_dir / "export" / "student.safetensors",
                                           which="best"))
        if self.best.record:
            b = self.best.record
            self.tracker.summary({"best/student_top1": b["top1"], "best/weights": b["weights"], "best/step": b["step"]})
        self.tracker.finish({"student": Path(result.export)} if result.export else None)
        distributed.barrier()
        return result


# ------------------------------------------------------------------------------------------------------- set-up


def _prepare(run_dir: Path, resume: str, overwrite: bool, run: RunConfig, info: DistInfo) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    distributed.check_shared_dir(run_dir, info)
    checkpoint.prepare_run_dir(run_dir, resume, overwrite, info)
    distributed.seed_all(run.seed)
    if run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def _versions() -> dict[str, str]:
    import deepspeed
    import timm
    import webdataset
    return {"gpd_ds": gpd_ds.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "timm": timm.__version__, "webdataset": getattr(webdataset, "__version__", "?")}


def _run_record(cfg: TrainConfig, config: dict, c: Components, info: DistInfo, resumed_from: Path | None) -> dict:
    """RUN_DIR/config.json (and the W&B run's config): what ran, where, with which versions."""
    ema = c.ema
    return {"config": config, "scenario": cfg.scenario, "ds_config": c.ds, "world_size": info.world_size,
            "device": str(info.device), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "classes": c.classes, "lr": c.lr, "steps_per_epoch": c.steps_per_epoch, "total_steps": c.total_steps,
            "resident_parameters_per_rank": distributed.all_gather_object(resident_parameters(c.engine.module)),
            "ema_elements_per_rank": distributed.all_gather_object(ema.numel() if ema is not None else 0),
            "versions": _versions(), "resumed_from": str(resumed_from) if resumed_from else None}


def _write_record(run_dir: Path, record: dict, cfg: TrainConfig, c: Components, info: DistInfo) -> None:
    # after the resume decision: a refused resume leaves the old run's record as it was
    (run_dir / "config.json").write_text(json.dumps(record, indent=1, default=str))
    log.info("run %s: recipe %s, scenario %s, %s on %d x %s, global batch %d (%d x %d ranks x %d), lr %.4g, "
             "%d steps/epoch x %d epochs", run_dir, cfg.recipe, cfg.scenario, cfg.model.method, info.world_size,
             info.device.type, c.global_batch, c.ds["train_micro_batch_size_per_gpu"], info.world_size,
             c.ds["gradient_accumulation_steps"], c.lr, c.steps_per_epoch, cfg.optim.epochs)


def _start_tracker(run_dir: Path, track: TrackConfig, record: dict, info: DistInfo, state: TrackerState,
                   resumed_step: int | None) -> Tracker:
    """The metrics log and W&B run; metrics.jsonl is cut back to ``resumed_step`` (rows a crashed run wrote after
    its last checkpoint are written again)."""
    wandb_has = rewind_metrics(run_dir / "metrics.jsonl", resumed_step) if info.is_main else -1
    tracker = Tracker(run_dir, track, record, info.is_main, state.wandb_run_id, wandb_has)
    state.wandb_run_id = distributed.broadcast_object(tracker.run_id)
    distributed.barrier()  # every rank waits for rank 0's (time-limited) W&B start, then all go on together
    return tracker


def train(cfg: TrainConfig, ds_config: dict, run_dir: Path, resume: str, info: DistInfo, overwrite: bool = False,
          stop: StopRequest | None = None) -> RunResult:
    """Train ``cfg`` to the end (or ``run.max_steps``); checkpoints, evaluations and the export go to ``run_dir``.
    ``resume``: auto, none or a path (see :mod:`gpd_ds.checkpoint` for the rules); ``stop``: the process's
    installed stop request (raises :class:`Preempted` after saving when it fires). The run holds ``run_dir``'s lock
    (:mod:`gpd_ds.run_lock`) from here to its end: a second live run there stops before touching it."""
    cfg.validate()
    lock = _lock_run_dir(run_dir, info)
    try:
        return _train(cfg, ds_config, run_dir, resume, info, overwrite, stop)
    finally:
        if lock is not None:
            lock.release()


def _lock_run_dir(run_dir: Path, info: DistInfo) -> RunDirLock | None:
    """Rank 0 takes the lock; every rank stops with its holder's description if it cannot."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock, error = (RunDirLock(run_dir) if info.is_main else None), None
    if lock is not None:
        try:
            lock.acquire()
        except RunDirInUseError as e:
            error = str(e)
    error = distributed.broadcast_object(error)
    if error is not None:
        raise RunDirInUseError(error)
    return lock


def _train(cfg: TrainConfig, ds_config: dict, run_dir: Path, resume: str, info: DistInfo, overwrite: bool,
           stop: StopRequest | None) -> RunResult:
    _prepare(run_dir, resume, overwrite, cfg.run, info)
    c = build_components(cfg, ds_config, info)
    ckpt_root = run_dir / "checkpoints"
    checkpoint.install_engine(c.engine)
    config = json.loads(json.dumps(cfg.to_dict(), default=str))
    resumed = checkpoint.resume(c.engine, resume, ckpt_root, info, config, zero_stage(c.ds))
    # a checkpoint of another run directory starts a new run here (its own metrics.jsonl and W&B run)
    foreign = resumed is not None and resumed.path.parent != ckpt_root
    record = _run_record(cfg, config, c, info, resumed.path if foreign else None)
    if info.is_main:
        _write_record(run_dir, record, cfg, c, info)

    def step() -> int:
        return c.engine.global_steps

    evaluator = Evaluator(c.engine, c.ema, c.static_teacher, c.val_shards, cfg.data, c.device_tf, c.autocast, info,
                          c.zero3)
    best, tracked = BestWeights(run_dir, info, c.zero3, step), TrackerState()
    lineage = Lineage(distributed.broadcast_object(checkpoint.new_lineage()))
    ema = {"ema": EmaState(c.ema, lambda: checkpoint.read_rank_tensors(resumed.path))} if c.ema is not None else {}
    state = RunState(ranks=RankPositions(c.loader, cfg.run.seed, step, info), **ema, best=best, evaluator=evaluator,
                     tracker=tracked, lineage=lineage)
    checkpointer = Checkpointer(c.engine, ckpt_root, cfg.run.keep_checkpoints, info, state, lineage,
                                {"zero_stage": zero_stage(c.ds), "config": config}, cfg.digest(), c.steps_per_epoch)
    if resumed is not None:
        _restore(checkpointer, resumed, tracked, foreign)
    tracker = _start_tracker(run_dir, cfg.track, record, info, tracked, step() if resumed is not None else None)
    trainer = Trainer(cfg.run, cfg.loss, c, evaluator, best, checkpointer, tracker, stop or StopRequest(), info,
                      run_dir)
    return trainer.fit(fresh=resumed is None)


def _restore(checkpointer: Checkpointer, resumed: Resumed, tracked: TrackerState, foreign: bool) -> None:
    checkpointer.restore(resumed)
    if foreign:  # two directories must not write into one W&B run; the source is in the config instead
        tracked.wandb_run_id = None
    else:
        checkpointer.saved_at = checkpointer.engine.global_steps
