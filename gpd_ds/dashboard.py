"""The GPD W&B dashboard: a saved workspace view with the panels of docs/wandb.md, built by W&B's workspace library.

``gpd-ds wandb-dashboard --entity E --project P`` builds the view (sections: dynamic-teacher growth and gaps, EMA,
loss terms, system; runs grouped by the run config's ``scenario``) and saves it to W&B, or, with ``--url`` of a
view it saved before, updates that view. The panels' metric names are the ones :mod:`gpd_ds.tracking` logs. It
needs ``pip install "gpd-ds[dashboard]"`` (``wandb-workspaces``); creating the view needs W&B online (an API
key); offline, the command builds and checks the view, lists it, and says that nothing was saved.
"""

from __future__ import annotations

import os

from gpd_ds.errors import UserInputError
from gpd_ds.tracking import GROWTH_KEYS

# (section, [(panel title, x-axis, metrics)]): every name here is one gpd_ds.tracking logs
SECTIONS: list[tuple[str, list[tuple[str, str, list[str]]]]] = [
    ("Dynamic teacher growth", [
        ("Top-1: static teacher, dynamic teacher, student", "epoch", list(GROWTH_KEYS[:3])),
        ("Gaps", "epoch", list(GROWTH_KEYS[3:])),
        ("Dynamic teacher: growth since the start", "epoch", ["eval/dynamic_teacher/growth"]),
        ("Dynamic teacher: replica divergence", "epoch", ["eval/dynamic_teacher/replica_divergence"]),
    ]),
    ("EMA", [
        ("Top-1 of the EMA weights", "epoch", ["eval/dynamic_teacher_ema/top1", "eval/student_ema/top1"]),
    ]),
    ("Loss terms", [
        ("Total loss", "Step", ["train/loss"]),
        ("Cross-entropy", "Step", ["train/ce_student", "train/ce_dynamic_teacher"]),
        ("Dynamic teacher -> student", "Step", ["train/sce_dynamic_to_student"]),
        ("Static teacher -> both", "Step", ["train/kd_static_to_student", "train/kd_static_to_dynamic_teacher"]),
        ("Learning rate", "Step", ["train/lr"]),
    ]),
    ("System", [
        ("Throughput (images/s)", "Step", ["train/images_per_s"]),
        ("Time waiting for data (fraction)", "Step", ["train/data_wait"]),
        ("GPU memory (GB)", "Step", ["train/gpu_mem_gb"]),
        ("Gradient norm", "Step", ["train/grad_norm"]),
    ]),
]
SCALARS = ["best/student_top1"]
GROUP_BY = "scenario"  # a top-level key of the W&B run config (gpd_ds.train's run record)


class DashboardError(UserInputError, RuntimeError):
    """The dashboard cannot be built or saved."""


def metric_names() -> set[str]:
    return {m for _, panels in SECTIONS for _, _, ys in panels for m in ys} | set(SCALARS)


def build(entity: str, project: str, name: str = "GPD: dynamic teacher growth"):
    """The workspace view (``wandb_workspaces.workspaces.Workspace``), not saved."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as e:
        raise DashboardError(f"the W&B dashboard needs wandb-workspaces ({e}): pip install 'gpd-ds[dashboard]'") from e
    sections = [ws.Section(name=section, is_open=True, panels=[
        wr.LinePlot(title=title, x=x, y=list(ys)) for title, x, ys in panels]) for section, panels in SECTIONS]
    sections[0].panels.extend(wr.ScalarChart(title=m, metric=m, groupby_aggfunc="max") for m in SCALARS)
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections,
                        runset_settings=ws.RunsetSettings(groupby=[ws.Config(GROUP_BY)]))


def online() -> bool:
    """Whether W&B can be written to: an API key (or a stored login) and no offline/disabled mode."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:  # `wandb login` stores the key in ~/.netrc
        return netrc.netrc().authenticators(os.environ.get("WANDB_HOST", "api.wandb.ai")) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def save(workspace, url: str | None = None) -> str:
    """Save ``workspace`` as a new view, or into the view at ``url`` (replacing its sections); returns its URL."""
    if url:
        import wandb_workspaces.workspaces as ws

        existing = ws.Workspace.from_url(url)
        existing.sections, existing.runset_settings = workspace.sections, workspace.runset_settings
        workspace = existing
    workspace.save()
    return str(workspace.url)
