"""Importance weights ``log p(x, z) - log q(z)`` from vectorized Pyro traces.

The weights are kept per datapoint when every sample site of the model and the guide lies in
a common vectorized plate (the data plate of a VAE): then ``log p(x) = Σₙ log p(xₙ)`` and
each datum gets its own importance-weighted estimate. Otherwise (global latents) they are
summed over all plates, the usual bound.

>>> import pyro.distributions as dist
>>> def model(x):
...     with pyro.plate("data", len(x)):
...         z = pyro.sample("z", dist.Normal(0.0, 1.0))
...         pyro.sample("x", dist.Normal(z, 1.0), obs=x)
>>> def guide(x):  # the exact posterior: z | x ~ N(x / 2, 1/2)
...     with pyro.plate("data", len(x)):
...         pyro.sample("z", dist.Normal(x / 2, 0.5**0.5))
>>> x = torch.tensor([0.0, 1.0, 2.0])
>>> nesting = plate_nesting(model, guide, (x,), {})  # the data plate and the particles'
>>> lw = log_weights(*traces(model, guide, (x,), {}, 100, nesting), nesting)
>>> lw.values.shape  # (particles, data points)
torch.Size([100, 3])
>>> exact = dist.Normal(0.0, 2**0.5).log_prob(x)  # log p(x): every weight is exact
>>> torch.allclose(lw.values, exact.expand(100, 3), atol=1e-5)
True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, check_site_shape
from torch import Tensor

from .._repeated import repeated_draws
from ..transforms.continuous import exact_traces

if TYPE_CHECKING:
    from .stopped import ModelGradientScale

PARTICLES = "_pyroflows_particles"


@dataclass
class LogWeights:
    """``values[k, ...]``: log weight of particle ``k``; per datum when ``per_datum``.

    >>> def model():
    ...     pyro.sample("z", pyro.distributions.Normal(0.0, 1.0))
    >>> lw = log_weights(*traces(model, model, (), {}, 5, 1), 1)  # q = p
    >>> lw.values, lw.per_datum
    (tensor([0., 0., 0., 0., 0.]), False)
    """

    values: Tensor  # (K,) or (K, data points)
    frames: frozenset  # the data plate(s), empty for the usual bound
    scale: float  # subsampling scale of the data plate(s)
    nesting: int  # plates including the particles'; the particle plate is at -nesting
    model_trace: Any
    guide_trace: Any
    guide_log_probs: dict | None = None  # with stopped parameters, for DReG and STL
    log_p: Tensor | None = None  # the model's part, log p(x, z), reduced like values
    gradient_scale: ModelGradientScale | None = None  # where the model ran on scaled views

    @property
    def per_datum(self) -> bool:
        return bool(self.frames)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of ``values`` with its plates in place, of rank ``nesting``."""
        shape = [self.values.shape[0], *[1] * (self.nesting - 1)]
        for frame in self.frames:
            shape[frame.dim] = frame.size
        return tuple(shape)


def _particles(fn: Callable, k: int, dim: int) -> Callable:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with pyro.plate(PARTICLES, k, dim=dim):
            return fn(*args, **kwargs)

    return wrapped


def _latent_sites(trace) -> list[dict]:
    return [s for s in trace.nodes.values() if s["type"] == "sample" and not s["is_observed"]]


def check_reparameterized(guide_trace) -> None:
    """A clear error where a guide's latent site cannot be reparameterized.

    >>> def guide():
    ...     pyro.sample("k", pyro.distributions.Categorical(torch.ones(3)))
    >>> check_reparameterized(poutine.trace(guide).get_trace())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: guide site 'k' is not reparameterizable (a discrete latent?); ...
    """
    for site in _latent_sites(guide_trace):
        if not getattr(site["fn"], "has_rsample", False):
            raise ValueError(
                f"guide site {site['name']!r} is not reparameterizable (a discrete latent?); "
                "importance-weighted objectives here need reparameterized guide sites"
            )


def plate_nesting(model, guide, args, kwargs) -> int:
    """The deepest vectorized plate in one run of guide and model, plus one for particles.

    >>> def model():
    ...     with pyro.plate("rows", 3, dim=-2), pyro.plate("columns", 4):
    ...         pyro.sample("z", pyro.distributions.Normal(0.0, 1.0))
    >>> plate_nesting(model, model, (), {})
    3
    """
    return _nesting(*_one_run(model, guide, args, kwargs))


def _one_run(model, guide, args, kwargs):
    """Guide and model traces of one run without particles, blocked from outer handlers."""
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    return model_trace, guide_trace


