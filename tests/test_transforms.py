"""Generic tests over every entry of the registry (float64)."""

from __future__ import annotations

import copy
import io
import itertools
import math
import pickle

import pyro.distributions as dist
import pytest
import torch
from devices import GPU, needs_gpu
from pyro.distributions.conditional import ConditionalTransformedDistribution
from registry import CASES, DIM, Case, clear, transform_for

from pyroflows.transforms import Autoregressive

over_cases = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
# points where the data lives, and points far out (where a network's output saturates)
over_spreads = pytest.mark.parametrize("spread", [1.5, 30.0], ids=["near", "far-out"])
f64 = torch.float64


@over_cases
@over_spreads
def test_log_det_matches_autograd_jacobian(case: Case, spread: float):
    flow = case.build()
    for seed in range(3):
        torch.manual_seed(100 + seed)
        x = torch.randn(DIM, dtype=f64) * spread
        context = case.context()

        def f(v, context=context):
            t = transform_for(flow, context)
            clear(t)
            return t(v)

        expected = torch.linalg.slogdet(torch.autograd.functional.jacobian(f, x)).logabsdet
        t = transform_for(flow, context)
        got = t.log_abs_det_jacobian(x, t(x))
        assert got.shape == ()
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@over_cases
@over_spreads
def test_inverse_round_trip_and_log_det(case: Case, spread: float):
    flow = case.build()
    x = torch.randn(7, DIM, dtype=f64) * spread
    t = transform_for(flow, case.context(7))
    y = t(x)
    ladj = t.log_abs_det_jacobian(x, y)
    clear(t)
    y = y.detach().clone()
    x_back = t.inv(y)
    inverse_ladj = t.inv.log_abs_det_jacobian(y, x_back)
    torch.testing.assert_close(x_back, x, atol=case.tol, rtol=case.tol)
    torch.testing.assert_close(inverse_ladj, -ladj, atol=case.tol, rtol=case.tol)


@over_cases
@pytest.mark.parametrize(
    "sample, batch", [((), ()), ((5,), ()), ((), (4,)), ((2,), (3, 4))], ids=str
)
def test_batch_shapes(case: Case, sample: tuple, batch: tuple):
    flow = case.build()
    x = torch.randn(*sample, *batch, DIM, dtype=f64)
    t = transform_for(flow, case.context(*batch))
    y = t(x)
    assert y.shape == x.shape
    assert t.log_abs_det_jacobian(x, y).shape == x.shape[:-1]
    clear(t)
    x_back = t.inv(y.detach().clone())
    assert x_back.shape == x.shape
    torch.testing.assert_close(x_back, x, atol=case.tol, rtol=case.tol)


@pytest.mark.parametrize("case", [c for c in CASES if c.context_dim], ids=lambda c: c.id)
def test_amortized_depends_on_context(case: Case):
    flow = case.build()
    x = torch.randn(DIM, dtype=f64)
    y1 = flow.condition(case.context())(x)
    y2 = flow.condition(case.context())(x)
    assert (y1 - y2).abs().max() > 1e-6


@over_cases
def test_every_parameter_gets_a_gradient(case: Case):
    flow = case.build()
    t = transform_for(flow, case.context(6))
    x = torch.randn(6, DIM, dtype=f64)
    y = t(x)
    (y.pow(2).sum() + t.log_abs_det_jacobian(x, y).sum()).backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


@over_cases
def test_the_same_loss_again_after_a_backward_pass(case: Case):
    """The cache does not hand back a result whose graph a backward pass freed: a loss
    computed twice on the same tensor, parameters unchanged, a backward pass between, gives
    the same gradients, through the forward map and through the inverse (``log_prob``)."""
    flow = case.build()
    t = transform_for(flow, case.context(4))
    x = torch.randn(4, DIM, dtype=f64)
    params = list(flow.parameters())
    losses = {
        "forward": lambda: t(x).pow(2).sum() + t.log_abs_det_jacobian(x, t(x)).sum(),
        "inverse": lambda: t.inv(x).pow(2).sum() + t.inv.log_abs_det_jacobian(x, t.inv(x)).sum(),
    }
    for direction, loss in losses.items():
        first, again = (torch.autograd.grad(loss(), params) for _ in range(2))
        for a, b in zip(first, again, strict=True):
            torch.testing.assert_close(a, b, msg=direction)
    y = t(x)  # within one graph the cache still serves: no second computation
    assert t.inv(y) is x


