"""Rezende and Mohamed's (2015) 2-D test energies."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Target, _quadrature_log_z


class Energy2D(Target):
    """Rezende and Mohamed's (2015) test energies ``U1``-``U4``: ``log p = -U``.

    ``U2``-``U4`` do not decay along ``z1`` (the paper draws them on ``[-4, 4]²``); here a
    soft wall ``-½ (max(|z1| - 4, 0) / 0.2)²`` makes them proper. ``log_z`` is computed by
    quadrature on ``[-8, 8]²``.

    >>> u1 = Energy2D(1)
    >>> round(u1.log_z, 3), u1.log_prob(torch.zeros(4, 2)).shape
    (1.878, torch.Size([4]))
    """

    dim = 2

    def __init__(self, which: int) -> None:
        super().__init__()
        if which not in (1, 2, 3, 4):
            raise ValueError(f"which must be 1, 2, 3 or 4, got {which!r}")
        self.which = which
        self.log_z = _quadrature_log_z(self._log_prob, 8.0)

    def _log_prob(self, x: Tensor) -> Tensor:
        z1, z2 = x[..., 0], x[..., 1]
        w1 = torch.sin(math.pi * z1 / 2)
        if self.which == 1:
            ring = 0.5 * ((x.norm(dim=-1) - 2) / 0.4) ** 2
            modes = torch.logaddexp(-0.5 * ((z1 - 2) / 0.6) ** 2, -0.5 * ((z1 + 2) / 0.6) ** 2)
            return modes - ring
        wall = -0.5 * (F.relu(z1.abs() - 4) / 0.2) ** 2
        if self.which == 2:
            return wall - 0.5 * ((z2 - w1) / 0.4) ** 2
        if self.which == 3:
            w2 = 3 * torch.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
            a, b = -0.5 * ((z2 - w1) / 0.35) ** 2, -0.5 * ((z2 - w1 + w2) / 0.35) ** 2
            return wall + torch.logaddexp(a, b)
        w3 = 3 * torch.sigmoid((z1 - 1) / 0.3)
        a, b = -0.5 * ((z2 - w1) / 0.4) ** 2, -0.5 * ((z2 - w1 + w3) / 0.35) ** 2
        return wall + torch.logaddexp(a, b)

    def extra_repr(self) -> str:
        return f"U{self.which}"
