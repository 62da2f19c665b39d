"""Does DeepSpeed's CPU shared-memory communication op pay for building it? (decides ``GPD_DS_CPU_SHM_OP``)

Runs the same 2-rank training job (real ``deepspeed`` launcher, gloo, the demo recipe on a small generated
dataset, ZeRO-2) with the op built and loaded (``GPD_DS_CPU_SHM_OP=1``) and without it (the default), in
alternating order, and prints per mode the median steady images/s (metrics.jsonl, first window dropped), the
job's wall time, and the ratio. Each mode's first run also pays (or not) the op's compile into a fresh
torch-extensions cache, printed separately.

    python bench/cpu_comm_op.py [--rounds 2] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.launch_helpers import deepspeed_cmd, overrides, workspace_with_data  # noqa: E402


def _run(work: Path, name: str, steps: int, with_op: bool, cache: Path) -> tuple[float, float]:
    run = work / name
    args = ["--run-dir", str(run), *overrides(work / "data", **{"model.static_teacher": "none",
                                                                 "run.max_steps": steps, "optim.epochs": 100,
                                                                 "run.log_every_steps": 5,
                                                                 "run.checkpoint_every_steps": 1000,
                                                                 "run.eval_at_start": False})]
    env = {**os.environ, "GPD_DS_CACHE": str(work / "cache"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(cache), "GPD_DS_CPU_SHM_OP": "1" if with_op else "0"}
    start = time.perf_counter()
    result = subprocess.run(deepspeed_cmd(2, args), cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    built = "shm_comm_op built successfully" in result.stdout + result.stderr
    if built != with_op:
        sys.exit(f"{name}: the op was {'built' if built else 'not built'}, expected the opposite")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["train/images_per_s"] for r in rows if "train/images_per_s" in r][1:]
    return statistics.median(speeds), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = workspace_with_data(Path(tmp))
        cache = work / "torch_extensions"  # fresh: the first run with the op compiles it
        results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for r in range(args.rounds):
            for with_op in ((True, False) if r % 2 == 0 else (False, True)):
                results[with_op].append(_run(work, f"r{r}_{int(with_op)}", args.steps, with_op, cache))
                speed, wall = results[with_op][-1]
                print(f"round {r} op {'built' if with_op else 'skipped':7}: {speed:7.1f} img/s, job {wall:6.1f} s",
                      flush=True)
    print(f"\n{'mode':14} {'median img/s':>12} {'first job s':>11} {'later jobs s':>12}")
    for with_op, runs in results.items():
        later = statistics.median(w for _, w in runs[1:]) if len(runs) > 1 else float("nan")
        print(f"{'op built' if with_op else 'op skipped':14} {statistics.median(s for s, _ in runs):12.1f} "
              f"{runs[0][1]:11.1f} {later:12.1f}")
    ratio = statistics.median(s for s, _ in results[False]) / statistics.median(s for s, _ in results[True])
    print(f"images/s without / with the op: {ratio:.3f}")


if __name__ == "__main__":
    main()
