"""Operators per GPD step, framework against hand-written: a device-free proxy for a GPU's kernels and memory passes.

Counts every ATen operator one step dispatches (forward, backward, clip, optimizer) with a ``TorchDispatchMode``,
leaving out views and profiler marks (no kernel). Each is classed by its output: **activation-sized** when a
dimension is a multiple of the batch (batch 11 by default: no layer width of the three pairs is a multiple of 11,
and a ViT's ``batch x tokens`` rows are), else **weight-sized**. On a GPU an activation-sized operator is a pass over
memory that grows with the batch; a weight-sized one is a small kernel whose cost is its launch. The framework
should dispatch no more activation-sized operators than the hand-written step. (On the CPU, SGD runs per parameter;
on a GPU its default is one multi-tensor kernel per update, so the optimizer's weight-sized counts differ there.)

    python bench/op_count.py [--pairs r50_mbv1] [--batch 11] [--rows 8]
"""

from __future__ import annotations

import argparse
import collections

import torch
from step_throughput import PAIRS, Inputs, framework, hand_written_gpd
from torch.utils._python_dispatch import TorchDispatchMode

from gpd_ds import distributed

VIEWS = {"view", "_unsafe_view", "slice", "select", "detach", "alias", "t", "transpose", "permute", "expand",
         "unsqueeze", "squeeze", "as_strided", "split", "unbind", "split_with_sizes", "chunk", "narrow", "reshape",
         "_record_function_enter_new", "_record_function_exit"}  # views and profiler marks: no kernel


class OpCounter(TorchDispatchMode):
    """Counts dispatched operators by (name, "act" | "weight")."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch, self.counts = batch, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in VIEWS:
            outs = out if isinstance(out, tuple | list) else (out,)
            act = any(isinstance(o, torch.Tensor) and any(d % self.batch == 0 for d in o.shape if d) for o in outs)
            self.counts[(name, "act" if act else "weight")] += 1
        return out


def count(step, batch: int) -> collections.Counter:
    for _ in range(2):  # warm-up: lazy state (optimizer momentum, DeepSpeed buffers) is built here
        step()
    with OpCounter(batch) as counter:
        step()
    return counter.counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--batch", type=int, default=11)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--rows", type=int, default=8, help="operators with the largest difference to list")
    parser.add_argument("--bf16", dest="fp32", action="store_false",
                        help="count under bf16 autocast where the device has it (default: float32, as recorded)")
    args = parser.parse_args()
    args.compile = False
    info = distributed.init()
    print(f"torch {torch.__version__}, batch {args.batch}, {args.image_size}px, framework ZeRO-0, one step")
    for pair in args.pairs:
        inp = Inputs(pair, args, info.device)
        fw, hand = count(framework(inp, 0).step, args.batch), count(hand_written_gpd(inp).step, args.batch)
        print(f"\n{pair} ({' <- '.join(PAIRS[pair][:2])})\n  {'':28} {'framework':>9} {'hand-written':>13}")
        for size in ("act", "weight"):
            total = [sum(n for (_, s), n in c.items() if s == size) for c in (fw, hand)]
            print(f"  {size + '-sized operators':28} {total[0]:9} {total[1]:13}")
        diff = sorted((k for k in fw.keys() | hand.keys() if fw[k] != hand[k]), key=lambda k: -abs(fw[k] - hand[k]))
        for name, size in diff[:args.rows]:
            print(f"    {name + ' (' + size + ')':26} {fw[name, size]:9} {hand[name, size]:13}")


if __name__ == "__main__":
    main()
