"""The flow guide for any Pyro model: :class:`AutoFlow` (for VAEs see
:class:`pyroflows.amortized.AmortizedFlowGuide`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.util import scale_and_mask
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_feasible, init_to_median
from pyro.nn import PyroParam
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor, nn
from torch.distributions import biject_to

from . import _checks
from ._scores import stopped_log_prob
from .flows import RECIPES, build
from .transforms._bijection import cache_disabled

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _recipe(flow: str, num_layers: int) -> None:
    _checks.one_of("flow", flow, RECIPES)
    _checks.positive_int("num_layers", num_layers)


# AutoFlow's depth where none is given: one autoregressive layer, as Pyro's AutoIAFNormal,
# calibrated better than two at the same budget (docs/inference.md); one CNF is the usual
AUTOFLOW_LAYERS = {"iaf": 1, "maf": 1, "cnf": 1}


def _autoguide_options(flow: str, dim: int, options: dict[str, Any]) -> dict[str, Any]:
    """AutoFlow's defaults where they differ from the layers': an autoregressive network of
    Pyro's width (one hidden layer of ``3 dim + 1`` units, as in ``AutoIAFNormal``), which
    calibrated better than a wider one at the same budget (docs/inference.md)."""
    if flow in ("iaf", "maf") and "hidden_dims" not in options:
        options = {**options, "hidden_dims": (3 * dim + 1,)}
    return options


def _feasible(site: dict) -> Tensor:
    """Pyro's ``init_to_feasible``, also for distributions that cannot sample (such as
    ``ImproperUniform``, the usual base of a ``pyro.factor`` model): the image of zero in
    unconstrained space, of the site's shape."""
    try:
        return init_to_feasible(site)
    except NotImplementedError:
        fn = site["fn"]
        transform = biject_to(fn.support)
        shape = transform.inverse_shape(fn.batch_shape + fn.event_shape)
        return transform(torch.zeros(shape))


def init_to_median_or_feasible(site: dict | None = None, num_samples: int = 15) -> Any:
    """AutoFlow's default placement: Pyro's ``init_to_median``, falling back to
    :func:`_feasible` where the site's distribution cannot be sampled.

    >>> from pyro.distributions import ImproperUniform, constraints
    >>> site = {"type": "sample", "name": "s", "is_observed": False, "infer": {}, "value": None,
    ...         "fn": ImproperUniform(constraints.positive, (), (2,))}  # fmt: skip
    >>> init_to_median_or_feasible(site)  # no draws to take a median of: a feasible point
    tensor([1., 1.])
    """
    if site is None:
        return partial(init_to_median_or_feasible, num_samples=num_samples)
    try:
        return init_to_median(site, num_samples=num_samples, fallback=_feasible)
    except NotImplementedError:  # raised past init_to_median's own fallback
        return _feasible(site)


