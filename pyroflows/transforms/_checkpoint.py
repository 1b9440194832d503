"""Memory-saving gradients of an ODE solve through its recorded steps (the adaptive checkpoint
adjoint of Zhuang et al., 2020), with one state kept per step.

* Adaptive methods (as zuko's CNF does): each accepted step, taken backwards, is one step of
  the same Runge-Kutta tableau applied to the adjoint system, from the recorded state at the
  step's end, with the step size held. Only one function evaluation's graph is alive at a
  time, and the backward pass costs one vector-Jacobian product per stage of each step. The
  gradient is the continuous adjoint's, accurate to the solver's order on the accepted grid.
* Fixed-grid methods: each step is replayed with its graph and back-propagated, which gives
  exactly the gradient of direct back-propagation (memory of one step's stages).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torchdiffeq import odeint
from torchdiffeq._impl.odeint import SOLVERS


class _Steps:
    """Wraps the right-hand side, recording ``(t0, y0, dt)`` of every step the solver takes
    (torchdiffeq's step callbacks: accepted steps for adaptive methods, all for fixed ones)."""

    def __init__(self, func: Any, adaptive: bool) -> None:
        self.func = func
        self.steps: list[tuple[Tensor, tuple[Tensor, ...], Tensor]] = []
        name = "callback_accept_step" if adaptive else "callback_step"
        setattr(self, name, self._record)

    def __call__(self, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return self.func(t, state)

    def _record(self, t0: Tensor, y0: tuple[Tensor, ...], dt: Tensor) -> None:
        self.steps.append((t0, y0, dt))


def odeint_checkpointed(
    func: Any,
    state: tuple[Tensor, ...],
    grid: Tensor,
    inputs: tuple[Tensor, ...],
    *,
    adaptive: bool,
    leaves: tuple[Tensor, ...] | None = None,
    **kwargs: Any,
) -> tuple[Tensor, ...]:
    """The state at ``grid[-1]`` of ``odeint(func, state, grid, **kwargs)``, differentiable
    with respect to ``state`` and ``inputs`` (every tensor ``func`` depends on that needs a
    gradient). ``grid`` holds the two end times; ``adaptive`` says whether the method is.
    Where ``func`` reads a detached copy of an input computed once beforehand (a leaf that
    requires gradients), ``leaves`` holds what it reads in place of each input: the steps'
    gradients are taken with respect to the leaves and handed on to the inputs."""
    leaves = inputs if leaves is None else leaves
    return _Checkpointed.apply(func, grid, adaptive, kwargs, leaves, len(state), *state, *inputs)


class _Checkpointed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, func, grid, adaptive, kwargs, leaves, n, *tensors):  # type: ignore[override]
        recorder = _Steps(func, adaptive)
        out = odeint(recorder, tuple(tensors[:n]), grid, **kwargs)
        final = tuple(o[-1] for o in out)
        ctx.func, ctx.grid, ctx.adaptive, ctx.kwargs, ctx.n = func, grid, adaptive, kwargs, n
        ctx.steps, ctx.final = recorder.steps, tuple(f.detach() for f in final)
        ctx.leaves = tuple(leaves)
        ctx.save_for_backward(*tensors[n:])  # so that a change in place is caught
        return final

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):  # type: ignore[override]
        ctx.saved_tensors  # noqa: B018 (raises if an input changed in place since forward)
        inputs = ctx.leaves
        adjoint = grads
        totals = [torch.zeros_like(x) for x in inputs]
        sign = 1.0 if ctx.grid[-1] > ctx.grid[0] else -1.0
        tableau = _tableau(ctx.kwargs["method"]) if ctx.adaptive else None
        for i in reversed(range(len(ctx.steps))):
            t0, y0, dt = ctx.steps[i]
            # the last step ends on the end time (adaptive solves step to it: ``step_t``)
            end = ctx.grid[-1].to(t0) if i == len(ctx.steps) - 1 else t0 + sign * dt
            if tableau is None:
                adjoint = _replayed_step(ctx, y0, t0, end, dt, adjoint, inputs, totals)
            else:
                state = ctx.final if i == len(ctx.steps) - 1 else ctx.steps[i + 1][1]
                adjoint = _adjoint_step(ctx.func, tableau, state, end, t0, adjoint, inputs, totals)
        return (None, None, None, None, None, None, *adjoint, *totals)


