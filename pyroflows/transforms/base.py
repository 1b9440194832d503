"""The transform contract every flow family follows.

A family subclasses :class:`Flow` and implements

* ``_params(context)``: the tensors the map needs (default: the context itself),
* ``_forward(x, params) -> (y, log|det dy/dx|)``,
* ``_backward(y, params) -> (x, log|det dx/dy|)`` where it has an inverse.

Everything Pyro calls (``_call``, ``_inverse``, ``log_abs_det_jacobian``) is derived from
these (:mod:`pyroflows.transforms._bijection`), with a one-entry cache of the last
``(x, y, log|det|)`` so that ``rsample`` followed by ``log_prob`` of the same tensor never
recomputes a map or a solve. An entry is used only
while the parameters (and context) are unchanged in place, as an optimiser step changes
them, and under the same grad mode, so reusing a data tensor across training steps is safe.

``Flow(dim)`` is a :class:`pyro.distributions.TransformModule`. ``Flow(dim, context_dim=k)``
is additionally a :class:`pyro.distributions.conditional.ConditionalTransformModule`:
``.condition(context)`` returns a plain :class:`ConditionedFlow`, so the same class drops
into ``TransformedDistribution`` and ``ConditionalTransformedDistribution``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from pyro.distributions import TransformModule
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor

from .. import _checks
from .._repeated import memo
from ._bijection import _CachedBijection, _finite_rows

Params = dict[str, Tensor]  # what ``_params`` returns in the parameter-valued families


class Flow(_CachedBijection, TransformModule):
    """Base class of every flow family (see the module docstring for the contract).

    >>> import torch, pyro.distributions as dist
    >>> class Scale(Flow):  # x ↦ x exp(s), elementwise
    ...     def __init__(self, dim):
    ...         super().__init__(dim)
    ...         self.log_scale = torch.nn.Parameter(torch.full((dim,), 0.5))
    ...     def _params(self, context):
    ...         return self.log_scale
    ...     def _forward(self, x, log_scale):
    ...         return x * log_scale.exp(), log_scale.sum().expand(x.shape[:-1])
    ...     def _backward(self, y, log_scale):
    ...         return y * (-log_scale).exp(), -log_scale.sum().expand(y.shape[:-1])
    >>> t, x = Scale(2), torch.randn(3, 2)
    >>> t.log_abs_det_jacobian(x, t(x)), torch.allclose(t.inv(t(x).clone()), x)
    (tensor([1., 1., 1.], grad_fn=<ExpandBackward0>), True)
    >>> q = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [t])
    >>> q.log_prob(q.rsample((4,))).shape
    torch.Size([4])
    """

    _revision = 0  # a family raises it when a setting that changes the map is changed
    # the directions computed by an iterative solve: a row that is not finite gives NaN
    # for that row alone (see ``_finite_rows``)
    _solves_forward = False
    _solves_backward = False
    # whether ``_backward`` takes ``start``, a known solution whose Newton step it keeps
    _warm_starts = False
    # whether ``_score_pullback`` is implemented
    _pulls_back_scores = False

    def __new__(cls, *args: Any, **kwargs: Any) -> Flow:
        if kwargs.get("context_dim") and not issubclass(cls, ConditionalTransformModule):
            cls = _amortized_class(cls)
        return super().__new__(cls)

    def __init__(self, dim: int, *, context_dim: int = 0) -> None:
        super().__init__(cache_size=0)
        self.dim = _checks.positive_int("dim", dim)
        self.context_dim = _checks.nonnegative_int("context_dim", context_dim)

    @property
    def _flow(self) -> Flow:
        return self

    @property
    def _context(self) -> None:
        return None

    def _current_parameters(self) -> list[Tensor]:
        """The tensors in the parameter slots now (swapped ones under ``functional_call``)."""
        slots = self.__dict__.get("_parameter_slots")
        if slots is None:
            slots = self.__dict__["_parameter_slots"] = [
                (module._parameters, name)
                for module in self.modules()
                for name, p in module._parameters.items()
                if p is not None
            ]
        return [table[name] for table, name in slots]

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Flow:
        self.__dict__.pop("_parameter_slots", None)  # conversions may replace parameters
        return super()._apply(fn, *args, **kwargs)

    def _params(self, context: Tensor | None) -> Any:
        return context

    def _forward(self, x: Tensor, params: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _backward(self, y: Tensor, params: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no inverse")

    def _solve_backward(
        self, y: Tensor, params: Any, start: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``_backward`` uncached, a row that is not finite giving NaN for that row alone
        where the inverse is an iterative solve."""
        solve = self._backward if start is None else partial(self._backward, start=start)
        return _finite_rows(solve, y, params) if self._solves_backward else solve(y, params)

    def _score_pullback(self, x: Tensor, params: Any, score: Tensor) -> Tensor:
        """``J⁻ᵀ (score - ∇ log|det J|)`` at ``x``, ``J`` the Jacobian of the forward map: the
        score ``∇ log q`` of the density after this layer at ``f(x)``, given ``score``, the
        score of the density before it at ``x``, without a graph. A density with stopped
        parameters is then its value plus this score times the sample's displacement: the
        path derivative (STL, DReG) without an inverse (Vaitl et al., 2024)."""
        raise NotImplementedError(f"{type(self).__name__} has no score pullback")

    def _resolve_params(self, context: Tensor | None) -> Any:
        if self.context_dim and context is None:
            raise ValueError(
                f"context: {type(self).__name__} is amortized (context_dim={self.context_dim});"
                " call .condition(context) first"
            )
        # once per context within repeated draws (pyroflows._repeated): fixed parameters
        return memo("parameters", (self, context), lambda: self._params(context))

    def condition(self, context: Tensor) -> ConditionedFlow:
        raise ValueError(
            f"context: {type(self).__name__} is unconditional (context_dim=0) and takes no"
            " context; build it with context_dim > 0 to amortize it"
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, context_dim={self.context_dim}"


class ConditionedFlow(_CachedBijection):
    """An amortized flow with its context fixed: a plain :class:`Transform`.

    The context of shape ``(*batch, context_dim)`` broadcasts against the batch dimensions
    of the input ``(..., *batch, dim)``. Parameters are recomputed from the context on each
    call, so one conditioned transform can be reused across optimisation steps.

    >>> import torch
    >>> from pyroflows.transforms import Planar
    >>> t = Planar(3, context_dim=2).condition(torch.randn(5, 2))  # one context per row
    >>> t
    ConditionedFlow(Planar())
    >>> t(torch.randn(4, 5, 3)).shape  # (sample, *batch, dim)
    torch.Size([4, 5, 3])
    """

    def __init__(self, flow: Flow, context: Tensor) -> None:
        super().__init__(cache_size=0)
        self._parent = flow
        self._given_context = context

    @property
    def _flow(self) -> Flow:
        return self._parent

    @property
    def _context(self) -> Tensor:
        return self._given_context

    def __repr__(self) -> str:
        return f"ConditionedFlow({self._parent!r})"


class _Amortized(ConditionalTransformModule):
    """Mixed into a family when it is built with ``context_dim > 0``."""

    def condition(self, context: Tensor) -> ConditionedFlow:
        """The transform for this context, shape ``(*batch, context_dim)``."""
        _checks.event("context", context, self.context_dim)  # type: ignore[attr-defined]
        return ConditionedFlow(self, context)  # type: ignore[arg-type]


_AMORTIZED: dict[type, type] = {}


def _amortized_class(cls: type) -> type:
    if cls not in _AMORTIZED:
        sub = type(cls.__name__, (_Amortized, cls), {"__module__": cls.__module__})
        sub.__qualname__ = f"{cls.__qualname__}.Amortized"
        cls.Amortized = sub  # makes instances picklable by qualified name
        _AMORTIZED[cls] = sub
    return _AMORTIZED[cls]
