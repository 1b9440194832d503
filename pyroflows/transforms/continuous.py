"""Continuous normalizing flow (Chen et al., 2018; FFJORD, Grathwohl et al., 2019)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from .. import _checks
from ._checkpoint import odeint_checkpointed
from .base import Flow
from .dynamics import AugmentedDynamics, Dynamics

TRACES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun")
FIXED_METHODS = ("rk4", "midpoint", "euler")
REGULARIZERS = ("kinetic", "jacobian")
NORMS = ("rms", "max")
SETTINGS: dict[str, Callable[[str, Any], Any]] = {
    "trace": partial(_checks.one_of, choices=TRACES),
    "probe": partial(_checks.one_of, choices=PROBES),
    "method": partial(_checks.one_of, choices=ADAPTIVE_METHODS + FIXED_METHODS),
    "norm": partial(_checks.one_of, choices=NORMS),
    "rtol": _checks.positive_number,
    "atol": _checks.positive_number,
    "trace_scale": _checks.positive_number,
    "max_num_steps": _checks.positive_int,
    "num_steps": _checks.positive_int,
    "adjoint": lambda _, value: bool(value),
    "checkpoint": lambda _, value: bool(value),
    "regularize": lambda _, value: bool(value),
}


def _max_norm(errors: tuple[Tensor, ...]) -> Tensor:
    """The largest scaled error of any element: every sample is held to the tolerance."""
    return torch.stack([e.abs().max() for e in errors]).max()


def _rms_norm(errors: tuple[Tensor, ...]) -> Tensor:
    """The largest root-mean-square scaled error of any part: torchdiffeq's default."""
    return torch.stack([e.square().mean().sqrt() for e in errors]).max()


def _flow_norm(norm: Callable[[tuple[Tensor, ...]], Tensor]) -> Callable:
    """``norm`` of the errors of the state and its log-determinant alone: the regularisers'
    integrals ride along on the steps the flow needs, as they do not feed back into it."""
    return lambda errors: norm(errors[:2])


