"""Guides and objectives against a conjugate Gaussian model, whose evidence is known."""

from __future__ import annotations

import gc
import itertools
import math
import warnings
import weakref

import pyro
import pyro.distributions as dist
import pytest
import torch
from devices import GPU, needs_gpu
from pyro.infer import SVI, Predictive, RenyiELBO, Trace_ELBO
from torch import nn

import pyroflows as pf
from pyroflows import AmortizedFlowGuide, AutoFlow
from pyroflows._repeated import memo, repeated_draws
from pyroflows.infer import ELBO, IWAE, log_marginal_likelihood

NOISE = 0.8
PRIOR = 1.0


def global_model(x):
    """z ~ N(0, I₂), xₙ ~ N(z, 0.8² I₂): one global latent."""
    z = pyro.sample("z", dist.Normal(torch.zeros(2, device=x.device), PRIOR).to_event(1))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z, NOISE).to_event(1), obs=x)


def global_evidence(x):
    n = len(x)
    cov = PRIOR**2 * torch.ones(n, n) + NOISE**2 * torch.eye(n)
    return dist.MultivariateNormal(torch.zeros(n), cov).log_prob(x.T.cpu()).sum().item()


def local_model(x):
    """zₙ ~ N(0, I₂), xₙ ~ N(zₙ, 0.8² I₂): one local latent per datum."""
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(x.new_zeros(2), PRIOR).to_event(1))
        pyro.sample("x", dist.Normal(z, NOISE).to_event(1), obs=x)


def local_evidence(x):
    return dist.Normal(0.0, math.hypot(PRIOR, NOISE)).log_prob(x).sum(-1)  # per datum


@pytest.fixture
def data():
    torch.manual_seed(0)
    return torch.randn(2) + NOISE * torch.randn(10, 2)


def fit(guide, model, x, steps, lr=1e-2, loss=None):
    pyro.clear_param_store()
    svi = SVI(
        model,
        guide,
        pyro.optim.Adam({"lr": lr}),
        loss or Trace_ELBO(num_particles=16, vectorize_particles=True),
    )
    for step in range(steps):
        value = svi.step(x)
        assert math.isfinite(value), f"non-finite loss at step {step}"
    return guide


MIXING = torch.tensor([[1.0, 1.0], [1.0, 1.2], [1.2, 1.0]])


def correlated_model(x):
    """z ~ N(0, I₂), x ~ N(A z, 0.5² I₃): the data pin down z₁ + z₂ far better than z₁ - z₂,
    so the posterior is a Gaussian with correlation -0.97 that a diagonal placement alone
    cannot reach."""
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("x", dist.Normal(z @ MIXING.T, 0.5).to_event(1), obs=x)


def correlated_evidence(x):
    cov = MIXING @ MIXING.T + 0.25 * torch.eye(3)
    return dist.MultivariateNormal(torch.zeros(3), cov).log_prob(x).item()


# measured gaps at 500 steps: 0.001-0.003 for the MLP-conditioned recipes, 0.008 for the CNF
# (fixed steps: the adaptive solver is tested elsewhere); the rest need 1000
SETTINGS = {  # recipe: (steps, options)
    "cnf": (500, {"hidden_dims": (8,), "num_layers": 1, "method": "rk4", "num_steps": 3}),
    **{name: (1000, {}) for name in ("planar", "radial", *(f"sylvester-{k}" for k in "oht"))},
    **{name: (1000, {"hidden_dims": (16,)}) for name in ("nsf-ar", "nsf-coupling")},
}
# tanh-based layers reach a linear shear only approximately with two layers, and radial
# layers (spherically symmetric about a centre) hardly at all: measured gaps 0.02-0.05 and 0.6
GAPS = {"sylvester-o": 0.08, "sylvester-h": 0.08, "sylvester-t": 0.08, "radial": 1.0}


def fit_with_schedule(guide, model, x, steps, objective):
    pyro.set_rng_seed(0)
    schedule = pyro.optim.ClippedAdam({"lr": 3e-2, "lrd": 0.03 ** (1 / steps)})
    svi = SVI(model, guide, schedule, objective)
    for _ in range(steps):
        svi.step(x)
    with torch.no_grad():
        return -ELBO(num_particles=20000).loss(model, guide, x)


