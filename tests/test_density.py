"""Maximum-likelihood fitting of flows to data: known densities, dequantization and its
bound, conditional estimates, checkpoints, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from devices import GPU, needs_gpu
from torch.utils.data import DataLoader, TensorDataset

import pyroflows as pf
from pyroflows.density import DensityModel, Dequantization, fit_data, load_checkpoint
from pyroflows.density.data import load
from pyroflows.targets import Banana, GaussianMixture

QUICK = {"epochs": 2, "batch_size": 64}


def _gaussian_fit_gap(train: torch.Tensor, test: torch.Tensor, true_log_p: torch.Tensor) -> float:
    """The held-out gap E[log p - log q] of a Gaussian fitted by moments: what a flow that
    does no work would reach."""
    normal = torch.distributions.MultivariateNormal(train.mean(0), torch.cov(train.T))
    return (true_log_p - normal.log_prob(test)).mean().item()


def test_held_out_likelihood_approaches_the_true_density():
    torch.manual_seed(0)
    target = Banana(2)
    train, test = target.sample((4000,)), target.sample((2000,))
    true = target.log_prob(test)  # normalised (log Z = 0)
    result = fit_data(train, "maf", num_layers=4, hidden_dims=(32, 32), progress=False,
                      epochs=40, batch_size=200, lr=3e-3)  # fmt: skip
    with torch.no_grad():
        gap = (true - result.model.log_prob(test)).mean().item()
    assert 0 < gap < 0.1, gap  # KL(p || q) estimate: small, and not negative beyond noise
    assert _gaussian_fit_gap(train, test, true) > 0.5  # the flow had real work to do


def test_forward_kl_covers_every_mode():
    torch.manual_seed(1)
    target = GaussianMixture(torch.tensor([[-4.0, 0.0], [4.0, 0.0]]), 0.5)
    result = fit_data(target.sample((3000,)), "realnvp", num_layers=6, progress=False,
                      epochs=30, batch_size=200, lr=3e-3)  # fmt: skip
    right = (result.model.sample(4000)[:, 0] > 0).float().mean().item()
    assert 0.35 < right < 0.65  # both modes keep mass (true 0.5)


def test_conditional_density_learns_its_context():
    torch.manual_seed(2)

    def draw(n):
        c = 2 * torch.rand(n, 1) - 1
        x = torch.cat([2 * c, -c], -1) + 0.3 * torch.randn(n, 2)
        true = torch.distributions.Normal(torch.cat([2 * c, -c], -1), 0.3).log_prob(x).sum(-1)
        return x, c, true

    x, c, _ = draw(3000)
    test_x, test_c, true = draw(1000)
    conditional = fit_data(x, "maf", context=c, num_layers=2, progress=False,
                           epochs=25, batch_size=200, lr=3e-3)  # fmt: skip
    plain = fit_data(x, "maf", num_layers=2, progress=False,
                     epochs=25, batch_size=200, lr=3e-3)  # fmt: skip
    with torch.no_grad():
        gap = (true - conditional.model.log_prob(test_x, test_c)).mean().item()
        plain_gap = (true - plain.model.log_prob(test_x)).mean().item()
    assert gap < 0.1 and plain_gap > 0.5, (gap, plain_gap)
    assert conditional.model.sample(3, test_c[:5]).shape == (3, 5, 2)


def test_batches_with_a_context_build_a_conditional_model():
    x, c = torch.randn(200, 2), torch.randn(200, 3)
    loader = DataLoader(TensorDataset(x, c), batch_size=50, shuffle=True)
    result = fit_data(loader, "realnvp", num_layers=2, progress=False, **QUICK)
    assert result.model.context_dim == 3 and len(result.history) == 2
    assert "valid_nll" not in result.history[0]  # no held-out set: every epoch, no stopping
    plain = fit_data(DataLoader(x, batch_size=50), "maf", valid=x[:20], num_layers=1,
                     progress=False, **QUICK)  # fmt: skip
    assert "valid_nll" in plain.history[0]


@pytest.mark.parametrize("alpha", [0.0, 0.05])
def test_dequantization_bound_converges_to_the_cell_probability(alpha):
    """P(x) = ∫ p(v) dv over the cell [x/L, (x+1)/L], by quadrature of the model's own density
    (a nonlinear 1-D flow with perturbed parameters), against the importance-weighted bound
    at large K: consistent only with the change of scale -D log L and the logit's Jacobian."""
    torch.manual_seed(3)
    levels = 5
    model = DensityModel(1, "planar", 3, dequantize="uniform", levels=levels, alpha=alpha)
    model.double().standardize(torch.arange(5.0, dtype=torch.float64).repeat(20)[:, None])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x = torch.tensor([[0.0], [2.0], [4.0]], dtype=torch.float64)
    v = (x + torch.linspace(0, 1, 20001, dtype=torch.float64)[1:-1]) / levels  # (3, n)
    w = alpha + (1 - 2 * alpha) * v
    z = torch.logit(w) if alpha else v
    log_dz = math.log(1 - 2 * alpha) - w.log() - (-w).log1p() if alpha else 0.0
    with torch.no_grad():
        density = model.distribution().log_prob(z.reshape(-1, 1)).reshape(z.shape) + log_dz
        exact = torch.log(torch.trapezoid(density.exp(), v, dim=-1))
        bound = model.log_prob(x, num_samples=20000)
        one = model.log_prob(x, num_samples=1)
    torch.testing.assert_close(bound, exact, atol=0.03, rtol=0)
    assert bool((exact < 0).all()) and one.shape == (3,)


