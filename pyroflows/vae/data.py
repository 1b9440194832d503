"""Binary image data for the VAE: statically binarized MNIST from ``.npz`` or the standard
``.amat`` text files, MNIST IDX files binarized at load, and scikit-learn's bundled 8x8 digits
as the default that needs no download.

>>> data = load("digits")
>>> data.image_shape, tuple(data.train.shape), set(data.train.unique().tolist())
((8, 8), (1397, 64), {0.0, 1.0})
"""

from __future__ import annotations

import gzip
import math
import os
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .. import _checks

SPLITS = ("train", "valid", "test")
AMAT = "binarized_mnist_{}.amat"  # Larochelle & Murray's files
IDX = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
MNIST_VALID = 10_000  # the last 10000 training images, as the IAF and Sylvester papers
DIGITS_VALID = DIGITS_TEST = 200


@dataclass
class BinaryImages:
    """Train, validation and test images as float tensors of shape ``(N, H * W)``.

    Values are 0 and 1, except ``train`` when ``dynamic``: then it holds grey levels in
    [0, 1], and :meth:`train_epoch` binarizes them afresh each epoch (validation and test are
    binarized once, with the loader's seed).

    >>> data = load_digits(binarize="dynamic")
    >>> data.dynamic, bool((data.train_epoch() != data.train_epoch()).any())  # fresh each epoch
    (True, True)
    """

    train: Tensor
    valid: Tensor
    test: Tensor
    image_shape: tuple[int, int]
    name: str
    dynamic: bool = False

    def to(self, device: str | torch.device) -> BinaryImages:
        """The same images on ``device``."""
        return replace(self, **{s: getattr(self, s).to(device) for s in SPLITS})

    def train_epoch(self) -> Tensor:
        """The training images for one epoch: binarized now (from the global torch
        generator) when ``dynamic``."""
        return torch.bernoulli(self.train) if self.dynamic else self.train


def load(
    data: str | Path, *, binarize: str = "static", seed: int = 0
) -> BinaryImages:  # fmt: skip
    """``data``: ``"digits"`` (bundled with scikit-learn), ``"mnist"`` (the file
    ``binarized_mnist.npz``, or the ``.amat`` or IDX files, in the folder named by the
    environment variable ``PYROFLOWS_DATA``, default ``./data``), or a path: an ``.npz`` file,
    or a folder of ``.amat`` files or of MNIST IDX files. ``binarize`` (``"static"`` with
    ``seed``, or ``"dynamic"``) applies to data that arrive in grey levels: IDX files, digits.

    >>> load("digits", seed=1).name
    'digits'
    >>> load("no/such/folder")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: data: 'no/such/folder' is neither 'digits', 'mnist', nor an existing ...
    """
    _checks.one_of("binarize", binarize, ("static", "dynamic"))
    if data == "digits":
        return load_digits(binarize=binarize, seed=seed)
    if data == "mnist":
        folder = Path(os.environ.get("PYROFLOWS_DATA", "data"))
        path = folder / "binarized_mnist.npz"
        if not path.exists() and not _has_amat(folder) and not _has_idx(folder):
            raise FileNotFoundError(
                f"data='mnist': found neither binarized_mnist.npz, nor {AMAT.format('*')}, nor "
                f"MNIST IDX files in {str(folder)!r}; set PYROFLOWS_DATA to their folder, or "
                "pass the path of the file or folder"
            )
        data = path if path.exists() else folder
    path = Path(data)
    if path.is_file():
        if path.suffix != ".npz":
            raise ValueError(f"data: expected an .npz file or a folder, got the file {str(path)!r}")
        return load_npz(path)
    if path.is_dir():
        if _has_amat(path):
            return load_amat(path)
        if _has_idx(path):
            return load_idx(path, binarize=binarize, seed=seed)
        raise FileNotFoundError(
            f"data: the folder {str(path)!r} holds neither {AMAT.format('{train,valid,test}')} "
            f"nor MNIST IDX files ({IDX['train']}, {IDX['test']}, optionally .gz)"
        )
    raise FileNotFoundError(
        f"data: {str(data)!r} is neither 'digits', 'mnist', nor an existing file or folder"
    )


