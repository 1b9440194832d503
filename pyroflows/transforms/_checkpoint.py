"""Gradients of an ODE solve by replaying its accepted steps (the adaptive checkpoint adjoint
of Zhuang et al., 2020, as zuko's CNF does): memory of one state per step plus one step's
graph, and the gradient of back-propagating through the whole solve with its step sizes held
fixed (exactly that gradient for fixed-step methods)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torchdiffeq import odeint


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
    **kwargs: Any,
) -> tuple[Tensor, ...]:
    """The state at ``grid[-1]`` of ``odeint(func, state, grid, **kwargs)``, differentiable
    with respect to ``state`` and ``inputs`` (every tensor ``func`` depends on that needs a
    gradient). ``grid`` holds the two end times; ``adaptive`` says whether the method is."""
    return _Checkpointed.apply(func, grid, adaptive, kwargs, len(state), *state, *inputs)


class _Checkpointed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, func, grid, adaptive, kwargs, n, *tensors):  # type: ignore[override]
        recorder = _Steps(func, adaptive)
        out = odeint(recorder, tuple(tensors[:n]), grid, **kwargs)
        ctx.func, ctx.grid, ctx.adaptive, ctx.kwargs, ctx.n = func, grid, adaptive, kwargs, n
        ctx.steps = recorder.steps
        ctx.save_for_backward(*tensors[n:])
        return tuple(o[-1] for o in out)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):  # type: ignore[override]
        inputs = ctx.saved_tensors
        adjoint = grads
        totals = [torch.zeros_like(x) for x in inputs]
        sign = 1.0 if ctx.grid[-1] > ctx.grid[0] else -1.0
        for i in reversed(range(len(ctx.steps))):
            t0, y0, dt = ctx.steps[i]
            # the last step may pass the end; the solution there is its interpolant
            end = ctx.grid[-1].to(t0) if i == len(ctx.steps) - 1 else t0 + sign * dt
            y = tuple(v.detach().requires_grad_() for v in y0)
            wrt = (*y, *inputs)
            with torch.enable_grad():
                y1 = _replay(ctx, y, torch.stack([t0, end]), dt)
                step = torch.autograd.grad(y1, wrt, adjoint, allow_unused=True)
            step = [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, step, strict=True)]
            adjoint = step[: ctx.n]
            for total, g in zip(totals, step[ctx.n :], strict=True):
                total += g
        return (None, None, None, None, None, *adjoint, *totals)


def _replay(ctx, y: tuple[Tensor, ...], grid: Tensor, dt: Tensor) -> tuple[Tensor, ...]:
    """One recorded step again, with gradients: the same step size, so the same step."""
    kwargs = dict(ctx.kwargs)
    if ctx.adaptive:
        kwargs["options"] = {**kwargs["options"], "first_step": dt}
    else:
        kwargs["options"] = {"grid_constructor": lambda func, y0, t: t}
    recorder = _Steps(ctx.func, ctx.adaptive)
    out = odeint(recorder, y, grid, **kwargs)
    if len(recorder.steps) != 1:  # a replay is deterministic; this would be a solver change
        raise RuntimeError(f"replaying one ODE step took {len(recorder.steps)} steps")
    return tuple(o[-1] for o in out)
