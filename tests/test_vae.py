"""The VAE: the fast loss equals Pyro's objective, every posterior trains and evaluates, a
flow posterior beats the diagonal one where the exact posterior is correlated, checkpoints,
resume and the non-finite guard."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from devices import GPU, needs_gpu
from torch import nn

import pyroflows as pf
from pyroflows.transforms.continuous import exact_traces
from pyroflows.vae import POSTERIORS, VAE, BinaryImages, evaluate, load, save_figures, train
from pyroflows.vae.train import BEST, CHECKPOINT, load_checkpoint

SMALL = {"latent_dim": 3, "hidden_dim": 16}
# short runs and few importance samples: the low-ESS warning is expected
pytestmark = pytest.mark.filterwarnings("ignore:log_marginal_likelihood:RuntimeWarning")


@pytest.fixture(scope="module")
def digits() -> BinaryImages:
    return load("digits")


def _tiny(data: BinaryImages, n: int = 120) -> BinaryImages:
    return BinaryImages(data.train[:n], data.valid[:40], data.test[:40], data.image_shape, "tiny")


@pytest.mark.parametrize(
    ("flow", "kl_weight", "free_bits"),
    [("iaf", 1.0, 0.0), ("iaf", 0.3, 0.0), ("iaf", 1.0, 2.0), ("iaf", 0.5, 50.0),
     ("none", 1.0, 0.0), ("sylvester-o", 0.5, 0.0), ("planar", 1.0, 2.0)],
)  # fmt: skip
def test_fast_loss_equals_the_pyro_objective_in_value_and_gradients(flow, kl_weight, free_bits):
    torch.manual_seed(0)
    vae = VAE((4, 4), flow=flow, num_layers=2, **SMALL).double()
    x = torch.bernoulli(torch.full((7, 16), 0.4, dtype=torch.float64))
    elbo = pf.infer.ELBO(kl_weight=kl_weight, free_bits=free_bits, max_plate_nesting=1)
    pyro.set_rng_seed(1)
    slow = elbo.differentiable_loss(vae.model, vae.guide, x)
    slow_grads = torch.autograd.grad(slow, list(vae.parameters()))
    pyro.set_rng_seed(1)
    fast = vae.loss(x, kl_weight=kl_weight, free_bits=free_bits)
    fast_grads = torch.autograd.grad(fast, list(vae.parameters()))
    torch.testing.assert_close(fast, slow)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b)
    assert all(g.abs().sum() > 0 for g in fast_grads)  # every parameter group is reached


@pytest.mark.parametrize("flow", ["none", "iaf", "planar", "sylvester-o", "cnf"])
def test_log_p_x_through_the_vae_own_weights_equals_the_traced_path(flow, monkeypatch):
    """``log_marginal_likelihood(vae.model, vae.guide, x)`` takes ``VAE.log_weights``, no
    Pyro trace: from the same seed it gives the traced path's estimates (the same draws),
    chunk by chunk; the same model wrapped in a function is traced."""
    torch.manual_seed(0)
    options = {"rtol": 1e-9, "atol": 1e-9} if flow == "cnf" else {}
    vae = VAE((4, 4), flow=flow, num_layers=1 if flow == "cnf" else 2, **SMALL, **options)
    vae = vae.double()
    x = torch.bernoulli(torch.full((5, 16), 0.4, dtype=torch.float64))
    calls = []
    own = VAE.log_weights
    monkeypatch.setattr(VAE, "log_weights", lambda self, *a: calls.append(1) or own(self, *a))
    settings = {"num_samples": 50, "chunk_size": 20, "max_plate_nesting": 1}
    pyro.set_rng_seed(1)
    direct = pf.infer.log_marginal_likelihood(vae.model, vae.guide, x, **settings)
    assert len(calls) == 3  # chunks of 20, 20 and 10
    pyro.set_rng_seed(1)
    traced = pf.infer.log_marginal_likelihood(lambda x: vae.model(x), vae.guide, x, **settings)
    assert len(calls) == 3
    for a, b in zip(direct, traced, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert direct.log_px.shape == (5,) and (direct.log_px > direct.elbo).all()


@pytest.mark.parametrize("traced", [False, True])
def test_log_p_x_encodes_each_batch_once_and_changes_no_estimate(traced, monkeypatch):
    """Across the chunks of one estimate the encoder runs once and each IAF layer binds its
    network once per context; the estimates are those of a run that repeats both per chunk."""
    torch.manual_seed(0)
    vae = VAE((4, 4), flow="iaf", num_layers=2, **SMALL).double()
    x = torch.bernoulli(torch.full((5, 16), 0.4, dtype=torch.float64))
    model = (lambda x: vae.model(x)) if traced else vae.model
    encodings, binds = [], []
    vae.guide.encoder.register_forward_hook(lambda *_: encodings.append(1))
    bind = pf.nn.MADE.bind
    monkeypatch.setattr(pf.nn.MADE, "bind", lambda *a, **k: binds.append(1) or bind(*a, **k))
    settings = {"num_samples": 50, "chunk_size": 10, "max_plate_nesting": 1}
    estimates = []
    for reuse in (True, False):
        if not reuse:  # every chunk encodes and binds afresh
            for module in (pf.transforms.base, pf.amortized):
                monkeypatch.setattr(module, "memo", lambda kind, key, compute: compute())
        encodings.clear(), binds.clear()
        pyro.set_rng_seed(1)
        estimates.append(pf.infer.log_marginal_likelihood(model, vae.guide, x, **settings))
        assert (len(encodings), len(binds)) == ((1, 2) if reuse else (5, 10))
    for a, b in zip(*estimates, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():  # outside an estimate nothing is reused
        vae.guide.posterior(x), vae.guide.posterior(x)
    assert len(encodings) == 7


@pytest.mark.parametrize("flow", POSTERIORS)
def test_every_posterior_trains_a_step_and_evaluates(flow, digits, tmp_path):
    options = {"num_layers": 1, "hidden_dims": (8,)} if flow == "cnf" else {"num_layers": 2}
    vae = VAE(digits.image_shape, flow=flow, **SMALL, **options)
    run = train(vae, _tiny(digits), epochs=1, batch_size=60, progress=False, out=tmp_path)
    assert run.stopped is None and len(run.history) == 1
    assert (tmp_path / CHECKPOINT).exists() and (tmp_path / BEST).exists()
    r = evaluate(vae, digits.test[:5], num_samples=20, chunk_size=8)
    assert r["nll"] <= r["neg_elbo"] + 1.0 and r["images"] == 5
    assert r["nll"] > 0


def test_batched_log_p_x_warns_once_for_all_its_batches(digits):
    torch.manual_seed(0)
    vae = VAE(digits.image_shape, latent_dim=8, flow="none", hidden_dim=16)  # untrained
    x = digits.test[:30]
    with pytest.warns(RuntimeWarning, match="importance ESS below 10") as caught:
        pf.distributed.log_marginal_likelihood(vae.model, vae.guide, x, num_samples=5,
                                               batch_size=10)  # fmt: skip
    (warning,) = [w for w in caught if "importance ESS" in str(w.message)]  # not one a batch
    assert warning.filename == __file__  # it points at the caller
    assert " of 30 estimate(s)" in str(warning.message)


def test_evaluation_chunks_default_to_about_2000_rows_on_a_cpu(digits, monkeypatch):
    """The same figures (to rounding) as chunks of 500, drawn 2000 // batch_size at a time."""
    torch.manual_seed(0)
    vae = VAE(digits.image_shape, flow="iaf", num_layers=2, **SMALL)
    x, seen = digits.test[:60], []
    original = pf.distributed.log_marginal_likelihood

    def spy(*args, **kwargs):
        seen.append(kwargs["chunk_size"])
        return original(*args, **kwargs)

    monkeypatch.setattr(pf.distributed, "log_marginal_likelihood", spy)
    default = evaluate(vae, x, num_samples=300, batch_size=50)
    large = evaluate(vae, x, num_samples=300, batch_size=50, chunk_size=500)
    assert seen == [40, 500]
    for key in ("neg_elbo", "nll", "nll_stderr"):
        assert default[key] == pytest.approx(large[key], rel=1e-5)


