"""Flows as density models of data: maximum-likelihood fitting, dequantization of discrete
data, and bits per dimension."""

from .dequantization import Dequantization
from .fitting import DensityFit, Settings, fit_data, load_checkpoint, validation_nll
from .model import DensityModel

__all__ = [
    "DensityFit",
    "DensityModel",
    "Dequantization",
    "Settings",
    "fit_data",
    "load_checkpoint",
    "validation_nll",
]
