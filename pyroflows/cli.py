"""The ``pyroflows`` command."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from . import _checks
from .flows import RECIPES

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
    from ._sample_command import add_parser as add_sample
    from .density._command import add_parser as add_density
    from .vae._command import add_parser as add_vae

    add_sample(commands, _positive_int)
    add_vae(commands, _positive_int)
    add_density(commands, _positive_int)
    return out


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
        from ._sample_command import run as run_sample

        return run_sample(cli, args)
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
