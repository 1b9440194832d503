"""Flow transforms: one class per family, all following :mod:`pyroflows.transforms.base`."""

from .autoregressive import Autoregressive
from .base import ConditionedFlow, Flow
from .continuous import Continuous
from .coupling import Coupling
from .linear import ActNorm, LULinear
from .planar import Planar
from .radial import Radial
from .sylvester import Sylvester

__all__ = [
    "ActNorm",
    "Autoregressive",
    "ConditionedFlow",
    "Continuous",
    "Coupling",
    "Flow",
    "LULinear",
    "Planar",
    "Radial",
    "Sylvester",
]
