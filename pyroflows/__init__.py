"""Normalizing flows for variational inference in Pyro."""

from . import diagnostics, flows, infer, targets, transforms, vae
from .autoguide import AmortizedFlowGuide, AutoFlow
from .fit import FitResult, fit
from .flows import build

__version__ = "0.1.0"
__all__ = [
    "AmortizedFlowGuide",
    "AutoFlow",
    "FitResult",
    "__version__",
    "build",
    "diagnostics",
    "fit",
    "flows",
    "infer",
    "targets",
    "transforms",
    "vae",
]
