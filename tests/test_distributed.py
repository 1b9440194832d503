"""Work sharded over torch.distributed processes equals one process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyroflows as pf
from pyroflows.vae import VAE, BinaryImages, evaluate, train
from pyroflows.vae.train import CHECKPOINT

SETTINGS = {"num_samples": 64, "chunk_size": 32, "batch_size": 3}
# an untrained toy VAE: some estimates have few effective samples, which is not the point here
# (and a 15-step fit is not meant to be trusted)
pytestmark = [
    pytest.mark.filterwarnings("ignore:log_marginal_likelihood:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:PSIS k-hat:RuntimeWarning"),
]


def _case() -> tuple[VAE, torch.Tensor]:
    torch.manual_seed(0)
    vae = VAE((2, 2), latent_dim=2, flow="iaf", num_layers=1, hidden_dim=8)
    x = torch.bernoulli(torch.full((8, 4), 0.5), generator=torch.Generator().manual_seed(1))
    return vae, x


def _fit() -> pf.FitResult:
    return pf.fit("banana", "realnvp", num_layers=2, steps=15, particles=30, num_eval=200,
                  progress=False, seed=2)  # fmt: skip


# 13 training images in batches of 6: the last batch has one image for two processes;
# free bits near the batches' mean KL, so the floor holds for some batches and not others
TRAIN = {"batch_size": 6, "lr": 1e-2, "free_bits": 0.35, "warmup_epochs": 1, "seed": 4,
         "progress": False}  # fmt: skip


def _images() -> BinaryImages:
    g = torch.Generator().manual_seed(5)
    x = torch.bernoulli(torch.rand(1, 4, generator=g).expand(23, 4), generator=g)
    return BinaryImages(x[:13], x[13:18], x[18:], (2, 2), "toy")


def _fresh() -> VAE:
    torch.manual_seed(0)
    return VAE((2, 2), latent_dim=2, flow="iaf", num_layers=1, hidden_dim=8)


def _trained(**options) -> dict:
    vae = _fresh()
    run = train(vae, _images(), **{**TRAIN, **options})
    return {"history": run.history, "vae": vae.state_dict()}


def _error(call, *args, **options) -> str:
    """The message of the ValueError ``call(*args, **options)`` raises ("" if none)."""
    try:
        call(*args, **options)
    except ValueError as error:
        return str(error)
    return ""


MIXING = torch.tensor([[1.0, 1.0], [1.0, 1.2], [1.2, 1.0]])
X = torch.tensor([0.3, -0.2, 0.5])


def _model(x: torch.Tensor) -> None:
    """z ~ N(0, I₂), x ~ N(A z, 0.5² I₃): a posterior with correlation -0.97."""
    import pyro
    import pyro.distributions as pdist

    z = pyro.sample("z", pdist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("x", pdist.Normal(z @ MIXING.T, 0.5).to_event(1), obs=x)


def _fit_model() -> pf.FitResult:
    return pf.fit(_model, "iaf", model_args=(X,), steps=300, particles=16, lr=1e-2,
                  estimator="stl", num_eval=4000, progress=False, seed=3)  # fmt: skip


def _worker(rank: int, world: int, folder: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world
    )
    try:
        vae, x = _case()
        r = pf.distributed.log_marginal_likelihood(vae.model, vae.guide, x, **SETTINGS)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pf.infer.evaluation.MIN_ESS = 1e9  # every estimate is short of it
            pf.distributed.log_marginal_likelihood(vae.model, vae.guide, x, **SETTINGS)
        ess_warnings = sum("importance ESS" in str(w.message) for w in caught)
        figures = evaluate(vae, x, **SETTINGS)
        fit = _fit()
        if rank:  # rank 0 alone writes checkpoints

            def refuse(*args, **kwargs):
                raise AssertionError("rank 1 wrote a checkpoint")

            pf._training.atomic_save = refuse
        whole = _trained(epochs=2, out=f"{folder}/whole")
        _trained(epochs=1, out=f"{folder}/cut")
        resumed = _trained(epochs=2, out=f"{folder}/cut", resume=True)
        _trained(epochs=1, out=f"{folder}/half")  # resumed by one process
        mixed = _fresh().to("meta" if rank else "cpu")
        errors = [
            _error(train, _fresh(), _images(), **{**TRAIN, "batch_size": 5}),
            _error(train, mixed, _images(), **TRAIN),
            *(_error(pf.fit, _model, "iaf", model_args=(X,), steps=1, progress=False, **options)
              for options in ({"particles": 1}, {"estimator": "dreg"})),
        ]  # fmt: skip
        model_fit = _fit_model()
        model_fit = {"losses": model_fit.losses, "log_z": model_fit.diagnostics.log_z,
                     "guide": model_fit.guide.state_dict()}  # fmt: skip
        torch.save({"fields": list(r), "nll": figures["nll"], "losses": fit.losses,
                    "flow": fit.q.transforms[0].state_dict(), "whole": whole,
                    "resumed": resumed, "errors": errors, "model_fit": model_fit,
                    "ess_warnings": ess_warnings},
                   f"{folder}/rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def _nccl_worker(rank: int, world: int, folder: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world
    )
    try:
        vae, data = _fresh().to(f"cuda:{rank}"), _images().to(f"cuda:{rank}")
        run = train(vae, data, epochs=2, **TRAIN)
        nll = evaluate(vae, data.test, **SETTINGS)["nll"]
        state = {k: v.cpu() for k, v in vae.state_dict().items()}
        torch.save({"history": run.history, "vae": state, "nll": nll}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world: int, folder: str, limit: float = 180.0, worker=_worker) -> None:
    context = mp.start_processes(worker, args=(world, folder), nprocs=world, join=False,
                                 start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + limit
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"{world} processes did not finish within {limit} s")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """The folder where two gloo processes left their results (one spawn for the module)."""
    folder = tmp_path_factory.mktemp("two")
    _spawn(2, str(folder))
    return folder


def test_two_processes_give_the_one_process_results(two_processes):
    """Sharded log p(x) in the data's order, and a reverse-KL fit whose particles are split
    over the two processes taking the one-process steps (to rounding of the sums)."""
    tmp_path = two_processes
    vae, x = _case()
    single = pf.distributed.log_marginal_likelihood(vae.model, vae.guide, x, **SETTINGS)
    nll = evaluate(vae, x, **SETTINGS)["nll"]
    fit = _fit()
    assert single.log_px.shape == (8,)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for a, b in zip(got["fields"], single, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert got["nll"] == pytest.approx(nll, rel=1e-6)
        assert got["losses"] == pytest.approx(fit.losses, rel=1e-4, abs=1e-5)
        for name, value in fit.q.transforms[0].state_dict().items():
            torch.testing.assert_close(got["flow"][name], value, rtol=1e-4, atol=1e-5)
        assert got["ess_warnings"] == (1 if rank == 0 else 0)  # one warning, from rank 0


def test_estimates_depend_on_the_seed_and_not_on_the_global_generator():
    vae, x = _case()
    a = pf.distributed.log_marginal_likelihood(vae.model, vae.guide, x, **SETTINGS)
    torch.rand(10)
    b = pf.distributed.log_marginal_likelihood(vae.model, vae.guide, x, **SETTINGS)
    c = pf.distributed.log_marginal_likelihood(vae.model, vae.guide, x, seed=1, **SETTINGS)
    assert torch.equal(a.log_px, b.log_px) and not torch.equal(a.log_px, c.log_px)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        pf.distributed.log_marginal_likelihood(vae.model, vae.guide, x, batch_size=0)


def _assert_same_training(got: dict, expected: dict) -> None:
    assert len(got["history"]) == len(expected["history"])
    for a, b in zip(got["history"], expected["history"], strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    for name, value in expected["vae"].items():
        torch.testing.assert_close(got["vae"][name], value, rtol=1e-4, atol=1e-5)


def test_data_parallel_training_takes_the_one_process_steps(two_processes):
    """Two processes, each with half of every batch, end where one process does: straight
    through, interrupted and resumed on two, and resumed on one from the two's checkpoint.
    Rank 0 alone writes; a batch that does not split evenly and mixed devices are refused."""
    single = _trained(epochs=2)
    for rank in range(2):
        got = torch.load(two_processes / f"rank{rank}.pt", weights_only=True)
        _assert_same_training(got["whole"], single)
        _assert_same_training(got["resumed"], single)
        split, mixed = got["errors"][:2]
        assert "batch_size must be a multiple of the number of processes (2)" in split
        assert "same kind of device, got cpu on rank 0, meta on rank 1" in mixed
    assert sorted(p.name for p in (two_processes / "whole").iterdir()) == ["best.pt", CHECKPOINT]
    _assert_same_training(_trained(epochs=2, out=two_processes / "half", resume=True), single)


def test_a_pyro_model_fit_splits_its_particles(two_processes):
    """Each of two processes draws 8 of the 16 particles: the ranks keep one guide (the
    gradients are summed) and reach the exact evidence, as one process does."""
    cov = MIXING @ MIXING.T + 0.25 * torch.eye(3)
    exact = torch.distributions.MultivariateNormal(torch.zeros(3), cov).log_prob(X).item()
    got = [torch.load(two_processes / f"rank{r}.pt", weights_only=True)["model_fit"]
           for r in range(2)]  # fmt: skip
    for name, value in got[0]["guide"].items():
        torch.testing.assert_close(got[1]["guide"][name], value, rtol=1e-6, atol=1e-7)
    single = _fit_model()
    for fit in (got[0], {"losses": single.losses, "log_z": single.diagnostics.log_z}):
        assert sum(fit["losses"][-50:]) / 50 == pytest.approx(-exact, abs=0.1)  # the mean
        assert fit["log_z"] == pytest.approx(exact, abs=0.03)
    assert got[0]["losses"] != pytest.approx(single.losses)  # other draws, not the same run
    few, dreg = torch.load(two_processes / "rank1.pt", weights_only=True)["errors"][2:]
    assert "particles must be at least the number of processes (2), got 1" in few
    assert "estimator 'dreg' (an IWAE bound over all the particles together)" in dreg


def test_the_vae_command_runs_under_torchrun(tmp_path):
    """``torchrun --nproc-per-node 2 -m pyroflows.cli vae ...`` trains and evaluates as one
    process does; rank 0 alone writes the results."""
    from pyroflows.cli import main

    args = ["vae", "--data", "digits", "--flow", "iaf", "--layers", "1", "--latent-dim", "2",
            "--hidden-dim", "16", "--epochs", "1", "--eval-samples", "16", "--eval-images",
            "20", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "pyroflows.cli", *args, "--out",
               str(tmp_path / "two")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test NLL") == 1
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two, one = (json.loads((tmp_path / k / "results.json").read_text()) for k in ("two", "one"))
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["history"][0] == pytest.approx(one["history"][0], rel=1e-5)
    assert two["test"] == pytest.approx(one["test"], rel=1e-5)


@pytest.mark.gpu
def test_data_parallel_training_over_nccl_takes_the_one_process_steps(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    _spawn(2, str(tmp_path), worker=_nccl_worker)
    vae, data = _fresh().cuda(), _images().to("cuda")
    run = train(vae, data, epochs=2, **TRAIN)
    single = {"history": run.history, "vae": {k: v.cpu() for k, v in vae.state_dict().items()}}
    nll = evaluate(vae, data.test, **SETTINGS)["nll"]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        _assert_same_training(got, single)
        assert got["nll"] == pytest.approx(nll, rel=1e-5)


def test_a_world_size_without_a_rendezvous_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    group = pf.distributed.from_environment(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 is set but not RANK, MASTER_ADDR"):
        group.__enter__()
