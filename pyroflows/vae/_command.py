"""``pyroflows vae``: train a VAE with a flow posterior, evaluate it, write the results."""

from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from .. import _checks, _training, distributed, plots
from .data import load
from .evaluate import evaluate, save_figures
from .models import ARCHITECTURES, POSTERIORS, VAE
from .train import Settings, train


def add_parser(commands: argparse._SubParsersAction, positive_int) -> None:
    vae = commands.add_parser(
        "vae",
        help="train a VAE with a flow posterior on binary images and evaluate it",
        description="Train a VAE (Bernoulli decoder) whose posterior is a flow, the way the "
        "flow-VAE papers do; write checkpoints, results.json (test -ELBO and NLL) and figures "
        "to --out.",
    )
    defaults = Settings()
    vae.add_argument("--flow", default="iaf", choices=POSTERIORS, help="posterior (default: iaf)")
    vae.add_argument("--layers", type=positive_int, default=2, help="flow layers (default: 2)")
    vae.add_argument("--latent-dim", type=positive_int, default=64, help="default: 64")
    vae.add_argument("--architecture", default="mlp", choices=ARCHITECTURES,
                     help="mlp, or conv (gated convolutions, 28x28 only)")  # fmt: skip
    vae.add_argument("--hidden-dim", type=positive_int, default=300, help="MLP width (300)")
    vae.add_argument("--flow-hidden-dims", type=positive_int, nargs="+", default=None,
                     metavar="WIDTH", help="widths of each flow layer's network (iaf: the "
                     "MADE, e.g. 320 as in the Sylvester paper; planar, radial, Sylvester: the "
                     "map from the encoder's output to the layer's parameters; cnf: the "
                     "dynamics)")  # fmt: skip
    vae.add_argument("--cnf-trace", default="exact", choices=["exact", "hutchinson"],
                     help="a CNF's trace in training (FFJORD: hutchinson); evaluation "
                     "is exact")  # fmt: skip
    vae.add_argument("--cnf-rank", type=int, default=0, metavar="K",
                     help="a CNF's amortization: each layer of the dynamics gets a rank-K weight "
                     "and a bias per image, read from the encoder (FFJORD's VAE); default 0, "
                     "the encoder's output is an input of the dynamics")  # fmt: skip
    vae.add_argument("--cnf-regularization", type=float, default=0.0, metavar="LAMBDA",
                     help="a CNF's RNODE weight in training: LAMBDA (kinetic energy + Jacobian "
                     "Frobenius norm) per image joins the loss, keeping the dynamics "
                     "non-stiff (Finlay et al., 2020); default 0")  # fmt: skip
    vae.add_argument("--data", default="digits",
                     help="digits (bundled, no download), mnist (see PYROFLOWS_DATA), or the "
                     "path of an .npz file or a folder of .amat or IDX files")  # fmt: skip
    vae.add_argument("--binarize", default="static", choices=["static", "dynamic"],
                     help="for grey-level data (IDX files, digits); default: static")  # fmt: skip
    vae.add_argument("--epochs", type=positive_int, default=defaults.epochs)
    vae.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    vae.add_argument("--lr", type=float, default=defaults.lr)
    vae.add_argument("--optimizer", default=defaults.optimizer, choices=["adamax", "adam"])
    vae.add_argument("--warmup-epochs", type=int, default=0, help="KL warm-up (default: 0)")
    vae.add_argument("--free-bits", type=float, default=0.0, help="nats (default: 0)")
    vae.add_argument("--patience", type=positive_int, default=None,
                     help="early stopping: epochs without a better validation ELBO")  # fmt: skip
    vae.add_argument("--eval-samples", type=positive_int, default=5000,
                     help="importance samples per test image for the NLL")  # fmt: skip
    vae.add_argument("--eval-images", type=positive_int, default=None,
                     help="evaluate on the first N test images (default: all)")  # fmt: skip
    vae.add_argument("--seed", type=int, default=0)
    vae.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    vae.add_argument("--out", type=Path, required=True, help="folder for the results")
    vae.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    vae.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(cli: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Under ``torchrun`` every process trains its share and evaluates its batches; rank 0
    writes the results."""
    with ExitStack() as stack:
        try:
            device = _checks.device("device", args.device)
            device = stack.enter_context(distributed.from_environment(device))
        except (ValueError, RuntimeError) as error:
            cli.error(str(error))
        return _run(cli, args, device)


def _run(cli: argparse.ArgumentParser, args: argparse.Namespace, device: torch.device) -> int:
    settings = {
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "optimizer": args.optimizer, "warmup_epochs": args.warmup_epochs,
        "free_bits": args.free_bits, "patience": args.patience, "seed": args.seed,
        "regularization": args.cnf_regularization,
    }  # fmt: skip
    try:
        data = load(args.data, binarize=args.binarize, seed=args.seed).to(device)
        torch.manual_seed(args.seed)
        if args.cnf_trace != "exact" and args.flow != "cnf":
            raise ValueError(f"--cnf-trace: the posterior {args.flow!r} is not a CNF")
        options = {"trace": args.cnf_trace} if args.flow == "cnf" else {}
        if args.cnf_rank:
            if args.flow != "cnf":
                raise ValueError(f"--cnf-rank: the posterior {args.flow!r} is not a CNF")
            options["rank"] = args.cnf_rank
        if args.flow_hidden_dims is not None:
            if args.flow == "none":
                raise ValueError("--flow-hidden-dims: the posterior 'none' has no flow")
            options["hidden_dims"] = tuple(args.flow_hidden_dims)
        vae = VAE(data.image_shape, args.latent_dim, args.flow, args.layers,
                  architecture=args.architecture, hidden_dim=args.hidden_dim,
                  **options)  # fmt: skip
        vae.to(device)
        start = time.perf_counter()
        result = train(vae, data, out=args.out, resume=args.resume,
                       progress=not args.no_progress, **settings)  # fmt: skip
        seconds = time.perf_counter() - start
    except (ValueError, FileNotFoundError) as error:
        cli.error(str(error))
    code = 1 if result.stopped and result.stopped.startswith("non-finite") else 0
    test = data.test[: args.eval_images]
    figures = evaluate(vae, test, num_samples=args.eval_samples, progress=not args.no_progress)
    rank, world = distributed.rank_and_world()
    if rank != 0:
        return code
    save_figures(vae, test, args.out)
    plots.plot_training(result.history, args.out / "training.png")
    report = {
        "data": data.name, "image_shape": list(data.image_shape), "vae": vae.config,
        "settings": settings, "epochs_run": len(result.history), "best_epoch": result.best_epoch,
        "stopped": result.stopped, "train_seconds": seconds, "test": figures,
        "history": result.history, "processes": world, **_training.environment(device),
    }  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = [
        ("posterior", f"{args.flow} ({args.layers} layers), latent {args.latent_dim}"),
        ("data", f"{data.name}, {len(data.train)} training images"),
        ("epochs", f"{len(result.history)}, best {result.best_epoch} ({seconds:.0f} s)"),
        ("test -ELBO", f"{figures['neg_elbo']:.2f}"),
        ("test NLL", f"{figures['nll']:.2f} +- {figures['nll_stderr']:.2f} "
                     f"({args.eval_samples} samples, {figures['images']} images)"),
    ]  # fmt: skip
    if result.stopped:
        rows.append(("stopped", result.stopped))
    rows.append(("written", str(args.out)))
    for name, value in rows:
        print(f"{name:12} {value}")
    return code
