"""Reverse-KL fitting and the importance diagnostics, against answers known in closed form."""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from devices import GPU, needs_gpu
from torch.distributions import constraints

import pyroflows as pf
from pyroflows import diagnostics
from pyroflows.targets import IllConditionedGaussian

SMALL = {"num_layers": 4, "particles": 128, "num_eval": 2000, "progress": False}
SMALL_NET = {"hidden_dims": (32,)}


@pytest.mark.parametrize("estimator", ["standard", "stl"])
def test_fit_finds_log_z_of_a_rotated_ill_conditioned_gaussian(estimator):
    """Variances 0.1 to 10 along rotated axes: N(0, I) alone is a poor proposal, the fitted
    flow a near-exact one."""
    target = IllConditionedGaussian(2, condition=100)
    untrained = pf.fit(target, "realnvp", steps=1, **SMALL, **SMALL_NET)
    r = pf.fit(target, "realnvp", steps=300, estimator=estimator, **SMALL, **SMALL_NET)
    d = r.diagnostics
    assert untrained.diagnostics.ess < 0.3 * d.num_samples
    assert d.ess > 0.9 * d.num_samples and d.verdict == "good"
    assert abs(d.log_z - target.log_z) < 3 * d.log_z_stderr + 0.01
    assert len(r.losses) == 300 and r.losses[-1] < r.losses[0] and r.stopped is None
    x = r.sample((5,))
    assert x.shape == (5, 2) and r.q.log_prob(x).shape == (5,) and r.sample(4).shape == (4, 2)
    exact = r.against_exact(4000)
    assert exact["forward_kl"] < 0.02 and exact["sliced_wasserstein"] < 0.2


def test_one_wide_iaf_layer_fits_the_10d_funnel_with_a_good_verdict():
    """Neal's funnel, whose neck and mouth defeat flows at their defaults: one IAF layer of
    width 128 with STL, at fit's defaults otherwise, reaches k-hat < 0.5 (seeds 0-19:
    0.21-0.43, ESS 81-98 %) and log Z within 3 standard errors; the same layer after one
    step is judged unreliable."""
    target = pf.targets.target("funnel", 10)
    layer = {"num_layers": 1, "hidden_dims": (128, 128), "estimator": "stl", "progress": False}
    with pytest.warns(RuntimeWarning, match="k-hat"):
        untrained = pf.fit(target, "iaf", steps=1, **layer)
    r = pf.fit(target, "iaf", **layer)
    d = r.diagnostics
    assert untrained.diagnostics.verdict == "unreliable"
    assert d.verdict == "good" and d.ess > 0.7 * d.num_samples and r.stopped is None
    assert abs(d.log_z - target.log_z) < 3 * d.log_z_stderr + 0.01


def test_forward_kl_against_exact_draws_shows_the_mode_a_reverse_kl_fit_dropped():
    """Two modes 24 standard deviations apart: the fit keeps one, PSIS sees nothing wrong
    (k-hat below 0.7), the forward KL from exact draws is in the hundreds."""
    two = pf.targets.GaussianMixture(torch.tensor([[-6.0, 0.0], [6.0, 0.0]]), 0.5)
    r = pf.fit(two, "realnvp", steps=300, **SMALL, **SMALL_NET)
    exact = r.against_exact(4000)
    assert r.diagnostics.k_hat < 0.7
    assert exact["forward_kl"] > 10 and exact["sliced_wasserstein"] > 1
    with pytest.raises(ValueError, match=r"needs a pyroflows\.targets\.Target"):
        pf.fit(lambda x: -x.square().sum(-1), "planar", dim=2, steps=1, **SMALL).against_exact()


def test_fit_takes_names_and_functions_and_checks_its_arguments():
    r = pf.fit("banana", "planar", num_layers=2, steps=5, num_eval=200, progress=False)
    assert r.diagnostics.num_samples == 200
    with pytest.raises(ValueError, match="dim is required"):
        pf.fit(lambda x: -x.square().sum(-1), steps=1)
    with pytest.raises(ValueError, match="flow must be one of"):
        pf.fit("banana", "spline")
    with pytest.raises(ValueError, match="dim is 3 but the target's dimension is 2"):
        pf.fit(IllConditionedGaussian(2), dim=3)
    with pytest.raises(ValueError, match="estimator must be one of"):
        pf.fit("banana", estimator="iwae")
    with pytest.raises(ValueError, match="'dreg' applies to Pyro models"):
        pf.fit("banana", estimator="dreg")
    with pytest.raises(ValueError, match="target must be a target name"):
        pf.fit(3.0)
    with pytest.raises(ValueError, match=r"must return a tensor of shape \(128,\)"):
        pf.fit(lambda x: x.sum(), dim=2, steps=1, **SMALL)


