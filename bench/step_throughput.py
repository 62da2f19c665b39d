"""GPD step throughput: the framework's real ``train_step`` against a hand-written PyTorch GPD step.

In one process, in rotating order, on the same batch, precision and memory format (channels_last input):

* ``framework zeroN``: DeepSpeed engine (the shipped ``ds_configs/zeroN.json``) around ``expand(student)`` +
  ``StaticTeacher`` + ``GPDLoss``, through ``gpd_ds.train.train_step``: static teacher forward, both GPD modes, one
  backward, ``engine.step``;
* ``hand-written GPD``: plain timm student, a plain timm model twice as wide (the dynamic teacher's shape, its own
  weights), the static teacher, the same losses, one backward of the sum, clip 5, SGD step;
* ``hand-written KD`` (static teacher + student, CE + DKD) and ``CE only``, for context;
* on a CPU with native bf16 (where the framework trains in bf16 autocast), also ``framework zeroN fp32``: the same
  framework step in float32 (the CPU precision column: the bf16 / fp32 ratio, both measured here).

Precision: bf16 autocast on a GPU and on a CPU with native bf16 (``gpd_ds.engine.cpu_has_native_bf16``), else
float32; ``--fp32`` forces float32. Prints images/s, framework / hand-written, and GPD time / KD time for both.

    python bench/step_throughput.py                                  # CPU: small images, few steps
    python bench/step_throughput.py --device cuda --image-size 224 --batch 256 --steps 20 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import deepspeed
import timm
import torch
from timm.models.efficientnet import _gen_mobilenet_v1
from timm.models.resnet import BasicBlock, ResNet

from gpd_ds import distributed
from gpd_ds.engine import cpu_has_native_bf16, ds_defaults, initialize
from gpd_ds.gpd import expand
from gpd_ds.losses import GPDLoss, cross_entropy, dkd, soft_cross_entropy
from gpd_ds.models import create_model
from gpd_ds.models.teacher import StaticTeacher
from gpd_ds.train import train_step

NUM_CLASSES = 1000
CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"


def _wide(pair: str, size: int) -> torch.nn.Module:
    """A plain model of the dynamic teacher's shape (every internal width x2)."""
    if pair == "r34_r18":
        model = ResNet(BasicBlock, [2, 2, 2, 2], channels=(128, 256, 512, 1024), num_classes=NUM_CLASSES)
        # timm's plain 7x7 stem is hard-wired to 64 channels; the dynamic teacher's stem is 2x wide and its
        # first block then needs no projection shortcut.
        model.conv1 = torch.nn.Conv2d(3, 128, 7, stride=2, padding=3, bias=False)
        model.bn1 = torch.nn.BatchNorm2d(128)
        model.layer1[0].conv1 = torch.nn.Conv2d(128, 128, 3, padding=1, bias=False)
        model.layer1[0].downsample = None
        return model
    if pair == "r50_mbv1":
        return _gen_mobilenet_v1("mobilenetv1_100", 2.0, num_classes=NUM_CLASSES)
    return timm.create_model("vit_small_patch16_224", img_size=size, num_classes=NUM_CLASSES)


PAIRS = {  # student, static teacher, DKD beta
    "r34_r18": ("resnet18", "resnet34", 0.5),
    "r50_mbv1": ("mobilenetv1_100", "resnet50", 2.0),
    "deits_deitti": ("deit_tiny_patch16_224", "deit_small_patch16_224", 0.5),
}


class Variant:
    def __init__(self, name: str, step, images: int) -> None:
        self.name, self.step, self.images, self.rates = name, step, images, []


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Inputs:
    """The batch, the static teacher and the autocast context shared by every variant of one pair."""

    def __init__(self, pair: str, args: argparse.Namespace, device: torch.device) -> None:
        self.pair, self.args, self.device = pair, args, device
        self.student_name, teacher_name, self.beta = PAIRS[pair]
        self.size, self.batch = args.image_size, args.batch
        bf16 = device.type == "cuda" or cpu_has_native_bf16()  # what the framework's resolution picks
        self.dtype = torch.bfloat16 if bf16 and not args.fp32 else None
        torch.manual_seed(0)
        self.x = torch.randn(self.batch, 3, self.size, self.size, device=device)
        self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, NUM_CLASSES, (self.batch,), device=device)
        model = create_model(teacher_name, num_classes=NUM_CLASSES, image_size=self.size)
        self.teacher = StaticTeacher(model, False, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).to(device)
        self.teacher = self.teacher.to(memory_format=torch.channels_last)
        self.teacher_fn = torch.compile(self.teacher) if args.compile else self.teacher

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    def student(self) -> torch.nn.Module:
        return create_model(self.student_name, num_classes=NUM_CLASSES, image_size=self.size).to(self.device)

    def maybe_compile(self, module: torch.nn.Module) -> torch.nn.Module:
        return torch.compile(module) if self.args.compile else module


# --ablations: the framework step with one of its speed fixes undone, to show what each buys
ABLATIONS = {
    "ds timer": "DeepSpeed's throughput timer on (it syncs the device at every forward and step)",
    "ds clip": "DeepSpeed's own ZeRO-0 gradient clipping (two host-device syncs per step)",
    "unpaired": "each GPD mode takes its own student views (zero-padded gradients added per tensor)",
}


