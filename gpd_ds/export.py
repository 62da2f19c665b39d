"""Export: a run's GPD weights -> the plain student (CBR), verified, as ``.safetensors`` plus a JSON sidecar.

``gpd-ds export RUN_DIR --out student.safetensors [--weights best|last|last_ema]``:

1. take the weights: ``best`` (the live or EMA weights with the best student top-1, kept in ``RUN_DIR/best``),
   or the newest complete checkpoint's live (``last``) or EMA (``last_ema``) weights (ZeRO <= 2 checkpoints hold
   the full model; ZeRO-3 ones are consolidated from the ranks' partitions);
2. rebuild the GPD model from the run's saved config and load them strictly;
3. ``extract`` the student, check it against the student mode (max |logit diff|) and check that a freshly built
   model of the student's name loads it strictly;
4. write the student's state dict and ``student.json`` (model name, classes, mean/std, input size, step, accuracy).

The result loads with ``timm.create_model(name, num_classes=K).load_state_dict(safetensors.torch.load_file(p))``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file
from torch import nn

from gpd_ds.checkpoint import complete_checkpoints
from gpd_ds.config import TrainConfig, from_dict
from gpd_ds.errors import UserInputError
from gpd_ds.features import StudentWithConnector
from gpd_ds.gpd import check_equivalence, extract
from gpd_ds.models import create_model
from gpd_ds.models.build import build_model
from gpd_ds.safeload import load_file, safe_loading, scan_file

SIDECAR_FORMAT = "gpd_ds-student-v1"


class ExportError(UserInputError, RuntimeError):
    """A run directory or exported file cannot be used."""


def run_record(run_dir: Path) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ExportError(f"{str(run_dir)!r} is not a gpd_ds run directory (no config.json)")
    return json.loads(path.read_text())


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(str(path))
    except SafetensorError as e:
        raise ExportError(f"{path} is not a safetensors file ({e}); it was not loaded. Export it again from its run "
                          "directory") from None


def run_weights(run_dir: Path, which: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(GPD model state dict, metadata) of ``best``, ``last`` or ``last_ema``."""
    run_dir = Path(run_dir)
    if which == "best":
        best = run_dir / "best" / "model.safetensors"
        if not best.is_file():
            raise ExportError(f"{str(run_dir)!r} has no best weights ({best} is written by the first evaluation); "
                              "export the newest checkpoint with --weights last (or last_ema)")
        return read_safetensors(best), json.loads((run_dir / "best" / "best.json").read_text())
    if which not in ("last", "last_ema"):
        raise ExportError(f"--weights {which!r} is unknown; use best, last or last_ema")
    found = complete_checkpoints(run_dir / "checkpoints")
    if not found:
        raise ExportError(f"{str(run_dir)!r} has no complete checkpoint and no best weights to export")
    path = found[0] / "mp_rank_00_model_states.pt"
    if not path.is_file():  # ZeRO-3 writes one per rank; rank 0's holds the client state
        path = found[0] / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    states = load_file(path)  # weights-only: a run directory from elsewhere is untrusted input
    client_step = states.get("step", states.get("global_steps"))
    if which == "last_ema":
        ema = _ema_state(states)
        if ema.get("shapes"):  # ZeRO-3: every rank saved its partitions of the EMA
            from gpd_ds.checkpoint import read_rank_tensors
            from gpd_ds.ema import consolidate

            shapes = {k: torch.Size(v) for k, v in ema["shapes"].items()}
            return consolidate(read_rank_tensors(found[0]), shapes), {"weights": "ema", "step": client_step}
        if not ema.get("whole"):
            raise ExportError(f"{found[0]} holds no EMA weights (optim.ema_decay was off)")
        return ema["whole"], {"weights": "ema", "step": client_step}
    module = states["module"]
    if any(v.numel() == 0 for v in module.values()):
        # ZeRO-3 saved partitioned parameters: consolidate them from every rank's fp32 optimizer partition
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        for shard in sorted(found[0].glob("*.pt")):
            scan_file(shard)  # names the file; the load below is weights-only too
        with safe_loading():
            module = get_fp32_state_dict_from_zero_checkpoint(str(found[0].parent), tag=found[0].name)
    return module, {"weights": "raw", "step": client_step}


