"""Normalizing flows for variational inference in Pyro."""

from . import density, diagnostics, distributed, flows, infer, targets, transforms, vae
from .amortized import AmortizedFlowGuide
from .autoguide import AutoFlow
from .density import fit_data
from .fit import FitResult, fit
from .flows import build

__version__ = "0.1.0"
__all__ = [
    "AmortizedFlowGuide",
    "AutoFlow",
    "FitResult",
    "__version__",
    "build",
    "density",
    "diagnostics",
    "distributed",
    "fit",
    "fit_data",
    "flows",
    "infer",
    "targets",
    "transforms",
    "vae",
]
