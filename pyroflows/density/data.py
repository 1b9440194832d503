"""Data sets for density estimation: scikit-learn's bundled 8x8 digits on their 17 grey levels
(the default, no download), binarized MNIST, or any ``.npz`` of arrays.

>>> data = load("digits")
>>> data.levels, data.image_shape, tuple(data.train.shape)
(17, (8, 8), (1397, 64))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..vae.data import DIGITS_TEST, DIGITS_VALID
from ..vae.data import load as load_binary

SPLITS = ("train", "valid", "test")


@dataclass
class Rows:
    """Train, validation and test rows ``(N, D)`` as floats; ``levels`` is the number of
    integer values for discrete data (``None`` for continuous data); ``image_shape`` is set
    for square images.

    >>> rows = Rows(torch.rand(8, 3), None, None, levels=None, name="uniform")
    >>> rows.to("cpu").train.shape
    torch.Size([8, 3])
    """

    train: Tensor
    valid: Tensor | None
    test: Tensor | None
    levels: int | None
    name: str
    image_shape: tuple[int, int] | None = None

    def to(self, device: str | torch.device) -> Rows:
        """The same rows on ``device``."""
        moved = {s: None if getattr(self, s) is None else getattr(self, s).to(device)
                 for s in SPLITS}  # fmt: skip
        return replace(self, **moved)


def load(data: str | Path, *, seed: int = 0) -> Rows:
    """``"digits"`` (1797 images, values 0-16, the VAE's fixed 1397 / 200 / 200 split),
    ``"mnist"`` (binarized MNIST as :func:`pyroflows.vae.load` finds it: 2 levels), or the
    path of an ``.npz`` file holding ``train`` (and optionally ``valid``, ``test``) arrays of
    shape ``(N, *features)``: integer-valued arrays are discrete with ``levels = max + 1``
    (binary MNIST files with their 0/1 pixels included), anything else continuous.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "counts.npz"
    >>> np.savez(path, train=np.random.default_rng(0).integers(0, 5, (100, 3)))
    >>> rows = load(path)
    >>> rows.levels, rows.valid, tuple(rows.train.shape)  # integers 0-4: five levels
    (5, None, (100, 3))
    """
    if data == "digits":
        return load_digits(seed=seed)
    if data == "mnist":
        images = load_binary("mnist")
        return Rows(images.train, images.valid, images.test, 2, images.name, images.image_shape)
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(
            f"data: {str(data)!r} is neither 'digits', 'mnist', nor an existing .npz file"
        )
    if path.suffix != ".npz":
        raise ValueError(f"data: expected an .npz file, got {str(path)!r}")
    try:
        with np.load(path) as arrays:
            found = {s: arrays[s] for s in SPLITS if s in arrays.files}
    except Exception as error:
        raise ValueError(f"data: {str(path)!r} is not a readable .npz file: {error}") from None
    if "train" not in found:
        raise ValueError(f"data: {str(path)!r} has no array named 'train'")
    splits = {s: torch.as_tensor(v).reshape(len(v), -1).float() for s, v in found.items()}
    integral = all(bool((v == v.round()).all()) and v.min() >= 0 for v in splits.values())
    levels = int(max(v.max().item() for v in splits.values())) + 1 if integral else None
    side = math.isqrt(splits["train"].shape[-1])
    shape = (side, side) if side * side == splits["train"].shape[-1] and side > 1 else None
    return Rows(splits["train"], splits.get("valid"), splits.get("test"),
                max(levels, 2) if levels else None, path.stem, shape)  # fmt: skip


def load_digits(*, seed: int = 0) -> Rows:
    """scikit-learn's 8x8 digits with their grey levels 0-16 kept (17 levels); a fixed
    shuffle (``seed``) gives 1397 / 200 / 200 images.

    >>> rows = load_digits()
    >>> rows.levels, rows.train.max().item(), len(rows.valid), len(rows.test)
    (17, 16.0, 200, 200)
    """
    from sklearn.datasets import load_digits as sklearn_digits

    grey = torch.tensor(sklearn_digits().data, dtype=torch.float32)
    grey = grey[torch.randperm(len(grey), generator=torch.Generator().manual_seed(seed))]
    n = len(grey) - DIGITS_VALID - DIGITS_TEST
    return Rows(grey[:n], grey[n:-DIGITS_TEST], grey[-DIGITS_TEST:], 17, "digits", (8, 8))
