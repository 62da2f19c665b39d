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


def _dkd_float64(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, beta: float, temperature: float) -> torch.Tensor:
    """DKD as its authors write it (the non-target mass as a sum of probabilities), in float64."""
    s, t = s / temperature, t / temperature
    gt = F.one_hot(y, s.shape[1]).bool()
    p_s, p_t = F.softmax(s, dim=1), F.softmax(t, dim=1)
    b_s = torch.stack([p_s[gt], p_s.masked_fill(gt, 0).sum(1)], dim=1)
    b_t = torch.stack([p_t[gt], p_t.masked_fill(gt, 0).sum(1)], dim=1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum()
    q_s, q_t = F.log_softmax(s - 1000.0 * gt, dim=1), F.log_softmax(t - 1000.0 * gt, dim=1)
    nckd = (q_t.exp() * (q_t - q_s)).sum()
    return (tckd + beta * nckd) * temperature**2 / s.shape[0]


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("scale", [3.0, 200.0])
@pytest.mark.parametrize("margin", [0.0, 18.0, 25.0, 40.0, 100.0])
def test_dkd_stays_exact_for_confident_students(margin: float, scale: float, temperature: float) -> None:
    """K = 1000: a student whose target logit leads by ``margin`` (up to 100), logits up to +-``scale`` (up to
    +-200), a less confident teacher (target +3). fp32 DKD against a float64 reference on the same fp32 inputs:
    finite, value and gradient within 1e-5 relative. (The 1 - p_target form was off by 16-76% from a margin of ~25,
    with a zero target-logit gradient.)"""
    g = torch.Generator().manual_seed(int(margin * 10 + scale))
    y = torch.tensor([0, 7, 999, 500])
    s = (torch.rand(4, 1000, generator=g) * 2 - 1) * (scale - margin if scale > margin else scale)
    s[torch.arange(4), y] = s.max(dim=1).values + margin
    s = s.clamp(-max(scale, margin), max(scale, margin))
    t = torch.randn(4, 1000, generator=g) * 3
    t[torch.arange(4), y] += 3.0
    s32 = s.clone().requires_grad_(True)
    s64 = s.double().requires_grad_(True)
    got = dkd(s32, t, y, alpha=1.0, beta=0.5, temperature=temperature)
    want = _dkd_float64(s64, t.double(), y, beta=0.5, temperature=temperature)
    got.backward()
    want.backward()
    assert torch.isfinite(got)
    assert torch.isfinite(s32.grad).all()
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-9)
    err = (s32.grad.double() - s64.grad).norm() / s64.grad.norm()
    assert err < 1e-5, f"relative gradient error {err:.2e}"
    target_grad, want_target = s32.grad[torch.arange(4), y], s64.grad[torch.arange(4), y]
    # elementwise at the gradient's scale: a logit of 200 carries fp32 rounding of 200 * 6e-8 = 1.2e-5 itself
    torch.testing.assert_close(target_grad.double(), want_target, rtol=1e-5, atol=1e-5 * s64.grad.abs().max().item())


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