def test_draws_outside_the_support_stop_the_fit_and_say_where():
    """A half-normal in x0 (log p = -inf for x0 < 0): reverse KL is infinite there."""

    def half(x):
        return torch.where(x[..., 0] > 0, -0.5 * x.square().sum(-1), -math.inf)

    with pytest.warns(RuntimeWarning, match="outside its support"):
        r = pf.fit(half, "realnvp", dim=2, steps=100, **SMALL, **SMALL_NET)
    assert r.losses == [] and "of step 0, e.g. x = [-" in r.stopped
    # importance sampling itself is fine with p = 0 at some draws: weight zero
    half_normal_log_z = 0.5 * math.log(2 * math.pi) * 2 - math.log(2)
    d = r.diagnostics
    assert d.nonfinite == 0 and abs(d.log_z - half_normal_log_z) < 3 * d.log_z_stderr


def test_nan_in_the_log_density_stops_before_the_update_and_keeps_the_parameters():
    calls = []

    def broken(x):
        calls.append(1)
        log_p = -0.5 * x.square().sum(-1)
        if len(calls) == 3:  # the third step meets a NaN
            log_p = torch.where(x[..., 0] > 1, math.nan, log_p)
        return log_p

    torch.manual_seed(0)
    stop = r"fit stopped: log p is nan at \d+ draw\(s\) of step 2"
    with pytest.warns(RuntimeWarning, match=stop):
        r = pf.fit(broken, "planar", dim=2, steps=10, **SMALL)
    assert len(r.losses) == 2 and "e.g. x = [" in r.stopped
    assert all(torch.isfinite(p).all() for p in r.q.transforms[0].parameters())


def test_psis_reading_of_known_proposals():
    """q = N(0, 2²) for p ∝ N(0, 1): light-tailed weights; q = N(0, 1) for p ∝ N(0, 3²):
    weights w ∝ exp(4x²/9) with Pareto tail k = 8/9, above the 0.7 line."""
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(20_000, generator=g)
    good = diagnostics.importance_diagnostics(
        -0.5 * x**2, torch.distributions.Normal(0.0, 2.0).log_prob(x)
    )
    assert good.verdict == "good"
    assert abs(good.log_z - 0.5 * math.log(2 * math.pi)) < 3 * good.log_z_stderr
    y = torch.randn(20_000, generator=g)
    with pytest.warns(RuntimeWarning, match="PSIS k-hat .* > 0.7"):
        bad = diagnostics.importance_diagnostics(
            -(y**2) / 18, torch.distributions.Normal(0.0, 1.0).log_prob(y)
        )
    assert bad.verdict == "unreliable" and bad.k_hat > 0.7
    assert "unreliable" in str(bad)


def test_a_proposal_equal_to_the_target_up_to_z():
    """log p - log q constant: uniform weights, log Z that constant exactly, every draw
    effective (arviz's Pareto fit of equal ratios is left out: it says k = inf)."""
    log_q = torch.distributions.Normal(0.0, 1.0).log_prob(torch.linspace(-3, 3, 500))
    result = diagnostics.importance_diagnostics(log_q + 1.25, log_q)
    assert result.log_z == pytest.approx(1.25, abs=1e-12) and result.log_z_stderr == 0.0
    assert result.ess == pytest.approx(500) and result.verdict == "good"
    log_w, k_hat = diagnostics.psis(torch.full((4,), 0.3))
    assert k_hat == -math.inf and torch.allclose(log_w, torch.full((4,), -math.log(4)))


def test_diagnostics_refuse_bad_shapes_and_empty_weights():
    with pytest.raises(ValueError, match="log_p and log_q must be 1-D tensors of the same"):
        diagnostics.importance_diagnostics(torch.zeros(5), torch.zeros(5, 1))
    with pytest.raises(ValueError, match="need at least 2 draws where p > 0"):
        diagnostics.importance_diagnostics(torch.tensor([0.0, -math.inf, math.nan]),
                                           torch.zeros(3))  # fmt: skip
    with pytest.raises(ValueError, match=r"x and y must be samples of the same shape \(n, dim\)"):
        diagnostics.sliced_wasserstein(torch.zeros(10, 2), torch.zeros(10, 3))


