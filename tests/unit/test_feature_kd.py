"""Feature distillation (ReviewKD under GPD): the taps read what a hook-free forward computes, the GPD model gives
both modes' features in one forward, the summed loss has the gradients of separate backwards, the connectors live
in the trained module and export drops them; the switches of the objective."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpd_ds.config import ConfigError, LossConfig, TrainConfig, apply_overrides, split_kd
from gpd_ds.features import FeatureTapError, StudentWithConnector, build_connectors, feature_taps
from gpd_ds.gpd import expand, extract
from gpd_ds.gpd.checkpointing import enable_activation_checkpointing
from gpd_ds.gpd.taps import recording
from gpd_ds.losses import Features, GPDLoss
from gpd_ds.models import create_model
from gpd_ds.models.build import build_model
from gpd_ds.recipes import get_recipe
from gpd_ds.train.step import kd_warmup

NUM_CLASSES = 10


def _resnet_levels(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """ReviewKD's levels of a timm ResNet without hooks: each stage's last activation removed from a copy (the
    next stage gets the ReLU applied here), then the pooled feature of the unchanged model."""
    m = copy.deepcopy(model)
    for i in range(1, 5):
        last = getattr(m, f"layer{i}")[-1]
        setattr(last, "act3" if hasattr(last, "act3") else "act2", nn.Identity())
    h = m.maxpool(m.act1(m.bn1(m.conv1(x))))
    levels = []
    for i in range(1, 5):
        h = getattr(m, f"layer{i}")(h)
        levels.append(h)
        h = F.relu(h)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    return [*levels, pooled[:, :, None, None]]


def _mobilenet_levels(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The levels of gpd_ds's MobileNet-v1 without hooks: the outputs of model[3, 5, 11, 13] before their last
    ReLU (the BatchNorm after the pointwise conv), then the pooled feature."""
    levels, h = [], x
    for k, block in enumerate(model.model):
        if k in (3, 5, 11, 13):
            levels.append(block[:5](h))
        h = block(h)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    return [*levels, pooled[:, :, None, None]]


@pytest.mark.parametrize(("name", "size", "stride"), [("resnet18", 64, 4), ("resnet50", 64, 4), ("test_resnet", 32, 4),
                                                       ("cifar_resnet10", 32, 2), ("mobilenetv1_relu", 64, 4)])