class AutoFlow(AutoContinuous):
    """A normalizing-flow guide over all latent sites of a Pyro model, by recipe name.

    The latent vector (in unconstrained space) is ``z = loc + scale ⊙ f(ε)`` with
    ``ε ~ N(0, I)`` and ``f`` the flow ``pyroflows.build(flow, latent_dim, num_layers,
    **flow_options)`` (``num_layers`` defaults to 1 for ``iaf``, ``maf`` and ``cnf`` and to
    2 otherwise): the flow shapes a standardised latent and the learnable ``loc`` (from
    ``init_loc_fn``) and ``scale`` (``init_scale``) place it, which keeps the flow's inputs of
    order one whatever the model's scale. The flow is built on the device and dtype of the
    model's tensors. ``median`` and ``quantiles`` are Monte Carlo estimates per site.

    >>> import pyro, pyro.distributions as dist
    >>> def model():
    ...     pyro.sample("s", dist.LogNormal(0.0, 1.0))
    >>> guide = AutoFlow(model, flow="planar", num_layers=2)
    >>> bool(guide()["s"] > 0)
    True
    """

    scale_constraint = constraints.softplus_positive

    def __init__(
        self,
        model: Callable,
        flow: str = "iaf",
        num_layers: int | None = None,
        *,
        init_loc_fn: Callable = init_to_median_or_feasible,
        init_scale: float = 1.0,
        **flow_options: Any,
    ) -> None:
        if num_layers is None:
            num_layers = AUTOFLOW_LAYERS.get(flow, 2) if isinstance(flow, str) else 2
        _recipe(flow, num_layers)
        self._flow_args = (flow, num_layers, flow_options)
        self._init_scale = _checks.positive_number("init_scale", init_scale)
        self._pending_state: tuple[dict, bool] | None = None
        super().__init__(model, init_loc_fn=init_loc_fn)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        name, num_layers, options = self._flow_args
        self.loc = nn.Parameter(self._init_loc())
        self.scale = PyroParam(
            self.loc.new_full((self.latent_dim,), self._init_scale), self.scale_constraint
        )
        options = _autoguide_options(name, self.latent_dim, options)
        self.flow = build(name, self.latent_dim, num_layers, **options).to(self.loc)
        if self._pending_state is not None:
            state, strict = self._pending_state
            self._pending_state = None
            super().load_state_dict(state, strict=strict)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, **kw: Any):
        """Load parameters; before the guide's first call (when its shapes are not known yet)
        they are kept and loaded as soon as the first call has built the flow."""
        if self.prototype_trace is None:
            self._pending_state = (dict(state_dict), strict)
            return nn.modules.module._IncompatibleKeys([], [])
        return super().load_state_dict(state_dict, strict=strict, **kw)

    def get_base_dist(self) -> dist.Distribution:
        return self._base(self.loc)

    def _base(self, loc: Tensor) -> dist.Distribution:
        """``N(0, I)`` on ``loc``'s device and dtype, built once per device and dtype."""
        base = self.__dict__.get("_base_dist")
        if base is None or base.mean.device != loc.device or base.mean.dtype != loc.dtype:
            base = dist.Normal(torch.zeros_like(loc), torch.ones_like(loc)).to_event(1)
            self.__dict__["_base_dist"] = base
        return base

    def get_transform(self, *args: Any, **kwargs: Any) -> dist.transforms.Transform:
        """The flow's layers then ``loc + scale ⊙ ·``, as one flat list.

        The placement caches its last pair, so scoring a sample just drawn reaches each
        flow layer's cache: no inverse runs (an IAF's would take ``latent_dim`` passes).
        """
        return dist.transforms.ComposeTransform(self._layers(self.loc, self.scale))

    def _layers(self, loc: Tensor, scale: Tensor) -> list[dist.transforms.Transform]:
        place = dist.transforms.AffineTransform(loc, scale, event_dim=1, cache_size=1)
        return [*self.flow, place]

    def sample_latent(self, *args: Any, **kwargs: Any) -> Tensor:
        latent = super().sample_latent(*args, **kwargs)
        if not bool(torch.isfinite(latent).all()):
            raise RuntimeError(
                "AutoFlow drew a non-finite latent: the flow's parameters have diverged "
                f"(loc finite: {bool(torch.isfinite(self.loc).all())}, scale finite: "
                f"{bool(torch.isfinite(self.scale).all())}); lower the learning rate or "
                "clip gradients (pyro.optim.ClippedAdam)"
            )
        return latent

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.Distribution:
        # a flat list: a nested ComposeTransform makes TransformedDistribution re-check
        # supports and shapes once per layer and per level; each parameter is read once
        # (every read of a PyroModule parameter goes through pyro.param)
        loc, scale = self.loc, self.scale
        return dist.TransformedDistribution(self._base(loc), self._layers(loc, scale))

    def stopped_log_probs(self, guide_trace: Any) -> dict[str, Tensor]:
        """Each latent site's log density at its value in ``guide_trace`` with this guide's
        parameters stopped, for STL and DReG (taken by
        :func:`pyroflows.infer.stopped.stopped_guide_log_probs` in place of a re-run of the
        guide through Pyro). The joint latent's is its traced value plus its score times
        the sample's displacement, the score pulled back through the layers at their cached
        inputs (:func:`pyroflows._scores.stopped_log_prob`): the path derivative without an
        inverse or a second graph. Where a layer has no pullback, it is the flow's density
        with detached parameters, its inverse warm-started at the sample (see
        ``Flow._warm_start``). Each placed site's is as traced, since its density (the
        change of variables to the site's support) reads no parameter. The values and
        gradients are the re-run's (tested)."""
        out = {}
        for name, site in guide_trace.nodes.items():
            latent = site["type"] == "sample" and not site["is_observed"]
            if not latent or isinstance(site["fn"], _Subsample):
                continue
            if site["infer"].get("is_auxiliary"):
                log_prob = stopped_log_prob(
                    site["fn"], site["value"], site.get("unscaled_log_prob")
                )
                if log_prob is None:
                    log_prob = self._stopped_by_inverse(site["value"])
            else:
                log_prob = site["fn"].log_prob(site["value"])
            out[name] = scale_and_mask(log_prob, 1.0, site["mask"])
        return out

    def _stopped_by_inverse(self, z: Tensor) -> Tensor:
        detached = {f"flow.{k}": v.detach() for k, v in self.flow.named_parameters()}
        density = _StoppedDensity(self.flow, self._base(self.loc))
        with cache_disabled():
            return torch.func.functional_call(
                density, detached, (z, self.loc.detach(), self.scale.detach())
            )

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float], *args: Any, num_samples: int = 1000, **kwargs: Any
    ) -> dict[str, Tensor]:
        """Per-site quantiles in constrained space, estimated from ``num_samples`` draws."""
        _checks.positive_int("num_samples", num_samples)
        q = torch.as_tensor(quantiles, dtype=self.loc.dtype, device=self.loc.device)
        latent = self.get_posterior(*args, **kwargs).sample((num_samples,))
        nesting = max((-f.dim for f in self._prototype_frames.values() if f.vectorized), default=0)
        latent = latent.reshape(num_samples, *(1,) * nesting, self.latent_dim)
        out = {}
        for site, value in self._unpack_latent(latent):
            value = biject_to(site["fn"].support)(value).reshape(num_samples, *site["value"].shape)
            out[site["name"]] = torch.quantile(value, q, dim=0)
        return out

    def median(self, *args: Any, num_samples: int = 1000, **kwargs: Any) -> dict[str, Tensor]:
        """Per-site medians in constrained space, estimated from ``num_samples`` draws."""
        q = self.quantiles([0.5], *args, num_samples=num_samples, **kwargs)
        return {site: value[0] for site, value in q.items()}


class _StoppedDensity(nn.Module):
    """AutoFlow's ``log q`` as a module of its flow, to be called with swapped parameters."""

    def __init__(self, flow: nn.Module, base: dist.Distribution) -> None:
        super().__init__()
        self.flow, self.base = flow, base

    def forward(self, value: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
        place = dist.transforms.AffineTransform(loc, scale, event_dim=1)
        return dist.TransformedDistribution(self.base, [*self.flow, place]).log_prob(value)
