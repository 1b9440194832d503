"""How far to trust a flow fitted to an unnormalised density: PSIS k-hat, importance ESS,
log Z with its standard error, debiased samples and arviz ``InferenceData``.

The Pareto k-hat of the importance ratios ``p(x)/q(x)`` comes from arviz's PSIS (Vehtari
et al., 2024) and is read as Yao et al. (2018) do: below 0.5 the importance estimates are
good, up to 0.7 usable (with the smoothed weights), above 0.7 not to be trusted.

>>> import torch
>>> x = 2 * torch.randn(4000, generator=torch.Generator().manual_seed(0))  # q = N(0, 2²)
>>> log_q = torch.distributions.Normal(0.0, 2.0).log_prob(x)
>>> d = importance_diagnostics(-x**2 / 2, log_q)  # p ∝ N(0, 1): log Z = ½ log 2π ≈ 0.92
>>> round(d.log_z, 1), d.verdict
(0.9, 'good')
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pyro import poutine
from torch import Tensor

from .infer.weights import weighted_draws

GOOD, USABLE = 0.5, 0.7  # k-hat thresholds of Yao et al. (2018)


@dataclass(frozen=True)
class ImportanceDiagnostics:
    """What importance sampling from ``q`` says about ``p``; see the module docstring.

    >>> d = ImportanceDiagnostics(log_z=0.1, log_z_stderr=0.01, k_hat=0.62, ess=800.0,
    ...                           num_samples=1000, nonfinite=0)  # fmt: skip
    >>> d.verdict
    'usable'
    >>> print(d)
    log Z 0.100 ± 0.010, PSIS k-hat 0.62 (usable), ESS 800 of 1000
    """

    log_z: float  # log (1/n) Σ p(xᵢ)/q(xᵢ), xᵢ ~ q
    log_z_stderr: float  # delta method: sd(w) / (√n mean(w))
    k_hat: float  # Pareto shape of the largest ratios (PSIS)
    ess: float  # importance ESS of the PSIS-smoothed weights, 1 / Σ w̃ᵢ²
    num_samples: int
    nonfinite: int  # draws where log p was NaN or +inf (left out; -inf counts as p = 0)

    @property
    def verdict(self) -> str:
        """``"good"`` (k-hat < 0.5), ``"usable"`` (< 0.7) or ``"unreliable"``."""
        if not self.k_hat < USABLE:  # NaN too
            return "unreliable"
        return "good" if self.k_hat < GOOD else "usable"

    def __str__(self) -> str:
        return (
            f"log Z {self.log_z:.3f} ± {self.log_z_stderr:.3f}, PSIS k-hat {self.k_hat:.2f} "
            f"({self.verdict}), ESS {self.ess:.0f} of {self.num_samples}"
        )


def psis(log_ratios: Tensor) -> tuple[Tensor, float]:
    """Pareto-smoothed log weights, normalised to sum to one, and k-hat (arviz; 0.23 and
    1.x alike).

    >>> x = 2 * torch.randn(4000, generator=torch.Generator().manual_seed(0))
    >>> log_w, k_hat = psis(-x**2 / 2 - torch.distributions.Normal(0.0, 2.0).log_prob(x))
    >>> round(log_w.exp().sum().item(), 6), k_hat < 0.5  # q wider than p: light-tailed ratios
    (1.0, True)
    """
    values = log_ratios.detach().double().cpu().numpy().copy()
    if values.max() - values.min() <= 1e-12 * (1 + abs(values.max())):  # q = p / Z exactly
        n = len(values)  # (arviz's Pareto fit of equal values says inf)
        return torch.full_like(log_ratios, -math.log(n)), -math.inf
    try:
        from arviz_stats.base import array_stats  # arviz >= 1.0
    except ImportError:
        import arviz as az

        smoothed, k_hat = az.psislw(values)
    else:
        smoothed, k_hat = array_stats.psislw(values, r_eff=1.0)
    smoothed = torch.as_tensor(np.asarray(smoothed), dtype=log_ratios.dtype)
    return smoothed - torch.logsumexp(smoothed, 0), float(np.asarray(k_hat))


def importance_diagnostics(
    log_p: Tensor, log_q: Tensor, warn: bool = True
) -> ImportanceDiagnostics:
    """Diagnostics of ``q`` as an importance proposal for ``p`` from draws ``xᵢ ~ q``, given
    ``log p(xᵢ)`` (unnormalised) and ``log q(xᵢ)`` as 1-D tensors. A draw where ``log p`` is
    ``-inf`` has weight zero; draws where it is NaN or ``+inf`` are left out and counted.
    With ``warn``, a k-hat above 0.7 gives a :class:`RuntimeWarning`.

    >>> x = torch.randn(4000, generator=torch.Generator().manual_seed(0))  # q = N(0, 1)
    >>> log_q = torch.distributions.Normal(0.0, 1.0).log_prob(x)
    >>> d = importance_diagnostics(-x**2 / 8, log_q, warn=False)  # p ∝ N(0, 2²): q too narrow
    >>> d.verdict, d.k_hat > 0.7  # the ratios p/q have heavy tails
    ('unreliable', True)
    """
    if log_p.dim() != 1 or log_p.shape != log_q.shape:
        raise ValueError(
            "log_p and log_q must be 1-D tensors of the same length, got shapes "
            f"{tuple(log_p.shape)} and {tuple(log_q.shape)}"
        )
    log_w = (log_p - log_q).detach().double().cpu()
    valid = ~(torch.isnan(log_w) | (log_w == math.inf))  # -inf: p = 0 there, weight 0
    log_w = log_w[valid]
    n = len(log_w)
    positive = log_w > -math.inf
    if int(positive.sum()) < 2:
        raise ValueError(f"need at least 2 draws where p > 0 and log p is finite, got {n}")
    log_z = torch.logsumexp(log_w, 0) - math.log(n)
    w = (log_w - log_z).exp()  # mean 1
    smoothed, k_hat = psis(log_w[positive])
    result = ImportanceDiagnostics(
        log_z=log_z.item(),
        log_z_stderr=(w.std() / math.sqrt(n)).item(),
        k_hat=k_hat,
        ess=(1 / smoothed.exp().square().sum()).item(),
        num_samples=n,
        nonfinite=int((~valid).sum()),
    )
    if warn and result.verdict == "unreliable":
        warnings.warn(unreliable_message(k_hat), RuntimeWarning, stacklevel=2)
    return result


def unreliable_message(k_hat: float) -> str:
    """The warning for a k-hat above 0.7.

    >>> unreliable_message(0.9)[:36]
    'PSIS k-hat 0.90 > 0.7: q misses part'
    """
    return (
        f"PSIS k-hat {k_hat:.2f} > {USABLE}: q misses part of p, so log Z and importance "
        "estimates are unreliable (Yao et al., 2018); fit longer, use a richer flow or temper"
    )


def sliced_wasserstein(x: Tensor, y: Tensor, num_projections: int = 256) -> float:
    """Sliced 2-Wasserstein distance between equal-size samples ``(n, dim)``: the root mean
    over random directions of the squared 1-D transport cost between the projections.

    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(1000, 2), torch.randn(1000, 2)
    >>> sliced_wasserstein(x, y) < 0.2 < sliced_wasserstein(x, y + torch.tensor([3.0, 0.0]))
    True
    """
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(
            f"x and y must be samples of the same shape (n, dim), got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    directions = torch.randn(x.shape[-1], num_projections, dtype=x.dtype, device=x.device)
    directions = directions / directions.norm(dim=0)
    a, _ = (x @ directions).sort(0)
    b, _ = (y.to(x) @ directions).sort(0)
    return (a - b).square().mean().sqrt().item()


def resample(
    samples: Tensor, log_p: Tensor, log_q: Tensor, num_samples: int | None = None
) -> Tensor:
    """Draws from ``q`` resampled (with replacement) by their PSIS-smoothed weights: closer
    to ``p`` than ``samples`` when k-hat is below 0.7.

    >>> _ = torch.manual_seed(0)
    >>> x = 2 * torch.randn(4000)  # q = N(0, 2²), p = N(0, 1)
    >>> log_q = torch.distributions.Normal(0.0, 2.0).log_prob(x)
    >>> round(x.std().item(), 1), round(resample(x, -x**2 / 2, log_q).std().item(), 1)
    (2.0, 1.0)
    """
    log_w = (log_p - log_q).detach()
    keep = torch.isfinite(log_w)
    smoothed, _ = psis(log_w[keep].cpu())
    index = torch.multinomial(smoothed.exp(), num_samples or int(keep.sum()), replacement=True)
    return samples[keep][index.to(samples.device)]


def draws_to_inference_data(
    samples: Tensor | dict[str, Tensor], log_p: Tensor, log_q: Tensor, name: str = "x"
) -> Any:
    """An arviz ``InferenceData`` (a ``DataTree`` with arviz 1.x) with the draws as one
    chain: a tensor ``(draws, dim)`` as the posterior variable ``name``, or a dict of site
    values ``(draws, *shape)`` by site; ``log_p``, ``log_q`` and the log importance ratio in
    ``sample_stats``.

    >>> x = torch.randn(500, 2)
    >>> log_q = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
    >>> idata = draws_to_inference_data(x, log_q - 0.1, log_q)
    >>> idata.posterior["x"].shape  # (chain, draw, x_dim_0)
    (1, 500, 2)
    """
    draws = samples if isinstance(samples, dict) else {name: samples}
    stats = {"log_p": log_p, "log_q": log_q, "log_importance_ratio": log_p - log_q}
    return _from_dict({"posterior": draws, "sample_stats": stats})


@torch.no_grad()
def to_inference_data(
    model: Any, guide: Any, *args: Any, num_samples: int = 1000, chunk_size: int = 500,
    posterior_predictive: bool = False, **kwargs: Any,
) -> Any:  # fmt: skip
    """``num_samples`` draws of any guide (``AutoFlow``, Pyro's autoguides, an amortized
    guide) for ``model(*args, **kwargs)`` as arviz ``InferenceData``: a ``posterior`` group by
    latent site with the model's shapes (plate dimensions named after their plates),
    ``sample_stats`` with each draw's log importance ratio ``log p(x, z) - log q(z)`` (summed
    over data), ``observed_data``, and the PSIS k-hat as the attribute ``pareto_k``.

    With ``posterior_predictive=True`` a ``posterior_predictive`` group holds one replicate of
    every observed site per draw, from Pyro's ``Predictive`` run on the same draws. The draws
    are the guide's, not reweighted: where k-hat is high, resample them by their importance
    ratios before reading predictive checks.

    >>> import pyro, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> def model(y):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    ...     with pyro.plate("data", len(y)):
    ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    >>> idata = to_inference_data(model, AutoNormal(model), torch.zeros(3), num_samples=50)
    >>> idata.posterior["mu"].shape, idata.observed_data["y"].dims
    ((1, 50), ('data',))
    >>> idata = to_inference_data(model, AutoNormal(model), torch.zeros(3), num_samples=50,
    ...                           posterior_predictive=True)
    >>> idata.posterior_predictive["y"].shape
    (1, 50, 3)
    """
    draws, log_w, sites = weighted_draws(model, guide, args, kwargs, num_samples, chunk_size)
    _, k_hat = psis(log_w)
    observed = {s["name"]: s["value"] for s in sites if s["is_observed"]}
    dims = {s["name"]: _dims(s) for s in sites}
    groups = {
        "posterior": draws,
        "sample_stats": {"log_importance_ratio": log_w},
        "observed_data": observed,
    }
    if posterior_predictive:
        from pyro.infer import Predictive

        replicate = poutine.uncondition(model)  # observed sites drawn afresh
        predict = Predictive(replicate, posterior_samples=draws, return_sites=list(observed))
        groups["posterior_predictive"] = predict(*args, **kwargs)
    return _from_dict(groups, dims=dims, attrs={"pareto_k": k_hat})


def _dims(site: dict) -> list[str]:
    """Dimension names of a site's value: its plates' names where a plate holds the
    dimension, ``{site}_dim_{i}`` elsewhere (arviz's own default)."""
    value = site["value"]
    batch = value.dim() - site["fn"].event_dim
    plates = {f.dim: f.name for f in site["cond_indep_stack"] if f.vectorized}
    names = []
    for i in range(value.dim()):
        plate = plates.get(i - batch) if i < batch else None
        names.append(plate or f"{site['name']}_dim_{i}")
    return names


def _from_dict(groups: dict[str, dict], **options: Any) -> Any:
    """arviz's ``from_dict`` for 0.23 (keyword groups) and 1.x (one dict); posterior and
    sample statistics get a chain dimension of 1 in front."""
    import arviz as az

    def as_array(t: Tensor, chain: bool) -> np.ndarray:
        t = t.detach().cpu().numpy()
        return t[None] if chain else t

    arrays = {
        group: {k: as_array(v, group != "observed_data") for k, v in values.items()}
        for group, values in groups.items()
    }
    if "dims" in options:  # only the variables present; posterior names skip chain and draw
        present = {k for values in arrays.values() for k in values}
        options["dims"] = {k: v for k, v in options["dims"].items() if k in present}
    if int(az.__version__.split(".")[0]) >= 1:
        return az.from_dict(arrays, **options)
    return az.from_dict(**arrays, **options)