@pytest.mark.parametrize("name", list(pf.flows.RECIPES))
def test_autoflow_elbo_reaches_the_evidence_of_a_correlated_posterior(name):
    torch.manual_seed(1)
    x = MIXING @ torch.tensor([0.5, -0.3]) + 0.5 * torch.randn(3)
    steps, options = SETTINGS.get(name, (500, {"hidden_dims": (16,)}))
    guide = AutoFlow(correlated_model, flow=name, **options)
    elbo = fit_with_schedule(guide, correlated_model, x, steps, ELBO(16, estimator="stl"))
    exact = correlated_evidence(x)
    assert elbo <= exact + 0.01
    assert exact - elbo < GAPS.get(name, 0.02), f"{name}: gap {exact - elbo:.4f}"


def banana_model(y):
    """A curved posterior: z ~ N(0, I₂), y ~ N(z₁² + z₂, 0.4²), observed y = 1.5."""
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(z[..., 0] ** 2 + z[..., 1], 0.4), obs=y)


def test_a_flow_beats_a_full_gaussian_on_a_curved_posterior():
    from pyro.infer.autoguide import AutoMultivariateNormal

    y = torch.tensor(1.5)
    grid = torch.linspace(-8, 8, 1601, dtype=torch.float64)
    z1, z2 = torch.meshgrid(grid, grid, indexing="ij")
    log_joint = (
        dist.Normal(0.0, 1.0).log_prob(z1)
        + dist.Normal(0.0, 1.0).log_prob(z2)
        + dist.Normal(z1**2 + z2, 0.4).log_prob(y.double())
    )
    exact = (torch.logsumexp(log_joint.flatten(), 0) + 2 * math.log(16 / 1600)).item()
    gaussian = fit_with_schedule(
        AutoMultivariateNormal(banana_model), banana_model, y, 1000,
        Trace_ELBO(num_particles=16, vectorize_particles=True),
    )  # fmt: skip
    flow = fit_with_schedule(
        AutoFlow(banana_model, flow="iaf", num_layers=4, hidden_dims=(16,)),
        banana_model, y, 1000, ELBO(16, estimator="stl"),
    )  # fmt: skip
    # measured: gaps 0.79 (full Gaussian) and 0.03 (IAF)
    assert exact - gaussian > 0.6
    assert exact - flow < 0.08


def test_iwae_is_above_the_elbo_and_grows_with_k(data):
    pyro.set_rng_seed(0)
    guide = fit(AutoFlow(global_model, flow="planar"), global_model, data, steps=30)  # imperfect
    bounds = []
    for k in (1, 4, 16, 64):
        values = torch.tensor(
            [-IWAE(num_particles=k).loss(global_model, guide, data) for _ in range(100)]
        )
        bounds.append((values.mean(), values.std() / 10))
    elbo = -ELBO(num_particles=4000).loss(global_model, guide, data)
    assert abs(bounds[0][0] - elbo) < 4 * bounds[0][1] + 0.01  # IWAE(1) is the ELBO
    for (low, se_low), (high, se_high) in itertools.pairwise(bounds):
        assert high > low - 3 * math.hypot(se_low, se_high)
    assert bounds[-1][0] > bounds[0][0] + 0.05  # it really tightens here
    assert bounds[-1][0] < global_evidence(data) + 3 * bounds[-1][1]


def test_log_marginal_likelihood_within_three_standard_errors(data):
    pyro.set_rng_seed(0)
    guide = fit(AutoFlow(global_model, flow="iaf"), global_model, data, steps=100)
    result = log_marginal_likelihood(global_model, guide, data, num_samples=5000, chunk_size=700)
    assert result.log_px.shape == ()
    assert abs(result.log_px.item() - global_evidence(data)) < 3 * result.stderr.item() + 1e-3
    assert 1 < result.ess.item() <= 5000


