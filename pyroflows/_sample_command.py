"""``pyroflows sample``: fit a flow to a target by reverse KL, judge it, write the results."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from . import plots, posteriors, targets
from .flows import RECIPES
from .posteriors import POSTERIORS
from .targets import TARGETS

# the recipes whose layers have a network of their own (other layers have one only when amortized)
NETWORK_RECIPES = ("iaf", "maf", "nice", "realnvp", "glow", "cnf", "nsf-ar", "nsf-coupling")


def add_parser(commands: argparse._SubParsersAction, positive_int) -> None:
    sample = commands.add_parser(
        "sample",
        help="fit a flow to a standard target by reverse KL and judge it",
        description="Fit a flow to a target density by reverse KL, then write its draws "
        "(netcdf, through arviz), the diagnostics (JSON) and figures to --out, and print "
        "the PSIS verdict.",
    )
    sample.add_argument(
        "--target",
        required=True,
        choices=[*TARGETS, *POSTERIORS],
        help="a target density, or a posterior written as a Pyro model (fitted by AutoFlow)",
    )
    sample.add_argument("--dim", type=positive_int, default=None, help="for sized targets")
    sample.add_argument(
        "--flow", default="realnvp", choices=list(RECIPES), help="the recipe (default: %(default)s)"
    )
    sample.add_argument("--layers", type=positive_int, default=None, help="number of layers")
    sample.add_argument(
        "--hidden-dims", type=positive_int, nargs="+", default=None, metavar="WIDTH",
        help=f"widths of each layer's network ({', '.join(NETWORK_RECIPES)}; default: the "
        "recipe's)",
    )  # fmt: skip
    sample.add_argument("--steps", type=positive_int, default=2000, help="default: %(default)s")
    sample.add_argument("--particles", type=positive_int, default=256, help="draws per step")
    sample.add_argument("--lr", type=float, default=3e-3, help="default: %(default)s")
    sample.add_argument("--estimator", default="standard", choices=["standard", "stl"])
    sample.add_argument(
        "--warmup-steps",
        type=int,
        default=0,
        help="steps of tempering from the flow's base to the target (default: 0)",
    )
    sample.add_argument(
        "--cnf-regularization", type=float, default=0.0, metavar="LAMBDA",
        help="a cnf's RNODE weight: LAMBDA (kinetic energy + Jacobian Frobenius norm) per "
        "draw joins the gradient (default: 0)",
    )  # fmt: skip
    sample.add_argument("--num-eval", type=positive_int, default=10_000, help="evaluation draws")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    sample.add_argument(
        "--repeats", type=positive_int, default=1,
        help="fits with seeds seed, seed+1, ...: their k-hats are reported and plotted; the "
        "first fit's draws are written (default: 1)",
    )  # fmt: skip
    sample.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    sample.add_argument("--out", type=Path, required=True, help="folder for the results")


def run(cli: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from . import fit  # pyroflows.fit, looked up when the command runs

    try:
        options = {}
        if args.hidden_dims is not None:
            if args.flow not in NETWORK_RECIPES:
                raise ValueError(f"--hidden-dims: the recipe {args.flow!r} has no network")
            options["hidden_dims"] = tuple(args.hidden_dims)
        if args.target in posteriors.POSTERIORS:
            if args.dim is not None:
                raise ValueError(f"--dim: the posterior {args.target!r} has a fixed dimension")
            target = posteriors.POSTERIORS[args.target](args.device)
        else:
            target = targets.target(args.target, args.dim)
        fits = [
            fit(
                target, args.flow, num_layers=args.layers, steps=args.steps,
                particles=args.particles, lr=args.lr, estimator=args.estimator,
                warmup_steps=args.warmup_steps, regularization=args.cnf_regularization,
                num_eval=args.num_eval, seed=args.seed + i,
                device=args.device, **options,
            )
            for i in range(args.repeats)
        ]  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)  # once the fits have run
    except (ValueError, OSError) as error:
        cli.error(str(error))
    r = fits[0]
    d = r.diagnostics
    dim = r.guide.latent_dim if r.guide is not None else target.dim
    exact_log_z = getattr(target, "log_z", None)
    report = {
        "target": args.target, "dim": dim, "flow": args.flow, "hidden_dims": args.hidden_dims,
        "regularization": args.cnf_regularization,
        "steps": len(r.losses),
        "stopped": r.stopped, "log_z": d.log_z, "log_z_stderr": d.log_z_stderr,
        "exact_log_z": exact_log_z, "k_hat": d.k_hat, "verdict": d.verdict, "ess": d.ess,
        "num_eval": d.num_samples, "final_loss": r.losses[-1] if r.losses else None,
    }  # fmt: skip
    if args.repeats > 1:
        report["repeats"] = [
            {"seed": args.seed + i, "k_hat": f.diagnostics.k_hat, "log_z": f.diagnostics.log_z,
             "ess": f.diagnostics.ess}
            for i, f in enumerate(fits)
        ]  # fmt: skip
        plots.plot_k_hats([f.diagnostics.k_hat for f in fits], args.out / "k_hat.png")
    with contextlib.suppress(NotImplementedError, ValueError):  # no exact sampler
        report |= r.against_exact(args.num_eval)
    (args.out / "diagnostics.json").write_text(json.dumps(report, indent=2) + "\n")
    r.to_inference_data().to_netcdf(str(args.out / "samples.nc"))
    if r.guide is None:  # a density: its figure (a posterior's draws are in samples.nc)
        plots.plot_fit(r, args.out / "fit.png")
    plots.plot_losses(r.losses, args.out / "loss.png")
    rows = [
        ("target", f"{args.target} (dim {dim})"),
        ("flow", f"{args.flow}, {len(r.losses)} steps"),
        ("log Z", f"{d.log_z:.4f} +- {d.log_z_stderr:.4f}"),
    ]
    if exact_log_z is not None:
        error = d.log_z - exact_log_z
        off = f", {abs(error) / d.log_z_stderr:.1f} standard errors" if d.log_z_stderr else ""
        rows.append(("log Z (exact)", f"{exact_log_z:.4f} (estimate off by {error:+.4f}{off})"))
    rows += [
        ("PSIS k-hat", f"{d.k_hat:.2f} ({d.verdict})"),
        ("ESS", f"{d.ess:.0f} of {d.num_samples}"),
    ]
    if args.repeats > 1:
        k_hats = sorted(f.diagnostics.k_hat for f in fits)
        good, usable = sum(k < 0.5 for k in k_hats), sum(k < 0.7 for k in k_hats)
        rows.append(("k-hat, seeds", f"{', '.join(f'{k:.2f}' for k in k_hats)} ({good} "
                     f"below 0.5, {usable} below 0.7, of {len(k_hats)})"))  # fmt: skip
    if "forward_kl" in report:
        rows.append(("KL(p || q)", f"{report['forward_kl']:.4f}"))
    if r.stopped:
        rows.append(("stopped", r.stopped))
    rows.append(("written", str(args.out)))
    for name, value in rows:
        print(f"{name:15} {value}")
    return 0
