"""Radial flow (Rezende & Mohamed, 2015)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn import ParameterMap
from .base import Flow, Params


class Radial(Flow):
    r"""``y = x + β (x - x₀) / (α + r)`` with ``r = |x - x₀|``.

    ``α = softplus(α')`` and ``β = -α + softplus(β')`` enforce ``α > 0`` and ``β > -α``,
    which makes the map invertible, with
    ``log|det J| = (d - 1) log(1 + β h) + log(1 + α β h²)`` and ``h = 1 / (α + r)``.

    The inverse is the 1-D root in ``r``: ``|y - x₀| = r (1 + β / (α + r))`` is the
    quadratic ``r² + (α + β - |y - x₀|) r - α |y - x₀| = 0``, whose one non-negative root
    is taken in closed form (the cancellation-free branch of the quadratic formula), so it
    is exact to rounding.

    >>> t = Radial(3)
    >>> x = torch.randn(5, 3)
    >>> torch.allclose(t.inv(t(x).clone()), x, atol=1e-5)
    True
    """

    _pulls_back_scores = True

    def __init__(self, dim: int, *, context_dim: int = 0, hidden_dims: Sequence[int] = ()) -> None:
        super().__init__(dim, context_dim=context_dim)
        self.params = ParameterMap(
            {
                "center": torch.randn(dim) * dim**-0.5,
                "alpha": torch.zeros(()),
                "beta": torch.zeros(()),
            },
            context_dim,
            hidden_dims,
        )

    def _params(self, context: Tensor | None) -> Params:
        p = self.params(context)
        alpha = F.softplus(p["alpha"])
        return {"center": p["center"], "alpha": alpha, "beta": F.softplus(p["beta"]) - alpha}

    def _ladj(self, h: Tensor, beta_h: Tensor, p: Params) -> Tensor:
        """``log|det J|`` from ``h = 1 / (α + r)`` and ``β h``."""
        return (self.dim - 1) * torch.log1p(beta_h) + torch.log1p(p["alpha"] * beta_h * h)

    def _forward(self, x: Tensor, p: Params) -> tuple[Tensor, Tensor]:
        diff = x - p["center"]
        h = torch.reciprocal(p["alpha"] + torch.linalg.vector_norm(diff, dim=-1))
        beta_h = p["beta"] * h
        return torch.addcmul(x, beta_h.unsqueeze(-1), diff), self._ladj(h, beta_h, p)

    def _backward(self, y: Tensor, p: Params) -> tuple[Tensor, Tensor]:
        alpha, beta = p["alpha"], p["beta"]
        diff = y - p["center"]
        r_y = torch.linalg.vector_norm(diff, dim=-1)
        c = alpha + beta - r_y
        root = (c * c + 4 * alpha * r_y).sqrt()
        r = torch.where(c > 0, 2 * alpha * r_y / (c + root), (root - c) / 2)
        h = torch.reciprocal(alpha + r)
        beta_h = beta * h
        x = p["center"] + diff / (1 + beta_h).unsqueeze(-1)
        return x, -self._ladj(h, beta_h, p)

    def _score_pullback(self, x: Tensor, p: Params, score: Tensor) -> Tensor:
        # J = (1 + βh) I - βh² d dᵀ / r with d = x - x₀ (symmetric): its inverse by
        # Sherman-Morrison, whose denominator is 1 + αβh²; log|det J| depends on r alone
        with torch.no_grad():
            alpha, beta = p["alpha"], p["beta"]
            diff = x - p["center"]
            r = torch.linalg.vector_norm(diff, dim=-1)
            h = torch.reciprocal(alpha + r)
            beta_h = beta * h
            d_ladj = -(self.dim - 1) * beta_h * h / (1 + beta_h) - 2 * alpha * beta_h * h * h / (
                1 + alpha * beta_h * h
            )
            unit = diff / r.clamp_min(torch.finfo(r.dtype).tiny).unsqueeze(-1)
            v = score - d_ladj.unsqueeze(-1) * unit
            along = (unit * v).sum(-1) * (-beta_h * h * r) / (1 + alpha * beta_h * h)
            return (v - along.unsqueeze(-1) * unit) / (1 + beta_h).unsqueeze(-1)
