"""Objectives as Pyro ELBO classes: IWAE (standard or DReG gradients) and the ELBO with STL."""

from __future__ import annotations

import math
from typing import Any

import torch
from pyro.infer import ELBO as PyroELBO
from pyro.infer.util import torch_item
from pyro.util import warn_if_nan

from .. import _checks
from . import weights as w


class _Weighted(PyroELBO):
    """Shared by the objectives: vectorized particles, guessed plate nesting, checks."""

    estimators: tuple[str, ...] = ()

    def __init__(
        self,
        num_particles: int = 1,
        estimator: str = "standard",
        max_plate_nesting: int | None = None,
    ) -> None:
        _checks.positive_int("num_particles", num_particles)
        self.estimator = _checks.one_of("estimator", estimator, self.estimators)
        super().__init__(num_particles=num_particles, vectorize_particles=True)
        self._nesting = None  # the model's plates plus the particles'
        if max_plate_nesting is not None:
            self._nesting = _checks.nonnegative_int("max_plate_nesting", max_plate_nesting) + 1

    def _get_trace(self, model, guide, args, kwargs):  # required by pyro's ELBO, unused
        raise NotImplementedError

    def _weights(self, model, guide, args, kwargs, stopped: bool) -> w.LogWeights:
        if self._nesting is None:
            self._nesting = w.plate_nesting(model, guide, args, kwargs)
        nesting = self._nesting
        model_trace, guide_trace = w.traces(model, guide, args, kwargs, self.num_particles, nesting)
        w.check_reparameterized(guide_trace)
        stopped_lp = None
        if stopped:
            stopped_lp = w.stopped_guide_log_probs(
                guide, guide_trace, args, kwargs, self.num_particles, nesting
            )
        return w.log_weights(model_trace, guide_trace, nesting, stopped_lp)

    def loss(self, model, guide, *args: Any, **kwargs: Any) -> float:
        with torch.no_grad():
            loss = -torch_item(self._objective(self._weights(model, guide, args, kwargs, False)))
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model, guide, *args: Any, **kwargs: Any) -> float:
        stopped = self.estimator != "standard"
        lw = self._weights(model, guide, args, kwargs, stopped)
        objective, surrogate = self._objective_and_surrogate(lw, model, args, kwargs)
        (-surrogate).backward()
        loss = -torch_item(objective)
        warn_if_nan(loss, "loss")
        return loss


class IWAE(_Weighted):
    r"""The importance-weighted bound of Burda et al. (2016) with ``K = num_particles``:
    ``log (1/K) Σ_k p(x, z_k) / q(z_k)``.

    For local latents (every sample site inside the data plate, as in a VAE) the bound is
    computed per datapoint and summed, ``Σₙ log (1/K) Σ_k wₙₖ``; with subsampling that sum is
    multiplied by ``N / batch``, an unbiased estimate of the full-data bound (Pyro's
    ``RenyiELBO(alpha=0)`` puts the subsampling scale inside the logsumexp instead, which
    estimates no bound; without subsampling the two agree). Models with global latents get
    the usual bound. Particles are vectorized.

    ``estimator="dreg"`` gives the doubly reparameterized gradients of Tucker et al. (2019)
    for the guide: ``Σ_k w̃ₖ² ∂ log wₖ/∂z ∂z/∂φ`` with the guide's density evaluated with its
    parameters stopped (lower variance, no signal-to-noise collapse as ``K`` grows); the
    model keeps the standard ``Σ_k w̃ₖ ∇θ log p(x, zₖ)``. It costs one more guide pass (the
    flow's inverse at the samples) and one more model pass.

    >>> import pyro, pyro.distributions as dist
    >>> from pyroflows import AutoFlow
    >>> def model():
    ...     pyro.sample("z", dist.Normal(0.0, 1.0))
    >>> guide = AutoFlow(model, flow="planar")
    >>> IWAE(num_particles=8, estimator="dreg").loss_and_grads(model, guide) > -1e-6
    True
    """

    estimators = ("standard", "dreg")

    def _objective(self, lw: w.LogWeights) -> torch.Tensor:
        return lw.bound()

    def _objective_and_surrogate(self, lw, model, args, kwargs):
        if self.estimator == "standard":
            bound = lw.bound()
            return bound.detach(), bound
        values = lw.values
        normalized = torch.softmax(values.detach(), 0)  # w̃ per datum (or overall)
        guide_part = (normalized.square() * values).sum() * lw.scale
        # the model's gradient: Σ (w̃ - w̃²) ∇θ log p(x, stop(z)), added to the w̃² above
        model_lp = w.model_log_density_at_stopped_latents(model, lw, args, kwargs)
        model_part = ((normalized - normalized.square()) * model_lp).sum() * lw.scale
        bound = (torch.logsumexp(values.detach(), 0) - math.log(values.shape[0])).sum() * lw.scale
        return bound, guide_part + model_part


