"""Hugging Face Hub export: a distilled student in timm's own hub layout, with a model card of its run.

``gpd-ds export RUN --hf-dir DIR`` writes, through timm's helpers (``timm.models.save_for_hf``):

* ``config.json``: ``architecture``, ``num_classes``, ``label_names`` (the run's classes, in classifier order) and
  the ``pretrained_cfg`` a loader needs (input size, mean/std, crop fraction and mode, interpolation);
* ``model.safetensors``: the exported student's weights (no pickle);
* ``README.md``: a model card from the run's record: recipe, scenario, static teacher, dynamic teacher (r,
  branches), training length, the last evaluation of student / dynamic teacher / static teacher and the exported
  weights' top-1.

``timm.create_model("local-dir:DIR", pretrained=True)`` then builds and loads it with no gpd_ds code (for the
architectures gpd_ds registers itself, ``cifar_resnet*`` and ``mobilenetv1_relu``, ``import gpd_ds.models``
first). ``--push-to-hub ORG/NAME`` uploads the same folder with ``huggingface_hub``; it checks the token and the
connection before any work.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from gpd_ds.errors import UserInputError
from gpd_ds.models import TORCHVISION_PREFIX

PAPER = ("Guo, Zhang, Pan, Liu, Zhang, Chen: Gap Preserving Distillation by Building Bidirectional Mappings with "
         "A Dynamic Teacher, ICLR 2025, arXiv:2410.04140")
CITATION = """@inproceedings{guo2025gpd,
  title={Gap Preserving Distillation by Building Bidirectional Mappings with A Dynamic Teacher},
  author={Guo and Zhang and Pan and Liu and Zhang and Chen},
  booktitle={International Conference on Learning Representations (ICLR)},
  year={2025},
  note={arXiv:2410.04140}
}"""


class HubError(UserInputError, RuntimeError):
    """The student cannot be written in the hub layout, or not uploaded."""


def check_push_possible(repo_id: str) -> None:
    """Fail before any work when the upload cannot happen: a bad repo id, no token, or no connection."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"--push-to-hub {repo_id!r} is not a repository id; use ORG/NAME, e.g. my-lab/resnet18-gpd")
    from huggingface_hub import HfApi, get_token

    token = get_token()  # HF_TOKEN, or the file `huggingface-cli login` writes
    if token is None:
        raise HubError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `huggingface-cli login`; "
                       "nothing was exported")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise HubError("--push-to-hub: HF_HUB_OFFLINE=1 is set, so nothing can be uploaded; unset it, or export "
                       "with --hf-dir only; nothing was exported")
    try:
        HfApi(token=token).whoami()
    except Exception as e:  # a connection error, a proxy page or a refused token: all end the same way here
        raise HubError(f"--push-to-hub: the Hugging Face Hub cannot be reached with this token ({type(e).__name__}: "
                       f"{str(e)[:200]}); check the network and the token, or export with --hf-dir only; "
                       "nothing was exported") from None


def _last_eval(run_dir: Path) -> tuple[dict[str, float], int | None]:
    """The last evaluation's top-1 per model (student, dynamic_teacher, static_teacher, ...), and the last step the
    metrics record."""
    from gpd_ds.report import load_metrics

    out: dict[str, float] = {}
    step = None
    for row in load_metrics(run_dir):
        step = max(step or 0, row.get("step", 0))
        for key, value in row.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "eval" and parts[2] == "top1" and parts[1] != "gap":
                out[parts[1]] = value
    return out, step


