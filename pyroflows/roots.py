"""Root finding shared by the flows whose inverse has no closed form (planar, Sylvester)."""

from __future__ import annotations

import torch
from torch import Tensor


def solve_increasing(
    fn,
    target: Tensor,
    lower: Tensor,
    upper: Tensor,
    *,
    max_iter: int = 200,
) -> Tensor:
    """Elementwise root of an increasing function, by Newton's method kept in a bracket.

    ``fn(x)`` returns ``(f(x), f'(x))``; the root of ``f(x) = target`` must lie in
    ``[lower, upper]``. A Newton step that leaves the bracket is replaced by bisection, so
    the iteration always converges. It stops when every step is below
    ``tol * (1 + |x|)``, with ``tol`` = 1e-12 in float64 and 1e-6 in float32, and raises
    :class:`RuntimeError` if ``max_iter`` steps do not get there. Runs without gradients:
    callers attach them with one Newton step taken with gradients on, which gives the exact
    first-order derivatives of the root (implicit function theorem).

    >>> solve_increasing(lambda x: (x**3, 3 * x**2), torch.tensor([8.0]),
    ...                  torch.tensor([0.0]), torch.tensor([3.0]))
    tensor([2.])
    """
    tol = 1e-12 if target.dtype == torch.float64 else 1e-6
    with torch.no_grad():
        lower, upper = torch.broadcast_tensors(lower, upper)
        lower, upper = lower.clone(), upper.clone()
        x = (lower + upper) / 2
        for _ in range(max_iter):
            value, slope = fn(x)
            residual = value - target
            lower = torch.where(residual < 0, x, lower)
            upper = torch.where(residual > 0, x, upper)
            newton = x - residual / slope
            outside = ~((newton > lower) & (newton < upper))
            new = torch.where(outside, (lower + upper) / 2, newton)
            step = (new - x).abs()
            x = new
            if bool((step <= tol * (1 + x.abs())).all()):
                return x
    raise RuntimeError(
        f"solve_increasing: no convergence to tolerance {tol} within max_iter={max_iter} steps"
    )