@over_cases
def test_inverse_gradients_match_finite_differences(case: Case):
    """Gradients of the inverse and its log-det, numerical inverses included."""
    flow = case.build()
    context = case.context(3)
    y = torch.randn(3, DIM, dtype=f64, requires_grad=True)

    def inverse(y):
        t = transform_for(flow, context)
        clear(t)
        x = t.inv(y)
        return x, t.inv.log_abs_det_jacobian(y, x)

    assert torch.autograd.gradcheck(inverse, (y,), fast_mode=True)  # a random projection of J

    # directional derivative along a random direction in parameter space
    params = list(flow.parameters())
    direction = [torch.randn_like(p) for p in params]

    def loss() -> torch.Tensor:
        x, ladj = inverse(y.detach())
        return x.pow(2).sum() + ladj.sum()

    grads = torch.autograd.grad(loss(), params)
    analytic = sum((g * d).sum() for g, d in zip(grads, direction, strict=True))
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction, strict=True):
            p.add_(eps * d)
        up = loss()
        for p, d in zip(params, direction, strict=True):
            p.sub_(2 * eps * d)
        down = loss()
    torch.testing.assert_close(analytic, (up - down) / (2 * eps), atol=1e-5, rtol=1e-5)


@over_cases
def test_state_dict_deepcopy_and_pickle(case: Case):
    flow = case.build(seed=0)
    other = case.build(seed=1)
    other.load_state_dict(flow.state_dict())
    context = case.context(5)
    x = torch.randn(5, DIM, dtype=f64)
    expected = transform_for(flow, context)(x)  # leaves graph-holding tensors in the cache
    for twin in (other, copy.deepcopy(flow), pickle.loads(pickle.dumps(flow))):
        torch.testing.assert_close(transform_for(twin, context)(x), expected)
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))


@over_cases
def test_log_prob_in_pyro_distribution(case: Case):
    """log_prob of a sample (cached) equals log_prob of the same point recomputed."""
    flow = case.build()
    context = case.context(4)
    batch = () if context is None else (4,)
    base = dist.Normal(torch.zeros(*batch, DIM, dtype=f64), 1.0).to_event(1)
    if context is None:
        d = dist.TransformedDistribution(base, [flow])
    else:
        d = ConditionalTransformedDistribution(base, [flow]).condition(context)
    z = d.rsample((3,))
    cached = d.log_prob(z)
    assert cached.shape == (3, *batch)
    clear(flow)
    point = z.detach().clone()
    recomputed = d.log_prob(point)
    torch.testing.assert_close(cached, recomputed, atol=case.tol, rtol=case.tol)
    # and by hand, for a point the flow did not produce
    t = transform_for(flow, context)
    other = torch.randn_like(point)
    x = t.inv(other)
    manual = base.log_prob(x) + t.inv.log_abs_det_jacobian(other, x)
    torch.testing.assert_close(d.log_prob(other), manual)


@over_cases
@pytest.mark.gpu
@needs_gpu
def test_on_cuda(case: Case):
    flow = case.build().to(GPU)
    context = case.context(5)
    t = transform_for(flow, None if context is None else context.to(GPU))
    x = torch.randn(5, DIM, dtype=f64, device=GPU)
    y = t(x)
    ladj = t.log_abs_det_jacobian(x, y)
    assert y.device.type == ladj.device.type == GPU
    clear(t)
    torch.testing.assert_close(t.inv(y.clone()), x, atol=case.tol, rtol=case.tol)


@over_cases
def test_context_with_more_batch_dimensions_than_the_input(case: Case):
    if not case.context_dim:
        pytest.skip("unconditional")
    flow = case.build()
    x = torch.randn(4, DIM, dtype=f64)
    context = case.context(2, 4)
    t = transform_for(flow, context)
    y = t(x)
    ladj = t.log_abs_det_jacobian(x, y)
    assert y.shape == (2, 4, DIM) and ladj.shape == (2, 4)
    for i in range(2):  # each context row acts as if given alone
        ti = transform_for(flow, context[i])
        yi = ti(x)
        ladj_i = ti.log_abs_det_jacobian(x, yi)
        torch.testing.assert_close(y[i], yi, atol=case.tol, rtol=case.tol)
        torch.testing.assert_close(ladj[i], ladj_i, atol=case.tol, rtol=case.tol)
    clear(t)
    torch.testing.assert_close(
        t.inv(y.detach().clone()), x.expand(2, 4, DIM), atol=case.tol, rtol=case.tol
    )