def test_resampling_moves_draws_towards_the_target():
    """Draws of N(0, 2²) resampled for p ∝ N(1, 1): mean near 1, sd near 1."""
    g = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(20_000, 1, generator=g)
    log_q = torch.distributions.Normal(0.0, 2.0).log_prob(x[:, 0])
    log_p = -0.5 * (x[:, 0] - 1) ** 2
    torch.manual_seed(0)
    out = diagnostics.resample(x, log_p, log_q, 20_000)
    assert out.shape == (20_000, 1)
    assert abs(out.mean().item() - 1) < 0.05 and abs(out.std().item() - 1) < 0.05


def test_inference_data_holds_the_draws_and_their_weights():
    r = pf.fit("banana", "planar", num_layers=2, steps=5, num_eval=300, progress=False)
    idata = r.to_inference_data()
    assert idata.posterior["x"].shape == (1, 300, 2)
    assert set(idata.sample_stats.data_vars) == {"log_p", "log_q", "log_importance_ratio"}
    assert r.resample(50).shape == (50, 2)


def logistic_model(x, y):
    w = pyro.sample("w", dist.Normal(0.0, 5.0))
    b = pyro.sample("b", dist.Normal(0.0, 5.0))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Bernoulli(logits=w * x + b), obs=y)


def test_fit_of_a_pyro_model_matches_the_posterior_means_by_quadrature():
    """Logistic regression on an uncentred covariate: slope and intercept strongly
    correlated, a posterior that N(0, I) pushed by loc and scale alone cannot match."""
    torch.manual_seed(0)
    x = 3 + torch.randn(60)
    y = torch.bernoulli(torch.sigmoid(1.5 * (x - 3) + 0.5))
    w_axis = torch.linspace(-3, 6, 601, dtype=torch.float64)
    b_axis = torch.linspace(-20, 10, 601, dtype=torch.float64)
    w, b = torch.meshgrid(w_axis, b_axis, indexing="ij")
    prior = dist.Normal(0.0, 5.0)
    log_joint = prior.log_prob(w) + prior.log_prob(b)
    log_joint = log_joint + dist.Bernoulli(
        logits=w[..., None] * x.double() + b[..., None]
    ).log_prob(y.double()).sum(-1)
    p = (log_joint - log_joint.max()).exp()
    p = p / p.sum()
    exact = {"w": (p * w).sum().item(), "b": (p * b).sum().item()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = pf.fit(logistic_model, "realnvp", model_args=(x, y), steps=200, particles=32,
                   lr=1e-2, num_eval=2000, progress=False)  # fmt: skip
    assert isinstance(r.guide, pf.AutoFlow) and r.diagnostics.ess > 1000
    draws = r.resample(2000)
    assert abs(draws["w"].mean().item() - exact["w"]) < 0.1  # posterior sd 0.4
    assert abs(draws["b"].mean().item() - exact["b"]) < 0.3  # posterior sd 1.2
    idata = r.to_inference_data()
    assert idata.posterior["w"].shape == (1, 2000) and r.sample(7)["b"].shape == (7,)


def test_a_factor_model_with_improper_sites_fits_as_written():
    """x ~ ImproperUniform(R²), s ~ ImproperUniform(R+), factor log N(x; 0, I) - s:
    Z = 2π · 1, through AutoFlow's default placement (which cannot sample these sites)."""

    def model():
        x = pyro.sample("x", dist.ImproperUniform(constraints.real, (), (2,)))
        s = pyro.sample("s", dist.ImproperUniform(constraints.positive, (), ()))
        pyro.factor("density", -0.5 * x.square().sum(-1) - s)

    for estimator in ("stl", "dreg"):
        r = pf.fit(model, "realnvp", steps=300, particles=32, lr=1e-2, num_eval=2000,
                   estimator=estimator, progress=False)  # fmt: skip
        d = r.diagnostics
        assert abs(d.log_z - math.log(2 * math.pi)) < 3 * d.log_z_stderr + 0.02
        assert (r.sample((100,))["s"] > 0).all()


def test_sample_command_writes_draws_diagnostics_and_figures(tmp_path, capsys, monkeypatch):
    import json

    import arviz as az

    from pyroflows.cli import main

    fits, fit = [], pf.fit  # the command's fits, to see the networks it built
    monkeypatch.setattr(pf, "fit", lambda *a, **k: fits.append(fit(*a, **k)) or fits[-1])

    for name, dim, flow in (("banana", None, "planar"), ("funnel", 3, "iaf")):
        out = tmp_path / name
        args = ["sample", "--target", name, "--flow", flow, "--layers", "2", "--steps", "5"]
        args += ["--hidden-dims", "7", "5"] if flow == "iaf" else []
        args += ["--num-eval", "300", "--out", str(out)] + (["--dim", str(dim)] if dim else [])
        args += ["--repeats", "2"] if dim is None else []
        with warnings.catch_warnings():  # five steps: a poor fit, which may warn
            warnings.simplefilter("ignore", RuntimeWarning)
            assert main(args) == 0
        printed = capsys.readouterr().out
        assert "PSIS k-hat" in printed and "standard errors" in printed
        report = json.loads((out / "diagnostics.json").read_text())
        assert report["verdict"] in ("good", "usable", "unreliable") and report["steps"] == 5
        assert report["hidden_dims"] == ([7, 5] if flow == "iaf" else None)
        if flow == "iaf":
            net = fits[-1].q.transforms[0].parts[0].net
            assert (net.mask0.shape[0], net.mask1.shape[0]) == (7, 5)
        assert {"forward_kl", "sliced_wasserstein", "k_hat", "ess"} <= set(report)
        idata = az.from_netcdf(str(out / "samples.nc"))
        assert idata.posterior["x"].shape == (1, 300, dim or 2)
        assert (out / "fit.png").stat().st_size > 0 and (out / "loss.png").stat().st_size > 0
        if dim is None:  # two seeds: their k-hats, listed and plotted
            assert [run["seed"] for run in report["repeats"]] == [0, 1]
            assert (out / "k_hat.png").stat().st_size > 0 and "k-hat, seeds" in printed


def test_sample_command_refuses_bad_input(capsys):
    from pyroflows.cli import main

    with pytest.raises(SystemExit):
        main(["sample", "--target", "nowhere", "--out", "x"])
    assert "invalid choice: 'nowhere' (choose from 'u1'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--target", "u1", "--dim", "3", "--out", "x"])
    assert "fixed dimension" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--target", "u1", "--flow", "planar", "--hidden-dims", "8", "--out", "x"])
    assert "--hidden-dims: the recipe 'planar' has no network" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--target", "u1", "--flow", "planar", "--cnf-regularization", "0.1",
              "--out", "x"])  # fmt: skip
    assert "the 'planar' flow has no continuous layer" in capsys.readouterr().err


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("flow", ["realnvp", "iaf", "cnf"])
def test_fit_on_cuda(flow):
    options = {"rtol": 1e-3, "atol": 1e-4, "regularization": 0.01} if flow == "cnf" else {}
    r = pf.fit("funnel", flow, dim=4, steps=5, num_eval=100, progress=False, device=GPU,
               estimator="stl", **options)  # fmt: skip
    assert r.sample((3,)).device.type == GPU and len(r.losses) == 5


