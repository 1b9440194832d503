"""Pyro's transform API (``_call``, ``_inverse``, ``log_abs_det_jacobian``) derived from a
family's ``_forward`` and ``_backward`` (:mod:`pyroflows.transforms.base`), with the one-entry
cache of the last ``(x, y, log|det|)`` and the rules for when an entry may serve."""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.distributions import Transform, constraints
from torch.distributions.transforms import _InverseTransform

from .. import _checks

if TYPE_CHECKING:
    from .base import Flow

_CACHE: dict[str, object] = {"block": None}
_ENTRIES = itertools.count()  # tokens of cache entries, for the hooks that drop them


@contextmanager
def cache_disabled() -> Iterator[None]:
    """Within this block every flow recomputes instead of reusing an entry cached before it
    (entries made within the block serve the block, e.g. an inverse's log-determinant for
    the ``log_abs_det_jacobian`` call that follows it, and no entry made within it serves
    anything after it).

    Used where the same tensor must be re-evaluated under different parameter values, e.g.
    the guide's log density with stopped parameters in DReG and STL gradients.
    """
    before = _CACHE["block"]
    _CACHE["block"] = object()
    try:
        yield
    finally:
        _CACHE["block"] = before


class _CachedBijection(Transform):
    """Pyro's transform API derived from the family's ``_forward``/``_backward``."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    _last: tuple | None = None
    _entry = -1  # the token of the cache entry whose results carry hooks (see ``_store``)

    @property
    def _flow(self) -> Flow:
        raise NotImplementedError

    @property
    def _context(self) -> Tensor | None:
        raise NotImplementedError

    def _tensors(self) -> list[Tensor]:
        """The tensors the map reads: the parameters in their slots now, then the context."""
        tensors = self._flow._current_parameters()
        if self._context is not None:
            tensors.append(self._context)
        return tensors

    def _state(self, tensors: list[Tensor] | None = None) -> tuple:
        """What a cache entry is valid for: grad mode, the flow's settings revision, the
        :func:`cache_disabled` block (if any), and the identity and in-place version of
        every parameter and of the context.

        Identities matter as much as versions: :func:`torch.func.functional_call` (and
        ``torch.func.grad``) swap other tensors into the same modules, and a result computed
        with one set of parameters must not be returned for another.
        """
        tensors = self._tensors() if tensors is None else tensors
        return (
            torch.is_grad_enabled(),
            self._flow._revision,
            _CACHE["block"],
            *(id(t) for t in tensors),
            *(t._version for t in tensors),
        )

    def _cached(self, position: int, tensor: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        last = self._last
        if last is None or last[position] is not tensor:
            return None
        if last[3] == self._state():
            return last[0], last[1], last[2]
        return None

    def _store(self, x: Tensor, y: Tensor, ladj: Tensor, computed: Tensor) -> None:
        """Cache ``(x, y, ladj)``; ``computed`` is whichever of ``x`` and ``y`` was computed.

        A backward pass through a result frees the graph it carries (unless retained), and a
        result returned from the cache after that could not be differentiated again (a loss
        computed twice on the same tensor with unchanged parameters would fail): the entry
        is dropped when a gradient first reaches ``computed`` or ``ladj``.
        """
        # the state holds ids: keep its tensors alive with the entry so no id is reused
        tensors = self._tensors()
        # plain attributes, written past ``nn.Module.__setattr__`` (this runs on every call)
        attributes = self.__dict__
        attributes["_last"] = (x, y, ladj, self._state(tensors), tensors)
        if torch.is_grad_enabled() and (computed.requires_grad or ladj.requires_grad):
            attributes["_entry"] = entry = next(_ENTRIES)
            forget = partial(_forget_entry, weakref.ref(self), entry)  # no cycle through self
            for t in (computed, ladj):
                # a hook on the node that made ``t`` runs when a gradient reaches ``t`` (or
                # a sibling output: an early drop costs only a recompute) and costs less to
                # register than a tensor hook; a leaf has no such node
                node = t.grad_fn
                if node is not None:
                    node.register_prehook(forget)
                elif t.requires_grad:
                    t.register_hook(forget)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, log|det dy/dx|)`` for ``x`` of shape ``(..., dim)``."""
        hit = self._cached(0, x)
        if hit is not None:
            return hit[1], hit[2]
        flow = self._flow
        _checks.event("x", x, flow.dim)
        params = flow._resolve_params(self._context)
        solve = flow._forward
        y, ladj = _finite_rows(solve, x, params) if flow._solves_forward else solve(x, params)
        self._store(x, y, ladj, y)
        return y, ladj

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log|det dx/dy|)``: the inverse map and its log-determinant."""
        hit = self._cached(1, y)
        if hit is not None:
            return hit[0], -hit[2]
        flow = self._flow
        _checks.event("y", y, flow.dim)
        start = self._warm_start(y) if flow._warm_starts else None
        if start is not None and not torch.is_grad_enabled():  # no gradients to attach
            x, ladj = start, -self._last[2]
            self._store(x, y, -ladj, x)
            return x, ladj
        params = flow._resolve_params(self._context)
        x, ladj = flow._solve_backward(y, params, start)
        self._store(x, y, -ladj, x)
        return x, ladj

    def _warm_start(self, y: Tensor) -> Tensor | None:
        """The cached ``x`` when the cached ``y`` equals ``y`` to the solver's tolerance under
        the same parameter values, else ``None``.

        This is the case of a density re-evaluated with stopped parameters (STL, DReG): the
        parameters are detached views of the same storage, the context is recomputed to the
        same values, and ``y`` is the sample just drawn, recomputed through the layers above.
        A family that warm-starts then skips its iterative solve and keeps only the Newton
        step that attaches the implicit-function gradients, exact to rounding here.
        """
        last = self._last
        if last is None or last[3][1] != self._flow._revision:
            return None
        x0, y0, _, state, tensors = last
        versions = state[len(state) - len(tensors) :]  # the state ends with the versions
        if x0.shape != y.shape or y0.shape != y.shape or y0.dtype != y.dtype:
            return None  # (a broadcast context can make x0 smaller than y: no warm start)
        if y0.device != y.device:
            return None
        exact_last = self._context is not None  # a recomputed context: compare values
        if not _same_values(self._tensors(), tensors, versions, exact_last=exact_last):
            return None
        tol = 1e-12 if y.dtype == torch.float64 else 1e-6
        with torch.no_grad():
            if not bool(((y - y0).abs() <= tol * (1 + y0.abs())).all()):
                return None
        return x0.detach()

    @property
    def inv(self) -> Transform:
        """The inverse transform, held weakly: torch's strong reference makes a cycle with
        it, so that a transform made per call (a conditioned flow) and the tensors in its
        cache would live until the garbage collector runs."""
        inv = self._inv() if isinstance(self._inv, weakref.ref) else None
        if inv is None:
            inv = _InverseTransform(self)
            self._inv = weakref.ref(inv)
        return inv

    def _call(self, x: Tensor) -> Tensor:
        return self.call_and_ladj(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self.inverse_and_ladj(y)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        hit = self._cached(0, x) or self._cached(1, y)
        if hit is not None:
            return hit[2]
        return self.call_and_ladj(x)[1]

    def clear_cache(self) -> None:
        """Forget the cached ``(x, y, log|det|)``."""
        self._last = None

    def with_cache(self, cache_size: int = 1) -> _CachedBijection:
        return self  # the one-entry cache is always on

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_last", None)
        state.pop("_parameter_slots", None)
        return state


def _forget_entry(owner: weakref.ref, entry: int, grad: object) -> None:
    """Drop ``owner``'s cache entry ``entry`` (if it is still the one cached): a gradient has
    reached its result, whose graph the backward pass frees."""
    transform = owner()
    if transform is not None and transform._entry == entry:
        transform._last = None


def _same_values(
    now: list[Tensor], then: list[Tensor], versions: tuple[int, ...], exact_last: bool
) -> bool:
    """Whether the tensors ``now`` hold the values that ``then`` held at ``versions``: the
    same storage at the same in-place version (a detached view counts), or, for the last one
    when ``exact_last`` (a recomputed context), equal elements."""
    if len(now) != len(then):
        return False
    for i, (a, b, version) in enumerate(zip(now, then, versions, strict=True)):
        if b._version != version:  # changed in place since the entry was made
            return False
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return False
        if a.data_ptr() == b.data_ptr() and a._version == version:
            continue
        if not (exact_last and i == len(now) - 1 and torch.equal(a, b)):
            return False
    return True


def _finite_rows(solve: Any, value: Tensor, params: Any) -> tuple[Tensor, Tensor]:
    """``solve(value, params)`` for the rows of ``value`` that are finite; NaN for the others.

    An iterative solve would otherwise spend its budget on a row that has no answer and then
    blame the solver (or the stiffness of an ODE) for the whole batch.
    """
    finite = torch.isfinite(value).all(-1, keepdim=True)
    if bool(finite.all()):
        return solve(value, params)
    out, ladj = solve(torch.where(finite, value, torch.zeros_like(value)), params)
    nan = torch.full_like(out, math.nan)
    return torch.where(finite, out, nan), torch.where(finite[..., 0], ladj, nan[..., 0])