def test_a_conditioned_posterior_is_freed_without_the_garbage_collector(data):
    """Each call's transforms and the tensors in their caches go as soon as the caller drops
    them: a reference cycle would hold a chunk of samples until the collector runs."""
    guide = AmortizedFlowGuide(nn.Linear(2, 8), latent_dim=2, context_dim=8, flow="iaf")
    gc.disable()
    try:
        q = guide.posterior(data)
        z = q.rsample((4,))
        q.log_prob(z)
        refs = [weakref.ref(t) for t in q.transforms] + [weakref.ref(z)]
        del q, z
        assert all(r() is None for r in refs)
    finally:
        gc.enable()


def test_repeated_draws_reuse_a_result_only_for_unchanged_inputs_without_gradients():
    calls = []

    def compute():
        calls.append(torch.zeros(1))
        return calls[-1]

    x = torch.zeros(2)
    with repeated_draws():
        with torch.no_grad():
            first = memo("f", (compute, x), compute)
            assert memo("f", (compute, x), compute) is first and len(calls) == 1
            assert memo("g", (compute, x), compute) is not first  # another kind
            memo("f", (compute, x.clone()), compute)  # another tensor replaces the entry
            assert len(calls) == 3
            first_ref = weakref.ref(first)
            del first, calls[0]
            assert first_ref() is None  # the replaced result is not kept
            x.add_(1.0)  # modified in place: a new version
            memo("f", (compute, x), compute)
            assert len(calls) == 3
        memo("f", (compute, x), compute)  # gradients on: never reused
        assert len(calls) == 4
    with torch.no_grad():
        memo("f", (compute, x), compute)  # outside the scope
    assert len(calls) == 5


@pytest.mark.parametrize("nesting", [None, 1])
def test_log_marginal_likelihood_per_datum_for_local_latents(data, nesting):
    pyro.set_rng_seed(0)
    encoder = nn.Sequential(nn.Linear(2, 16), nn.Tanh())
    guide = AmortizedFlowGuide(encoder, latent_dim=2, context_dim=16, flow="iaf", hidden_dims=(16,))
    fit(guide, local_model, data, steps=300)
    result = log_marginal_likelihood(
        local_model, guide, data, num_samples=3000, chunk_size=1000, max_plate_nesting=nesting
    )
    exact = local_evidence(data)
    assert result.log_px.shape == result.stderr.shape == result.ess.shape == (10,)
    assert ((result.log_px - exact).abs() < 3 * result.stderr + 2e-3).all()


def subsampled_local_model(x, size):
    with pyro.plate("data", size, subsample=torch.arange(len(x))):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), PRIOR).to_event(1))
        pyro.sample("x", dist.Normal(z, NOISE).to_event(1), obs=x)


def subsampled_guide(x, size):
    with pyro.plate("data", size, subsample=torch.arange(len(x))):
        pyro.sample("z", dist.Normal(0.5 * x, 0.7).to_event(1))


def test_per_datum_iwae_against_renyi_with_and_without_subsampling(data):
    """Both keep the data plate; Pyro's RenyiELBO scales log weights inside the logsumexp."""
    renyi = RenyiELBO(alpha=0, num_particles=16, vectorize_particles=True)
    pyro.set_rng_seed(3)
    ours = -IWAE(num_particles=16).loss(subsampled_local_model, subsampled_guide, data, len(data))
    pyro.set_rng_seed(3)
    theirs = -renyi.loss(subsampled_local_model, subsampled_guide, data, len(data))
    assert ours == pytest.approx(theirs, abs=1e-4)  # no subsampling: the same estimator
    # a batch of 10 from a data set of 1000: the same per-datum bound, scaled by 100
    pyro.set_rng_seed(3)
    scaled = -IWAE(num_particles=16).loss(subsampled_local_model, subsampled_guide, data, 1000)
    pyro.set_rng_seed(3)
    theirs = -renyi.loss(subsampled_local_model, subsampled_guide, data, 1000)
    assert scaled == pytest.approx(100 * ours, rel=1e-5)
    assert abs(scaled - theirs) > 1.0


