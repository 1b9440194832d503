r"""From discrete data to the continuous space a flow models, with the correction that makes
a flow's log density a lower bound of the data's log-likelihood.

Data ``x`` in ``{0, ..., L - 1}^D`` (``L = levels``: 256 for 8-bit images, 2 for binary ones,
17 for scikit-learn's 8x8 digits) get noise ``u`` in ``[0, 1)^D`` and are scaled to
``v = (x + u) / L`` in ``(0, 1)^D``; with ``alpha > 0`` (RealNVP's preprocessing) the flow
sees ``z = logit(alpha + (1 - 2 alpha) v)``, so that it models an unbounded space. For any
noise density ``q(u | x)`` on the unit cube,

``log P(x) >= E_q[log p(z) + log|dz/dv| - D log L - log q(u | x)]``

(Theis et al., 2016; Ho et al., 2019), where ``- D log L`` is the change of scale from the
integer grid to ``(0, 1)``. ``kind="uniform"`` takes ``u ~ U[0, 1)^D`` (``log q = 0``);
``kind="variational"`` learns ``q(u | x)``: ``u = sigmoid(s)`` with ``s`` drawn from a flow
conditioned on ``x`` (Flow++'s variational dequantization), trained jointly with the density,
which tightens the bound.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks
from ..autoguide import HALF_LOG_2PI
from ..flows import build, conditioned

KINDS = ("uniform", "variational")


def check_levels(x: Tensor, levels: int, name: str = "x") -> Tensor:
    """``x`` as floats, refused (naming ``name``) unless every value is an integer in
    ``[0, levels - 1]``.

    >>> check_levels(torch.tensor([0, 3, 16]), levels=17)
    tensor([ 0.,  3., 16.])
    >>> check_levels(torch.tensor([0, 17]), levels=17)
    Traceback (most recent call last):
    ...
    ValueError: x: values must lie in [0, 16] for levels=17, got values in [0, 17]
    """
    values = x.float() if not x.is_floating_point() else x
    if not bool(torch.isfinite(values).all()) or not bool((values == values.round()).all()):
        raise ValueError(
            f"{name}: dequantization needs integer values in [0, {levels - 1}] (levels="
            f"{levels}); got non-integer values. Scale the data to the integer grid (e.g. "
            "8-bit pixels as 0-255), or fit continuous data without dequantize"
        )
    low, high = values.min().item(), values.max().item()
    if low < 0 or high > levels - 1:
        raise ValueError(
            f"{name}: values must lie in [0, {levels - 1}] for levels={levels}, got values "
            f"in [{low:g}, {high:g}]"
        )
    return values


class Dequantization(nn.Module):
    r"""Noise for discrete data, the map to the flow's space, and the bound's correction.

    ``forward(x)`` returns ``(z, correction)`` with one noise draw per row of ``x``:
    ``correction = log|dz/dv| - D log L - log q(u | x)``, so that
    ``flow_log_prob(z) + correction`` is a one-sample estimate of the lower bound above.
    ``decode(z)`` maps flow-space points back to data (the cell ``floor(L v)`` they fall in).
    The variational kind's noise flow is ``pyroflows.build(flow, dim, num_layers,
    context_dim=dim, **flow_options)`` conditioned on ``x`` scaled to ``[-1, 1]``; pick a
    recipe whose forward map is cheap (``realnvp``, ``nice``, ``iaf``).

    >>> dq = Dequantization(3, levels=4, alpha=0.0)       # no logit: z = (x + u) / 4
    >>> z, correction = dq(torch.tensor([[0.0, 1.0, 3.0]]))
    >>> dq.decode(z).tolist(), round(correction.item(), 4) == round(-3 * math.log(4), 4)
    ([[0.0, 1.0, 3.0]], True)
    """

    def __init__(
        self,
        dim: int,
        levels: int,
        kind: str = "uniform",
        *,
        alpha: float = 0.05,
        flow: str = "realnvp",
        num_layers: int = 4,
        **flow_options: Any,
    ) -> None:
        super().__init__()
        self.dim = _checks.positive_int("dim", dim)
        self.levels = _checks.positive_int("levels", levels)
        if levels < 2:
            raise ValueError(f"levels must be at least 2, got {levels}")
        self.kind = _checks.one_of("kind", kind, KINDS)
        alpha = _checks.nonnegative_number("alpha", alpha)
        if alpha >= 0.5:
            raise ValueError(f"alpha must lie in [0, 0.5), got {alpha}")
        self.alpha = alpha
        self.noise = None
        if kind == "variational":
            stack = build(flow, dim, num_layers, context_dim=dim, **flow_options)
            self.noise = nn.ModuleList(stack.transforms)

    def _noise(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``u`` in ``(0, 1)^D`` and ``log q(u | x)`` per row."""
        if self.noise is None:
            return torch.rand_like(x), x.new_zeros(x.shape[:-1])
        context = 2 * x / (self.levels - 1) - 1
        eps = torch.randn_like(x)
        s, log_q = eps, -(0.5 * eps.square()).sum(-1) - HALF_LOG_2PI * self.dim
        for layer in conditioned(self.noise, context):
            s, ladj = layer.call_and_ladj(s)
            log_q = log_q - ladj
        # u = sigmoid(s): log q(u) = log q(s) - log sigmoid'(s)
        log_q = log_q - (F.logsigmoid(s) + F.logsigmoid(-s)).sum(-1)
        return torch.sigmoid(s), log_q

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _checks.event("x", x, self.dim)
        u, log_q = self._noise(x)
        v = (x + u) / self.levels
        correction = -self.dim * math.log(self.levels) - log_q
        if not self.alpha:
            return v, correction
        w = self.alpha + (1 - 2 * self.alpha) * v
        z = torch.logit(w)
        # dz/dv = (1 - 2 alpha) / (w (1 - w))
        log_dz = math.log(1 - 2 * self.alpha) - torch.log(w) - torch.log1p(-w)
        return z, correction + log_dz.sum(-1)

    def decode(self, z: Tensor) -> Tensor:
        """The data cell of each flow-space point: ``floor(L v)``, clamped to the grid."""
        v = (torch.sigmoid(z) - self.alpha) / (1 - 2 * self.alpha) if self.alpha else z
        return torch.floor(v * self.levels).clamp(0, self.levels - 1)
