"""Work sharded over torch.distributed processes equals one process's."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyroflows as pf
from pyroflows.vae import VAE, evaluate

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


def _worker(rank: int, world: int, folder: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world
    )
    try:
        vae, x = _case()
        r = pf.distributed.log_marginal_likelihood(vae.model, vae.guide, x, **SETTINGS)
        figures = evaluate(vae, x, **SETTINGS)
        fit = _fit()
        torch.save({"fields": list(r), "nll": figures["nll"], "losses": fit.losses,
                    "flow": fit.q.transforms[0].state_dict()}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world: int, folder: str, limit: float = 180.0) -> None:
    context = mp.start_processes(_worker, args=(world, folder), nprocs=world, join=False,
                                 start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + limit
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"{world} processes did not finish within {limit} s")


def test_two_processes_give_the_one_process_results(tmp_path):
    """Sharded log p(x) in the data's order, and a reverse-KL fit whose particles are split
    over the two processes taking the one-process steps (to rounding of the sums)."""
    _spawn(2, str(tmp_path))
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


def test_estimates_depend_on_the_seed_and_not_on_the_global_generator():
    vae, x = _case()
    a = pf.distributed.log_marginal_likelihood(vae.model, vae.guide, x, **SETTINGS)
    torch.rand(10)
    b = pf.distributed.log_marginal_likelihood(vae.model, vae.guide, x, **SETTINGS)
    c = pf.distributed.log_marginal_likelihood(vae.model, vae.guide, x, seed=1, **SETTINGS)
    assert torch.equal(a.log_px, b.log_px) and not torch.equal(a.log_px, c.log_px)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        pf.distributed.log_marginal_likelihood(vae.model, vae.guide, x, batch_size=0)
