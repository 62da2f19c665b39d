"""Memory and speed of a GPD step under ZeRO-1/2/3, with and without activation checkpointing, per rank.

Each configuration runs in a fresh job of ``--ranks`` processes started by the real ``deepspeed`` launcher: the
GPD model of ``--student`` (a ViT-S by default: 22 M student, 87 M dynamic teacher) with the shipped
``ds_configs/zeroN.json`` (bf16 autocast on a GPU, float32 on a CPU), AdamW, both modes, one
backward, ``engine.step``, the EMA update of the training loop (``optim.ema_decay``: whole under ZeRO <= 2,
partitioned under ZeRO-3, as ``gpd_ds.train`` builds it); no static teacher (its memory does not depend on the
stage). Prints per rank: resident parameter elements between steps, **every byte a rank holds between steps**
(all live tensors) split into parameters, EMA, module buffers and the rest (gradients, optimizer states,
DeepSpeed's buffers; no evaluation copy exists any more: ZeRO-3 evaluates the engine's module), peak memory (GPU
``max_memory_allocated``; CPU peak RSS above the process's size before the model was built, which includes
building the full model before ZeRO-3 partitions it) and step time, with ratios to ZeRO-2 without checkpointing.

    python bench/zero_scaling.py                                   # CPU: 2 ranks, 64 px, batch 8 per rank
    python bench/zero_scaling.py --ranks 1 --image-size 224 --batch 64 --stages 0   # one GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _storages(tensors) -> dict[int, int]:
    """data pointer -> bytes of the distinct storages behind ``tensors``."""
    out = {}
    for t in tensors:
        if t is not None and t.device.type != "meta" and t.untyped_storage().nbytes():
            out[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return out


def _held_mb(module, ema) -> dict[str, float]:
    """Bytes of every tensor storage alive in this process between steps (what RSS hides behind freed-but-kept heap
    pages), split into the module's parameters (ZeRO-3: the partitions), the EMA, the module's buffers and the rest
    (gradients, optimizer states, DeepSpeed's buffers)."""
    import gc

    import torch

    every = _storages(o for o in gc.get_objects() if isinstance(o, torch.Tensor))
    params = _storages(getattr(p, "ds_tensor", p) for p in module.parameters())
    params.update(_storages(p.data for p in module.parameters()))  # ZeRO-3 keeps small parameters whole too
    held = _storages(ema.module.state_dict().values()) if hasattr(ema, "module") else _storages(
        [*ema.shadow.values(), *ema.shadow_buffers.values()])
    buffers = _storages(module.buffers())
    mb = {"params": params, "ema": held, "buffers": buffers}
    out = {k: sum(v.values()) / 2**20 for k, v in mb.items()}
    known = set().union(*mb.values())
    out["rest"] = sum(b for ptr, b in every.items() if ptr not in known) / 2**20
    out["total"] = sum(every.values()) / 2**20
    return out


def child(args: argparse.Namespace) -> None:
    import torch

    from gpd_ds import distributed
    from gpd_ds.ema import ModelEma, PartitionedEma
    from gpd_ds.engine import initialize, resident_parameters
    from gpd_ds.gpd import expand
    from gpd_ds.gpd.checkpointing import enable_activation_checkpointing
    from gpd_ds.losses import GPDLoss
    from gpd_ds.models import create_model

    info = distributed.init()
    cuda = info.device.type == "cuda"
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.manual_seed(0)
    size = args.image_size
    student = create_model(args.student, num_classes=1000, image_size=size)
    model = expand(student, input_size=(3, size, size), verify=False).to(info.device)
    if args.checkpointing:
        enable_activation_checkpointing(model)
    ds = json.loads((REPO / "ds_configs" / f"zero{args.stage}.json").read_text())  # the shipped configs
    ds.pop("_comment", None)
    ds.update(train_micro_batch_size_per_gpu=args.batch, train_batch_size=args.batch * info.world_size,
              gradient_accumulation_steps=1)
    if not cuda:
        ds["torch_autocast"] = {"enabled": False}
    engine = initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-4), None, ds, info.world_size)
    ema = (PartitionedEma if args.stage == 3 else ModelEma)(engine.module, 0.9999)
    loss_fn = GPDLoss(kd="none")
    x = torch.randn(args.batch, 3, size, size, device=info.device)
    y = torch.randint(0, 1000, (args.batch,), device=info.device)
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=cuda):
            out = engine(x, mode="both")
        engine.backward(loss_fn(out.student.float(), out.teacher.float(), y).total)
        engine.step()
        ema.update(engine.module)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss)
    del out  # the step's activations: what stays between steps is the model states
    result = {"rank": info.rank, "resident": resident_parameters(engine.module), "held": _held_mb(engine.module, ema),
              "peak_mb": peak / 2**20, "step_s": sorted(times)[len(times) // 2]}
    # one file per rank: the ranks share the launcher's stdout, where their lines can interleave
    (Path(args.out) / f"rank{info.rank}.json").write_text(json.dumps(result))


def run_config(args: argparse.Namespace, stage: int, checkpointing: bool, port: int) -> list[dict]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks), "--master_port",
           str(port), str(Path(__file__).resolve()), "--child", "--stage", str(stage), "--student", args.student,
           "--image-size", str(args.image_size), "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--checkpointing"] if checkpointing else [])
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([*cmd, "--out", out], cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
        rows = [json.loads(f.read_text()) for f in sorted(Path(out).glob("rank*.json"))]
    if done.returncode != 0 or len(rows) != args.ranks:
        print(f"ZeRO-{stage} checkpointing={checkpointing} failed (exit {done.returncode}):\n"
              f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return []
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="vit_small_patch16_224")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="per rank")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--checkpointing-modes", choices=("both", "off", "on"), default="both",
                        help="activation checkpointing off, on, or each configuration both ways")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(f"{args.student} GPD model, {args.ranks} ranks, batch {args.batch} per rank, {args.image_size}px, AdamW, "
          f"median of {args.steps} steps")
    results = {}
    modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.checkpointing_modes]
    for i, (stage, ckpt) in enumerate((s, c) for s in args.stages for c in modes):
        results[(stage, ckpt)] = run_config(args, stage, ckpt, 29650 + i)
    ref = results.get((2, False)) or next(iter(r for r in results.values() if r), None)
    parts = ("params", "ema", "buffers", "rest", "total")
    print(f"\n{'config':28} {'resident params/rank':>21} " + " ".join(f"{p + ' MB':>10}" for p in parts)
          + f" {'peak MB':>8} {'step s':>7} {'total vs ref':>13} {'peak vs ref':>12} {'time vs ref':>12}")
    for (stage, ckpt), rows in results.items():
        if not rows:
            continue
        held = {p: max(r["held"][p] for r in rows) for p in parts}  # the largest rank's
        peak = max(r["peak_mb"] for r in rows)
        step = max(r["step_s"] for r in rows)
        name = f"ZeRO-{stage}" + (" + act. checkpointing" if ckpt else "")
        rel = (f"{max(r['held']['total'] for r in ref) / held['total']:12.2f}x "
               f"{peak / max(r['peak_mb'] for r in ref):12.2f} {step / max(r['step_s'] for r in ref):12.2f}"
               if ref else "")
        print(f"{name:28} {rows[0]['resident'] / 1e6:19.1f} M " + " ".join(f"{held[p]:10.0f}" for p in parts)
              + f" {peak:8.0f} {step:7.2f} {rel}")
    print("total vs ref: how many times smaller the bytes a rank holds between steps are than ZeRO-2's")


if __name__ == "__main__":
    main()
