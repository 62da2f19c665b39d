"""One live run per run directory.

Rank 0 of a run holds ``RUN_DIR/gpd_run.lock`` from its start to its end: plain JSON naming the holder (host, pid,
the pid's start time, the host's boot id, the start time) and a heartbeat rewritten every ``HEARTBEAT_S`` seconds.
A second run that meets a live holder stops before touching anything, with one line naming it; a requeued job whose
first copy is still alive is the usual cause. A lock whose holder is dead never blocks:

* on the holder's host: its pid is gone or is another process (pid reuse: the start time differs), or the host
  has rebooted since (another boot id);
* from another host (a shared file system): its heartbeat is older than ``STALE_AFTER_S`` (a lost node).

A stale lock is renamed aside (one rename: of two runs that find it stale at once, one takes it) and the run
starts; it logs whose lock it took over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from gpd_ds.errors import UserInputError

log = logging.getLogger(__name__)

LOCK_NAME = "gpd_run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 150.0  # five missed heartbeats


class RunDirInUseError(UserInputError, RuntimeError):
    """Another live run holds the run directory."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


@dataclass
class Holder:
    host: str
    pid: int
    pid_started: float | None
    boot_id: str
    started: str
    heartbeat: float
    token: str

    @classmethod
    def me(cls, token: str) -> Holder:
        return cls(socket.gethostname(), os.getpid(), _pid_started(os.getpid()), _boot_id(),
                   time.strftime("%Y-%m-%d %H:%M:%S %Z"), time.time(), token)

    def alive(self) -> bool:
        if self.host == socket.gethostname() and self.boot_id == _boot_id():
            started = _pid_started(self.pid)
            return started is not None and (self.pid_started is None or abs(started - self.pid_started) < 1.0)
        if self.host == socket.gethostname():
            return False  # the host rebooted since
        return time.time() - self.heartbeat < STALE_AFTER_S

    def describe(self) -> str:
        beat = time.time() - self.heartbeat
        return f"host {self.host}, pid {self.pid}, started {self.started}, last heartbeat {beat:.0f} s ago"


class RunDirLock:
    """The lock of ``run_dir`` (rank 0 acquires and releases it; see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        for _ in range(3):
            if self._create():
                self._thread = threading.Thread(target=self._beat, daemon=True, name="gpd_ds-run-lock")
                self._thread.start()
                return
            holder = self._read()
            if holder is None:  # being written this instant, or damaged: judged by the file's age
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - self.path.stat().st_mtime < STALE_AFTER_S:
                        raise RunDirInUseError(f"--run-dir {str(self.path.parent)!r} is being taken by another run "
                                               f"({self.path} is unreadable and fresh); wait, or choose another "
                                               "--run-dir")
            elif holder.alive():
                raise RunDirInUseError(
                    f"--run-dir {str(self.path.parent)!r} is in use by a live run ({holder.describe()}); wait for it "
                    "to end or stop it (it saves, and the same command resumes it), or choose another --run-dir")
            self._set_aside(holder)
        raise RunDirInUseError(f"--run-dir {str(self.path.parent)!r}: could not take {self.path} (other runs keep "
                               "taking it); choose another --run-dir")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        holder = self._read()
        if holder is not None and holder.token == self.token:
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(Holder.me(self.token)), f)
        return True

    def _read(self) -> Holder | None:
        try:
            return Holder(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _set_aside(self, holder: Holder | None) -> None:
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.token}")
        with contextlib.suppress(FileNotFoundError):  # another run took it first: try again
            os.rename(self.path, aside)
            aside.unlink(missing_ok=True)
            log.warning("took over the lock of %s from a run that is gone (%s)", self.path.parent,
                        holder.describe() if holder else "unreadable lock file")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            holder = self._read()
            if holder is None or holder.token != self.token:
                log.error("the run lock %s was taken over by another run; two runs may now write this directory",
                          self.path)
                return
            holder.heartbeat = time.time()
            tmp = self.path.with_name(f".{LOCK_NAME}.{self.token}.tmp")
            with contextlib.suppress(OSError):
                tmp.write_text(json.dumps(asdict(holder)))
                os.replace(tmp, self.path)
