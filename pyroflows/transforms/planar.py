"""Planar flow (Rezende & Mohamed, 2015)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn import ParameterMap
from ..roots import solve_increasing
from .base import Flow, Params


class Planar(Flow):
    r"""``y = x + û tanh(wᵀx + b)``.

    The constraint ``wᵀû >= -1`` that makes the map invertible is built into the
    parameterisation ``û = u + (softplus(wᵀu) - 1 - wᵀu) w / |w|²``, so
    ``log|det J| = log(1 + wᵀû tanh'(wᵀx + b)) > -inf`` for every parameter value. It is
    computed as ``log(a² + softplus(wᵀu)(1 - a²))`` with ``a = tanh(wᵀx + b)``, a sum of
    non-negative terms that stays exact where ``wᵀû`` is close to ``-1``.

    The inverse reduces to the increasing scalar equation ``α + wᵀû tanh(α + b) = wᵀy``
    for ``α = wᵀx``, solved by bracketed Newton to 1e-12 (float64) or 1e-6 (float32)
    relative; then ``x = y - û tanh(α + b)``.

    With ``context_dim > 0`` a network of widths ``hidden_dims`` maps the context to
    ``u``, ``w`` and ``b``.

    >>> t = Planar(3)
    >>> x = torch.randn(5, 3)
    >>> torch.allclose(t.inv(t(x).clone()), x, atol=1e-5)
    True
    """

    _solves_backward = True
    _warm_starts = True
    _pulls_back_scores = True

    def __init__(self, dim: int, *, context_dim: int = 0, hidden_dims: Sequence[int] = ()) -> None:
        super().__init__(dim, context_dim=context_dim)
        scale = dim**-0.5
        self.params = ParameterMap(
            {
                "u": torch.randn(dim) * scale,
                "w": torch.randn(dim) * scale,
                "b": torch.zeros(()),
            },
            context_dim,
            hidden_dims,
        )

    def _params(self, context: Tensor | None) -> Params:
        p = self.params(context)
        u, w = p["u"], p["w"]
        wu = (w * u).sum(-1, keepdim=True)
        w_sq = (w * w).sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        gap = F.softplus(wu)  # wᵀû + 1 = softplus(wᵀu) > 0, in closed form
        u_hat = torch.addcmul(u, (gap - 1 - wu) / w_sq, w)
        return {"u": u_hat, "w": w, "b": p["b"], "gap": gap.squeeze(-1)}

    @staticmethod
    def _slope(a: Tensor, p: Params) -> Tensor:
        """``1 + wᵀû (1 - a²)`` written as ``a² + softplus(wᵀu) (1 - a²)``: a sum of
        non-negative terms, exact near the bound ``wᵀû = -1`` where the first form cancels."""
        return torch.addcmul(a * a, p["gap"], 1 - a * a)

    def _forward(self, x: Tensor, p: Params) -> tuple[Tensor, Tensor]:
        a = torch.tanh((x * p["w"]).sum(-1) + p["b"])
        y = x + p["u"] * a.unsqueeze(-1)
        return y, self._slope(a, p).log()

    def _backward(self, y: Tensor, p: Params, start: Tensor | None = None) -> tuple[Tensor, Tensor]:
        wu, b = p["gap"] - 1, p["b"]  # wᵀû
        target = (y * p["w"]).sum(-1)

        def g(alpha: Tensor) -> tuple[Tensor, Tensor]:
            a = torch.tanh(alpha + b)
            return alpha + wu * a, self._slope(a, p)

        if start is not None:  # a known solution (see Flow._warm_start)
            alpha = (start * p["w"]).sum(-1).detach()
        else:
            radius = wu.abs().detach()
            alpha = solve_increasing(
                g, target.detach(), target.detach() - radius, target.detach() + radius
            )
        value, slope = g(alpha)
        alpha = alpha - (value - target) / slope  # attaches gradients (implicit function)
        a = torch.tanh(alpha + b)
        x = y - p["u"] * a.unsqueeze(-1)
        return x, -self._slope(a, p).log()

    def _score_pullback(self, x: Tensor, p: Params, score: Tensor) -> Tensor:
        # J = I + (1 - a²) û wᵀ: Jᵀ's inverse by Sherman-Morrison, with 1 + (1 - a²) wᵀû
        # the slope; log|det J| = log slope has gradient -2a (1 - a²) wᵀû / slope · w
        with torch.no_grad():
            a = torch.tanh((x * p["w"]).sum(-1) + p["b"])
            slope, tangent = self._slope(a, p), 1 - a * a
            grad = (-2 * a * tangent * (p["gap"] - 1) / slope).unsqueeze(-1) * p["w"]
            v = score - grad
            coef = tangent * (p["u"] * v).sum(-1) / slope
            return v - coef.unsqueeze(-1) * p["w"]
