"""CNF training-step time: pyroflows' Continuous against zuko's CNF, in one run.

    python benchmarks/cnf.py [--device cuda] [--steps 20]

Maximum-likelihood training steps (log_prob through the backward-in-time solve, then
backward) on a 2-D banana and a 16-D Gaussian mixture, exact and Hutchinson traces, the same
MLP (64, 64, ELU, 3 time frequencies) and tolerances (rtol 1e-5, atol 1e-6) for both. pyroflows
runs with direct back-propagation and with the adjoint. Both train on the same batches, from
their own initialisation, timed alternately step by step; NFE counts the dynamics network's
evaluations per step (forward and backward). A ratio below 1 means pyroflows is faster.
Prints a table and writes benchmarks/results/cnf.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import common
import pyro.distributions as dist
import torch
import zuko

from pyroflows.transforms import Continuous

HIDDEN = (64, 64)
TOL = {"rtol": 1e-5, "atol": 1e-6}


def banana(n: int, generator: torch.Generator) -> torch.Tensor:
    z1 = 2 * torch.randn(n, generator=generator)
    z2 = 0.5 * (z1**2 - 4) + torch.randn(n, generator=generator)
    return torch.stack([z1, z2], -1) / 2


def mixture(dim: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    means = 2 * torch.randn(4, dim, generator=torch.Generator().manual_seed(1))

    def sample(n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.randint(4, (n,), generator=generator)
        return means[k] + 0.5 * torch.randn(n, dim, generator=generator)

    return sample


class Counter:
    """Counts calls of a module through a forward hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *_) -> None:
        self.calls += 1


def ours(dim: int, exact: bool, adjoint: bool, device: torch.device):
    flow = Continuous(
        dim,
        hidden_dims=HIDDEN,
        activation="elu",
        trace="exact" if exact else "hutchinson",
        adjoint=adjoint,
        **TOL,
    ).to(device)
    base = dist.Normal(torch.zeros(dim, device=device), 1.0).to_event(1)
    q = dist.TransformedDistribution(base, [flow])
    return flow, q.log_prob, Counter(flow.dynamics.net)


def theirs(dim: int, exact: bool, device: torch.device):
    flow = zuko.flows.CNF(dim, hidden_features=HIDDEN, exact=exact, **TOL).to(device)
    return flow, lambda x: flow().log_prob(x), Counter(flow.transform.ode)


def run(contenders: dict, sample, steps: int, batch: int, device: torch.device) -> dict:
    optimizers = {
        k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, (m, _, _) in contenders.items()
    }
    times = {k: [] for k in contenders}
    nfe = {k: [] for k in contenders}
    generator = torch.Generator().manual_seed(0)
    for step in range(steps + 2):
        x = sample(batch, generator).to(device)
        for name, (_, log_prob, counter) in contenders.items():
            before = counter.calls
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = -log_prob(x).mean()
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= 2:  # the first two steps warm up
                times[name].append(1e3 * (time.perf_counter() - start))
                nfe[name].append(counter.calls - before)
    return {
        k: {"step_ms": statistics.median(times[k]), "nfe": statistics.mean(nfe[k])}
        for k in contenders
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    device = common.cuda_device(args.device)
    targets = {"banana-2d": (2, banana), "mixture-16d": (16, mixture(16))}
    rows = []
    print(f"{'target':13}{'trace':11}{'contender':20}{'ms/step':>10}{'NFE':>8}{'ratio':>8}")
    for target, (dim, sample) in targets.items():
        for exact in (True, False):
            torch.manual_seed(0)
            contenders = {
                "pyroflows": ours(dim, exact, adjoint=False, device=device),
                "pyroflows-adjoint": ours(dim, exact, adjoint=True, device=device),
                "zuko": theirs(dim, exact, device),
            }
            result = run(contenders, sample, args.steps, args.batch, device)
            trace = "exact" if exact else "hutchinson"
            for name, figures in result.items():
                ratio = figures["step_ms"] / result["zuko"]["step_ms"]
                rows.append(
                    {
                        "target": target,
                        "dim": dim,
                        "trace": trace,
                        "contender": name,
                        **figures,
                        "ratio_to_zuko": ratio,
                    }
                )
                print(
                    f"{target:13}{trace:11}{name:20}{figures['step_ms']:10.1f}"
                    f"{figures['nfe']:8.1f}{ratio:8.2f}"
                )
    common.write(
        "cnf",
        device,
        {
            "settings": {"steps": args.steps, "batch": args.batch, "hidden": HIDDEN, **TOL},
            "rows": rows,
        },
        zuko=zuko.__version__,
    )


if __name__ == "__main__":
    main()
