"""STL and DReG stop every guide parameter; differentiable losses; AutoFlow runs no inverse."""

from __future__ import annotations

import contextlib
import copy
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

import pyroflows as pf
from pyroflows.infer import ELBO, IWAE
from pyroflows.transforms import Autoregressive, Flow

DIM = 3
NETWORK = ("iaf", "maf", "nice", "realnvp", "glow", "nsf-ar", "nsf-coupling")


def _options(name: str) -> dict:
    if name == "cnf":
        return {"num_layers": 1, "hidden_dims": (8,), "rtol": 1e-10, "atol": 1e-10}
    return {"hidden_dims": (8,)} if name in NETWORK else {}


def exact_posterior_case(name: str):
    """A model whose posterior is an AutoFlow's own ``q`` at perturbed parameters.

    The model's latent has exactly the guide's distribution at those parameters (a frozen
    copy of its flow and placement), so ``log p(z) = log q(z)`` for every ``z``: the
    posterior needs every layer of the flow, and at it the path derivative is exactly zero.
    """
    pyro.clear_param_store()
    torch.manual_seed(0)
    target = {}

    def model():
        prior = dist.Normal(torch.zeros(DIM, dtype=torch.float64), 1.0).to_event(1)
        pyro.sample("z", target.get("z", prior))

    options = _options(name)
    guide = pf.AutoFlow(model, flow=name, num_layers=options.pop("num_layers", 2), **options)
    guide.double()
    guide()  # builds the flow
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    frozen = copy.deepcopy(guide).requires_grad_(False)
    place = dist.transforms.AffineTransform(frozen.loc, frozen.scale, event_dim=1)
    target["z"] = dist.TransformedDistribution(frozen.get_base_dist(), [*frozen.flow, place])
    return model, guide


def _grads(guide) -> list[torch.Tensor]:
    return [p.grad for p in guide.parameters()]


@pytest.mark.parametrize("name", list(pf.flows.RECIPES))
def test_stl_and_dreg_gradients_vanish_at_an_exact_posterior_that_needs_the_flow(name):
    model, guide = exact_posterior_case(name)
    tol = 1e-7 if name == "cnf" else 1e-11  # rounding: the score terms are > 1e-3
    for objective in (ELBO(num_particles=4, estimator="stl"), IWAE(4, estimator="dreg")):
        guide.zero_grad(set_to_none=True)
        objective.loss_and_grads(model, guide)
        for (label, _), g in zip(guide.named_parameters(), _grads(guide), strict=True):
            assert g is not None, label
            assert g.abs().max() < tol, f"{name} {type(objective).__name__}: {label}"
    # the score terms are really there: the standard estimator's flow gradient is not zero
    guide.zero_grad(set_to_none=True)
    ELBO(num_particles=4).loss_and_grads(model, guide)
    assert max(p.grad.abs().max() for p in guide.flow.parameters()) > 1e-3


def test_dreg_matches_iwae_in_expectation_with_a_flow_that_does_work():
    model, guide = exact_posterior_case("sylvester-h")
    with torch.no_grad():  # move q off the posterior: now the gradients are not zero
        for p in guide.flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    reps = 200
    means, variances = {}, {}
    for estimator in ("standard", "dreg"):
        objective = IWAE(num_particles=8, estimator=estimator)
        grads = []
        for _ in range(reps):
            guide.zero_grad(set_to_none=True)
            objective.loss_and_grads(model, guide)
            grads.append(torch.cat([p.grad.flatten() for p in guide.parameters()]))
        grads = torch.stack(grads)
        means[estimator], variances[estimator] = grads.mean(0), grads.var(0)
    se = ((variances["standard"] + variances["dreg"]) / reps).sqrt()
    assert means["standard"].abs().max() > 0.05  # a real gradient to agree on
    assert ((means["standard"] - means["dreg"]).abs() < 4.5 * se + 1e-6).all()


