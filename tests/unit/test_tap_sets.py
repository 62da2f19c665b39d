"""Feature taps for any model (gpd_ds/tap_sets.py): each family's default five levels read exactly what timm's own
hook-free ``forward_intermediates`` computes (bitwise), the hooks change no logit, the dynamic teacher's taps (same
module paths) equal the tiled student's at IR init, and taps named by module path resolve or fail clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpd_ds.config import LossConfig
from gpd_ds.features import FeatureTapError, build_connectors, feature_taps
from gpd_ds.gpd import expand
from gpd_ds.gpd.taps import INPUT, Tap, recording
from gpd_ds.models import create_model

NUM_CLASSES = 10
SIZE = 32
# small members of each family, sized for 32 px: (timm name, kwargs, timm's stage indices of the default taps)
FAMILIES = {
    "vit": ("deit_tiny_patch16_224", {"depth": 4, "img_size": SIZE, "patch_size": 4}, [0, 1, 2, 3]),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"depth": 4, "img_size": SIZE, "patch_size": 4},
                       [0, 1, 2, 3]),
    "convnext": ("convnext_atto", {}, [0, 1, 2, 3]),
    "swin": ("swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1), "img_size": SIZE, "window_size": 2,
                                              "embed_dim": 24, "num_heads": (1, 1, 1, 1)}, [0, 1, 2, 3]),
    "efficientnet": ("efficientnet_b0", {}, [1, 2, 3, 4]),
}


def _model(family: str) -> nn.Module:
    name, kwargs, _ = FAMILIES[family]
    torch.manual_seed(0)
    return create_model(name, num_classes=NUM_CLASSES, **kwargs).eval()


def _first(logits):
    return logits[0] if isinstance(logits, tuple) else logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_taps_equal_timms_hook_free_intermediates_bitwise(family: str) -> None:
    name, _, indices = FAMILIES[family]
    model, x = _model(family), torch.randn(2, 3, SIZE, SIZE)
    taps = feature_taps(model, name)
    with torch.no_grad():
        plain = model(x)
        with recording(model, taps) as found:
            hooked = model(x)
        stages = model.forward_intermediates(x, indices=indices, intermediates_only=True)  # NCHW, no prefix tokens
        features = model.forward_features(x)
        pooled = features[:, 0] if family == "deit_distilled" else model.forward_head(features, pre_logits=True)
    assert torch.equal(_first(hooked), _first(plain))  # the hooks change nothing
    assert len(found["student"]) == 5
    for level, (got, want) in enumerate(zip(found["student"], [*stages, pooled[:, :, None, None]], strict=True)):
        assert torch.equal(got, want), f"{name} level {level}: {got.shape} vs {want.shape}"
    sides = [t.shape[-1] for t in found["student"][:4]]
    assert sides == sorted(sides, reverse=True)
    assert found["student"][4].shape[-1] == 1


def test_rvt_taps_the_blocks_ending_each_quarter() -> None:
    torch.manual_seed(0)
    model = create_model("rvt_tiny", num_classes=NUM_CLASSES, img_size=SIZE).eval()
    taps = feature_taps(model, "rvt_tiny")
    assert [t.path for t in taps] == ["transformers.0.blocks.2", "transformers.0.blocks.5", "transformers.0.blocks.8",
                                      "transformers.1.blocks.1", "head"]
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad(), recording(model, taps) as found:
        model(x)
        stage0 = model.patch_embed(x)
        tokens = stage0.flatten(2).transpose(1, 2)
        for block in model.transformers[0].blocks[:3]:
            tokens = block(tokens, stage0.shape[-2:])
    assert torch.equal(found["student"][0], tokens.transpose(1, 2).reshape(stage0.shape))


@pytest.mark.parametrize("family", ["vit", "convnext", "swin"])
def test_dynamic_teacher_taps_are_the_tiled_students_at_init(family: str) -> None:
    """IR keeps the module paths: the student's taps read the dynamic teacher, whose features at init are the
    student's tiled r times and divided by r (reviewkd_rvt.md 1.2), in one forward of both modes."""
    name, _, _ = FAMILIES[family]
    student = _model(family)
    model = expand(student, width_ratio=2, noise_std=0.0, input_size=(3, SIZE, SIZE)).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad(), recording(model.net, feature_taps(student, name)) as found:
        model(x, mode="both")
    with torch.no_grad(), recording(student, feature_taps(student, name)) as plain:
        student(x)
    for f_t, f_s, f in zip(found["teacher"], found["student"], plain["student"], strict=True):
        torch.testing.assert_close(f_s, f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(f_t, torch.cat([f, f], dim=1) / 2, rtol=1e-5, atol=1e-5)


def test_named_taps_resolve_on_any_module() -> None:
    model = _model("convnext")
    paths = ["stages.1", "stages.3.blocks.1.mlp.fc1:input", "head.fc:input"]
    taps = feature_taps(model, "convnext_atto", paths=paths)
    assert taps == (Tap("stages.1", "output"), Tap("stages.3.blocks.1.mlp.fc1", INPUT), Tap("head.fc", INPUT))
    with torch.no_grad(), recording(model, taps) as found:
        model(torch.randn(2, 3, SIZE, SIZE))
    assert [tuple(t.shape[1:]) for t in found["student"]] == [(80, 4, 4), (320, 1, 1), (320, 1, 1)]


def test_a_bad_named_tap_names_the_key_the_path_and_close_modules() -> None:
    model = _model("convnext")
    with pytest.raises(FeatureTapError, match=r"loss.teacher_taps: 'convnext_atto' has no module 'stage.1'; "
                                              r"did you mean stages.1"):
        feature_taps(model, "convnext_atto", paths=["stage.1"], key="loss.teacher_taps")
    with pytest.raises(FeatureTapError, match=r"'stages.1:inside' is invalid"):
        feature_taps(model, "convnext_atto", paths=["stages.1:inside"])


def test_connectors_of_a_vit_student_and_a_convnext_teacher_meet_on_the_teachers_grids() -> None:
    """Different families: the connector maps widths, the loss compares on the static teacher's grid."""
    from gpd_ds.losses import Features, GPDLoss

    student, teacher = _model("vit"), _model("convnext")
    gpd = expand(student, width_ratio=2, noise_std=1e-3, input_size=(3, SIZE, SIZE)).train()
    loss_cfg = LossConfig(kd="dkd+fitnet")
    gpd.attach_connectors(*build_connectors(student, "deit_tiny_patch16_224", teacher, "convnext_atto", SIZE,
                                            loss_cfg, 2))
    x, y = torch.randn(4, 3, SIZE, SIZE), torch.tensor([1, 2, 3, 4])
    with torch.no_grad(), recording(teacher, feature_taps(teacher, "convnext_atto")) as static:
        static_logits = teacher(x)
    out = gpd(x, mode="both", features=True)
    assert [t.shape[1] for t in out.student_features] == [40, 80, 160, 320, 320]  # the teacher's widths
    loss = GPDLoss.from_config(loss_cfg)(out.student, out.teacher, y, static_logits, features=Features(
        out.student_features, out.teacher_features, static["student"]))
    assert {"fitnet_static_to_student", "fitnet_static_to_dynamic_teacher"} <= loss.terms.keys()
    loss.total.backward()
    assert all(p.grad is not None for p in gpd.connectors.parameters())


@pytest.mark.parametrize("family", ["vit", "convnext", "swin"])
def test_activation_checkpointing_keeps_features_losses_and_gradients(family: str) -> None:
    """IR's blocks (class "Parametrized<Block>") are found and checkpointed; the taps inside the recomputed blocks
    give the same loss and gradients."""
    import copy

    from gpd_ds.gpd.checkpointing import enable_activation_checkpointing
    from gpd_ds.losses import Features, GPDLoss

    name = FAMILIES[family][0]
    student, teacher = _model(family), _model("convnext")
    model = expand(student, width_ratio=2, noise_std=1e-3, input_size=(3, SIZE, SIZE)).train()
    loss_cfg = LossConfig(kd="dkd+reviewkd", reviewkd_mid_channels=16)
    model.attach_connectors(*build_connectors(student, name, teacher, "convnext_atto", SIZE, loss_cfg, 2))
    checkpointed = copy.deepcopy(model)
    assert enable_activation_checkpointing(checkpointed) > 0
    x, y = torch.randn(4, 3, SIZE, SIZE), torch.tensor([1, 2, 3, 4])
    with torch.no_grad(), recording(teacher, feature_taps(teacher, "convnext_atto")) as static:
        static_logits = teacher(x)
    totals = []
    for m in (model, checkpointed):
        torch.manual_seed(0)
        out = m(x, mode="both", features=True)
        loss = GPDLoss.from_config(loss_cfg)(out.student, out.teacher, y, static_logits, features=Features(
            out.student_features, out.teacher_features, static["student"]))
        loss.total.backward()
        totals.append(loss.total.detach())
    torch.testing.assert_close(totals[0], totals[1], rtol=0, atol=0)
    for (n, p1), (_, p2) in zip(model.named_parameters(), checkpointed.named_parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-7, msg=n)
