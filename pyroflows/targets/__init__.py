"""Standard unnormalised densities for sampling benchmarks, with known answers where they exist.

Every target is an :class:`torch.nn.Module` (so ``.to(device, dtype)`` moves its constants)
with ``dim``, a batched ``log_prob(x)`` for ``x`` of shape ``(..., dim)``, ``log_z`` (the log
normaliser of ``exp(log_prob)``: exact, from quadrature for the 2-D shapes, or ``None``) and,
where one exists, an exact ``sample(shape)``. :func:`target` builds one by name.

>>> t = target("funnel", dim=10)
>>> t.log_prob(t.sample((4,))).shape, t.log_z
(torch.Size([4]), 0.0)
"""

from __future__ import annotations

from collections.abc import Callable

from .. import _checks
from .base import Target
from .energies import Energy2D
from .mixtures import GaussianMixture, gmm40, grid, ring
from .sized import Banana, Funnel, IllConditionedGaussian, ManyWell

__all__ = [
    "TARGETS", "Banana", "Energy2D", "Funnel", "GaussianMixture", "IllConditionedGaussian",
    "ManyWell", "Target", "gmm40", "grid", "ring", "target",
]  # fmt: skip

TARGETS: dict[str, Callable[..., Target]] = {
    "u1": lambda: Energy2D(1),
    "u2": lambda: Energy2D(2),
    "u3": lambda: Energy2D(3),
    "u4": lambda: Energy2D(4),
    "funnel": Funnel,
    "banana": Banana,
    "ring": ring,
    "grid": grid,
    "gmm40": gmm40,
    "many-well": ManyWell,
    "ill-gaussian": IllConditionedGaussian,
}
SIZED = ("funnel", "banana", "many-well", "ill-gaussian")  # the ones that take ``dim``


def target(name: str, dim: int | None = None, **options: object) -> Target:
    """The target ``name`` (see ``TARGETS``), with ``dim`` for the sized ones.

    >>> target("u1").log_z > 0, target("banana", dim=4).dim
    (True, 4)
    """
    _checks.one_of("name", name, TARGETS)
    if dim is not None:
        if name not in SIZED:
            raise ValueError(f"target {name!r} has a fixed dimension; dim applies to {SIZED}")
        options["dim"] = dim
    return TARGETS[name](**options)
