"""Flow guides: :class:`AutoFlow` for any Pyro model, :class:`AmortizedFlowGuide` for VAEs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from torch import Tensor, nn
from torch.distributions import biject_to

from . import _checks
from .flows import RECIPES, build


def _recipe(flow: str, num_layers: int) -> None:
    _checks.one_of("flow", flow, RECIPES)
    _checks.positive_int("num_layers", num_layers)


class AutoFlow(AutoContinuous):
    """A normalizing-flow guide over all latent sites of a Pyro model, by recipe name.

    The latent vector (in unconstrained space) is ``z = loc + scale ⊙ f(ε)`` with
    ``ε ~ N(0, I)`` and ``f`` the flow ``pyroflows.build(flow, latent_dim, num_layers,
    **flow_options)``: the flow shapes a standardised latent and the learnable ``loc`` (from
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
        num_layers: int = 2,
        *,
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.1,
        **flow_options: Any,
    ) -> None:
        _recipe(flow, num_layers)
        if (
            isinstance(init_scale, bool)
            or not isinstance(init_scale, int | float)
            or init_scale <= 0
        ):
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        self._flow_args = (flow, num_layers, flow_options)
        self._init_scale = float(init_scale)
        super().__init__(model, init_loc_fn=init_loc_fn)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        name, num_layers, options = self._flow_args
        self.loc = nn.Parameter(self._init_loc())
        self.scale = PyroParam(
            self.loc.new_full((self.latent_dim,), self._init_scale), self.scale_constraint
        )
        self.flow = build(name, self.latent_dim, num_layers, **options).to(self.loc)

    def get_base_dist(self) -> dist.Distribution:
        return dist.Normal(torch.zeros_like(self.loc), torch.ones_like(self.loc)).to_event(1)

    def get_transform(self, *args: Any, **kwargs: Any) -> dist.transforms.Transform:
        place = dist.transforms.AffineTransform(self.loc, self.scale, event_dim=1)
        return dist.transforms.ComposeTransform([self.flow, place])

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.Distribution:
        return dist.TransformedDistribution(self.get_base_dist(), self.get_transform())

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


class AmortizedFlowGuide(nn.Module):
    """The guide of a VAE: ``q(z | x)`` is a flow conditioned on an encoder's output.

    ``encoder(x)`` returns a context ``h`` of size ``context_dim``; linear heads give the base
    ``N(μ(h), σ(h))`` and the flow ``pyroflows.build(flow, latent_dim, num_layers,
    context_dim, **flow_options)`` is conditioned on ``h`` (the IAF, Sylvester and FFJORD VAEs'
    construction). The latent site ``site`` is sampled inside ``pyro.plate(plate, len(x))``,
    which must match the model's data plate. Call it as ``guide(x)`` (extra arguments, which
    the model may take, are ignored).

    >>> encoder = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
    >>> guide = AmortizedFlowGuide(encoder, latent_dim=2, context_dim=16, flow="planar")
    >>> pyro.poutine.trace(guide).get_trace(torch.zeros(5, 6)).nodes["z"]["value"].shape
    torch.Size([5, 2])
    """

    def __init__(
        self,
        encoder: nn.Module,
        latent_dim: int,
        context_dim: int,
        flow: str = "iaf",
        num_layers: int = 2,
        *,
        site: str = "z",
        plate: str = "data",
        **flow_options: Any,
    ) -> None:
        super().__init__()
        _recipe(flow, num_layers)
        self.latent_dim = _checks.positive_int("latent_dim", latent_dim)
        self.context_dim = _checks.positive_int("context_dim", context_dim)
        self.encoder = encoder
        self.loc = nn.Linear(context_dim, latent_dim)
        self.scale = nn.Linear(context_dim, latent_dim)
        self.flow = build(flow, latent_dim, num_layers, context_dim=context_dim, **flow_options)
        self.site, self.plate = site, plate

    def posterior(self, x: Tensor) -> dist.Distribution:
        """``q(z | x)`` with batch shape ``x.shape[:-1]``."""
        h = self.encoder(x)
        if h.shape[-1] != self.context_dim:
            raise ValueError(
                f"encoder output must have shape (..., {self.context_dim}) (context_dim), "
                f"got {tuple(h.shape)}"
            )
        base = dist.Normal(self.loc(h), F.softplus(self.scale(h)) + 1e-5).to_event(1)
        return dist.TransformedDistribution(base, [self.flow.condition(h)])

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        pyro.module("amortized_flow_guide", self)
        with pyro.plate(self.plate, x.shape[0]):
            return pyro.sample(self.site, self.posterior(x))
