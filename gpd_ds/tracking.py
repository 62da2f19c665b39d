"""Run tracking: ``metrics.jsonl`` in the run directory (rank 0), one JSON object per logged step or evaluation."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class Tracker:
    """Appends ``{"step", "epoch", "time", **metrics}`` lines to ``RUN_DIR/metrics.jsonl``; off on other ranks."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.start = time.time()

    def log(self, metrics: dict[str, Any], step: int, epoch: float) -> None:
        if not self.enabled:
            return
        record = {"step": step, "epoch": round(epoch, 4), "time": round(time.time() - self.start, 3), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass
