"""The recipes inside Pyro: AutoNormalizingFlow, SVI, conditional distributions."""

from __future__ import annotations

from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow

import pyroflows as pf
from pyroflows.transforms import Autoregressive, Planar, Radial, Sylvester


def model():
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("groups", 2):
        pyro.sample("loc", dist.Normal(0.0, scale))


@pytest.mark.parametrize("name", list(pf.flows.RECIPES))
def test_recipe_in_auto_normalizing_flow(name: str):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormalizingFlow(model, partial(pf.build, name, num_layers=2, hidden_dims=(8,)))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step() for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert len(list(guide.parameters())) > 0
    posterior = guide.get_posterior()
    point = torch.randn(4, 3)  # not produced by the flow
    log_q = posterior.log_prob(point)
    assert log_q.shape == (4,) and torch.isfinite(log_q).all()
    samples = guide()
    assert samples["scale"] > 0 and samples["loc"].shape == (2,)


def test_amortized_recipe_in_conditional_distribution_trains():
    """An amortized flow fits p(z | c) = N(c, 0.5²) by maximum likelihood through its inverse."""
    torch.manual_seed(0)
    flow = pf.build("maf", 2, num_layers=2, context_dim=2, hidden_dims=(16,))
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    cond = dist.ConditionalTransformedDistribution(base, [flow])
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(300):
        c = torch.randn(128, 2)
        z = c + 0.5 * torch.randn(128, 2)
        loss = -cond.condition(c).log_prob(z).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    c = torch.randn(2000, 2)
    z = c + 0.5 * torch.randn(2000, 2)
    nll = -cond.condition(c).log_prob(z).mean().item()
    exact = -dist.Normal(c, 0.5).to_event(1).log_prob(z).mean().item()
    assert nll < exact + 0.1


SMALL_FAMILIES = {
    "planar": Planar,
    "radial": Radial,
    "sylvester-o": partial(Sylvester, kind="orthogonal"),
    "sylvester-h": partial(Sylvester, kind="householder", num_householder=3),
    "sylvester-t": partial(Sylvester, kind="triangular", reverse=True),
    "iaf": partial(Autoregressive, hidden_dims=(8,)),
}


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(sorted(SMALL_FAMILIES)),
    dim=st.integers(1, 6),
    batch=st.lists(st.integers(1, 3), max_size=2),
    amortized=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_round_trip_over_dims_and_batches(name, dim, batch, amortized, seed):
    torch.manual_seed(seed)
    flow = SMALL_FAMILIES[name](dim, context_dim=2 if amortized else 0).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.5 * torch.randn_like(p))
    t = flow.condition(torch.randn(*batch, 2, dtype=torch.float64)) if amortized else flow
    x = 2 * torch.randn(*batch, dim, dtype=torch.float64)
    y, ladj = t.call_and_ladj(x)
    t.clear_cache()
    x_back, inverse_ladj = t.inverse_and_ladj(y.clone())
    torch.testing.assert_close(x_back, x, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(inverse_ladj, -ladj, atol=1e-8, rtol=1e-8)


def test_cache_is_not_reused_after_a_parameter_update_or_across_grad_modes():
    torch.manual_seed(0)
    flow = Planar(2)
    data = torch.randn(8, 2)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
    optimizer = torch.optim.SGD(flow.parameters(), lr=0.1)
    before = d.log_prob(data)
    for _ in range(2):  # the same data tensor every step: no stale graph, no stale value
        loss = -d.log_prob(data).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = d.log_prob(data)
    assert not torch.allclose(before, after)
    flow.clear_cache()
    torch.testing.assert_close(after, d.log_prob(data.clone()))
    with torch.no_grad():
        y = flow(data)
    assert flow(data).requires_grad and not y.requires_grad


@pytest.mark.parametrize("name", ["planar", "iaf", "realnvp"])
def test_cache_follows_parameters_swapped_in_by_torch_func(name):
    torch.manual_seed(0)
    flow = pf.build(name, 2, num_layers=1).double()
    x = torch.randn(6, 2, dtype=torch.float64)
    params = dict(flow.named_parameters())
    other = {k: v.detach() + 0.3 * torch.randn_like(v) for k, v in params.items()}

    def forward(p, x):
        return torch.func.functional_call(flow, p, (x,))

    plain = forward(params, x)
    swapped = forward(other, x)  # same input tensor: a stale entry would return ``plain``
    assert not torch.allclose(plain, swapped)
    flow.clear_cache()
    torch.testing.assert_close(swapped, forward(other, x.clone()))
    # under torch.func.grad too: the gradient of the swapped-in parameters is their own
    grads = torch.func.grad(lambda p: forward(p, x).square().sum())(other)
    flow.clear_cache()
    expected = torch.func.grad(lambda p: forward(p, x.clone()).square().sum())(other)
    for k in grads:
        torch.testing.assert_close(grads[k], expected[k])
