"""Peak memory of a GPD step: the framework (ZeRO 0/1/2) against the hand-written PyTorch GPD step.

Each variant runs in a fresh process (peak RSS only grows), builds its models and runs a few steps. Reported, above
the memory of the shared inputs (batch and static teacher): on a GPU, ``torch.cuda.max_memory_allocated``; on the
CPU, its counterpart, the peak of the bytes held by PyTorch's CPU allocator (summed from the profiler's memory
events over model building and steps), and the peak RSS, which also counts what the C allocator keeps cached and
so depends on its reuse. Goal: framework <= 1.05 x hand-written.

    python bench/memory.py [--pairs r34_r18] [--device cuda --image-size 224 --batch 256]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import subprocess
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_throughput as st  # (the variants are built the same way as in the speed benchmark)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_allocated_mb(prof: profile) -> float:
    """Peak of the running sum of the CPU allocator's allocations (+) and frees (-) recorded in ``prof``."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return max(itertools.accumulate(n for _, n in events), default=0) / 2**20


def child(pair: str, variant: str, args: argparse.Namespace) -> dict:
    from gpd_ds import distributed

    distributed.init()
    device = torch.device(args.device)
    inp = st.Inputs(pair, args, device)
    for _ in range(2):
        inp.teacher(inp.x)
    base = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated() / 2**20
    on_cpu = device.type == "cpu"
    recording = profile(activities=[ProfilerActivity.CPU], profile_memory=True) if on_cpu else contextlib.nullcontext()
    with recording as prof:
        v = st.framework(inp, int(variant[-1])) if variant.startswith("zero") else {
            "hand": st.hand_written_gpd, "kd": st.hand_written_kd}[variant](inp)
        for _ in range(args.steps):
            v.step()
    if on_cpu:
        return {"variant": v.name, "allocated_mb": _peak_allocated_mb(prof), "rss_mb": _rss_mb() - base}
    return {"variant": v.name, "allocated_mb": torch.cuda.max_memory_allocated() / 2**20 - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["r34_r18", "r50_mbv1", "deits_deitti"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("PAIR", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return
    print(f"device {args.device}, batch {args.batch}, {args.image_size}px, {args.steps} steps, one fresh process per "
          f"variant; MB above the inputs: peak allocated{'' if args.device != 'cpu' else ' and peak RSS'}")
    passthrough = ["--device", args.device, "--image-size", str(args.image_size), "--batch", str(args.batch),
                   "--steps", str(args.steps), *(["--compile"] if args.compile else [])]
    for pair in args.pairs:
        rows = {}
        for variant in ("hand", "kd", "zero0", "zero1", "zero2"):
            out = subprocess.run([sys.executable, __file__, "--child", pair, variant, *passthrough],
                                 capture_output=True, text=True, check=True)
            rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        hand = rows["hand"]
        print(f"\n{pair}")
        for r in rows.values():
            ratio = r["allocated_mb"] / hand["allocated_mb"]
            line = f"  {r['variant']:20} allocated {r['allocated_mb']:8.0f} MB x{ratio:.3f}"
            if "rss_mb" in r:
                line += f"   RSS {r['rss_mb']:8.0f} MB x{r['rss_mb'] / hand['rss_mb']:.3f}"
            print(line + "  of hand-written GPD")


if __name__ == "__main__":
    main()