def test_autoflow_with_predictive_constrained_sites_plates_and_quantiles():
    def model(x):
        rate = pyro.sample("rate", dist.Gamma(2.0, 2.0))
        with pyro.plate("groups", 3, dim=-1):
            loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
            with pyro.plate("data", len(x), dim=-2):
                pyro.sample("x", dist.Normal(loc, 1 / rate), obs=x)

    x = torch.randn(20, 3)
    guide = AutoFlow(model, flow="sylvester-h", num_layers=2)
    fit(guide, model, x, steps=20, loss=Trace_ELBO(num_particles=4, vectorize_particles=True))
    samples = Predictive(model, guide=guide, num_samples=50, return_sites=["rate", "loc", "x"])(x)
    assert samples["rate"].numel() == 50 and (samples["rate"] > 0).all()
    assert samples["loc"].reshape(50, -1).shape == (50, 3)
    q = guide.quantiles([0.1, 0.5, 0.9], num_samples=500)
    assert q["rate"].shape == (3,) and (q["rate"] > 0).all() and (q["rate"].diff() > 0).all()
    assert guide.median(num_samples=500)["loc"].shape == (3,)


def test_amortized_guide_with_iwae_dreg_trains(data):
    pyro.set_rng_seed(0)
    encoder = nn.Sequential(nn.Linear(2, 16), nn.Tanh())
    guide = AmortizedFlowGuide(
        encoder, latent_dim=2, context_dim=16, flow="sylvester-o", num_layers=2
    )
    iwae = IWAE(num_particles=64)
    before = torch.tensor([-iwae.loss(local_model, guide, data) for _ in range(10)])
    fit(guide, local_model, data, steps=200, loss=IWAE(num_particles=8, estimator="dreg"))
    after = torch.tensor([-iwae.loss(local_model, guide, data) for _ in range(10)])
    assert after.mean() > before.mean() + 0.3
    assert after.mean() < local_evidence(data).sum() + 3 * after.std() / math.sqrt(10)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: IWAE(num_particles=0), "num_particles must be a positive integer"),
        (lambda: ELBO(estimator="dreg"), "estimator must be one of 'standard', 'stl'"),
        (lambda: IWAE(estimator="stl"), "estimator must be one of 'standard', 'dreg'"),
        (lambda: AutoFlow(global_model, flow="spline"), "flow must be one of 'iaf'"),
        (lambda: AutoFlow(global_model, init_scale=0.0), "init_scale must be a positive finite"),
        (lambda: AmortizedFlowGuide(nn.Identity(), 2, 0), "context_dim must be a positive integer"),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_chunk_size_discrete_latents_and_missing_sites(data):
    guide = AutoFlow(global_model)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        log_marginal_likelihood(global_model, guide, data, chunk_size=0)

    def discrete_model():
        pyro.sample("c", dist.Bernoulli(0.5))

    def discrete_guide():
        pyro.sample("c", dist.Bernoulli(0.3))

    with pytest.raises(ValueError, match="guide site 'c' is not reparameterizable"):
        IWAE(num_particles=2).loss(discrete_model, discrete_guide)

    def empty_guide(x):
        pass

    with (
        pytest.warns(UserWarning, match="Found vars in model but not guide"),  # Pyro's own
        pytest.raises(ValueError, match="model latent site 'z' has no counterpart in the guide"),
    ):
        IWAE(num_particles=2).loss(global_model, empty_guide, data)


def test_encoder_output_size_is_checked():
    guide = AmortizedFlowGuide(nn.Linear(2, 5), latent_dim=2, context_dim=4)
    with pytest.raises(ValueError, match=r"encoder output must have shape \(\.\.\., 4\)"):
        guide(torch.randn(3, 2))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", list(pf.flows.RECIPES))
def test_autoflow_and_evaluation_follow_the_model_to_cuda(name, data):
    x = data.to(GPU)
    guide = AutoFlow(global_model, flow=name)
    fit(guide, global_model, x, steps=5)
    assert all(p.device.type == GPU for p in guide.parameters())
    result = log_marginal_likelihood(global_model, guide, x, num_samples=1000)
    assert result.log_px.device.type == GPU
    IWAE(num_particles=8, estimator="dreg").loss_and_grads(global_model, guide, x)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", ["iaf", "sylvester-h", "cnf"])