@over_cases
def test_non_finite_rows_give_nan_for_that_row_alone(case: Case):
    flow = case.build()
    t = transform_for(flow, case.context(5))
    x = torch.randn(5, DIM, dtype=f64)
    y = t(x).detach().clone()
    clear(t)
    y[0, 0], y[1, -1] = torch.nan, torch.inf
    x_back = t.inv(y)
    ladj = t.log_abs_det_jacobian(x_back, y)
    assert not torch.isfinite(x_back[:2]).all(-1).any()  # no row is silently made finite
    torch.testing.assert_close(x_back[2:], x[2:], atol=case.tol, rtol=case.tol)
    assert torch.isfinite(ladj[2:]).all()


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if getattr(c.make(context_dim=c.context_dim), "_pulls_back_scores", 0)],
    ids=lambda c: c.id,
)
@pytest.mark.parametrize("saturated", [False, True], ids=["", "saturated"])
@pytest.mark.parametrize("sweep", [False, True], ids=["", "sweep"])
def test_score_pullback_matches_autograd(case: Case, saturated: bool, sweep: bool, monkeypatch):
    """``J⁻ᵀ (score - ∇ log|det J|)`` against the autograd Jacobian and gradient, at points
    near the data and far out; ``saturated`` scales an autoregressive network's last layer
    so that its clamps (and a spline's bounds) are active at some coordinates; ``sweep``
    solves an autoregressive layer's transposed system by back-substitution over its
    network's units however few the draws, rather than with its matrix."""
    from pyroflows import _made_jacobian

    monkeypatch.setattr(_made_jacobian, "SWEEP_WORK", 0 if sweep else math.inf)
    flow = case.build()
    if (saturated or sweep) and not isinstance(flow, Autoregressive):
        pytest.skip("not an autoregressive layer")
    if saturated:
        with torch.no_grad():
            flow.net.params.free()[f"weight{flow.net.depth - 1}"].mul_(20)
    torch.manual_seed(5)
    radii = torch.tensor([[1.0], [1.5], [4.0], [8.0], [40.0]], dtype=f64)
    x = torch.randn(len(radii), DIM, dtype=f64) * radii
    context = case.context(len(radii))
    score = torch.randn(len(radii), DIM, dtype=f64)
    params = flow._resolve_params(context)
    got = flow._score_pullback(x, params, score)
    if saturated and flow.transformer == "affine":
        s = params(x)[1] + (2.0 if flow.stable else 0.0)  # the network bound to the context
        assert (s.abs() > 5).any() and (s.abs() < 5).any()
    for b in range(len(radii)):
        t = transform_for(flow, None if context is None else context[b])

        def forward(v, t=t):
            clear(t)
            return t(v)

        def ladj(v, t=t):
            clear(t)
            return t.log_abs_det_jacobian(v, t(v))

        jac = torch.autograd.functional.jacobian(forward, x[b])
        grad = torch.autograd.functional.jacobian(ladj, x[b])
        expected = torch.linalg.solve(jac.mT, score[b] - grad)
        torch.testing.assert_close(got[b], expected, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize(
    "dim, hidden, context_dim",
    [(5, (7,), 3), (5, (6, 5, 4), 3), (29, (40, 35), 3), (29, (12,), 0)],  # 29: in row blocks
)
@pytest.mark.parametrize("outputs", [2, 7])  # a few outputs: multiply-adds; many: einsum
@pytest.mark.parametrize("many_draws", [False, True])
def test_made_jacobian_products_match_autograd(
    dim: int, hidden: tuple, context_dim: int, outputs: int, many_draws: bool, monkeypatch
):
    """The MADE's graph-free Jacobian products, with or without a context and a random
    order, against autograd's Jacobian; in that order the rows' product is lower triangular
    (taken dense, or, as for many draws, in blocks of rows for the larger network, some
    blocks reaching no unit at all); the transposed solve with a diagonal added, by the
    triangular solve or, as for many draws, by the sweep over the units, on draws with two
    batch dimensions."""
    from pyroflows import _made_jacobian, nn

    monkeypatch.setattr(_made_jacobian, "BLOCKED_WORK", 0 if many_draws else math.inf)
    monkeypatch.setattr(_made_jacobian, "SWEEP_WORK", 0 if many_draws else math.inf)
    f64 = torch.float64
    torch.manual_seed(0)
    order = torch.randperm(dim)
    net = nn.MADE(dim, hidden, context_dim=context_dim, permutation=order, outputs=outputs)
    net = net.double()
    assert (len(net._structure.blocks) > 1) == (dim > 16)
    x, context = torch.randn(2, 3, dim, dtype=f64), torch.randn(3, context_dim, dtype=f64)
    context = context if context_dim else None
    rows, vector = torch.randn(2, 2, 3, outputs, dim, dtype=f64).unbind(1)
    diagonal, rhs = torch.rand(2, 3, dim, dtype=f64) + 0.5, torch.randn(2, 3, dim, dtype=f64)
    _, jacobian = net.bind(context, stacked=True)(x, jacobian=True)
    got_rows, ordered = jacobian.matrix(rows), jacobian.matrix(rows, ordered=True)
    got_vector = jacobian.vector_product(vector)
    solved = jacobian.solve_transposed(rows, diagonal, rhs)
    for a, b in itertools.product(range(2), range(3)):
        jac = torch.autograd.functional.jacobian(  # (dim, outputs, dim)
            lambda v, b=b: net.bind(None if context is None else context[b], stacked=True)(v),
            x[a, b],
        )
        expected = torch.einsum("ki,ikj->ij", rows[a, b], jac)
        torch.testing.assert_close(got_rows[a, b], expected)
        torch.testing.assert_close(got_vector[a, b], torch.einsum("ki,ikj->j", vector[a, b], jac))
        torch.testing.assert_close(ordered[a, b], expected[order][:, order])
        assert ordered[a, b].triu(1).abs().max() == 0
        system = (expected + torch.diag(diagonal[a, b])).mT
        torch.testing.assert_close(solved[a, b], torch.linalg.solve(system, rhs[a, b]))