def test_dequantized_digits_beat_a_uniform_model_and_variational_is_no_worse():
    data = load("digits")
    uniform_bits = math.log2(data.levels)  # 4.09: every value equally likely
    bits = {}
    for kind in ("uniform", "variational"):
        result = fit_data(data.train, "maf", valid=data.valid, dequantize=kind, levels=17,
                          num_layers=2, hidden_dims=(128,), progress=False,
                          epochs=6, batch_size=100, seed=0)  # fmt: skip
        torch.manual_seed(0)
        bits[kind] = result.model.bits_per_dim(data.test, num_samples=8)
        assert result.history[-1]["valid_bits_per_dim"] < result.history[0]["valid_bits_per_dim"]
    assert bits["uniform"] < uniform_bits - 1.0, bits
    assert bits["variational"] <= bits["uniform"] + 0.02, bits


def test_samples_of_a_discrete_model_lie_on_the_grid():
    model = DensityModel(4, "realnvp", 2, dequantize="variational", levels=3)
    draws = model.sample(50)
    assert set(draws.unique().tolist()) <= {0.0, 1.0, 2.0}
    z, _ = model.dequantizer(draws)
    torch.testing.assert_close(model.dequantizer.decode(z), draws)


def test_dequantization_log_derivative_matches_autograd():
    torch.manual_seed(4)
    dq = Dequantization(3, levels=7, alpha=0.1).double()
    x = torch.tensor([[0.0, 3.0, 6.0]], dtype=torch.float64)
    torch.manual_seed(5)
    z, correction = dq(x)
    torch.manual_seed(5)
    u = torch.rand_like(x)

    def to_z(u):
        return torch.logit(0.1 + 0.8 * (x + u) / 7)

    jac = torch.autograd.functional.jacobian(lambda u: to_z(u).sum(0), u)[:, 0, :]
    expected = torch.linalg.slogdet(jac * 7)[1] - 3 * math.log(7)
    torch.testing.assert_close(z, to_z(u))
    torch.testing.assert_close(correction, expected.reshape(1))


@pytest.mark.parametrize("flow", ["maf", "realnvp", "nice", "glow", "nsf-coupling", "iaf",
                                  "planar", "sylvester-h", "cnf"])  # fmt: skip