def _ema_state(states: dict) -> dict:
    """The EMA entry of a checkpoint's client state (gpd_ds.train.state): {"whole": tensors or None, "shapes": full
    shapes of a partitioned EMA or None}; 0.2.x wrote them as the top-level keys ema and ema_shapes."""
    if "state" in states:
        return states["state"].get("ema") or {}
    return {"whole": states.get("ema"), "shapes": states.get("ema_shapes")}


def rebuild(record: dict) -> tuple[TrainConfig, nn.Module]:
    """The run's trained module (GPD model or plain student), without weights."""
    cfg = from_dict(record["config"])
    cfg.model.student_checkpoint = None  # the weights come from the run, not from the fine-tuning start point
    return cfg, build_model(cfg, len(record["classes"]), noise=False)


def export_run(run_dir: Path, out: Path, which: str = "best") -> Path:
    """Export the run's student to ``out`` (and ``out`` with ``.json``); return ``out``."""
    run_dir, out = Path(run_dir), Path(out)
    record = run_record(run_dir)
    cfg, model = rebuild(record)
    state, meta = run_weights(run_dir, which)
    model.load_state_dict(state, strict=True)
    model.eval()
    size = cfg.data.image_size
    probe = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    if cfg.model.method == "gpd":
        plain = extract(model).eval()
        max_diff = check_equivalence(model, plain, probe)
    elif cfg.model.method == "peer":  # the online-peer control: the student, not its peer
        plain, max_diff = model.student, 0.0
    else:  # a plain student, with its connector under feature distillation (dropped here)
        plain, max_diff = (model.net if isinstance(model, StudentWithConnector) else model), 0.0
    fresh = create_model(cfg.model.student, num_classes=len(record["classes"]), image_size=size,
                         **cfg.model.student_kwargs)
    fresh.load_state_dict(plain.state_dict(), strict=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in plain.state_dict().items()}, str(tmp))
    os.replace(tmp, out)
    sidecar = {
        "format": SIDECAR_FORMAT, "model": cfg.model.student, "model_kwargs": cfg.model.student_kwargs,
        "num_classes": len(record["classes"]), "classes": record["classes"], "mean": list(cfg.data.mean),
        "std": list(cfg.data.std), "input_size": [3, size, size], "crop_pct": cfg.data.crop_pct,
        "interpolation": cfg.data.interpolation, "recipe": cfg.recipe, "scenario": record.get("scenario"),
        "step": meta.get("step"), "top1": meta.get("top1"), "weights": meta.get("weights"),
        "run_dir": str(run_dir), "max_abs_diff_vs_student_mode": max_diff,
    }
    sidecar_path = out.with_suffix(".json")
    sidecar_path.with_name(f".{sidecar_path.name}.tmp").write_text(json.dumps(sidecar, indent=1))
    os.replace(sidecar_path.with_name(f".{sidecar_path.name}.tmp"), sidecar_path)
    return out


def load_exported(path: Path) -> tuple[nn.Module, dict]:
    """An exported student (``.safetensors`` with its ``.json`` sidecar), ready to evaluate."""
    path = Path(path)
    sidecar_path = path.with_suffix(".json")
    if not path.is_file() or not sidecar_path.is_file():
        raise ExportError(f"{str(path)!r} needs to exist with its sidecar {sidecar_path.name} (written by "
                          "gpd-ds export)")
    sidecar = json.loads(sidecar_path.read_text())
    if sidecar.get("format") != SIDECAR_FORMAT:
        raise ExportError(f"{sidecar_path} is not a gpd_ds export sidecar")
    model = create_model(sidecar["model"], num_classes=sidecar["num_classes"], image_size=sidecar["input_size"][-1],
                         **sidecar.get("model_kwargs", {}))
    model.load_state_dict(read_safetensors(path), strict=True)
    return model.eval(), sidecar
