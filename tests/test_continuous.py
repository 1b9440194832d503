"""What is particular to the continuous-time flow (the registry covers the generic contract)."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch
from devices import GPU, needs_gpu

import pyroflows as pf
from pyroflows.transforms import Continuous
from pyroflows.transforms.dynamics import AugmentedDynamics, Dynamics

f64 = torch.float64


def make(seed: int = 0, **options) -> Continuous:
    torch.manual_seed(seed)
    options.setdefault("rtol", 1e-8)
    options.setdefault("atol", 1e-8)
    options.setdefault("hidden_dims", (16,))
    flow = Continuous(3, **options).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_average_matches_exact_trace(probe):
    flow = make(probe=probe)
    x = torch.randn(3, dtype=f64)
    exact = flow.call_and_ladj(x)[1]
    flow.trace = "hutchinson"
    estimates = flow.call_and_ladj(x.expand(4000, 3))[1]  # one probe per row
    se = estimates.std() / 4000**0.5
    assert estimates.std() > 0  # really stochastic
    assert abs(estimates.mean() - exact) < 4 * se


def test_exact_trace_can_be_chosen_for_evaluation():
    flow = make(trace="hutchinson")
    x = torch.randn(5, 3, dtype=f64)
    noisy = [flow.call_and_ladj(x.clone())[1] for _ in range(2)]
    assert not torch.allclose(*noisy)
    flow.trace = "exact"
    exact = [flow.call_and_ladj(x.clone())[1] for _ in range(2)]
    torch.testing.assert_close(*exact)


def test_changing_a_setting_invalidates_the_cached_solve():
    flow = make(trace="hutchinson")
    x = torch.randn(5, 3, dtype=f64)
    noisy = flow.call_and_ladj(x)[1]
    flow.trace = "exact"  # the same tensor again: recomputed, not the cached estimate
    exact = flow.call_and_ladj(x)[1]
    assert not torch.allclose(noisy, exact)
    conditioned = make(context_dim=2).condition(torch.randn(2, dtype=f64))
    before = conditioned.call_and_ladj(x)[1]
    conditioned._flow.method, conditioned._flow.num_steps = "euler", 2
    assert not torch.allclose(conditioned.call_and_ladj(x)[1], before)


def test_trace_scale_changes_tolerance_not_the_map():
    """Fixed steps: the scaled log-det is the same number; adaptive: within the tolerance."""
    x = torch.randn(6, 3, dtype=f64)
    results = {}
    for method in ("rk4", "dopri5"):
        for scale in (1.0, 1e-2):
            flow = make(method=method, trace_scale=scale, rtol=1e-6, atol=1e-6, regularize=True)
            results[method, scale] = (*flow.call_and_ladj(x), *flow.regularization.values())
    for a, b in zip(results["rk4", 1.0], results["rk4", 1e-2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(results["dopri5", 1.0], results["dopri5", 1e-2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_max_norm_is_stricter_than_rms():
    """One badly resolved sample in a batch of easy ones: the max norm takes more steps and
    gets closer to the tight solution."""
    x = torch.cat([torch.zeros(63, 3, dtype=f64), torch.full((1, 3), 4.0, dtype=f64)])
    reference = make().call_and_ladj(x)[1]
    steps, errors = {}, {}
    for norm in ("rms", "max"):
        flow = make(norm=norm, rtol=1e-4, atol=1e-4)
        ladj = flow.call_and_ladj(x)[1]
        steps[norm], errors[norm] = flow.nfe_forward, (ladj - reference).abs().max()
    assert steps["max"] > steps["rms"]
    assert errors["max"] < errors["rms"]


def _gradients(mode: str, trace: str, reverse: bool = False, **options) -> list[torch.Tensor]:
    """Gradients of a loss on y, log|det| and both RNODE regularisers with respect to the
    input, the context and every parameter, back-propagated in the given mode."""
    flow = make(
        adjoint=mode == "adjoint",
        checkpoint=mode == "checkpoint",
        learn_time=True,
        context_dim=2,
        trace=trace,
        regularize=True,
        **options,
    )
    torch.manual_seed(1)  # the same data, context and Hutchinson probe for every mode
    x = torch.randn(4, 3, dtype=f64, requires_grad=True)
    context = torch.randn(4, 2, dtype=f64, requires_grad=True)
    t = flow.condition(context)
    y, ladj = t.inverse_and_ladj(x) if reverse else t.call_and_ladj(x)
    terms = flow.regularization["kinetic"] + flow.regularization["jacobian"]
    (y.square().sum() + ladj.sum() + terms.sum()).backward()
    assert (flow.nfe_backward > 0) == (mode != "direct")
    return [x.grad, context.grad] + [p.grad for p in flow.parameters()]


@pytest.mark.parametrize("mode", ["adjoint", "checkpoint"])
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
@pytest.mark.parametrize("rank", [0, 2])
def test_memory_saving_gradients_match_direct_backpropagation(mode, trace, rank):
    """Adaptive steps: equal to solver tolerance (direct back-propagation also differentiates
    the step-size choices, which the adjoint and the checkpointed steps hold fixed)."""
    direct, other = _gradients("direct", trace, rank=rank), _gradients(mode, trace, rank=rank)
    for a, b in zip(direct, other, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
@pytest.mark.parametrize("rank, hidden", [(0, (16,)), (2, (6, 5))])
def test_checkpointed_gradients_equal_direct_ones_for_fixed_steps(trace, reverse, rank, hidden):
    """With fixed steps the replayed steps are the direct computation: equal to rounding (the
    context's term and the trace's weights computed once per solve, their gradients handed on
    from the steps' stand-ins)."""
    options = {"method": "rk4", "num_steps": 7, "rank": rank, "hidden_dims": hidden}
    direct = _gradients("direct", trace, reverse, **options)
    replayed = _gradients("checkpoint", trace, reverse, **options)
    for a, b in zip(direct, replayed, strict=True):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


def test_rsample_then_log_prob_solves_once():
    flow = make(rtol=1e-5, atol=1e-6)
    d = dist.TransformedDistribution(
        dist.Normal(torch.zeros(3, dtype=f64), 1.0).to_event(1), [flow]
    )
    z = d.rsample((6,))
    solve = flow._solve
    assert flow.nfe_forward > 0
    d.log_prob(z)
    assert flow._solve is solve  # no second solve
    d.log_prob(z.detach().clone())
    assert flow._solve is not solve  # an arbitrary point is solved backward


def test_regularizers_known_answer_for_constant_velocity():
    torch.manual_seed(0)
    flow = Continuous(2, hidden_dims=(4,), regularize=True, time=2.0).double()
    last = flow.dynamics.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.3, -0.4]))
    x = torch.randn(5, 2, dtype=f64)
    y, ladj = flow.call_and_ladj(x)
    # dz/ds = T b on s in [0, 1]: y = x + T b, zero divergence, kinetic energy |T b|^2
    torch.testing.assert_close(y, x + 2.0 * last.bias)
    torch.testing.assert_close(ladj, torch.zeros(5, dtype=f64))
    torch.testing.assert_close(
        flow.regularization["kinetic"], torch.full((5,), 4 * 0.25, dtype=f64)
    )
    torch.testing.assert_close(flow.regularization["jacobian"], torch.zeros(5, dtype=f64))


@pytest.mark.parametrize("norm", ["rms", "max"])
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_regularizers_ride_along_on_the_flows_steps(norm, trace):
    """Switching the regularisers on changes neither an adaptive solve's steps nor its result,
    in either direction (error control sees the state and its log-determinant alone: the
    integrals do not feed back into the flow), and their integrals still agree with a tight
    solve's to a penalty's needs."""
    flow = make(trace=trace, norm=norm, rtol=1e-5, atol=1e-5)
    x = torch.randn(6, 3, dtype=f64)
    results = {}
    for regularize in (False, True):
        flow.regularize = regularize
        torch.manual_seed(1)  # the same Hutchinson probe
        y, ladj = flow.call_and_ladj(x)
        steps = flow.nfe_forward
        torch.manual_seed(1)
        results[regularize] = (y, ladj, *flow.inverse_and_ladj(y), steps, flow.nfe_forward)
    for off, on in zip(results[False], results[True], strict=True):
        assert torch.equal(torch.as_tensor(off), torch.as_tensor(on))
    loose = dict(flow.regularization)
    flow.rtol = flow.atol = 1e-10
    torch.manual_seed(1)
    flow.inverse_and_ladj(results[True][0])
    for name, value in flow.regularization.items():  # 2e-4 to 7e-4 here at rtol 1e-5
        torch.testing.assert_close(loose[name], value, rtol=2e-3, atol=1e-8)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_regularizers_are_positive_and_trainable(trace):
    flow = make(regularize=True, trace=trace)
    flow.call_and_ladj(torch.randn(8, 3, dtype=f64))
    reg = flow.regularization
    assert (reg["kinetic"] > 0).all() and (reg["jacobian"] > 0).all()
    (reg["kinetic"].sum() + reg["jacobian"].sum()).backward()
    assert all(
        p.grad is not None and p.grad.abs().max() > 0 for p in flow.dynamics.net.parameters()
    )
    flow.inverse_and_ladj(torch.randn(8, 3, dtype=f64))
    assert (flow.regularization["kinetic"] > 0).all()


@pytest.mark.parametrize("method", ["rk4", "euler", "midpoint", "bosh3"])
def test_other_solvers_invert(method):
    flow = make(method=method, num_steps=50, rtol=1e-7, atol=1e-7)
    x = torch.randn(4, 3, dtype=f64)
    y = flow(x)
    flow.clear_cache()
    atol = {"euler": 1e-1, "midpoint": 1e-3, "bosh3": 1e-4}.get(method, 1e-5)
    torch.testing.assert_close(flow.inv(y.detach().clone()), x, atol=atol, rtol=0)


def test_step_budget_raises_instead_of_hanging():
    flow = make(rtol=1e-12, atol=1e-12, max_num_steps=3)
    with pytest.raises(
        RuntimeError, match=r"ODE solve failed: max_num_steps exceeded.*max_num_steps=3"
    ):
        flow(torch.randn(2, 3, dtype=f64))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"rtol": 0}, "rtol must be a positive finite number"),
        ({"atol": -1e-3}, "atol must be a positive finite number"),
        ({"rtol": float("nan")}, "rtol must be a positive finite number"),
        ({"method": "leapfrog"}, "method must be one of 'dopri5'"),
        ({"trace": "skilling"}, "trace must be one of 'exact', 'hutchinson'"),
        ({"probe": "normal"}, "probe must be one of 'rademacher', 'gaussian'"),
        ({"activation": "relu"}, "activation must be one of 'tanh', 'softplus', 'elu'"),
        ({"time": 0.0}, "time must be a positive finite number"),
        ({"time": -1}, "time must be a positive finite number"),
        ({"max_num_steps": 0}, "max_num_steps must be a positive integer"),
        ({"trace_scale": 0.0}, "trace_scale must be a positive finite number"),
        ({"norm": "l1"}, "norm must be one of 'rms', 'max'"),
        ({"adjoint": True, "checkpoint": True}, "adjoint and checkpoint are alternatives"),
        ({"rank": -1, "context_dim": 3}, "rank must be a non-negative integer"),
        ({"rank": 2}, "rank: low-rank amortized dynamics read their weights from a context"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        Continuous(2, **options)


def test_bad_trace_assignment_and_context_shape():
    flow = Continuous(2, context_dim=3)
    with pytest.raises(ValueError, match="trace must be one of"):
        flow.trace = "approximate"
    with pytest.raises(ValueError, match="rtol must be a positive finite number"):
        flow.rtol = -1.0
    with pytest.raises(ValueError, match=r"context must have shape \(\.\.\., 3\)"):
        flow.condition(torch.randn(4, 2))


@pytest.mark.parametrize("activation", ["tanh", "softplus", "elu"])
@pytest.mark.parametrize("hidden", [(), (7,), (7, 5)])
@pytest.mark.parametrize("rank, context_dim", [(0, 0), (0, 3), (2, 3)])
def test_closed_form_trace_equals_the_jacobians(activation, hidden, rank, context_dim):
    """The exact trace from the activations' slopes (networks of up to two hidden layers)
    equals the trace of the rows of ``∂f/∂z`` from autograd, in value and in the gradients to
    every parameter, the state and the context; particles broadcast over per-sample weights,
    and inputs far out saturate the activations (softplus past its linear threshold)."""
    torch.manual_seed(0)
    f = Dynamics(4, context_dim, hidden, activation, 2, 1.3, True, rank).double()
    with torch.no_grad():
        for p in f.parameters():
            p.add_(0.5 * torch.randn_like(p))
    z = torch.randn(3, 6, 4, dtype=f64)
    z[0, 0] *= 30.0
    z.requires_grad_(True)
    c = torch.randn(6, context_dim, dtype=f64, requires_grad=True) if context_dim else None
    inputs = [*f.parameters(), z, *([c] if context_dim else [])]
    s, results = torch.tensor(0.37, dtype=f64), []
    for closed_form in (True, False):
        rhs = AugmentedDynamics(f, c, True, "exact", None, regularize=False, scale=1.0)
        assert rhs.closed_form
        rhs.closed_form = closed_form  # False: the rows, one vector-Jacobian product each
        velocity, trace = rhs(s, (z, torch.zeros(3, 6, dtype=f64)))
        loss = (trace * torch.linspace(-1, 2, 18, dtype=f64).reshape(3, 6)).sum()
        results.append((trace, *torch.autograd.grad(loss + velocity.square().sum(), inputs)))
    for closed, rows in zip(*results, strict=True):
        torch.testing.assert_close(closed, rows, rtol=1e-10, atol=1e-10)


def test_deeper_dynamics_take_the_rows():
    f = Dynamics(4, 0, (6, 5, 4), "tanh", 2, 1.0, False)
    assert not AugmentedDynamics(f, None, True, "exact", None, False, 1.0).closed_form


def test_low_rank_dynamics_are_per_sample_linear_layers():
    """``rank=k``: each layer is ``W h + b + h U V / √in + b(c)`` with ``U``, ``V``, ``b(c)``
    read from the context; untrained, the amortized part is zero."""
    torch.manual_seed(0)
    flow = Continuous(3, context_dim=4, hidden_dims=(5,), rank=2, freqs=1).double()
    f, s, z = flow.dynamics, torch.tensor(0.3, dtype=f64), torch.randn(6, 3, dtype=f64)
    c = torch.randn(6, 4, dtype=f64)
    assert torch.equal(f.velocity(s, z, f.context_term(c)), f.velocity(s, z, None))
    with torch.no_grad():
        f.amortized.weight.normal_()
        f.amortized.bias.normal_()
    features = torch.stack([torch.cos(torch.pi * s), torch.sin(torch.pi * s)]).reshape(1, 2)
    first, act, last = f.net
    h = z
    for i, (layer, (n_in, n_out)) in enumerate(zip((first, last), [(3, 5), (5, 3)], strict=True)):
        params = f.amortized(c).split(f.sizes, -1)[i]
        u = params[:, : 2 * n_in].reshape(6, n_in, 2)
        v = params[:, 2 * n_in : 2 * (n_in + n_out)].reshape(6, 2, n_out)
        weight = (u @ v) / n_in**0.5  # each sample's own (in, out) matrix
        inputs = torch.cat([h, features.expand(6, 2)], -1) if i == 0 else h
        h = layer(inputs) + torch.einsum("ni,nio->no", h, weight) + params[:, -n_out:]
        h = act(h) if i == 0 else h
    assert torch.allclose(f.velocity(s, z, f.context_term(c)), h)
    # particles: leading dims of z beyond the context's become rows of each sample's product
    particles = torch.stack([z, 2 * z, -z])
    each = torch.stack([f.velocity(s, p, f.context_term(c)) for p in particles])
    assert torch.allclose(f.velocity(s, particles, f.context_term(c)), each)
    one = f.context_term(c[:1])  # and a context that broadcasts over the samples
    assert torch.allclose(
        f.velocity(s, z, one), f.velocity(s, z, f.context_term(c[:1].expand(6, 4)))
    )


def test_cnf_recipe_fits_a_2d_density():
    """Maximum likelihood through the inverse solve on a correlated Gaussian."""
    torch.manual_seed(0)
    flow = pf.build("cnf", 2, num_layers=1, hidden_dims=(32,), trace="hutchinson")
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    q = dist.TransformedDistribution(base, [flow])
    target = dist.MultivariateNormal(
        torch.tensor([1.0, -1.0]), torch.tensor([[1.0, 0.8], [0.8, 1.0]])
    )
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(150):
        loss = -q.log_prob(target.sample((128,))).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    flow.trace = "exact"
    data = target.sample((2000,))
    with torch.no_grad():
        nll = -q.log_prob(data).mean().item()
    assert nll < -target.log_prob(data).mean().item() + 0.1


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("adjoint", [False, True])
def test_hutchinson_and_adjoint_on_cuda(adjoint):
    flow = make(trace="hutchinson", adjoint=adjoint, context_dim=2).to(GPU)
    x = torch.randn(16, 3, dtype=f64, device=GPU)
    context = torch.randn(16, 2, dtype=f64, device=GPU)
    y, ladj = flow.condition(context).call_and_ladj(x)
    (y.sum() + ladj.sum()).backward()
    assert y.device.type == GPU and all(p.grad.device.type == GPU for p in flow.parameters())
