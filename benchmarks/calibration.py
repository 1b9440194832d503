"""How well AutoFlow's defaults calibrate against Pyro's AutoIAFNormal at the same budget.

    python benchmarks/calibration.py [--steps 1500] [--seeds 7] [--draws 4000]

Each guide is fitted with Pyro's ``Trace_ELBO`` (8 vectorized particles, Adam, lr 1e-2, the
same steps) to three standard posteriors: non-centred eight schools, a 31-D Bayesian logistic
regression and Neal's 10-D funnel. Then ``--draws`` importance weights ``p(x, z) / q(z)``
give the Pareto k-hat of PSIS (arviz; below 0.7 the importance estimates are usable, Yao et
al. 2018) and the importance ESS as a share of the draws. Medians over seeds. Prints a table
and writes benchmarks/results/calibration.json.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import common
import guides
import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal

import pyroflows as pf
from pyroflows import posteriors
from pyroflows.infer import weights

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

POSTERIORS = {
    "eight-schools-noncentred": lambda device: (posteriors.eight_schools(device), 10),
    "logistic-31d": guides.logistic,
    "funnel-10d": guides.funnel,
}
GUIDES = {
    "pyro AutoIAFNormal": lambda model: AutoIAFNormal(model),
    "pyroflows AutoFlow iaf (defaults: 1 layer)": lambda model: pf.AutoFlow(model),
    "pyroflows AutoFlow iaf, 2 layers": lambda model: pf.AutoFlow(model, num_layers=2),
}


def diagnose(model, guide, draws: int) -> tuple[float, float, float]:
    """(k-hat, ESS / draws, ELBO) from ``draws`` importance weights."""
    _, lw, _ = weights.weighted_draws(model, guide, (), {}, draws, chunk=draws)
    lw = lw.double().cpu()
    _, k_hat = pf.diagnostics.psis(lw)
    ess = torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)).item()
    return k_hat, ess / draws, lw.mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, default=7)
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    device = common.cuda_device(args.device)
    torch.set_num_threads(args.threads)
    figures = {}
    for name, make in POSTERIORS.items():
        model, dim = make(device)
        print(f"\n{name} (d={dim}): median over {args.seeds} seeds")
        print(f"  {'guide':44s} {'k-hat':>6s} {'ESS %':>6s} {'ELBO':>9s}")
        figures[name] = {}
        for label, make_guide in GUIDES.items():
            rows = []
            for seed in range(args.seeds):
                pyro.clear_param_store()
                pyro.set_rng_seed(seed)
                guide = make_guide(model)
                optim = pyro.optim.Adam({"lr": 1e-2})
                svi = SVI(model, guide, optim, Trace_ELBO(8, vectorize_particles=True))
                for _ in range(args.steps):
                    svi.step()
                guide.to(device)
                rows.append(diagnose(model, guide, args.draws))
            k_hat, ess, elbo = (statistics.median(column) for column in zip(*rows, strict=True))
            figures[name][label] = {
                "k_hat": k_hat, "ess_share": ess, "elbo": elbo,
                "per_seed": [dict(zip(("k_hat", "ess_share", "elbo"), r, strict=True))
                             for r in rows],
            }  # fmt: skip
            print(f"  {label:44s} {k_hat:6.2f} {100 * ess:6.1f} {elbo:9.3f}")
    common.write("calibration", device, {"steps": args.steps, "seeds": args.seeds,
                                          "draws": args.draws, "results": figures},
                 pyro=pyro.__version__, arviz=az.__version__)  # fmt: skip


if __name__ == "__main__":
    main()
