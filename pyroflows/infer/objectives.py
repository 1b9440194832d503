"""Objectives as Pyro ELBO classes: IWAE (standard or DReG gradients) and the ELBO with STL."""

from __future__ import annotations

import math
from typing import Any

import torch
from pyro.infer import ELBO as PyroELBO
from pyro.infer.util import torch_item
from pyro.util import warn_if_nan

from .. import _checks
from .._random import seeded
from . import weights as w
from .kl import kl_terms, kl_with_free_bits
from .stopped import ModelGradientScale, stopped_guide_log_probs


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

    def _ensure_nesting(self, model, guide, args, kwargs) -> None:
        if self._nesting is None:  # runs guide and model once: before any seeded sampling
            self._nesting = w.plate_nesting(model, guide, args, kwargs)

    def _weights(
        self, model, guide, args, kwargs, stopped: bool, num_particles: int | None = None
    ) -> w.LogWeights:
        self._ensure_nesting(model, guide, args, kwargs)
        nesting, k = self._nesting, num_particles or self.num_particles
        # DReG replays the model on gradient-scaled latents (see ModelGradientScale)
        scale = ModelGradientScale() if stopped and self.estimator == "dreg" else None
        model_trace, guide_trace = w.traces(model, guide, args, kwargs, k, nesting, scale)
        w.check_reparameterized(guide_trace)
        stopped_lp = None
        if stopped:
            stopped_lp = stopped_guide_log_probs(guide, guide_trace, args, kwargs, k, nesting)
        return w.log_weights(model_trace, guide_trace, nesting, stopped_lp, scale)

    def _finish(self, objective: torch.Tensor, surrogate: torch.Tensor | None) -> float:
        if surrogate is not None:
            (-surrogate).backward()
        loss = -torch_item(objective)
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model, guide, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The loss as a tensor whose gradient is this estimator's: train with any torch
        optimizer over ``model`` and ``guide`` parameters (one optimizer for all of them)::

            loss = objective.differentiable_loss(model, guide, x)
            optimizer.zero_grad(); loss.backward(); optimizer.step()

        Its value equals :meth:`loss` on the same samples and its gradient equals the one
        :meth:`loss_and_grads` accumulates.
        """
        objective, surrogate = self._objective_and_surrogate(model, guide, args, kwargs)
        return -(objective.detach() + surrogate - surrogate.detach())

    def _objective_and_surrogate(self, model, guide, args, kwargs):
        raise NotImplementedError


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
    model keeps the standard ``Σ_k w̃ₖ ∇θ log p(x, zₖ)``, from the same model pass: the
    latents' gradient from the model is scaled by ``w̃ₖ`` on its way back. Its one extra
    cost is the guide's density at its own samples with stopped parameters.

    ``chunk_size`` bounds memory for large ``K``: the particles are drawn ``chunk_size`` at a
    time, first without gradients to get the self-normalized weights over all ``K``, then
    again from the same random seeds, chunk by chunk, each back-propagated on its own. The
    gradient is exactly that of the unchunked bound on the same samples, at the cost of a
    second forward pass. (:meth:`differentiable_loss` returns one graph and so draws all
    ``K`` particles at once.)

    >>> import pyro, pyro.distributions as dist
    >>> from pyroflows import AutoFlow
    >>> def model():
    ...     pyro.sample("z", dist.Normal(0.0, 1.0))
    >>> guide = AutoFlow(model, flow="planar")
    >>> loss = IWAE(num_particles=8, estimator="dreg").loss_and_grads(model, guide)
    >>> all(p.grad is not None for p in guide.parameters())
    True
    """

    estimators = ("standard", "dreg")

    def __init__(
        self,
        num_particles: int = 1,
        estimator: str = "standard",
        max_plate_nesting: int | None = None,
        *,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(num_particles, estimator, max_plate_nesting)
        self.chunk_size = (
            None if chunk_size is None else _checks.positive_int("chunk_size", chunk_size)
        )

    def _chunks(self) -> list[int]:
        k, c = self.num_particles, self.chunk_size or self.num_particles
        return [min(c, k - start) for start in range(0, k, c)]

    def _surrogate(self, lw: w.LogWeights, normalized: torch.Tensor) -> torch.Tensor:
        """Σ w̃ ∇ log w (standard), or DReG's Σ w̃² ∇_z log w_stop + Σ (w̃ - w̃²) ∇θ log p,
        for particles whose self-normalized weights over all K are ``normalized``."""
        if self.estimator == "standard":
            return (normalized * lw.values).sum() * lw.scale
        # the latents' gradient from the model is scaled by w̃ on its way back (see
        # ModelGradientScale): log p gets w̃ in all, w̃ to θ and w̃² to z
        lw.gradient_scale.weights = normalized.reshape(lw.shape)
        guide_part = (normalized.square() * lw.values).sum()
        model_part = ((normalized - normalized.square()) * lw.log_p).sum()
        return (guide_part + model_part) * lw.scale

    def loss(self, model, guide, *args: Any, **kwargs: Any) -> float:
        seeds = self._seeds(model, guide, args, kwargs)
        with torch.no_grad():
            values, scale = self._all_values(model, guide, args, kwargs, seeds)
        return self._finish(_bound(values, scale), None)

    def _objective_and_surrogate(self, model, guide, args, kwargs):
        lw = self._weights(model, guide, args, kwargs, self.estimator != "standard")
        normalized = torch.softmax(lw.values.detach(), 0)
        surrogate = self._surrogate(lw, normalized)
        return _bound(lw.values.detach(), lw.scale), surrogate

    def loss_and_grads(self, model, guide, *args: Any, **kwargs: Any) -> float:
        stopped = self.estimator != "standard"
        if len(self._chunks()) == 1:
            return self._finish(*self._objective_and_surrogate(model, guide, args, kwargs))
        # chunked: the normalized weights over all K first, then each chunk's gradient from
        # the same samples (same seeds), so memory is bounded by one chunk
        seeds = self._seeds(model, guide, args, kwargs)
        with torch.no_grad():
            values, scale = self._all_values(model, guide, args, kwargs, seeds)
        normalized = torch.softmax(values, 0).split(self._chunks())
        for seed, k, weights in zip(seeds, self._chunks(), normalized, strict=True):
            with seeded(seed):
                lw = self._weights(model, guide, args, kwargs, stopped, k)
            (-self._surrogate(lw, weights)).backward()
        return self._finish(_bound(values, scale), None)

    def _seeds(self, model, guide, args, kwargs) -> list[int | None]:
        self._ensure_nesting(model, guide, args, kwargs)
        if len(self._chunks()) == 1:
            return [None]
        return torch.randint(2**62, (len(self._chunks()),)).tolist()

    def _all_values(self, model, guide, args, kwargs, seeds) -> tuple[torch.Tensor, float]:
        parts = []
        for seed, k in zip(seeds, self._chunks(), strict=True):
            with seeded(seed):
                parts.append(self._weights(model, guide, args, kwargs, False, k))
        return torch.cat([lw.values for lw in parts]), parts[0].scale


def _bound(values: torch.Tensor, scale: float) -> torch.Tensor:
    return (torch.logsumexp(values, 0) - math.log(values.shape[0])).sum() * scale


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
        self.free_bits = _checks.nonnegative_number("free_bits", free_bits)

    @property
    def kl_weight(self) -> float:
        return self._kl_weight

    @kl_weight.setter
    def kl_weight(self, value: float) -> None:
        self._kl_weight = _checks.nonnegative_number("kl_weight", value)

    def _objective(self, lw: w.LogWeights) -> torch.Tensor:
        if self.kl_weight == 1.0 and not self.free_bits:
            return lw.values.mean(0).sum() * lw.scale
        likelihood, kls = kl_terms(lw)
        total = likelihood.mean(0).sum()
        for kl in kls.values():
            kl = kl.mean(0)  # per datum (or the whole data set's, for global latents)
            total = total - self.kl_weight * kl_with_free_bits(kl, self.free_bits)
        return total * lw.scale

    def loss(self, model, guide, *args: Any, **kwargs: Any) -> float:
        with torch.no_grad():
            return self._finish(
                self._objective(self._weights(model, guide, args, kwargs, False)), None
            )

    def _objective_and_surrogate(self, model, guide, args, kwargs):
        lw = self._weights(model, guide, args, kwargs, stopped=self.estimator == "stl")
        surrogate = self._objective(lw)  # with STL, log q has stopped parameters
        return surrogate.detach(), surrogate

    def loss_and_grads(self, model, guide, *args: Any, **kwargs: Any) -> float:
        return self._finish(*self._objective_and_surrogate(model, guide, args, kwargs))
