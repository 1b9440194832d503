"""A scope for many draws from one fixed model: what depends only on the parameters and the
data is computed once per scope instead of once per chunk of draws.

Importance sampling draws thousands of samples for the same data, a chunk at a time, with
gradients off and parameters unchanged; an amortized guide would otherwise re-run its
encoder, and each autoregressive layer re-mask its weights, for every chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

_MEMO: ContextVar[dict | None] = ContextVar("pyroflows_repeated_draws", default=None)


@contextmanager
def repeated_draws() -> Iterator[None]:
    """Within this scope, while gradients are off, :func:`memo` reuses results; the
    parameters must not change inside it (an evaluation, not a training loop).

    >>> calls = []
    >>> with repeated_draws(), torch.no_grad():
    ...     x = torch.ones(2)
    ...     _ = [memo("calls", (calls, x), lambda: calls.append(1)) for _ in range(3)]
    >>> len(calls)
    1
    """
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def memo(kind: str, key: tuple, compute: Callable[[], T]) -> T:
    """``compute()``, reused inside :func:`repeated_draws` for the same ``kind`` and ``key``:
    objects compared by identity, tensors also by version (unmodified since); computed afresh
    outside the scope or with gradients on. One entry per ``kind`` and owner ``key[0]``: a
    key that changes from chunk to chunk replaces its entry rather than piling up results."""
    cache = _MEMO.get()
    if cache is None or torch.is_grad_enabled():
        return compute()
    ids = tuple((id(k), k._version) if isinstance(k, Tensor) else id(k) for k in key)
    entry = cache.get((kind, ids[0]))
    if entry is None or entry[0] != ids:
        # the entry holds the key's objects, so that no id is reused while it lives
        entry = cache[kind, ids[0]] = (ids, key, compute())
    return entry[2]
