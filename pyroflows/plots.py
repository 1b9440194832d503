"""Figures of a reverse-KL fit and of VAE training, written to files with matplotlib (no
display needed).

>>> import pyroflows as pf, tempfile, pathlib
>>> r = pf.fit("banana", "planar", num_layers=2, steps=5, num_eval=200, progress=False)
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> plot_fit(r, folder / "fit.png"); plot_losses(r.losses, folder / "loss.png")
>>> plot_k_hats([0.3, 0.9], folder / "k_hat.png")
>>> sorted(p.name for p in folder.iterdir())
['fit.png', 'k_hat.png', 'loss.png']
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .fit import FitResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _box(samples: Tensor, log_density=None) -> tuple[tuple[float, float], tuple[float, float]]:
    """The central 99.5 % of the draws in the first two coordinates; for a 2-D target, also
    where its log density is within 12 of its maximum on a wide coarse grid (modes that
    ``q`` missed stay in view). Padded by 15 %."""
    lo = torch.quantile(samples[:, :2], 0.0025, dim=0)
    hi = torch.quantile(samples[:, :2], 0.9975, dim=0)
    if log_density is not None:
        reach = max(3 * (hi - lo).abs().max().item(), 12.0)
        axis = torch.linspace(-reach, reach, 241, dtype=torch.float64)
        grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
        with torch.no_grad():
            values = log_density(grid.to(samples.dtype)).double()
        near = grid[values > values.max() - 12]
        lo, hi = torch.minimum(lo, near.min(0).values), torch.maximum(hi, near.max(0).values)
    pad = 0.15 * (hi - lo)
    lo, hi = (lo - pad).tolist(), (hi + pad).tolist()
    return (lo[0], hi[0]), (lo[1], hi[1])


def plot_fit(result: FitResult, path: str | Path, num_points: int = 2000) -> None:
    """Target density, fitted density and the fit's draws side by side for a 2-D target;
    for more coordinates, the draws' first two coordinates and the importance-resampled
    ones (closer to the target when k-hat < 0.7).

    >>> import pyroflows as pf, tempfile
    >>> r = pf.fit("u1", "planar", num_layers=2, steps=5, num_eval=200, progress=False)
    >>> plot_fit(r, Path(tempfile.mkdtemp()) / "fit.png")
    """
    plt = _pyplot()
    x, _, _ = result._evaluation()
    anchor = result.q.base_dist.mean
    x = x.detach().cpu().double()
    shown = x[:num_points]
    if x.shape[-1] == 2:
        (x0, x1), (y0, y1) = _box(x, lambda g: result.log_density(g.to(anchor)).cpu())
        fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
        axis_x = torch.linspace(x0, x1, 200, dtype=torch.float64)
        axis_y = torch.linspace(y0, y1, 200, dtype=torch.float64)
        grid = torch.stack(torch.meshgrid(axis_x, axis_y, indexing="xy"), -1)
        flat = grid.reshape(-1, 2).to(anchor)
        with torch.no_grad():
            log_p = result.log_density(flat).double().cpu()
            log_q = result.q.log_prob(flat).double().cpu()
        for ax, values, title in ((axes[0], log_p, "target p"), (axes[1], log_q, "fitted q")):
            density = (values - values.max()).exp().reshape(200, 200)
            ax.pcolormesh(
                grid[..., 0].numpy(), grid[..., 1].numpy(), density.numpy(), shading="auto"
            )
            ax.set(title=f"{title} (density / its maximum)")
        axes[2].scatter(*shown.numpy().T, s=2, alpha=0.4)
        axes[2].set(title=f"{len(shown)} draws of q")
    else:
        (x0, x1), (y0, y1) = _box(x)
        fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
        axes[0].scatter(*shown[:, :2].numpy().T, s=2, alpha=0.4)
        axes[0].set(title="draws of q (coordinates 0, 1)")
        resampled = result.resample(len(shown)).detach().cpu()
        axes[1].scatter(*resampled[:, :2].numpy().T, s=2, alpha=0.4, color="C1")
        axes[1].set(title="importance-resampled draws")
    for ax in axes:
        ax.set(xlim=(x0, x1), ylim=(y0, y1), xlabel="x0", ylabel="x1")
    fig.suptitle(str(result.diagnostics), fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_losses(losses: Sequence[float], path: str | Path) -> None:
    """The loss ``E_q[log q - β log p]`` per step (its minimum is ``-log Z``).

    >>> import tempfile
    >>> plot_losses([3.0, 2.2, 1.9, 1.85], Path(tempfile.mkdtemp()) / "loss.png")
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(len(losses)), losses, linewidth=0.8)
    if losses:
        low, high = sorted(losses)[0], sorted(losses)[int(0.95 * (len(losses) - 1))]
        ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.05 * (high - low + 1e-9))
    ax.set(xlabel="step", ylabel="loss: E_q[log q - log p]", title="reverse-KL fit")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_k_hats(k_hats: Sequence[float], path: str | Path) -> None:
    """PSIS k-hat of repeated fits (one per seed) against Yao et al.'s 0.5 and 0.7 lines:
    how often a fit of this recipe and budget can be trusted.

    >>> import tempfile
    >>> plot_k_hats([0.31, 0.45, 0.82], Path(tempfile.mkdtemp()) / "k_hat.png")
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(len(k_hats)), k_hats, "o")
    for level, label in ((0.5, "good below"), (0.7, "unreliable above")):
        ax.axhline(level, color="k", linewidth=0.8, linestyle="--")
        ax.annotate(f"{label} {level}", (0, level), xytext=(2, 2), textcoords="offset points")
    ax.set(xlabel="seed (offset)", ylabel="PSIS k-hat", title="k-hat over repeated fits")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_training(history: Sequence[dict[str, float]], path: str | Path) -> None:
    """A VAE run's training loss and validation -ELBO per image, per epoch (the records of
    :class:`pyroflows.vae.TrainRun`).

    >>> import tempfile
    >>> history = [{"epoch": 1, "train_loss": 120.0, "valid_loss": 118.0},
    ...            {"epoch": 2, "train_loss": 110.0, "valid_loss": 109.5}]  # fmt: skip
    >>> plot_training(history, Path(tempfile.mkdtemp()) / "training.png")
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train (with β, free bits)")
    ax.plot(epochs, [h["valid_loss"] for h in history], label="validation -ELBO")
    ax.set(xlabel="epoch", ylabel="nats per image", title="VAE training")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_images(
    blocks: Sequence[Tensor], image_shape: tuple[int, int], path: str | Path, columns: int
) -> None:  # fmt: skip
    """Grey images ``(n, H * W)`` with values in [0, 1], tiled ``columns`` to a row; each
    tensor in ``blocks`` starts a new row.

    >>> import tempfile
    >>> images = torch.rand(2, 8, 64)  # two rows of eight 8x8 images
    >>> plot_images(list(images), (8, 8), Path(tempfile.mkdtemp()) / "grid.png", columns=8)
    """
    plt = _pyplot()
    grid = torch.cat([_tiles(images.detach().cpu(), image_shape, columns) for images in blocks])
    inches = max(4 / max(grid.shape), 1 / 40)  # per pixel: at least 4 inches on the long side
    fig, ax = plt.subplots(figsize=(grid.shape[1] * inches, grid.shape[0] * inches))
    ax.imshow(grid.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _tiles(images: Tensor, shape: tuple[int, int], columns: int) -> Tensor:
    h, w = shape
    rows = -(-len(images) // columns)
    grid = images.new_zeros(rows * (h + 1), columns * (w + 1))
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = image.reshape(h, w)
    return grid


def plot_density_training(history: Sequence[dict[str, float]], path: str | Path) -> None:
    """A maximum-likelihood fit's training and validation negative log-likelihood per epoch
    (bits per dimension for discrete data): the records of
    :class:`pyroflows.density.DensityFit`.

    >>> import tempfile
    >>> history = [{"epoch": 1, "train_nll": 2.9, "valid_nll": 2.8},
    ...            {"epoch": 2, "train_nll": 2.7, "valid_nll": 2.75}]  # fmt: skip
    >>> plot_density_training(history, Path(tempfile.mkdtemp()) / "training.png")
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    unit = "bits_per_dim" if history and "train_bits_per_dim" in history[0] else "nll"
    epochs = [h["epoch"] for h in history]
    for split in ("train", "valid"):
        if history and f"{split}_{unit}" in history[0]:
            ax.plot(epochs, [h[f"{split}_{unit}"] for h in history], label=split)
    ylabel = "bits per dimension" if unit == "bits_per_dim" else "nats per row"
    ax.set(xlabel="epoch", ylabel=ylabel, title="maximum-likelihood fit")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_density_samples(model, data, path: str | Path, num: int = 64) -> None:
    """Draws of a fitted density model beside data: image tiles for square images, the
    first two coordinates otherwise.

    >>> import tempfile
    >>> from pyroflows.density import DensityModel
    >>> from pyroflows.density.data import load
    >>> data = load("digits")  # 8x8 images on 17 levels
    >>> model = DensityModel(64, "realnvp", 2, dequantize="uniform", levels=17)
    >>> plot_density_samples(model, data, Path(tempfile.mkdtemp()) / "samples.png", num=16)
    """
    draws = model.sample(num if data.image_shape else 2000).cpu()
    shown = data.train[: len(draws)].cpu()
    if data.image_shape:
        scale = (data.levels or 2) - 1
        plot_images([shown[:32] / scale, draws / scale], data.image_shape, path, 16)
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
    for ax, rows, title in zip(axes, (shown, draws), ("data", "model draws"), strict=True):
        ax.scatter(rows[:, 0], rows[:, -1], s=2, alpha=0.4)
        ax.set_title(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
