"""The demo command: a reverse-KL fit whose answer (log Z of the banana) is known."""

from __future__ import annotations

import math

import torch

from pyroflows.cli import main
from pyroflows.demo import BANANA_LOG_Z, banana_log_density, run_demo


def test_banana_normaliser_is_right():
    grid = torch.stack(
        torch.meshgrid(
            torch.linspace(-20, 20, 801, dtype=torch.float64),
            torch.linspace(-30, 230, 5201, dtype=torch.float64),
            indexing="ij",
        ),
        -1,
    )
    cell = (40 / 800) * (260 / 5200)
    log_z = torch.logsumexp(banana_log_density(grid).flatten(), 0) + math.log(cell)
    assert abs(log_z.item() - BANANA_LOG_Z) < 1e-3


def test_realnvp_fit_recovers_log_z():
    r = run_demo("realnvp", num_layers=4, steps=800, progress=False)
    assert r.elbo < BANANA_LOG_Z + 0.01  # a lower bound, up to Monte Carlo error
    assert BANANA_LOG_Z - r.elbo < 0.1  # and a tight one after fitting
    assert abs(r.log_z - BANANA_LOG_Z) < 0.05


def test_cli_demo_prints_and_plots(tmp_path, capsys):
    plot = tmp_path / "banana.png"
    assert (
        main(["demo", "--flow", "planar", "--layers", "2", "--steps", "20", "--plot", str(plot)])
        == 0
    )
    out = capsys.readouterr().out
    assert "log Z (exact)" in out and plot.stat().st_size > 0