def test_amortized_guide_objectives_and_evaluation_on_cuda(name, data):
    x = data.to(GPU)
    encoder = nn.Sequential(nn.Linear(2, 8), nn.Tanh())
    options = {"hidden_dims": (8,), "trace": "hutchinson"} if name == "cnf" else {}
    guide = AmortizedFlowGuide(encoder, 2, 8, flow=name, **options).to(GPU)
    for loss in (
        IWAE(num_particles=8, estimator="dreg", chunk_size=3),
        ELBO(num_particles=4, estimator="stl", free_bits=0.1),
    ):
        guide.zero_grad()
        assert math.isfinite(loss.loss_and_grads(local_model, guide, x))
        assert all(p.grad.device.type == GPU for p in guide.parameters())
    result = log_marginal_likelihood(local_model, guide, x, num_samples=64, chunk_size=16)
    assert result.log_px.device.type == GPU and result.log_px.shape == (10,)


def test_kl_warmup_scales_the_kl_linearly_and_matches_the_analytic_kl(data):
    """q(z|x) = N(x/2, 0.7²): the KL to N(0, 1) per datum is known in closed form."""
    values = {}
    for beta in (0.0, 0.5, 1.0):
        pyro.set_rng_seed(5)
        values[beta] = -ELBO(num_particles=4000, kl_weight=beta).loss(
            subsampled_local_model, subsampled_guide, data, len(data)
        )
    pyro.set_rng_seed(5)
    plain = -ELBO(num_particles=4000).loss(
        subsampled_local_model, subsampled_guide, data, len(data)
    )
    assert values[1.0] == pytest.approx(plain, abs=1e-3)
    assert values[0.0] - 2 * values[0.5] + values[1.0] == pytest.approx(0.0, abs=1e-3)
    q = dist.Normal(0.5 * data, 0.7)
    exact_kl = torch.distributions.kl_divergence(q, dist.Normal(0.0, PRIOR)).sum().item()
    assert values[0.0] - values[1.0] == pytest.approx(exact_kl, rel=0.05)


def test_free_bits_hold_the_kl_at_lambda(data):
    pyro.set_rng_seed(5)
    no_kl = -ELBO(num_particles=64, kl_weight=0.0).loss(
        subsampled_local_model, subsampled_guide, data, 1000
    )
    pyro.set_rng_seed(5)
    held = -ELBO(num_particles=64, free_bits=50.0).loss(
        subsampled_local_model, subsampled_guide, data, 1000
    )
    assert held == pytest.approx(no_kl - 50.0 * 1000, rel=1e-6)  # λ per datum, scaled to N

    encoder = nn.Sequential(nn.Linear(2, 8), nn.Tanh())
    guide = AmortizedFlowGuide(encoder, latent_dim=2, context_dim=8, flow="planar")
    elbo = ELBO(
        num_particles=4, free_bits=50.0
    )  # far above the actual KL: only the likelihood pulls
    elbo.loss_and_grads(local_model, guide, data)
    with_bits = [p.grad.clone() for p in guide.parameters()]
    guide.zero_grad()
    ELBO(num_particles=4, kl_weight=0.0).loss_and_grads(local_model, guide, data)
    del with_bits  # different samples; the value identity above is the exact check
    with pytest.raises(ValueError, match="free_bits must be a non-negative finite number"):
        ELBO(free_bits=-1.0)
    with pytest.raises(ValueError, match="kl_weight must be a non-negative finite number"):
        elbo.kl_weight = float("inf")