def test_taps_give_the_features_of_a_hook_free_forward(name: str, size: int, stride: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        plain_logits = model(x)
        with recording(model, feature_taps(model, name)) as found:
            logits = model(x)
        want = (_mobilenet_levels if name.startswith("mobilenet") else _resnet_levels)(model, x)
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=0)  # the hooks change nothing
    assert len(found["student"]) == 5
    for got, expected in zip(found["student"], want, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # spatial sizes shallow -> deep: the first stage's stride, then halving; the pooled feature last
    assert [t.shape[-1] for t in found["student"]] == [size // stride >> i for i in range(4)] + [1]


def test_timm_mobilenet_v1_taps_the_same_blocks() -> None:
    """timm's mobilenetv1_100 (ReLU6): blocks.1.1, 2.1, 3.5, 4.1 are the reference's model[3, 5, 11, 13]."""
    model = create_model("mobilenetv1_100", num_classes=NUM_CLASSES).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), recording(model, feature_taps(model, "mobilenetv1_100")) as found:
        model(x)
    assert [tuple(t.shape[1:]) for t in found["student"]] == [(128, 16, 16), (256, 8, 8), (512, 4, 4),
                                                             (1024, 2, 2), (1024, 1, 1)]
    # MobileNet-v2 is not v1: it gets the generic rule (its last block of each stride, gpd_ds/tap_sets.py)
    v2 = feature_taps(create_model("mobilenetv2_100", num_classes=NUM_CLASSES), "mobilenetv2_100")
    assert [t.path for t in v2] == ["blocks.1", "blocks.2", "blocks.4", "blocks.6", "classifier"]


def test_families_without_taps_get_a_clear_error() -> None:
    with pytest.raises(FeatureTapError, match="torchvision ResNet shares one ReLU"):
        feature_taps(create_model("torchvision:resnet18", num_classes=NUM_CLASSES), "torchvision:resnet18")
    with pytest.raises(FeatureTapError, match=r"no default taps for 'torchvision:vgg11'.*loss.student_taps"):
        feature_taps(create_model("torchvision:vgg11", num_classes=NUM_CLASSES), "torchvision:vgg11")


def _gpd_with_connectors(noise: float = 0.0, mid: int = 32) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    student = create_model("resnet18", num_classes=NUM_CLASSES)
    model = expand(student, width_ratio=2, noise_std=noise, input_size=(3, 64, 64)).train()
    teacher = create_model("resnet34", num_classes=NUM_CLASSES)
    loss = LossConfig(kd="dkd+reviewkd", reviewkd_mid_channels=mid)
    model.attach_connectors(*build_connectors(student, "resnet18", teacher, "resnet34", 64, loss, 2))
    return student, model


def test_both_modes_give_their_features_in_one_forward() -> None:
    """Student-view features are the plain student's; the dynamic teacher's are r x wider, at IR init
    ``tile_r(F_S) / r`` (reviewkd_rvt.md 1.2); the connectors see each mode's own features."""
    student, model = _gpd_with_connectors()
    model.eval()
    student.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), recording(model.net, model.taps) as found:
        out = model(x, mode="both")
    want = _resnet_levels(student, x)
    for f_t, f_s, f in zip(found["teacher"], found["student"], want, strict=True):
        torch.testing.assert_close(f_s, f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(f_t, torch.cat([f, f], dim=1) / 2, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        both = model(x, mode="both", features=True)
        torch.testing.assert_close(both.student, out.student, rtol=0, atol=0)
        torch.testing.assert_close(both.student_features, model.connectors["student"](found["student"]))
        torch.testing.assert_close(both.teacher_features, model.connectors["teacher"](found["teacher"]))
    assert [t.shape[1] for t in both.student_features] == [64, 128, 256, 512, 512]  # ResNet34's widths


def test_features_need_both_modes() -> None:
    _, model = _gpd_with_connectors()
    with pytest.raises(ValueError, match="features=True needs mode='both'"):
        model(torch.randn(2, 3, 64, 64), mode="student", features=True)


def _static_features(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(1)
    teacher = create_model("resnet34", num_classes=NUM_CLASSES).eval()
    with torch.no_grad(), recording(teacher, feature_taps(teacher, "resnet34")) as found:
        logits = teacher(x)
    return logits, found["student"]


def test_one_backward_of_the_sum_equals_separate_backwards_with_features() -> None:
    """L_T (CE, DKD, ReviewKD through the dynamic teacher's connector) and L_S (CE, DKD, ReviewKD through the
    student's, 3 SCE) as separate backwards accumulate the gradients one backward of GPDLoss gives."""
    _, one = _gpd_with_connectors(noise=1e-3)
    two = copy.deepcopy(one)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([1, 2, 3, 4])
    static_logits, static_features = _static_features(x)
    loss_fn = GPDLoss(kd="dkd", features="reviewkd")
    out = one(x, mode="both", features=True)
    loss = loss_fn(out.student, out.teacher, y, static_logits,
                   features=Features(out.student_features, out.teacher_features, static_features))
    assert {"reviewkd_static_to_student", "reviewkd_static_to_dynamic_teacher"} <= loss.terms.keys()
    loss.total.backward()

    from gpd_ds.reviewkd import hcl

    with recording(two.net, two.taps) as found:
        z_t = two(x, mode="teacher")
    l_t = (F.cross_entropy(z_t, y) + loss_fn.static_kd(z_t, static_logits, y)
           + hcl(two.connectors["teacher"](found["teacher"]), static_features))
    l_t.backward()
    with recording(two.net, two.taps) as found:
        z_s = two(x, mode="student")
    l_s = (F.cross_entropy(z_s, y) + loss_fn.static_kd(z_s, static_logits, y)
           + hcl(two.connectors["student"](found["student"]), static_features)
           + 3 * F.cross_entropy(z_s, 0.9 * F.softmax(z_t.detach(), dim=1) + 0.1 / NUM_CLASSES))
    l_s.backward()
    torch.testing.assert_close(loss.total, l_t + l_s, rtol=1e-5, atol=1e-6)
    for (n, p1), (_, p2) in zip(one.named_parameters(), two.named_parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6, msg=n)
    # each connector learns only from its own mode's term
    assert all(p.grad is not None for p in one.connectors.parameters())


def test_activation_checkpointing_keeps_features_and_gradients() -> None:
    _, model = _gpd_with_connectors(noise=1e-3)
    checkpointed = copy.deepcopy(model)
    assert enable_activation_checkpointing(checkpointed) > 0
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([1, 2, 3, 4])
    static_logits, static_features = _static_features(x)
    loss_fn = GPDLoss(kd="dkd", features="reviewkd")
    totals = []
    for m in (model, checkpointed):
        out = m(x, mode="both", features=True)
        loss = loss_fn(out.student, out.teacher, y, static_logits,
                       features=Features(out.student_features, out.teacher_features, static_features))
        loss.total.backward()
        totals.append(loss.total.detach())
    torch.testing.assert_close(totals[0], totals[1], rtol=0, atol=0)
    for (n, p1), (_, p2) in zip(model.named_parameters(), checkpointed.named_parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_connectors_are_part_of_the_module_and_export_drops_them() -> None:
    _, model = _gpd_with_connectors(noise=1e-3)
    keys = model.state_dict().keys()
    assert any(k.startswith("connectors.teacher.") for k in keys)
    assert any(k.startswith("connectors.student.") for k in keys)
    assert {id(p) for p in model.connectors.parameters()} <= {id(p) for p in model.parameters()}
    plain = extract(model.eval())
    fresh = create_model("resnet18", num_classes=NUM_CLASSES)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    assert model.num_parameters("teacher") == sum(p.numel() for p in model.net.parameters())


def _reviewkd_config(*overrides: str) -> TrainConfig:
    cfg = get_recipe("demo")
    return apply_overrides(cfg, ["loss.kd=dkd+reviewkd", "loss.reviewkd_mid_channels=32", *overrides])


def test_build_model_attaches_connectors_for_gpd_and_plain() -> None:
    torch.manual_seed(0)
    gpd = build_model(_reviewkd_config(), NUM_CLASSES)
    assert set(gpd.connectors) == {"student", "teacher"}
    assert gpd.connectors["teacher"].in_channels == tuple(2 * c for c in gpd.connectors["student"].in_channels)
    assert gpd.connectors["student"].out_channels == (64, 128, 256, 512, 512)  # resnet10t, the demo's teacher
    plain = build_model(_reviewkd_config("model.method=plain"), NUM_CLASSES)
    assert isinstance(plain, StudentWithConnector)
    assert set(plain.connectors) == {"student"}
    x = torch.randn(2, 3, 32, 32)
    logits, connected = plain(x, features=True)
    torch.testing.assert_close(logits, plain.net(x))
    assert len(connected) == 5
    assert build_model(apply_overrides(get_recipe("demo"), []), NUM_CLASSES).connectors is None


def test_reviewkd_needs_a_static_teacher() -> None:
    cfg = _reviewkd_config("model.static_teacher=none")
    with pytest.raises(ConfigError, match=r"feature distillation distils the static teacher's features"):
        cfg.validate()


@pytest.mark.parametrize(("kd", "split"), [("dkd", ("dkd", "none")), ("reviewkd", ("none", "reviewkd")),
                                           ("dkd+reviewkd", ("dkd", "reviewkd")), ("kl+reviewkd", ("kl", "reviewkd")),
                                           ("none", ("none", "none"))])
def test_loss_kd_names_the_logit_and_the_feature_term(kd: str, split: tuple[str, str]) -> None:
    assert split_kd(kd) == split
    loss = GPDLoss.from_config(apply_overrides(get_recipe("demo"), [f"loss.kd={kd}"]).loss)
    assert (loss.kd, loss.features) == split


def test_switches_of_the_reference() -> None:
    """--deactive_kd_static_teacher (kd_dynamic_teacher=false) drops the dynamic teacher's static-teacher terms;
    the dynamic -> student term's type; the warm-up factor min(epoch / w, 1) with epochs from 1."""
    torch.manual_seed(0)
    s, t, z, y = torch.randn(4, 10), torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    on, off = GPDLoss(kd="dkd"), GPDLoss(kd="dkd", kd_dynamic_teacher=False)
    full, without = on(s, t, y, z), off(s, t, y, z)
    assert "kd_static_to_dynamic_teacher" in full.terms
    assert "kd_static_to_dynamic_teacher" not in without.terms
    torch.testing.assert_close(without.total, full.total - full.terms["kd_static_to_dynamic_teacher"])
    mse = GPDLoss(kd="none", dynamic_loss="mse")(s, t, y)
    torch.testing.assert_close(mse.terms["mse_dynamic_to_student"], F.mse_loss(s, t))
    ce = GPDLoss(kd="none", dynamic_loss="ce")(s, t, y)
    torch.testing.assert_close(ce.terms["ce_dynamic_to_student"], F.cross_entropy(s, F.softmax(t, dim=1)))
    half = on(s, t, y, z, kd_scale=0.5)
    kd = full.terms["kd_static_to_student"] + full.terms["kd_static_to_dynamic_teacher"]
    torch.testing.assert_close(half.total, full.total - 0.5 * kd)
    cfg = apply_overrides(get_recipe("demo"), ["loss.kd_warmup_epochs=20"])
    assert [kd_warmup(cfg.loss, e) for e in (0, 9, 19, 30)] == [1 / 20, 10 / 20, 1.0, 1.0]
    assert kd_warmup(get_recipe("demo").loss, 0) == 1.0


@pytest.mark.parametrize(("recipe", "student", "kd", "mid"), [
    ("resnet18_from_resnet34", "resnet18", "dkd", 512), ("mobilenet_from_resnet50", "mobilenetv1_relu", "dkd", 512),
    ("resnet18_from_resnet34_reviewkd", "resnet18", "reviewkd", 512),
    ("mobilenet_from_resnet50_reviewkd", "mobilenetv1_relu", "reviewkd", 256),
])
def test_paper_recipes_print_their_teacher_mode_student_and_switches(recipe: str, student: str, kd: str, mid: int,
                                                                     capsys: pytest.CaptureFixture) -> None:
    import json

    from gpd_ds.train_cli import main

    assert main(["--recipe", recipe, "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["static_teacher_train_mode"] is True  # the reference's mode for its GPD rows
    assert printed["model"]["student"] == student
    loss = printed["loss"]
    assert (loss["kd"], loss["kd_dynamic_teacher"], loss["dynamic_loss"], loss["dynamic_weight"]) == (kd, True, "sce",
                                                                                                       3.0)
    assert (loss["kd_warmup_epochs"], loss["reviewkd_weight"], loss["reviewkd_mid_channels"]) == (0.0, 1.0, mid)
