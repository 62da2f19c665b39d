"""The checkpoint manager of a run: the engine's state plus the :class:`~gpd_ds.train.state.RunState`, saved at a
step and restored on resume. The file rules (atomic completion marker, pruning, safe loading, fallback to an older
checkpoint) are :mod:`gpd_ds.checkpoint`'s."""

from __future__ import annotations

from pathlib import Path

from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)

import gpd_ds
from gpd_ds import checkpoint, distributed
from gpd_ds.checkpoint import Resumed
from gpd_ds.distributed import DistInfo
from gpd_ds.train.state import STATE_VERSION, Lineage, RunState, upgrade_client_state


class Checkpointer:
    """Saves ``engine`` and ``state`` to ``root/stepNNNNNNNNN/``, keeping the newest ``keep`` of the run's lineage."""

    def __init__(self, engine, root: Path, keep: int, info: DistInfo, state: RunState, lineage: Lineage,
                 meta: dict, config_digest: str, steps_per_epoch: int, saved_at: int = -1) -> None:
        self.engine, self.root, self.keep, self.info = engine, root, keep, info
        self.state, self.lineage, self.meta, self.config_digest = state, lineage, meta, config_digest
        self.steps_per_epoch = steps_per_epoch
        self.saved_at = saved_at  # the step of the newest checkpoint of this run directory, -1 for none yet

    def save(self, step: int) -> Path:
        """Save at ``step`` (every rank calls it)."""
        distributed.average_running_stats(self.engine.module)  # rank 0's module is what the checkpoint holds
        client = {"state_version": STATE_VERSION, "gpd_ds_version": gpd_ds.__version__,
                  "state": self.state.state_dict(), "step": step,
                  "epoch": step / self.steps_per_epoch, "config_digest": self.config_digest,
                  # lets DeepSpeed's ds_to_universal convert the checkpoint for another number of ranks
                  UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        meta = {**self.meta, "lineage": self.lineage.value}
        path = checkpoint.save(self.engine, self.root, step, client, self.keep, self.info, meta,
                               rank_tensors=self.state.rank_tensors())
        self.saved_at = step
        return path

    def path_at(self, step: int) -> Path | None:
        """The checkpoint already saved at ``step``, or None."""
        return self.root / checkpoint.tag_for(step) if self.saved_at == step else None

    def restore(self, resumed: Resumed) -> None:
        """Load the run state of a checkpoint the engine was resumed from (any client state version)."""
        self.lineage.value = resumed.marker.lineage  # a 0.2.x client state may predate lineages
        self.state.load_state_dict(upgrade_client_state(resumed.client))
