"""Graceful stop: a stop request on any rank makes every rank stop at the same optimizer step, save a complete
checkpoint there and exit with :data:`EXIT_PREEMPTED` (75), so no step is lost.

Stop requests:

* ``SIGTERM``: SLURM at the time limit, on preemption and on ``scancel``; Kubernetes; DeepSpeed's launcher
  forwarding its own SIGTERM/SIGINT to the ranks (it waits 30 s, then SIGKILLs them);
* ``SIGUSR1``: SLURM's early warning (``#SBATCH --signal=USR1@600``, see ``launch/slurm.sbatch``);
* ``SIGINT``: Ctrl-C (a second Ctrl-C stops at once, without a checkpoint);
* the ``deepspeed`` runner that started this node's launcher has exited: a SIGTERM sent to the runner alone,
  which DeepSpeed's single-node runner does not forward, would otherwise leave the ranks running orphaned.

Agreement: at steps chosen from the measured step time (:mod:`gpd_ds.train.stop_check`: within
``run.stop_latency_s`` of a request, every step when steps are slow) the ranks exchange their requests in one small
all-reduce over a CPU (gloo) group, so the check never synchronises the GPU and costs one message per interval.
During start-up (before the training loop) a request stops the process at once (:class:`StoppedOutsideTraining`):
there is nothing to save yet, and start-up can take minutes.

Data loader workers ignore these signals (:func:`ignore_stop_signals` is their ``worker_init_fn``): SIGTERM sent
to the whole process tree must not kill a worker, which would abort the rank in the middle of its save. The
price: at exit, multiprocessing stops the daemonic workers a DataLoader left running (an exception raised
mid-epoch keeps its iterator alive in the traceback) with a SIGTERM they ignore, and then waits for them forever;
so an exit handler kills them first (:func:`_kill_leftover_workers`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import multiprocessing.util  # registers its exit handler before ours below, so ours runs first
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint of the last step; rerun to resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_RUNNER_GONE = 255  # the code :meth:`StopRequest.local_code` reports when the deepspeed runner has exited


class Preempted(Exception):
    """Training stopped on a stop request, after saving a checkpoint at ``step`` in ``path``."""

    def __init__(self, step: int, path: Path, reason: str) -> None:
        super().__init__(f"stopped at step {step} ({reason}); checkpoint {path}")
        self.step, self.path, self.reason = step, path, reason


def ignore_stop_signals(_worker_id: int | None = None) -> None:
    """A data loader worker's ``worker_init_fn``: the rank, not the worker, decides when to stop."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _kill_leftover_workers() -> None:
    """Kill this process's daemonic children (loader workers; they ignore SIGTERM) before multiprocessing's own
    exit handler joins them (exit handlers run last registered, first run)."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(_kill_leftover_workers)


def describe(codes: list[int]) -> str:
    """What asked for the stop, from every rank's :meth:`StopRequest.local_code` (e.g. ``SIGTERM on ranks [0, 1]``)."""
    asked = [(rank, code) for rank, code in enumerate(codes) if code]
    parts = []
    for code in sorted({c for _, c in asked}):
        ranks = [r for r, c in asked if c == code]
        what = "the deepspeed runner's exit" if code == _RUNNER_GONE else signal.Signals(code).name
        parts.append(f"{what} on rank{'s' if len(ranks) > 1 else ''} {ranks if len(ranks) > 1 else ranks[0]}")
    return "; ".join(parts)


class StoppedOutsideTraining(Exception):
    """A stop request outside the training steps (start-up: model build, data, teacher, rendezvous): nothing is
    saved there, so the process stops at once."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped during start-up on {signal.Signals(signum).name}, before the first training step: "
                         "nothing to save; run the same command to start again")
        self.signum = signum


class StopRequest:
    """This process's stop request: the first stop signal received, or the launcher's runner gone.

    Outside :meth:`deferred` (start-up) a stop signal raises :class:`StoppedOutsideTraining` at once: start-up
    holds nothing to save and may run for minutes. Inside (the training loop) it is recorded, and the ranks save and
    stop at the next step they compare requests (:mod:`gpd_ds.train.stop_check`)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._runner: tuple[int, float] | None = None
        self._previous: dict[int, object] = {}
        self._deferred = False

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Record stop requests instead of stopping at once (around the training loop)."""
        previous, self._deferred = self._deferred, True
        try:
            yield
        finally:
            self._deferred = previous

    def install(self) -> StopRequest:
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._on_signal)
        self._runner = _deepspeed_runner()
        return self

    def uninstall(self) -> None:
        """Restore the handlers :meth:`install` replaced: processes forked later (a multiprocessing pool's
        workers) would otherwise inherit a SIGTERM handler that only records a request, and outlive a
        ``terminate()``."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _on_signal(self, signum: int, _frame) -> None:
        if not self._deferred:
            raise StoppedOutsideTraining(signum)
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now
        if self.signum is None:
            self.signum = signum
            if os.environ.get("RANK", "0") == "0":  # os.write, not logging: the handler may interrupt a log call
                os.write(2, f"gpd_ds: {signal.Signals(signum).name} received: saving a checkpoint after the step in "
                            "flight (within run.stop_latency_s), then stopping (Ctrl-C again: stop now, without "
                            "it)\n".encode())

    def local_code(self) -> int:
        """0 (no request), a signal number, or the runner-gone code."""
        if self.signum is not None:
            return self.signum
        if self._runner is not None and not _alive(*self._runner):
            return _RUNNER_GONE
        return 0


def _deepspeed_runner() -> tuple[int, float] | None:
    """(pid, start time) of the ``deepspeed`` runner above this rank: this process's parent is DeepSpeed's
    per-node launcher (``deepspeed.launcher.launch``) and its parent is the runner. None when started otherwise."""
    try:
        parent = psutil.Process(os.getppid())
        if not any("deepspeed.launcher.launch" in part for part in parent.cmdline()):
            return None
        runner = parent.parent()
        if runner is None or not any("deepspeed" in part for part in runner.cmdline()):
            return None
        return runner.pid, runner.create_time()
    except psutil.Error:
        return None


def _alive(pid: int, started: float) -> bool:
    try:
        p = psutil.Process(pid)
        return p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
