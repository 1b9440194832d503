"""The right-hand side of a continuous flow: an MLP in the state, time features and context
(:class:`Dynamics`), and what the solver integrates with it (:class:`AugmentedDynamics`)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks
from ..nn import mlp

# the context's contribution to the dynamics: a first-layer term, or each layer's (U, V, b)
Context = Tensor | list[tuple[Tensor, Tensor, Tensor]] | None
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU}
# each activation's derivative from its module, input and output (softplus is linear past
# its threshold, ELU's negative part is α(eᵃ - 1))
SLOPES: dict[type[nn.Module], Callable[[Any, Tensor, Tensor], Tensor]] = {
    nn.Tanh: lambda m, a, y: 1.0 - y.square(),
    nn.Softplus: lambda m, a, y: torch.where(
        a * m.beta > m.threshold, 1.0, torch.sigmoid(a * m.beta)
    ),
    nn.ELU: lambda m, a, y: torch.where(a > 0, 1.0, y + m.alpha),
}


class Dynamics(nn.Module):
    """``dz/ds = T f(z, sT, c)`` for ``s`` in ``[0, 1]``: an MLP on ``z``, Fourier features of
    the time ``t = sT`` (``cos(kπt), sin(kπt)``, ``k = 1..freqs``) and the context ``c``.

    The context enters in one of two ways. With ``rank=0`` it is an input of the first layer
    (its share, ``W_c c``, computed once per solve). With ``rank=k > 0`` every linear layer
    ``W h + b`` also adds ``(U(c) V(c))ᵀ h / √in + b(c)``, ``U(c)`` of shape ``(in, k)`` and
    ``V(c)`` of ``(k, out)``: a weight update of rank ``k`` and a bias per sample, all read
    from the context by one linear map, FFJORD's amortized low-rank dynamics for VAEs.
    ``V(c)`` and ``b(c)`` start at zero, so an untrained flow is the shared network.

    Integrating over ``s`` with the end time ``T`` as a factor makes ``T`` an ordinary
    (optionally learnable) parameter of the dynamics, for direct and adjoint gradients alike.

    >>> f = Dynamics(2, 3, (8,), "tanh", freqs=1, time=1.0, learn_time=False, rank=2)
    >>> term = f.context_term(torch.randn(5, 3))
    >>> f.velocity(torch.tensor(0.5), torch.randn(5, 2), term).shape
    torch.Size([5, 2])
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        hidden_dims: Sequence[int],
        activation: str,
        freqs: int,
        time: float,
        learn_time: bool,
        rank: int = 0,
    ) -> None:
        super().__init__()
        act = ACTIVATIONS[_checks.one_of("activation", activation, ACTIVATIONS)]
        hidden = _checks.int_sequence("hidden_dims", hidden_dims)
        self.rank = _checks.nonnegative_int("rank", rank)
        if rank and not context_dim:
            raise ValueError(
                f"rank: low-rank amortized dynamics read their weights from a context; got "
                f"rank={rank} with context_dim=0 (set context_dim, or rank=0)"
            )
        self.split = dim + 2 * freqs  # first-layer inputs before the context's
        self.net = mlp(self.split + (0 if rank else context_dim), hidden, dim, activation=act)
        self.register_buffer("freqs", torch.arange(1, freqs + 1) * math.pi, persistent=False)
        log_time = torch.tensor(math.log(_checks.positive_number("time", time)))
        if learn_time:
            self.log_time = nn.Parameter(log_time)
        else:
            self.register_buffer("log_time", log_time)
        if rank:
            widths = (dim, *hidden, dim)
            self.layer_shapes = list(itertools.pairwise(widths))
            self.sizes = [rank * (i + o) + o for i, o in self.layer_shapes]
            self.amortized = nn.Linear(context_dim, sum(self.sizes))
            with torch.no_grad():  # V(c) and b(c) of every layer start at zero
                for params in (self.amortized.bias, self.amortized.weight.T):
                    for chunk, (i, _) in zip(self._chunks(params), self.layer_shapes, strict=True):
                        chunk[..., rank * i :] = 0.0

    def _chunks(self, params: Tensor) -> tuple[Tensor, ...]:
        return params.split(self.sizes, dim=-1)

    def context_term(self, context: Tensor | None) -> Context:
        """What the context contributes, computed once per solve: ``W_c c`` (``rank=0``) or
        each layer's ``(U(c) / √in, V(c), b(c))``."""
        if context is None:
            return None
        if not self.rank:
            return F.linear(context, self.net[0].weight[:, self.split :])
        k, terms = self.rank, []
        for params, (i, o) in zip(
            self._chunks(self.amortized(context)), self.layer_shapes, strict=True
        ):
            u, v, b = params.split([k * i, k * o, o], dim=-1)
            terms.append((u.unflatten(-1, (i, k)) / math.sqrt(i), v.unflatten(-1, (k, o)), b))
        return terms

    def velocity(
        self, s: Tensor, z: Tensor, context_term: Context, slopes: list[Tensor] | None = None
    ) -> Tensor:
        """``T f(z, sT, c)``; the first layer is applied by parts, ``W [z; φ(t); c] + b =
        W_z z + (W_φ φ(t) + b) + W_c c``, so no per-sample concatenation is needed. Where
        ``slopes`` is a list, each activation's derivative at its input is appended to it."""
        end = self.log_time.exp()
        angles = self.freqs * (s * end)
        first, dim = self.net[0], z.shape[-1]
        features = torch.cat([angles.cos(), angles.sin()])
        bias = torch.addmv(first.bias, first.weight[:, dim : self.split], features)
        h = F.linear(z, first.weight[:, :dim], bias)
        layers = None
        if isinstance(context_term, list):  # per-sample low-rank weights and biases
            layers = iter(context_term)
            h = h + _low_rank(z, *next(layers))
        elif context_term is not None:
            h = h + context_term
        for module in itertools.islice(self.net, 1, None):
            out = module(h)
            if isinstance(module, nn.Linear):
                if layers is not None:
                    out = out + _low_rank(h, *next(layers))
            elif slopes is not None:
                slopes.append(SLOPES[type(module)](module, h, out))
            h = out
        return end * h

    @property
    def closed_form_trace(self) -> bool:
        """Whether :meth:`trace_weights` applies: at most two hidden layers."""
        return sum(isinstance(m, nn.Linear) for m in self.net) <= 3

    def trace_weights(self, context_term: Context) -> Tensor:
        """What makes the Jacobian's trace a cheap function of the activations' slopes,
        for a network of at most two hidden layers (:attr:`closed_form_trace`).

        With each layer's (per-sample) weights ``M_k`` acting as ``h ↦ h M_k``, the Jacobian
        ``∂f/∂z`` is ``(M₁ D₁ M₂ D₂ M₃)ᵀ`` for slopes ``D_k``, so its trace is
        ``Σ_ij D₁ᵢ Gᵢⱼ D₂ⱼ`` with ``G = M₂ ⊙ (M₃ M₁)ᵀ`` (two hidden layers), ``Σᵢ D₁ᵢ gᵢ`` with
        ``g = rowsum(M₂ ⊙ M₁ᵀ)`` (one), or ``trace(M₁)`` (none): computed once per solve,
        ``(…, h₁, h₂)``, ``(…, h₁)`` or ``(…)`` over the context's samples, instead of one
        vector-Jacobian product per dimension at every step."""
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        dim = linears[-1].out_features
        weights = [linears[0].weight[:, :dim].T, *(m.weight.T for m in linears[1:])]
        if isinstance(context_term, list):  # each sample's W + U V
            weights = [w + u @ v for w, (u, v, _) in zip(weights, context_term, strict=True)]
        if len(weights) == 1:
            return torch.diagonal(weights[0], dim1=-2, dim2=-1).sum(-1)
        if len(weights) == 2:
            return (weights[1] * weights[0].mT).sum(-1)
        return weights[1] * (weights[2] @ weights[0]).mT

    def jacobian_trace(
        self, slopes: list[Tensor], trace_weights: Tensor, shape: torch.Size
    ) -> Tensor:
        """The trace of ``∂(T f)/∂z``, of the given batch ``shape``, from the activations'
        ``slopes`` that :meth:`velocity` recorded and the solve's :meth:`trace_weights`."""
        if not slopes:
            trace = trace_weights.expand(shape)
        elif len(slopes) == 1:
            trace = (slopes[0] * trace_weights).sum(-1)
        else:
            trace = (_per_sample(slopes[0], trace_weights) * slopes[1]).sum(-1)
        return self.log_time.exp() * trace


