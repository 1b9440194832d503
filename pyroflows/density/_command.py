"""``pyroflows density``: fit a flow to data by maximum likelihood, write the results."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .. import _checks, _training
from ..flows import RECIPES
from .data import load
from .dequantization import KINDS
from .fitting import Settings, fit_data
from .model import LOG_2


def add_parser(commands: argparse._SubParsersAction, positive_int) -> None:
    density = commands.add_parser(
        "density",
        help="fit a flow to data by maximum likelihood (bits per dimension for discrete data)",
        description="Fit a flow to data by maximum likelihood with early stopping on the "
        "validation split; discrete data are dequantized. Writes checkpoints, results.json "
        "(test log-likelihood, bits per dimension) and figures to --out.",
    )
    defaults = Settings()
    density.add_argument("--data", default="digits",
                         help="digits (bundled, 17 grey levels), mnist (binarized, see "
                         "PYROFLOWS_DATA), or the path of an .npz file with train (valid, "
                         "test) arrays")  # fmt: skip
    density.add_argument("--flow", default="maf", choices=list(RECIPES), help="default: maf")
    density.add_argument("--layers", type=positive_int, default=5, help="default: 5")
    density.add_argument("--hidden", type=positive_int, nargs="+", default=None,
                         help="hidden widths of each layer's network")  # fmt: skip
    density.add_argument("--dequantize", default="uniform", choices=KINDS,
                         help="for discrete data (default: uniform)")  # fmt: skip
    density.add_argument("--epochs", type=positive_int, default=defaults.epochs)
    density.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    density.add_argument("--lr", type=float, default=defaults.lr)
    density.add_argument("--patience", type=positive_int, default=defaults.patience)
    density.add_argument("--cnf-trace", default="exact", choices=["exact", "hutchinson"],
                         help="a cnf's trace (FFJORD trains on hutchinson: one "
                         "vector-Jacobian product per evaluation, an unbiased estimate of "
                         "log p); default: exact")  # fmt: skip
    density.add_argument("--cnf-regularization", type=float, default=0.0, metavar="LAMBDA",
                         help="a cnf's RNODE weight in training: LAMBDA (kinetic "
                         "energy + Jacobian Frobenius norm) per row joins the loss; "
                         "default 0")  # fmt: skip
    density.add_argument("--eval-samples", type=positive_int, default=16,
                         help="dequantization draws per test row for the bound (default: 16)")
    density.add_argument("--seed", type=int, default=0)
    density.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    density.add_argument("--out", type=Path, required=True, help="folder for the results")
    density.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    density.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(cli: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .. import plots

    settings = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                "patience": args.patience, "seed": args.seed,
                "regularization": args.cnf_regularization}  # fmt: skip
    options = {} if args.hidden is None else {"hidden_dims": tuple(args.hidden)}
    if args.cnf_trace != "exact":
        if args.flow != "cnf":
            cli.error(f"--cnf-trace: the flow {args.flow!r} is not a cnf")
        options["trace"] = args.cnf_trace
    try:
        device = _checks.device("device", args.device)
        data = load(args.data, seed=args.seed).to(device)
        discrete = data.levels is not None
        start = time.perf_counter()
        result = fit_data(
            data.train, args.flow, valid=data.valid, num_layers=args.layers,
            dequantize=args.dequantize if discrete else None, levels=data.levels,
            device=device, out=args.out, resume=args.resume, progress=not args.no_progress,
            **settings, **options,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    except (ValueError, FileNotFoundError) as error:
        cli.error(str(error))
    model = result.model
    test = data.test if data.test is not None else data.valid
    figures = {}
    if test is not None:
        torch.manual_seed(args.seed)
        with torch.no_grad():
            log_p = model.log_prob(model.check(test, None, "test"), num_samples=args.eval_samples)
        figures = {"rows": len(test), "log_likelihood": log_p.mean().item(),
                   "log_likelihood_stderr": (log_p.std() / len(log_p) ** 0.5).item()}  # fmt: skip
        if discrete:
            figures["bits_per_dim"] = -figures["log_likelihood"] / (model.dim * LOG_2)
            figures["eval_samples"] = args.eval_samples
    plots.plot_density_training(result.history, args.out / "training.png")
    plots.plot_density_samples(model, data, args.out / "samples.png")
    report = {
        "data": data.name, "dim": model.dim, "levels": data.levels, "model": model.config,
        "settings": settings, "epochs_run": len(result.history), "best_epoch": result.best_epoch,
        "stopped": result.stopped, "train_seconds": seconds, "test": figures,
        "history": result.history, **_training.environment(device),
    }  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = [
        ("flow", f"{args.flow} ({args.layers} layers)"
                 + (f", {args.dequantize} dequantization" if discrete else "")),
        ("data", f"{data.name}, {len(data.train)} training rows of {model.dim}"),
        ("epochs", f"{len(result.history)}, best {result.best_epoch} ({seconds:.0f} s)"),
    ]  # fmt: skip
    if figures:
        rows.append(("test log p", f"{figures['log_likelihood']:.3f} +- "
                                   f"{figures['log_likelihood_stderr']:.3f} nats"))  # fmt: skip
    if "bits_per_dim" in figures:
        rows.append(("bits/dim", f"{figures['bits_per_dim']:.4f}"))
    if result.stopped:
        rows.append(("stopped", result.stopped))
    rows.append(("written", str(args.out)))
    for name, value in rows:
        print(f"{name:12} {value}")
    return 1 if result.stopped and result.stopped.startswith("non-finite") else 0
