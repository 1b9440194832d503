"""Normalizing flows for variational inference in Pyro."""

from . import flows, transforms
from .flows import build

__version__ = "0.1.0"
__all__ = ["__version__", "build", "flows", "transforms"]
