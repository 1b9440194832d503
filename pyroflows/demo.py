"""Fit a flow by reverse KL to a 2-D banana density whose normalising constant is known."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pyro.distributions as dist
import torch
from torch import Tensor
from tqdm.auto import trange

from . import _checks
from .flows import build

BANANA_SCALE = 2.0  # z1 ~ N(0, 2²)
BANANA_BEND = 0.5  # z2 | z1 ~ N(0.5 (z1² - 4), 1)


def banana_log_density(z: Tensor) -> Tensor:
    """Unnormalised log density; its normaliser is ``log Z = log(2π · 2)``."""
    z1, z2 = z[..., 0], z[..., 1]
    return -0.5 * (z1 / BANANA_SCALE) ** 2 - 0.5 * (z2 - BANANA_BEND * (z1**2 - 4)) ** 2


BANANA_LOG_Z = math.log(2 * math.pi * BANANA_SCALE)


@dataclass
class DemoResult:
    flow: str
    elbo: float
    log_z: float
    log_z_stderr: float
    exact_log_z: float


def run_demo(
    flow: str = "realnvp",
    num_layers: int = 6,
    steps: int = 1500,
    batch_size: int = 256,
    num_eval: int = 20000,
    seed: int = 0,
    plot: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> DemoResult:
    """Fit ``flow`` to the banana on ``device``, then estimate log Z by importance sampling.

    >>> r = run_demo("planar", num_layers=2, steps=5, num_eval=100, progress=False)
    >>> r.exact_log_z > 0
    True
    """
    _checks.positive_int("num_layers", num_layers)
    _checks.positive_int("steps", steps)
    _checks.positive_int("num_eval", num_eval)
    device = _checks.device("device", device)
    torch.manual_seed(seed)
    transform = build(flow, 2, num_layers).to(device)
    base = dist.Normal(torch.zeros(2, device=device), 1.0).to_event(1)
    q = dist.TransformedDistribution(base, [transform])
    optimizer = torch.optim.Adam(transform.parameters(), lr=3e-3)
    for step in trange(steps, disable=not progress, desc=f"fitting {flow}"):
        z = q.rsample((batch_size,))
        loss = (q.log_prob(z) - banana_log_density(z)).mean()
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()} at step {step}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        z = q.sample((num_eval,))
        log_w = banana_log_density(z) - q.log_prob(z)
        log_z = torch.logsumexp(log_w, 0) - math.log(num_eval)
        w = (log_w - log_z).exp()  # normalised so that mean(w) = 1
        stderr = (w.std() / math.sqrt(num_eval)).item()  # delta method: se(log Ẑ) ≈ sd(w)/√n
    result = DemoResult(flow, log_w.mean().item(), log_z.item(), stderr, BANANA_LOG_Z)
    if plot:
        _plot(z.cpu(), plot, result)
    return result


def _plot(samples: Tensor, path: str | Path, result: DemoResult) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = (
        torch.linspace(-7, 7, 300, dtype=torch.float64),
        torch.linspace(-8, 16, 300, dtype=torch.float64),
    )
    grid = torch.stack(torch.meshgrid(*axes, indexing="xy"), -1)
    # contours of the log density at fixed offsets below its maximum (0): the levels stay
    # where the density is, never where it underflows
    log_p = banana_log_density(grid)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.contour(
        grid[..., 0],
        grid[..., 1],
        log_p,
        levels=[-8, -4.5, -2, -0.5],
        colors="k",
        linewidths=0.8,
        linestyles="solid",
    )
    ax.scatter(*samples[:2000].T, s=2, alpha=0.4, color="C0", label=f"{result.flow} samples")
    ax.plot([], [], color="k", linewidth=0.8, label="target log density: 0.5, 2, 4.5, 8 below max")
    ax.legend(loc="upper center", fontsize=8)
    ax.set(xlim=(-7, 7), ylim=(-6, 16), xlabel="z1", ylabel="z2")
    estimate = f"log Z {result.log_z:.3f} ± {result.log_z_stderr:.3f}"
    ax.set_title(f"{result.flow}: {estimate} (exact {result.exact_log_z:.3f})")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
