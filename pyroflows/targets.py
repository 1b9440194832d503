"""Standard unnormalised densities for sampling benchmarks, with known answers where they exist.

Every target is an :class:`torch.nn.Module` (so ``.to(device, dtype)`` moves its constants)
with ``dim``, a batched ``log_prob(x)`` for ``x`` of shape ``(..., dim)``, ``log_z`` (the log
normaliser of ``exp(log_prob)``: exact, from quadrature for the 2-D shapes, or ``None``) and,
where one exists, an exact ``sample(shape)``. :func:`target` builds one by name.

>>> t = target("funnel", dim=10)
>>> t.log_prob(t.sample((4,))).shape, t.log_z
(torch.Size([4]), 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks

LOG_2PI = math.log(2 * math.pi)


class Target(nn.Module):
    """Base class: subclasses set ``dim`` and ``log_z`` and define ``_log_prob``.

    >>> class Gaussian(Target):
    ...     dim, log_z = 2, 0.0
    ...     def _log_prob(self, x):
    ...         return -0.5 * x.square().sum(-1) - math.log(2 * math.pi)
    >>> Gaussian()(torch.zeros(3, 2)).shape  # any leading batch shape
    torch.Size([3])
    """

    dim: int
    log_z: float | None = None

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_device_dtype", torch.zeros(()), persistent=False)

    def log_prob(self, x: Tensor) -> Tensor:
        """Unnormalised log density at ``x`` of shape ``(..., dim)``; shape ``x.shape[:-1]``."""
        return self._log_prob(_checks.event("x", x, self.dim))

    def forward(self, x: Tensor) -> Tensor:
        """The same as :meth:`log_prob`: a target is a log density function."""
        return self.log_prob(x)

    def sample(self, shape: tuple[int, ...] = ()) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no exact sampler")

    def _log_prob(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _anchor(self) -> Tensor:
        """A buffer giving the device and dtype of samples."""
        return self._device_dtype

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def _normal(x: Tensor, scale: Tensor | float) -> Tensor:
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    return -0.5 * (x / scale) ** 2 - scale.log() - 0.5 * LOG_2PI


def _quadrature_log_z(log_prob: Callable[[Tensor], Tensor], box: float, n: int = 2001) -> float:
    """log ∫ exp(log_prob) over ``[-box, box]²`` by the trapezoidal rule in float64."""
    axis = torch.linspace(-box, box, n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1)
    weights = torch.ones(n, dtype=torch.float64)
    weights[[0, -1]] = 0.5
    log_w = (weights[:, None] * weights[None, :]).log() + 2 * math.log(axis[1] - axis[0])
    return torch.logsumexp((log_prob(grid) + log_w).flatten(), 0).item()


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


def _at_least(name: str, value: object, low: int) -> int:
    value = _checks.positive_int(name, value)
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    return value


TARGETS: dict[str, Callable[..., Target]] = {
    "u1": lambda: Energy2D(1),
    "u2": lambda: Energy2D(2),
    "u3": lambda: Energy2D(3),
    "u4": lambda: Energy2D(4),
    "funnel": Funnel,
    "banana": Banana,
    "ring": ring,
    "grid": grid,
    "gmm40": gmm40,
    "many-well": ManyWell,
    "ill-gaussian": IllConditionedGaussian,
}
SIZED = ("funnel", "banana", "many-well", "ill-gaussian")  # the ones that take ``dim``


def target(name: str, dim: int | None = None, **options: object) -> Target:
    """The target ``name`` (see ``TARGETS``), with ``dim`` for the sized ones.

    >>> target("u1").log_z > 0, target("banana", dim=4).dim
    (True, 4)
    """
    _checks.one_of("name", name, TARGETS)
    if dim is not None:
        if name not in SIZED:
            raise ValueError(f"target {name!r} has a fixed dimension; dim applies to {SIZED}")
        options["dim"] = dim
    return TARGETS[name](**options)
