"""The guide of a VAE: :class:`AmortizedFlowGuide`, a flow conditioned on an encoder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.util import scale_and_mask
from torch import Tensor, nn

from . import _checks
from ._repeated import memo
from ._scores import stopped_log_prob
from .autoguide import HALF_LOG_2PI, _recipe
from .flows import build


class AmortizedFlowGuide(nn.Module):
    """The guide of a VAE: ``q(z | x)`` is a flow conditioned on an encoder's output.

    ``encoder(x)`` returns a context ``h`` of size ``context_dim``; linear heads give the base
    ``N(μ(h), σ(h))`` and the flow ``pyroflows.build(flow, latent_dim, num_layers,
    context_dim, **flow_options)`` is conditioned on ``h`` (the IAF, Sylvester and FFJORD VAEs'
    construction); ``flow=None`` leaves the diagonal Gaussian alone (the plain VAE's guide).
    ``x`` has shape ``(batch, *features)``. The latent site ``site`` is sampled
    inside ``pyro.plate(plate, len(x))``, which must match the model's data plate. Where the
    model subsamples (``pyro.plate("data", N, subsample=idx)``), pass ``create_plates``, a
    function of the guide's arguments that returns the same plate, as for Pyro's autoguides:
    ``create_plates=lambda x, idx: pyro.plate("data", N, subsample=idx)``; the objectives
    refuse a model and guide whose plates disagree. Call it as ``guide(x, ...)``: further
    arguments go to ``create_plates`` and are otherwise ignored.

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
        flow: str | None = "iaf",
        num_layers: int = 2,
        *,
        site: str = "z",
        plate: str = "data",
        create_plates: Callable[..., pyro.plate] | None = None,
        **flow_options: Any,
    ) -> None:
        super().__init__()
        if flow is not None:
            _recipe(flow, num_layers)
        self.latent_dim = _checks.positive_int("latent_dim", latent_dim)
        self.context_dim = _checks.positive_int("context_dim", context_dim)
        self.encoder = encoder
        self.loc = nn.Linear(context_dim, latent_dim)
        self.scale = nn.Linear(context_dim, latent_dim)
        self.flow = None
        if flow is not None:
            self.flow = build(flow, latent_dim, num_layers, context_dim=context_dim, **flow_options)
        self.site, self.plate, self.create_plates = site, plate, create_plates

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The context ``h`` and the base's ``(μ(h), σ(h))``, once per ``x`` inside
        :func:`pyroflows._repeated.repeated_draws`."""
        return memo("encoding", (self, x), lambda: self._run_encoder(x))

    def _run_encoder(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.encoder(x)
        if h.shape[-1] != self.context_dim:
            raise ValueError(
                f"encoder output must have shape (..., {self.context_dim}) (context_dim), "
                f"got {tuple(h.shape)}"
            )
        return h, self.loc(h), F.softplus(self.scale(h)) + 1e-5

    def posterior(self, x: Tensor) -> dist.Distribution:
        """``q(z | x)`` with batch shape ``x.shape[:-1]``."""
        h, loc, scale = self._encode(x)
        base = dist.Normal(loc, scale).to_event(1)
        if self.flow is None:
            return base
        # the layers one by one: the flow's own ``condition`` would build a module per call,
        # whose reference cycles keep each call's tensors until the garbage collector runs
        return dist.TransformedDistribution(base, [t.condition(h) for t in self.flow.transforms])

    def rsample_and_log_prob(
        self, x: Tensor, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """One reparameterized draw ``z ~ q(z | x)`` per row of ``x`` and its ``log q(z |
        x)``, computed together in one pass without building distributions: the same
        values as ``posterior(x).rsample()`` and its ``log_prob``, for hand-written losses.
        ``noise`` gives the base's standard normal draws (``(*sample, *batch, latent_dim)``,
        ``sample`` draws per row) instead of one fresh draw per row."""
        h, loc, scale = self._encode(x)
        if noise is None:
            eps = torch.randn_like(loc)
        elif noise.shape[noise.dim() - loc.dim() :] != loc.shape:
            raise ValueError(
                f"noise must have shape (*sample, {', '.join(map(str, loc.shape))}), got "
                f"{tuple(noise.shape)}"
            )
        else:
            eps = noise
        z = loc + scale * eps
        log_q = -(0.5 * eps.square() + scale.log()).sum(-1) - HALF_LOG_2PI * self.latent_dim
        for layer in () if self.flow is None else self.flow.transforms:
            z, ladj = layer.condition(h).call_and_ladj(z)
            log_q = log_q - ladj
        return z, log_q

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"x must be a batch of shape (batch, *features), got {shape}; "
                "for one data point use x.unsqueeze(0)"
            )
        # registered once per scope of repeated draws: the parameters cannot change there
        memo("registration", (self,), lambda: pyro.module("amortized_flow_guide", self))
        if self.create_plates is None:
            plate = pyro.plate(self.plate, x.shape[0])
        else:
            plate = self.create_plates(x, *args, **kwargs)
            if not isinstance(plate, pyro.plate) or plate.name != self.plate:
                raise ValueError(
                    f"create_plates must return the pyro.plate named {self.plate!r} (plate), "
                    f"got {plate!r}"
                )
        with plate:
            return pyro.sample(self.site, self.posterior(x))

    def stopped_log_probs(self, guide_trace: Any) -> dict[str, Tensor] | None:
        """``log q(z | x)`` at the traced sample with every parameter stopped (encoder,
        heads and flow), for STL and DReG: the traced value plus the score times the
        sample's displacement (:func:`pyroflows._scores.stopped_log_prob`); ``None``, for a
        re-run of the guide, where a layer has no score pullback."""
        site = guide_trace.nodes[self.site]
        log_prob = stopped_log_prob(site["fn"], site["value"], site.get("unscaled_log_prob"))
        return (
            None if log_prob is None else {self.site: scale_and_mask(log_prob, 1.0, site["mask"])}
        )
