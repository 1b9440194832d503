"""Seeded blocks of random draws that leave the generators' streams as they were."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int | None, device: torch.device | None = None) -> Iterator[None]:
    """The block drawn from ``seed``, the generators' states restored after it; ``None``
    leaves them alone. ``device`` names the CUDA generator forked beside the CPU's (``None``:
    every visible one, as :func:`torch.random.fork_rng` does).

    >>> with seeded(3):
    ...     a = torch.rand(())
    >>> with seeded(3):
    ...     bool(torch.rand(()) == a)
    True
    """
    if seed is None:
        yield
        return
    devices = None if device is None else [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
