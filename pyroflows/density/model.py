"""A flow as a density model of data: ``N(0, I)`` pushed through a recipe, optionally
conditioned on a context, standardized to the training data, and dequantized for discrete
data."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from .. import _checks
from ..flows import RECIPES, build, conditioned
from ..transforms.continuous import exact_traces
from .dequantization import Dequantization, check_levels

LOG_2 = math.log(2.0)


class DensityModel(nn.Module):
    r"""``p(x | context)`` for rows ``x`` of ``dim`` values.

    The flow space holds ``x`` itself (continuous data) or the dequantized ``z`` of
    :class:`Dequantization`. There ``p`` is ``N(0, I)`` pushed through the recipe ``flow``
    (``pyroflows.build(flow, dim, num_layers, context_dim, **flow_options)``), then through a
    fixed elementwise affine map that :meth:`standardize` sets from the training data (MAF's
    preprocessing, kept in the density). The density is evaluated through the flow's
    inverse: one network pass for ``maf``, the coupling recipes, ``glow``; numerical for
    ``planar`` and Sylvester; an ODE solve for ``cnf``; ``dim`` passes for ``iaf``.

    :meth:`log_prob` is exact for continuous data; for discrete data it is the dequantization
    bound, an importance-weighted one with ``num_samples > 1`` (tighter as it grows).

    >>> model = DensityModel(2, flow="realnvp", num_layers=2)
    >>> model.log_prob(torch.zeros(5, 2)).shape
    torch.Size([5])
    """

    def __init__(
        self,
        dim: int,
        flow: str = "maf",
        num_layers: int = 4,
        *,
        context_dim: int = 0,
        dequantize: str | None = None,
        levels: int | None = None,
        alpha: float = 0.05,
        dequantizer: dict[str, Any] | None = None,
        **flow_options: Any,
    ) -> None:
        super().__init__()
        self.dim = _checks.positive_int("dim", dim)
        if flow not in RECIPES:
            raise ValueError(f"flow must be one of {', '.join(map(repr, RECIPES))}; got {flow!r}")
        stack = build(flow, dim, num_layers, context_dim=context_dim, **flow_options)
        self.layers = nn.ModuleList(stack.transforms if context_dim else stack.parts)
        self.context_dim = context_dim
        self.dequantizer = None
        if dequantize is not None:
            if levels is None:
                raise ValueError(f"levels: dequantize={dequantize!r} needs the number of levels")
            self.dequantizer = Dequantization(
                dim, levels, dequantize, alpha=alpha, **(dequantizer or {})
            )
        elif levels is not None:
            raise ValueError("levels applies to discrete data: set dequantize as well")
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.config = {
            "dim": dim, "flow": flow, "num_layers": num_layers, "context_dim": context_dim,
            "dequantize": dequantize, "levels": levels, "alpha": alpha,
            "dequantizer": dequantizer or {}, **flow_options,
        }  # fmt: skip

    @property
    def discrete(self) -> bool:
        return self.dequantizer is not None

    def check(self, x: Tensor, context: Tensor | None, name: str = "x") -> Tensor:
        """``x`` as float rows of this model, refused with a message naming ``name`` (and
        ``context``) when its shape or values do not fit."""
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must have shape (N, {self.dim}), got {shape}")
        if self.discrete:
            x = check_levels(x, self.dequantizer.levels, name)
        else:
            x = x if x.is_floating_point() else x.float()
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name} holds NaN or infinite values")
        if self.context_dim:
            if context is None:
                raise ValueError(f"context: this model has context_dim={self.context_dim}")
            if context.shape != (len(x), self.context_dim):
                raise ValueError(
                    f"context must have shape ({len(x)}, {self.context_dim}) to match {name}, "
                    f"got {tuple(context.shape)}"
                )
        elif context is not None:
            raise ValueError("context: this model is unconditional (context_dim=0)")
        return x.to(self.loc.dtype)

    def distribution(self, context: Tensor | None = None) -> dist.TransformedDistribution:
        """The density in the flow space (data or dequantized), given ``context``."""
        base = dist.Normal(self.loc.new_zeros(self.dim), 1.0).to_event(1)
        if context is not None:  # one row of the batch per row of the context
            base = base.expand(context.shape[:-1])
        affine = dist.transforms.AffineTransform(self.loc, self.scale, event_dim=1)
        return dist.TransformedDistribution(base, [*conditioned(self.layers, context), affine])

    @torch.no_grad()
    def standardize(self, x: Tensor) -> None:
        """Set the affine map so that the flow-space image of ``x`` (one dequantization draw)
        is centred with unit scale per coordinate."""
        z = self.dequantizer(x)[0] if self.discrete else x
        self.loc.copy_(z.mean(0))
        self.scale.copy_(z.std(0).nan_to_num(1.0).clamp_min(1e-3))

    def log_prob(
        self, x: Tensor, context: Tensor | None = None, num_samples: int = 1
    ) -> Tensor:  # fmt: skip
        """``log p(x)`` per row (nats); for discrete data the dequantization bound with
        ``num_samples`` noise draws per row, ``log (1/K) Σ_k exp(...)``, whose weights take a
        ``cnf``'s exact trace for ``K > 1`` (an estimated log-determinant would bias them)."""
        _checks.positive_int("num_samples", num_samples)
        if not self.discrete:
            return self.distribution(context).log_prob(x)
        # the K draws side by side: (K, N, D) through the dequantizer and the flow
        with exact_traces(self) if num_samples > 1 else contextlib.nullcontext():
            z, correction = self.dequantizer(x.expand(num_samples, *x.shape))
            draws = self.distribution(context).log_prob(z) + correction
        return torch.logsumexp(draws, 0) - math.log(num_samples)

    def bits_per_dim(
        self, x: Tensor, context: Tensor | None = None, num_samples: int = 1
    ) -> float:  # fmt: skip
        """``-log p(x) / (D log 2)`` averaged over the rows of ``x``: for discrete data an
        upper bound of the code length in bits per value (lower is better)."""
        x = self.check(x, context)
        with torch.no_grad():
            nats = -self.log_prob(x, context, num_samples).mean().item()
        return nats / (self.dim * LOG_2)

    @torch.no_grad()
    def sample(self, num: int, context: Tensor | None = None) -> Tensor:
        """``num`` draws in data space (for discrete data: integer values on the grid); with
        a context of shape ``(N, context_dim)``, ``num`` draws for each row: ``(num, N, dim)``."""
        _checks.positive_int("num", num)
        z = self.distribution(context).sample((num,))
        return self.dequantizer.decode(z) if self.discrete else z

