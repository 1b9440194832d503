"""AutoFlow and AmortizedFlowGuide outside the happy path: subsampling, shapes, one-dimensional
latents, KL terms of a joint guide (AutoFlow or hand-written), bad values, saved state,
evaluation warnings."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI
from torch import nn

from pyroflows import AmortizedFlowGuide, AutoFlow
from pyroflows.infer import ELBO, IWAE, log_marginal_likelihood
from pyroflows.infer.kl import kl_terms
from pyroflows.infer.weights import log_weights, traces
from pyroflows.transforms import Coupling

N = 1000  # size of the data set the batches come from


def subsampled_model(x, idx):
    with pyro.plate("data", N, subsample=idx):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 0.8).to_event(1), obs=x)


def _amortized(**kw) -> AmortizedFlowGuide:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(2, 8), nn.Tanh())
    return AmortizedFlowGuide(encoder, latent_dim=2, context_dim=8, flow="planar", **kw)


@pytest.mark.parametrize("objective", [ELBO, IWAE])
def test_amortized_guide_under_a_subsampled_plate(objective):
    x, idx = torch.randn(10, 2), torch.arange(20, 30)
    with pytest.raises(ValueError, match=r"plate 'data'.*size 10 of 1000.*create_plates"):
        objective(8).loss(subsampled_model, _amortized(), x, idx)
    guide = _amortized(create_plates=lambda x, idx: pyro.plate("data", N, subsample=idx))
    pyro.set_rng_seed(1)
    scaled = -objective(8, max_plate_nesting=1).loss(subsampled_model, guide, x, idx)

    def whole(x, idx):  # the same batch as if it were the whole data set
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 0.8).to_event(1), obs=x)

    plain = _amortized()
    pyro.set_rng_seed(1)
    batch = -objective(8, max_plate_nesting=1).loss(whole, plain, x, idx)
    assert scaled == pytest.approx(N / len(x) * batch, rel=1e-6)  # about 4900 against 49


def test_amortized_guide_refuses_an_unbatched_x_and_a_wrong_plate():
    with pytest.raises(ValueError, match=r"x must be a batch of shape \(batch, \*features\)"):
        _amortized()(torch.randn(2))
    guide = _amortized(create_plates=lambda x: pyro.plate("other", len(x)))
    with pytest.raises(ValueError, match=r"create_plates must return the pyro\.plate named 'data'"):
        guide(torch.randn(3, 2))


def test_given_noise_gives_the_draw_of_the_same_noise():
    guide, x = _amortized(), torch.randn(3, 2)
    torch.manual_seed(0)
    drawn = guide.rsample_and_log_prob(x)
    torch.manual_seed(0)
    given = guide.rsample_and_log_prob(x, torch.randn(3, 2))
    for a, b in zip(drawn, given, strict=True):
        torch.testing.assert_close(a, b)
    noise = torch.randn(4, 3, 2)  # several draws per row: each as if drawn alone
    z, log_q = guide.rsample_and_log_prob(x, noise)
    assert z.shape == (4, 3, 2) and log_q.shape == (4, 3)
    for k in range(4):
        for a, b in zip((z[k], log_q[k]), guide.rsample_and_log_prob(x, noise[k]), strict=True):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"noise must have shape \(\*sample, 3, 2\), got \(3, 1\)"):
        guide.rsample_and_log_prob(x, torch.randn(3, 1))


@pytest.mark.parametrize("name", ["nice", "realnvp", "glow"])
def test_coupling_recipes_fit_a_scalar_latent(name):
    def model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    pyro.set_rng_seed(0)
    x = torch.randn(20) + 1.5
    guide = AutoFlow(model, flow=name, hidden_dims=(8,))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 2e-2}), ELBO(num_particles=8))
    for _ in range(300):
        svi.step(x)
    precision = 1 / 4 + len(x)
    mean = x.sum().item() / precision
    median = guide.median(x, num_samples=4000)["loc"].item()
    assert abs(median - mean) < 0.05
    assert all(layer.split == 0 for layer in guide.flow if isinstance(layer, Coupling))


def test_kl_warmup_and_free_bits_with_autoflow():
    """A joint guide's KL is one group: the auxiliary latent with the sites it places."""

    def model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(loc, scale), obs=x)

    pyro.set_rng_seed(0)
    x = torch.randn(20) + 1.0
    guide = AutoFlow(model, flow="iaf")
    guide(x)
    values = {}
    for label, options in {
        "plain": {},
        "beta=1": {"kl_weight": 1.0},
        "beta=0": {"kl_weight": 0.0},
        "beta=.5": {"kl_weight": 0.5},
        "bits": {"free_bits": 1e3},
    }.items():
        pyro.set_rng_seed(2)
        values[label] = -ELBO(num_particles=64, max_plate_nesting=1, **options).loss(
            model, guide, x
        )
    assert values["beta=1"] == pytest.approx(values["plain"], rel=1e-6)
    kl = values["beta=0"] - values["plain"]
    assert kl > 0.3  # the initial guide is not the prior (0.69 nats here)
    assert values["beta=.5"] == pytest.approx(values["plain"] + 0.5 * kl, rel=1e-6)
    assert values["bits"] == pytest.approx(values["beta=0"] - 1e3, rel=1e-6)
    guide.zero_grad()
    ELBO(num_particles=4, kl_weight=0.1, free_bits=0.5).loss_and_grads(model, guide, x)
    assert all(torch.isfinite(p.grad).all() for p in guide.parameters())


