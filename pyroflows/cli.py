"""The ``pyroflows`` command."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from . import _checks
from .flows import RECIPES

# the recipes whose layers have a network of their own (other layers have one only when amortized)
NETWORK_RECIPES = ("iaf", "maf", "nice", "realnvp", "glow", "cnf", "nsf-ar", "nsf-coupling")
# per recipe (layers, steps) for the demo: a continuous-time flow is deep on its own
DEMO_DEFAULTS = {"cnf": (1, 500)}
DEMO_FALLBACK = (6, 1500)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _out_folder(text: str) -> Path:
    """The folder results go to, checked before any training: an existing writable folder,
    or a new one in an existing writable parent (created once every argument is checked, so
    that a refused command leaves nothing behind)."""
    path = Path(text)
    if path.exists():
        if not path.is_dir() or not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"cannot write to {str(path)!r}")
        return path
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {str(path.parent)!r} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot create {str(path)!r} in {str(path.parent)!r}")
    return path


def _version() -> str:
    try:
        return version("pyroflows")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def parser() -> argparse.ArgumentParser:
    """The ``pyroflows`` command's arguments: ``demo``, ``sample``, ``vae`` and ``density``.

    >>> parser().parse_args(["demo", "--flow", "iaf"]).flow
    'iaf'
    """
    out = argparse.ArgumentParser(prog="pyroflows", description=__doc__)
    out.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = out.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="fit a flow to a 2-D banana density by reverse KL",
        description="Fit a flow to a 2-D banana density whose log Z is known, by reverse KL, "
        "then estimate log Z by importance sampling and compare.",
    )
    demo.add_argument(
        "--flow", default="realnvp", choices=list(RECIPES), help="the recipe (default: %(default)s)"
    )
    demo.add_argument(
        "--layers",
        type=_positive_int,
        default=None,
        help=f"number of layers (default: {DEMO_FALLBACK[0]}; cnf: 1)",
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help=f"optimisation steps (default: {DEMO_FALLBACK[1]}; cnf: 500)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)"
    )
    demo.add_argument(
        "--vae-epochs",
        type=int,
        default=100,
        help="epochs of the VAE with an IAF posterior on the bundled digits, 0 to skip "
        "(default: 100)",
    )
    demo.add_argument(
        "--out",
        type=_out_folder,
        default="pyroflows-demo",
        help="folder for the figures and results.md (default: pyroflows-demo)",
    )
    _sample_parser(commands)
    from .density._command import add_parser as add_density
    from .vae._command import add_parser as add_vae

    add_vae(commands, _positive_int)
    add_density(commands, _positive_int)
    return out


def _sample_parser(commands: argparse._SubParsersAction) -> None:
    from .posteriors import POSTERIORS
    from .targets import TARGETS

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
    sample.add_argument("--dim", type=_positive_int, default=None, help="for sized targets")
    sample.add_argument(
        "--flow", default="realnvp", choices=list(RECIPES), help="the recipe (default: %(default)s)"
    )
    sample.add_argument("--layers", type=_positive_int, default=None, help="number of layers")
    sample.add_argument(
        "--hidden-dims", type=_positive_int, nargs="+", default=None, metavar="WIDTH",
        help=f"widths of each layer's network ({', '.join(NETWORK_RECIPES)}; default: the "
        "recipe's)",
    )  # fmt: skip
    sample.add_argument("--steps", type=_positive_int, default=2000, help="default: %(default)s")
    sample.add_argument("--particles", type=_positive_int, default=256, help="draws per step")
    sample.add_argument("--lr", type=float, default=3e-3, help="default: %(default)s")
    sample.add_argument("--estimator", default="standard", choices=["standard", "stl"])
    sample.add_argument(
        "--warmup-steps",
        type=int,
        default=0,
        help="steps of tempering from the flow's base to the target (default: 0)",
    )
    sample.add_argument("--num-eval", type=_positive_int, default=10_000, help="evaluation draws")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    sample.add_argument(
        "--repeats", type=_positive_int, default=1,
        help="fits with seeds seed, seed+1, ...: their k-hats are reported and plotted; the "
        "first fit's draws are written (default: 1)",
    )  # fmt: skip
    sample.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    sample.add_argument("--out", type=Path, required=True, help="folder for the results")


def _run_sample(cli: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import json

    from . import fit, plots, posteriors, targets

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
        args.out.mkdir(parents=True, exist_ok=True)
        fits = [
            fit(
                target, args.flow, num_layers=args.layers, steps=args.steps,
                particles=args.particles, lr=args.lr, estimator=args.estimator,
                warmup_steps=args.warmup_steps, num_eval=args.num_eval, seed=args.seed + i,
                device=args.device, **options,
            )
            for i in range(args.repeats)
        ]  # fmt: skip
    except (ValueError, OSError) as error:
        cli.error(str(error))
    r = fits[0]
    d = r.diagnostics
    dim = r.guide.latent_dim if r.guide is not None else target.dim
    exact_log_z = getattr(target, "log_z", None)
    report = {
        "target": args.target, "dim": dim, "flow": args.flow, "hidden_dims": args.hidden_dims,
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pyroflows`` command with ``argv`` (default: ``sys.argv[1:]``); the exit code.

    >>> main(["sample", "--target", "nowhere"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    SystemExit: 2
    """
    cli = parser()
    args = cli.parse_args(argv)
    if args.command == "sample":
        return _run_sample(cli, args)
    if args.command == "vae":
        from .vae._command import run

        return run(cli, args)
    if args.command == "density":
        from .density._command import run as run_density

        return run_density(cli, args)
    if args.command != "demo":
        cli.print_help()
        return 0
    return _run_demo(cli, args)