@pytest.mark.parametrize("local", [True, False], ids=["per-datum", "global"])
def test_dreg_gradients_equal_their_definition_for_guide_and_model(local):
    """DReG's gradients against their definition, by hand in float64: the guide gets
    ``Σ w̃² ∂ log w / ∂φ`` through its samples with its density's parameters stopped, the
    model's parameters ``Σ w̃ ∇θ log p(x, z)`` (here from one model pass whose latents'
    gradient is rescaled), with per-datum weights (a VAE's latents) and global ones."""
    pyro.clear_param_store()
    torch.manual_seed(5)
    k, n, d = 4, 3, 2
    f64 = torch.float64
    x = torch.randn(n, d, dtype=f64)
    decoder = torch.nn.Linear(d, d).double()

    def log_p(z, x):
        prior = dist.Normal(torch.zeros(d, dtype=f64), 1.0).to_event(1).log_prob(z)
        likelihood = dist.Normal(decoder(z), 0.5).to_event(1).log_prob(x)
        return prior + likelihood if local else prior.squeeze(-1) + likelihood.sum(-1)

    def model(x):
        pyro.module("decoder", decoder)
        if not local:
            z = pyro.sample("z", dist.Normal(torch.zeros(d, dtype=f64), 1.0).to_event(1))
        with pyro.plate("data", n):
            if local:
                z = pyro.sample("z", dist.Normal(torch.zeros(d, dtype=f64), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 0.5).to_event(1), obs=x)

    shape = (n, d) if local else (d,)

    def guide(x):
        loc = pyro.param("loc", torch.randn(shape, dtype=f64))
        scale = pyro.param("scale", torch.rand(shape, dtype=f64) + 0.5, dist.constraints.positive)
        with pyro.plate("data", n) if local else contextlib.nullcontext():
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    objective = IWAE(k, "dreg", max_plate_nesting=1)
    pyro.set_rng_seed(7)
    loss = objective.loss_and_grads(model, guide, x)
    store = dict(pyro.get_param_store().named_parameters())
    leaves = [store["loc"], store["scale"], *decoder.parameters()]
    got = [p.grad.clone() for p in leaves]

    pyro.set_rng_seed(7)  # the same draws, by hand
    with pyro.plate(pf.infer.weights.PARTICLES, k, dim=-2):
        z = poutine.trace(guide).get_trace(x).nodes["z"]["value"]
    loc, scale = pyro.param("loc").detach(), pyro.param("scale").detach()
    log_q = dist.Normal(loc, scale).to_event(1).log_prob(z)
    log_w = log_p(z, x) - (log_q if local else log_q.squeeze(-1))
    normalized = torch.softmax(log_w.detach(), 0)
    guide_grads = torch.autograd.grad(-(normalized.square() * log_w).sum(), leaves[:2])
    model_grads = torch.autograd.grad(-(normalized * log_p(z.detach(), x)).sum(), leaves[2:])
    assert loss == pytest.approx(-(torch.logsumexp(log_w, 0) - math.log(k)).sum().item())
    for g, expected in zip(got, [*guide_grads, *model_grads], strict=True):
        torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12)
    assert min(g.abs().max() for g in got) > 1e-3


OBJECTIVES = [  # the plate nesting given: no guessing run draws random numbers
    ELBO(num_particles=3, max_plate_nesting=1),
    ELBO(num_particles=3, estimator="stl", max_plate_nesting=1),
    ELBO(3, "stl", max_plate_nesting=1, kl_weight=0.3, free_bits=0.1),
    IWAE(num_particles=3, max_plate_nesting=1),
    IWAE(num_particles=3, estimator="dreg", max_plate_nesting=1),
]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: f"{type(o).__name__}")
def test_differentiable_loss_equals_loss_and_the_gradients_of_loss_and_grads(objective):
    def model(x):
        z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)

    x = torch.randn(5, 2, dtype=torch.float64)
    guide = pf.AutoFlow(model, flow="iaf", hidden_dims=(8,)).double()
    guide(x)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.2 * torch.randn_like(p))
    pyro.set_rng_seed(3)
    loss = objective.differentiable_loss(model, guide, x)
    loss.backward()
    expected_grads = [p.grad.clone() for p in guide.parameters()]
    guide.zero_grad(set_to_none=True)
    pyro.set_rng_seed(3)
    value = objective.loss_and_grads(model, guide, x)
    assert loss.item() == pytest.approx(value, rel=1e-12)
    for g, expected in zip(_grads(guide), expected_grads, strict=True):
        torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12)
    pyro.set_rng_seed(3)
    assert objective.loss(model, guide, x) == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("name", list(pf.flows.RECIPES))
def test_autoflow_svi_step_runs_no_inverse(name, monkeypatch):
    calls = []
    for family in {type(m) for m in pf.build(name, 2, 2).modules() if isinstance(m, Flow)}:
        original = family._backward

        def counted(self, y, params, original=original):
            calls.append(type(self).__name__)
            return original(self, y, params)

        monkeypatch.setattr(family, "_backward", counted)

    def model(x):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        scale = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(z, scale.unsqueeze(-1)).to_event(1), obs=x)

    x = torch.randn(6, 2)
    options = _options(name) | ({"rtol": 1e-3, "atol": 1e-3} if name == "cnf" else {})
    guide = pf.AutoFlow(model, flow=name, num_layers=options.pop("num_layers", 2), **options)
    for objective in (
        ELBO(num_particles=2),
        IWAE(num_particles=2),
        Trace_ELBO(num_particles=2, vectorize_particles=True),
    ):
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), objective)
        svi.step(x)
        svi.step(x)
    assert calls == []


