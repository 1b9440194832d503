"""The demo command: a reverse-KL fit whose answer (log Z of the banana) is known."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from devices import GPU, needs_gpu

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


def test_cli_demo_prints_plots_and_writes_its_table(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--flow", "planar", "--layers", "2", "--steps", "20", "--vae-epochs", "2"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "log Z (exact)" in printed and "test NLL" in printed
    for name in ("banana.png", "vae-samples.png", "vae-reconstructions.png", "vae-training.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "| PSIS k-hat |" in table and "| test -ELBO |" in table


def test_cli_refuses_bad_values_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default --out folder would go
    for argv, message in [
        (["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
        (["--steps", "-5"], "argument --steps: expected a positive integer, got -5"),
        (["--layers", "0"], "argument --layers: expected a positive integer, got 0"),
        (["--out", str(tmp_path / "missing" / "out")], "argument --out: folder"),
        (["--out", str(Path(__file__))], "argument --out: cannot write to"),  # a file
        (["--vae-epochs", "-1", "--steps", "1", "--out", str(tmp_path)], "--vae-epochs: expected"),
        (["--device", "cuda:99" if torch.cuda.is_available() else "cuda"], "device"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["demo", *argv])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "pyroflows-demo").exists()  # a refused command writes nothing


def test_cli_names_the_folder_it_writes_and_has_a_version(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--flow", "planar", "--layers", "1", "--steps", "5", "--vae-epochs",
                 "0"]) == 0  # fmt: skip
    assert "written         pyroflows-demo" in capsys.readouterr().out
    assert (tmp_path / "pyroflows-demo" / "banana.png").stat().st_size > 0
    assert not (tmp_path / "pyroflows-demo" / "vae-samples.png").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and "pyroflows" in capsys.readouterr().out


def test_recipes_have_their_own_demo_defaults():
    from pyroflows.cli import DEMO_DEFAULTS, parser

    assert DEMO_DEFAULTS["cnf"] == (1, 500)  # six CNF layers for 1500 steps took 50 minutes
    demo = parser()._subparsers._group_actions[0].choices["demo"]
    assert all(action.help for action in demo._actions)


def test_tests_run_on_one_thread():
    assert torch.get_num_threads() == 1


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", ["planar", "iaf", "cnf"])
def test_cli_demo_on_cuda(name, tmp_path, capsys):
    args = ["demo", "--flow", name, "--steps", "20", "--device", GPU, "--vae-epochs", "1"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    assert "test NLL" in capsys.readouterr().out and (tmp_path / "banana.png").stat().st_size > 0
