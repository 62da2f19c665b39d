"""Checkpoints: DeepSpeed's ``save_checkpoint`` on every rank, made atomic by a completion marker, loaded safely.

Layout: ``RUN_DIR/checkpoints/step000001234/`` (DeepSpeed's files, so ``zero_to_fp32`` and ``ds_to_universal``
work on it) plus ``gpd_complete.json``, written by rank 0 after every rank has written its files. The marker is
plain JSON: the step, the world size, the ZeRO stage, the resolved config and the run's *lineage* (an id made when
the run starts from step 0 and carried through every resume).

Rules (each one has a test):

* **Saving** never writes into an existing step directory, checks the free space against the last checkpoint's
  size first, and turns a failed write on any rank (disk full, I/O error) into one error on every rank, naming
  the path and the free bytes, with the partial directory removed and the previous checkpoint intact. Pruning
  keeps the newest ``keep`` complete checkpoints of this run's lineage and touches nothing else.
* **Resuming** (:func:`resume`) tries the newest complete checkpoint first. One that cannot be *read* (truncated,
  I/O error, corrupt pickle) is renamed ``step....unreadable`` (kept for inspection, out of the way of new
  saves) and the previous one is tried, with a warning. One that is *incompatible* with the config (another
  model, width ratio, optimizer or ZeRO stage; tensors of other shapes) stops the run with an error naming what
  differs. One that holds a Python object outside the allow-list stops the run (:class:`UnsafeFileError`).
  If complete checkpoints exist and none loads, the run stops: it never starts over silently.
* **Starting over** (:func:`prepare_run_dir`): ``--resume none`` in a directory that holds checkpoints is refused
  unless ``--overwrite`` is given, which removes the old checkpoints, best weights and metrics first. Incomplete
  step directories (a crash mid-save) are removed at start.

Loading never runs code from a file: every ``torch.load`` (DeepSpeed's own, which pass ``weights_only=False``,
included) runs under :func:`gpd_ds.safeload.safe_loading`: weights-only, with an allow-list of the few types
DeepSpeed puts into its files. Per-rank state (data position, RNG) is gathered into the client state, which
rank 0 saves, as tensors, numbers and strings only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pickle
import re
import shutil
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file

from gpd_ds.distributed import DistInfo, all_gather_object, broadcast_object
from gpd_ds.errors import UserInputError, json_type
from gpd_ds.reshard import reshard
from gpd_ds.safeload import UnsafeFileError, is_unsafe, load_file, safe_loading, scan_file

log = logging.getLogger(__name__)

MARKER = "gpd_complete.json"
RANK_FILE = "gpd_rank{rank:05d}.safetensors"
UNREADABLE = ".unreadable"
_TAG = re.compile(r"^step(\d{9})$")
# what a save of the same model needs beyond the last checkpoint's size (files grow a little with the step count)
SPACE_MARGIN = 1.1
# config keys whose change makes a checkpoint unusable (other shapes, another optimizer state)
INCOMPATIBLE_KEYS = ("model.method", "model.student", "model.student_kwargs", "model.width_ratio",
                     "model.branches", "model.distillation_token", "optim.optimizer", "loss.reviewkd_mid_channels",
                     "loss.student_taps", "loss.teacher_taps")
# what the run outputs besides checkpoints: removed with them by --overwrite
RUN_OUTPUTS = ("checkpoints", "best", "metrics.jsonl")


class CheckpointError(UserInputError, RuntimeError):
    """A checkpoint cannot be written or used; the message names the path and the fix."""


class ResumeError(CheckpointError):
    """No usable checkpoint where one was asked for, or a resume that would lose work."""


class IncompatibleCheckpointError(CheckpointError):
    """A readable checkpoint of another model or optimizer than the config describes."""


class StorageError(CheckpointError):
    """The checkpoint directory is full, read-only or failing."""


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def step_of(path: Path) -> int:
    return int(_TAG.match(path.name).group(1))


def new_lineage() -> str:
    return uuid.uuid4().hex[:12]


# ------------------------------------------------------------------------------------------------- engine


class GuardedCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine with two changes: ``load`` is weights-only (an unsafe file raises
    :class:`UnsafeFileError` naming it) and ``save`` records a failed write instead of raising, so the
    failing rank still reaches DeepSpeed's closing barrier and :func:`save` reports the failure on every rank
    instead of leaving the others waiting for the collective timeout."""

    def __init__(self, config_params=None) -> None:
        super().__init__(config_params)
        self.failures: list[str] = []

    def save(self, state_dict, path: str) -> None:
        try:
            super().save(state_dict, path)
        except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError (iostream error)
            self.failures.append(f"{path}: {type(e).__name__}: {str(e)[:200]}")

    def load(self, path: str, map_location=None):
        return load_file(path, map_location)


