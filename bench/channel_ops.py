"""What the replica-aware channel concat costs on a GPD step (docs/ir_functional_ops.md).

For students whose blocks concatenate along channels only (DenseNet, DLA), the same GPD step (both modes, CE on
both + SCE, backward, SGD) runs with the replica-aware interception (what ``expand`` installs: exact) and with its
hooks removed (plain ``torch.cat`` on the wide tensors: the same work minus the interception, numerically wrong).
Alternating order, same batch, median step time; the ratio is the interception's cost.

    python bench/channel_ops.py [--models densenet121 dla46x_c] [--image-size 64] [--batch 16]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch

from gpd_ds.gpd import expand
from gpd_ds.losses import GPDLoss


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    out = model(x, mode="both")
    opt.zero_grad()
    GPDLoss(kd="none")(out.student, out.teacher, y).total.backward()
    opt.step()
    return time.perf_counter() - start


def _without_hooks(model: torch.nn.Module) -> torch.nn.Module:
    plain = copy.deepcopy(model)
    for m in plain.modules():
        m._forward_pre_hooks.clear()
        m._forward_hooks.clear()
        m._forward_hooks_always_called.clear()
    return plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["densenet121", "dla46x_c"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"{'student':16} {'call sites':>10} {'replica-aware s':>16} {'plain cat s':>12} {'ratio':>6}")
    for name in args.models:
        torch.manual_seed(0)
        model = expand(timm.create_model(name, num_classes=10).eval(), input_size=(3, args.image_size,
                                                                                   args.image_size)).train()
        runs = {"replica-aware": model, "plain": _without_hooks(model)}
        opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in runs.items()}
        x = torch.randn(args.batch, 3, args.image_size, args.image_size)
        y = torch.randint(0, 10, (args.batch,))
        times = {k: [] for k in runs}
        for i in range(args.rounds + 1):
            for k in (list(runs) if i % 2 else list(runs)[::-1]):
                t = _step(runs[k], opts[k], x, y)
                if i:  # the first round warms up
                    times[k].append(t)
        aware, plain = statistics.median(times["replica-aware"]), statistics.median(times["plain"])
        print(f"{name:16} {len(model.channel_sites):10d} {aware:16.3f} {plain:12.3f} {aware / plain:6.3f}")


if __name__ == "__main__":
    main()
