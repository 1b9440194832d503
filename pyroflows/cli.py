"""The ``pyroflows`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

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


def _plot_path(text: str) -> Path | None:
    """The file the plot will be written to (``.png`` added as matplotlib would), checked
    writable now rather than after training; ``''`` for no plot."""
    if not text:
        return None
    path = Path(text)
    if not path.suffix:
        path = path.with_suffix(".png")
    folder = path.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {str(path)!r}")
    return path


def _version() -> str:
    try:
        return version("pyroflows")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def parser() -> argparse.ArgumentParser:
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
        "--plot",
        type=_plot_path,
        default="banana.png",
        help="where to save the plot, '' for none (default: banana.png)",
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    if args.command != "demo":
        cli.print_help()
        return 0
    from .demo import run_demo

    layers, steps = DEMO_DEFAULTS.get(args.flow, DEMO_FALLBACK)
    layers, steps = args.layers or layers, args.steps or steps
    try:
        r = run_demo(args.flow, layers, steps, seed=args.seed, plot=args.plot, device=args.device)
    except ValueError as error:  # bad option values: a message, not a traceback
        cli.error(str(error))
    print(f"flow            {r.flow} x {layers} layers, {steps} steps")
    print(f"ELBO            {r.elbo:.4f}")
    print(f"log Z (IS)      {r.log_z:.4f} +- {r.log_z_stderr:.4f}")
    print(f"log Z (exact)   {r.exact_log_z:.4f}")
    print(f"KL(q || p)      {r.exact_log_z - r.elbo:.4f}")
    if args.plot:
        print(f"plot            {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
