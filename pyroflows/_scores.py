"""A guide's log density with its parameters stopped, from the score of its distribution.

For STL and DReG the guide's density is needed at its own sample ``z`` with every parameter
stopped; its value is the traced ``log q(z)`` and its derivative in ``z`` is the score
``∇ log q(z)``. Where the distribution is a base distribution pushed through layers that
pull scores back (``Flow._score_pullback``), the score comes from one pass through the layers
at their cached inputs, without an inverse or a graph (Vaitl et al., 2024), and
``stop(log q(z)) + ∇ log q(z) · (z - stop(z))`` has the value and the first derivatives of
the stopped density.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributions import AffineTransform, Distribution, Independent, Normal
from torch.distributions import TransformedDistribution as TorchTransformed
from torch.distributions.transforms import ComposeTransform

from .transforms._bijection import _CachedBijection


def stopped_log_prob(
    fn: Distribution, value: Tensor, log_prob: Tensor | None = None
) -> Tensor | None:
    """``log fn(value)`` with ``fn``'s parameters stopped, as described above, for a
    distribution over vectors whose layers all pull scores back; ``None`` otherwise.
    ``log_prob`` is the unscaled ``log fn(value)`` where already computed.

    >>> import pyro.distributions as dist
    >>> import pyroflows as pf
    >>> flow = pf.build("iaf", 2, 1)
    >>> q = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), list(flow))
    >>> z = q.rsample((3,))
    >>> torch.allclose(stopped_log_prob(q, z), q.log_prob(z))
    True
    """
    base, layers = (fn.base_dist, fn.transforms) if isinstance(fn, TorchTransformed) else (fn, [])
    layers = [part for layer in layers for part in _parts(layer)]
    if len(fn.event_shape) != 1 or not all(map(_pulls_back, layers)):
        return None
    with torch.no_grad():
        y, inputs = value, []
        for layer in reversed(layers):
            x, params = _input(layer, y)
            inputs.append((layer, x, params))
            y = x
        score = _base_score(base, y)
        for layer, x, params in reversed(inputs):
            score = _pullback(layer, x, params, score)
    if log_prob is None:
        log_prob = fn.log_prob(value)
    return log_prob.detach() + (score * (value - value.detach())).sum(-1)


def _parts(layer: Any) -> list[Any]:
    if isinstance(layer, ComposeTransform):
        return [part for inner in layer.parts for part in _parts(inner)]
    return [layer]


def _pulls_back(layer: Any) -> bool:
    if isinstance(layer, AffineTransform):
        return layer.event_dim <= 1
    return isinstance(layer, _CachedBijection) and layer._flow._pulls_back_scores


def _input(layer: Any, y: Tensor) -> tuple[Tensor, Any]:
    """The layer's input for output ``y``: the cached one where the layer's last output
    was ``y``, else solved; and the layer's parameters."""
    if isinstance(layer, AffineTransform):
        return (y - layer.loc) / layer.scale, None
    flow = layer._flow
    params = flow._resolve_params(layer._context)
    x = layer._warm_start(y) if flow._warm_starts else None
    return (flow._solve_backward(y, params)[0] if x is None else x), params


def _pullback(layer: Any, x: Tensor, params: Any, score: Tensor) -> Tensor:
    if isinstance(layer, AffineTransform):
        return score / layer.scale
    return layer._flow._score_pullback(x, params, score)


def _base_score(base: Distribution, x: Tensor) -> Tensor:
    inner = base.base_dist if isinstance(base, Independent) else base
    if isinstance(inner, Normal):
        return (inner.loc - x) / inner.scale.square()
    with torch.enable_grad():
        leaf = x.detach().requires_grad_()
        return torch.autograd.grad(base.log_prob(leaf).sum(), leaf)[0]