def test_a_cnf_trained_on_hutchinson_traces_is_evaluated_with_the_exact_trace(digits):
    """The bounds of a VAE whose CNF trains on Hutchinson's estimate are those of the same
    VAE with the exact trace (an estimated log-determinant would move them), and the layer
    keeps its own setting afterwards."""
    x = digits.test[:4]
    figures = {}
    for trace in ("exact", "hutchinson"):
        torch.manual_seed(0)
        vae = VAE(digits.image_shape, flow="cnf", num_layers=1, hidden_dims=(8,), trace=trace,
                  **SMALL)  # fmt: skip
        with torch.no_grad():  # dynamics away from zero, so the two traces differ
            for p in vae.guide.flow.parameters():
                p.add_(0.5 * torch.randn_like(p))
        figures[trace] = evaluate(vae, x, num_samples=16, chunk_size=8)
        layer = next(m for m in vae.modules() if isinstance(m, pf.transforms.Continuous))
        assert layer.trace == trace
        with torch.no_grad():
            q = vae.guide.posterior(x)
            z = q.sample((8,))
            estimated, exact = q.log_prob(z), None
            with exact_traces(vae):
                exact = q.log_prob(z)
        if trace == "hutchinson":
            assert (estimated - exact).abs().max() > 1e-3
    for key in ("neg_elbo", "nll"):
        assert figures["hutchinson"][key] == pytest.approx(figures["exact"][key], rel=1e-6)