def test_every_recipe_with_an_inverse_fits(flow):
    torch.manual_seed(6)
    x = torch.randn(64, 2) * torch.tensor([1.0, 0.3])
    layers = 1 if flow == "cnf" else 2
    result = fit_data(x, flow, num_layers=layers, progress=False, epochs=1)
    assert math.isfinite(result.history[0]["valid_nll"])
    assert result.model.log_prob(x).requires_grad


def test_resume_continues_bit_for_bit(tmp_path):
    x = torch.randn(300, 2)
    options = {"dequantize": None, "num_layers": 2, "progress": False}
    whole = fit_data(x, "realnvp", out=tmp_path / "a", epochs=4, **options)
    fit_data(x, "realnvp", out=tmp_path / "b", epochs=2, **options)
    resumed = fit_data(x, "realnvp", out=tmp_path / "b", resume=True, epochs=4,
                       **options)  # fmt: skip
    assert resumed.history == whole.history and resumed.best_epoch == whole.best_epoch
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert saved["best_epoch"] == whole.best_epoch  # recorded by the epoch that was the best
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values(),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    x = torch.randn(200, 2)
    fit_data(x, "maf", num_layers=1, out=tmp_path, progress=False, epochs=1)
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    original = DensityModel.log_prob

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        return out * math.nan if self.training else out

    monkeypatch.setattr(DensityModel, "log_prob", poisoned)
    result = fit_data(x, "maf", num_layers=1, out=tmp_path, resume=True, progress=False,
                      epochs=3)  # fmt: skip
    assert result.stopped == "non-finite loss nan at epoch 2, step 1"
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved


def test_non_finite_gradient_stops_before_the_update(tmp_path, monkeypatch):
    x = torch.randn(200, 2)
    fit_data(x, "maf", num_layers=1, out=tmp_path, progress=False, epochs=1)
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    original = DensityModel.log_prob

    def poisoned(self, *args, **kwargs):  # the same value, with a NaN gradient
        out = original(self, *args, **kwargs)
        if not self.training:
            return out
        p = next(self.parameters())
        return out + 0.0 * (p - p.detach()).abs().sqrt().sum()

    monkeypatch.setattr(DensityModel, "log_prob", poisoned)
    result = fit_data(x, "maf", num_layers=1, out=tmp_path, resume=True, progress=False,
                      epochs=3)  # fmt: skip
    name = next(n for n, _ in result.model.named_parameters())
    assert result.stopped.startswith(f"non-finite gradient of {name} at epoch 2, step 1")
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_rnode_regularization_keeps_a_cnf_smooth(tmp_path):
    """λ (kinetic energy + Jacobian Frobenius norm) per row joins the training loss: fitted
    with it, the CNF moves and bends the data far less than fitted without, and still beats a
    Gaussian (short of the unregularized likelihood after three epochs); the record counts the
    solver's evaluations, the layer keeps its own setting afterwards, and a checkpoint from
    before the setting resumes as λ = 0."""
    torch.manual_seed(0)
    x = Banana(2).sample((400,))
    energy, nll = {}, {}
    for strength in (0.0, 1.0):
        torch.manual_seed(1)
        fit = fit_data(x, "cnf", num_layers=1, hidden_dims=(16, 16), epochs=3, batch_size=50,
                       lr=1e-2, regularization=strength, out=tmp_path / str(strength),
                       progress=False)  # fmt: skip
        layer = next(m for m in fit.model.modules() if isinstance(m, pf.transforms.Continuous))
        assert not layer.regularize
        assert fit.history[-1]["nfe_mean"] > 0 and fit.history[-1]["nfe_max"] > 0
        layer.regularize = True
        with torch.no_grad():
            nll[strength] = -fit.model.log_prob(x[:200]).mean().item()
        energy[strength] = sum(v.mean().item() for v in layer.regularization.values())
    assert energy[1.0] < 0.3 * energy[0.0]  # 0.07 of it here
    gaussian = torch.distributions.MultivariateNormal(x.mean(0), torch.cov(x.T))
    assert nll[0.0] < nll[1.0] < -gaussian.log_prob(x[:200]).mean().item()  # 5.79, 6.10, 6.29
    checkpoint = tmp_path / "0.0" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    del state["settings"]["regularization"]
    torch.save(state, checkpoint)
    resumed = fit_data(x, "cnf", num_layers=1, hidden_dims=(16, 16), epochs=4, batch_size=50,
                       lr=1e-2, out=tmp_path / "0.0", resume=True, progress=False)  # fmt: skip
    assert len(resumed.history) == 4
    assert "nfe_mean" not in fit_data(x, "maf", num_layers=1, epochs=1,
                                      progress=False).history[0]  # fmt: skip
    with pytest.raises(ValueError, match="RNODE terms; the 'maf' model has no continuous layer"):
        fit_data(x, "maf", regularization=0.1)


