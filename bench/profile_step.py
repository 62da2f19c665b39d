"""Where a GPD step's time goes: torch.profiler tables of the framework step against the hand-written step.

Builds the same variants as ``bench/step_throughput.py`` (framework ZeRO-0 and the hand-written GPD step) for one
pair, warms up, profiles a few steps of each, and prints the operators with the most device time (self) and the
CPU total; with ``--trace DIR`` it also writes Chrome traces.

    python bench/profile_step.py --pair deits_deitti --device cuda --image-size 224 --batch 256
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from step_throughput import PAIRS, Inputs, framework, hand_written_gpd
from torch.profiler import ProfilerActivity, profile

from gpd_ds import distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", default="deits_deitti", choices=list(PAIRS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--trace", type=Path, default=None, help="write Chrome traces here")
    args = parser.parse_args()
    args.compile = False
    info = distributed.init()
    device = torch.device(args.device) if args.device != "cpu" else info.device
    inp = Inputs(args.pair, args, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for variant in (framework(inp, 0), hand_written_gpd(inp)):
        for _ in range(3):
            variant.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                variant.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        print(f"\n=== {args.pair}: {variant.name}, {args.steps} steps, batch {args.batch}, {args.image_size}px")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
        if args.trace is not None:
            args.trace.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(args.trace / f"{args.pair}-{variant.name.replace(' ', '_')}.json"))


if __name__ == "__main__":
    main()
