"""Named flow recipes: stacks of transforms for a given dimension and depth."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pyro.distributions import ComposeTransformModule
from pyro.distributions.conditional import ConditionalComposeTransformModule
from torch import Tensor
from torch.distributions import Transform

from . import _checks
from .transforms import (
    ActNorm,
    Autoregressive,
    Continuous,
    Coupling,
    Flow,
    LULinear,
    Planar,
    Radial,
    Sylvester,
)

Layers = Callable[[int, int, int, dict[str, Any]], list[Flow]]


def _autoregressive(direction: str, transformer: str = "affine") -> Layers:
    def layers(dim: int, depth: int, context_dim: int, options: dict[str, Any]) -> list[Flow]:
        forward, reverse = torch.arange(dim), torch.arange(dim).flip(0)
        return _scaled_splines(
            transformer,
            dim,
            [
                Autoregressive(
                    dim,
                    context_dim=context_dim,
                    direction=direction,
                    permutation=reverse if i % 2 else forward,
                    transformer=transformer,
                    **options,
                )
                for i in range(depth)
            ],
        )

    return layers


def _scaled_splines(kind: str, dim: int, layers: list[Flow]) -> list[Flow]:
    """Spline layers map ``[-bound, bound]`` to itself: a final learned elementwise affine map
    (``ActNorm`` without data init) lets the flow reach targets of any scale."""
    return [*layers, ActNorm(dim, data_init=False)] if kind == "spline" else layers


def _repeat(family: type[Flow], **fixed: Any) -> Layers:
    def layers(dim: int, depth: int, context_dim: int, options: dict[str, Any]) -> list[Flow]:
        return [family(dim, context_dim=context_dim, **fixed, **options) for _ in range(depth)]

    return layers


def _triangular_sylvester(
    dim: int, depth: int, context_dim: int, options: dict[str, Any]
) -> list[Flow]:
    return [
        Sylvester(dim, context_dim=context_dim, kind="triangular", reverse=bool(i % 2), **options)
        for i in range(depth)
    ]


def _coupling(kind: str) -> Layers:
    def layers(dim: int, depth: int, context_dim: int, options: dict[str, Any]) -> list[Flow]:
        out: list[Flow] = [
            Coupling(dim, context_dim=context_dim, kind=kind, parity=i % 2, **options)
            for i in range(depth)
        ]
        if kind == "additive":  # NICE's final diagonal scaling
            out.append(ActNorm(dim, data_init=False))
        return _scaled_splines(kind, dim, out)

    return layers


def _glow(dim: int, depth: int, context_dim: int, options: dict[str, Any]) -> list[Flow]:
    out: list[Flow] = []
    for i in range(depth):
        out += [
            ActNorm(dim),
            LULinear(dim),
            Coupling(dim, context_dim=context_dim, kind="affine", parity=i % 2, **options),
        ]
    return out


RECIPES: dict[str, Layers] = {
    "iaf": _autoregressive("iaf"),
    "maf": _autoregressive("maf"),
    "planar": _repeat(Planar),
    "radial": _repeat(Radial),
    "sylvester-o": _repeat(Sylvester, kind="orthogonal"),
    "sylvester-h": _repeat(Sylvester, kind="householder"),
    "sylvester-t": _triangular_sylvester,
    "nice": _coupling("additive"),
    "realnvp": _coupling("affine"),
    "glow": _glow,
    "cnf": _repeat(Continuous),
    "nsf-ar": _autoregressive("iaf", "spline"),
    "nsf-coupling": _coupling("spline"),
}


def conditioned(layers: list[Flow], context: Tensor | None) -> list[Transform]:
    """The layers of a built recipe given ``context``: each amortized layer conditioned on it,
    the unconditional ones (``glow``'s ActNorm and LU layers, ``nice``'s scaling) as they are.

    >>> flow = build("glow", 4, num_layers=1, context_dim=3)
    >>> [type(t).__name__ for t in conditioned(list(flow), torch.zeros(3))]
    ['ActNorm', 'LULinear', 'ConditionedFlow']
    """
    return [t.condition(context) if t.context_dim else t for t in layers]


def build(
    name: str, dim: int, num_layers: int = 4, context_dim: int = 0, **options: Any
) -> ComposeTransformModule | ConditionalComposeTransformModule:
    """A stack of ``num_layers`` layers of the recipe ``name`` on ``dim`` coordinates.

    ``options`` go to every layer of the family (e.g. ``hidden_dims``, ``num_householder``,
    ``num_columns``, ``stable``). With ``context_dim > 0`` the result is a
    :class:`ConditionalComposeTransformModule` whose ``.condition(context)`` gives a plain
    transform; recipes whose layers are partly unconditional (``glow``'s ActNorm and LU
    layers, ``nice``'s final scaling) amortize their coupling layers.

    Recipes: ``iaf`` and ``maf`` (ordering reversed between layers), ``planar``,
    ``radial``, ``sylvester-o``, ``sylvester-h``, ``sylvester-t`` (alternating identity
    and reversal), ``nice`` (additive coupling + final scaling), ``realnvp`` (affine
    coupling), ``glow`` (ActNorm, LU linear, affine coupling per layer), ``cnf``
    (continuous-time flows; one layer is the usual choice), ``nsf-ar`` and ``nsf-coupling``
    (neural spline flows: rational-quadratic splines, autoregressive in the IAF direction or
    coupling with alternating halves, then a learned elementwise affine map, since splines
    map ``[-bound, bound]`` to itself; ``bins`` and ``bound`` among the options).

    >>> flow = build("iaf", dim=4, num_layers=2)
    >>> flow(torch.zeros(3, 4)).shape
    torch.Size([3, 4])
    """
    recipe = RECIPES.get(name) if isinstance(name, str) else None
    if recipe is None:
        raise ValueError(f"name must be one of {', '.join(map(repr, RECIPES))}; got {name!r}")
    _checks.positive_int("dim", dim)
    _checks.positive_int("num_layers", num_layers)
    _checks.nonnegative_int("context_dim", context_dim)
    layers = recipe(dim, num_layers, context_dim, options)
    if context_dim:
        return ConditionalComposeTransformModule(layers)
    return ComposeTransformModule(layers)
