"""Targets of any dimension ``dim``: Neal's funnel, Haario's banana, the many-well and an
ill-conditioned Gaussian."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _checks
from .base import LOG_2PI, Target, _at_least, _normal


class Funnel(Target):
    """Neal's funnel: ``x0 ~ N(0, 3²)``, ``xᵢ ~ N(0, exp(x0))``; normalised, exact samples.

    >>> funnel = Funnel(dim=10)
    >>> funnel.log_z, funnel.sample((500,)).shape, funnel.log_prob(torch.zeros(10)).shape
    (0.0, torch.Size([500, 10]), torch.Size([]))
    """

    log_z = 0.0

    def __init__(self, dim: int = 10) -> None:
        super().__init__()
        self.dim = _at_least("dim", dim, 2)

    def _log_prob(self, x: Tensor) -> Tensor:
        v = x[..., 0]
        # log N(xᵢ; 0, e^v) written with e^-v: finite far up the funnel's mouth (v > 177 in
        # float32), where the scale e^(v/2) would overflow and give -inf
        rest = -0.5 * x[..., 1:].square() * (-v).exp().unsqueeze(-1)
        return _normal(v, 3.0) + rest.sum(-1) - (self.dim - 1) * (v / 2 + 0.5 * LOG_2PI)

    def sample(self, shape: tuple[int, ...] = ()) -> Tensor:
        v = 3 * self._anchor().new_empty(shape).normal_()
        rest = self._anchor().new_empty((*shape, self.dim - 1)).normal_()
        return torch.cat([v.unsqueeze(-1), rest * (v / 2).exp().unsqueeze(-1)], -1)


class Banana(Target):
    """Haario's twisted Gaussian: ``x ~ N(0, diag(100, 1, ..., 1))`` mapped by
    ``x2 ↦ x2 + b (x1² - 100)``, ``b = curvature``; volume-preserving, so normalised.

    >>> banana = Banana(dim=10)
    >>> x = banana.sample((4, 3))  # exact draws, any sample shape
    >>> banana.log_prob(x).shape, banana.log_z
    (torch.Size([4, 3]), 0.0)
    """

    log_z = 0.0

    def __init__(self, dim: int = 2, curvature: float = 0.03) -> None:
        super().__init__()
        self.dim = _at_least("dim", dim, 2)
        self.curvature = _checks.positive_number("curvature", curvature)

    def _untwist(self, y: Tensor) -> Tensor:
        x2 = y[..., 1] - self.curvature * (y[..., 0] ** 2 - 100)
        return torch.cat([y[..., :1], x2.unsqueeze(-1), y[..., 2:]], -1)

    def _log_prob(self, x: Tensor) -> Tensor:
        u = self._untwist(x)
        return _normal(u[..., 0], 10.0) + _normal(u[..., 1:], 1.0).sum(-1)

    def sample(self, shape: tuple[int, ...] = ()) -> Tensor:
        u = self._anchor().new_empty((*shape, self.dim)).normal_()
        u[..., 0] *= 10
        x2 = u[..., 1] + self.curvature * (u[..., 0] ** 2 - 100)
        return torch.cat([u[..., :1], x2.unsqueeze(-1), u[..., 2:]], -1)


class ManyWell(Target):
    """``dim / 2`` independent double wells, ``-x1⁴ + 6 x1² + ½ x1 - ½ x2²`` each (FAB's
    many-well; ``log_z`` = 164.70 at ``dim=32``, from 1-D quadrature); exact samples (``x1``
    by inverting its tabulated distribution function).

    >>> wells = ManyWell(dim=32)
    >>> round(wells.log_z, 2), wells.sample((2,)).shape
    (164.7, torch.Size([2, 32]))
    """

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.dim = _at_least("dim", dim, 2)
        if dim % 2:
            raise ValueError(f"dim must be even, got {dim}")
        axis = torch.linspace(-4, 4, 200_001, dtype=torch.float64)
        log_density = self._well(axis)
        step = (axis[1] - axis[0]).item()
        log_z1 = torch.logsumexp(log_density, 0).item() + math.log(step)
        self.log_z = dim / 2 * (log_z1 + 0.5 * LOG_2PI)
        cdf = torch.cumsum((log_density - log_z1).exp() * step, 0)
        self.register_buffer("_axis", axis, persistent=False)
        self.register_buffer("_cdf", cdf / cdf[-1], persistent=False)

    @staticmethod
    def _well(x1: Tensor) -> Tensor:
        return -(x1**4) + 6 * x1**2 + 0.5 * x1

    def _log_prob(self, x: Tensor) -> Tensor:
        pairs = x.unflatten(-1, (self.dim // 2, 2))
        return (self._well(pairs[..., 0]) - 0.5 * pairs[..., 1] ** 2).sum(-1)

    def sample(self, shape: tuple[int, ...] = ()) -> Tensor:
        u = torch.rand((*shape, self.dim // 2), dtype=torch.float64, device=self._cdf.device)
        i = torch.searchsorted(self._cdf, u).clamp(1, len(self._cdf) - 1)
        lo, hi = self._cdf[i - 1], self._cdf[i]
        x1 = self._axis[i - 1] + (u - lo) / (hi - lo) * (self._axis[i] - self._axis[i - 1])
        x2 = torch.randn_like(x1)
        return torch.stack([x1, x2], -1).flatten(-2).to(self._anchor().dtype)


class IllConditionedGaussian(Target):
    """``N(0, Σ)`` with eigenvalues log-spaced from ``1/√condition`` to ``√condition`` and a
    random rotation (torch seed 0); normalised, exact samples.

    >>> gaussian = IllConditionedGaussian(dim=5, condition=100.0)
    >>> gaussian.sample((3,)).shape, gaussian.log_z
    (torch.Size([3, 5]), 0.0)
    """

    log_z = 0.0

    def __init__(self, dim: int = 10, condition: float = 1e4) -> None:
        super().__init__()
        self.dim = _at_least("dim", dim, 2)
        c = _checks.positive_number("condition", condition)
        generator = torch.Generator().manual_seed(0)
        rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        variances = torch.logspace(-0.5 * math.log10(c), 0.5 * math.log10(c), dim)
        cov = rotation @ torch.diag(variances) @ rotation.T
        self.register_buffer("scale_tril", torch.linalg.cholesky((cov + cov.T) / 2))

    def _log_prob(self, x: Tensor) -> Tensor:
        tril = self.scale_tril.to(x)
        white = torch.linalg.solve_triangular(tril, x.unsqueeze(-1), upper=False).squeeze(-1)
        return _normal(white, 1.0).sum(-1) - tril.diagonal().log().sum()

    def sample(self, shape: tuple[int, ...] = ()) -> Tensor:
        noise = self.scale_tril.new_empty((*shape, self.dim)).normal_()
        return noise @ self.scale_tril.T
