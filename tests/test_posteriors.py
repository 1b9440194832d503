"""The Pyro-model posteriors: the same log joint vectorized over particles as one draw at a
time, and usable through fit and the sample command."""

from __future__ import annotations

import json

import pyro
import pytest
import torch
from pyro import poutine

import pyroflows as pf
from pyroflows.infer import weights as w
from pyroflows.posteriors import POSTERIORS, SCHOOLS_SIGMA


@pytest.mark.parametrize("name", list(POSTERIORS))
def test_vectorized_particles_give_each_draw_its_own_log_joint(name):
    model = POSTERIORS[name]()
    guide = pf.AutoFlow(model, "planar")
    guide()
    nesting = w.plate_nesting(model, guide, (), {})
    model_trace, _ = w.traces(model, guide, (), {}, 3, nesting)
    sites = [s for s in model_trace.nodes.values() if s["type"] == "sample"]
    vectorized = sum(w._site_sum([s], frozenset(), nesting).reshape(3) for s in sites)
    one_draw = poutine.trace(model).get_trace().nodes
    latents = {s["name"]: one_draw[s["name"]]["value"].shape for s in sites if not s["is_observed"]}
    for i in range(3):
        values = {
            n: model_trace.nodes[n]["value"].reshape(3, *shape)[i] for n, shape in latents.items()
        }
        one = poutine.trace(poutine.condition(model, values)).get_trace()
        torch.testing.assert_close(one.log_prob_sum(), vectorized[i], rtol=1e-5, atol=1e-3)


def test_sample_command_fits_a_posterior(tmp_path, capsys):
    from pyroflows.cli import main

    out = tmp_path / "schools"
    args = ["sample", "--target", "eight-schools", "--steps", "5", "--particles", "8"]
    assert main([*args, "--num-eval", "200", "--out", str(out)]) == 0
    assert "eight-schools (dim 10)" in capsys.readouterr().out
    report = json.loads((out / "diagnostics.json").read_text())
    assert report["dim"] == 10 and report["exact_log_z"] is None
    assert (out / "samples.nc").exists() and (out / "loss.png").exists()


def test_a_fitted_autoflow_preconditions_nuts_through_neutra():
    """Pyro's NeuTraReparam with the fitted AutoFlow: NUTS runs in the flow's base space and
    the transformed draws follow the funnel (v ~ N(0, 3²))."""
    import pyro.distributions as dist
    from pyro.infer import MCMC, NUTS
    from pyro.infer.reparam import NeuTraReparam

    def funnel():
        v = pyro.sample("v", dist.Normal(0.0, 3.0))
        pyro.sample("x", dist.Normal(torch.zeros(2), (v / 2).exp().unsqueeze(-1)).to_event(1))

    r = pf.fit(funnel, "iaf", num_layers=2, steps=300, particles=32, lr=1e-2, num_eval=500,
               estimator="stl", progress=False)  # fmt: skip
    neutra = NeuTraReparam(r.guide.requires_grad_(False))
    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(neutra.reparam(funnel)), num_samples=300, warmup_steps=150,
                disable_progbar=True)  # fmt: skip
    mcmc.run()
    (latent,) = mcmc.get_samples().values()
    v = neutra.transform_sample(latent)["v"]
    assert v.shape == (300,) and abs(v.mean().item()) < 1.0 and 2.0 < v.std().item() < 4.0


@pytest.mark.parametrize("guide_kind", ["autoflow", "pyro-autonormal"])
def test_inference_data_of_any_guide_works_with_arviz(guide_kind, tmp_path):
    import arviz as az
    import matplotlib
    from pyro.infer.autoguide import AutoNormal

    from pyroflows.diagnostics import to_inference_data

    matplotlib.use("Agg")
    model = POSTERIORS["eight-schools"]()
    guide = pf.AutoFlow(model, "planar") if guide_kind == "autoflow" else AutoNormal(model)
    guide()
    idata = to_inference_data(model, guide, num_samples=300, chunk_size=128,
                              posterior_predictive=True)  # fmt: skip
    theta = idata.posterior["theta_tilde"]
    assert theta.dims == ("chain", "draw", "schools") and theta.shape == (1, 300, 8)
    assert idata.posterior["tau"].shape == (1, 300) and (idata.posterior["tau"] > 0).all()
    assert idata.observed_data["y"].dims == ("schools",)
    replicates = idata.posterior_predictive["y"]
    assert replicates.dims == ("chain", "draw", "schools") and replicates.shape == (1, 300, 8)
    # each replicate is y ~ N(mu + tau theta_tilde, sigma²) at its own draw
    post = {k: torch.as_tensor(idata.posterior[k].values[0]) for k in ("mu", "tau", "theta_tilde")}
    centre = post["mu"].unsqueeze(-1) + post["tau"].unsqueeze(-1) * post["theta_tilde"]
    noise = (torch.as_tensor(replicates.values[0]) - centre) / torch.tensor(SCHOOLS_SIGMA)
    assert abs(noise.mean().item()) < 0.1 and 0.9 < noise.std().item() < 1.1
    assert idata.sample_stats["log_importance_ratio"].shape == (1, 300)
    assert "pareto_k" in idata.posterior.attrs or "pareto_k" in idata.attrs
    summary = az.summary(idata, var_names=["mu", "tau"], kind="stats")
    assert list(summary.index) == ["mu", "tau"]
    az.plot_posterior(idata, var_names=["mu"])
    az.plot_pair(idata, var_names=["mu", "tau"])
    az.plot_ppc(idata, data_pairs={"y": "y"}, num_pp_samples=50)
    matplotlib.pyplot.close("all")
    path = tmp_path / "schools.nc"
    idata.to_netcdf(str(path))
    again = az.from_netcdf(str(path))
    torch.testing.assert_close(
        torch.as_tensor(again.posterior["theta_tilde"].values),
        torch.as_tensor(theta.values),
    )


def test_logistic_regression_means_from_the_flow_agree_with_nuts():
    """The 31-D breast-cancer posterior: the fitted flow's means and spreads agree with a short
    NUTS run, coordinate by coordinate, to within 0.4 posterior standard deviations (NUTS's
    own Monte Carlo error on 300 draws is about 0.06) and 0.6-1.3x the spread. The prior
    (mean 0, spread 1) fails both: the posterior means lie up to several spreads from 0."""
    from pyro.infer import MCMC, NUTS

    model = POSTERIORS["logistic-regression"]()
    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(model), num_samples=300, warmup_steps=200, disable_progbar=True)
    mcmc.run()
    exact = mcmc.get_samples()
    exact = torch.cat([exact["w"], exact["b"].unsqueeze(-1)], -1)
    mean, spread = exact.mean(0), exact.std(0)
    assert (mean.abs() / spread).max() > 2.0  # the prior would not pass

    r = pf.fit(model, "iaf", steps=500, particles=16, lr=1e-2, num_eval=1000, estimator="stl",
               progress=False)  # fmt: skip
    drawn = r.sample(2000)
    drawn = torch.cat([drawn["w"], drawn["b"].unsqueeze(-1)], -1)
    assert ((drawn.mean(0) - mean).abs() / spread).max() < 0.4
    ratio = drawn.std(0) / spread
    assert ratio.min() > 0.6 and ratio.max() < 1.3
