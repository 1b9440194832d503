"""RNODE regularization of a CNF fitted to data: solver evaluations, time and accuracy by λ.

``pyroflows.fit_data(x, "cnf", regularization=λ)`` on draws of a 2-D target with a known
density, one model per λ from the same seed and batches. Reported per λ: the solver's
function evaluations per training batch (first and last epoch) and per evaluation of the
held-out rows, the held-out KL(p || q) (the target's log density minus the model's, averaged
over exact draws), the time of one training step and of the held-out log density (the models
taking turns, median of the rounds, ratio to λ = 0 with its min-max spread) and the peak
memory of each::

    python benchmarks/cnf_regularization.py [--target ring] [--strengths 0 0.01 0.1]
        [--epochs 30] [--device cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
import torch

import pyroflows as pf
from pyroflows._training import SolverTerms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="ring", help="a 2-D target with log Z and a sampler")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.01, 0.1])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--rows", type=int, default=5000, help="training rows (and test rows)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = common.cuda_device(args.device)
    target = pf.targets.target(args.target).to(device)
    torch.manual_seed(0)
    x, test = target.sample((args.rows,)), target.sample((args.rows,))
    options = {"num_layers": 1, "hidden_dims": tuple(args.hidden), "epochs": args.epochs,
               "batch_size": args.batch_size, "lr": args.lr, "patience": None,
               "device": device, "progress": False}  # fmt: skip
    fits, rows = {}, []
    for strength in args.strengths:
        torch.manual_seed(1)
        start = time.perf_counter()
        fits[strength] = pf.fit_data(x, "cnf", regularization=strength, **options)
        rows.append({"strength": strength, "train_seconds": time.perf_counter() - start,
                     "stopped": fits[strength].stopped})  # fmt: skip
    batch = x[: args.batch_size]

    def step(strength: float) -> None:  # one training step's loss and gradients, no update
        model = fits[strength].model
        terms = SolverTerms(model, strength, "model")
        model.zero_grad(set_to_none=True)
        with terms.switched_on():
            terms.start_step()
            nll = -model.log_prob(batch).mean()
            (nll + terms.penalty().mean() if strength else nll).backward()

    def density(strength: float) -> None:
        with torch.no_grad():
            fits[strength].model.log_prob(test)

    timed = {}
    for what, call in (("step", step), ("density", density)):
        calls = {s: (lambda s=s, call=call: call(s)) for s in args.strengths}
        for c in calls.values():  # warm-up
            c()
        timed[what] = common.alternate(calls, args.rounds, device)
        for row, strength in zip(rows, args.strengths, strict=True):
            seconds = timed[what][strength]["seconds"]
            peak = timed[what][strength]["peak_mib"]
            if device.type == "cpu":
                peak = common.cpu_peak_mib(calls[strength])
            row[f"{what}_ms"] = 1e3 * statistics.median(seconds)
            row[f"{what}_ratio"] = common.ratio(seconds, timed[what][args.strengths[0]]["seconds"])
            row[f"{what}_peak_mib"] = peak
    print(f"{'lambda':>7}{'nfe first':>10}{'nfe last':>9}{'nfe test':>9}{'KL(p||q)':>10}"
          f"{'step ms':>9}{'vs first':>18}{'log p ms':>9}{'vs first':>18}")  # fmt: skip
    for row, strength in zip(rows, args.strengths, strict=True):
        fit = fits[strength]
        model = fit.model
        layer = next(m for m in model.modules() if isinstance(m, pf.transforms.Continuous))
        with torch.no_grad():
            log_q = model.log_prob(test)
        row |= {
            "nfe_first_epoch": fit.history[0]["nfe_mean"],
            "nfe_last_epoch": fit.history[-1]["nfe_mean"],
            "nfe_max_last_epoch": fit.history[-1]["nfe_max"],
            "nfe_test": layer.nfe_forward,
            "kl_test": (target.log_prob(test) - target.log_z - log_q).mean().item(),
            "valid_nll": fit.history[-1]["valid_nll"],
            "nfe_by_epoch": [h["nfe_mean"] for h in fit.history],
        }
        print(f"{strength:7.3g}{row['nfe_first_epoch']:10.1f}{row['nfe_last_epoch']:9.1f}"
              f"{row['nfe_test']:9d}{row['kl_test']:10.4f}{row['step_ms']:9.1f}"
              f"{common.ratio_text(row['step_ratio']):>18}{row['density_ms']:9.1f}"
              f"{common.ratio_text(row['density_ratio']):>18}")  # fmt: skip
    settings = {"target": args.target, "rows": args.rows, "epochs": args.epochs,
                "batch_size": args.batch_size, "lr": args.lr, "hidden": args.hidden,
                "rounds": args.rounds, "flow": "cnf, 1 layer, default solver (dopri5, exact "
                "trace in 2-D), Adam"}  # fmt: skip
    common.write("cnf_regularization", device, {"settings": settings, "rows": rows})


if __name__ == "__main__":
    main()
