"""Fit a flow by reverse KL to a 2-D banana density whose normalising constant is known."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import _checks
from .fit import fit

BANANA_SCALE = 2.0  # z1 ~ N(0, 2²)
BANANA_BEND = 0.5  # z2 | z1 ~ N(0.5 (z1² - 4), 1)


def banana_log_density(z: Tensor) -> Tensor:
    """Unnormalised log density; its normaliser is ``log Z = log(2π · 2)``.

    >>> banana_log_density(torch.tensor([[2.0, 0.0], [2.0, 1.0]]))  # on its ridge, one off
    tensor([-0.5000, -1.0000])
    """
    z1, z2 = z[..., 0], z[..., 1]
    return -0.5 * (z1 / BANANA_SCALE) ** 2 - 0.5 * (z2 - BANANA_BEND * (z1**2 - 4)) ** 2


BANANA_LOG_Z = math.log(2 * math.pi * BANANA_SCALE)


@dataclass
class DemoResult:
    """What :func:`run_demo` found: the ELBO, the importance-sampled log Z with its standard
    error beside the exact one, and PSIS k-hat with its verdict.

    >>> r = DemoResult("realnvp", 2.4, 2.52, 0.01, BANANA_LOG_Z, 0.3, "good")
    >>> round(r.exact_log_z - r.log_z, 3)
    0.011
    """

    flow: str
    elbo: float
    log_z: float
    log_z_stderr: float
    exact_log_z: float
    k_hat: float
    verdict: str


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
    """Fit ``flow`` to the banana on ``device`` with :func:`pyroflows.fit`, then compare its
    importance-sampled log Z with the exact one.

    >>> r = run_demo("planar", num_layers=2, steps=5, num_eval=100, progress=False)
    >>> r.exact_log_z > 0
    True
    """
    r = fit(
        banana_log_density, flow, dim=2, num_layers=_checks.positive_int("num_layers", num_layers),
        steps=steps, particles=batch_size, lr=3e-3, schedule="constant", num_eval=num_eval,
        seed=seed, device=device, progress=progress,
    )  # fmt: skip
    if r.stopped:
        raise RuntimeError(f"the fit stopped: {r.stopped}")
    z, log_p, log_q = r._evaluation()
    d = r.diagnostics
    elbo = (log_p - log_q).mean().item()
    result = DemoResult(flow, elbo, d.log_z, d.log_z_stderr, BANANA_LOG_Z, d.k_hat, d.verdict)
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


def run_vae_demo(
    epochs: int = 100,
    out: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """A VAE with a 2-layer IAF posterior on the bundled 8x8 digits (8 latents, 128 hidden
    units, Adam, KL warm-up over 5 epochs), evaluated on the 200 test images: -ELBO and the
    importance-sampled NLL (1000 samples); with ``out``, its figures are written there.

    >>> r = run_vae_demo(epochs=1, progress=False)
    >>> r["nll"] < r["neg_elbo"] + 1
    True
    """
    from .plots import plot_training
    from .vae import VAE, evaluate, load, save_figures, train

    device = _checks.device("device", device)
    data = load("digits", seed=seed).to(device)
    torch.manual_seed(seed)
    vae = VAE(data.image_shape, latent_dim=8, flow="iaf", num_layers=2, hidden_dim=128)
    run = train(vae.to(device), data, epochs=_checks.positive_int("epochs", epochs),
                batch_size=32, lr=3e-3, optimizer="adam", warmup_epochs=min(5, epochs),
                seed=seed, progress=progress)  # fmt: skip
    with warnings.catch_warnings():  # a few test images have a low ESS at 1000 samples
        warnings.simplefilter("ignore", RuntimeWarning)
        result = evaluate(vae, data.test, num_samples=1000)
    if out is not None:
        save_figures(vae, data.test, out, prefix="vae-")
        plot_training(run.history, Path(out) / "vae-training.png")
    return {**result, "epochs": len(run.history)}
