"""Every transform the generic tests run over: each family and each recipe, plain and amortized.

A new family gets the whole generic suite by adding lines to ``FAMILIES`` (and a recipe by
adding its name to ``pyroflows.flows.RECIPES``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from pyro.distributions import ComposeTransformModule
from torch.distributions import Transform

import pyroflows as pf
from pyroflows.transforms import (
    ActNorm,
    Autoregressive,
    Continuous,
    Coupling,
    LULinear,
    Planar,
    Radial,
    Sylvester,
)
from pyroflows.transforms._bijection import _CachedBijection

DIM = 3
CONTEXT_DIM = 2


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[..., torch.nn.Module]  # called with context_dim=...
    context_dim: int
    tol: float = 1e-9  # round trips; an ODE solve is only as exact as its tolerances

    def build(self, dtype: torch.dtype = torch.float64, seed: int = 0, perturb: float = 0.3):
        """The flow with randomly perturbed parameters (after any data-dependent init)."""
        torch.manual_seed(seed)
        flow = self.make(context_dim=self.context_dim).to(dtype)
        context = self.context(4, dtype=dtype)
        transform_for(flow, context)(torch.randn(4, DIM, dtype=dtype) * 2 + 1)
        with torch.no_grad():
            for p in flow.parameters():
                p.add_(perturb * torch.randn_like(p))
        clear(flow)
        return flow

    def context(self, *batch: int, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
        if not self.context_dim:
            return None
        return torch.randn(*batch, self.context_dim, dtype=dtype)


def transform_for(flow, context: torch.Tensor | None) -> Transform:
    return flow if context is None else flow.condition(context)


def clear(transform) -> None:
    """Empty every one-entry cache inside ``transform``."""
    if isinstance(transform, _CachedBijection):
        transform.clear_cache()
    for part in getattr(transform, "parts", ()):
        clear(part)
    if isinstance(transform, torch.nn.Module):
        for module in transform.modules():
            if isinstance(module, _CachedBijection):
                module.clear_cache()


ODE_TOL = {"rtol": 1e-8, "atol": 1e-8}

FAMILIES: dict[str, Callable[..., torch.nn.Module]] = {
    "iaf": partial(Autoregressive, DIM, hidden_dims=(8, 8)),
    "iaf-stable": partial(Autoregressive, DIM, hidden_dims=(8,), stable=True),
    "maf": partial(
        Autoregressive, DIM, hidden_dims=(8,), direction="maf", permutation=torch.tensor([2, 0, 1])
    ),
    "maf-stable": partial(Autoregressive, DIM, hidden_dims=(8,), direction="maf", stable=True),
    "planar": partial(Planar, DIM),
    "planar-deep": partial(Planar, DIM, hidden_dims=(5,)),
    "radial": partial(Radial, DIM),
    "sylvester-o-m2": partial(Sylvester, DIM, kind="orthogonal", num_columns=2),
    "sylvester-o": partial(Sylvester, DIM, kind="orthogonal"),
    "sylvester-h": partial(Sylvester, DIM, kind="householder", num_householder=2),
    "sylvester-t": partial(Sylvester, DIM, kind="triangular"),
    "sylvester-t-rev": partial(Sylvester, DIM, kind="triangular", reverse=True),
    "affine-coupling": partial(Coupling, DIM, hidden_dims=(8,)),
    "affine-coupling-odd": partial(Coupling, DIM, hidden_dims=(8,), parity=1),
    "additive-coupling": partial(Coupling, DIM, hidden_dims=(8,), kind="additive"),
    "spline-iaf": partial(
        Autoregressive, DIM, hidden_dims=(8,), transformer="spline", bins=4, bound=2.0
    ),
    "spline-maf": partial(
        Autoregressive,
        DIM,
        hidden_dims=(8,),
        transformer="spline",
        direction="maf",
        bins=3,
        bound=2.0,
        permutation=torch.tensor([1, 2, 0]),
    ),
    "spline-coupling": partial(Coupling, DIM, hidden_dims=(8,), kind="spline", bins=4, bound=2.0),
    "spline-coupling-odd": partial(
        Coupling, DIM, hidden_dims=(8,), kind="spline", parity=1, bins=5, bound=2.0
    ),
    "actnorm": partial(ActNorm, DIM),
    "lu-linear": partial(LULinear, DIM),
    "cnf": partial(Continuous, DIM, hidden_dims=(8,), **ODE_TOL),
    "cnf-adjoint-softplus-learned-time": partial(
        Continuous,
        DIM,
        hidden_dims=(8,),
        activation="softplus",
        adjoint=True,
        learn_time=True,
        **ODE_TOL,
    ),
    "cnf-checkpoint-max-norm": partial(
        Continuous, DIM, hidden_dims=(8,), checkpoint=True, norm="max", **ODE_TOL
    ),
    "cnf-softplus-two-hidden": partial(
        Continuous, DIM, hidden_dims=(8, 5), activation="softplus", **ODE_TOL
    ),
    # deeper than the closed-form trace: the trace from the Jacobian's rows
    "cnf-three-hidden": partial(Continuous, DIM, hidden_dims=(6, 5, 4), **ODE_TOL),
}

RECIPE_OPTIONS = {
    "iaf": {"hidden_dims": (8,)},
    "maf": {"hidden_dims": (8,)},
    "nice": {"hidden_dims": (8,)},
    "realnvp": {"hidden_dims": (8,)},
    "glow": {"hidden_dims": (8,)},
    "nsf-ar": {"hidden_dims": (8,), "bins": 4, "bound": 2.0},
    "nsf-coupling": {"hidden_dims": (8,), "bins": 4, "bound": 2.0},
    "cnf": {"hidden_dims": (8,), **ODE_TOL},
}


def _recipe(name: str, context_dim: int = 0) -> ComposeTransformModule:
    return pf.build(
        name,
        DIM,
        num_layers=1 if name == "cnf" else 2,
        context_dim=context_dim,
        **RECIPE_OPTIONS.get(name, {}),
    )


def _tol(name: str) -> float:
    return 1e-6 if "cnf" in name else 1e-9


# families that exist only amortized
AMORTIZED = {
    "cnf-low-rank": partial(Continuous, DIM, hidden_dims=(8, 5), rank=2, **ODE_TOL),
    "cnf-low-rank-checkpoint": partial(
        Continuous, DIM, hidden_dims=(6,), rank=1, checkpoint=True, **ODE_TOL
    ),
}

CASES = (
    [
        Case(f"{name}{'-amortized' if c else ''}", make, c, _tol(name))
        for name, make in FAMILIES.items()
        for c in (0, CONTEXT_DIM)
    ]
    + [Case(name, make, CONTEXT_DIM, _tol(name)) for name, make in AMORTIZED.items()]
    + [
        Case(f"recipe-{name}{'-amortized' if c else ''}", partial(_recipe, name), c, _tol(name))
        for name in pf.flows.RECIPES
        for c in (0, CONTEXT_DIM)
    ]
)
