"""Networks shared by the flow families.

Dense conditioners come from Pyro (:class:`pyro.nn.DenseNN` and its conditional version),
and :class:`MADE` builds its masks with Pyro's :func:`~pyro.nn.auto_reg_nn.create_mask`.
This module adds a plain MLP with optional hidden layers, a MADE whose forward pass has
less Python overhead than Pyro's, and :class:`ParameterMap`, the one mechanism by which a
family's parameters are either free ``nn.Parameter`` s or predicted from a context.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pyro.nn.auto_reg_nn import MaskedLinear, create_mask
from torch import Tensor, nn

from . import _checks
from ._made_jacobian import MADEJacobian, Structure


def mlp(
    in_dim: int,
    hidden_dims: Sequence[int],
    out_dim: int,
    *,
    bias: bool = True,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """A multi-layer perceptron; ``hidden_dims=()`` gives a single linear map.

    >>> mlp(4, (8,), 3)(torch.zeros(2, 4)).shape
    torch.Size([2, 3])
    """
    dims = (in_dim, *hidden_dims)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), activation()]
    layers.append(nn.Linear(dims[-1], out_dim, bias=bias))
    return nn.Sequential(*layers)


class MADE(nn.Module):
    """Masked autoregressive network (Germain et al., 2015), optionally conditional.

    Maps ``x`` of shape ``(..., dim)`` to ``outputs`` tensors of that shape; output ``i`` of
    each depends only on the inputs before ``i`` in the order ``permutation``, and on the
    whole context when ``context_dim > 0`` (Paige and Wood, 2016); context and input batch
    shapes broadcast, and the context's share of the first layer is computed once per
    context rather than once per sample. The masks and the initialisation are Pyro's; the
    weights and biases are views of one flat parameter (``params``, see
    :class:`ParameterMap`: Pyro's optimizers keep an optimizer per tensor), applied directly.

    >>> net = MADE(3, (8,), outputs=2)
    >>> m, s = net(torch.randn(5, 3))
    >>> torch.autograd.functional.jacobian(lambda x: net(x)[0], torch.randn(3)).triu().abs().sum()
    tensor(0.)
    """

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int],
        *,
        context_dim: int = 0,
        permutation: Tensor | None = None,
        outputs: int = 2,
    ) -> None:
        super().__init__()
        self.dim = _checks.positive_int("dim", dim)
        self.outputs = _checks.positive_int("outputs", outputs)
        hidden = list(_checks.int_sequence("hidden_dims", hidden_dims))
        if permutation is None:
            permutation = torch.arange(dim)
        masks, _ = create_mask(dim, context_dim, hidden, permutation, outputs)
        dims = (dim + context_dim, *hidden, outputs * dim)
        pairs = zip(itertools.pairwise(dims), masks, strict=True)
        layers = [MaskedLinear(a, b, mask) for (a, b), mask in pairs]  # Pyro's initialisation
        init = {}
        for i, layer in enumerate(layers):
            init[f"weight{i}"], init[f"bias{i}"] = layer.weight.detach(), layer.bias.detach()
            self.register_buffer(f"mask{i}", layer.mask.clone())
        self.params = ParameterMap(init)  # one tensor for an optimizer to update
        self.depth = len(layers)
        self.register_buffer("permutation", permutation.clone(), persistent=False)
        self._structure = Structure(masks, context_dim, permutation, outputs)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, ...]:
        return self.bind(context)(x)

    def bind(self, context: Tensor | None = None, stacked: bool = False) -> Callable[[Tensor], Any]:
        """The network for one context, with the masks applied and the context's share of
        the first layer computed once: for callers that pass several inputs (a sequential
        inverse makes ``dim`` passes). With ``stacked`` it returns one view of shape
        ``(..., dim, outputs)`` rather than ``outputs`` tensors.

        ``run(x, jacobian=True)`` also returns the network's Jacobian in ``x`` at these inputs
        (:class:`pyroflows._made_jacobian.MADEJacobian`): products with it without a graph,
        from the masked weights and the ReLUs' gates, where autograd would take ``dim``
        vector-Jacobian products."""
        p = self.params.free()
        (weight, bias), *others = [
            (p[f"weight{i}"] * getattr(self, f"mask{i}"), p[f"bias{i}"]) for i in range(self.depth)
        ]
        if context is None:
            first_weight, first_bias = weight, bias
        else:  # the context's term once per context, not once per sample: W [c; x] + b
            k = context.shape[-1]
            first_weight, first_bias = weight[:, k:], F.linear(context, weight[:, :k], bias)
        shape = (self.outputs, self.dim)

        def run(x: Tensor, jacobian: bool = False) -> Any:
            if context is None:
                h = F.linear(x, first_weight, first_bias)
            else:
                h = F.linear(x, first_weight) + first_bias
            gates = []
            for weight, bias in others:
                if jacobian:
                    gates.append((h.detach() > 0).to(h.dtype))
                h = F.linear(torch.relu(h), weight, bias)
            h = h.unflatten(-1, shape)
            out = h.movedim(-2, -1) if stacked else h.unbind(-2)
            if not jacobian:
                return out
            weights = [first_weight.detach(), *(w.detach() for w, _ in others)]
            return out, MADEJacobian(self._structure, weights, gates, self.permutation)

        return run


def matvec(a: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a @ v (+ bias)`` for matrices ``(*batch, m, n)`` and vectors ``(..., *batch, n)``.

    >>> matvec(torch.eye(2), torch.ones(3, 2), torch.ones(2))
    tensor([[2., 2.],
            [2., 2.],
            [2., 2.]])
    """
    if a.dim() == 2 and (bias is None or bias.dim() == 1):
        return F.linear(v, a, bias)
    out = (a @ v.unsqueeze(-1)).squeeze(-1)
    return out if bias is None else out + bias


class ParameterMap(nn.Module):
    """Named parameter tensors, free or amortized, held as one flat ``nn.Parameter``.

    Without context (``context_dim=0``) the named tensors are views of this module's one
    parameter ``flat``: one tensor for an optimizer to update (Pyro's optimizers keep an
    optimizer per tensor, whose overhead counts in small models). With ``context_dim > 0`` a
    network adds a context-dependent offset, so a context of shape ``(*batch, context_dim)``
    gives each parameter the shape ``(*batch, *shape)``. The offset network's last layer starts
    small, so an amortized flow starts near its unconditional twin yet already depends on the
    context. :meth:`free` gives the context-free values as views, to set them in place.

    >>> pm = ParameterMap({"w": torch.zeros(3), "b": torch.zeros(())}, context_dim=5)
    >>> {k: tuple(v.shape) for k, v in pm(torch.ones(7, 5)).items()}
    {'w': (7, 3), 'b': (7,)}
    """

    def __init__(
        self,
        init: Mapping[str, Tensor],
        context_dim: int = 0,
        hidden_dims: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.context_dim = _checks.nonnegative_int("context_dim", context_dim)
        self.shapes = {k: tuple(v.shape) for k, v in init.items()}
        self.sizes = [math.prod(s) for s in self.shapes.values()]
        self.flat = nn.Parameter(torch.cat([v.detach().reshape(-1) for v in init.values()]))
        self.net = None
        if context_dim:
            hidden = _checks.int_sequence("hidden_dims", hidden_dims)
            self.net = mlp(context_dim, hidden, sum(self.sizes), bias=False)
            nn.init.normal_(self.net[-1].weight, std=0.01)

    def free(self) -> dict[str, Tensor]:
        """The context-free values, as views of ``flat``."""
        return self._unpack(self.flat)

    def forward(self, context: Tensor | None = None) -> dict[str, Tensor]:
        if self.net is None:
            return self.free()
        assert context is not None
        return self._unpack(self.flat + self.net(context))

    def _unpack(self, flat: Tensor) -> dict[str, Tensor]:
        batch = flat.shape[:-1]
        parts = flat.split(self.sizes, dim=-1)
        return {  # a vector's slice has its shape already: no reshape (this runs per call)
            name: part if len(shape) == 1 else part.reshape(batch + shape)
            for (name, shape), part in zip(self.shapes.items(), parts, strict=True)
        }