@pytest.mark.parametrize("name", ["iaf", "planar", "sylvester-o", "sylvester-h", "sylvester-t"])
def test_stopped_density_warm_starts_from_the_sample_and_keeps_the_gradients(name, monkeypatch):
    """The stopped pass reuses the forward pass's input as the root (no iterative solve) and
    gives the same STL and DReG gradients as the full solve, in float64."""
    import pyroflows.transforms.planar as planar_module
    import pyroflows.transforms.sylvester as sylvester_module

    model, guide = exact_posterior_case(name)
    with torch.no_grad():  # off the posterior: gradients that are not zero
        for p in guide.flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    solves = []
    for module in (planar_module, sylvester_module):
        original = module.solve_increasing

        def counted(*args, original=original, **kwargs):
            solves.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, "solve_increasing", counted)
    sequential = Autoregressive._solve

    def counted_passes(self, *args, **kwargs):
        solves.append(1)
        return sequential(self, *args, **kwargs)

    monkeypatch.setattr(Autoregressive, "_solve", counted_passes)
    for objective in (ELBO(4, "stl", max_plate_nesting=0), IWAE(4, "dreg", max_plate_nesting=0)):
        grads, counts = {}, {}
        for warm in (True, False):
            for family in (pf.transforms.Planar, pf.transforms.Sylvester, Autoregressive):
                monkeypatch.setattr(family, "_warm_starts", warm)
            solves.clear()
            guide.zero_grad(set_to_none=True)
            pyro.set_rng_seed(4)
            objective.loss_and_grads(model, guide)
            grads[warm] = [p.grad.clone() for p in guide.parameters()]
            counts[warm] = len(solves)
        # the model's frozen copy of the flow still solves; the guide's two layers do not
        assert counts[False] - counts[True] >= 2
        for a, b in zip(grads[True], grads[False], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        assert max(g.abs().max() for g in grads[True]) > 1e-3


def test_inverse_without_gradients_at_the_last_output_reuses_the_input(monkeypatch):
    """Without autograd there is nothing for the Newton step to attach: the inverse of a
    recomputed copy of the last output is the cached input, with no sequential pass."""
    t = Autoregressive(4, hidden_dims=(8,)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = t(x)
    passes = []
    sequential = Autoregressive._solve

    def counted(self, *args, **kwargs):
        passes.append(1)
        return sequential(self, *args, **kwargs)

    monkeypatch.setattr(Autoregressive, "_solve", counted)
    with torch.no_grad():
        x_again = t.inv(y.clone())
        ladj = t.inv.log_abs_det_jacobian(y, x_again)
    assert passes == []
    torch.testing.assert_close(x_again, x)
    torch.testing.assert_close(ladj, -t.log_abs_det_jacobian(x, y))
    with torch.no_grad():  # a point the flow did not produce: the sequential solve
        t.inv(torch.randn(5, 4, dtype=torch.float64))
    assert passes == [1]


BY_SCORES = ["iaf", "planar", "radial", "sylvester-o", "sylvester-h", "sylvester-t", "nsf-ar"]


@pytest.mark.parametrize("name", [*BY_SCORES, "realnvp", "cnf"])
def test_autoflow_stopped_density_equals_the_guide_rerun(name, monkeypatch):
    """AutoFlow's own stopped densities give the STL and DReG gradients of re-running the
    guide through Pyro with stopped parameters, in float64, on a model with a constrained
    site inside a plate (the placed sites' change of variables counts). The recipes whose
    layers all pull scores back take that path, the others the inverse with detached
    parameters."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    x = torch.tensor([1.5, 3.0], dtype=torch.float64)
    zero = torch.tensor(0.0, dtype=torch.float64)

    def model():
        loc = pyro.sample("loc", dist.Normal(zero, 2.0))
        with pyro.plate("groups", 2):
            scale = pyro.sample("scale", dist.LogNormal(zero, 1.0))
            pyro.sample("x", dist.Normal(loc, scale), obs=x)

    options = _options(name)
    guide = pf.AutoFlow(model, flow=name, num_layers=options.pop("num_layers", 2), **options)
    guide.double()
    guide()
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    by_inverse = []
    inverse = pf.AutoFlow._stopped_by_inverse
    for objective in (ELBO(4, "stl", max_plate_nesting=1), IWAE(4, "dreg", max_plate_nesting=1)):
        grads, losses = {}, {}
        for own in (True, False):
            if own:
                monkeypatch.setattr(
                    pf.AutoFlow, "_stopped_by_inverse",
                    lambda self, z: by_inverse.append(1) or inverse(self, z),
                )  # fmt: skip
            else:
                monkeypatch.setattr(pf.AutoFlow, "stopped_log_probs", None)
            guide.zero_grad(set_to_none=True)
            pyro.set_rng_seed(3)
            losses[own] = objective.loss_and_grads(model, guide)
            grads[own] = [p.grad.clone() for p in guide.parameters()]
        monkeypatch.undo()
        assert losses[True] == pytest.approx(losses[False], rel=1e-12)
        tol = {"rtol": 1e-6, "atol": 1e-8} if name == "cnf" else {"rtol": 1e-9, "atol": 1e-11}
        for a, b in zip(grads[True], grads[False], strict=True):
            torch.testing.assert_close(a, b, **tol)
        assert max(g.abs().max() for g in grads[True]) > 1e-3
    assert bool(by_inverse) == (name not in BY_SCORES)


@pytest.mark.parametrize("flow", [None, *BY_SCORES, "realnvp"])
def test_amortized_stopped_density_equals_the_guide_rerun(flow, monkeypatch):
    """The amortized guide's own stopped density (score pullback) gives the STL and DReG
    gradients of re-running it through Pyro with every parameter stopped (encoder, heads,
    flow), in float64, for a VAE-like model with a learned decoder; a recipe with a layer
    that has no pullback (realnvp's coupling) re-runs."""
    pyro.clear_param_store()
    torch.manual_seed(1)
    data = torch.randn(5, 4, dtype=torch.float64)
    decoder = torch.nn.Linear(DIM, 4).double()

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", len(x)):
            prior = dist.Normal(torch.zeros(DIM, dtype=torch.float64), 1.0).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Normal(decoder(z), 1.0).to_event(1), obs=x)

    encoder = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh())
    options = {} if flow is None else _options(flow)
    guide = pf.AmortizedFlowGuide(encoder, DIM, 6, flow, **options).double()
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    own = pf.AmortizedFlowGuide.stopped_log_probs
    used = []
    for objective in (ELBO(3, "stl", max_plate_nesting=1), IWAE(3, "dreg", max_plate_nesting=1)):
        grads = {}
        for mine in (True, False):
            if mine:

                def counted(self, trace):
                    out = own(self, trace)
                    used.append(out is not None)
                    return out

                monkeypatch.setattr(pf.AmortizedFlowGuide, "stopped_log_probs", counted)
            else:
                monkeypatch.setattr(pf.AmortizedFlowGuide, "stopped_log_probs", None)
            guide.zero_grad(set_to_none=True)
            decoder.zero_grad(set_to_none=True)
            pyro.set_rng_seed(2)
            objective.loss_and_grads(model, guide, data)
            grads[mine] = [p.grad.clone() for p in [*guide.parameters(), *decoder.parameters()]]
        monkeypatch.undo()
        for a, b in zip(grads[True], grads[False], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        assert min(g.abs().max() for g in grads[True]) > 1e-4  # every group moves
    assert all(used) == (flow != "realnvp") and used


@pytest.mark.parametrize("name", [*BY_SCORES, "realnvp"])
def test_stopped_log_prob_of_a_flow_equals_the_density_with_detached_parameters(
    name, monkeypatch
):
    """``stopped_log_prob`` of a fitted flow's own draws (the path ``pyroflows.fit`` takes
    for STL) has the value and the gradients of its density with detached parameters, in
    float64; a flow with a layer that has no pullback gives ``None``."""
    from pyroflows._scores import stopped_log_prob

    torch.manual_seed(3)
    options = _options(name)
    flow = pf.build(name, DIM, options.pop("num_layers", 2), **options).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    base = dist.Normal(torch.zeros(DIM, dtype=torch.float64), 1.5).to_event(1)
    q = dist.TransformedDistribution(base, [flow])
    x = q.rsample((6,))
    got = stopped_log_prob(q, x)
    if name not in BY_SCORES:
        assert got is None
        return
    detached = {f"0.{k}": v.detach() for k, v in flow.named_parameters()}

    class Density(torch.nn.ModuleList):
        def forward(self, value):
            return dist.TransformedDistribution(base, [self[0]]).log_prob(value)

    for family in (pf.transforms.Planar, pf.transforms.Sylvester, Autoregressive):
        monkeypatch.setattr(family, "_warm_starts", False)  # the full inverse, from scratch
    expected = torch.func.functional_call(Density([flow]), detached, (x,))
    monkeypatch.undo()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    target = (x.sin() * x).sum(-1)
    grads = torch.autograd.grad((got - target).sum(), list(flow.parameters()), retain_graph=True)
    want = torch.autograd.grad((expected - target).sum(), list(flow.parameters()))
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert min(g.abs().max() for g in grads) > 1e-4
