"""Top-1/top-5 of several models on the eval loader, exact across ranks (counts summed once at the end)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch

from gpd_ds.data.loader import Batch, DataError
from gpd_ds.data.transforms import DeviceTransform
from gpd_ds.distributed import all_reduce_sum, any_rank
from gpd_ds.progress import Progress


@torch.no_grad()
def evaluate(models: dict[str, Callable[[torch.Tensor], torch.Tensor]], loader: Iterable[Batch],
             transform: DeviceTransform, autocast: Callable[[], contextlib.AbstractContextManager],
             show_progress: bool = False, num_batches: int | None = None, expected: int | None = None,
             max_bad_fraction: float = 0.0, split: str = "the eval split",
             lockstep: tuple[int, int, int] | None = None) -> dict[str, dict[str, float]]:
    """``{name: {"top1": %, "top5": %, "samples": n}}`` for each ``name -> logits_fn``. Every sample counts once
    (the eval loader reads each exactly once across ranks; ranks may see different batch counts).

    ``lockstep`` (C, H, W): the models gather their parameters from every rank inside their forward (ZeRO-3), so
    every rank must call them equally often: a rank whose batches are done runs them on one blank image of that
    size, uncounted, until no rank has batches left (a one-number all-reduce per batch decides).

    With ``expected`` (the index's sample count), fewer than ``(1 - max_bad_fraction) * expected`` evaluated
    samples is a :class:`~gpd_ds.data.loader.DataError` on every rank: an accuracy over what was left of a
    damaged split is not that split's accuracy."""
    device = transform.device
    counts = torch.zeros(len(models), 2, dtype=torch.float64, device=device)
    seen = torch.zeros(1, dtype=torch.float64, device=device)
    batches = iter(loader)
    with Progress(num_batches, "eval", unit="batch", enabled=show_progress) as bar:
        while True:
            batch = next(batches, None)
            more = batch is not None if lockstep is None else any_rank(batch is not None, device)
            if not more:
                break
            if batch is None:  # done here, but another rank's models still gather with this one's
                for fn in models.values():
                    with autocast():
                        fn(torch.zeros(1, *lockstep, device=device))
                continue
            x, y = transform(batch.images, batch.labels, train=False)
            seen += y.numel()
            for i, fn in enumerate(models.values()):
                with autocast():
                    logits = fn(x)
                k = min(5, logits.shape[1])
                top = logits.float().topk(k, dim=1).indices
                hit = top == y.view(-1, 1)
                counts[i, 0] += hit[:, 0].sum()
                counts[i, 1] += hit.any(dim=1).sum()
            bar.update(1)
    all_reduce_sum(counts)
    all_reduce_sum(seen)
    n = seen.item()
    if expected is not None and n < (1 - max_bad_fraction) * expected:
        raise DataError(f"evaluation read {int(n)} of the {expected} samples the index lists for {split} "
                        f"({expected - int(n)} bad or lost, over data.max_bad_fraction={max_bad_fraction}); "
                        "check the shards (the warnings above name each bad sample)")
    return {name: {"top1": 100.0 * counts[i, 0].item() / max(n, 1), "top5": 100.0 * counts[i, 1].item() / max(n, 1),
                   "samples": int(n)} for i, name in enumerate(models)}


def evaluate_artifact(path: str, data_root: str, split: str = "val", batch_size: int = 250, workers: int = 4,
                      weights: str = "best", allow_pipe: bool = False, max_bad_fraction: float = 0.01
                      ) -> dict[str, dict[str, float]]:
    """Evaluate an exported student (``.safetensors`` + sidecar) or a run directory (its student and dynamic
    teacher) on the shards of ``split`` under ``data_root``, on one device."""
    from pathlib import Path

    from gpd_ds.data.loader import eval_loader, resolve_shards
    from gpd_ds.data.transforms import eval_transform
    from gpd_ds.export import load_exported, rebuild, run_record, run_weights

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shards = resolve_shards(data_root, split, allow_pipe=allow_pipe)
    target = Path(path)
    if target.is_dir():
        record = run_record(target)
        cfg, model = rebuild(record)
        state, _ = run_weights(target, weights)
        model.load_state_dict(state, strict=True)
        classes, size = record["classes"], cfg.data.image_size
        crop_pct, interpolation, mean, std = cfg.data.crop_pct, cfg.data.interpolation, cfg.data.mean, cfg.data.std
        model = model.to(device).eval()
        models = ({"student": lambda x: model(x, mode="student"), "dynamic_teacher": lambda x: model(x, mode="teacher")}
                  if cfg.model.method in ("gpd", "peer") else {"student": model})
    else:
        model, sidecar = load_exported(target)
        classes, size = sidecar["classes"], sidecar["input_size"][-1]
        crop_pct, interpolation, mean, std = (sidecar["crop_pct"], sidecar["interpolation"], sidecar["mean"],
                                              sidecar["std"])
        model = model.to(device)
        models = {"student": model}
    if list(shards.classes) != list(classes):
        from gpd_ds.export import ExportError
        raise ExportError(f"the classes of {data_root!r} ({len(shards.classes)}) differ from the model's "
                          f"({len(classes)}); evaluate on the dataset it was trained for")
    loader = eval_loader(shards, batch_size=batch_size, rank=0, world_size=1, num_workers=workers,
                         transform=eval_transform(size, crop_pct, interpolation), max_bad_fraction=max_bad_fraction)
    transform = DeviceTransform(len(classes), device, mean=tuple(mean), std=tuple(std))
    return evaluate(models, loader, transform, contextlib.nullcontext, show_progress=True,
                    expected=shards.num_samples, max_bad_fraction=max_bad_fraction,
                    split=f"split {split!r} of {data_root!r}")
