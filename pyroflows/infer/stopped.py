"""Gradients with stopped guide parameters: the guide's densities at its own samples with
every parameter stopped (STL, DReG), and the scaling by which DReG's model term comes from
the one model pass."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor, nn

from ..transforms._bijection import cache_disabled
from .weights import _latent_sites, _particles


class ModelGradientScale:
    """Views of latent values that multiply the gradient reaching them by per-particle
    ``weights`` (shaped as :attr:`.weights.LogWeights.shape`, set before the backward pass,
    which reads them): one model pass gives DReG's ``w̃²`` weights on the path to the latents
    on top of the ``w̃`` the parameters get.

    >>> scale, z = ModelGradientScale(), torch.ones(2, 3, requires_grad=True)
    >>> view = scale.view(z)
    >>> scale.weights = torch.tensor([[2.0], [3.0]])  # one per particle (rows)
    >>> view.sum().backward()
    >>> z.grad[:, 0]
    tensor([2., 3.])
    """

    def __init__(self) -> None:
        self.weights: Tensor | None = None

    def view(self, value: Tensor) -> Tensor:
        value = value.view_as(value)
        if value.requires_grad:
            value.register_hook(self._scale)
        return value

    def _scale(self, grad: Tensor) -> Tensor:
        assert self.weights is not None, "set the weights before the backward pass"
        weights = self.weights
        return grad * weights.reshape(weights.shape + (1,) * (grad.dim() - weights.dim()))


class _DetachParams(Messenger):
    def _pyro_post_param(self, msg: dict) -> None:
        msg["value"] = msg["value"].detach()


class _LogProbsNow(Messenger):
    """Records each latent site's log density as the site is sampled.

    Computed inside the guide's run, while its parameters are stopped: a flow reads its
    parameters when its density is evaluated, so a density taken after the run (when
    ``functional_call`` has put the live parameters back) would not be stopped.
    """

    def __init__(self) -> None:
        super().__init__()
        self.log_probs: dict[str, Tensor] = {}

    def _pyro_post_sample(self, msg: dict) -> None:
        if msg["is_observed"] or isinstance(msg["fn"], _Subsample):
            return
        log_prob = msg["fn"].log_prob(msg["value"])
        self.log_probs[msg["name"]] = scale_and_mask(log_prob, 1.0, msg["mask"])


def stopped_guide_log_probs(guide, guide_trace, args, kwargs, num_particles: int, nesting: int):
    """The guide's log densities at its own samples with every parameter stopped.

    The guide is re-run with its parameters detached (Pyro params through a handler,
    ``nn.Module`` parameters through :func:`torch.func.functional_call`) and the sample values
    replayed, and each density is taken during that run, so the result keeps the gradient
    through the samples (the path derivative) and drops the score term of every parameter,
    a flow's included. Flows compute their inverse at the replayed values. A guide with a
    ``stopped_log_probs(guide_trace)`` method (:class:`~pyroflows.AutoFlow`,
    :class:`~pyroflows.AmortizedFlowGuide`) computes them itself, without the re-run, unless
    it returns ``None``.

    >>> import pyro, pyro.distributions as dist
    >>> from pyroflows.infer.weights import traces
    >>> loc = pyro.param("loc", torch.tensor(0.5))
    >>> def guide():
    ...     pyro.sample("z", dist.Normal(pyro.param("loc"), 1.0))
    >>> _, guide_trace = traces(guide, guide, (), {}, 3, 1)
    >>> log_q = stopped_guide_log_probs(guide, guide_trace, (), {}, 3, 1)["z"]
    >>> z, log_q_traced = guide_trace.nodes["z"]["value"], guide_trace.nodes["z"]["log_prob"]
    >>> torch.allclose(log_q, log_q_traced)  # the same values
    True
    >>> (gradient,) = torch.autograd.grad(log_q.sum(), loc)
    >>> torch.allclose(gradient, -(z - loc).sum())  # the path term alone, no score term
    True
    """
    own = getattr(guide, "stopped_log_probs", None)
    if callable(own) and (log_probs := own(guide_trace)) is not None:
        return log_probs
    run = guide
    if isinstance(guide, nn.Module):
        detached = {k: v.detach() for k, v in guide.named_parameters()}

        def run(*a: Any, **k: Any) -> Any:
            return torch.func.functional_call(guide, detached, a, k)

    record = _LogProbsNow()
    with cache_disabled(), _DetachParams(), record, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "(?s).*not registered in the param store")
        poutine.replay(_particles(run, num_particles, -nesting), trace=guide_trace)(*args, **kwargs)
    if is_validation_enabled():
        assert set(record.log_probs) == {s["name"] for s in _latent_sites(guide_trace)}
    return record.log_probs