@functools.cache
def _tableau(method: str) -> tuple[list[float], list[list[float]], list[float]]:
    """The Butcher tableau ``(nodes, rows, weights)`` of one of torchdiffeq's adaptive methods,
    without a last stage of weight zero (the first-same-as-last evaluation)."""
    tableau = SOLVERS[method].tableau
    nodes = [0.0] + [float(a) for a in tableau.alpha]
    rows = [[]] + [[float(b) for b in row] for row in tableau.beta]
    weights = [float(c) for c in tableau.c_sol]
    while weights and weights[-1] == 0.0:
        nodes, rows, weights = nodes[:-1], rows[:-1], weights[:-1]
    return nodes, rows, weights


def _vjp(func, t, y, adjoint, inputs):
    """``(f(t, y), aᵀ ∂f/∂y, aᵀ ∂f/∂inputs)`` from one evaluation whose graph is then freed."""
    y = tuple(v.detach().requires_grad_() for v in y)
    with torch.enable_grad():
        dy = func(t, y)
        wrt = (*y, *inputs)
        grads = torch.autograd.grad(dy, wrt, adjoint, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, grads, strict=True)]
    return tuple(d.detach() for d in dy), grads[: len(y)], grads[len(y) :]


def _adjoint_step(func, tableau, state, start, end, adjoint, inputs, totals):
    """One step of the tableau from ``start`` to ``end`` on the adjoint system
    ``dy/dt = f``, ``da/dt = -aᵀ ∂f/∂y``, ``dθ̄/dt = -aᵀ ∂f/∂θ``; adds the inputs' part to
    ``totals`` and returns the adjoint at ``end``."""
    nodes, rows, weights = tableau
    h = end - start
    stages: list[tuple[tuple[Tensor, ...], list[Tensor]]] = []

    def combine(start: tuple[Tensor, ...], coefficients: list[float], part: int):
        """``start + h Σ_j c_j k_j`` over the stages so far, ``k`` the state's or the
        adjoint's derivatives (``part`` 0 or 1)."""
        terms = list(zip(coefficients, stages, strict=True))
        return tuple(v + h * sum(c * s[part][j] for c, s in terms) for j, v in enumerate(start))

    for node, row in zip(nodes, rows, strict=True):
        y, a = (combine(state, row, 0), combine(adjoint, row, 1)) if row else (state, adjoint)
        dy, ay, ainputs = _vjp(func, start + node * h, y, a, inputs)
        stages.append((dy, [-g for g in ay]))
        for total, g in zip(totals, ainputs, strict=True):
            total -= (h * weights[len(stages) - 1]) * g
    return combine(adjoint, weights, 1)


def _replayed_step(ctx, y0, t0, end, dt, adjoint, inputs, totals):
    """One recorded fixed-grid step again, with gradients (the same step), back-propagated;
    adds the inputs' part to ``totals`` and returns the adjoint of the step's start."""
    y = tuple(v.detach().requires_grad_() for v in y0)
    wrt = (*y, *inputs)
    kwargs = {**ctx.kwargs, "options": {"grid_constructor": lambda func, y0, t: t}}
    with torch.enable_grad():
        recorder = _Steps(ctx.func, adaptive=False)
        y1 = tuple(o[-1] for o in odeint(recorder, y, torch.stack([t0, end]), **kwargs))
        if len(recorder.steps) != 1:  # a replay is deterministic; this would be a solver change
            raise RuntimeError(f"replaying one ODE step took {len(recorder.steps)} steps")
        step = torch.autograd.grad(y1, wrt, adjoint, allow_unused=True)
    step = [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, step, strict=True)]
    for total, g in zip(totals, step[ctx.n :], strict=True):
        total += g
    return tuple(step[: ctx.n])
