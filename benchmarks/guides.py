"""SVI step time of AutoFlow against Pyro's guide of the same family, on three posteriors.

    python benchmarks/guides.py [--device cuda] [--rounds 7] [--steps 20] [--threads 1 2]

Each round times ``--steps`` SVI steps of every contender in turn (alternating, after a
warm-up), and a contender's figure is the median over rounds with the min-max spread of its
per-round ratio to the peer of the same family: ``AutoIAFNormal`` for ``iaf``,
``AutoNormalizingFlow`` with Pyro's planar, radial and Householder-Sylvester layers for those
recipes, and with Pyro's rational-quadratic ``SplineAutoregressive`` and ``SplineCoupling``
for ``nsf-ar`` and ``nsf-coupling`` (8 bins on [-5, 5], one hidden layer of ``3 dim + 1``
units in both libraries), and ``AutoMultivariateNormal`` as the floor. Every contender uses Pyro's
``Trace_ELBO`` with vectorized particles, Pyro's fastest path for these guides. Peak memory
is the RSS growth of a fresh process over the guide's construction and ``--steps`` steps (CPU),
or CUDA max allocated during the steps above what was allocated before them (GPU).
Prints a table and writes benchmarks/results/guides.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common
import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormalizingFlow
from transforms import BINS, BOUND, pyro_spline_autoregressive, pyro_spline_coupling

import pyroflows as pf

LAYERS = 2


def gaussian(device):
    data = torch.randn(50, 3, device=device) + 1.0

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(3, device=device), 2.0).to_event(1))
        with pyro.plate("data", 50):
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=data)

    return model, 3


def funnel(device):
    def model():
        v = pyro.sample("v", dist.Normal(torch.tensor(0.0, device=device), 3.0))
        scale = (v / 2).exp().unsqueeze(-1)
        pyro.sample("x", dist.Normal(torch.zeros(9, device=device), scale).to_event(1))

    return model, 10


def logistic(device):
    """Bayesian logistic regression, 30 standardised features and a bias, 500 points."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 30, generator=generator)
    truth = torch.randn(30, generator=generator) / 2
    y = torch.bernoulli(torch.sigmoid(x @ truth), generator=generator)
    x, y = x.to(device), y.to(device)

    def model():
        w = pyro.sample("w", dist.Normal(torch.zeros(30, device=device), 1.0).to_event(1))
        b = pyro.sample("b", dist.Normal(torch.tensor(0.0, device=device), 5.0))
        with pyro.plate("data", len(y)):
            logits = (w * x).sum(-1) + b  # (particles, data) when vectorized
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)

    return model, 31


POSTERIORS = {"gaussian-3d": gaussian, "funnel-10d": funnel, "logistic-31d": logistic}


def spline_width(dim: int) -> list[int]:
    return [3 * dim + 1]  # one hidden layer of AutoIAFNormal's width, for both libraries


def pyro_layers(kind: str):
    make = {
        "planar": T.planar,
        "radial": T.radial,
        "sylvester-h": functools.partial(T.sylvester, count_transforms=4),
        "nsf-ar": lambda d: pyro_spline_autoregressive(d, spline_width(d)),
        "nsf-coupling": lambda d: pyro_spline_coupling(d, spline_width(d)),
    }[kind]

    def init(dim):
        return T.ComposeTransformModule([make(dim) for _ in range(LAYERS)])

    return init


def contenders(model, dim: int):
    """(label, family, make guide); the peer of each family comes first."""
    out = [("pyro AutoIAFNormal", "iaf", lambda: AutoIAFNormal(model, num_transforms=LAYERS))]
    out.append(("pyroflows iaf", "iaf", lambda: pf.AutoFlow(model, "iaf", LAYERS)))
    for kind in ("planar", "radial", "sylvester-h", "nsf-ar", "nsf-coupling"):
        options = {"num_householder": 4} if kind == "sylvester-h" else {}
        if kind.startswith("nsf"):
            options = {"hidden_dims": spline_width(dim), "bins": BINS, "bound": BOUND}
        out.append(
            (f"pyro {kind}", kind, lambda k=kind: AutoNormalizingFlow(model, pyro_layers(k)))
        )
        out.append(
            (
                f"pyroflows {kind}",
                kind,
                lambda k=kind, o=options: pf.AutoFlow(model, k, LAYERS, **o),
            )
        )
    out.append(("pyro AutoMultivariateNormal", "mvn", lambda: AutoMultivariateNormal(model)))
    return out


