"""model.method=peer: the online-peer control (a same-size second student in the dynamic teacher's place)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gpd_ds.config import ConfigError, apply_overrides
from gpd_ds.gpd.model import GPDOutput
from gpd_ds.losses import GPDLoss
from gpd_ds.models import create_model
from gpd_ds.models.build import build_model
from gpd_ds.models.peer import PeerModel
from gpd_ds.recipes import get_recipe

NUM_CLASSES = 10


def _peer(*overrides: str) -> PeerModel:
    cfg = apply_overrides(get_recipe("demo"), ["model.method=peer", "model.static_teacher=none", "loss.kd=none",
                                               *overrides])
    cfg.validate()
    torch.manual_seed(0)
    return build_model(cfg, NUM_CLASSES)


def test_from_scratch_the_peer_is_a_second_student_with_its_own_random_weights() -> None:
    model = _peer()
    assert isinstance(model, PeerModel)
    assert type(model.peer) is type(model.student)
    s, p = model.student.state_dict(), model.peer.state_dict()
    assert s.keys() == p.keys()
    assert all(s[k].shape == p[k].shape for k in s)
    assert not torch.equal(next(model.student.parameters()), next(model.peer.parameters()))
    assert {id(t) for t in model.student.parameters()}.isdisjoint(id(t) for t in model.peer.parameters())


def test_from_scratch_the_student_is_built_first_as_in_every_method() -> None:
    """Paired seeds: the peer run's student starts from the same weights as the CE run's student."""
    cfg = apply_overrides(get_recipe("demo"), ["model.method=plain", "model.static_teacher=none", "loss.kd=none"])
    torch.manual_seed(0)
    plain = build_model(cfg, NUM_CLASSES)
    for a, b in zip(plain.state_dict().values(), _peer().student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fine_tuning_starts_both_from_the_pretrained_student(tmp_path: Path) -> None:
    torch.manual_seed(7)
    weights = create_model("test_resnet", num_classes=NUM_CLASSES).state_dict()
    save_file(weights, str(tmp_path / "student.safetensors"))
    model = _peer(f"model.student_checkpoint={tmp_path / 'student.safetensors'}")
    for net in (model.student, model.peer):
        for k, v in net.state_dict().items():
            torch.testing.assert_close(v, weights[k], rtol=0, atol=0)


def test_modes_run_the_student_the_peer_or_both() -> None:
    model = _peer().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        both = model(x, mode="both")
        assert isinstance(both, GPDOutput)
        torch.testing.assert_close(both.student, model.student(x))
        torch.testing.assert_close(both.teacher, model.peer(x))
        torch.testing.assert_close(model(x, mode="teacher"), model.peer(x))
        torch.testing.assert_close(model(x, mode="student"), model.student(x))
    with pytest.raises(ValueError, match="mode='wide' is not a GPD mode"):
        model(x, mode="wide")
    with pytest.raises(ValueError, match="no feature distillation"):
        model(x, mode="both", features=True)


def test_the_peer_gets_the_dynamic_teachers_loss_terms_and_the_student_learns_from_it() -> None:
    model = _peer()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, NUM_CLASSES, (4,))
    out = model(x, mode="both")
    loss = GPDLoss(kd="none")(out.student, out.teacher, y, None)
    assert {"ce_student", "ce_dynamic_teacher", "sce_dynamic_to_student"} <= set(loss.terms)
    loss.total.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_peer_with_feature_distillation_is_refused() -> None:
    cfg = apply_overrides(get_recipe("demo"), ["model.method=peer", "loss.kd=dkd+reviewkd"])
    with pytest.raises(ConfigError, match="has no feature distillation"):
        cfg.validate()


def test_an_unknown_method_names_peer_in_the_fix() -> None:
    cfg = apply_overrides(get_recipe("demo"), ["model.method=online"])
    with pytest.raises(ConfigError, match="use gpd, plain or peer"):
        cfg.validate()
