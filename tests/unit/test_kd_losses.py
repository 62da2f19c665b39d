"""DIST, logit standardisation and FitNets' hints against their published formulas, written out here in float64 from
the papers (value and gradient), and their composition with the GPD objective."""

from __future__ import annotations

import math

import pytest
import torch

from gpd_ds.config import LossConfig
from gpd_ds.kd.dist import dist
from gpd_ds.kd.fitnet import FitNetConnector, hint_loss
from gpd_ds.kd.standardize import standardize
from gpd_ds.losses import Features, GPDLoss, kl_kd
from gpd_ds.registry import FEATURE_LOSSES, KD_LOSSES


def _pearson64(a: list[float], b: list[float]) -> float:
    """Pearson's r from its definition: cov / (sd_a sd_b), in Python floats."""
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    return cov / (math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b)))


def _dist64(zs: torch.Tensor, zt: torch.Tensor, beta: float, gamma: float, tau: float) -> torch.Tensor:
    """DIST (Huang et al. 2022, eqs. 3-7) in float64, differentiable: tau^2 (beta L_inter + gamma L_intra)."""
    ys, yt = torch.softmax(zs.double() / tau, 1), torch.softmax(zt.double() / tau, 1)

    def rho(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a - a.mean(), b - b.mean()
        return (a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum())

    inter = 1 - torch.stack([rho(ys[i], yt[i]) for i in range(ys.shape[0])]).mean()
    intra = 1 - torch.stack([rho(ys[:, j], yt[:, j]) for j in range(ys.shape[1])]).mean()
    return tau**2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize(("beta", "gamma", "tau"), [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_value_and_gradient_match_the_paper_in_float64(beta: float, gamma: float, tau: float) -> None:
    gen = torch.Generator().manual_seed(0)
    zs = (torch.randn(6, 10, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    zt = torch.randn(6, 10, generator=gen, dtype=torch.float64) * 3
    ours = dist(zs, zt, beta, gamma, tau)
    reference = _dist64(zs, zt, beta, gamma, tau)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, zs)
    (g_ref,) = torch.autograd.grad(reference, zs)
    torch.testing.assert_close(g_ours.double(), g_ref, rtol=1e-4, atol=1e-6)
    # and the float64 reference against r = cov / (sd sd) in plain Python floats, row by row and column by column
    ys, yt = torch.softmax(zs.detach() / tau, 1).tolist(), torch.softmax(zt / tau, 1).tolist()
    inter = 1 - sum(_pearson64(a, b) for a, b in zip(ys, yt, strict=True)) / len(ys)
    cols = list(zip(*ys, strict=True)), list(zip(*yt, strict=True))
    intra = 1 - sum(_pearson64(list(a), list(b)) for a, b in zip(*cols, strict=True)) / len(cols[0])
    assert reference.item() == pytest.approx(tau**2 * (beta * inter + gamma * intra), rel=1e-12)


def test_dist_is_zero_for_a_perfect_match_and_ignores_a_scaled_teacher_s_shift() -> None:
    z = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    assert dist(z, z).item() == pytest.approx(0.0, abs=1e-6)
    # Pearson ignores an affine change of the probabilities; a positive affine map of each row of probabilities
    # that keeps them a distribution: mix with the uniform distribution
    p = torch.softmax(z, 1)
    mixed = torch.log(0.5 * p + 0.5 / 5)  # logits whose softmax is the mixture
    assert dist(z, mixed, beta=1.0, gamma=0.0).item() == pytest.approx(0.0, abs=1e-6)  # inter: per row, affine
    assert kl_kd(z, mixed).item() > 1e-3  # KL does not ignore it


def test_logit_standardization_matches_its_formula_and_drops_scale_and_shift() -> None:
    z = torch.randn(4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mean = z.mean(1, keepdim=True)
    sd = torch.sqrt(((z - mean) ** 2).sum(1, keepdim=True) / (z.shape[1] - 1))  # Bessel, as the authors' code
    torch.testing.assert_close(standardize(z).double(), (z - mean) / sd, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(standardize(3 * z + 5), standardize(z), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kd", ["kl", "dkd", "dist"])
def test_logit_standardization_composes_with_any_logit_loss(kd: str) -> None:
    gen = torch.Generator().manual_seed(3)
    zs, zt, y = torch.randn(5, 6, generator=gen).requires_grad_(), torch.randn(5, 6, generator=gen), torch.arange(5)
    plain = GPDLoss(kd=kd, temperature=2.0)
    std = GPDLoss(kd=kd, temperature=2.0, logit_standardize=True)
    expected = KD_LOSSES.get(kd)(standardize(zs), standardize(zt), y, plain)
    torch.testing.assert_close(std.static_kd(zs, zt, y), expected)
    # the student's logit range no longer matters, the teacher's neither
    torch.testing.assert_close(std.static_kd(4 * zs + 1, 0.5 * zt - 2, y), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("standardized", [False, True])
def test_dist_in_gpd_one_backward_equals_the_terms_backwards(standardized: bool) -> None:
    """As the static-teacher term of GPD for the student and for the dynamic teacher."""
    loss = GPDLoss.from_config(LossConfig(kd="dist", logit_standardize=standardized, kd_weight=2.0))
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(6, 10, generator=gen, requires_grad=True)
    t = torch.randn(6, 10, generator=gen, requires_grad=True)
    static, y = torch.randn(6, 10, generator=gen), torch.randint(0, 10, (6,), generator=gen)
    out = loss(s, t, y, static)
    assert {"kd_static_to_student", "kd_static_to_dynamic_teacher"} <= set(out.terms)
    g_total = torch.autograd.grad(out.total, (s, t))
    weights = {"ce_student": 1.0, "ce_dynamic_teacher": 1.0, "sce_dynamic_to_student": 3.0,
               "kd_static_to_student": 2.0, "kd_static_to_dynamic_teacher": 2.0}
    parts = [torch.autograd.grad(w * loss(s, t, y, static).terms[name], (s, t), allow_unused=True)
             for name, w in weights.items()]
    for i, g in enumerate(g_total):
        summed = sum(p[i] for p in parts if p[i] is not None)
        torch.testing.assert_close(g, summed, rtol=1e-5, atol=1e-7)
    plain = loss.plain(s, y, static)  # a model.method=plain baseline takes it too
    assert "kd_static_to_student" in plain.terms


def _hint64(connector: FitNetConnector, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """FitNets (Romero et al. 2015, eq. 3) per level, ``1/2 ||u_h - r(v_g)||^2`` with r = BN(conv1x1) in train mode,
    written out in float64 (the batch statistics by hand) and brought to gpd_ds's normalisation: divided by half the
    element count (a per-level mean), averaged over levels."""
    levels = []
    for (conv, bn), f, t in zip(connector.regressors, student, teacher, strict=True):
        w = conv.weight.double()[:, :, 0, 0]
        r = torch.einsum("oc,bchw->bohw", w, f.double())
        mu = r.mean(dim=(0, 2, 3), keepdim=True)
        var = ((r - mu) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        r = (r - mu) / torch.sqrt(var + bn.eps) * bn.weight.double()[None, :, None, None] \
            + bn.bias.double()[None, :, None, None]
        half_sq = 0.5 * ((t.double() - r) ** 2).sum()
        levels.append(half_sq / (0.5 * t.numel()))
    return torch.stack(levels).mean()


def test_fitnet_hint_value_and_gradient_match_the_paper_in_float64() -> None:
    gen = torch.Generator().manual_seed(5)
    connector = FitNetConnector([3, 4], [5, 6]).train()
    for p in connector.parameters():  # BN's affine parameters away from (1, 0), so they count
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen))
    student = [torch.randn(4, 3, 5, 5, generator=gen, requires_grad=True),
               torch.randn(4, 4, 2, 2, generator=gen, requires_grad=True)]
    teacher = [torch.randn(4, 5, 5, 5, generator=gen), torch.randn(4, 6, 2, 2, generator=gen)]
    ours = hint_loss(connector(student), teacher)
    reference = _hint64(connector, student, teacher)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-6)
    params = [*student, *connector.parameters()]
    for g_ours, g_ref in zip(torch.autograd.grad(ours, params), torch.autograd.grad(reference, params),
                             strict=True):
        torch.testing.assert_close(g_ours.double(), g_ref.double(), rtol=1e-4, atol=1e-6)
    assert hint_loss(teacher, teacher).item() == 0.0  # a perfect hint costs nothing
    with pytest.raises(ValueError, match="hint_loss got 1 student and 2 teacher levels"):
        hint_loss(student[:1], teacher)


def test_fitnet_is_a_registered_feature_loss_weighted_by_its_own_key() -> None:
    assert FEATURE_LOSSES.names() == ("reviewkd", "fitnet")
    loss = GPDLoss.from_config(LossConfig(kd="dist+fitnet", fitnet_weight=7.0, reviewkd_weight=3.0))
    assert (loss.kd, loss.features, loss.feature_weight) == ("dist", "fitnet", 7.0)
    assert GPDLoss.from_config(LossConfig(kd="reviewkd", reviewkd_weight=3.0)).feature_weight == 3.0


@pytest.mark.parametrize("method", ["plain", "gpd"])
def test_fitnet_in_gpd_and_plain_one_backward_equals_the_terms_backwards(method: str) -> None:
    """As the feature term of GPD for the student and for the dynamic teacher, and of a plain baseline."""
    gen = torch.Generator().manual_seed(6)
    loss = GPDLoss.from_config(LossConfig(kd="kl+fitnet", fitnet_weight=5.0))
    s, t = torch.randn(4, 10, generator=gen, requires_grad=True), torch.randn(4, 10, generator=gen, requires_grad=True)
    fs = [torch.randn(4, 8, 4, 4, generator=gen, requires_grad=True)]
    ft = [torch.randn(4, 8, 4, 4, generator=gen, requires_grad=True)]
    static, static_f = torch.randn(4, 10, generator=gen), [torch.randn(4, 8, 2, 2, generator=gen)]  # coarser grid
    y = torch.randint(0, 10, (4,), generator=gen)
    inputs = (s, t, *fs, *ft)

    def run():
        if method == "plain":
            return loss.plain(s, y, static, features=Features(fs, None, static_f))
        return loss(s, t, y, static, features=Features(fs, ft, static_f))

    out = run()
    weights = {"fitnet_static_to_student": 5.0, "kd_static_to_student": 1.0, "ce_student": 1.0}
    if method == "gpd":
        weights |= {"fitnet_static_to_dynamic_teacher": 5.0, "kd_static_to_dynamic_teacher": 1.0,
                    "ce_dynamic_teacher": 1.0, "sce_dynamic_to_student": 3.0}
    assert set(out.terms) == set(weights)
    # the student's 4 x 4 map is compared on the static teacher's 2 x 2 grid (average-pooled)
    want = torch.nn.functional.mse_loss(torch.nn.functional.avg_pool2d(fs[0], 2), static_f[0])
    torch.testing.assert_close(out.terms["fitnet_static_to_student"], want)
    g_total = torch.autograd.grad(out.total, inputs, allow_unused=True)
    parts = [torch.autograd.grad(w * run().terms[name], inputs, allow_unused=True) for name, w in weights.items()]
    for i, g in enumerate(g_total):
        summed = [p[i] for p in parts if p[i] is not None]
        if g is None:
            assert not summed
            continue
        torch.testing.assert_close(g, sum(summed), rtol=1e-5, atol=1e-7)
