"""When the ranks compare their stop requests (the requests themselves: :mod:`gpd_ds.preemption`).

DeepSpeed's launcher SIGKILLs the ranks 30 s after it forwards Ctrl-C or SIGTERM, so a requested stop must be agreed
on and saved well inside that. A fixed number of steps between checks cannot promise it: at 20 s a step, 5 steps
are 100 s. So the interval follows the measured step time. At every check the ranks exchange, in the one small
all-reduce that carries their requests, their mean time per step since the previous check, and all take the
slowest: the next check comes ``floor(run.stop_latency_s / slowest)`` steps later, at least 1 (steps slower than
the latency are checked after every step) and at most ``run.stop_check_steps``. Every rank computes the interval
from the same gathered numbers, so the ranks always check at the same step. The first check is after the first
step. A stop therefore lands within the step in flight plus ``run.stop_latency_s``, then the save.
"""

from __future__ import annotations

import time

from gpd_ds import distributed
from gpd_ds.preemption import StopRequest


class StopCheck:
    """Decides the steps at which the ranks compare requests; :meth:`at` returns every rank's request there."""

    def __init__(self, stop: StopRequest, max_interval: int, latency_s: float, step: int) -> None:
        self.stop, self.max_interval, self.latency_s = stop, max_interval, latency_s
        self.next_step, self.since, self.interval = step + 1, (time.monotonic(), step), 1

    def at(self, step: int) -> list[int] | None:
        """At a check step, every rank's request code (a collective on every rank); otherwise None."""
        if step < self.next_step:
            return None
        now = time.monotonic()
        per_step = (now - self.since[0]) / max(1, step - self.since[1])
        rows = distributed.gather_rows([float(self.stop.local_code()), per_step])
        slowest = max(seconds for _, seconds in rows)
        self.interval = max(1, min(self.max_interval, int(self.latency_s / slowest) if slowest > 0 else 1 << 30))
        self.next_step, self.since = step + self.interval, (now, step)
        return [int(code) for code, _ in rows]