def test_the_dequantization_bound_weighs_a_cnf_with_its_exact_trace():
    """With several noise draws the bound is a log-mean-exp of importance weights, which an
    estimated log-determinant would bias: a ``cnf`` on Hutchinson's estimate gives the figures
    of the same layer set to exact (one draw keeps the layer's own, unbiased estimate)."""
    torch.manual_seed(0)
    model = DensityModel(2, "cnf", 1, hidden_dims=(8,), trace="hutchinson", dequantize="uniform",
                         levels=4)  # fmt: skip
    layer = next(m for m in model.modules() if isinstance(m, pf.transforms.Continuous))
    x = torch.randint(0, 4, (6, 2)).float()
    figures = {}
    with torch.no_grad():
        for trace in ("hutchinson", "exact"):
            layer.trace = trace
            torch.manual_seed(1)
            figures[trace] = model.log_prob(x, num_samples=3)
            assert layer.trace == trace
    torch.testing.assert_close(figures["hutchinson"], figures["exact"])


def test_a_checkpoint_from_another_configuration_is_refused(tmp_path):
    x = torch.randn(100, 2)
    fit_data(x, "maf", num_layers=1, out=tmp_path, progress=False, epochs=1)
    with pytest.raises(ValueError, match=r"different density model .*flow: 'maf' there"):
        fit_data(x, "realnvp", num_layers=1, out=tmp_path, resume=True, progress=False)
    model = DensityModel(2, "maf", 1)
    with pytest.raises(ValueError, match=r"different settings .*lr"):
        fit_data(x, "maf", num_layers=1, out=tmp_path, resume=True, progress=False,
                 lr=0.1)  # fmt: skip
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "broken.pt", model)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: fit_data(torch.rand(50, 2), dequantize="uniform", levels=4), "integer values"),
        (lambda: fit_data(torch.full((50, 2), 5.0), dequantize="uniform", levels=4),
         r"\[0, 3\] for levels=4"),
        (lambda: fit_data(torch.zeros(50, 2), dequantize="uniform"), "levels: dequantize"),
        (lambda: fit_data(torch.zeros(50, 2), levels=4), "set dequantize"),
        (lambda: fit_data(torch.zeros(50, 2), dequantize="gaussian", levels=4), "kind must"),
        (lambda: fit_data(torch.zeros(50)), r"shape \(N, \*features\)"),
        (lambda: fit_data(torch.zeros(50, 2), valid=torch.zeros(5, 3)), r"valid must have shape"),
        (lambda: fit_data(torch.zeros(50, 2), context=torch.zeros(49, 1)), "context must be"),
        (lambda: fit_data(torch.zeros(50, 2), "spline"), "flow must be one of"),
        (lambda: fit_data(torch.zeros(50, 2), valid_fraction=1.5), "valid_fraction"),
        (lambda: fit_data(torch.zeros(50, 2), epochs=0), "epochs must"),
        (lambda: fit_data(torch.zeros(50, 2), "cnf", regularization=-1.0), "regularization"),
        (lambda: fit_data(torch.full((50, 2), math.nan)), "NaN or infinite"),
        (lambda: fit_data(torch.zeros(50, 2), device="cuda:7"), "device"),
        (lambda: fit_data(torch.zeros(50, 2), resume=True), "resume: no checkpoint.pt"),
        (lambda: Dequantization(2, levels=1), "levels must be at least 2"),
        (lambda: Dequantization(2, levels=4, alpha=0.5), "alpha must lie in"),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        call()


