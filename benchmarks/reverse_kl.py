"""Reverse-KL fits to standard targets: ESS, PSIS k-hat, log Z error and time per step,
pyroflows' recipes against Pyro's guides at the same budget.

    python benchmarks/reverse_kl.py [--device cuda] [--steps 2000] [--particles 256]
        [--targets u1 funnel ...] [--flows realnvp sylvester-h ...] [--merge]

Every contender gets the same steps, particles per step, optimiser (Adam, ``--lr``, cosine
schedule to zero) and seed. pyroflows fits each density with :func:`pyroflows.fit`; Pyro's
guides (``AutoIAFNormal`` with 2 layers; ``AutoNormalizingFlow`` with 8 planar layers and with
2 block neural autoregressive layers) fit the density written as a Pyro model with
``Trace_ELBO`` and vectorized particles, Pyro's fastest path; the logistic regression is a
Pyro model already, which pyroflows fits through ``AutoFlow``. Then
``--num-eval`` draws of each give the importance ESS, the PSIS k-hat (arviz) and log Z, whose
error is reported where the target's log Z is known. Time per step is the mean over the fit
(fits run one after another, so compare ratios of like with like). ``--flows`` also takes
named settings of a recipe (``VARIANTS``: ``iaf-1x128-stl``, one IAF layer of width 128 with
STL, the funnel's best; ``iaf-1x64-stl``, the same at width 64). Prints a table and writes
benchmarks/results/reverse_kl.json (reverse_kl-cuda.json on CUDA); ``--merge`` keeps the rows
of what it did not run.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import time
import warnings
from collections.abc import Callable

import common
import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoNormalizingFlow

import pyroflows as pf
from pyroflows.infer import weights
from pyroflows.posteriors import POSTERIORS

TARGETS = {  # name: (target name, dim)
    "u1": ("u1", None), "u2": ("u2", None), "u3": ("u3", None), "u4": ("u4", None),
    "ring": ("ring", None), "grid": ("grid", None), "gmm40": ("gmm40", None),
    "funnel-10": ("funnel", 10), "banana-10": ("banana", 10), "many-well-32": ("many-well", 32),
    "logistic-regression": ("logistic-regression", None),  # a Pyro model: pyroflows.posteriors
}  # fmt: skip


# named settings of a recipe, chosen like recipes with --flows: name -> (recipe, fit's options)
VARIANTS = {  # the funnel's best: one wide IAF layer with STL (see docs/sampling.md)
    f"iaf-1x{width}-stl": ("iaf", {"num_layers": 1, "hidden_dims": (width, width),
                                   "estimator": "stl"})
    for width in (64, 128)
}  # fmt: skip


def density(label: str, device) -> pf.targets.Target | Callable[[], None]:
    """The target by its table label: a pyroflows target, or a posterior's Pyro model."""
    name, dim = TARGETS[label]
    if name in POSTERIORS:
        return POSTERIORS[name](device)
    return pf.targets.target(name, dim).to(device)


def as_model(target: pf.targets.Target, device):
    """The density as a Pyro model whose joint is ``log p``: a wide proper site (Pyro's
    ``AutoNormalizingFlow`` places its loc by sampling it) and a factor that cancels it."""
    wide = dist.Normal(torch.zeros(target.dim, device=device), 1e4).to_event(1)

    def model():
        x = pyro.sample("x", wide)
        pyro.factor("log_p", target.log_prob(x) - wide.log_prob(x))

    return model


def pyro_guides() -> dict:
    return {
        "pyro AutoIAFNormal": lambda m: AutoIAFNormal(m, num_transforms=2),
        "pyro planar x8": lambda m: AutoNormalizingFlow(
            m, lambda d: T.ComposeTransformModule([T.planar(d) for _ in range(8)])
        ),
        "pyro block-NAF x2": lambda m: AutoNormalizingFlow(
            m, lambda d: T.ComposeTransformModule([T.block_autoregressive(d) for _ in range(2)])
        ),
    }


def fit_pyro(make, target, args, device) -> dict:
    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    is_target = isinstance(target, pf.targets.Target)
    model = as_model(target, device) if is_target else target
    guide = make(model)
    guide()
    guide.to(device)
    optimizer = pyro.optim.CosineAnnealingLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": args.lr}, "T_max": args.steps}
    )
    svi = SVI(model, guide, optimizer, Trace_ELBO(args.particles, vectorize_particles=True))
    common.sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        svi.step()
        optimizer.step()
    common.sync(device)
    step_ms = 1e3 * (time.perf_counter() - start) / args.steps
    with torch.no_grad():
        nesting = weights.plate_nesting(model, guide, (), {})
        traces = weights.traces(model, guide, (), {}, args.num_eval, nesting)
        log_w = weights.log_weights(*traces, nesting).values
    report = pf.diagnostics.importance_diagnostics(log_w, torch.zeros_like(log_w), warn=False)
    return {"step_ms": step_ms, **_figures(report, target)}