def test_a_small_vae_on_the_digits_improves_its_elbo(digits, tmp_path):
    vae = VAE(digits.image_shape, flow="iaf", num_layers=1, latent_dim=4, hidden_dim=64)
    before = evaluate(vae, digits.test, num_samples=50)
    run = train(vae, digits, epochs=8, batch_size=32, lr=3e-3, optimizer="adam",
                warmup_epochs=2, progress=False)  # fmt: skip
    after = evaluate(vae, digits.test, num_samples=50)
    # most of the gain comes in the first epoch; measured 27.4 then 26.9-27.2 after it
    assert min(h["valid_loss"] for h in run.history[1:]) < run.history[0]["valid_loss"] - 0.2
    assert after["neg_elbo"] < before["neg_elbo"] - 15  # from about 45 nats to about 25
    assert [h["kl_weight"] for h in run.history][:2] == [0.5, 1.0]  # warm-up over 2 epochs
    paths = save_figures(vae, digits.test, tmp_path)
    assert [p.name for p in paths] == ["samples.png", "reconstructions.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def _correlated_data(n: int, seed: int) -> tuple[BinaryImages, nn.Linear]:
    """Images from a fixed decoder that reads only z1 + z2: the exact posterior is narrow
    along (1, 1) and as wide as the prior along (1, -1), so a diagonal Gaussian loses about
    1.6 nats per image to it while one affine autoregressive layer can match it."""
    g = torch.Generator().manual_seed(seed)
    decoder = nn.Linear(2, 64)
    with torch.no_grad():
        decoder.weight.copy_((torch.rand(64, 1, generator=g) * 4 + 2).expand(64, 2))
        decoder.weight[::2] *= -1
        decoder.bias.copy_(torch.randn(64, generator=g))
    decoder.requires_grad_(False)
    z = torch.randn(3 * n, 2, generator=g)
    x = torch.bernoulli(torch.sigmoid(decoder(z)), generator=g)
    return BinaryImages(x[:n], x[n : 2 * n], x[2 * n :], (8, 8), "correlated"), decoder


def _exact_nll(x: torch.Tensor, decoder: nn.Linear) -> float:
    """-log p(x) per image by quadrature over the 2-D latent space (float64)."""
    grid = torch.linspace(-7.0, 7.0, 301, dtype=torch.float64)
    z = torch.cartesian_prod(grid, grid)
    logits = nn.functional.linear(z, decoder.weight.double(), decoder.bias.double())
    x = x.double()
    log_lik = x @ nn.functional.logsigmoid(logits).T + (1 - x) @ nn.functional.logsigmoid(-logits).T
    log_prior = -0.5 * (z**2).sum(-1) - math.log(2 * math.pi)
    cell = 2 * math.log(grid[1] - grid[0])
    return -(torch.logsumexp(log_lik + log_prior, -1) + cell).mean().item()


def test_an_iaf_posterior_beats_the_diagonal_one_where_the_posterior_is_correlated():
    """With the true decoder fixed, -ELBO minus the exact -log p(x) is the posterior's own
    loss: about 1.6 nats for the best diagonal Gaussian (plus the encoder's), near 0 for one
    IAF layer, which can represent the correlation."""
    data, decoder = _correlated_data(600, seed=0)
    exact = _exact_nll(data.test, decoder)
    gap = {}
    for flow in ("none", "iaf"):
        torch.manual_seed(0)
        vae = VAE((8, 8), latent_dim=2, flow=flow, num_layers=1, hidden_dim=64)
        vae.decoder = decoder  # the true decoder, fixed: only q(z | x) learns
        train(vae, data, epochs=30, batch_size=50, lr=1e-2, optimizer="adam", progress=False)
        r = evaluate(vae, data.test, num_samples=500)
        gap[flow] = r["neg_elbo"] - exact
    assert abs(r["nll"] - exact) < 0.1  # IAF's importance-sampled NLL finds the exact one
    assert gap["none"] > 1.2 and gap["iaf"] < 0.7  # measured: 1.79 and 0.46


def test_resume_continues_bit_for_bit(digits, tmp_path):
    data = _tiny(digits)
    settings = {"batch_size": 40, "lr": 3e-3, "warmup_epochs": 2, "seed": 3, "progress": False}

    def fresh() -> VAE:
        torch.manual_seed(0)
        return VAE(data.image_shape, flow="iaf", num_layers=2, **SMALL)

    whole = train(fresh(), data, epochs=4, out=tmp_path / "whole", **settings)
    train(fresh(), data, epochs=2, out=tmp_path / "cut", **settings)
    torch.manual_seed(123)  # whatever happens between the two runs
    resumed = train(fresh(), data, epochs=4, out=tmp_path / "cut", resume=True, **settings)
    assert resumed.history == whole.history and resumed.best_epoch == whole.best_epoch
    a = torch.load(tmp_path / "whole" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)
    assert all(torch.equal(a["vae"][k], b["vae"][k]) for k in a["vae"])
    # the checkpoints record the epoch they were written at as the best where it was
    assert a["best_epoch"] == b["best_epoch"] == whole.best_epoch
    finished = train(fresh(), data, epochs=4, out=tmp_path / "whole", resume=True, **settings)
    assert finished.best_epoch == whole.best_epoch


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(digits, tmp_path):
    data = _tiny(digits)
    vae = VAE(data.image_shape, flow="planar", num_layers=2, **SMALL)
    train(vae, data, epochs=1, batch_size=40, out=tmp_path, progress=False)
    good = (tmp_path / CHECKPOINT).read_bytes()
    calls = 0
    original = vae.forward

    def poisoned(x, noise=None):
        nonlocal calls
        calls += 1
        likelihood, kl = original(x, noise)
        return (likelihood * float("nan") if calls == 2 else likelihood), kl

    vae.forward = poisoned
    run = train(vae, data, epochs=3, batch_size=40, out=tmp_path, resume=True, progress=False)
    assert run.stopped == "non-finite loss nan at epoch 2, step 2"
    assert (tmp_path / CHECKPOINT).read_bytes() == good
    assert all(torch.isfinite(p).all() for p in vae.parameters())


def test_a_non_finite_gradient_of_a_finite_loss_stops_before_the_step(digits, tmp_path):
    data = _tiny(digits)
    vae = VAE(data.image_shape, flow="planar", num_layers=2, **SMALL)
    train(vae, data, epochs=1, batch_size=40, out=tmp_path, progress=False)
    good = (tmp_path / CHECKPOINT).read_bytes()
    weight = vae.guide.encoder[0].weight
    before = weight.detach().clone()
    calls = 0

    def poisoned(grad):  # the third backward pass gives one infinite entry
        nonlocal calls
        calls += 1
        return grad.index_fill(0, torch.tensor([0]), math.inf) if calls == 3 else grad

    weight.register_hook(poisoned)
    run = train(vae, data, epochs=3, batch_size=40, out=tmp_path, resume=True, progress=False)
    assert run.stopped.startswith(
        "non-finite gradient of guide.encoder.0.weight at epoch 2, step 3; lower lr"
    )
    assert (tmp_path / CHECKPOINT).read_bytes() == good
    assert all(torch.isfinite(p).all() for p in vae.parameters())
    assert torch.equal(weight, before)  # the best, and only, epoch's parameters


def test_a_checkpoint_from_another_configuration_is_refused(digits, tmp_path):
    data = _tiny(digits)
    train(VAE(data.image_shape, flow="iaf", num_layers=2, **SMALL), data, epochs=1,
          out=tmp_path, progress=False)  # fmt: skip
    other = VAE(data.image_shape, flow="planar", num_layers=2, **SMALL)
    with pytest.raises(ValueError, match=r"different VAE .*flow: 'iaf' there, 'planar' here"):
        train(other, data, epochs=2, out=tmp_path, resume=True, progress=False)
    same = VAE(data.image_shape, flow="iaf", num_layers=2, **SMALL)
    with pytest.raises(ValueError, match=r"different settings .*lr: 0.0005 there, 0.01 here"):
        train(same, data, epochs=2, lr=1e-2, out=tmp_path, resume=True, progress=False)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"broken.pt' is not a readable checkpoint"):
        load_checkpoint(tmp_path / "broken.pt", same)
    with pytest.raises(FileNotFoundError, match=r"resume: no checkpoint.pt"):
        train(same, data, epochs=2, out=tmp_path / "empty", resume=True, progress=False)


