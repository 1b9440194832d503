"""Importance-sampled log marginal likelihood, batched over samples in chunks."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from .. import _checks
from .._repeated import repeated_draws
from ..transforms.continuous import exact_traces
from . import weights as w

MIN_ESS = 10  # below this many effective samples an estimate gets a warning


class LogMarginal(NamedTuple):
    """Per-datum estimates (scalars for models with global latents).

    >>> r = LogMarginal(torch.tensor(-90.0), torch.tensor(0.02), torch.tensor(350.0),
    ...                 torch.tensor(-93.5))  # fmt: skip
    >>> (r.log_px - r.elbo).item()  # the gap: at least 0, up to the KL to the posterior
    3.5
    """

    log_px: Tensor  # log (1/S) Σ_s w_s
    stderr: Tensor  # delta-method standard error of log_px
    ess: Tensor  # importance effective sample size (Σ w)² / Σ w²
    elbo: Tensor  # (1/S) Σ_s log w_s, the ELBO estimated from the same samples


@torch.no_grad()
@repeated_draws()
def log_marginal_likelihood(
    model,
    guide,
    *args: Any,
    num_samples: int = 5000,
    chunk_size: int = 500,
    max_plate_nesting: int | None = None,
    **kwargs: Any,
) -> LogMarginal:
    """``log p(x) ≈ log (1/S) Σ_s p(x, z_s) / q(z_s)`` with ``z_s ~ q``, ``S = num_samples``.

    Samples are drawn ``chunk_size`` at a time as vectorized particles; running log-sums of
    ``w`` and ``w²`` keep memory bounded by the chunk, on whatever device the model and guide
    use. For a VAE (every site inside the data plate) the estimate, its standard error
    ``sqrt(S/ESS - 1)/sqrt(S)``, the importance ESS and the ELBO from the same samples (the
    mean log weight) are per datum; for models with global
    latents they are scalars for the whole data set. ``max_plate_nesting`` is guessed from
    one trace when not given. With ``num_samples=1`` the standard error is NaN, and an
    importance ESS below ``MIN_ESS`` (10) for any estimate gives a :class:`RuntimeWarning`.
    For ``vae.model`` and ``vae.guide`` of a :class:`pyroflows.vae.VAE` the weights come from
    ``vae.log_weights`` without Pyro's tracing: the same weights from the same draws.
    Continuous-time layers of ``model`` and ``guide`` (modules, or the objects of bound
    methods) use their exact trace here, whatever they train with: Hutchinson's estimate of
    ``log q`` would bias the weights.

    >>> import pyro, pyro.distributions as dist
    >>> from pyroflows import AutoFlow
    >>> def model():
    ...     pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    >>> from pyro.infer.autoguide import init_to_mean
    >>> guide = AutoFlow(model, "realnvp", init_loc_fn=init_to_mean, init_scale=1.0)  # q = p
    >>> r = log_marginal_likelihood(model, guide, num_samples=100)
    >>> abs(r.log_px.item()) < 1e-5, round(r.ess.item())  # no data: log p = 0, all weights 1
    (True, 100)
    """
    _checks.positive_int("num_samples", num_samples)
    _checks.positive_int("chunk_size", chunk_size)
    log_sum = log_sum_sq = None
    done, checked, total = 0, False, 0.0
    with exact_traces(model, guide):  # weights need the exact log q of a CNF
        direct = _direct_weights(model, guide, args, kwargs)
        if direct is not None:
            nesting = 0
        elif max_plate_nesting is None:  # the run that finds the nesting gives the first sample
            nesting, values = _first_sample(model, guide, args, kwargs)
            log_sum, log_sum_sq, total = values[0], 2 * values[0], values[0]
            done = 1
        else:
            nesting = _checks.nonnegative_int("max_plate_nesting", max_plate_nesting) + 1
        while done < num_samples:
            k = min(chunk_size, num_samples - done)
            if direct is not None:
                values = direct(k)
            else:  # Pyro's checks on the first chunk; later ones run the same code on fresh samples
                draw = _unchecked_traces if checked else w.traces
                traces = draw(model, guide, args, kwargs, k, nesting)
                checked = True
                values = w.log_weights(*traces, nesting).values
                del traces  # free this chunk's traces before the next chunk is drawn
            total = total + values.sum(0)
            chunk = (torch.logsumexp(values, 0), torch.logsumexp(2 * values, 0))
            if log_sum is None:
                log_sum, log_sum_sq = chunk
            else:
                log_sum = torch.logaddexp(log_sum, chunk[0])
                log_sum_sq = torch.logaddexp(log_sum_sq, chunk[1])
            done += k
    ess = (2 * log_sum - log_sum_sq).exp()
    if num_samples > 1:
        stderr = ((num_samples / ess - 1).clamp_min(0) / num_samples).sqrt()
    else:  # one sample says nothing about its own error
        stderr = torch.full_like(ess, math.nan)
    warn_if_few(ess, num_samples, stacklevel=5)  # the caller, past the two decorators
    return LogMarginal(log_sum - math.log(num_samples), stderr, ess, total / num_samples)


def warn_if_few(ess: Tensor, num_samples: int, stacklevel: int = 2) -> None:
    """A :class:`RuntimeWarning` where any importance ESS is below ``MIN_ESS``: one for all
    the estimates, saying how many and the smallest.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_if_few(torch.tensor([250.0, 3.2, 7.0]), num_samples=1000)
    >>> str(caught[0].message)[:72]
    'log_marginal_likelihood: importance ESS below 10 for 2 of 3 estimate(s) '
    """
    few = int((ess < MIN_ESS).sum())
    if few:
        warnings.warn(
            f"log_marginal_likelihood: importance ESS below {MIN_ESS} for {few} of "
            f"{ess.numel()} estimate(s) (smallest {ess.min().item():.3g} of {num_samples} "
            "samples): the estimate and its standard error are unreliable; use more samples "
            "or a guide closer to the posterior",
            RuntimeWarning,
            stacklevel=stacklevel,
        )


def _direct_weights(model, guide, args, kwargs) -> Callable[[int], Tensor] | None:
    """``k ↦`` the log weights of ``k`` draws, where ``model`` is the ``model`` method of an
    object whose ``guide`` is ``guide`` and which computes them itself
    (``log_weights(x, num_particles)``: :class:`pyroflows.vae.VAE`), else ``None``."""
    owner = getattr(model, "__self__", None)
    log_weights = getattr(owner, "log_weights", None)
    if not callable(log_weights) or getattr(owner, "model", None) != model:
        return None
    if getattr(owner, "guide", None) is not guide or len(args) != 1 or kwargs:
        return None
    return lambda k: log_weights(args[0], k)


def _first_sample(model, guide, args, kwargs) -> tuple[int, Tensor]:
    """Plate nesting (as :func:`.weights.plate_nesting`) and the log weights of the one sample its
    run drew, shaped as one particle: the run that finds the nesting is a draw from ``q``."""
    model_trace, guide_trace = (
        prune_subsample_sites(t) for t in w._one_run(model, guide, args, kwargs)
    )
    w._check_latents(model_trace, guide_trace)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    nesting = w._nesting(model_trace, guide_trace)
    return nesting, w.log_weights(model_trace, guide_trace, nesting).values


class _StoredParams(Messenger):
    """Answers every ``pyro.param`` from the param store and stops it there, so that no
    outer handler sees it: for runs that need neither a record of the parameters nor
    their gradients."""

    def _pyro_param(self, msg: dict) -> None:
        msg["value"] = msg["fn"](*msg["args"], **msg["kwargs"])
        msg["done"] = msg["stop"] = True


def _particles_without_params(fn: Callable, k: int, dim: int) -> Callable:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with pyro.plate(w.PARTICLES, k, dim=dim), _StoredParams():
            return fn(*args, **kwargs)

    return wrapped


def _unchecked_traces(model, guide, args, kwargs, num_particles: int, nesting: int):
    """:func:`.weights.traces` without Pyro's validation, score terms or parameter sites, for
    estimates whose first draw went through the checked path (the same code on fresh
    samples)."""
    guide = _particles_without_params(guide, num_particles, -nesting)
    model = _particles_without_params(model, num_particles, -nesting)
    with pyro.validation_enabled(False):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        model_trace, guide_trace = (prune_subsample_sites(t) for t in (model_trace, guide_trace))
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
    return model_trace, guide_trace
