"""Importance weights ``log p(x, z) - log q(z)`` from vectorized Pyro traces.

The weights are kept per datapoint when every sample site of the model and the guide lies in
a common vectorized plate (the data plate of a VAE): then ``log p(x) = Σₙ log p(xₙ)`` and
each datum gets its own importance-weighted estimate. Otherwise (global latents) they are
summed over all plates, the usual bound.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor, nn

from ..transforms.base import cache_disabled

PARTICLES = "_pyroflows_particles"


@dataclass
class LogWeights:
    """``values[k, ...]``: log weight of particle ``k``; per datum when ``per_datum``."""

    values: Tensor  # (K,) or (K, data points)
    frames: frozenset  # the data plate(s), empty for the usual bound
    scale: float  # subsampling scale of the data plate(s)
    nesting: int  # plates including the particles'; the particle plate is at -nesting
    model_trace: Any
    guide_trace: Any
    guide_log_probs: dict | None = None  # with stopped parameters, for DReG and STL

    @property
    def per_datum(self) -> bool:
        return bool(self.frames)


def _particles(fn: Callable, k: int, dim: int) -> Callable:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with pyro.plate(PARTICLES, k, dim=dim):
            return fn(*args, **kwargs)

    return wrapped


def _latent_sites(trace) -> list[dict]:
    return [s for s in trace.nodes.values() if s["type"] == "sample" and not s["is_observed"]]


def check_reparameterized(guide_trace) -> None:
    for site in _latent_sites(guide_trace):
        if not getattr(site["fn"], "has_rsample", False):
            raise ValueError(
                f"guide site {site['name']!r} is not reparameterizable (a discrete latent?); "
                "importance-weighted objectives here need reparameterized guide sites"
            )


def plate_nesting(model, guide, args, kwargs) -> int:
    """The deepest vectorized plate in one run of guide and model, plus one for particles."""
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    depths = [
        -frame.dim
        for trace in (model_trace, guide_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(depths, default=0) + 1


def traces(model, guide, args, kwargs, num_particles: int, nesting: int):
    """A guide trace with ``num_particles`` vectorized particles and the model replayed on it.

    ``nesting`` counts the plates including the particles' (Pyro's vectorized convention):
    the particle plate is at ``dim=-nesting``.
    """
    model_trace, guide_trace = get_importance_trace(
        "flat", nesting, _particles(model, num_particles, -nesting),
        _particles(guide, num_particles, -nesting), args, kwargs,
    )  # fmt: skip
    guide_latents = {s["name"] for s in _latent_sites(guide_trace)}
    for site in _latent_sites(model_trace):
        if site["name"] not in guide_latents:
            raise ValueError(
                f"model latent site {site['name']!r} has no counterpart in the guide; "
                "importance weights need the guide to sample every model latent"
            )
    return model_trace, guide_trace


def _data_frames(sites: list[dict]) -> frozenset:
    """The vectorized plates (other than the particles) that contain every site."""
    common = None
    for site in sites:
        frames = {f for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLES}
        common = frames if common is None else common & frames
    return frozenset(common or ())


def _reduce(log_prob: Tensor, keep: set[int], rank: int) -> Tensor:
    """Left-pad ``log_prob`` to ``rank`` dims and sum all dims but ``keep`` (negative dims)."""
    log_prob = log_prob.reshape((1,) * (rank - log_prob.dim()) + log_prob.shape)
    dims = [d for d in range(-rank, 0) if d not in keep and log_prob.shape[d] != 1]
    return log_prob.sum(dims, keepdim=True) if dims else log_prob


def _site_sum(
    sites: list[dict], frames: frozenset, rank: int, replace: dict | None = None
) -> Tensor:
    """Σ over sites of log densities, reduced to (K, *data plates) or (K, 1, ...)."""
    keep = {-rank} | {f.dim for f in frames}
    total = 0.0
    for site in sites:
        # per datum: unscaled, the subsampling scale multiplies the bound; else scaled
        if replace is not None:
            lp = replace[site["name"]] if frames else replace[site["name"]] * site["scale"]
        elif frames:
            lp = scale_and_mask(site["unscaled_log_prob"], 1.0, site["mask"])
        else:
            lp = site["log_prob"]
        total = total + _reduce(lp, keep, rank)
    return total


def _flatten(total: Tensor, per_datum: bool) -> Tensor:
    return total.reshape(total.shape[0], -1) if per_datum else total.reshape(-1)


def log_weights(
    model_trace, guide_trace, nesting: int, guide_log_probs: dict | None = None
) -> LogWeights:
    """Log weights per particle (and per datum where the sites allow).

    ``guide_log_probs`` replaces the guide's log densities site by site (e.g. evaluated with
    stopped parameters for DReG/STL).
    """
    model_sites = [s for s in model_trace.nodes.values() if s["type"] == "sample"]
    guide_sites = _latent_sites(guide_trace)
    frames = _data_frames(model_sites + guide_sites)
    total = _site_sum(model_sites, frames, nesting) - _site_sum(
        guide_sites, frames, nesting, guide_log_probs
    )
    scale = math.prod((f.full_size or f.size) / f.size for f in frames)
    return LogWeights(
        _flatten(total, bool(frames)), frames, scale, nesting, model_trace, guide_trace,
        guide_log_probs,
    )  # fmt: skip


def kl_terms(lw: LogWeights) -> tuple[Tensor, dict[str, Tensor]]:
    """``(log p(x | z), {site: log q(z) - log p(z)})`` per particle (and datum), reduced like
    ``lw``: the likelihood and a one-sample KL estimate for each latent site of the guide."""
    model_sites = {s["name"]: s for s in lw.model_trace.nodes.values() if s["type"] == "sample"}
    nesting = lw.nesting
    observed = [s for s in model_sites.values() if s["is_observed"]]
    likelihood = _flatten(_site_sum(observed, lw.frames, nesting), lw.per_datum)
    kls = {}
    for site in _latent_sites(lw.guide_trace):
        if site["name"] not in model_sites:
            raise ValueError(
                f"guide site {site['name']!r} has no model counterpart; KL terms (free bits) "
                "need guide and model latent sites paired by name"
            )
        q = _site_sum([site], lw.frames, nesting, lw.guide_log_probs)
        p = _site_sum([model_sites[site["name"]]], lw.frames, nesting)
        kls[site["name"]] = _flatten(q - p, lw.per_datum)
    return likelihood, kls


def model_log_density_at_stopped_latents(model, lw: LogWeights, args, kwargs) -> Tensor:
    """``log p(x, stop(z))`` per particle (and datum), reduced like ``lw``."""
    nesting = lw.nesting
    values = {s["name"]: s["value"].detach() for s in _latent_sites(lw.guide_trace)}
    k = lw.values.shape[0]
    run = _particles(poutine.condition(model, data=values), k, -nesting)
    trace = prune_subsample_sites(poutine.trace(run).get_trace(*args, **kwargs))
    trace.compute_log_prob()
    sites = [s for s in trace.nodes.values() if s["type"] == "sample"]
    return _flatten(_site_sum(sites, lw.frames, nesting), lw.per_datum)


class _DetachParams(Messenger):
    def _pyro_post_param(self, msg: dict) -> None:
        msg["value"] = msg["value"].detach()


def stopped_guide_log_probs(guide, guide_trace, args, kwargs, num_particles: int, nesting: int):
    """The guide's log densities at its own samples with every parameter stopped.

    The guide is re-run with its parameters detached (Pyro params through a handler,
    ``nn.Module`` parameters through :func:`torch.func.functional_call`) and the sample values
    replayed, so the result keeps the gradient through the samples (the path derivative) and
    drops the score term. Flows compute their inverse at the replayed values.
    """
    run = guide
    if isinstance(guide, nn.Module):
        detached = {k: v.detach() for k, v in guide.named_parameters()}

        def run(*a: Any, **k: Any) -> Any:
            return torch.func.functional_call(guide, detached, a, k)

    with cache_disabled(), _DetachParams(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "(?s).*not registered in the param store")
        replayed = poutine.trace(
            poutine.replay(_particles(run, num_particles, -nesting), trace=guide_trace)
        ).get_trace(*args, **kwargs)
    replayed = prune_subsample_sites(replayed)
    out = {}
    for site in _latent_sites(replayed):
        lp = site["fn"].log_prob(site["value"])
        out[site["name"]] = scale_and_mask(lp, 1.0, site["mask"])
    if is_validation_enabled():
        assert set(out) == {s["name"] for s in _latent_sites(guide_trace)}
    return out