class Continuous(Flow):
    r"""``y = z(T)`` for ``dz/dt = f(z, t, c)``, ``z(0) = x``;
    ``log|det dy/dx| = ∫₀ᵀ tr(∂f/∂z) dt``.

    The state and its log-determinant are integrated together by :mod:`torchdiffeq`; the
    inverse integrates backward in time. Gradients: back-propagation through the solver
    (default: fastest, memory grows with the steps), ``adjoint=True`` (``odeint_adjoint``:
    memory constant in the steps, a second adaptive solve backward) or ``checkpoint=True``
    (one state per step in memory and one function evaluation's graph at a time: each
    accepted step of an adaptive method is taken backwards as one step of the same tableau on
    the adjoint system, as zuko does; fixed steps are replayed, giving the default's
    gradient). The trace is ``trace="exact"`` (in closed form from the activations' slopes
    where ``f`` has at most two hidden layers, no derivative taken; one vector-Jacobian product
    per dimension for deeper networks) or ``"hutchinson"`` (``E[εᵀ ∂f/∂z ε]`` with one
    Rademacher or Gaussian probe ``ε`` held fixed within a solve, FFJORD's unbiased estimate).
    Set ``flow.trace = "exact"`` (or use :func:`exact_traces` for a block) to evaluate exactly
    after training with Hutchinson: the solver settings are plain attributes, checked when set,
    and setting one invalidates the cached solve.

    ``f`` is an MLP (``hidden_dims``, ``activation`` in ``tanh``, ``softplus``, ``elu``) on ``z``,
    Fourier features of ``t`` and, with ``context_dim > 0``, the context (amortized dynamics:
    the encoder's context is an input of the network at every time; its share of the first
    layer is computed once per solve). ``rank=k > 0`` amortizes instead as FFJORD's VAE does:
    every layer gets a rank-``k`` weight and a bias of its own per sample, read from the
    context (see :class:`~pyroflows.transforms.dynamics.Dynamics`).

    Solver: ``method`` (adaptive ``dopri5`` (default), ``dopri8``, ``bosh3``,
    ``adaptive_heun`` with ``rtol``/``atol`` and at most ``max_num_steps`` steps, the error
    measured by torchdiffeq's RMS over each state tensor (``norm="rms"``) or by its largest
    element (``norm="max"``, every sample within tolerance, as zuko does); fixed-step
    ``rk4``, ``midpoint``, ``euler`` with ``num_steps`` steps), end time ``time`` (learnable
    with ``learn_time=True``). ``nfe_forward`` and ``nfe_backward`` give the number of
    function evaluations of the last solve and of the backward pass through it (the adjoint's
    backward solve or the backward steps; direct back-propagation evaluates no function).

    ``regularize=True`` also integrates RNODE's regularisers (Finlay et al., 2020), the kinetic
    energy ``∫|f|² dt`` and the Jacobian Frobenius norm ``∫|∂f/∂z|²_F dt`` (exact, or its
    Hutchinson estimate), during the same solve and on its steps (an adaptive solver's error
    control leaves them out: the steps and the result are those without them);
    ``flow.regularization`` holds them, per sample, after each solve, for the user to weight
    into the loss.

    ``trace_scale`` multiplies these scalar states inside the solve (and divides them out
    after), so the solver's absolute tolerance on them is ``atol / trace_scale`` while the
    state keeps ``atol``. The default 1 holds the log-determinant to the same tolerance as
    the state; zuko's CNF uses 1e-2, which takes fewer steps at a slightly less accurate
    log-determinant.

    >>> t = Continuous(2, hidden_dims=(16,))
    >>> x = torch.randn(5, 2)
    >>> y, ladj = t.call_and_ladj(x)
    >>> torch.allclose(t.inv(y.detach().clone()), x, atol=1e-3), t.nfe_forward > 0
    (True, True)
    """

    _solves_forward = True
    _solves_backward = True

    def __init__(
        self,
        dim: int,
        *,
        context_dim: int = 0,
        hidden_dims: Sequence[int] = (64, 64),
        activation: str = "tanh",
        freqs: int = 3,
        rank: int = 0,
        trace: str = "exact",
        probe: str = "rademacher",
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-6,
        max_num_steps: int = 1000,
        num_steps: int = 20,
        time: float = 1.0,
        learn_time: bool = False,
        adjoint: bool = False,
        checkpoint: bool = False,
        regularize: bool = False,
        trace_scale: float = 1.0,
        norm: str = "rms",
    ) -> None:
        super().__init__(dim, context_dim=context_dim)
        _checks.nonnegative_int("freqs", freqs)
        self.dynamics = Dynamics(
            dim, context_dim, hidden_dims, activation, freqs, time, learn_time, rank
        )
        self.trace, self.probe, self.method = trace, probe, method
        self.rtol, self.atol, self.trace_scale, self.norm = rtol, atol, trace_scale, norm
        self.max_num_steps, self.num_steps = max_num_steps, num_steps
        self.adjoint, self.checkpoint, self.regularize = adjoint, checkpoint, regularize
        self._gradient_mode()
        self.regularization: dict[str, Tensor] = {}
        # a training step's terms come from its first solve (the one that drew or scored the
        # batch), not from a later one with stopped parameters: see _training.SolverTerms
        self.first_terms_only = False
        self._solve: AugmentedDynamics | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        check = SETTINGS.get(name)
        if check is not None:  # validated, and any cached solve is stale
            value = check(name, value)
            self._revision += 1
        super().__setattr__(name, value)

    @property
    def nfe_forward(self) -> int:
        """Function evaluations of the last solve."""
        return 0 if self._solve is None else self._solve.calls_in_solve

    @property
    def nfe_backward(self) -> int:
        """Function evaluations since the last solve ended: the adjoint's backward solve or the
        backward steps."""
        return 0 if self._solve is None else self._solve.calls - self._solve.calls_in_solve

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_solve"], state["regularization"] = None, {}
        return state

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, trace={self.trace!r}, method={self.method!r}, "
            f"rtol={self.rtol}, atol={self.atol}, adjoint={self.adjoint}, "
            f"checkpoint={self.checkpoint}"
        )

    def _gradient_mode(self) -> str:
        if self.adjoint and self.checkpoint:
            raise ValueError("adjoint and checkpoint are alternatives: set at most one to True")
        return "adjoint" if self.adjoint else "checkpoint" if self.checkpoint else "direct"

    def _integrate(self, z: Tensor, context: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor]:
        mode = self._gradient_mode()
        batch = z.shape[:-1]
        if context is not None:
            batch = torch.broadcast_shapes(batch, context.shape[:-1])
            z = z.expand(*batch, self.dim)
        probe = None
        if self.trace == "hutchinson":
            probe = torch.randn_like(z)
            if self.probe == "rademacher":
                probe = probe.sign()
        solve = AugmentedDynamics(
            self.dynamics,
            context,
            mode != "adjoint",
            self.trace,
            probe,
            self.regularize,
            self.trace_scale,
        )
        zeros = z.new_zeros(batch)
        state = (z, zeros) + ((zeros, zeros) if self.regularize else ())
        grid = torch.tensor([1.0, 0.0] if reverse else [0.0, 1.0], dtype=z.dtype, device=z.device)
        if self.method in ADAPTIVE_METHODS:
            # the last step lands on the end time, so the result is a step's endpoint, not
            # the 4th-order interpolant of a step past it (a larger error for the same steps)
            options = {"max_num_steps": self.max_num_steps, "step_t": grid[1:]}
            norm = _max_norm if self.norm == "max" else _rms_norm
            if self.regularize:
                options["norm"] = _flow_norm(norm)
            elif self.norm == "max":
                options["norm"] = norm
        else:
            options = {"step_size": 1.0 / self.num_steps}
        kwargs = {"rtol": self.rtol, "atol": self.atol, "method": self.method, "options": options}
        params = ()  # what the adjoint and the backward steps return gradients for
        if mode != "direct":
            params = tuple(p for p in self.dynamics.parameters() if p.requires_grad)
            # the checkpointed steps read the context only through the per-solve stand-ins
            if mode == "adjoint" and context is not None and context.requires_grad:
                params += (context,)
        try:
            if mode == "adjoint":
                # error control of the backward solve on the state and its adjoint only, not on
                # the parameter gradients (the "seminorm" of Kidger et al., 2021)
                out = odeint_adjoint(
                    solve,
                    state,
                    grid,
                    adjoint_params=params,
                    adjoint_options={**options, "norm": "seminorm"},
                    **kwargs,
                )
                final = [s[-1] for s in out]
            elif mode == "checkpoint":
                adaptive = self.method in ADAPTIVE_METHODS
                originals, copies = solve.stand_ins()
                final = odeint_checkpointed(
                    solve, state, grid, params + originals, adaptive=adaptive,
                    leaves=params + copies, **kwargs,
                )  # fmt: skip
            else:
                final = [s[-1] for s in odeint(solve, state, grid, **kwargs)]
        except AssertionError as error:  # torchdiffeq's step budget and step-size underflow
            raise RuntimeError(
                f"ODE solve failed: {error}. The dynamics are too stiff for rtol={self.rtol}, "
                f"atol={self.atol} within max_num_steps={self.max_num_steps}; loosen the "
                "tolerances or raise max_num_steps"
            ) from error
        solve.calls_in_solve = solve.calls
        self._solve = solve
        final = [final[0], *(s / self.trace_scale for s in final[1:])]
        if self.regularize and not (self.first_terms_only and self.regularization):
            sign = -1.0 if reverse else 1.0
            self.regularization = {"kinetic": sign * final[2], "jacobian": sign * final[3]}
        return final[0], final[1]

    def _forward(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._integrate(x, context, reverse=False)

    def _backward(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self._integrate(y, context, reverse=True)


@contextlib.contextmanager
def continuous_settings(module: nn.Module, **values: Any) -> Iterator[None]:
    """Every :class:`Continuous` layer in ``module`` takes the settings ``values`` inside
    the block, and its own settings again after it.

    >>> flow = Continuous(2, hidden_dims=(8,))
    >>> with continuous_settings(flow, regularize=True):
    ...     inside = flow.regularize
    >>> inside, flow.regularize
    (True, False)
    """
    layers = [m for m in module.modules() if isinstance(m, Continuous)]
    before = [{name: getattr(m, name) for name in values} for m in layers]
    for layer in layers:
        for name, value in values.items():
            setattr(layer, name, value)
    try:
        yield
    finally:
        for layer, settings in zip(layers, before, strict=True):
            for name, value in settings.items():
                setattr(layer, name, value)


@contextlib.contextmanager
def exact_traces(*owners: object) -> Iterator[None]:
    """Every :class:`Continuous` layer in the modules ``owners`` (a bound method stands for
    its object; anything else is passed over) computes its exact trace inside the block, and
    its own setting again after it: for evaluations (bounds, importance weights), which an
    estimated log-determinant would bias.

    >>> flow = Continuous(2, hidden_dims=(8,), trace="hutchinson")
    >>> with exact_traces(flow, print):
    ...     inside = flow.trace
    >>> inside, flow.trace
    ('exact', 'hutchinson')
    """
    with contextlib.ExitStack() as stack:
        for owner in owners:
            owner = getattr(owner, "__self__", owner)
            if isinstance(owner, nn.Module):
                stack.enter_context(continuous_settings(owner, trace="exact"))
        yield