def test_fits_of_models_keep_the_param_store_and_do_not_clash():
    pyro.param("users_own", torch.ones(2))

    def one():
        pyro.sample("a", dist.Normal(0.0, 1.0))

    def three():
        pyro.sample("a", dist.Normal(0.0, 1.0).expand([3]).to_event(1))

    options = {"steps": 5, "particles": 4, "num_eval": 50, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pf.fit(one, "planar", **options)
        r = pf.fit(three, "planar", **options)  # same site name, another shape
    assert r.sample((2,))["a"].shape == (2, 3)
    assert torch.equal(pyro.param("users_own"), torch.ones(2))


def test_tempering_goes_from_the_base_to_the_target():
    """With ``warmup_steps`` the early steps fit ``p^β N(0, I)^(1-β)``: at β near 0 the flow
    stays near its base (it would spread without bound on ``p^β`` alone) and the fit ends as
    good as one without tempering."""
    target = IllConditionedGaussian(2, condition=100)
    early = pf.fit(target, "realnvp", steps=20, warmup_steps=2000, seed=0, **SMALL, **SMALL_NET)
    spread = early.sample(4000).std(0)
    assert (spread > 0.7).all() and (spread < 1.5).all()  # N(0, I) give or take
    r = pf.fit(target, "realnvp", steps=400, warmup_steps=200, seed=0, **SMALL, **SMALL_NET)
    assert r.diagnostics.ess > 0.9 * r.diagnostics.num_samples
    assert abs(r.diagnostics.log_z - target.log_z) < 3 * r.diagnostics.log_z_stderr + 0.01


def _rnode_terms(module: torch.nn.Module) -> float:
    """The mean kinetic energy plus Jacobian norm of the 2-D CNF in ``module`` over fixed
    draws, after checking that training left its settings as they were."""
    layer = next(m for m in module.modules() if isinstance(m, pf.transforms.Continuous))
    assert not layer.regularize and not layer.first_terms_only
    layer.regularize = True
    with torch.no_grad():
        layer(torch.randn(500, 2, generator=torch.Generator().manual_seed(1)))
    return sum(v.mean().item() for v in layer.regularization.values())


def test_rnode_regularization_smooths_a_cnf_and_stays_out_of_the_loss():
    """λ (kinetic energy + Jacobian Frobenius norm) per draw joins the gradient: fitted with
    it, the CNF moves and bends its draws far less, with STL too (whose stopped density
    solves again); the recorded loss is the objective alone (the first step, before any
    update, records the same value with and without λ), and the layer keeps its own
    setting afterwards."""
    runs, energy = {}, {}
    for strength, estimator in ((0.0, "standard"), (1.0, "standard"), (1.0, "stl")):
        r = pf.fit("banana", "cnf", steps=60, particles=64, num_eval=200, estimator=estimator,
                   regularization=strength, seed=0, progress=False)  # fmt: skip
        runs[strength, estimator] = r
        energy[strength, estimator] = _rnode_terms(r.q.transforms[0])
    for estimator in ("standard", "stl"):
        assert energy[1.0, estimator] < 0.3 * energy[0.0, "standard"], estimator
    regularized, plain = runs[1.0, "standard"].losses, runs[0.0, "standard"].losses
    assert regularized[0] == plain[0]  # the same solve: the terms ride along; λ R is 0.03
    assert regularized[-1] != pytest.approx(plain[-1], rel=1e-3)
    with pytest.raises(ValueError, match="the 'realnvp' flow has no continuous layer"):
        pf.fit("banana", "realnvp", regularization=0.1)
    with pytest.raises(ValueError, match="regularization must be a non-negative"):
        pf.fit("banana", "cnf", regularization=-1.0)


def test_rnode_regularization_of_a_pyro_models_cnf_guide():
    """The terms come from the solve that drew the particles, with every estimator (STL and
    DReG solve again for their stopped density, whose terms would carry no gradient to the
    dynamics): the fitted dynamics move far less, and the first recorded loss is the
    objective alone."""

    def model():
        x = pyro.sample("x", dist.Normal(0.0, 3.0))
        pyro.sample("y", dist.Normal(0.0, torch.exp(x / 2)))

    runs, energy = {}, {}
    for strength, estimator in ((0.0, "standard"), (1.0, "standard"), (1.0, "stl"),
                                (1.0, "dreg")):  # fmt: skip
        r = pf.fit(model, "cnf", steps=40, particles=32, num_eval=200, estimator=estimator,
                   regularization=strength, seed=0, progress=False)  # fmt: skip
        runs[strength, estimator] = r
        energy[strength, estimator] = _rnode_terms(r.guide)
    for estimator in ("standard", "stl", "dreg"):  # 0.07-0.14 of it here
        assert energy[1.0, estimator] < 0.3 * energy[0.0, "standard"], estimator
    assert runs[1.0, "standard"].losses[0] == runs[0.0, "standard"].losses[0]


def test_sample_command_passes_the_cnf_regularization(tmp_path, monkeypatch):
    import json

    from pyroflows.cli import main

    calls, fit = [], pf.fit
    monkeypatch.setattr(pf, "fit", lambda *a, **k: calls.append(k) or fit(*a, **k))
    with warnings.catch_warnings():  # three steps: a poor fit, which may warn
        warnings.simplefilter("ignore", RuntimeWarning)
        assert main(["sample", "--target", "banana", "--flow", "cnf", "--steps", "3",
                     "--cnf-regularization", "0.1", "--num-eval", "200", "--out",
                     str(tmp_path)]) == 0  # fmt: skip
    assert calls[0]["regularization"] == 0.1
    assert json.loads((tmp_path / "diagnostics.json").read_text())["regularization"] == 0.1


def test_the_diagnostics_of_a_cnf_trained_on_hutchinson_estimates_use_its_exact_trace():
    """The evaluation draws are weighed with the exact log q (an estimated log-determinant
    would bias log Z and k-hat): the recorded log q of each draw is its density recomputed
    with the exact trace, and the layer keeps its training setting."""
    with warnings.catch_warnings():  # five steps: a poor fit, which warns
        warnings.simplefilter("ignore", RuntimeWarning)
        r = pf.fit("banana", "cnf", steps=5, particles=32, num_eval=200, trace="hutchinson",
                   progress=False)  # fmt: skip
    layer = next(m for m in r.q.transforms[0].modules() if isinstance(m, pf.transforms.Continuous))
    assert layer.trace == "hutchinson"
    x, _, log_q = r._evaluation()
    with torch.no_grad():
        layer.trace = "exact"
        torch.testing.assert_close(log_q, r.q.log_prob(x.clone()), rtol=1e-4, atol=1e-4)