def peak_rss_mib(reset: bool = False) -> float:
    """This process's peak RSS (Linux ``VmHWM``); ``reset`` first lowers the mark to the
    current RSS, so that a later call gives the peak since then."""
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def step_memory(posterior: str, label: str, steps: int) -> float:
    """Peak RSS growth (MiB) of a fresh process from before the guide is built to after
    ``steps`` SVI steps: the guide's parameters and optimiser state plus a step's peak."""
    code = (
        f"import guides, sys; print(guides.fresh_process_memory({posterior!r}, {label!r}, {steps}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).parent, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def fresh_process_memory(posterior: str, label: str, steps: int) -> float:
    torch.set_num_threads(1)
    model, dim = POSTERIORS[posterior](torch.device("cpu"))
    makers = {name: m for name, _, m in contenders(model, dim)}
    make, floor = makers[label], makers["pyro AutoMultivariateNormal"]
    _svi(model, floor, "warm-up", torch.device("cpu")).step()  # torch's one-time set-up
    before = peak_rss_mib(reset=True)
    svi = _svi(model, make, label, torch.device("cpu"))
    for _ in range(steps):
        svi.step()
    return peak_rss_mib() - before


def _svi(model, make, label: str, device) -> SVI:
    pyro.set_rng_seed(0)
    guide = make()
    guide._pyro_name = label.replace(" ", "_")  # own names in Pyro's global param store
    guide()
    guide.to(device)
    svi = SVI(
        model,
        guide,
        pyro.optim.Adam({"lr": 1e-3}),
        Trace_ELBO(num_particles=8, vectorize_particles=True),
    )
    svi.step()
    return svi


def bench(posterior: str, rounds: int, steps: int, device) -> dict:
    pyro.clear_param_store()
    model, dim = POSTERIORS[posterior](device)
    runs, failures = [], {}
    for label, family, make in contenders(model, dim):
        try:
            svi = _svi(model, make, label, device)
        except RuntimeError as error:  # Pyro's Sylvester builds a CPU matrix: fails on CUDA
            if not label.startswith("pyro "):
                raise
            failures[label] = str(error).splitlines()[0]
            continue
        for _ in range(2):
            svi.step()
        runs.append({"label": label, "family": family, "svi": svi, "times": [], "mem": 0.0})
    for _ in range(rounds):
        for run in runs:  # alternate contenders within each round
            before = common.cuda_peak_reset(device)
            start = time.perf_counter()
            for _ in range(steps):
                run["svi"].step()
            common.sync(device)
            if device.type == "cuda":
                run["mem"] = max(run["mem"], common.cuda_peak_mib(device, before))
            run["times"].append((time.perf_counter() - start) / steps)
    if device.type == "cpu":
        for run in runs:
            run["mem"] = step_memory(posterior, run["label"], steps)
    peers = {r["family"]: r for r in runs if r["label"].startswith("pyro ")}
    out = {label: {"fails": reason} for label, reason in failures.items()}
    for run in runs:
        peer = peers.get(run["family"])
        ratio = common.ratio(run["times"], peer["times"]) if peer else None
        out[run["label"]] = {
            "family": run["family"],
            "peer": peer["label"] if peer else None,
            "step_ms": 1e3 * statistics.median(run["times"]),
            "ratio_to_peer": ratio and ratio["median"],
            "ratio_spread": ratio and ratio["spread"],
            "peak_mib": run["mem"],
        }
    return out


def estimator_costs(posterior: str, rounds: int, steps: int, device) -> dict:
    """Step time of STL and DReG against the standard ELBO and IWAE step with the same
    AutoFlow guide: the price of the stopped-parameter pass (the flow's inverse at the
    samples just drawn)."""
    model, _ = POSTERIORS[posterior](device)
    out = {}
    for recipe in ("iaf", "planar", "radial", "sylvester-h"):
        pyro.clear_param_store()
        options = {"num_householder": 4} if recipe == "sylvester-h" else {}
        guide = pf.AutoFlow(model, recipe, LAYERS, **options)
        guide()
        guide.to(device)
        objectives = {
            "elbo": pf.infer.ELBO(8),
            "elbo-stl": pf.infer.ELBO(8, "stl"),
            "iwae": pf.infer.IWAE(8),
            "iwae-dreg": pf.infer.IWAE(8, "dreg"),
        }
        runs = {}
        for label, objective in objectives.items():
            svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-4}), objective)
            for _ in range(2):
                svi.step()
            runs[label] = (svi, [])
        for _ in range(rounds):
            for svi, times in runs.values():
                _sync(device)
                start = time.perf_counter()
                for _ in range(steps):
                    svi.step()
                _sync(device)
                times.append((time.perf_counter() - start) / steps)
        for label, base in (("elbo-stl", "elbo"), ("iwae-dreg", "iwae")):
            ratios = [a / b for a, b in zip(runs[label][1], runs[base][1], strict=True)]
            out[f"{recipe} {label}"] = {
                "step_ms": 1e3 * statistics.median(runs[label][1]),
                "ratio_to_standard": statistics.median(ratios),
                "ratio_spread": [min(ratios), max(ratios)],
            }
    return out


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _table(title: str, rows: dict) -> None:
    print(f"\n{title} [spread]")
    for label, r in rows.items():
        if "fails" in r:
            print(f"  {label:30s} fails here: {r['fails']}")
            continue
        ratio = r.get("ratio_to_peer", r.get("ratio_to_standard"))
        if ratio is None:
            print(f"  {label:30s} {r['step_ms']:8.2f}  (no peer here)")
            continue
        lo, hi = r["ratio_spread"]
        memory = f"  peak {r['peak_mib']:.1f} MiB" if "peak_mib" in r else ""
        print(f"  {label:30s} {r['step_ms']:8.2f}  {ratio:.2f} [{lo:.2f}-{hi:.2f}]{memory}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    device = common.cuda_device(args.device)
    figures = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, make in POSTERIORS.items():
            _, dim = make(device)
            result = bench(name, args.rounds, args.steps, device)
            figures[f"{name} threads={threads}"] = result
            _table(f"{name} (d={dim}), {threads} thread(s): step ms, ratio to peer", result)
    torch.set_num_threads(args.threads[0])
    for name in ("funnel-10d", "logistic-31d"):
        costs = estimator_costs(name, args.rounds, args.steps, device)
        figures[f"{name} estimators threads={args.threads[0]}"] = costs
        _table(f"{name}, {args.threads[0]} thread(s): STL / DReG against standard", costs)
    common.write(
        "guides",
        device,
        {"rounds": args.rounds, "steps": args.steps, "results": figures},
        pyro=pyro.__version__,
    )


if __name__ == "__main__":
    main()