def model_card(record: dict, sidecar: dict, run_dir: Path) -> dict:
    """timm's model-card fields (``generate_readme``) from the run's record and the export's sidecar."""
    cfg = record["config"]
    m, o = cfg["model"], cfg["optim"]
    last, trained = _last_eval(run_dir)
    teacher = (f"{m['static_teacher']} (frozen)" if m.get("static_teacher") else "none")
    dynamic = (f"the student widened {m['width_ratio']}x by inverse reparameterization"
               + (", multi-branch 3x3 convolutions" if m.get("branches") else "")
               if m["method"] == "gpd" else {"plain": "none (baseline)", "peer": "a same-size peer"}[m["method"]])
    results = {name.replace("_", " "): f"{value:.2f}" for name, value in sorted(last.items())}
    details = {
        "Model Type": "Image classification",
        "Architecture": f"{sidecar['model']} ({sidecar['num_classes']} classes, "
                        f"{sidecar['input_size'][-1]} px input)",
        "Distillation": f"{'Gap Preserving Distillation' if m['method'] == 'gpd' else m['method']} with gpd_ds, "
                        f"recipe `{cfg['recipe']}`, scenario {record.get('scenario')}",
        "Static teacher": teacher,
        "Dynamic teacher": dynamic,
        "Training": f"{_steps_trained(record, trained)}, global batch "
                    f"{record['ds_config'].get('train_batch_size')}, {o['optimizer']} lr {record.get('lr')}, "
                    f"{record.get('world_size')} ranks, seed {cfg['run']['seed']}",
        "Top-1 (last evaluation, %)": results or "no evaluation recorded",
        "Exported weights": f"{sidecar.get('weights')} weights of step {sidecar.get('step')}"
                            + (f", top-1 {sidecar['top1']:.2f} at that evaluation" if sidecar.get("top1") is not None
                               else " (the newest checkpoint's, not evaluated as such)"),
        "Method": PAPER,
    }
    name = sidecar["model"]
    needs = "import gpd_ds.models  # registers this architecture with timm\n" if name in _GPD_DS_MODELS else ""
    usage = ("```python\nimport timm\n" + needs +
             "model = timm.create_model('local-dir:PATH_TO_THIS_FOLDER', pretrained=True).eval()\n"
             "config = timm.data.resolve_data_config({}, model=model)\n"
             "transform = timm.data.create_transform(**config)\n```\n")
    return {"description": f"{name} distilled by gpd_ds (Gap Preserving Distillation on DeepSpeed) from the run "
                           f"`{Path(run_dir).name}`.", "details": details, "usage": usage, "citation": CITATION,
            "license": "other", "tags": ["image-classification", "timm", "knowledge-distillation", "gpd_ds"]}


def _steps_trained(record: dict, trained: int | None) -> str:
    """What ran: the whole schedule, or the steps trained of it (a run stopped by run.max_steps or cut short)."""
    epochs, total = record["config"]["optim"]["epochs"], record.get("total_steps")
    if trained is None or total is None or trained >= total:
        return f"{epochs} epochs, {total} optimizer steps"
    limit = record["config"]["run"].get("max_steps")
    why = f"stopped by run.max_steps={limit}" if limit is not None and trained >= limit else "the run ended early"
    return f"{trained} of the schedule's {total} optimizer steps ({epochs} epochs; {why})"


_GPD_DS_MODELS = ("cifar_resnet10", "cifar_resnet18", "mobilenetv1_relu")


def write_hf_dir(export_path: Path, run_dir: Path, hf_dir: Path) -> Path:
    """The hub layout of an export (``gpd-ds export``'s .safetensors + sidecar) in ``hf_dir``; returns it."""
    import inspect

    import timm
    from timm.models import save_for_hf
    from timm.models._hub import generate_readme

    from gpd_ds.export import load_exported, run_record

    model, sidecar = load_exported(export_path)
    if sidecar["model"].startswith(TORCHVISION_PREFIX):
        raise HubError(f"{sidecar['model']} is a torchvision model; timm's hub layout holds timm models only. "
                       "Export it with --out (a .safetensors file and its sidecar) instead")
    if "data_config" not in inspect.signature(save_for_hf).parameters:
        raise HubError(f"timm {timm.__version__}'s save_for_hf cannot record the preprocessing (data_config); "
                       "upgrade timm (1.0.31 is tested)")
    if not timm.is_model(sidecar["model"]):
        raise HubError(f"{sidecar['model']!r} is not a timm architecture, so timm cannot rebuild it from a hub "
                       "folder; export with --out instead")
    data_config = {"input_size": tuple(sidecar["input_size"]), "mean": tuple(sidecar["mean"]),
                   "std": tuple(sidecar["std"]), "crop_pct": sidecar["crop_pct"], "crop_mode": "center",
                   "interpolation": sidecar["interpolation"]}
    hf_dir = Path(hf_dir)
    hf_dir.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(hf_dir), model_config={"label_names": list(sidecar["classes"])},
                model_args=dict(sidecar.get("model_kwargs") or {}), data_config=data_config,
                safe_serialization=True)
    card = model_card(run_record(run_dir), sidecar, run_dir)
    (hf_dir / "README.md").write_text(generate_readme(card, hf_dir.name), encoding="utf-8")
    (hf_dir / "gpd_ds_export.json").write_text(json.dumps(sidecar, indent=1))
    return hf_dir


def push(hf_dir: Path, repo_id: str) -> str:
    """Upload a written hub folder; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    return str(api.upload_folder(repo_id=repo_id, folder_path=str(hf_dir), commit_message="gpd_ds export"))


def temporary_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="gpd_ds_hub_")
