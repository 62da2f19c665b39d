"""Host-device synchronizations in the framework's training step (a GPU check; a CPU has nothing to sync).

A host-bound step (small student, fast GPU) is only as fast as the host can queue kernels ahead of the GPU; every
sync inside the step drains that queue. This runs ``train_step`` (the same variants as ``bench/step_throughput.py``)
under ``torch.cuda.set_sync_debug_mode("warn")`` and prints each sync with the innermost non-torch frame that caused
it. The goal is zero per step (the training loop syncs only at its log interval).

    python bench/host_syncs.py --pairs deits_deitti r34_r18 --zero 0 2
"""

from __future__ import annotations

import argparse
import collections
import traceback
import warnings

import torch
from step_throughput import PAIRS, Inputs, framework

from gpd_ds import distributed


def _caller() -> str:
    """The innermost frame outside torch and this script: the code that asked for the sync."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and "warnings" not in frame.filename and __file__ not in frame.filename:
            return f"{frame.filename.rsplit('/site-packages/', 1)[-1]}:{frame.lineno} {frame.line}"
    return "?"


def count_syncs(step, steps: int) -> collections.Counter:
    syncs: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        syncs[_caller()] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return syncs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["deits_deitti"], choices=list(PAIRS))
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    args.compile = False
    info = distributed.init()
    if info.device.type != "cuda":
        print("host_syncs: needs a CUDA device (a CPU step has no host-device syncs to find)")
        return
    for pair in args.pairs:
        inp = Inputs(pair, args, info.device)
        for stage in args.zero:
            variant = framework(inp, stage)
            variant.step()  # the first step allocates and initializes lazily
            syncs = count_syncs(variant.step, args.steps)
            print(f"\n{pair} {variant.name}: {sum(syncs.values()) / args.steps:.1f} syncs per step")
            for where, n in syncs.most_common():
                print(f"  {n / args.steps:5.1f}/step  {where}")


if __name__ == "__main__":
    main()
