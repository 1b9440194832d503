"""Coupling layers: NICE additive (Dinh et al., 2015), RealNVP affine (Dinh et al., 2017) and
rational-quadratic spline coupling (Durkan et al., 2019)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from pyro.nn import ConditionalDenseNN, DenseNN
from torch import Tensor, nn

from .. import _checks
from .base import Flow
from .spline import num_params, rational_quadratic

KINDS = ("affine", "additive", "spline")


class Coupling(Flow):
    r"""Half the coordinates pass unchanged and condition an elementwise map of the rest.

    With ``x = (x_a, x_b)``: ``y_a = x_a`` and ``y_b = x_b ⊙ exp(s(x_a)) + t(x_a)``
    (``kind="affine"``, RealNVP) or ``y_b = x_b + t(x_a)`` (``kind="additive"``, NICE,
    volume preserving). ``log|det J| = Σ s``, with ``s = 5 tanh(s' / 5)`` softly clamped.
    The inverse is exact: ``x_b = (y_b - t(y_a)) ⊙ exp(-s(y_a))``. ``kind="spline"`` maps
    each coordinate of ``x_b`` by a monotone rational-quadratic spline on ``[-bound,
    bound]`` with ``bins`` bins, identity outside, whose ``3 bins - 1`` free values the
    network gives (:mod:`pyroflows.transforms.spline`; the neural spline flow's coupling
    layer); its inverse is exact too.

    ``x_a`` is the first ``ceil(dim / 2)`` coordinates when ``parity=0`` and the last
    ``floor(dim / 2)`` when ``parity=1``; :func:`pyroflows.flows.build` alternates them.
    With ``dim=1`` there is nothing to condition on and the layer is an elementwise affine
    (or additive) map whose parameters are learned, or given by the context when amortized. The
    conditioner is Pyro's :class:`DenseNN` (``ConditionalDenseNN`` with a context), its last
    layer zero-initialised so that a fresh layer is the identity (as in Glow).

    >>> t = Coupling(4, hidden_dims=(16,))
    >>> x = torch.randn(5, 4)
    >>> torch.allclose(t.inv(t(x).clone()), x)
    True
    """

    def __init__(
        self,
        dim: int,
        *,
        context_dim: int = 0,
        kind: str = "affine",
        hidden_dims: Sequence[int] = (64, 64),
        parity: int = 0,
        bins: int = 8,
        bound: float = 5.0,
    ) -> None:
        super().__init__(dim, context_dim=context_dim)
        self.kind = _checks.one_of("kind", kind, KINDS)
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity!r}")
        self.parity = parity
        self.bins = _checks.positive_int("bins", bins)
        self.bound = _checks.positive_number("bound", bound)
        hidden = list(_checks.int_sequence("hidden_dims", hidden_dims))
        # one coordinate: nothing to condition on, so the layer is an elementwise map with
        # learned (or, amortized, context-given) shift and scale
        split = 0 if dim == 1 else (dim + 1) // 2 if parity == 0 else dim // 2
        order = torch.arange(dim) if parity == 0 else torch.arange(dim).roll(-(dim - split))
        self.register_buffer("_order", order, persistent=False)
        self.register_buffer("_unorder", torch.argsort(order), persistent=False)
        self.split = split
        n_out = dim - split
        param_dims = {"affine": [n_out, n_out], "additive": [n_out],
                      "spline": [n_out * num_params(self.bins)]}[kind]  # fmt: skip
        with warnings.catch_warnings():  # split = 0: torch warns of its empty weight
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            if context_dim:
                self.net: nn.Module = ConditionalDenseNN(split, context_dim, hidden, param_dims)
            else:
                self.net = DenseNN(split, hidden, param_dims)
        last = self.net.layers[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def extra_repr(self) -> str:
        extra = f", bins={self.bins}, bound={self.bound}" if self.kind == "spline" else ""
        return f"{super().extra_repr()}, kind={self.kind!r}, parity={self.parity}{extra}"

    def _shift_log_scale(self, x_a: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor | None]:
        out = self.net(x_a) if context is None else self.net(x_a, context)
        if self.kind == "additive":
            return out, None
        shift, s = out
        return shift, 5 * torch.tanh(s / 5)

    def _map(self, x: Tensor, context: Tensor | None, sign: int) -> tuple[Tensor, Tensor]:
        if context is not None:  # the network takes equal batch shapes: broadcast both
            batch = torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
            x = x.expand(*batch, self.dim)
            context = context.expand(*batch, context.shape[-1])
        x = x[..., self._order]
        x_a, x_b = x[..., : self.split], x[..., self.split :]
        y_b, ladj = self._map_half(x_a, x_b, context, sign)
        x_a = x_a.expand(*y_b.shape[:-1], self.split)
        return torch.cat([x_a, y_b], dim=-1)[..., self._unorder], ladj

    def _map_half(
        self, x_a: Tensor, x_b: Tensor, context: Tensor | None, sign: int
    ) -> tuple[Tensor, Tensor]:
        """``y_b`` (or with ``sign < 0`` ``x_b`` from ``y_b``) and its log-determinant."""
        if self.kind == "spline":
            raw = self.net(x_a) if context is None else self.net(x_a, context)
            raw = raw.unflatten(-1, (self.dim - self.split, num_params(self.bins)))
            y_b, log_derivative = rational_quadratic(x_b, raw, self.bound, inverse=sign < 0)
            return y_b, log_derivative.sum(-1)
        shift, log_scale = self._shift_log_scale(x_a, context)
        if log_scale is None:
            y_b = x_b + sign * shift
            ladj = x_b.new_zeros(()).expand(
                torch.broadcast_shapes(x_b.shape[:-1], shift.shape[:-1])
            )
        elif sign > 0:
            y_b, ladj = x_b * log_scale.exp() + shift, log_scale.sum(-1)
        else:
            y_b, ladj = (x_b - shift) * (-log_scale).exp(), -log_scale.sum(-1)
        return y_b, ladj

    def _forward(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._map(x, context, +1)

    def _backward(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._map(y, context, -1)
