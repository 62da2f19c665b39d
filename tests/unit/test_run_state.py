"""The run state: components saved and restored by name, and the client-state versions a resume reads."""

from __future__ import annotations

import pytest

from gpd_ds.checkpoint import CheckpointError
from gpd_ds.train.evaluation import Evaluator
from gpd_ds.train.state import STATE_VERSION, Lineage, RunState, TrackerState, upgrade_client_state


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


def test_a_new_component_is_saved_and_restored_by_its_name() -> None:
    counter, tracker = Counter(), TrackerState()
    counter.n, tracker.wandb_run_id = 7, "abc"
    saved = RunState(counter=counter, tracker=tracker, lineage=Lineage("L1")).state_dict()
    assert saved == {"counter": {"n": 7}, "tracker": {"wandb_run_id": "abc"}, "lineage": "L1"}
    fresh, lineage = Counter(), Lineage("new")
    RunState(counter=fresh, lineage=lineage).load_state_dict(saved)
    assert (fresh.n, lineage.value) == (7, "L1")


def test_a_checkpoint_without_a_component_is_refused_by_name() -> None:
    with pytest.raises(CheckpointError, match="has no counter"):
        RunState(counter=Counter()).load_state_dict({"lineage": "L1"})


def test_the_0_2_layout_is_read_into_the_components() -> None:
    kept = {"best": {"top1": 50.0, "weights": "ema", "step": 5}, "static_teacher": {"top1": 70.0},
            "start_dynamic_top1": 10.0, "wandb_run_id": "w1"}
    client = {"ranks": [{"data": {}, "rng": {}}], "ema": {"w": 1}, "ema_shapes": None, "kept": kept,
              "lineage": "L0", "step": 5}
    state = upgrade_client_state(client)
    assert state == {"ranks": client["ranks"], "ema": {"whole": {"w": 1}, "shapes": None}, "best": kept["best"],
                     "tracker": {"wandb_run_id": "w1"}, "lineage": "L0",
                     "evaluator": {"static_teacher": {"top1": 70.0}, "start_dynamic_top1": 10.0}}
    evaluator = Evaluator.__new__(Evaluator)  # only its state here
    evaluator.load_state_dict(state["evaluator"])
    assert (evaluator.static_teacher_metrics, evaluator.start_dynamic_top1) == ({"top1": 70.0}, 10.0)


def test_a_newer_layout_is_refused_with_the_version_that_wrote_it() -> None:
    assert upgrade_client_state({"state_version": STATE_VERSION, "state": {"a": 1}}) == {"a": 1}
    with pytest.raises(CheckpointError, match=r"written by gpd_ds 9\.0\.0 \(client state version 9\).*resume it with "
                                              r"gpd_ds 9\.0\.0"):
        upgrade_client_state({"state_version": 9, "gpd_ds_version": "9.0.0", "state": {}})
