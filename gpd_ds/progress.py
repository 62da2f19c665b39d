"""Progress display: a tqdm bar on a terminal, a plain line every ``interval`` seconds otherwise (CI, SLURM logs)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from tqdm import tqdm

log = logging.getLogger("gpd_ds.progress")


class Progress:
    """``with Progress(total, "shards train", unit="img") as p: p.update(n, loss=...)``.

    ``enabled=False`` (e.g. on ranks other than 0) shows nothing.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", enabled: bool = True,
                 interval: float = 30.0, initial: int = 0) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.count, self.start, self.last_line = initial, time.monotonic(), time.monotonic()
        self.fields: dict[str, Any] = {}
        self.enabled = enabled
        self.bar = (tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True)
                    if enabled and sys.stderr.isatty() else None)

    def update(self, n: int = 1, **fields: Any) -> None:
        self.count += n
        self.fields.update(fields)
        if self.bar is not None:
            self.bar.update(n)
            if fields:
                self.bar.set_postfix(self.fields, refresh=False)
        elif self.enabled and time.monotonic() - self.last_line >= self.interval:
            self._line()

    def _line(self) -> None:
        self.last_line = time.monotonic()
        elapsed = self.last_line - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        done = f"{self.count}/{self.total}" if self.total else str(self.count)
        eta = (f", eta {(self.total - self.count) / rate:.0f}s" if self.total and rate > 0 else "")
        extra = "".join(f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}" for k, v in self.fields.items())
        log.info("%s: %s %s (%.1f %s/s%s)%s", self.desc, done, self.unit, rate, self.unit, eta, extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def named_while_waiting(what: Callable[[], str], after_s: float = 10.0, every_s: float = 30.0) -> Iterator[None]:
    """While the block runs, say on stderr after ``after_s`` and then every ``every_s`` what it waits on
    (``what()``, asked each time), so that a wait never looks like a silent hang. stderr, not the log: start-up
    silences other ranks' stdout, and logging may not be set up yet."""
    done = threading.Event()
    start = time.time()

    def report() -> None:
        wait = after_s
        while not done.wait(wait):
            print(f"gpd_ds rank {os.environ.get('RANK', '0')}: waiting {time.time() - start:.0f} s for {what()}",
                  file=sys.stderr, flush=True)
            wait = every_s

    thread = threading.Thread(target=report, daemon=True, name="gpd_ds-wait-watch")
    thread.start()
    try:
        yield
    finally:
        done.set()