def test_early_stopping_keeps_the_best_epoch(digits):
    vae = VAE(digits.image_shape, flow="none", **SMALL)
    run = train(vae, _tiny(digits, 40), epochs=60, batch_size=40, lr=3e-2, patience=2,
                optimizer="adam", progress=False)  # fmt: skip
    assert run.stopped is not None and run.stopped.startswith("early stop after epoch")
    assert len(run.history) == run.best_epoch + 2
    assert run.best_valid == min(h["valid_loss"] for h in run.history)


@pytest.mark.gpu
@needs_gpu
def test_training_and_evaluation_run_on_cuda(digits, tmp_path):
    data = _tiny(digits).to(GPU)
    vae = VAE(data.image_shape, flow="iaf", num_layers=2, **SMALL).to(GPU)
    run = train(vae, data, epochs=2, batch_size=40, out=tmp_path, progress=False)
    resumed = train(vae, data, epochs=3, batch_size=40, out=tmp_path, resume=True,
                    progress=False)  # fmt: skip
    assert len(resumed.history) == 3 and resumed.history[:2] == run.history
    r = evaluate(vae, data.test, num_samples=50)
    assert r["nll"] < r["neg_elbo"] + 1.0


def test_rnode_regularization_keeps_a_cnf_posterior_smooth(digits, tmp_path):
    """λ (kinetic energy + Jacobian Frobenius norm) per image joins the training loss: trained
    with it, the CNF's dynamics move and bend the draws far less than trained without; the
    layer keeps its own setting afterwards, and a checkpoint from before the setting existed
    resumes as λ = 0."""
    data = _tiny(digits)
    energy = {}
    for strength in (0.0, 10.0):
        torch.manual_seed(0)
        vae = VAE(data.image_shape, flow="cnf", num_layers=1, hidden_dims=(8,), **SMALL)
        out = tmp_path / str(strength)
        train(vae, data, epochs=2, batch_size=40, lr=1e-2, regularization=strength, out=out,
              progress=False)  # fmt: skip
        layer = next(m for m in vae.modules() if isinstance(m, pf.transforms.Continuous))
        assert not layer.regularize
        layer.regularize = True
        with torch.no_grad():
            vae(data.test)
        energy[strength] = sum(v.mean().item() for v in layer.regularization.values())
    assert energy[10.0] < 0.3 * energy[0.0]  # 0.10 of it here
    assert "nfe_mean" not in train(VAE(data.image_shape, flow="iaf", **SMALL), data,
                                   epochs=1, progress=False).history[0]  # fmt: skip
    state = torch.load(tmp_path / "0.0" / CHECKPOINT, weights_only=True)
    del state["settings"]["regularization"]
    torch.save(state, tmp_path / "0.0" / CHECKPOINT)
    run = train(vae, data, epochs=3, batch_size=40, lr=1e-2, out=tmp_path / "0.0", resume=True,
                progress=False)  # fmt: skip
    assert len(run.history) == 3
    with pytest.raises(ValueError, match="the 'iaf' posterior has no continuous layer"):
        train(VAE(data.image_shape, flow="iaf", **SMALL), data, regularization=0.1)