def install_engine(engine) -> None:
    """Give a DeepSpeed engine the :class:`GuardedCheckpointEngine` (call once, after ``deepspeed.initialize``).
    DeepSpeed's ZeRO save also copies its two recovery scripts into the checkpoint outside the checkpoint engine;
    a failure there is recorded the same way."""
    guarded = GuardedCheckpointEngine(engine._config)
    engine.checkpoint_engine = guarded
    copy_scripts = engine._copy_recovery_script

    def copy_recording_failures(save_path: str) -> None:
        try:
            copy_scripts(save_path)
        except OSError as e:
            guarded.failures.append(f"{e.filename}: {type(e).__name__}: {e}")

    engine._copy_recovery_script = copy_recording_failures


# ------------------------------------------------------------------------------------------------- markers


@dataclass(frozen=True)
class Marker:
    """What ``gpd_complete.json`` says about a complete checkpoint."""

    path: Path
    step: int
    world_size: int | None
    zero_stage: int | None
    lineage: str | None
    config: dict | None

    @classmethod
    def read(cls, path: Path) -> Marker:
        try:
            data = json.loads((path / MARKER).read_text())
        except (OSError, json.JSONDecodeError) as e:  # written atomically: damage means the disk, not a crash
            raise ResumeError(f"the completion marker {path / MARKER} cannot be read ({e}); move the directory "
                              "away to resume from the previous checkpoint") from e
        if not isinstance(data, dict):
            raise ResumeError(f"the completion marker {path / MARKER} holds a JSON {json_type(data)}, not the object "
                              "gpd_ds writes; move the directory away to resume from the previous checkpoint")
        return cls(path, data.get("step", step_of(path)), data.get("world_size"), data.get("zero_stage"),
                   data.get("lineage"), data.get("config"))


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _TAG.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def _incomplete(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if _TAG.match(p.name) and not (p / MARKER).is_file()]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ------------------------------------------------------------------------------------------------- saving