def load_npz(path: str | Path) -> BinaryImages:
    """Arrays ``train``, ``valid``, ``test`` of 0/1 pixels, square images flattened, either
    as they are ``(N, H * W)`` or bit-packed along the pixel axis as ``uint8`` ``(N, ceil(H W
    / 8))`` with the pixel count in an optional array ``pixels`` (784 when absent).

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "tiny.npz"
    >>> split = lambda n: np.random.default_rng(0).integers(0, 2, (n, 16))  # 4x4 images
    >>> np.savez(path, train=split(10), valid=split(2), test=split(2))
    >>> data = load_npz(path)
    >>> data.image_shape, tuple(data.train.shape), data.name
    ((4, 4), (10, 16), 'tiny')
    """
    path = Path(path)
    try:
        with np.load(path) as f:
            arrays = {name: f[name] for name in f.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, AttributeError) as error:
        raise ValueError(f"{str(path)!r} is not a readable .npz file: {error}") from None
    missing = [s for s in SPLITS if s not in arrays]
    if missing:
        raise ValueError(f"{str(path)!r}: missing the arrays {missing}; expected {SPLITS}")
    pixels = int(arrays.pop("pixels")) if "pixels" in arrays else None
    arrays = {s: arrays[s] for s in SPLITS}
    widths = {a.shape[1] for a in arrays.values() if a.ndim == 2}
    if len(widths) != 1 or any(a.ndim != 2 for a in arrays.values()):
        raise ValueError(f"{str(path)!r}: splits must be 2-D arrays of one width")
    (width,) = widths
    packed = arrays["train"].dtype == np.uint8 and (pixels or arrays["train"].max() > 1)
    if packed:
        pixels = pixels or 784
        arrays = {s: np.unpackbits(a, axis=1)[:, :pixels] for s, a in arrays.items()}
    else:
        pixels = width
    splits = {s: check_binary(torch.from_numpy(np.ascontiguousarray(a)), f"{path}[{s}]")
              for s, a in arrays.items()}  # fmt: skip
    return BinaryImages(**splits, image_shape=_square(pixels, path), name=path.stem)


def load_amat(folder: str | Path) -> BinaryImages:
    """``binarized_mnist_{train,valid,test}.amat``: one image per line, 784 values 0/1.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> for split in SPLITS:  # two 2x2 images a split
    ...     _ = (folder / AMAT.format(split)).write_text("0 1 1 0\\n1 1 0 0\\n")
    >>> data = load_amat(folder)
    >>> data.image_shape, data.test.tolist()
    ((2, 2), [[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    """
    folder = Path(folder)
    splits = {}
    for split in SPLITS:
        path = folder / AMAT.format(split)
        try:
            values = np.loadtxt(path, dtype=np.float32, ndmin=2)
        except ValueError as error:
            raise ValueError(f"{str(path)!r} is not an .amat file of numbers: {error}") from None
        splits[split] = check_binary(torch.from_numpy(values), str(path))
    widths = {t.shape[1] for t in splits.values()}
    if len(widths) != 1:
        raise ValueError(f"{str(folder)!r}: the .amat splits have different widths {widths}")
    return BinaryImages(**splits, image_shape=_square(widths.pop(), folder), name="mnist")


def load_idx(folder: str | Path, *, binarize: str = "static", seed: int = 0) -> BinaryImages:
    """MNIST's IDX image files (optionally gzipped): the last 10000 training images are the
    validation split; pixels are binarized with probability ``grey / 255``, statically with
    ``seed`` or (``binarize="dynamic"``) afresh each training epoch.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> def write(name, n):  # n grey 2x2 images in IDX format
    ...     header = bytes([0, 0, 8, 3]) + b"".join(k.to_bytes(4, "big") for k in (n, 2, 2))
    ...     _ = (folder / name).write_bytes(header + bytes([0, 255, 128, 64]) * n)
    >>> write(IDX["train"], MNIST_VALID + 5); write(IDX["test"], 3)
    >>> data = load_idx(folder)
    >>> len(data.train), len(data.valid), len(data.test), data.test[0, :2].tolist()
    (5, 10000, 3, [0.0, 1.0])
    """
    folder = Path(folder)
    (train, shape), (test, test_shape) = (
        _read_idx(_idx_path(folder, IDX[s])) for s in ("train", "test")
    )  # fmt: skip
    if shape != test_shape or len(train) <= MNIST_VALID:
        raise ValueError(
            f"{str(folder)!r}: expected over {MNIST_VALID} training images and test images of "
            f"the same size, got {len(train)} of {shape} and {len(test)} of {test_shape}"
        )
    generator = torch.Generator().manual_seed(seed)
    splits = {"train": train[:-MNIST_VALID], "valid": train[-MNIST_VALID:], "test": test}
    return _binarized(splits, shape, "mnist-idx", binarize, generator)