def fit_ours(flow: str, target, args, device) -> dict:
    recipe, variant = VARIANTS.get(flow, (flow, {}))
    start = time.perf_counter()
    r = pf.fit(target, recipe, steps=args.steps, particles=args.particles, lr=args.lr,
               num_eval=args.num_eval, seed=args.seed, device=device, progress=False,
               **{"estimator": args.estimator, **variant})  # fmt: skip
    common.sync(device)
    step_ms = 1e3 * (time.perf_counter() - start) / args.steps  # evaluation included: < 1 %
    out = {"step_ms": step_ms, **_figures(r.diagnostics, target)}
    if r.stopped:
        out["stopped"] = r.stopped
    if variant:
        out["options"] = variant
    return out


def _figures(d, target) -> dict:
    log_z = getattr(target, "log_z", None)  # None for a Pyro model
    error = abs(d.log_z - log_z) if log_z is not None else None
    return {"ess_percent": 100 * d.ess / d.num_samples, "k_hat": d.k_hat,
            "log_z": d.log_z, "log_z_error": error}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--particles", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--num-eval", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--flows", nargs="+", default=["realnvp", "iaf", "planar", "sylvester-h",
                        "nsf-ar", "nsf-coupling"],
                        help=f"recipes, or named settings: {', '.join(VARIANTS)}")  # fmt: skip
    parser.add_argument(
        "--estimator",
        default="standard",
        choices=["standard", "stl"],
        help="pyroflows' gradient estimator (Pyro's guides: standard)",
    )
    parser.add_argument("--no-pyro", action="store_true", help="pyroflows' recipes only")
    parser.add_argument("--merge", action="store_true",
                        help="keep the existing JSON's rows of the pairs not run now")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = common.cuda_device(args.device)
    warnings.simplefilter("ignore", RuntimeWarning)  # verdicts are in the table
    logging.getLogger("pyro").setLevel(logging.WARNING)  # "Guessed max_plate_nesting"
    rows = []
    print(f"{'target':21}{'contender':22}{'ms/step':>9}{'ESS %':>8}{'k-hat':>7}{'|log Z err|':>12}")
    for label in args.targets:
        target = density(label, device)
        contenders = {f"pyroflows {f}": functools.partial(fit_ours, f) for f in args.flows}
        if not args.no_pyro:
            contenders |= {k: functools.partial(fit_pyro, m) for k, m in pyro_guides().items()}
        for contender, run in contenders.items():
            try:
                figures = run(target, args, device)
            except (RuntimeError, ValueError) as error:  # a failed fit is a result too
                figures = {"fails": str(error).splitlines()[0]}
            rows.append({"target": label, "contender": contender, **figures})
            if "fails" in figures:
                print(f"{label:21}{contender:22} fails: {figures['fails'][:60]}")
                continue
            error = figures["log_z_error"]
            print(
                f"{label:21}{contender:22}{figures['step_ms']:9.1f}{figures['ess_percent']:8.1f}"
                f"{figures['k_hat']:7.2f}{'-' if error is None else f'{error:.3f}':>12}"
            )
    settings = {k: getattr(args, k) for k in ("steps", "particles", "lr", "num_eval", "seed",
                                              "estimator")}  # fmt: skip
    if args.merge:
        rows, settings = _merged(rows, settings, device)
    common.write("reverse_kl", device, {"settings": settings, "rows": rows},
                 pyro=pyro.__version__)  # fmt: skip


def _merged(rows: list[dict], settings: dict, device: torch.device) -> tuple[list, dict]:
    """The existing rows, each (target, contender) run now replaced or added after its
    target's rows, and the existing settings (notes included), which must be these."""
    old = json.loads(common.result_path("reverse_kl", device).read_text())
    differ = {k for k in settings if k in old["settings"] and old["settings"][k] != settings[k]}
    if differ:
        raise SystemExit(f"--merge: settings differ from the existing run's: {sorted(differ)}")
    new = {(r["target"], r["contender"]): r for r in rows}
    merged = [new.pop((r["target"], r["contender"]), r) for r in old["rows"]]
    for key, row in new.items():
        last = max((i for i, r in enumerate(merged) if r["target"] == key[0]), default=None)
        merged.insert(len(merged) if last is None else last + 1, row)
    return merged, old["settings"] | settings


if __name__ == "__main__":
    main()