def _on_main(fn: Callable[[], Any], info: DistInfo) -> Any:
    """Run ``fn`` on rank 0 only; every rank gets its result, or raises its :class:`CheckpointError`."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except CheckpointError as e:
            error = e
        except OSError as e:
            error = StorageError(f"{e.filename or 'the checkpoint directory'}: {type(e).__name__}: {e}")
    result, error = broadcast_object((result, None if error is None else (type(error), str(error))))
    if error is not None:
        raise error[0](error[1])
    return result


def _check_before_save(root: Path, tag: str) -> None:
    path = root / tag
    if path.exists():
        raise CheckpointError(f"{path} exists already; a save never writes into an existing checkpoint. Move it "
                              "away (or start this run in a new --run-dir)")
    previous = complete_checkpoints(root)
    if not previous:
        return
    last = _size(previous[0])
    free = shutil.disk_usage(root).free
    if free < last * SPACE_MARGIN:
        raise StorageError(f"not enough space to save checkpoint {path}: {human_bytes(free)} free on that file "
                           f"system, and the last checkpoint ({previous[0].name}) took {human_bytes(last)}; free "
                           f"space there (or lower run.keep_checkpoints); {previous[0]} is intact")


def save(engine, root: Path, step: int, client_state: dict, keep: int, info: DistInfo, meta: dict,
         rank_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Save on every rank; rank 0 marks it complete (``meta`` goes into the marker: lineage, config, ZeRO stage)
    and prunes this lineage's old checkpoints and the incomplete ones. ``rank_tensors`` (each rank's own, e.g. its
    EMA partitions) go to a file per rank, ``gpd_rank00000.safetensors``... Raises :class:`StorageError` on all
    ranks if any rank failed to write."""
    tag = tag_for(step)
    path = root / tag
    _on_main(lambda: (root.mkdir(parents=True, exist_ok=True), _check_before_save(root, tag)), info)
    failures = engine.checkpoint_engine.failures  # see install_engine
    failures.clear()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    if rank_tensors is not None:
        target = path / RANK_FILE.format(rank=info.rank)
        try:
            tmp = target.with_name(f".{target.name}.tmp")
            save_file({k: v.detach().cpu().contiguous() for k, v in rank_tensors.items()}, str(tmp),
                      metadata={"rank": str(info.rank), "world_size": str(info.world_size)})
            os.replace(tmp, target)
        except OSError as e:
            failures.append(f"{target}: {type(e).__name__}: {e}")
    failed = [(rank, f) for rank, fs in enumerate(all_gather_object(list(failures))) for f in fs]

    def finish() -> None:
        if failed:
            partial = _size(path) if path.is_dir() else 0
            shutil.rmtree(path, ignore_errors=True)
            free = shutil.disk_usage(root).free
            last = complete_checkpoints(root)
            raise StorageError(
                f"writing checkpoint {path} failed on {len({r for r, _ in failed})} rank(s) (rank {failed[0][0]}: "
                f"{failed[0][1]}). With the {human_bytes(partial)} partial checkpoint removed, {human_bytes(free)} "
                "are free on that file system: it is probably full (or failing); free space there or move --run-dir. "
                + (f"The last complete checkpoint {last[0]} is intact" if last else "This was the run's first "
                   "checkpoint: no earlier one was lost"))
        tmp = path / f".{MARKER}.tmp"
        tmp.write_text(json.dumps({"step": step, "time": time.time(), "world_size": info.world_size, **meta}))
        os.replace(tmp, path / MARKER)
        _prune(root, keep, meta.get("lineage"), tag)

    _on_main(finish, info)
    return path


def read_rank_tensors(path: Path) -> list[dict[str, torch.Tensor]]:
    """Every rank's ``rank_tensors`` of checkpoint ``path``, in rank order (safetensors: no code runs)."""
    world = Marker.read(path).world_size
    files = [path / RANK_FILE.format(rank=rank) for rank in range(world or 0)]
    missing = [f.name for f in files if not f.is_file()]
    if not files or missing:
        raise CheckpointError(f"checkpoint {path} lacks the per-rank files {missing[:4] or [RANK_FILE]} of the "
                              f"{world} ranks that wrote it (the partitioned EMA)")
    return [load_safetensors(str(f)) for f in files]


def _lineage(path: Path) -> str | None:
    try:
        return Marker.read(path).lineage
    except ResumeError:  # a damaged marker: not known to be ours, so never pruned
        return "?"


