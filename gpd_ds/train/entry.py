"""The command-line entry after the arguments are checked (:mod:`gpd_ds.train_cli`): the run directory, logging,
the demo's static teacher, :func:`~gpd_ds.train.loop.train`, exit codes and the summary a user reads at the end."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from gpd_ds import distributed
from gpd_ds.config import ConfigError, TrainConfig, apply_overrides
from gpd_ds.config_checks import check_config
from gpd_ds.data.demo import cache_dir
from gpd_ds.distributed import DistInfo
from gpd_ds.errors import UserInputError
from gpd_ds.preemption import EXIT_PREEMPTED, Preempted, StoppedOutsideTraining, StopRequest
from gpd_ds.recipes import get_recipe
from gpd_ds.train.loop import RunResult, train

log = logging.getLogger("gpd_ds")


def run(args: argparse.Namespace, cfg: TrainConfig, ds_config: dict) -> int:
    """Train ``cfg`` (validated, from the parsed arguments of :func:`gpd_ds.train_cli.build_parser`) with the
    checked ``ds_config``; returns the exit code."""
    stop = StopRequest().install()  # first: a SIGTERM during start-up must not kill the rank either
    info = None
    try:
        check_config(cfg)
        info = distributed.init()
        run_dir = _run_dir(args, cfg)
        _writable_run_dir(run_dir)
        _setup_logging(run_dir, info.rank)
        if _demo_needs_teacher(cfg):
            cfg.model.static_teacher_checkpoint = _demo_teacher(ds_config, run_dir, info, args.overrides, stop)
        result = train(cfg, ds_config, run_dir, args.resume, info, args.overwrite, stop)
    except Preempted:
        return EXIT_PREEMPTED
    except StoppedOutsideTraining as e:
        if os.environ.get("RANK", "0") == "0":  # every rank stops; one line says so
            print(f"gpd-ds train: {e} (exit code {EXIT_PREEMPTED})", file=sys.stderr)
        _log_to_files(str(e))
        return EXIT_PREEMPTED
    except UserInputError as e:
        print(f"gpd-ds train: error: {e}", file=sys.stderr)
        _log_to_files(f"stopped: {e}")
        return 2
    except Exception:  # a bug or an environment failure: keep the traceback, on stderr and in the rank's log
        _log_to_files("failed with an unexpected error", exc_info=sys.exc_info())
        raise
    finally:
        stop.uninstall()
    if info.is_main:
        _print_summary(result, cfg)
    return 0


def _setup_logging(run_dir: Path, rank: int) -> None:
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    file = logging.FileHandler(logs / f"rank{rank}.log")
    file.setFormatter(fmt)
    root.addHandler(console)
    root.addHandler(file)
    # DeepSpeed's own warnings once (rank 0); other ranks print only gpd_ds's warnings and errors
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING if rank == 0 else logging.ERROR)


def _log_to_files(message: str, exc_info=None) -> None:
    """Write ``message`` (and a traceback) to RUN_DIR/logs/rankN.log only: the console already shows the error,
    and on a cluster the rank logs are where a failed job is read afterwards. Before logging is set up there is
    no rank log, and nothing to do."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _run_dir(args: argparse.Namespace, cfg: TrainConfig) -> Path:
    if args.run_dir:
        return Path(args.run_dir)
    stamp = distributed.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
    return Path("runs") / f"{cfg.recipe}-{stamp}"


def _writable_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` and prove it takes files, before any work."""
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--run-dir {str(run_dir)!r} cannot be written ({e.strerror or e}); choose a writable "
                          "directory (on a file system every node mounts, for multi-node jobs)") from e


def _demo_needs_teacher(cfg: TrainConfig) -> bool:
    m = cfg.model
    return bool(cfg.recipe == "demo" and cfg.data.root is None and m.static_teacher
                and not m.static_teacher_checkpoint and not m.static_teacher_pretrained)


def _demo_teacher(ds_config: dict, run_dir: Path, info: DistInfo, overrides: list[str], stop: StopRequest) -> str:
    """The demo's static teacher: trained once by the framework itself (no GPD), cached as a plain student."""
    teacher_cfg = get_recipe("demo_teacher")
    apply_overrides(teacher_cfg, [o for o in overrides if o.startswith(("data.", "run.seed"))])
    path = cache_dir() / f"demo-teacher-{teacher_cfg.digest()}.safetensors"
    if not path.is_file():
        if info.is_main:
            log.info("training the demo's static teacher (%s, once; cached at %s)", teacher_cfg.model.student, path)
        result = train(teacher_cfg, ds_config, run_dir / "static_teacher", "auto", info, stop=stop)
        if info.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(Path(result.export).read_bytes())
            os.replace(tmp, path)
        distributed.barrier()
    return str(path)


def _print_summary(result: RunResult, cfg: TrainConfig) -> None:
    m = result.metrics
    rows = [(name, m[key]) for name, key in (("static teacher", "static_teacher"),
                                             ("dynamic teacher", "dynamic_teacher"),
                                             ("dynamic teacher (EMA)", "dynamic_teacher_ema"),
                                             ("student", "student"), ("student (EMA)", "student_ema")) if key in m]
    print(f"\n{'model':24}{'top-1':>8}{'top-5':>8}   ({m['student']['samples']} val images)")
    for name, d in rows:
        print(f"{name:24}{d['top1']:8.2f}{d['top5']:8.2f}")
    if "dynamic_teacher" in m:
        if "static_teacher" in m:
            print(f"gap static - dynamic teacher: {m['static_teacher']['top1'] - m['dynamic_teacher']['top1']:+.2f}")
        print(f"gap dynamic teacher - student: {m['dynamic_teacher']['top1'] - m['student']['top1']:+.2f}")
    if result.best:
        print(f"best student top-1 {result.best['top1']:.2f} ({result.best['weights']} weights, step "
              f"{result.best['step']})")
    if result.export:
        print(f"exported student: {result.export} (+ .json sidecar)")
    print(f"run directory: {result.run_dir}")
    if cfg.data.root is None:
        print("\nOn your own data: gpd-ds make-shards /data/imagenet/train /data/in1k-wds --split train (and val), "
              "then\n  deepspeed launch/train.py --deepspeed_config ds_configs/zero2.json --recipe "
              "resnet18_from_resnet34 --set data.root=/data/in1k-wds --set "
              "model.static_teacher_checkpoint=resnet34.safetensors")