def _two_site_model():
    pyro.sample("loc", dist.Normal(0.0, 2.0))
    pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))


def test_a_hand_written_joint_guide_is_one_kl_group():
    """Sites placed by wrapped deltas (``mask``, ``to_event``) of one auxiliary latent belong
    to its group, whose KL is ``log q(z) - log p(z)`` over every site ``z`` determines."""
    q = dist.Normal(torch.tensor([0.5, -1.0, 2.0]), 0.3).to_event(1)

    def guide():
        z = pyro.sample("_z", q, infer={"is_auxiliary": True})
        pyro.sample("loc", dist.Delta(z[..., 0]).mask(True))
        pyro.sample("w", dist.Delta(z[..., 1:]).to_event(1))

    pyro.set_rng_seed(0)
    model_trace, guide_trace = traces(_two_site_model, guide, (), {}, 5, 1)
    _, kls = kl_terms(log_weights(model_trace, guide_trace, 1))
    assert list(kls) == ["_z"]
    z = guide_trace.nodes["_z"]["value"]
    prior = dist.Normal(torch.zeros(3), torch.tensor([2.0, 1.0, 1.0])).to_event(1)
    torch.testing.assert_close(kls["_z"], q.log_prob(z) - prior.log_prob(z))


def test_kl_terms_refuse_a_guide_site_the_model_lacks():
    def guide():
        pyro.sample("loc", dist.Normal(0.0, 1.0))
        pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("extra", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="guide site 'extra' has no model counterpart"):
        ELBO(kl_weight=0.5).loss(_two_site_model, guide)


def test_kl_weight_scales_the_whole_loss_of_a_model_without_data():
    """No observed site: the loss is the KL alone, so β scales all of it."""

    def guide():
        pyro.sample("loc", dist.Normal(1.0, 0.5))
        pyro.sample("w", dist.Normal(torch.ones(2), 0.5).to_event(1))

    losses = []
    for beta in (1.0, 0.25):
        pyro.set_rng_seed(0)
        losses.append(ELBO(num_particles=10, kl_weight=beta).loss(_two_site_model, guide))
    assert losses[0] > 0.5  # q is not the prior
    assert losses[1] == pytest.approx(0.25 * losses[0], rel=1e-6)


def test_autoflow_refuses_non_finite_init_scale():
    for bad in (math.nan, math.inf, -1.0, 0.0):
        with pytest.raises(ValueError, match="init_scale must be a positive finite number"):
            AutoFlow(subsampled_model, init_scale=bad)


def test_autoflow_state_dict_loads_into_a_fresh_guide():
    def model(x):
        z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    x = torch.randn(4, 3)
    trained = AutoFlow(model, flow="sylvester-h")
    trained(x)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    state = trained.state_dict()
    fresh = AutoFlow(model, flow="sylvester-h")
    fresh.load_state_dict(state)  # before its first call
    fresh(x)
    for (k, v), (k2, v2) in zip(
        fresh.state_dict().items(), trained.state_dict().items(), strict=True
    ):
        assert k == k2
        torch.testing.assert_close(v, v2)
    z = torch.randn(5, 3)
    torch.testing.assert_close(
        fresh.get_posterior().log_prob(z), trained.get_posterior().log_prob(z)
    )


def test_log_marginal_likelihood_flags_one_sample_and_tiny_ess():
    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(-1), 0.01), obs=torch.tensor(3.0))  # q far off

    guide = AutoFlow(model, flow="planar")
    with pytest.warns(RuntimeWarning, match="importance ESS below 10"):
        one = log_marginal_likelihood(model, guide, num_samples=1)
    assert math.isnan(one.stderr.item())
    with pytest.warns(RuntimeWarning, match="importance ESS below 10 for 1 of 1") as caught:
        log_marginal_likelihood(model, guide, num_samples=200)
    assert caught[0].filename == __file__  # the warning points at the caller


def test_autoflow_names_diverged_parameters():
    def model():
        pyro.sample("tau", dist.HalfCauchy(5.0))

    guide = AutoFlow(model, flow="realnvp", num_layers=2)
    guide()
    with torch.no_grad():
        guide.loc.fill_(math.nan)
    with pytest.raises(RuntimeError, match="AutoFlow drew a non-finite latent"):
        guide()
