r"""Monotone rational-quadratic splines (Durkan et al., 2019), the elementwise map of the
neural spline flows: ``transformer="spline"`` in :class:`~pyroflows.transforms.Autoregressive`
and :class:`~pyroflows.transforms.Coupling`.

On ``[-B, B]`` the map has ``K`` bins whose widths and heights come from softmaxes of free
values (each at least ``MIN_BIN`` of ``2B``) and ``K - 1`` inner knot derivatives from a
softplus (at least ``MIN_DERIVATIVE``); the derivatives at ``±B`` are 1 and the map is the
identity outside, so it is continuously differentiable everywhere. In bin ``k``, with
``ξ = (x - x_k) / w_k`` and ``s_k = h_k / w_k``,

.. math::

    y = y_k + h_k \frac{s_k ξ^2 + d_k ξ (1 - ξ)}{s_k + (d_{k+1} + d_k - 2 s_k) ξ (1 - ξ)},

its derivative is in closed form, and the inverse is the root of a quadratic in ``ξ``, taken
in the form ``2c / (-b - sqrt(b² - 4ac))`` that has no cancellation. Free values of zero give
the identity.

>>> g = torch.Generator().manual_seed(0)
>>> raw = torch.randn(4, 3, 3 * 8 - 1, generator=g, dtype=torch.float64)
>>> x = torch.randn(4, 3, generator=g, dtype=torch.float64) * 3
>>> y, ladj = rational_quadratic(x, raw, bound=5.0)
>>> back, inverse_ladj = rational_quadratic(y, raw, bound=5.0, inverse=True)
>>> torch.allclose(back, x, atol=1e-9), torch.allclose(ladj, -inverse_ladj, atol=1e-9)
(True, True)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_BIN = 1e-3  # smallest bin width and height, as a share of 2B
MIN_DERIVATIVE = 1e-3
_SHIFT = math.log(math.expm1(1 - MIN_DERIVATIVE))  # softplus(0 + shift) + min = 1


def num_params(bins: int) -> int:
    """Free values per coordinate: ``K`` widths, ``K`` heights, ``K - 1`` derivatives.

    >>> num_params(8)
    23
    """
    return 3 * bins - 1


def rational_quadratic(
    x: Tensor, raw: Tensor, bound: float, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    """The spline (or with ``inverse=True`` its inverse) of ``x`` of shape ``(..., dim)``
    with free values ``raw`` of shape ``(..., dim, 3K - 1)`` (batch shapes broadcast), and
    the log-derivative of the map applied at each coordinate.

    >>> x = torch.tensor([-3.0, 0.5, 1.5])  # the first outside [-B, B]: the identity there
    >>> raw = torch.randn(3, num_params(4))
    >>> y, log_derivative = rational_quadratic(x, raw, bound=2.0)
    >>> x_back, inverse_log_derivative = rational_quadratic(y, raw, bound=2.0, inverse=True)
    >>> torch.allclose(x_back, x, atol=1e-5), y[0].item(), log_derivative[0].item()
    (True, -3.0, 0.0)
    >>> torch.allclose(inverse_log_derivative, -log_derivative, atol=1e-5)
    True
    """
    bins = (raw.shape[-1] + 1) // 3
    w, h, d = raw.split((bins, bins, bins - 1), dim=-1)
    widths = _knots(w, bound, bins)
    heights = _knots(h, bound, bins)
    one = d.new_ones(()).expand(*d.shape[:-1], 1)
    derivatives = torch.cat((one, F.softplus(d + _SHIFT) + MIN_DERIVATIVE, one), dim=-1)

    inside = (x > -bound) & (x < bound)
    x_in = x.clamp(-bound, bound)
    # the bin: how many inner knots lie at or below the point (of the side it comes from)
    knots = heights if inverse else widths
    k = (knots[..., 1:-1] <= x_in.unsqueeze(-1)).sum(-1, keepdim=True)
    batch = torch.broadcast_shapes(x.shape, raw.shape[:-1])
    k = k.expand(*batch, 1)

    def at(table: Tensor, offset: int = 0) -> Tensor:
        return table.expand(*batch, table.shape[-1]).gather(-1, k + offset).squeeze(-1)

    x0, x1, y0, y1 = at(widths), at(widths, 1), at(heights), at(heights, 1)
    d0, d1 = at(derivatives), at(derivatives, 1)
    width, height = x1 - x0, y1 - y0
    slope = height / width
    curvature = d0 + d1 - 2 * slope
    if inverse:
        dy = x_in - y0
        a = height * (slope - d0) + dy * curvature
        b = height * d0 - dy * curvature
        c = -slope * dy
        root = (b * b - 4 * a * c).clamp_min(0).sqrt()
        xi = (2 * c / (-b - root)).clamp(0, 1)
        out = x0 + xi * width
    else:
        xi = ((x_in - x0) / width).clamp(0, 1)
    between = xi * (1 - xi)
    denominator = slope + curvature * between
    if not inverse:
        out = y0 + height * (slope * xi * xi + d0 * between) / denominator
    numerator = slope * slope * (d1 * xi * xi + 2 * slope * between + d0 * (1 - xi) ** 2)
    log_derivative = numerator.log() - 2 * denominator.log()
    if inverse:
        log_derivative = -log_derivative
    x = x.expand(batch)
    return torch.where(inside, out, x), torch.where(inside, log_derivative, 0.0)


def _knots(free: Tensor, bound: float, bins: int) -> Tensor:
    """``K + 1`` increasing knot positions from ``-bound`` to ``bound``."""
    sizes = MIN_BIN + (1 - MIN_BIN * bins) * torch.softmax(free, dim=-1)
    edges = F.pad(torch.cumsum(sizes, dim=-1), (1, 0))
    edges = 2 * bound * edges - bound
    # exact ends: rounding in the cumulative sum must not move the boundary knots
    end = torch.full_like(edges[..., :1], bound)
    return torch.cat((-end, edges[..., 1:-1], end), dim=-1)
