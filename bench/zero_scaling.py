"""Memory and speed of a GPD step under ZeRO-1/2/3, with and without activation checkpointing, per rank.

Each configuration runs in a fresh job of ``--ranks`` processes started by the real ``deepspeed`` launcher: the
GPD model of ``--student`` (a ViT-S by default: 22 M student, 87 M dynamic teacher) with the shipped
``ds_configs/zeroN.json`` (bf16 autocast on a GPU, float32 on a CPU), AdamW, both modes, one
backward, ``engine.step``; no static teacher (its memory does not depend on the stage). Prints per rank: resident
parameter elements between steps, the model states (bytes of all live tensors between steps: parameters,
gradients, optimizer states, DeepSpeed's buffers), peak memory (GPU ``max_memory_allocated``; CPU peak RSS above
the process's size before the model was built, which includes building the full model before ZeRO-3 partitions
it) and step time, with ratios to ZeRO-2 without checkpointing.

    python bench/zero_scaling.py                                   # CPU: 2 ranks, 64 px, batch 8 per rank
    python bench/zero_scaling.py --ranks 1 --image-size 224 --batch 64 --stages 0   # one GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _live_tensor_mb() -> float:
    """Bytes of every tensor storage alive in this process (parameters, gradients, optimizer and DeepSpeed
    buffers) between steps: the model states a rank keeps, which RSS hides behind freed-but-kept heap pages."""
    import gc

    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total / 2**20


def child(args: argparse.Namespace) -> None:
    import torch

    from gpd_ds import distributed
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
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss)
    print("RESULT " + json.dumps({"rank": info.rank, "resident": resident_parameters(engine.module),
                                  "states_mb": _live_tensor_mb(), "peak_mb": peak / 2**20,
                                  "step_s": sorted(times)[len(times) // 2]}), flush=True)


def run_config(args: argparse.Namespace, stage: int, checkpointing: bool, port: int) -> list[dict]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks), "--master_port",
           str(port), str(Path(__file__).resolve()), "--child", "--stage", str(stage), "--student", args.student,
           "--image-size", str(args.image_size), "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--checkpointing"] if checkpointing else [])
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    rows = [json.loads(line.split("RESULT ", 1)[1]) for line in done.stdout.splitlines() if "RESULT " in line]
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
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(f"{args.student} GPD model, {args.ranks} ranks, batch {args.batch} per rank, {args.image_size}px, AdamW, "
          f"median of {args.steps} steps")
    results = {}
    for i, (stage, ckpt) in enumerate((s, c) for s in args.stages for c in (False, True)):
        results[(stage, ckpt)] = run_config(args, stage, ckpt, 29650 + i)
    ref = results.get((2, False)) or next(iter(r for r in results.values() if r), None)
    print(f"\n{'config':28} {'resident params/rank':>21} {'states MB/rank':>15} {'peak MB/rank':>13} {'step s':>8} "
          f"{'states vs ref':>14} {'peak vs ref':>12} {'time vs ref':>12}")
    for (stage, ckpt), rows in results.items():
        if not rows:
            continue
        peak = max(r["peak_mb"] for r in rows)
        step = max(r["step_s"] for r in rows)
        name = f"ZeRO-{stage}" + (" + act. checkpointing" if ckpt else "")
        states = max(r["states_mb"] for r in rows)
        rel = (f"{states / max(r['states_mb'] for r in ref):14.2f} {peak / max(r['peak_mb'] for r in ref):12.2f} "
               f"{step / max(r['step_s'] for r in ref):12.2f}" if ref else "")
        print(f"{name:28} {rows[0]['resident'] / 1e6:19.1f} M {states:15.0f} {peak:13.0f} {step:8.2f} {rel}")


if __name__ == "__main__":
    main()
