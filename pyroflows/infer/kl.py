"""The ELBO split into its likelihood and its KL terms, for KL warm-up and free bits: the
KL of each group of latent sites (each site, or a joint guide's sites together)."""

from __future__ import annotations

from typing import Any

import torch
from pyro.distributions import Delta, ExpandedDistribution, Independent, MaskedDistribution
from torch import Tensor

from .weights import LogWeights, _flatten, _latent_sites, _site_sum


def _kl_groups(guide_sites: list[dict], model_names: set[str]) -> dict[str, list[dict]]:
    """Guide latent sites grouped by the part of ``q`` whose KL they make up.

    A site of a mean-field guide is its own group. A joint guide (an ``AutoContinuous`` such
    as :class:`~pyroflows.AutoFlow`) samples one auxiliary latent and places each model site
    as a ``Delta`` of it: its density does not split over sites, so the auxiliary site and
    every site it determines form one group, named after the auxiliary site.
    """
    auxiliary = [s for s in guide_sites if s["infer"].get("is_auxiliary")]
    joint = "+".join(s["name"] for s in auxiliary)
    groups: dict[str, list[dict]] = {}
    for site in guide_sites:
        if site in auxiliary or (auxiliary and _is_delta(site["fn"])):
            groups.setdefault(joint, []).append(site)
        elif site["name"] in model_names:
            groups[site["name"]] = [site]
        else:
            raise ValueError(
                f"guide site {site['name']!r} has no model counterpart; KL terms (warm-up, "
                "free bits) need each guide latent site paired with a model site of the same "
                "name, or marked infer={'is_auxiliary': True} as in an AutoContinuous guide"
            )
    return groups


def _is_delta(fn: Any) -> bool:
    while isinstance(fn, Independent | MaskedDistribution | ExpandedDistribution):
        fn = fn.base_dist
    return isinstance(fn, Delta)


def kl_terms(lw: LogWeights) -> tuple[Tensor, dict[str, Tensor]]:
    """``(log p(x | z), {group: log q(z) - log p(z)})`` per particle (and datum), reduced
    like ``lw``: the likelihood and a one-sample KL estimate for each group of latent sites
    (each site, or a joint guide's sites together: see :func:`_kl_groups`).

    >>> import pyro, torch
    >>> from pyroflows.infer.weights import log_weights, traces
    >>> def model():
    ...     z = pyro.sample("z", pyro.distributions.Normal(0.0, 1.0))
    ...     pyro.sample("x", pyro.distributions.Normal(z, 1.0), obs=torch.tensor(1.0))
    >>> def guide():
    ...     pyro.sample("z", pyro.distributions.Normal(0.0, 1.0))  # q = the prior: no KL
    >>> likelihood, kls = kl_terms(log_weights(*traces(model, guide, (), {}, 3, 1), 1))
    >>> likelihood.shape, kls
    (torch.Size([3]), {'z': tensor([0., 0., 0.])})
    """
    model_sites = {s["name"]: s for s in lw.model_trace.nodes.values() if s["type"] == "sample"}
    nesting = lw.nesting
    observed = [s for s in model_sites.values() if s["is_observed"]]
    if observed:
        likelihood = _flatten(_site_sum(observed, lw.frames, nesting), lw.per_datum)
    else:  # a model without data: log p(x | z) = 0
        likelihood = torch.zeros_like(lw.values)
    latent = {n for n, s in model_sites.items() if not s["is_observed"]}
    kls = {}
    for group, sites in _kl_groups(_latent_sites(lw.guide_trace), latent).items():
        q = _site_sum(sites, lw.frames, nesting, lw.guide_log_probs)
        paired = [model_sites[s["name"]] for s in sites if s["name"] in latent]
        p = _site_sum(paired, lw.frames, nesting)
        kls[group] = _flatten(q - p, lw.per_datum)
    return likelihood, kls


def kl_with_free_bits(kl: torch.Tensor, free_bits: float) -> torch.Tensor:
    """The KL summed over data, or with ``free_bits`` λ its data mean floored at λ, times the
    number of data (Kingma et al., 2016).

    >>> kl = torch.tensor([0.1, 0.3, 2.0, 0.0])  # per datum: mean 0.6
    >>> kl_with_free_bits(kl, 0.0), kl_with_free_bits(kl, 0.5), kl_with_free_bits(kl, 1.0)
    (tensor(2.4000), tensor(2.4000), tensor(4.))
    """
    if free_bits:
        return torch.clamp(kl.mean(), min=free_bits) * kl.numel()
    return kl.sum()
