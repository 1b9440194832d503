"""CNF training-step time: pyroflows' Continuous against zuko's CNF, in one run.

    python benchmarks/cnf.py [--device cuda] [--steps 20]

Maximum-likelihood training steps (log_prob through the backward-in-time solve, then
backward) on a 2-D banana and a 16-D Gaussian mixture, exact and Hutchinson traces, the same
MLP (64, 64, ELU, 3 time frequencies) and error control for both: rtol 1e-5, atol 1e-6, the
error measured by its largest element and the log-determinant scaled by 1e-2 (zuko's fixed
choices; ``norm="max"``, ``trace_scale=1e-2`` here). pyroflows runs with direct
back-propagation, with checkpointed steps (at the benchmark's tolerances and at 0.7 of them,
where its trained models' error met zuko's) and with the adjoint. All start from zuko's
initial vector field (copied into pyroflows' network) and train on the same batches, taking
turns step by step, so the log-density errors compare solvers, not models; the ratio to zuko
(below 1: pyroflows faster) is the median of the per-step ratios with their min-max spread.
NFE counts the dynamics network's evaluations in the forward solve and in the backward pass
(replays and adjoint solves; direct back-propagation instead runs one VJP per stored forward
evaluation, marked "graph"). Peak memory of a training step is CUDA max allocated above what
was allocated before it (GPU), or the peak of torch's CPU allocations during one step (CPU).
After training, each model's exact-trace log-density at its own tolerances is compared with
a tight float64 solve ("log q error"): the accuracy each step time buys.
Prints a table and writes benchmarks/results/cnf.json (cnf-cuda.json on CUDA).
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


def ours(
    dim: int, exact: bool, gradients: str, like: zuko.flows.CNF, tolerance: float = 1.0
) -> Contender:  # fmt: skip
    flow = Continuous(
        dim,
        hidden_dims=HIDDEN,
        activation="elu",
        trace="exact" if exact else "hutchinson",
        adjoint=gradients == "adjoint",
        checkpoint=gradients == "checkpoint",
        trace_scale=TRACE_SCALE,
        norm="max",
        **{k: tolerance * v for k, v in TOL.items()},
    ).to(like.transform.freqs.device)
    copy_function(flow, like)

    def log_prob(flow: Continuous, x: torch.Tensor) -> torch.Tensor:
        base = dist.Normal(x.new_zeros(dim), 1.0).to_event(1)
        return dist.TransformedDistribution(base, [flow]).log_prob(x)

    def exact_at(flow: Continuous, tol: dict) -> None:
        scaled = [tolerance * v for v in tol.values()] if tol is TOL else tol.values()
        flow.trace, flow.rtol, flow.atol, flow.max_num_steps = "exact", *scaled, 10**5

    return Contender(flow, log_prob, exact_at)


def copy_function(flow: Continuous, cnf: zuko.flows.CNF) -> None:
    """Give ``flow`` the vector field of zuko's ``cnf``, so that every contender starts from
    the same model and their log-density errors compare solvers, not models. zuko carries
    the data at t = 0 to the base at t = 1 with inputs [φ(t), x]; pyroflows the base at
    s = 0 to the data at s = 1 with inputs [z, φ(s)]: f(s, z) = -g(1 - s, z), where
    cos(kπ(1 - s)) = (-1)^k cos(kπs) and sin(kπ(1 - s)) = -(-1)^k sin(kπs)."""
    mine, theirs = flow.dynamics.net, cnf.transform.ode
    dim, freqs = flow.dim, len(cnf.transform.freqs)
    sign = (-1.0) ** torch.arange(1, freqs + 1, device=cnf.transform.freqs.device)
    with torch.no_grad():
        for a, b in zip(mine, theirs, strict=True):
            if isinstance(a, torch.nn.Linear):
                a.weight.copy_(b.weight)
                a.bias.copy_(b.bias)
        first = theirs[0].weight
        mine[0].weight[:, :dim] = first[:, 2 * freqs :]
        mine[0].weight[:, dim : dim + freqs] = sign * first[:, :freqs]
        mine[0].weight[:, dim + freqs :] = -sign * first[:, freqs : 2 * freqs]
        mine[-1].weight.neg_()
        mine[-1].bias.neg_()
        points = torch.rand(8, dim + 1, generator=torch.Generator().manual_seed(0))
        s, z = points[0, 0].to(first.device), points[:, 1:].to(first.device)  # global RNG kept
        torch.testing.assert_close(flow.dynamics.velocity(s, z, None), -cnf.transform.f(1 - s, z))


def theirs(dim: int, exact: bool, device: torch.device) -> Contender:
    flow = zuko.flows.CNF(dim, hidden_features=HIDDEN, exact=exact, **TOL).to(device)

    def exact_at(flow: zuko.flows.CNF, tol: dict) -> None:
        flow.transform.exact, flow.transform.rtol, flow.transform.atol = True, *tol.values()

    return Contender(flow, lambda flow, x: flow().log_prob(x), exact_at)


def run(contenders: dict, sample, steps: int, batch: int, device: torch.device) -> dict:
    """Training steps, the contenders taking turns on each batch; per contender the median
    step time, its per-step ratio to zuko (median, min-max), evaluations of the dynamics in
    the forward solve and in the backward pass, peak memory of a step, accuracy."""
    optimizers = {k: torch.optim.Adam(c.model.parameters(), lr=1e-3) for k, c in contenders.items()}
    times = {k: [] for k in contenders}
    nfe = {k: ([], []) for k in contenders}
    peak = dict.fromkeys(contenders, 0.0)
    generator = torch.Generator().manual_seed(0)

    def step(name: str, c: Contender, x: torch.Tensor) -> tuple[int, int]:
        before = c.counter.calls
        loss = -c.log_prob(c.model, x).mean()
        middle = c.counter.calls
        optimizers[name].zero_grad()
        loss.backward()
        optimizers[name].step()
        return middle - before, c.counter.calls - middle

    for i in range(steps + 2):
        x = sample(batch, generator).to(device)
        for name, c in contenders.items():
            before = common.cuda_peak_reset(device)
            start = time.perf_counter()
            forward, backward = step(name, c, x)
            common.sync(device)
            if i >= 2:  # the first two steps warm up
                times[name].append(time.perf_counter() - start)
                nfe[name][0].append(forward)
                nfe[name][1].append(backward)
                if device.type == "cuda":
                    peak[name] = max(peak[name], common.cuda_peak_mib(device, before))
    if device.type == "cpu":  # one more step each, under the profiler's allocation record
        x = sample(batch, generator).to(device)
        for name, c in contenders.items():
            peak[name] = common.cpu_peak_mib(lambda name=name, c=c: step(name, c, x))
    x = sample(batch, generator).to(device, torch.float64)
    out = {}
    for k, c in contenders.items():
        forward = statistics.mean(nfe[k][0])
        backward = statistics.mean(nfe[k][1])
        graph = isinstance(c.model, Continuous) and c.model._gradient_mode() == "direct"
        out[k] = {
            "step_ms": 1e3 * statistics.median(times[k]),
            "ratio_to_zuko": common.ratio(times[k], times["zuko"]),
            "nfe_forward": forward,
            # direct: back-propagation through the stored graph, a VJP per forward evaluation
            "nfe_backward": forward if graph else backward,
            "backward": "graph" if graph else "evaluations",
            "peak_mib": peak[k],
            "log_prob_error": log_prob_error(c, x),
        }
    return out


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
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = common.cuda_device(args.device)
    targets = {"banana-2d": (2, banana), "mixture-16d": (16, mixture(16))}
    rows = []
    print(
        f"{'target':13}{'trace':11}{'contender':29}{'ms/step':>9}  {'vs zuko [spread]':19}"
        f"{'NFE fwd+bwd':>13}{'peak MiB':>10}{'log q error':>13}"
    )
    for target, (dim, sample) in targets.items():
        for exact in (True, False):
            torch.manual_seed(0)
            zuko_cnf = theirs(dim, exact, device)
            contenders = {  # all from zuko's initial vector field
                "pyroflows": ours(dim, exact, "direct", zuko_cnf.model),
                "pyroflows-checkpoint": ours(dim, exact, "checkpoint", zuko_cnf.model),
                "pyroflows-adjoint": ours(dim, exact, "adjoint", zuko_cnf.model),
                # at 0.7 of the tolerances, where the trained models' error met zuko's
                # (interpolated between runs at 1 and 0.5 of them)
                "pyroflows-checkpoint-tol*0.7": ours(dim, exact, "checkpoint", zuko_cnf.model, 0.7),
                "zuko": zuko_cnf,
            }
            result = run(contenders, sample, args.steps, args.batch, device)
            trace = "exact" if exact else "hutchinson"
            for name, f in result.items():
                rows.append({"target": target, "dim": dim, "trace": trace, "contender": name, **f})
                mark = "*" if f["backward"] == "graph" else ""
                evaluations = f"{f['nfe_forward']:.0f}+{f['nfe_backward']:.0f}{mark}"
                print(
                    f"{target:13}{trace:11}{name:29}{f['step_ms']:9.1f}  "
                    f"{common.ratio_text(f['ratio_to_zuko']):19}{evaluations:>13}"
                    f"{f['peak_mib']:10.1f}{f['log_prob_error']:13.2e}"
                )
    print("* back-propagation through the forward solve's stored graph")
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
