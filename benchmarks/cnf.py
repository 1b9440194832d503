"""CNF training-step time: pyroflows' Continuous against zuko's CNF, in one run.

    python benchmarks/cnf.py [--device cuda] [--steps 20]

Maximum-likelihood training steps (log_prob through the backward-in-time solve, then
backward) on a 2-D banana and a 16-D Gaussian mixture, exact and Hutchinson traces, the same
MLP (64, 64, ELU, 3 time frequencies) and error control for both: rtol 1e-5, atol 1e-6, the
error measured by its largest element and the log-determinant scaled by 1e-2 (zuko's fixed
choices; ``norm="max"``, ``trace_scale=1e-2`` here). pyroflows runs with direct
back-propagation, with replayed (checkpointed) steps and with the adjoint. All train on the
same batches, from their own initialisation, timed alternately step by step; NFE counts the
dynamics network's evaluations per step (forward and backward, replays included). A ratio
below 1 means pyroflows is faster.
After training, each model's exact-trace log-density at these tolerances is compared with a
tight float64 solve ("log q error"): the accuracy each step time buys.
Prints a table and writes benchmarks/results/cnf.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import common
import pyro.distributions as dist
import torch
import zuko

from pyroflows.transforms import Continuous

HIDDEN = (64, 64)
TOL = {"rtol": 1e-5, "atol": 1e-6}
TRACE_SCALE = 1e-2  # zuko's FreeFormJacobianTransform.trace_scale, fixed there


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


@dataclass
class Contender:
    model: torch.nn.Module
    log_prob: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    exact_at: Callable[[torch.nn.Module, dict], None]  # exact trace at these tolerances
    counter: Counter = field(init=False)

    def __post_init__(self) -> None:
        net = (
            self.model.dynamics.net[-1]  # the last layer: called once per evaluation
            if isinstance(self.model, Continuous)
            else self.model.transform.ode
        )
        self.counter = Counter(net)


def ours(dim: int, exact: bool, gradients: str, device: torch.device) -> Contender:
    flow = Continuous(
        dim,
        hidden_dims=HIDDEN,
        activation="elu",
        trace="exact" if exact else "hutchinson",
        adjoint=gradients == "adjoint",
        checkpoint=gradients == "checkpoint",
        trace_scale=TRACE_SCALE,
        norm="max",
        **TOL,
    ).to(device)

    def log_prob(flow: Continuous, x: torch.Tensor) -> torch.Tensor:
        base = dist.Normal(x.new_zeros(dim), 1.0).to_event(1)
        return dist.TransformedDistribution(base, [flow]).log_prob(x)

    def exact_at(flow: Continuous, tol: dict) -> None:
        flow.trace, flow.rtol, flow.atol, flow.max_num_steps = "exact", *tol.values(), 10**5

    return Contender(flow, log_prob, exact_at)


def theirs(dim: int, exact: bool, device: torch.device) -> Contender:
    flow = zuko.flows.CNF(dim, hidden_features=HIDDEN, exact=exact, **TOL).to(device)

    def exact_at(flow: zuko.flows.CNF, tol: dict) -> None:
        flow.transform.exact, flow.transform.rtol, flow.transform.atol = True, *tol.values()

    return Contender(flow, lambda flow, x: flow().log_prob(x), exact_at)


def run(contenders: dict, sample, steps: int, batch: int, device: torch.device) -> dict:
    optimizers = {k: torch.optim.Adam(c.model.parameters(), lr=1e-3) for k, c in contenders.items()}
    times = {k: [] for k in contenders}
    nfe = {k: [] for k in contenders}
    generator = torch.Generator().manual_seed(0)
    for step in range(steps + 2):
        x = sample(batch, generator).to(device)
        for name, c in contenders.items():
            before = c.counter.calls
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = -c.log_prob(c.model, x).mean()
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= 2:  # the first two steps warm up
                times[name].append(1e3 * (time.perf_counter() - start))
                nfe[name].append(c.counter.calls - before)
    x = sample(batch, generator).to(device, torch.float64)
    return {
        k: {
            "step_ms": statistics.median(times[k]),
            "nfe": statistics.mean(nfe[k]),
            "log_prob_error": log_prob_error(c, x),
        }
        for k, c in contenders.items()
    }


def log_prob_error(c: Contender, x: torch.Tensor) -> float:
    """Mean |error| of the trained model's exact-trace log q(x) at the benchmark tolerances,
    against a float64 solve at rtol = atol = 1e-10: the accuracy the step time buys."""
    model = copy.deepcopy(c.model).double()
    values = []
    with torch.no_grad():
        for tol in (TOL, {"rtol": 1e-10, "atol": 1e-10}):
            c.exact_at(model, tol)
            values.append(c.log_prob(model, x))
    return (values[0] - values[1]).abs().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    device = common.cuda_device(args.device)
    targets = {"banana-2d": (2, banana), "mixture-16d": (16, mixture(16))}
    rows = []
    print(
        f"{'target':13}{'trace':11}{'contender':19}{'ms/step':>9}{'NFE':>7}{'ratio':>7}"
        f"{'log q error':>13}"
    )
    for target, (dim, sample) in targets.items():
        for exact in (True, False):
            torch.manual_seed(0)
            contenders = {
                "pyroflows": ours(dim, exact, "direct", device),
                "pyroflows-checkpoint": ours(dim, exact, "checkpoint", device),
                "pyroflows-adjoint": ours(dim, exact, "adjoint", device),
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
                    f"{target:13}{trace:11}{name:19}{figures['step_ms']:9.1f}"
                    f"{figures['nfe']:7.1f}{ratio:7.2f}{figures['log_prob_error']:13.2e}"
                )
    common.write(
        "cnf",
        device,
        {
            "settings": {
                "steps": args.steps,
                "batch": args.batch,
                "hidden": HIDDEN,
                **TOL,
                "trace_scale": TRACE_SCALE,
                "norm": "max",
            },
            "rows": rows,
        },
        zuko=zuko.__version__,
    )


if __name__ == "__main__":
    main()
