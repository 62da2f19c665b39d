"""Loss golden values (computed by hand with the math module) and GPDLoss assembly (I12)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gpd_ds.losses import GPDLoss, cross_entropy, dkd, kl_kd, soft_cross_entropy


def test_sce_golden_value() -> None:
    # target = 0.9 * [.5, .5] + 0.1 / 2 = [.5, .5]; CE = log(1 + e) - 0.5
    got = soft_cross_entropy(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), smoothing=0.1)
    assert got.item() == pytest.approx(math.log(1 + math.e) - 0.5, abs=1e-6)
    assert got.item() == pytest.approx(0.8132616875, abs=1e-6)


def test_kl_golden_values() -> None:
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    assert kl_kd(s, t, temperature=1.0).item() == pytest.approx(0.1201145070, abs=1e-6)
    assert kl_kd(s, t, temperature=2.0).item() == pytest.approx(0.1237192145, abs=1e-6)  # includes T^2


def test_dkd_golden_values() -> None:
    s, t, y = torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([0])
    # TCKD = KL([.2447, .7553] || [.6652, .3348]) = 0.36981; NCKD = KL(softmax[2,0] || softmax[1,0]) = 0.06713
    assert dkd(s, t, y, alpha=1.0, beta=0.5).item() == pytest.approx(0.4033759144, abs=1e-6)
    assert dkd(s, t, y, alpha=1.0, beta=2.0).item() == pytest.approx(0.5040720461, abs=1e-6)
    assert dkd(s, t, y, alpha=1.0, beta=0.5, temperature=2.0).item() == pytest.approx(0.3782516324, abs=1e-6)


def test_dkd_uses_argmax_of_a_soft_target() -> None:
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    hard = torch.tensor([4, 0, 2])
    soft = F.one_hot(hard, 5).float() * 0.7 + 0.06
    assert dkd(s, t, soft).item() == pytest.approx(dkd(s, t, hard).item(), abs=1e-7)


def test_cross_entropy_accepts_soft_targets() -> None:
    logits, y = torch.randn(4, 6), torch.tensor([0, 5, 2, 2])
    assert cross_entropy(logits, F.one_hot(y, 6).float()).item() == pytest.approx(
        F.cross_entropy(logits, y).item(), abs=1e-6)


def test_sce_with_equal_logits_is_ce_against_smoothed_self() -> None:
    z = torch.randn(4, 7)
    p = F.softmax(z, dim=1)
    expected = -(0.9 * p + 0.1 / 7) * F.log_softmax(z, dim=1)
    assert soft_cross_entropy(z, z.clone()).item() == pytest.approx(expected.sum(1).mean().item(), abs=1e-6)


def test_sce_does_not_backpropagate_into_its_target() -> None:
    s, t = torch.randn(2, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)
    soft_cross_entropy(s, t).backward()
    assert t.grad is None
    assert s.grad is not None


def test_gpd_loss_without_static_teacher() -> None:
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    out = GPDLoss()(s, t, y)
    assert set(out.terms) == {"ce_student", "ce_dynamic_teacher", "sce_dynamic_to_student"}
    expected = F.cross_entropy(t, y) + F.cross_entropy(s, y) + 3 * soft_cross_entropy(s, t)
    assert out.total.item() == pytest.approx(expected.item(), abs=1e-6)


def test_gpd_loss_with_static_teacher_adds_psi_once_per_mode() -> None:
    s, t, z, y = torch.randn(4, 10), torch.randn(4, 10), torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    out = GPDLoss(kd="dkd", dkd_beta=2.0)(s, t, y, z)
    assert set(out.terms) == {"ce_student", "ce_dynamic_teacher", "sce_dynamic_to_student",
                              "kd_static_to_student", "kd_static_to_dynamic_teacher"}
    expected = (F.cross_entropy(t, y) + F.cross_entropy(s, y) + 3 * soft_cross_entropy(s, t)
                + dkd(s, z, y, 1.0, 2.0) + dkd(t, z, y, 1.0, 2.0))
    assert out.total.item() == pytest.approx(expected.item(), abs=1e-5)
    kl = GPDLoss(kd="kl")(s, t, y, z)
    assert kl.terms["kd_static_to_student"].item() == pytest.approx(kl_kd(s, z).item(), abs=1e-6)


def test_gpd_loss_is_fp32_for_half_precision_logits() -> None:
    s, t, y = torch.randn(4, 10).bfloat16(), torch.randn(4, 10).bfloat16(), torch.tensor([1, 2, 3, 4])
    out = GPDLoss()(s, t, y, torch.randn(4, 10).bfloat16())
    assert out.total.dtype == torch.float32


@pytest.mark.parametrize(("kwargs", "match"), [({"kd": "ofa"}, "kd='ofa'"), ({"smoothing": 1.5}, "smoothing"),
                                               ({"temperature": 0}, "temperature")])
def test_gpd_loss_rejects_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GPDLoss(**kwargs)


def test_distillation_heads_take_the_static_teacher_and_the_class_heads_the_rest() -> None:
    torch.manual_seed(0)
    s_cls, s_dist, t_cls, t_dist, static = (torch.randn(6, 5, requires_grad=True) for _ in range(5))
    y = torch.randint(0, 5, (6,))
    loss = GPDLoss(kd="dkd")
    both = loss((s_cls, s_dist), (t_cls, t_dist), y, static)
    same = loss((s_cls, s_cls), (t_cls, t_cls), y, static)
    single = loss(s_cls, t_cls, y, static)
    torch.testing.assert_close(same.total, single.total)
    torch.testing.assert_close(both.terms["kd_static_to_student"], loss.static_kd(s_dist, static, y))
    torch.testing.assert_close(both.terms["ce_student"], single.terms["ce_student"])
    kd_only = both.terms["kd_static_to_student"] + both.terms["kd_static_to_dynamic_teacher"]
    grads = torch.autograd.grad(both.total, [s_dist, t_dist], retain_graph=True)
    for g, ref in zip(grads, torch.autograd.grad(kd_only, [s_dist, t_dist]), strict=True):
        torch.testing.assert_close(g, ref)
    plain = loss.plain((s_cls, s_dist), y, static)
    torch.testing.assert_close(plain.terms["kd_static_to_student"], loss.static_kd(s_dist, static, y))