def framework(inp: Inputs, stage: int, undo: str | None = None, fp32: bool = False) -> Variant:
    """The framework's step; ``fp32=True``: the same step with autocast off (the CPU precision column)."""
    student = create_model(inp.student_name, num_classes=NUM_CLASSES, image_size=inp.size)
    model = expand(student, input_size=(3, inp.size, inp.size), verify=False).to(inp.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    ds = json.loads((CONFIGS / f"zero{stage}.json").read_text())  # the shipped config of this stage
    ds.update({"train_batch_size": inp.batch, "train_micro_batch_size_per_gpu": inp.batch,
               "torch_autocast": {"enabled": inp.dtype is not None and not fp32, "dtype": "bfloat16"},
               **({"timers": {"throughput": {"enabled": True}}} if undo == "ds timer" else {})})
    ds = ds_defaults(ds)
    engine = initialize(model, optimizer, None, ds, world_size=1)
    model.paired_views = undo != "unpaired"
    if undo == "ds clip":
        del engine.clip_fp32_gradients  # the instance attribute: back to DeepSpeed's method
    if inp.args.compile:
        engine.compile()
    loss_fn = GPDLoss(kd="dkd", dkd_beta=inp.beta)
    autocast = contextlib.nullcontext if fp32 else inp.autocast
    name = f"framework zero{stage}" + (f" -{undo}" if undo else "") + (" fp32" if fp32 else "")
    return Variant(name, lambda: train_step(engine, inp.x, inp.y, inp.teacher_fn, loss_fn, True, autocast), inp.batch)


def hand_written_gpd(inp: Inputs) -> Variant:
    student, wide = inp.maybe_compile(inp.student()), inp.maybe_compile(_wide(inp.pair, inp.size).to(inp.device))
    params = [*student.parameters(), *wide.parameters()]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    x, y, beta = inp.x, inp.y, inp.beta

    def step() -> None:
        with inp.autocast():
            z_static = inp.teacher_fn(x)
            z_t, z_s = wide(x), student(x)
        loss = (cross_entropy(z_t, y) + cross_entropy(z_s, y) + 3 * soft_cross_entropy(z_s, z_t.detach())
                + dkd(z_s, z_static, y, 1.0, beta) + dkd(z_t, z_static, y, 1.0, beta))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Variant("hand-written GPD", step, inp.batch)


def hand_written_kd(inp: Inputs) -> Variant:
    student = inp.maybe_compile(inp.student())
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        with inp.autocast():
            z_static = inp.teacher_fn(inp.x)
            z_s = student(inp.x)
        (cross_entropy(z_s, inp.y) + dkd(z_s, z_static, inp.y, 1.0, inp.beta)).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Variant("hand-written KD", step, inp.batch)


def ce_only(inp: Inputs) -> Variant:
    student = inp.maybe_compile(inp.student())
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        with inp.autocast():
            z_s = student(inp.x)
        cross_entropy(z_s, inp.y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Variant("CE only", step, inp.batch)


def build_variants(pair: str, args: argparse.Namespace, device: torch.device) -> list[Variant]:
    inp = Inputs(pair, args, device)
    ablations = [framework(inp, args.zero[0], undo) for undo in ABLATIONS] if args.ablations else []
    cpu_bf16 = inp.device.type == "cpu" and inp.dtype is not None
    fp32 = [framework(inp, args.zero[0], fp32=True)] if cpu_bf16 else []
    return [*(framework(inp, stage) for stage in args.zero), *fp32, *ablations, hand_written_gpd(inp),
            hand_written_kd(inp), ce_only(inp)]


def measure(variants: list[Variant], args: argparse.Namespace, device: torch.device) -> None:
    for v in variants:  # warm-up (and compilation)
        for _ in range(args.warmup):
            v.step()
    _sync(device)
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                v.step()
            _sync(device)
            v.rates.append(v.images * args.steps / (time.perf_counter() - start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fp32", action="store_true", help="float32 everywhere (no bf16 autocast)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models (framework: engine.compile)")
    parser.add_argument("--ablations", action="store_true",
                        help="also time the first --zero stage with each speed fix undone: " + "; ".join(
                            f"-{k}: {v}" for k, v in ABLATIONS.items()))
    args = parser.parse_args()
    info = distributed.init()
    device = torch.device(args.device) if args.device != "cpu" else info.device
    bf16 = (device.type == "cuda" or cpu_has_native_bf16()) and not args.fp32
    precision = "bf16 autocast" if bf16 else "fp32"
    print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, device {device}"
          f"{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, {args.image_size}px, {precision}, "
          f"channels_last input, compile {args.compile}, median of {args.rounds} x {args.steps} steps")
    for pair in args.pairs:
        variants = build_variants(pair, args, device)
        measure(variants, args, device)
        rate = {v.name: statistics.median(v.rates) for v in variants}
        hand_rates = next(v.rates for v in variants if v.name == "hand-written GPD")
        hand = rate["hand-written GPD"]
        print(f"\n{pair} ({' <- '.join(PAIRS[pair][:2])})")
        for v in variants:
            extra = ""
            if v.name.endswith(" fp32"):  # the CPU precision column
                extra = f"  bf16 / fp32 {rate[v.name.removesuffix(' fp32')] / rate[v.name]:.2f}"
            elif v.name.startswith("framework"):  # the spread of the ratio within a round shows the noise
                per_round = [a / b for a, b in zip(v.rates, hand_rates, strict=True)]
                extra = (f"  framework / hand-written {rate[v.name] / hand:.3f}"
                         f" (rounds {min(per_round):.3f}-{max(per_round):.3f})")
            print(f"  {v.name:28} {rate[v.name]:9.1f} img/s{extra}")
        kd = rate["hand-written KD"]
        best = max((r for n, r in rate.items() if n.startswith("framework") and " -" not in n
                    and not n.endswith(" fp32")), default=None)
        print(f"  GPD time / KD time: hand-written {kd / hand:.2f}"
              + (f", framework (best stage) {kd / best:.2f}" if best else ""))


if __name__ == "__main__":
    main()