class ELBO(_Weighted):
    r"""The evidence lower bound ``E_q[log p(x, z) - log q(z)]`` over vectorized particles.

    ``estimator="stl"`` is "sticking the landing" (Roeder et al., 2017): the gradient drops
    the score term by evaluating ``log q`` with the guide's parameters stopped, so its
    variance vanishes as ``q`` reaches the exact posterior.

    For VAEs: ``kl_weight`` (β, KL warm-up) scales the KL part
    ``E_q[log q(z) - log p(z)]`` of each latent site, so the objective is
    ``E[log p(x | z)] - β KL``; set ``elbo.kl_weight`` each step for a schedule, e.g.
    ``min(1, step / warmup)``. ``free_bits`` (λ nats, Kingma et al., 2016) replaces each latent
    site's KL, averaged over the data in the batch, by ``max(λ, KL)``: no gradient pushes a
    site below λ nats per datum. With a flow posterior the KL does not split over
    dimensions, so a group is a latent site. Both need each guide latent site to have a model
    site of the same name; the loss then reports this objective, not the ELBO.

    >>> import pyro, pyro.distributions as dist
    >>> from pyroflows import AutoFlow
    >>> def model():
    ...     pyro.sample("z", dist.Normal(0.0, 1.0))
    >>> ELBO(num_particles=4, estimator="stl").loss(model, AutoFlow(model, flow="radial")) > -1
    True
    """

    estimators = ("standard", "stl")

    def __init__(
        self,
        num_particles: int = 1,
        estimator: str = "standard",
        max_plate_nesting: int | None = None,
        *,
        kl_weight: float = 1.0,
        free_bits: float = 0.0,
    ) -> None:
        super().__init__(num_particles, estimator, max_plate_nesting)
        self.kl_weight = kl_weight
        self.free_bits = _nonnegative("free_bits", free_bits)

    @property
    def kl_weight(self) -> float:
        return self._kl_weight

    @kl_weight.setter
    def kl_weight(self, value: float) -> None:
        self._kl_weight = _nonnegative("kl_weight", value)

    def _objective(self, lw: w.LogWeights) -> torch.Tensor:
        if self.kl_weight == 1.0 and not self.free_bits:
            return lw.values.mean(0).sum() * lw.scale
        likelihood, kls = w.kl_terms(lw)
        total = likelihood.mean(0).sum()
        for kl in kls.values():
            kl = kl.mean(0)  # per datum (or the whole data set's, for global latents)
            if self.free_bits:
                kl = torch.clamp(kl.mean(), min=self.free_bits) * kl.numel()
            total = total - self.kl_weight * kl.sum()
        return total * lw.scale

    def _objective_and_surrogate(self, lw, model, args, kwargs):
        surrogate = self._objective(lw)  # with STL, log q has stopped parameters
        return surrogate.detach(), surrogate


def _nonnegative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return float(value)
