"""Run state: what outlives a restart besides the engine's own (weights, optimizer, schedule, step counter).

Each piece is a component with ``state_dict()`` / ``load_state_dict()``; :class:`RunState` names them, and the
checkpoint stores ``{name: component.state_dict()}`` in DeepSpeed's client state (rank 0 writes it; numbers,
strings and tensors only, loaded weights-only). A new piece of state is one component added to the run's
:class:`RunState` (:func:`gpd_ds.train.loop.train`). The components:

* ``ranks`` (:class:`RankPositions`): each rank's data position and RNG state;
* ``ema`` (:class:`EmaState`): the EMA weights (partitioned under ZeRO-3: then per-rank files, see
  :meth:`EmaState.rank_tensors`);
* ``best`` (:class:`gpd_ds.train.evaluation.BestWeights`): the best student top-1 so far and its weights' origin;
* ``evaluator`` (:class:`gpd_ds.train.evaluation.Evaluator`): the static teacher's accuracy (measured once) and
  the dynamic teacher's at the start of the run (the baseline of its growth);
* ``tracker`` (:class:`TrackerState`): the W&B run id, so a resumed job continues the same W&B run;
* ``lineage`` (:class:`Lineage`): the id made when the run started from step 0 (checkpoint pruning keeps to it).

gpd_ds 0.2.x wrote the same values under other keys (``kept``, ``ema_shapes``); :func:`upgrade_client_state`
reads them, so a run started with 0.2.x resumes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch

import gpd_ds
from gpd_ds import distributed
from gpd_ds.checkpoint import CheckpointError
from gpd_ds.distributed import DistInfo
from gpd_ds.ema import ModelEma, PartitionedEma, consolidate

log = logging.getLogger("gpd_ds")

# The layout of the client state: 1 = gpd_ds 0.2.x (no version key), 2 = one entry per component under "state".
STATE_VERSION = 2


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class RunState:
    """The run's stateful components by name; saved and restored together, in order."""

    def __init__(self, **components: Stateful) -> None:
        self.components = components

    def state_dict(self) -> dict[str, Any]:
        """Every component's state. Collective: every rank calls it (the rank positions are gathered)."""
        return {name: c.state_dict() for name, c in self.components.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [name for name in self.components if name not in state]
        if missing:
            raise CheckpointError(f"the checkpoint's client state has no {', '.join(missing)}: it was not written by "
                                  f"gpd_ds >= 0.2 (client state version {STATE_VERSION} or 1); start a new --run-dir")
        for name, c in self.components.items():
            c.load_state_dict(state[name])

    def rank_tensors(self) -> dict[str, torch.Tensor] | None:
        """Tensors each rank saves to its own file (only a partitioned EMA has them)."""
        for c in self.components.values():
            tensors = getattr(c, "rank_tensors", lambda: None)()
            if tensors is not None:
                return tensors
        return None


def upgrade_client_state(client: dict) -> dict[str, Any]:
    """The components' states from a client state of any version (0.2.x's "kept" dict included)."""
    version = client.get("state_version", 1)
    if version == STATE_VERSION:
        return client["state"]
    if version != 1:
        writer = client.get("gpd_ds_version", "another version")
        raise CheckpointError(f"the checkpoint was written by gpd_ds {writer} (client state version {version!r}); "
                              f"gpd_ds {gpd_ds.__version__} reads versions 1 (0.2.x) and {STATE_VERSION}: resume it "
                              f"with gpd_ds {writer}, or export its weights with that version")
    kept = client["kept"]
    return {"ranks": client["ranks"], "ema": {"whole": client.get("ema"), "shapes": client.get("ema_shapes")},
            "best": kept["best"], "tracker": {"wandb_run_id": kept["wandb_run_id"]}, "lineage": client.get("lineage"),
            "evaluator": {"static_teacher": kept["static_teacher"], "start_dynamic_top1": kept["start_dynamic_top1"]}}


class RankPositions:
    """Every rank's data position and RNG state (gathered to rank 0 when saved). After a change of world size
    (elastic resume) the loader continues the epoch from every old rank's position (``resume_elastic``: the samples
    no old rank read, each once) and every rank draws from a fresh RNG seeded from (run seed, step, rank)
    (:func:`gpd_ds.distributed.seed_for_new_rank`), so ranks do not draw alike."""

    def __init__(self, loader, seed: int, step: Callable[[], int], info: DistInfo) -> None:
        self.loader, self.seed, self.step, self.info = loader, seed, step, info

    def state_dict(self) -> list[dict]:
        return distributed.all_gather_object({"data": self.loader.state_dict(), "rng": distributed.rng_state()})

    def load_state_dict(self, ranks: list[dict]) -> None:
        info = self.info
        if len(ranks) == info.world_size:
            self.loader.load_state_dict(ranks[info.rank]["data"])
            distributed.set_rng_state(ranks[info.rank]["rng"])
            return
        step = self.step()
        self.loader.resume_elastic([r["data"] for r in ranks])
        distributed.seed_all(distributed.seed_for_new_rank(self.seed, step, info.rank))
        if info.is_main:
            log.info("the checkpoint was written by %d ranks: each of the %d ranks now draws from a new RNG seeded "
                     "from (run.seed, step %d, rank)", len(ranks), info.world_size, step)


class EmaState:
    """The EMA of the trained module: whole (in the client state), or partitioned like the parameters under ZeRO-3
    (each rank's partitions in its own file; the client state keeps the full shapes, so export can consolidate the
    files without building the model). Its BatchNorm statistics are averaged over ranks before a save."""

    def __init__(self, ema: ModelEma | PartitionedEma, rank_files: Callable[[], list[dict[str, torch.Tensor]]]
                 ) -> None:
        self.ema, self.rank_files = ema, rank_files

    def state_dict(self) -> dict[str, Any]:
        if isinstance(self.ema, ModelEma):
            distributed.average_running_stats(self.ema.module)
            return {"whole": self.ema.state_dict(), "shapes": None}
        distributed.average_running_stats(self.ema.shadow_buffers)
        return {"whole": None, "shapes": {k: list(v) for k, v in self.ema.shapes().items()}}

    def rank_tensors(self) -> dict[str, torch.Tensor] | None:
        return self.ema.state_dict() if isinstance(self.ema, PartitionedEma) else None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(self.ema, ModelEma):
            self.ema.load_state_dict(state["whole"])
        else:
            self.ema.load_state_dict(consolidate(self.rank_files(), self.ema.shapes()))


class TrackerState:
    """The experiment tracker's run id (W&B), so that a resumed job logs into the same run."""

    def __init__(self) -> None:
        self.wandb_run_id: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"wandb_run_id": self.wandb_run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wandb_run_id = state["wandb_run_id"]


class Lineage:
    """The id made when a run starts from step 0 and carried through every resume (checkpoint pruning and the
    completion markers use it; see :mod:`gpd_ds.checkpoint`)."""

    def __init__(self, value: str) -> None:
        self.value = value

    def state_dict(self) -> str:
        return self.value

    def load_state_dict(self, value: str | None) -> None:
        if value is not None:  # 0.2.x checkpoints written before lineages: the marker's (set by the caller)
            self.value = value