def test_loading_data_for_density_estimation(tmp_path):
    digits = load("digits")
    assert digits.levels == 17 and digits.train.max() == 16 and len(digits.test) == 200
    path = tmp_path / "counts.npz"
    np.savez(path, train=np.arange(12).reshape(3, 4) % 3, test=np.zeros((2, 4)))
    rows = load(path)
    assert rows.levels == 3 and rows.valid is None and rows.image_shape == (2, 2)
    np.savez(path, train=np.random.default_rng(0).normal(size=(5, 3)))
    assert load(path).levels is None
    with pytest.raises(FileNotFoundError, match="neither 'digits', 'mnist'"):
        load(tmp_path / "missing.npz")
    np.savez(path, valid=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="no array named 'train'"):
        load(path)
    (tmp_path / "rows.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"data: expected an .npz file, got '.*rows.csv'"):
        load(tmp_path / "rows.csv")
    (tmp_path / "broken.npz").write_bytes(b"PK not really")
    with pytest.raises(ValueError, match=r"data: '.*broken.npz' is not a readable .npz file"):
        load(tmp_path / "broken.npz")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dequantize", [None, "variational"])
def test_fit_data_on_cuda(dequantize):
    x = torch.randint(0, 4, (200, 3)).float()
    result = fit_data(x, "maf", num_layers=2, dequantize=dequantize,
                      levels=4 if dequantize else None, device=GPU, progress=False,
                      **QUICK)  # fmt: skip
    assert result.model.loc.device.type == result.model.sample(5).device.type == GPU
    assert math.isfinite(result.model.bits_per_dim(x.to(GPU)))
    assert pf.fit_data is fit_data
    fit = fit_data(torch.randn(200, 2), "cnf", num_layers=1, hidden_dims=(8,), device=GPU,
                   regularization=0.1, progress=False, **QUICK)  # fmt: skip
    assert fit.model.loc.device.type == GPU and fit.history[-1]["nfe_mean"] > 0


def test_the_density_command_fits_reports_and_resumes(tmp_path, capsys):
    from pyroflows.cli import main

    out = tmp_path / "run"
    args = ["density", "--data", "digits", "--flow", "realnvp", "--layers", "2",
            "--eval-samples", "2", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main([*args, "--epochs", "1"]) == 0
    assert "bits/dim" in capsys.readouterr().out
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["epochs_run"] == 2 and report["levels"] == 17
    assert 0 < report["test"]["bits_per_dim"] < math.log2(17)
    for name in ("checkpoint.pt", "best.pt", "samples.png", "training.png"):
        assert (out / name).exists()
    with pytest.raises(SystemExit):
        main(["density", "--data", str(tmp_path / "none.npz"), "--out", str(out)])
    assert "neither 'digits', 'mnist'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--flow", "maf", "--resume"])
    assert "different density model (flow: 'realnvp' there, 'maf' here)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--cnf-regularization", "0.1"])
    assert "RNODE terms; the 'realnvp' model has no continuous layer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--cnf-trace", "hutchinson"])
    assert "--cnf-trace: the flow 'realnvp' is not a cnf" in capsys.readouterr().err
    continuous = tmp_path / "points.npz"
    np.savez(continuous, train=np.random.default_rng(0).normal(size=(300, 2)))
    assert main(["density", "--data", str(continuous), "--epochs", "1", "--layers", "1",
                 "--flow", "cnf", "--cnf-regularization", "0.1", "--cnf-trace", "hutchinson",
                 "--out", str(tmp_path / "points"), "--no-progress"]) == 0  # fmt: skip
    assert "bits/dim" not in capsys.readouterr().out
    report = json.loads((tmp_path / "points" / "results.json").read_text())
    assert report["settings"]["regularization"] == 0.1 and "nfe_mean" in report["history"][0]
    assert report["model"]["trace"] == "hutchinson"