def load_digits(*, binarize: str = "static", seed: int = 0) -> BinaryImages:
    """scikit-learn's 1797 bundled 8x8 digits, grey levels 0-16 binarized with probability
    ``grey / 16``; a fixed shuffle (``seed``) gives 1397 / 200 / 200 images.

    >>> data = load_digits()
    >>> len(data.train), len(data.valid), len(data.test)
    (1397, 200, 200)
    """
    from sklearn.datasets import load_digits as sklearn_digits

    grey = torch.tensor(sklearn_digits().data, dtype=torch.float32) / 16.0
    generator = torch.Generator().manual_seed(seed)
    grey = grey[torch.randperm(len(grey), generator=generator)]
    n = len(grey) - DIGITS_VALID - DIGITS_TEST
    splits = {"train": grey[:n], "valid": grey[n:-DIGITS_TEST], "test": grey[-DIGITS_TEST:]}
    return _binarized(splits, (8, 8), "digits", binarize, generator)


def _binarized(grey: dict, shape, name: str, binarize: str, generator) -> BinaryImages:
    dynamic = binarize == "dynamic"
    splits = {
        s: x if dynamic and s == "train" else torch.bernoulli(x, generator=generator)
        for s, x in grey.items()
    }
    return BinaryImages(**splits, image_shape=shape, name=name, dynamic=dynamic)


def check_binary(x: Tensor, where: str) -> Tensor:
    """``x`` as floats, refused (naming ``where``) unless every value is 0 or 1.

    >>> check_binary(torch.tensor([0, 1, 1]), "x")
    tensor([0., 1., 1.])
    >>> check_binary(torch.tensor([0.0, 0.5]), "images.npz[train]")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: images.npz[train]: the Bernoulli decoder needs pixels that are 0 or 1, got ...
    """
    x = x.float()
    if not ((x == 0) | (x == 1)).all():
        raise ValueError(
            f"{where}: the Bernoulli decoder needs pixels that are 0 or 1, got values in "
            f"[{x.min().item():g}, {x.max().item():g}]; binarize grey images first (IDX "
            "files and the digits are binarized at load)"
        )
    return x


def _square(pixels: int, where: object) -> tuple[int, int]:
    side = math.isqrt(pixels)
    if side * side != pixels:
        raise ValueError(f"{str(where)!r}: {pixels} pixels per image is not a square image")
    return side, side


def _has_amat(folder: Path) -> bool:
    return all((folder / AMAT.format(s)).exists() for s in SPLITS)


def _idx_path(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{str(folder)!r}: no {name} (or {name}.gz)")


def _has_idx(folder: Path) -> bool:
    return all(
        (folder / n).exists() or (folder / f"{n}.gz").exists() for n in IDX.values()
    )  # fmt: skip


def _read_idx(path: Path) -> tuple[Tensor, tuple[int, int]]:
    """Grey levels in [0, 1], ``(N, rows * cols)``, and ``(rows, cols)``, from an IDX file of
    unsigned-byte images."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 16 or raw[:4] != b"\x00\x00\x08\x03":
        raise ValueError(f"{str(path)!r} is not an IDX file of unsigned-byte images")
    n, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
    if len(raw) != 16 + n * rows * cols:
        raise ValueError(f"{str(path)!r}: expected {n}x{rows}x{cols} pixels, the file is cut")
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows * cols)
    return torch.from_numpy(pixels.astype(np.float32) / 255.0), (rows, cols)
