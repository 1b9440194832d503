"""The rows ``fit_data`` trains on: a tensor split into training and validation rows and
shuffled into batches, or an iterable of batches (such as a ``DataLoader``) taken as it
comes; each on the model's device, checked against the model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .model import DensityModel

Batches = Tensor | Iterable  # a tensor of rows, or batches (x or (x, context)) such as a DataLoader


def on_device(model: DensityModel, x: Tensor, context: Tensor | None, name: str):
    """``x`` checked against the model (:meth:`DensityModel.check`) and its context, both on
    the model's device and dtype."""
    x = model.check(x, context, name).to(model.loc.device)
    return x, None if context is None else context.to(x.device, x.dtype)


def flat(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() < 2 or len(x) < 1:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of shape (N, *features), got {shape}")
    return x.reshape(len(x), -1)


def split(x, context, valid, valid_context, fraction):
    if isinstance(x, Tensor):
        x = flat(x, "x")
        if context is not None and (not isinstance(context, Tensor) or len(context) != len(x)):
            raise ValueError(f"context must be a tensor with {len(x)} rows, one per row of x")
        if valid is None:
            if not 0 < fraction < 1:
                raise ValueError(f"valid_fraction must lie in (0, 1), got {fraction!r}")
            order = torch.randperm(len(x))
            n = max(1, round(fraction * len(x)))
            if n >= len(x):
                raise ValueError(f"x: {len(x)} rows are too few to hold out a validation set")
            valid, x = x[order[:n]], x[order[n:]]
            if context is not None:
                valid_context, context = context[order[:n]], context[order[n:]]
    elif context is not None:
        raise ValueError("context: with batches of x, give each batch as (x, context)")
    if isinstance(valid, Tensor):
        valid = flat(valid, "valid")
    return x, valid, context, valid_context


def first_rows(data: Batches, context: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The training tensor and its context, or the first batch of an iterable: the model's
    widths and the rows standardization is computed from."""
    if isinstance(data, Tensor):
        return data, context
    batch = next(iter(data), None)
    if batch is None:
        raise ValueError("x: the batches are empty")
    x, c = (batch[0], batch[1]) if isinstance(batch, tuple | list) else (batch, None)
    return flat(x, "a batch of x"), c


def batches(model: DensityModel, data: Batches, context: Tensor | None, size: int, name: str):
    """``(x, context)`` batches on the model's device: a tensor shuffled (from the global
    generator) into ``size`` rows, or an iterable as it comes."""
    device = model.loc.device
    if isinstance(data, Tensor):
        order = torch.randperm(len(data), device=data.device)
        for start in range(0, len(data), size):
            rows = order[start : start + size]
            yield data[rows], None if context is None else context[rows]
        return
    for batch in data:
        x, c = (batch[0], batch[1]) if isinstance(batch, tuple | list) else (batch, None)
        yield flat(x, f"a batch of {name}").to(device), None if c is None else c.to(device)
