"""The CNF's exact trace in closed form against its vector-Jacobian rows and Hutchinson's
estimate, in the MNIST VAE with FFJORD's amortized low-rank dynamics.

    python benchmarks/cnf_trace.py [--device cuda] [--rounds 5] [--steps 5] [--threads 1]

The VAE of the table (784-300-300 MLPs, 64 latents, one CNF layer with dynamics 64-64 tanh
and per-image rank-16 updates, batch 100), trained ``--pretrain`` steps on one batch with
Hutchinson's estimate first. Contenders, each its own copy of that VAE on the same batch,
taking turns within every round:

- ``closed form``: ``trace="exact"`` from the activations' slopes and per-image weights
  computed once per solve (no derivative taken inside the dynamics);
- ``rows``: ``trace="exact"`` from all 64 rows of ``∂f/∂z`` (one batched vector-Jacobian
  product per evaluation, differentiated again in training), the path for dynamics deeper
  than two hidden layers;
- ``hutchinson``: FFJORD's one-probe estimate (training only: evaluation needs the exact
  trace);
- ``closed form, checkpoint``: the closed form with ``checkpoint=True`` (training only), the
  per-image weights and the context's term still computed once per solve.

Timed: a training step (``VAE.loss``, backward, Adamax) and the test evaluation
(``pyroflows.vae.evaluate``, -ELBO and the NLL with ``--samples`` importance samples on
``--images`` test images). Reported: median time, the per-round ratio to ``rows`` (median,
min-max; for a training step also to ``hutchinson`` and to ``closed form``), dynamics
evaluations per forward solve, peak memory of one call, and for the evaluation the figures
themselves (closed form and rows must agree). Writes benchmarks/results/cnf_trace.json
(cnf_trace-cuda.json on CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import warnings
from unittest import mock

import common
import torch
from vae import images

import pyroflows as pf
from pyroflows.transforms import Continuous
from pyroflows.transforms.dynamics import Dynamics
from pyroflows.vae import VAE, evaluate

# each contender's trace and whether it checkpoints its steps
SETTINGS = {
    "closed form": ("exact", False),
    "rows": ("exact", False),
    "hutchinson": ("hutchinson", False),
    "closed form, checkpoint": ("exact", True),
}


def trace_path(name: str) -> contextlib.AbstractContextManager:
    """Within the block, ``rows`` takes the vector-Jacobian route for every network."""
    if name != "rows":
        return contextlib.nullcontext()
    return mock.patch.object(Dynamics, "closed_form_trace", property(lambda self: False))


def flow_of(vae: VAE) -> Continuous:
    return next(m for m in vae.modules() if isinstance(m, Continuous))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="training steps per round")
    parser.add_argument("--images", type=int, default=10, help="test images evaluated")
    parser.add_argument("--samples", type=int, default=100, help="importance samples (NLL)")
    parser.add_argument("--pretrain", type=int, default=200,
                        help="Hutchinson training steps on the batch before timing")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", "log_marginal_likelihood: importance ESS")
    torch.set_num_threads(args.threads)
    device = common.cuda_device(args.device)
    x, source = images(100, device)
    test = pf.vae.load(common.MNIST).test[: args.images].to(device) if common.MNIST.exists() else x
    torch.manual_seed(0)
    vae = VAE((28, 28), 64, "cnf", 1, hidden_dim=300, rank=16).to(device)
    adamax = torch.optim.Adamax(vae.parameters(), lr=5e-4)
    flow_of(vae).trace = "hutchinson"
    for _ in range(args.pretrain):  # away from the initial dynamics (zero per-image updates)
        adamax.zero_grad()
        vae.loss(x).backward()
        adamax.step()
    vaes = {name: copy.deepcopy(vae) for name in SETTINGS}
    optimizers = {name: torch.optim.Adamax(v.parameters(), lr=5e-4) for name, v in vaes.items()}
    nfe = {name: [] for name in SETTINGS}
    for name, v in vaes.items():
        flow_of(v).trace, flow_of(v).checkpoint = SETTINGS[name]

    def step(name: str) -> None:
        with trace_path(name):
            optimizers[name].zero_grad(set_to_none=False)
            loss = vaes[name].loss(x)
            nfe[name].append(flow_of(vaes[name]).nfe_forward)
            loss.backward()
            optimizers[name].step()

    figures = {}

    def evaluation(name: str) -> None:
        with trace_path(name):
            torch.manual_seed(1)
            figures[name] = evaluate(vaes[name], test, num_samples=args.samples)

    rows = []
    print(f"{'call':11}{'trace':24}{'ms':>10}  {'ratio to rows':20}{'NFE':>6}{'peak MiB':>10}")
    for call, fn, names, repeat in (
        ("train step", step, list(SETTINGS), args.steps),
        ("evaluation", evaluation, ["closed form", "rows"], 1),
    ):
        for name in names:
            if call == "evaluation":  # the same weights for both
                vaes[name].load_state_dict(vaes["rows"].state_dict())
            fn(name)  # warm-up
            nfe[name].clear()
        calls = {name: lambda name=name, fn=fn: fn(name) for name in names}
        timed = common.alternate(calls, args.rounds, device, repeat=repeat)
        for name, t in timed.items():
            peak = t["peak_mib"] if device.type == "cuda" else common.cpu_peak_mib(calls[name])
            row = {"call": call, "trace": name, "ms": 1e3 * statistics.median(t["seconds"]),
                   "ratio_to_rows": common.ratio(t["seconds"], timed["rows"]["seconds"]),
                   "peak_mib": peak, "seconds": t["seconds"]}  # fmt: skip
            if call == "train step":
                row["nfe_forward"] = statistics.mean(nfe[name])
                hutchinson = timed["hutchinson"]["seconds"]
                row["ratio_to_hutchinson"] = common.ratio(t["seconds"], hutchinson)
                direct = timed["closed form"]["seconds"]
                row["ratio_to_closed_form"] = common.ratio(t["seconds"], direct)
            else:
                row["figures"] = figures[name]
            rows.append(row)
            evaluations = f"{row['nfe_forward']:.0f}" if "nfe_forward" in row else "-"
            ratio = common.ratio_text(row["ratio_to_rows"])
            print(f"{call:11}{name:24}{row['ms']:10.1f}  {ratio:20}{evaluations:>6}{peak:10.1f}")
    closed_step = common.ratio_text(rows[0]["ratio_to_hutchinson"])
    print(f"train step, closed form / hutchinson: {closed_step}")
    checkpointed = common.ratio_text(rows[3]["ratio_to_closed_form"])
    print(f"train step, closed form with checkpoint=True / without: {checkpointed}")
    closed, by_rows = figures["closed form"], figures["rows"]
    print(f"NLL: closed form {closed['nll']:.4f}, rows {by_rows['nll']:.4f}")
    settings = {"rounds": args.rounds, "steps": args.steps, "pretrain": args.pretrain,
                "batch": 100, "images": source,
                "test_images": args.images, "importance_samples": args.samples,
                "latent_dim": 64, "dynamics": "64-64 tanh", "rank": 16}  # fmt: skip
    common.write("cnf_trace", device, {"settings": settings, "rows": rows})


if __name__ == "__main__":
    main()
