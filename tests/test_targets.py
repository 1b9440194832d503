"""Targets: batched log densities with their normalisers and exact samplers checked."""

from __future__ import annotations

import math

import pytest
import torch
from devices import GPU, needs_gpu

from pyroflows import targets
from pyroflows.targets import TARGETS, target

f64 = torch.float64
SAMPLERS = ["funnel", "banana", "ring", "grid", "gmm40", "many-well", "ill-gaussian"]
TWO_D = ["u1", "u2", "u3", "u4", "ring", "grid", "gmm40", "banana"]


@pytest.mark.parametrize("name", list(TARGETS))
def test_log_prob_is_batched_and_keeps_dtype(name):
    t = target(name).to(f64)
    x = torch.randn(3, 4, t.dim, dtype=f64)
    lp = t.log_prob(x)
    assert lp.shape == (3, 4) and lp.dtype == f64 and torch.isfinite(lp).all()
    torch.testing.assert_close(t(x[1]), lp[1])  # a target is its own log density function
    with pytest.raises(ValueError, match=rf"x must have shape \(\.\.\., {t.dim}\)"):
        t.log_prob(torch.zeros(3, t.dim + 1))


@pytest.mark.parametrize("name", TWO_D)
def test_two_d_normalisers_against_importance_sampling(name):
    """log Z (exact or by quadrature) against a broad-Gaussian importance estimate."""
    t = target(name).to(f64)
    torch.manual_seed(0)
    q = torch.distributions.Normal(torch.zeros(2, dtype=f64), 25.0 if name == "gmm40" else 10.0)
    z = q.sample((400_000,))
    log_w = t.log_prob(z) - q.log_prob(z).sum(-1)
    estimate = torch.logsumexp(log_w, 0) - math.log(len(z))
    w = (log_w - estimate).exp()
    assert abs(estimate.item() - t.log_z) < 4 * w.std().item() / math.sqrt(len(z)) + 1e-3


def test_many_well_normaliser_is_the_published_one():
    assert target("many-well").log_z == pytest.approx(164.70, abs=0.01)
    assert target("many-well", dim=4).log_z == pytest.approx(164.70 / 8, abs=0.01)


@pytest.mark.parametrize("name", SAMPLERS)
def test_exact_samples_follow_the_density(name):
    """Cross-entropy E_p[log p] from the sampler against the same integral another way
    (quadrature in 2-D, closed forms for the Gaussian-based ones); mixtures: their moments."""
    t = target(name).to(f64)
    torch.manual_seed(1)
    x = t.sample((200_000,))
    assert x.shape == (200_000, t.dim) and x.dtype == f64
    if isinstance(t, targets.GaussianMixture):  # the mixture's mean and covariance
        locs = t.locs
        cov = t.scale**2 * torch.eye(2, dtype=f64) + torch.cov(locs.T, correction=0)
        spread = cov.diagonal().sqrt()
        torch.testing.assert_close(x.mean(0), locs.mean(0), atol=5 * spread.max() / 447, rtol=0)
        torch.testing.assert_close(torch.cov(x.T), cov, rtol=0.02, atol=0.02 * spread.max())
        return
    values = t.log_prob(x)
    mean, se = values.mean().item(), values.std().item() / math.sqrt(len(x))
    if t.dim == 2:
        axis = torch.linspace(-60, 60, 3001, dtype=f64)
        grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1)
        lp = t.log_prob(grid) - t.log_z
        expected = (lp.exp() * lp).sum().item() * (axis[1] - axis[0]).item() ** 2
    elif name == "many-well":  # per pair: ∫ p₁ log p₁ by 1-D quadrature, plus the Gaussian's
        axis = torch.linspace(-4, 4, 100_001, dtype=f64)
        well = t._well(axis)
        log_p1 = well - torch.logsumexp(well, 0) - math.log(axis[1] - axis[0])
        h1 = (log_p1.exp() * log_p1).sum().item() * (axis[1] - axis[0]).item()
        expected = t.dim / 2 * (h1 - 0.5 * (1 + math.log(2 * math.pi))) + t.log_z
    else:  # a normalised density of a Gaussian pushed by a volume-preserving or known map
        expected = _expected_log_density(t)
    assert abs(mean - expected) < 5 * se + 1e-3


def _expected_log_density(t) -> float:
    gauss = -0.5 * (1 + math.log(2 * math.pi))  # E log N(x; 0, 1) per coordinate
    if isinstance(t, targets.Funnel):  # E log N(x0; 0, 9) + (d-1) E log N(xᵢ; 0, e^{x0})
        return gauss - math.log(3) + (t.dim - 1) * gauss  # E[x0] = 0
    if isinstance(t, targets.IllConditionedGaussian):
        return t.dim * gauss - t.scale_tril.diagonal().log().sum().item()
    raise AssertionError(type(t))


def test_funnel_stays_finite_far_up_its_mouth():
    """At x0 = 217 the scale e^(x0/2) overflows float32; the density does not (a flow that
    strays there mid-fit must see its true, finite log density)."""
    t = target("funnel", dim=4)
    x = torch.tensor([[217.0, 3e3, -5e3, 20.0], [-30.0, 1e-7, 0.0, -1e-6], [0.5, 1.0, -2.0, 0.3]])
    v, rest = x[:, 0].double(), x[:, 1:].double()
    normal = torch.distributions.Normal
    exact = normal(0.0, 3.0).log_prob(v) + normal(0.0, (v / 2).exp()[:, None]).log_prob(rest).sum(1)
    got = t.log_prob(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-3)


def test_ill_conditioned_gaussian_has_its_condition_number():
    t = target("ill-gaussian", dim=6, condition=1e4)
    cov = t.scale_tril @ t.scale_tril.T
    eig = torch.linalg.eigvalsh(cov.double())
    assert eig.max() / eig.min() == pytest.approx(1e4, rel=1e-3)


def test_bad_names_and_sizes_are_refused():
    with pytest.raises(ValueError, match="name must be one of"):
        target("spline-land")
    with pytest.raises(ValueError, match="fixed dimension"):
        target("u1", dim=3)
    with pytest.raises(ValueError, match="dim must be even"):
        target("many-well", dim=5)
    with pytest.raises(ValueError, match="dim must be at least 2"):
        target("funnel", dim=1)
    with pytest.raises(NotImplementedError, match="no exact sampler"):
        target("u2").sample((3,))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", list(TARGETS))
def test_targets_on_cuda(name):
    t = target(name).to(GPU)
    x = torch.randn(5, t.dim, device=GPU)
    assert t.log_prob(x).device.type == GPU
    if name in SAMPLERS:
        assert t.sample((5,)).device.type == GPU