def _nesting(model_trace, guide_trace) -> int:
    depths = [
        -frame.dim
        for trace in (model_trace, guide_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(depths, default=0) + 1


def traces(
    model, guide, args, kwargs, num_particles: int, nesting: int,
    scale: ModelGradientScale | None = None,
) -> tuple[Any, Any]:  # fmt: skip
    """A guide trace with ``num_particles`` vectorized particles and the model replayed on it.

    ``nesting`` counts the plates including the particles' (Pyro's vectorized convention):
    the particle plate is at ``dim=-nesting``. With a :class:`.stopped.ModelGradientScale`, the
    model is replayed on views of the guide's values through which ``scale`` scales the
    gradient that reaches them from the model.

    >>> def model():
    ...     pyro.sample("z", pyro.distributions.Normal(0.0, 1.0).expand([2]).to_event(1))
    >>> model_trace, guide_trace = traces(model, model, (), {}, 10, nesting=1)
    >>> guide_trace.nodes["z"]["value"].shape, model_trace.nodes["z"]["log_prob"].shape
    (torch.Size([10, 2]), torch.Size([10]))
    """
    model = _particles(model, num_particles, -nesting)
    guide = _particles(guide, num_particles, -nesting)
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    replayed = guide_trace
    if scale is not None:
        replayed = guide_trace.copy()
        for site in _latent_sites(guide_trace):
            replayed.nodes[site["name"]] = {**site, "value": scale.view(site["value"])}
    model_trace = poutine.trace(poutine.replay(model, trace=replayed)).get_trace(*args, **kwargs)
    if is_validation_enabled():  # as Pyro's get_importance_trace
        check_model_guide_match(model_trace, guide_trace, nesting)
    model_trace, guide_trace = (prune_subsample_sites(t) for t in (model_trace, guide_trace))
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    if is_validation_enabled():
        for trace in (model_trace, guide_trace):
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    check_site_shape(site, nesting)
    _check_latents(model_trace, guide_trace)
    return model_trace, guide_trace


def _check_latents(model_trace, guide_trace) -> None:
    guide_latents = {s["name"] for s in _latent_sites(guide_trace)}
    for site in _latent_sites(model_trace):
        if site["name"] not in guide_latents:
            raise ValueError(
                f"model latent site {site['name']!r} has no counterpart in the guide; "
                "importance weights need the guide to sample every model latent"
            )


def _check_plates(model_sites: list[dict], guide_sites: list[dict]) -> None:
    """Model and guide must agree on each plate's size and full size: a guide plate opened
    without the model's subsampling would weigh the guide and the model differently."""
    seen: dict[str, tuple[str, Any]] = {}
    for role, sites in (("model", model_sites), ("guide", guide_sites)):
        for site in sites:
            for f in site["cond_indep_stack"]:
                if f.name == PARTICLES:
                    continue
                shape = (f.size, f.full_size or f.size)
                other = seen.setdefault(f.name, (role, shape))
                if other[1] != shape:
                    raise ValueError(
                        f"plate {f.name!r}: the {other[0]} has size {other[1][0]} of "
                        f"{other[1][1]} but the {role} has size {shape[0]} of {shape[1]}; "
                        "open the plate with the same size and subsample in model and guide "
                        "(AmortizedFlowGuide: create_plates=...)"
                    )


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
    model_trace, guide_trace, nesting: int, guide_log_probs: dict | None = None,
    gradient_scale: ModelGradientScale | None = None,
) -> LogWeights:  # fmt: skip
    """Log weights per particle (and per datum where the sites allow).

    ``guide_log_probs`` replaces the guide's log densities site by site (e.g. evaluated with
    stopped parameters for DReG/STL).

    >>> def model():
    ...     pyro.sample("z", pyro.distributions.Normal(0.0, 1.0))
    >>> def guide():
    ...     pyro.sample("z", pyro.distributions.Normal(0.0, 2.0))
    >>> lw = log_weights(*traces(model, guide, (), {}, 4000, 1), 1)
    >>> abs(lw.values.logsumexp(0).item() - math.log(4000)) < 0.05  # log ∫ p = 0
    True
    """
    model_sites = [s for s in model_trace.nodes.values() if s["type"] == "sample"]
    guide_sites = _latent_sites(guide_trace)
    _check_plates(model_sites, guide_sites)
    frames = _data_frames(model_sites + guide_sites)
    log_p = _site_sum(model_sites, frames, nesting)
    total = log_p - _site_sum(guide_sites, frames, nesting, guide_log_probs)
    scale = math.prod((f.full_size or f.size) / f.size for f in frames)
    return LogWeights(
        _flatten(total, bool(frames)), frames, scale, nesting, model_trace, guide_trace,
        guide_log_probs, _flatten(log_p.expand_as(total), bool(frames)), gradient_scale,
    )  # fmt: skip


@repeated_draws()
def weighted_draws(
    model, guide, args, kwargs, num: int, chunk: int = 500
) -> tuple[dict[str, Tensor], Tensor, list[dict]]:
    """``num`` draws of any guide for ``model``: the model's latent sites with their own
    shapes ``(num, *shape)``, the log weights ``log p(x, z) - log q(z)`` summed over data,
    and the sample sites of one unvectorized run (for shapes, plates and observed data).

    >>> def model():
    ...     pyro.sample("z", pyro.distributions.Normal(0.0, 1.0).expand([2, 3]).to_event(2))
    >>> draws, log_w, sites = weighted_draws(model, model, (), {}, 7)
    >>> draws["z"].shape, log_w.shape, [s["name"] for s in sites]
    (torch.Size([7, 2, 3]), torch.Size([7]), ['z'])
    """
    with torch.no_grad(), exact_traces(model, guide):  # the exact log q of a CNF
        one_model, one_guide = _one_run(model, guide, args, kwargs)
        nesting = _nesting(one_model, one_guide)
        sites = [
            s for s in prune_subsample_sites(one_model).nodes.values() if s["type"] == "sample"
        ]
        latent = {s["name"]: s["value"].shape for s in sites if not s["is_observed"]}
        draws: dict[str, list[Tensor]] = {name: [] for name in latent}
        log_w = []
        for start in range(0, num, chunk):
            k = min(chunk, num - start)
            model_trace, guide_trace = traces(model, guide, args, kwargs, k, nesting)
            values = log_weights(model_trace, guide_trace, nesting).values
            log_w.append(values.reshape(k, -1).sum(-1))
            for name, shape in latent.items():
                value = model_trace.nodes[name]["value"]
                draws[name].append(value.expand(k, *value.shape[1:]).reshape(k, *shape))
    return {name: torch.cat(parts) for name, parts in draws.items()}, torch.cat(log_w), sites
