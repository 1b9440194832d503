"""Autoregressive flows: IAF and MAF (Kingma et al., 2016; Papamakarios et al., 2017), with an
affine or a rational-quadratic spline map per coordinate (Durkan et al., 2019)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks
from ..nn import MADE
from .base import Flow
from .spline import num_params, rational_quadratic

DIRECTIONS = ("iaf", "maf")
TRANSFORMERS = ("affine", "spline")


class Autoregressive(Flow):
    r"""``y = x ⊙ σ(c) + μ(c)`` with ``(μ, σ)`` from a masked autoregressive network (MADE).

    ``direction="iaf"`` conditions on the input, ``c = x``: the forward map (sampling) is
    one network pass and the inverse takes ``dim`` passes. ``direction="maf"`` conditions on
    the output, ``c = y``: the inverse (density evaluation) is one pass and sampling takes
    ``dim`` passes. ``log|det J| = Σ log σ`` either way.

    ``stable=True`` is the gated update of Kingma et al. (2016):
    ``σ = sigmoid(clamp(s + 2, -5, 5))``, ``μ = (1 - σ) m``, i.e. ``y = σ x + (1 - σ) m``.
    Otherwise ``log σ = clamp(s, -5, 5)``. Either way the clamp has its exact (zero outside
    the range) gradient, and it bounds how strongly a layer contracts, so that the inverse
    of points far from the data stays finite.

    ``transformer="spline"`` replaces the affine map of each coordinate by a monotone
    rational-quadratic spline on ``[-bound, bound]`` with ``bins`` bins, identity outside
    (:mod:`pyroflows.transforms.spline`), its ``3 bins - 1`` free values per coordinate from
    the network: the neural spline flow's autoregressive layer.

    ``permutation`` is the order of the autoregressive factorisation (default: identity);
    :func:`pyroflows.flows.build` reverses it between layers. ``context_dim > 0`` feeds the
    context to every unit of the network's first layer (:class:`pyroflows.nn.MADE`).

    >>> t = Autoregressive(3, hidden_dims=(16,))
    >>> x = torch.randn(5, 3)
    >>> torch.allclose(t.inv(t(x).clone()), x, atol=1e-5)
    True
    """

    def __init__(
        self,
        dim: int,
        *,
        context_dim: int = 0,
        hidden_dims: Sequence[int] | None = None,
        direction: str = "iaf",
        stable: bool = False,
        permutation: Tensor | None = None,
        transformer: str = "affine",
        bins: int = 8,
        bound: float = 5.0,
    ) -> None:
        super().__init__(dim, context_dim=context_dim)
        self.direction = _checks.one_of("direction", direction, DIRECTIONS)
        self.transformer = _checks.one_of("transformer", transformer, TRANSFORMERS)
        if stable and transformer == "spline":
            raise ValueError("stable applies to transformer='affine' only")
        self.stable = bool(stable)
        self.bins = _checks.positive_int("bins", bins)
        self.bound = _checks.positive_number("bound", bound)
        hidden = _checks.int_sequence("hidden_dims", hidden_dims or (max(2 * dim, 16),) * 2)
        if permutation is None:
            permutation = torch.arange(dim)
        elif not (
            isinstance(permutation, Tensor) and sorted(permutation.tolist()) == list(range(dim))
        ):
            raise ValueError(
                f"permutation must be a permutation of range({dim}), got {permutation!r}"
            )
        outputs = num_params(self.bins) if transformer == "spline" else 2
        self.net = MADE(
            dim, hidden, context_dim=context_dim, permutation=permutation, outputs=outputs
        )
        # one-hot rows: the coordinate each sequential pass fixes, in the network's order
        order = torch.eye(dim, dtype=torch.bool)[permutation]
        self.register_buffer("_order", order, persistent=False)
        self.register_buffer("_permutation", permutation.clone(), persistent=False)
        self.register_buffer("_unpermutation", torch.argsort(permutation), persistent=False)

    def extra_repr(self) -> str:
        extra = f", bins={self.bins}, bound={self.bound}" if self.transformer == "spline" else ""
        return (
            f"{super().extra_repr()}, direction={self.direction!r}, "
            f"transformer={self.transformer!r}{extra}, stable={self.stable}"
        )

    @property
    def _warm_starts(self) -> bool:  # see _newton_step
        return self.direction == "iaf"

    @property
    def _pulls_back_scores(self) -> bool:
        return self.direction == "iaf"

    def _affine(self, params: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``(σ, μ, log σ)`` given the network's outputs."""
        m, s = params
        if self.stable:
            s = F.hardtanh(s + 2.0, -5.0, 5.0)  # bounded contraction: inverse stays finite
            gate = torch.sigmoid(s)
            return gate, (1 - gate) * m, F.logsigmoid(s)
        log_scale = F.hardtanh(s, -5.0, 5.0)
        return log_scale.exp(), m, log_scale

    def _elementwise(
        self, value: Tensor, c: Tensor, net: Callable, inverse: bool
    ) -> tuple[Tensor, Tensor]:
        """Each coordinate's map (or its inverse) of ``value``, conditioned on ``c``, and the
        log-derivative of what was applied, per coordinate."""
        return self._transform(value, net(c), inverse)

    def _transform(self, value: Tensor, params: Any, inverse: bool) -> tuple[Tensor, Tensor]:
        """``_elementwise`` given the network's outputs ``params``."""
        if self.transformer == "spline":
            return rational_quadratic(value, params, self.bound, inverse)
        scale, shift, log_scale = self._affine(params)
        if inverse:
            return (value - shift) / scale, -log_scale
        return torch.addcmul(shift, value, scale), log_scale

    def _params(self, context: Tensor | None) -> Callable:
        """The network bound to this context (masked weights, the context's term); a spline
        takes its free values as one view."""
        return self.net.bind(context, stacked=self.transformer == "spline")

    def _forward(self, x: Tensor, net: Callable) -> tuple[Tensor, Tensor]:
        if self.direction == "iaf":
            y, log_derivative = self._elementwise(x, x, net, inverse=False)
            return y, log_derivative.sum(-1)
        return self._solve(x, net, inverse=False)

    def _backward(
        self, y: Tensor, net: Callable, start: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if self.direction == "maf":
            x, log_derivative = self._elementwise(y, y, net, inverse=True)
            return x, log_derivative.sum(-1)
        if start is not None:
            return self._newton_step(y, net, start)
        return self._solve(y, net, inverse=True)

    def _newton_step(self, y: Tensor, net: Callable, start: Tensor) -> tuple[Tensor, Tensor]:
        """The IAF's inverse at ``y`` from a known solution ``start`` (see
        ``Flow._warm_start``), with its log-determinant: ``x = start + J⁻¹ (y - f(start))``
        with the Jacobian ``J`` of the forward map at ``start``, triangular in the
        autoregressive order, and the log-derivative ``L`` at ``x`` linearised at ``start``,
        ``L(start) + ∇L · (x - start)``.

        The values are ``start`` and ``L(start)`` to rounding and the first derivatives are
        the implicit function's, so a density with stopped parameters (STL, DReG) needs no
        sequential inverse and one network pass: ``J`` and ``∇L`` come without a graph from
        the network's Jacobian (:meth:`pyroflows.nn.MADE.bind`) and each coordinate's
        sensitivities to its own input and network outputs.
        """
        start = start.detach()
        params, jacobian = net(start, jacobian=True)
        out, log_derivative = self._transform(start, params, inverse=False)
        with torch.no_grad():
            dy, dy_params, dl, dl_params = self._sensitivities(start, params)
            lower = jacobian.matrix(dy_params, ordered=True)
            lower.diagonal(dim1=-2, dim2=-1).add_(dy[..., self._permutation])
            grad_log_derivative = dl + jacobian.vector_product(dl_params)
        residual = (y - out)[..., self._permutation].unsqueeze(-1)
        step = torch.linalg.solve_triangular(lower, residual, upper=False).squeeze(-1)
        step = step[..., self._unpermutation]
        ladj = log_derivative.sum(-1) + (grad_log_derivative * step).sum(-1)
        return start + step, -ladj

    def _score_pullback(self, x: Tensor, net: Callable, score: Tensor) -> Tensor:
        """``Jᵀ⁻¹ (score - ∇L)`` with the forward map's Jacobian ``J`` and summed
        log-derivative ``L`` at ``x``, from the network's Jacobian without a graph
        (:class:`pyroflows._made_jacobian.MADEJacobian`)."""
        with torch.no_grad():
            params, jacobian = net(x, jacobian=True)
            dy, dy_params, dl, dl_params = self._sensitivities(x, params)
            rhs = score - dl - jacobian.vector_product(dl_params)
            return jacobian.solve_transposed(dy_params, dy, rhs)

    def _sensitivities(self, x: Tensor, params: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Each coordinate's derivatives of its forward output ``y_i`` and log-derivative
        ``L_i`` in its own input ``x_i``, and in its network outputs (shape
        ``(..., outputs, dim)``): the affine map's in closed form, the spline's by
        autograd."""
        if self.transformer == "spline":
            with torch.enable_grad():
                leaf, own = x.detach().requires_grad_(), params.detach().requires_grad_()
                y, log_derivative = self._transform(leaf, own, inverse=False)
                dy = torch.autograd.grad(y.sum(), [leaf, own], retain_graph=True)
                dl = torch.autograd.grad(log_derivative.sum(), [leaf, own], allow_unused=True)
            dl_x = torch.zeros_like(x) if dl[0] is None else dl[0]
            return dy[0], dy[1].mT, dl_x, dl[1].mT
        m, s = params
        if self.stable:
            inside = ((s + 2.0) > -5.0) & ((s + 2.0) < 5.0)
            gate = torch.sigmoid(F.hardtanh(s + 2.0, -5.0, 5.0))
            slope = gate * (1 - gate) * inside
            dy_params = torch.stack([1 - gate, (x - m) * slope], -2)
            dl_params = torch.stack([torch.zeros_like(m), (1 - gate) * inside], -2)
            return gate, dy_params, torch.zeros_like(x), dl_params
        inside = (s > -5.0) & (s < 5.0)
        scale = F.hardtanh(s, -5.0, 5.0).exp()
        dy_params = torch.stack([torch.ones_like(m), x * scale * inside], -2)
        dl_params = torch.stack([torch.zeros_like(m), inside.to(s.dtype)], -2)
        return scale, dy_params, torch.zeros_like(x), dl_params

    def _solve(self, value: Tensor, net: Callable, inverse: bool) -> tuple[Tensor, Tensor]:
        """The sequential direction: ``dim`` network passes, pass ``k`` fixing coordinate
        ``permutation[k]`` from the ones fixed before it; returns it with the summed
        log-derivative of the map applied (the last pass conditions every coordinate on its
        final predecessors).

        Coordinates not yet fixed stay zero rather than holding the last pass's guesses: a
        guess can overflow far from the data, and ``0 · inf`` in the masked layers would
        spread NaN to coordinates that never depend on it.
        """
        out = torch.zeros_like(value)
        for position in self._order:
            new, log_derivative = self._elementwise(value, out, net, inverse)
            out = torch.where(position, new, out)
        return out, log_derivative.sum(-1)