def _low_rank(h: Tensor, u: Tensor, v: Tensor, b: Tensor) -> Tensor:
    """``h U V + b`` for each sample's own ``U`` (in, k), ``V`` (k, out) and ``b``."""
    return _per_sample(h, u, v) + b


def _per_sample(h: Tensor, *matrices: Tensor) -> Tensor:
    """``h M₁ M₂ …`` for each sample's own matrices (or shared ones, of rank 2). Leading
    dims of ``h`` beyond the samples' (particles) become rows of one product per sample, so
    that no matrix is copied for them."""
    batch = matrices[0].shape[:-2]
    extra = h.dim() - 1 - len(batch)
    if extra < 0 or h.shape[extra:-1] != batch:  # broadcast in the other direction
        out = h.unsqueeze(-2)
        for m in matrices:
            out = torch.matmul(out, m)
        return out.squeeze(-2)
    lead, rows = tuple(range(extra)), tuple(range(len(batch), len(batch) + extra))
    out = h.movedim(lead, rows).reshape(*batch, -1, h.shape[-1])  # (*batch, rows, in)
    for m in matrices:
        out = torch.matmul(out, m)
    return out.reshape(*batch, *h.shape[:extra], -1).movedim(rows, lead)


class AugmentedDynamics:
    """The right-hand side the solver integrates in one solve: the velocity, its Jacobian's
    trace (exact: in closed form where :attr:`Dynamics.closed_form_trace`, otherwise from all
    rows at once; or Hutchinson's ``vᵀ (∂f/∂z) v`` with the solve's fixed probe), and with
    ``regularize`` the kinetic energy and the squared Frobenius norm (from the rows, or the
    probe's); the context's term and the trace's weights once per solve where
    ``precompute``, and a count of the calls.

    >>> f = Dynamics(2, 0, (8,), "tanh", freqs=1, time=1.0, learn_time=False, rank=0)
    >>> rhs = AugmentedDynamics(f, None, True, "exact", None, regularize=False, scale=1.0)
    >>> velocity, trace = rhs(torch.tensor(0.0), (torch.randn(5, 2), torch.zeros(5)))
    >>> velocity.shape, trace.shape, rhs.calls
    (torch.Size([5, 2]), torch.Size([5]), 1)
    """

    def __init__(
        self,
        dynamics: Dynamics,
        context: Tensor | None,
        precompute: bool,
        trace: str,
        probe: Tensor | None,
        regularize: bool,
        scale: float,
    ) -> None:
        self.dynamics, self.context = dynamics, context
        # the context's term once per solve; the adjoint needs it inside the function, since
        # its gradients are taken of the function alone (the checkpointed steps take them of
        # stand-ins, see ``stand_ins``)
        self.context_term = dynamics.context_term(context) if precompute else None
        # the exact trace in closed form where the network allows
        self.closed_form = trace == "exact" and dynamics.closed_form_trace
        self.trace_weights = None
        if self.closed_form and precompute:
            self.trace_weights = dynamics.trace_weights(self.context_term)
        self.trace, self.probe = trace, probe
        self.regularize, self.scale = regularize, scale
        self.calls = 0
        self.calls_in_solve = 0

    def __call__(self, s: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        self.calls += 1
        z, term = state[0], self.context_term
        if term is None and self.context is not None:
            term = self.dynamics.context_term(self.context)
        slopes = [] if self.closed_form else None
        if self.closed_form and not self.regularize:  # no derivatives to take
            dz = self.dynamics.velocity(s, z, term, slopes)
            return self._scaled((dz, self._closed_form_trace(term, slopes, dz)))
        create_graph = torch.is_grad_enabled()  # off in an adjoint's forward solve and at eval
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            dz = self.dynamics.velocity(s, z, term, slopes)
            if self.trace == "exact":  # all D rows of ∂f/∂z in one batched (vmapped) VJP
                dim = z.shape[-1]
                basis = torch.eye(dim, dtype=z.dtype, device=z.device)
                basis = basis.reshape(dim, *[1] * (z.dim() - 1), dim).expand(dim, *z.shape)
                rows = self._grad(dz, z, create_graph, basis, batched=True)
                if self.closed_form:  # regularized: the trace of the solve without the terms
                    trace = self._closed_form_trace(term, slopes, dz)
                else:
                    trace = torch.einsum("i...i->...", rows)
                frobenius = rows.square().sum((0, -1)) if self.regularize else None
            else:
                vjp = self._grad(dz, z, create_graph, self.probe)
                trace = (vjp * self.probe).sum(-1)
                frobenius = vjp.square().sum(-1) if self.regularize else None
        out = (dz, trace)
        if self.regularize:
            out += (dz.square().sum(-1), frobenius)
        return self._scaled(out)

    def stand_ins(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Put detached copies that require gradients in place of what was computed once per
        solve (the context's term, the trace's weights) and return ``(originals, copies)``:
        gradients taken of the function with respect to the copies are the originals' to
        back-propagate, so the per-solve work is not redone at every evaluation."""
        originals: list[Tensor] = []
        copies: list[Tensor] = []

        def swap(t: Tensor | None) -> Tensor | None:
            if t is None or not t.requires_grad:
                return t
            originals.append(t)
            copies.append(t.detach().requires_grad_())
            return copies[-1]

        term = self.context_term
        if isinstance(term, list):
            self.context_term = [tuple(swap(t) for t in layer) for layer in term]
        else:
            self.context_term = swap(term)
        self.trace_weights = swap(self.trace_weights)
        return tuple(originals), tuple(copies)

    def _closed_form_trace(self, term: Context, slopes: list[Tensor], dz: Tensor) -> Tensor:
        weights = self.trace_weights
        if weights is None:  # computed inside the function where its gradients are taken
            weights = self.dynamics.trace_weights(term)
        return self.dynamics.jacobian_trace(slopes, weights, dz.shape[:-1])

    def _scaled(self, out: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        if self.scale == 1.0:
            return out
        return (out[0], *(self.scale * a for a in out[1:]))

    @staticmethod
    def _grad(
        out: Tensor, z: Tensor, create_graph: bool, weight: Tensor, batched: bool = False
    ) -> Tensor:
        (g,) = torch.autograd.grad(
            out,
            z,
            weight,
            create_graph=create_graph,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=batched,
        )
        return torch.zeros_like(weight) if g is None else g
