"""Student-mode forward of the GPD model vs the original student's forward (same input, one process).

The student view slices (and rescales) the dynamic teacher's tensors at every forward; this
measures what that costs. Runs alternate between the two models so drift hits both equally.
Goal: ratio (student mode time / original time) <= 1.10.

    python bench/student_forward.py                      # CPU defaults
    python bench/student_forward.py --models resnet18 --batch 64 --image-size 224 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpd_ds.gpd import expand
from gpd_ds.models import create_model


def _time(fn, x: torch.Tensor, sync) -> float:
    start = time.perf_counter()
    fn(x)
    sync()
    return time.perf_counter() - start


def bench(name: str, batch: int, size: int, repeats: int, train: bool, device: str) -> tuple[float, float]:
    student = create_model(name, image_size=size)
    model = expand(student, input_size=(3, size, size), verify=False)
    student, model = student.to(device).train(train), model.to(device).train(train)
    x = torch.randn(batch, 3, size, size, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def original(t):
        out = student(t)
        if train:
            out.sum().backward()

    def student_mode(t):
        out = model(t, mode="student")
        if train:
            out.sum().backward()

    context = torch.enable_grad() if train else torch.no_grad()
    with context:
        for _ in range(2):  # warm-up
            original(x)
            student_mode(x)
        sync()
        t_orig, t_student = [], []
        for i in range(repeats):  # ABBA order: neither side always runs first
            if i % 2:
                t_student.append(_time(student_mode, x, sync))
                t_orig.append(_time(original, x, sync))
            else:
                t_orig.append(_time(original, x, sync))
                t_student.append(_time(student_mode, x, sync))
    return statistics.median(t_orig), statistics.median(t_student)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenetv2_100", "deit_tiny_patch16_224"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"batch {args.batch}, {args.image_size}px, median of {args.repeats}")
    print(f"{'model':26}{'pass':>14}{'original ms':>14}{'student ms':>13}{'ratio':>8}")
    for name in args.models:
        for train in (False, True):
            t_orig, t_student = bench(name, args.batch, args.image_size, args.repeats, train, args.device)
            label = "fwd+bwd train" if train else "fwd eval"
            print(f"{name:26}{label:>14}{t_orig * 1e3:14.1f}{t_student * 1e3:13.1f}{t_student / t_orig:8.3f}")


if __name__ == "__main__":
    main()