def test_the_vae_command_trains_evaluates_and_resumes(tmp_path, capsys):
    import json

    from pyroflows.cli import main

    out = tmp_path / "run"
    args = ["vae", "--data", "digits", "--flow", "planar", "--latent-dim", "2", "--hidden-dim",
            "16", "--batch-size", "200", "--eval-samples", "20", "--eval-images", "10",
            "--no-progress", "--out", str(out)]  # fmt: skip
    assert main([*args, "--epochs", "1"]) == 0
    assert "test NLL" in capsys.readouterr().out
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["epochs_run"] == 2 and report["test"]["images"] == 10
    assert report["vae"]["flow"] == "planar" and report["device"] == "cpu"
    for name in ("samples.png", "reconstructions.png", "training.png", "best.pt"):
        assert (out / name).exists()
    with pytest.raises(SystemExit):
        main([*args, "--data", str(tmp_path / "nothing")])
    assert "neither 'digits', 'mnist', nor an existing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--flow", "iaf", "--resume"])
    assert "different VAE (flow: 'planar' there, 'iaf' here)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--flow", "none", "--flow-hidden-dims", "8"])
    assert "--flow-hidden-dims: the posterior 'none' has no flow" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--cnf-rank", "4"])
    assert "--cnf-rank: the posterior 'planar' is not a CNF" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--cnf-trace", "hutchinson"])
    assert "--cnf-trace: the posterior 'planar' is not a CNF" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--cnf-regularization", "0.1"])
    assert "RNODE terms; the 'planar' posterior has no continuous layer" in capsys.readouterr().err


def test_the_vae_command_trains_a_cnf_on_hutchinson_traces(tmp_path):
    import json

    from pyroflows.cli import main

    out = tmp_path / "cnf"
    assert main(["vae", "--data", "digits", "--flow", "cnf", "--layers", "1", "--latent-dim",
                 "2", "--hidden-dim", "16", "--batch-size", "500", "--epochs", "1",
                 "--cnf-trace", "hutchinson", "--eval-samples", "4", "--eval-images", "4",
                 "--flow-hidden-dims", "8", "8", "--cnf-rank", "2", "--no-progress",
                 "--cnf-regularization", "0.1", "--out", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "results.json").read_text())
    assert report["vae"]["trace"] == "hutchinson" and report["test"]["images"] == 4
    assert report["vae"]["hidden_dims"] == [8, 8] and report["vae"]["rank"] == 2
    assert report["settings"]["regularization"] == 0.1
    epoch = report["history"][0]  # the solver's work per batch, for a CNF posterior
    assert epoch["nfe_max"] >= epoch["nfe_mean"] >= 8  # dopri5: 2 for the first step, 6 a step