def _prune(root: Path, keep: int, lineage: str | None, newest: str) -> None:
    """Keep the ``keep`` newest complete checkpoints of ``lineage`` (the one just written among them); remove the
    older ones and incomplete directories older than it. Checkpoints of other lineages are never touched."""
    ours = [p for p in complete_checkpoints(root) if _lineage(p) == lineage]
    for old in [p for p in ours if p.name != newest][max(0, keep - 1):]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in _incomplete(root):
        if partial.name < newest:
            shutil.rmtree(partial, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- resuming


def prepare_run_dir(run_dir: Path, spec: str, overwrite: bool, info: DistInfo) -> None:
    """Before a run: refuse ``--resume none`` over existing checkpoints (or, with ``overwrite``, remove the old
    run's outputs) and remove incomplete step directories. Rank 0 acts; every rank gets its error."""
    root = run_dir / "checkpoints"

    def prepare() -> None:
        existing = complete_checkpoints(root)
        if spec == "none" and existing:
            if not overwrite:
                raise ResumeError(
                    f"--resume none: {run_dir} holds {len(existing)} complete checkpoint(s) (newest "
                    f"{existing[0].name}); starting over there would lose them. Resume with --resume auto, use a "
                    "new --run-dir, or add --overwrite to delete the old run's checkpoints, best weights and "
                    "metrics first")
            for name in RUN_OUTPUTS:
                target = run_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
            log.warning("--overwrite: removed the old run's %s from %s", ", ".join(RUN_OUTPUTS), run_dir)
        for partial in _incomplete(root):
            log.warning("removing %s: an incomplete checkpoint (no %s; the save was interrupted)", partial, MARKER)
            shutil.rmtree(partial, ignore_errors=True)

    _on_main(prepare, info)


def _candidates(spec: str, root: Path) -> list[Path]:
    if spec == "auto":
        return complete_checkpoints(root)
    path = Path(spec)
    if (path / MARKER).is_file():
        return [path]
    for sub in (path, path / "checkpoints"):
        found = complete_checkpoints(sub)
        if found:
            return found
    raise ResumeError(f"--resume {spec!r}: no complete checkpoint there (a step000000123 directory with {MARKER}, "
                      "or a run directory holding checkpoints/)")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not k.endswith("_kwargs"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` for every config value that differs (lists and tuples compare equal)."""
    a, b = _flat(json.loads(json.dumps(old, default=str))), _flat(json.loads(json.dumps(new, default=str)))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


@functools.cache
def _defaults() -> dict[str, Any]:
    from gpd_ds.config import TrainConfig

    return _flat(json.loads(json.dumps(TrainConfig().to_dict(), default=str)))


def _added_at_default(key: str, value: Any, old: dict[str, Any]) -> bool:
    """A setting newer than the checkpoint, at its default (which keeps the earlier behaviour): not a change."""
    return key not in old and value == _defaults().get(key)


def _feature_loss(kd: object) -> str:
    """The feature term of a ``loss.kd`` value (its connectors are tensors of the checkpoint)."""
    from gpd_ds.config import split_kd

    return (split_kd(str(kd)) or ("", str(kd)))[1]


def check_compatible(marker: Marker, config: dict, zero_stage: int) -> None:
    """Raise :class:`IncompatibleCheckpointError` if ``marker``'s run cannot continue as ``config``; warn about the
    other differences (a longer schedule, a new lr: the run continues with the new values)."""
    if marker.zero_stage is not None and marker.zero_stage != zero_stage:
        raise IncompatibleCheckpointError(
            f"{marker.path} was written under ZeRO stage {marker.zero_stage} and this job runs stage {zero_stage}; "
            f"resume with a stage-{marker.zero_stage} ds_config (e.g. ds_configs/zero{marker.zero_stage}.json)")
    if marker.config is None:
        return
    changes = config_changes(marker.config, config)
    old = _flat(json.loads(json.dumps(marker.config, default=str)))
    blocking = {k: v for k, v in changes.items() if k in INCOMPATIBLE_KEYS and not _added_at_default(k, v[1], old)}
    kd = changes.get("loss.kd")
    if kd is not None and _feature_loss(kd[0]) != _feature_loss(kd[1]):
        blocking["loss.kd"] = kd  # another feature loss has other connectors' tensors (or none)
    if blocking:
        listed = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in blocking.items())
        raise IncompatibleCheckpointError(
            f"{marker.path} cannot continue with this config: {listed}. Use the checkpoint's values (drop the "
            "--set), or start the new model in a new --run-dir")
    changed = {k: v for k, v in changes.items() if k != "recipe" and not _added_at_default(k, v[1], old)}
    if changed:
        log.warning("the config differs from %s's; continuing with the new values: %s", marker.path.name,
                    "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:12]))


# What a damaged file raises when torch reads it: the file could not be *read*, so an older checkpoint may be.
_UNREADABLE = (OSError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError)
_UNREADABLE_TEXT = ("PytorchStreamReader", "central directory", "iostream", "unexpected EOF", "file not found",
                    "failed reading", "invalid header", "corrupt")


def _classify(e: BaseException) -> str:
    if isinstance(e, UnsafeFileError) or is_unsafe(e):
        return "unsafe"
    if isinstance(e, _UNREADABLE) or (isinstance(e, RuntimeError) and any(t in str(e) for t in _UNREADABLE_TEXT)):
        return "unreadable"
    return "incompatible"


@dataclass
class Resumed:
    """A loaded checkpoint: where from, its marker, and its client state."""

    path: Path
    marker: Marker
    client: dict


@contextlib.contextmanager
def _zero3_elastic(engine, tag: str) -> Iterator[None]:
    """Two gaps of DeepSpeed 0.19.8's ZeRO-3 load without the optimizer state (what an elastic resume asks), filled
    for the duration of the load: it consolidates the weights with ``get_fp32_state_dict_from_zero_checkpoint
    (load_dir)``, dropping the tag (it reads the ``latest`` file, which gpd_ds does not write: the completion marker
    decides), and a rank that did not exist when the checkpoint was written finds no model states file of its own.
    ZeRO-3 model states hold no per-rank tensors (the weights come from the consolidation), so such a rank reads
    rank 0's."""
    import deepspeed.runtime.engine as ds_engine

    consolidate, names = ds_engine.get_fp32_state_dict_from_zero_checkpoint, engine._get_all_ckpt_names

    def names_or_rank0(path: str, tag_: str) -> list[str]:
        own = names(path, tag_)
        return own or sorted(str(p) for p in Path(path, tag_).glob("zero_pp_rank_0_mp_rank_*_model_states.pt"))

    ds_engine.get_fp32_state_dict_from_zero_checkpoint = functools.partial(consolidate, tag=tag)
    engine._get_all_ckpt_names = names_or_rank0
    try:
        yield
    finally:
        ds_engine.get_fp32_state_dict_from_zero_checkpoint = consolidate
        del engine._get_all_ckpt_names  # the class's method again


def _load(engine, marker: Marker, info: DistInfo) -> dict | None:
    """Load one checkpoint. Written by another number of ranks (elastic resume), DeepSpeed loads the weights,
    schedule and step, and :mod:`gpd_ds.reshard` re-partitions the fp32 master weights and the optimizer state
    (momentum, Adam moments) for this job's ranks: the optimizer continues where it stopped."""
    elastic = bool(engine.zero_optimization()) and marker.world_size not in (None, info.world_size)
    partitioned = elastic and engine.zero_optimization_partition_weights()
    with safe_loading(), (_zero3_elastic(engine, marker.path.name) if partitioned else contextlib.nullcontext()):
        load_path, client = engine.load_checkpoint(str(marker.path.parent), tag=marker.path.name,
                                                   load_module_strict=True, load_optimizer_states=not elastic,
                                                   load_lr_scheduler_states=True)
    if elastic and load_path is not None:
        summary = reshard(engine, marker.path, info.rank, info.world_size)
        if info.is_main:
            log.info("checkpoint %s was written by %d ranks and this job has %d: optimizer state re-sharded (%s)",
                     marker.path, marker.world_size, info.world_size, summary)
    return client if load_path is not None else None


def _scan(path: Path, info: DistInfo) -> tuple[str, str] | None:
    """Every rank scans its share of the checkpoint's files (their pickles only, not the tensors): an unsafe or
    damaged file is found on every rank before any rank enters DeepSpeed's loading collectives."""
    files = sorted(path.glob("*.pt"))[info.rank::info.world_size]
    for f in files:
        try:
            scan_file(f)
        except Exception as e:  # reported, never swallowed: the caller raises or skips the checkpoint with it
            return _problem(e, f"{f}: ")
    return None


def _problem(e: BaseException, where: str = "") -> tuple[str, str]:
    """(kind, message) of a failed scan or load; our own errors already name the file."""
    message = str(e)[:600] if isinstance(e, CheckpointError) else f"{where}{type(e).__name__}: {str(e)[:600]}"
    return _classify(e), message


def _worst(problems: list[tuple[str, str]]) -> tuple[str, str]:
    return max(problems, key=lambda p: _SEVERITY.index(p[0]))


def _try_load(engine, marker: Marker, info: DistInfo) -> tuple[dict | None, tuple[str, str] | None]:
    """(client state, None) or (None, (kind, message)) with kind unreadable / unsafe / incompatible."""
    problems = [p for p in all_gather_object(_scan(marker.path, info)) if p]
    if problems:
        return None, _worst(problems)
    try:
        client = _load(engine, marker, info)
    except Exception as e:  # every rank must report, or the others wait in the next collective
        problem = _problem(e)
        if problem[0] == "incompatible":
            log.exception("loading %s failed", marker.path)
        return None, problem
    if client is None:
        return None, ("unreadable", "DeepSpeed found no model states to load")
    return client, None


def _refuse_newer(root: Path, marker: Marker) -> None:
    newer = [p.name for p in complete_checkpoints(root) if step_of(p) > marker.step and p != marker.path]
    if newer:
        raise ResumeError(f"resuming from {marker.path} (step {marker.step}) would overwrite the newer checkpoints "
                          f"{newer[:3]} in {root} as the run goes on; resume into a new --run-dir, or move them away")


def resume(engine, spec: str, root: Path, info: DistInfo, config: dict, zero_stage: int) -> Resumed | None:
    """Load the checkpoint ``spec`` names (``auto``: the newest readable complete one under ``root``; a path: a
    checkpoint or run directory; ``none``: nothing) into ``engine`` on every rank, following the module's rules.
    Returns None when there is nothing to resume (a fresh run)."""
    if spec == "none":
        return None
    # rank 0 lists the directory and every rank takes its list: ranks that listed it themselves while another run
    # wrote into it could disagree on the candidates (and then on everything after)
    candidates = _on_main(lambda: _candidates(spec, root), info)
    skipped: list[str] = []
    for path in candidates:
        marker = Marker.read(path)
        check_compatible(marker, config, zero_stage)
        if spec != "auto":
            _refuse_newer(root, marker)
        client, error = _try_load(engine, marker, info)
        errors = [(rank, e) for rank, e in enumerate(all_gather_object(error)) if e]
        if not errors:
            log.info("resumed from %s", path)
            return Resumed(path, marker, client)
        kind, message = _worst([e for _, e in errors])
        rank = next(r for r, e in errors if e == (kind, message))
        if kind == "unsafe":
            raise UnsafeFileError(f"rank {rank}: {message}")
        if kind == "incompatible":
            raise IncompatibleCheckpointError(f"{path} does not fit this run (rank {rank}: {message}); use the "
                                              "checkpoint's config, or start the new model in a new --run-dir")
        skipped.append(f"{path.name} (rank {rank}: {message[:200]})")
        log.warning("checkpoint %s cannot be read (rank %d: %s); trying the previous one", path, rank, message[:300])
        if path.parent == root:
            _on_main(lambda p=path: _set_aside(p), info)
    if candidates:
        raise ResumeError(f"none of the {len(candidates)} complete checkpoint(s) of --resume {spec!r} could be read: "
                          f"{'; '.join(skipped[:3])}. They are kept as step...{UNREADABLE}. Nothing was trained; "
                          "to start over in this directory: --resume none --overwrite")
    return None


_SEVERITY = ("unreadable", "incompatible", "unsafe")


def _set_aside(path: Path) -> None:
    """Rename an unreadable checkpoint out of the way of the saves that will reuse its step number."""
    target = path.with_name(f"{path.name}{UNREADABLE}")
    n = 1
    while target.exists():
        target, n = path.with_name(f"{path.name}{UNREADABLE}.{n}"), n + 1
    path.rename(target)
    log.warning("kept the unreadable checkpoint as %s (delete it when you no longer need it)", target)
