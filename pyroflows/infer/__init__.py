"""Objectives and evaluation: IWAE (DReG), ELBO (STL), importance-sampled log p(x)."""

from .evaluation import LogMarginal, log_marginal_likelihood
from .objectives import ELBO, IWAE

__all__ = ["ELBO", "IWAE", "LogMarginal", "log_marginal_likelihood"]
