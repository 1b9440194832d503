"""Gaussian mixtures: any means, and the standard 2-D layouts (ring, grid, FAB's 40 modes)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks
from .base import Target, _normal


class GaussianMixture(Target):
    """An equal-weight mixture of isotropic Gaussians with means ``locs`` ``(K, dim)`` and
    standard deviation ``scale``; normalised, exact samples.

    >>> mixture = GaussianMixture(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), scale=0.5)
    >>> mixture
    GaussianMixture(dim=2, modes=2, scale=0.5)
    >>> mixture.sample((1000,)).shape
    torch.Size([1000, 2])
    """

    log_z = 0.0

    def __init__(self, locs: Tensor, scale: float) -> None:
        super().__init__()
        self.dim = locs.shape[-1]
        self.scale = _checks.positive_number("scale", scale)
        self.register_buffer("locs", locs.clone())

    def _log_prob(self, x: Tensor) -> Tensor:
        each = _normal(x.unsqueeze(-2) - self.locs.to(x), self.scale).sum(-1)
        return torch.logsumexp(each, -1) - math.log(len(self.locs))

    def sample(self, shape: tuple[int, ...] = ()) -> Tensor:
        k = torch.randint(len(self.locs), shape, device=self.locs.device)
        noise = self.locs.new_empty((*shape, self.dim)).normal_()
        return self.locs[k] + self.scale * noise

    def extra_repr(self) -> str:
        return f"dim={self.dim}, modes={len(self.locs)}, scale={self.scale}"


def ring(modes: int = 8, radius: float = 4.0, scale: float = 0.5) -> GaussianMixture:
    """``modes`` Gaussians evenly spaced on a circle.

    >>> ring(modes=8, radius=4.0)
    GaussianMixture(dim=2, modes=8, scale=0.5)
    """
    angles = torch.arange(_checks.positive_int("modes", modes)) * (2 * math.pi / modes)
    return GaussianMixture(radius * torch.stack([angles.cos(), angles.sin()], -1), scale)


def grid(side: int = 3, spacing: float = 4.0, scale: float = 0.5) -> GaussianMixture:
    """``side × side`` Gaussians on a square grid centred at the origin.

    >>> grid(side=3)
    GaussianMixture(dim=2, modes=9, scale=0.5)
    """
    axis = (torch.arange(_checks.positive_int("side", side)) - (side - 1) / 2) * spacing
    return GaussianMixture(torch.cartesian_prod(axis, axis), scale)


def gmm40() -> GaussianMixture:
    """The 40-mode 2-D mixture of the FAB paper (Midgley et al., 2023), built as its code
    does: means uniform on ``[-40, 40]²`` drawn with torch seed 0, scale ``softplus(1)``.

    >>> gmm40().log_prob(torch.zeros(5, 2)).shape
    torch.Size([5])
    """
    generator = torch.Generator().manual_seed(0)
    locs = (torch.rand(40, 2, generator=generator) - 0.5) * 2 * 40
    return GaussianMixture(locs, F.softplus(torch.tensor(1.0)).item())