@pytest.mark.filterwarnings("ignore:.*importance ESS below:RuntimeWarning")  # 16 samples
@pytest.mark.parametrize(
    "name", ["planar", "iaf", "sylvester-o", "sylvester-h", "sylvester-t", "cnf"]
)
def test_amortized_guide_recipes_under_dreg_and_stl(name, data):
    encoder = nn.Sequential(nn.Linear(2, 8), nn.Tanh())
    options = {"hidden_dims": (8,), "trace": "hutchinson"} if name == "cnf" else {}
    guide = AmortizedFlowGuide(encoder, latent_dim=2, context_dim=8, flow=name, **options)
    for loss in (IWAE(num_particles=4, estimator="dreg"), ELBO(num_particles=4, estimator="stl")):
        guide.zero_grad()
        assert math.isfinite(loss.loss_and_grads(local_model, guide, data))
        grads = [p.grad for p in guide.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert log_marginal_likelihood(local_model, guide, data, num_samples=16).log_px.shape == (10,)


@pytest.mark.parametrize("estimator", ["standard", "dreg"])
def test_chunked_iwae_gradient_equals_one_graph_over_the_same_samples(estimator, data):
    from pyroflows._random import seeded
    from pyroflows.infer.objectives import _bound

    encoder = nn.Sequential(nn.Linear(2, 8), nn.Tanh())
    guide = AmortizedFlowGuide(encoder, latent_dim=2, context_dim=8, flow="planar")
    chunked = IWAE(num_particles=7, estimator=estimator, chunk_size=3)  # chunks of 3, 3, 1
    chunked.loss(local_model, guide, data)  # settles the plate nesting first
    torch.manual_seed(11)
    loss = chunked.loss_and_grads(local_model, guide, data)
    grads = [p.grad.clone() for p in guide.parameters()]

    # reference: all chunks in one graph, from the same seeds
    guide.zero_grad()
    torch.manual_seed(11)
    seeds = torch.randint(2**62, (3,)).tolist()
    parts = []
    for s, k in zip(seeds, (3, 3, 1), strict=True):
        with seeded(s):
            parts.append(chunked._weights(local_model, guide, (data,), {}, estimator == "dreg", k))
    values = torch.cat([lw.values for lw in parts])
    normalized = torch.softmax(values.detach(), 0).split([3, 3, 1])
    surrogate = sum(
        chunked._surrogate(lw, n)
        for lw, n in zip(parts, normalized, strict=True)
    )
    (-surrogate).backward()
    assert loss == pytest.approx(-_bound(values.detach(), 1.0).item(), rel=1e-6)
    for got, expected in zip(grads, [p.grad for p in guide.parameters()], strict=True):
        torch.testing.assert_close(got, expected)


def test_chunked_iwae_loss_matches_unchunked_in_distribution(data):
    pyro.set_rng_seed(0)
    guide = fit(AutoFlow(global_model, flow="planar"), global_model, data, steps=30)
    a = torch.tensor([IWAE(num_particles=32).loss(global_model, guide, data) for _ in range(100)])
    b = torch.tensor(
        [IWAE(num_particles=32, chunk_size=5).loss(global_model, guide, data) for _ in range(100)]
    )
    assert abs(a.mean() - b.mean()) < 4 * math.hypot(a.std(), b.std()) / 10
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        IWAE(num_particles=4, chunk_size=0)


def test_evaluations_use_a_cnfs_exact_trace_whatever_it_trains_with(data):
    """``log_marginal_likelihood`` and the draws behind the diagnostics weigh with the exact
    ``log q`` of a CNF trained on Hutchinson's estimate (an estimated log-determinant biases
    the weights): from one seed they equal the figures of the same layers set to exact, and
    the layers keep their setting. Without the switch the probes make every call differ."""
    encoder = nn.Sequential(nn.Linear(2, 8), nn.Tanh())
    options = {"num_layers": 1, "hidden_dims": (8,), "trace": "hutchinson"}
    guide = AmortizedFlowGuide(encoder, latent_dim=2, context_dim=8, flow="cnf", **options)
    autoflow = AutoFlow(global_model, "cnf", **options)
    autoflow(data)  # builds the flow
    layers = [m for g in (guide, autoflow) for m in g.modules()
              if isinstance(m, pf.transforms.Continuous)]  # fmt: skip
    figures = {}
    for trace in ("hutchinson", "exact"):
        for layer in layers:
            layer.trace = trace
        with warnings.catch_warnings():  # an untrained guide: few effective samples
            warnings.simplefilter("ignore", RuntimeWarning)
            pyro.set_rng_seed(1)
            r = log_marginal_likelihood(local_model, guide, data, num_samples=40, chunk_size=20)
        pyro.set_rng_seed(1)
        idata = pf.diagnostics.to_inference_data(global_model, autoflow, data, num_samples=30)
        log_w = torch.as_tensor(idata.sample_stats["log_importance_ratio"].values)
        figures[trace] = (r.log_px, log_w.to(r.log_px.dtype))
        assert [layer.trace for layer in layers] == [trace, trace]
    for hutchinson, exact in zip(figures["hutchinson"], figures["exact"], strict=True):
        torch.testing.assert_close(hutchinson, exact)
