"""Normalizing flows for variational inference in Pyro."""

from . import flows, infer, transforms
from .autoguide import AmortizedFlowGuide, AutoFlow
from .flows import build

__version__ = "0.1.0"
__all__ = ["AmortizedFlowGuide", "AutoFlow", "__version__", "build", "flows", "infer", "transforms"]