def _run_demo(cli: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .demo import run_demo, run_vae_demo

    layers, steps = DEMO_DEFAULTS.get(args.flow, DEMO_FALLBACK)
    layers, steps = args.layers or layers, args.steps or steps
    plot = args.out / "banana.png"
    try:
        if args.vae_epochs < 0:
            raise ValueError(f"--vae-epochs: expected 0 or more, got {args.vae_epochs}")
        _checks.device("--device", args.device)
        try:
            args.out.mkdir(exist_ok=True)
        except OSError as error:
            raise ValueError(f"--out: cannot create {str(args.out)!r}: {error}") from None
        r = run_demo(args.flow, layers, steps, seed=args.seed, plot=plot, device=args.device)
        vae = None
        if args.vae_epochs:
            print("VAE with an IAF posterior on the bundled 8x8 digits")
            vae = run_vae_demo(args.vae_epochs, args.out, seed=args.seed, device=args.device)
    except ValueError as error:  # bad option values: a message, not a traceback
        cli.error(str(error))
    off = abs(r.log_z - r.exact_log_z) / r.log_z_stderr if r.log_z_stderr else math.inf
    rows = [
        ("banana: flow", f"{r.flow} x {layers} layers, {steps} steps"),
        ("ELBO", f"{r.elbo:.4f}"),
        ("log Z (IS)", f"{r.log_z:.4f} +- {r.log_z_stderr:.4f}"),
        ("log Z (exact)", f"{r.exact_log_z:.4f} (estimate off by {off:.1f} standard errors)"),
        ("PSIS k-hat", f"{r.k_hat:.2f} ({r.verdict})"),
        ("KL(q || p)", f"{r.exact_log_z - r.elbo:.4f}"),
    ]
    if vae is not None:
        rows += [
            ("VAE: posterior", f"IAF x 2 layers, 8 latents, {vae['epochs']} epochs"),
            ("test -ELBO", f"{vae['neg_elbo']:.2f} nats per image"),
            ("test NLL", f"{vae['nll']:.2f} +- {vae['nll_stderr']:.2f} (1000 samples)"),
        ]
    rows.append(("written", str(args.out)))
    table = ["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)]
    (args.out / "results.md").write_text("\n".join(table) + "\n")
    for name, value in rows:
        print(f"{name:15} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
