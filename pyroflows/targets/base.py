"""The base class of every target and the pieces the targets share."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import _checks

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


def _at_least(name: str, value: object, low: int) -> int:
    value = _checks.positive_int(name, value)
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    return value
