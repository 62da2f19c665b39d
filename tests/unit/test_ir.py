"""IR exactness and CBR extraction for every supported family (gpd_method.md I1, I2, I4, I5)."""

from __future__ import annotations

import copy

import pytest
import torch

from gpd_ds.gpd import check_equivalence, expand, extract
from gpd_ds.losses import GPDLoss
from gpd_ds.models import create_model
from tests.helpers import FAMILIES, NUM_CLASSES, assert_close_logits, build_kwargs, images, make_student


@pytest.mark.parametrize("name", FAMILIES)
def test_ir_is_exact_in_eval_mode(name: str) -> None:
    student = make_student(name)
    model = expand(student, noise_std=0.0).eval()
    x = images(name)
    with torch.no_grad():
        original = student(x)
        teacher, student_view = model(x, mode="teacher"), model(x, mode="student")
    assert_close_logits(teacher, original)
    assert_close_logits(student_view, original)


@pytest.mark.parametrize("name", FAMILIES)
def test_ir_is_exact_in_train_mode(name: str) -> None:
    student = make_student(name)
    model = expand(student, noise_std=0.0).train()
    x = images(name)
    with torch.no_grad():
        original = copy.deepcopy(student).train()(x)
        out = model(x, mode="both")
    assert_close_logits(out.teacher, original)
    assert_close_logits(out.student, original)


@pytest.mark.parametrize("name", FAMILIES)
def test_default_noise_keeps_predictions_and_student_slice(name: str) -> None:
    student = make_student(name)
    model = expand(student).eval()  # noise_std=1e-6
    x = images(name, batch=8)
    with torch.no_grad():
        original = student(x)
        out = model(x, mode="both")
    assert torch.equal(out.teacher.argmax(1), original.argmax(1))
    assert_close_logits(out.teacher, original, rtol=1e-3)
    # noise goes to the replicas only: the student view is the source student bit for bit
    assert_close_logits(out.student, original, rtol=1e-6)
    assert not torch.equal(out.teacher, out.student)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "convnext_atto", "rvt_tiny", "efficientnet_b0",
                                  "cait_xxs24_224", "levit_128s", "pvt_v2_b0", "test_coatnet"])
def test_ir_is_exact_with_nonzero_biases(name: str) -> None:
    """Timm initialises many biases to zero (a ViT's MLP): a teacher that dropped one would still pass at init. A
    trained or pretrained student has none at zero."""
    student = make_student(name)
    with torch.no_grad():
        for param_name, p in student.named_parameters():
            if param_name.endswith("bias"):
                p.normal_(0, 0.1)
    x = images(name)
    model = expand(student, noise_std=0.0, input_size=tuple(x.shape[1:])).eval()
    with torch.no_grad():
        original = student(x)
        assert_close_logits(model(x, mode="teacher"), original)
        assert_close_logits(model(x, mode="student"), original)


def test_vit_with_layer_scale_expands_and_extracts() -> None:
    """DeiT-III / CaiT-style ViTs carry timm's LayerScale: its ``gamma`` is widened once by the converter, never a
    second time by the by-name rule for raw parameters (it was: a shape error at expand)."""
    torch.manual_seed(0)
    student = create_model("vit_tiny_patch16_224", num_classes=NUM_CLASSES, image_size=32, init_values=0.5).eval()
    with torch.no_grad():
        for m in student.modules():
            if hasattr(m, "gamma"):
                m.gamma.uniform_(0.2, 1.0)  # distinct per channel: a mis-tiled gamma would show
    model = expand(student, noise_std=0.0).eval()
    x = images("vit_tiny_patch16_224")
    with torch.no_grad():
        original = student(x)
        assert_close_logits(model(x, mode="teacher"), original)
    assert check_equivalence(model, extract(model), x) <= 1e-5


def _train_steps(model: torch.nn.Module, name: str, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    loss_fn = GPDLoss(kd="none")
    model.train()
    for step in range(steps):
        x = images(name, batch=4, seed=10 + step)
        y = torch.randint(0, NUM_CLASSES, (4,), generator=torch.Generator().manual_seed(step))
        out = model(x, mode="both")
        opt.zero_grad()
        loss_fn(out.student, out.teacher, y).total.backward()
        opt.step()


# Multi-branch kernels of the wide ResNet34/50 cost tens of GFLOP per forward on a CPU.
_SLOW_BRANCHES = {"resnet34", "resnet50", "torchvision:resnet50"}
_EXTRACT_CASES = [pytest.param(name, branches, id=f"{name}-{'branches' if branches else 'channels'}",
                               marks=[pytest.mark.slow] if branches and name in _SLOW_BRANCHES else [])
                  for name in FAMILIES for branches in (False, True)]


@pytest.mark.parametrize(("name", "branches"), _EXTRACT_CASES)
def test_extract_is_exact_and_loads_strictly(name: str, branches: bool) -> None:
    model = expand(make_student(name), branches=branches)
    x = images(name)
    assert check_equivalence(model, extract(model), x) <= 1e-5
    _train_steps(model, name)
    plain = extract(model)
    assert type(plain) is type(model.source)
    assert check_equivalence(model, plain, x) <= 1e-5
    fresh = create_model(name, num_classes=NUM_CLASSES, **build_kwargs(name))
    fresh.load_state_dict(plain.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert_close_logits(fresh(x), model.eval()(x, mode="student"), rtol=1e-5)
