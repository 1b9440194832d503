"""The ``pyroflows`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .flows import RECIPES


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyroflows", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    demo = commands.add_parser("demo", help="fit a flow to a 2-D banana density by reverse KL")
    demo.add_argument("--flow", default="realnvp", choices=list(RECIPES))
    demo.add_argument("--layers", type=int, default=6)
    demo.add_argument("--steps", type=int, default=1500)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--plot", default="banana.png", help="where to save the plot ('' for none)")
    args = parser.parse_args(argv)
    if args.command != "demo":
        parser.print_help()
        return 0
    from .demo import run_demo

    r = run_demo(args.flow, args.layers, args.steps, seed=args.seed, plot=args.plot or None)
    print(f"flow            {r.flow} x {args.layers} layers, {args.steps} steps")
    print(f"ELBO            {r.elbo:.4f}")
    print(f"log Z (IS)      {r.log_z:.4f} +- {r.log_z_stderr:.4f}")
    print(f"log Z (exact)   {r.exact_log_z:.4f}")
    print(f"KL(q || p)      {r.exact_log_z - r.elbo:.4f}")
    if args.plot:
        print(f"plot            {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
