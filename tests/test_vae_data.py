"""The VAE's data loaders on small files in each format, and every bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from pyroflows.vae import VAE, BinaryImages, load, train
from pyroflows.vae.data import load_amat, load_idx, load_npz

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist.npz"


def _images(n: int, pixels: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, size=(n, pixels), dtype=np.uint8)


def test_npz_plain_and_bit_packed(tmp_path):
    splits = {"train": _images(6), "valid": _images(3, seed=1), "test": _images(2, seed=2)}
    np.savez(tmp_path / "plain.npz", **splits)
    packed = {k: np.packbits(v, axis=1) for k, v in splits.items()}
    np.savez(tmp_path / "packed.npz", **packed, pixels=16)
    for name in ("plain.npz", "packed.npz"):
        data = load(tmp_path / name)
        assert data.image_shape == (4, 4) and not data.dynamic
        for split, x in splits.items():
            assert torch.equal(getattr(data, split), torch.from_numpy(x).float())


def test_amat_text_files(tmp_path):
    splits = {"train": _images(5), "valid": _images(2, seed=1), "test": _images(3, seed=2)}
    for split, x in splits.items():
        np.savetxt(tmp_path / f"binarized_mnist_{split}.amat", x, fmt="%d")
    data = load(tmp_path)
    assert data.image_shape == (4, 4) and len(data.valid) == 2
    assert torch.equal(data.test, torch.from_numpy(splits["test"]).float())


def _write_idx(path: Path, grey: np.ndarray, compress: bool) -> None:
    n, rows, cols = grey.shape
    raw = b"\x00\x00\x08\x03" + b"".join(v.to_bytes(4, "big") for v in (n, rows, cols))
    raw += grey.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(raw)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_files_binarized_statically_or_each_epoch(tmp_path, compress, monkeypatch):
    monkeypatch.setattr("pyroflows.vae.data.MNIST_VALID", 4)
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(10, 3, 3))
    grey[:, 0, 0] = 0  # always off
    grey[:, 0, 1] = 255  # always on
    suffix = ".gz" if compress else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", grey, compress)
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", grey[:3], compress)
    static = load_idx(tmp_path, seed=1)
    assert static.image_shape == (3, 3) and [len(static.train), len(static.valid)] == [6, 4]
    assert set(static.train.unique().tolist()) <= {0.0, 1.0}
    assert (static.train[:, 0] == 0).all() and (static.train[:, 1] == 1).all()
    assert torch.equal(static.train, load_idx(tmp_path, seed=1).train)  # the seed fixes it
    assert not torch.equal(static.train, load_idx(tmp_path, seed=2).train)
    dynamic = load(tmp_path, binarize="dynamic")
    expected = torch.tensor(grey[0] / 255.0, dtype=torch.float32).flatten()
    assert dynamic.dynamic and torch.allclose(dynamic.train[0], expected)
    first, second = dynamic.train_epoch(), dynamic.train_epoch()
    assert set(first.unique().tolist()) <= {0.0, 1.0} and not torch.equal(first, second)


def test_digits_are_the_embedded_default():
    data = load("digits")
    assert data.image_shape == (8, 8)
    assert [len(data.train), len(data.valid), len(data.test)] == [1397, 200, 200]
    assert torch.equal(data.train, load("digits").train)


def test_mnist_by_name_reads_the_folder_in_pyroflows_data(tmp_path, monkeypatch):
    monkeypatch.setenv("PYROFLOWS_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"set PYROFLOWS_DATA"):
        load("mnist")
    np.savez(tmp_path / "binarized_mnist.npz", train=_images(4), valid=_images(2), test=_images(2))
    assert len(load("mnist").train) == 4


@pytest.mark.skipif(not MNIST.exists(), reason=f"statically binarized MNIST not at {MNIST}")
def test_the_shared_binarized_mnist():
    data = load_npz(MNIST)
    assert data.image_shape == (28, 28)
    assert [len(data.train), len(data.valid), len(data.test)] == [50000, 10000, 10000]
    assert abs(data.train.mean().item() - 0.1306) < 1e-4


def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"neither 'digits', 'mnist', nor an existing"):
        load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"holds neither binarized_mnist"):
        load(tmp_path)
    (tmp_path / "x.txt").write_text("1 0")
    with pytest.raises(ValueError, match=r"expected an .npz file or a folder"):
        load(tmp_path / "x.txt")
    (tmp_path / "broken.npz").write_bytes(b"PK not really")
    with pytest.raises(ValueError, match=r"broken.npz' is not a readable .npz"):
        load_npz(tmp_path / "broken.npz")
    np.savez(tmp_path / "two.npz", train=_images(2), valid=_images(2))
    with pytest.raises(ValueError, match=r"missing the arrays \['test'\]"):
        load_npz(tmp_path / "two.npz")
    np.savez(tmp_path / "grey.npz", train=_images(2) * 0.5, valid=_images(2), test=_images(2))
    with pytest.raises(ValueError, match=r"grey.npz\[train\]: the Bernoulli decoder needs"):
        load_npz(tmp_path / "grey.npz")
    np.savez(tmp_path / "odd.npz", train=_images(2, 15), valid=_images(2, 15), test=_images(2, 15))
    with pytest.raises(ValueError, match=r"15 pixels per image is not a square image"):
        load_npz(tmp_path / "odd.npz")
    for split in ("train", "valid", "test"):
        (tmp_path / f"binarized_mnist_{split}.amat").write_text("0 1 x\n")
    with pytest.raises(ValueError, match=r"is not an .amat file of numbers"):
        load_amat(tmp_path)
    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + bytes(12))
    (idx / "t10k-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(ValueError, match=r"is not an IDX file of unsigned-byte images"):
        load(idx)
    with pytest.raises(ValueError, match=r"binarize must be one of"):
        load("digits", binarize="threshold")


def test_inconsistent_files_get_clear_errors(tmp_path, monkeypatch):
    np.savez(tmp_path / "widths.npz", train=_images(2), valid=_images(2, 9), test=_images(2))
    with pytest.raises(ValueError, match=r"widths.npz': splits must be 2-D arrays of one width"):
        load_npz(tmp_path / "widths.npz")
    amat = tmp_path / "amat"
    amat.mkdir()
    for split, pixels in (("train", 16), ("valid", 16), ("test", 9)):
        np.savetxt(amat / f"binarized_mnist_{split}.amat", _images(2, pixels), fmt="%d")
    with pytest.raises(ValueError, match=r"the .amat splits have different widths"):
        load_amat(amat)
    monkeypatch.setattr("pyroflows.vae.data.MNIST_VALID", 4)
    grey = np.random.default_rng(0).integers(0, 256, size=(10, 3, 3))
    idx = tmp_path / "idx"
    idx.mkdir()
    _write_idx(idx / "train-images-idx3-ubyte", grey, False)
    with pytest.raises(FileNotFoundError, match=r"no t10k-images-idx3-ubyte \(or .*\.gz\)"):
        load_idx(idx)
    _write_idx(idx / "t10k-images-idx3-ubyte", grey[:3, :2], False)  # 3x2, not 3x3
    with pytest.raises(ValueError, match=r"expected over 4 training images and test images of"):
        load_idx(idx)
    _write_idx(idx / "t10k-images-idx3-ubyte", grey[:3], False)
    cut = (idx / "t10k-images-idx3-ubyte").read_bytes()[:-5]
    (idx / "t10k-images-idx3-ubyte").write_bytes(cut)
    with pytest.raises(ValueError, match=r"expected 3x3x3 pixels, the file is cut"):
        load_idx(idx)


def test_bad_model_inputs_get_clear_errors():
    with pytest.raises(ValueError, match=r"architecture='conv' is built for 28x28 images"):
        VAE((8, 8), architecture="conv")
    with pytest.raises(ValueError, match=r"flow must be one of"):
        VAE((8, 8), flow="maf-x")
    with pytest.raises(ValueError, match=r"image_shape must be \(height, width\)"):
        VAE((8, 8, 1))
    vae = VAE((8, 8), latent_dim=2, hidden_dim=8, flow="none")
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 64\) for 8x8 images"):
        vae.check_images(torch.zeros(3, 784))
    grey = BinaryImages(torch.full((4, 64), 0.5), torch.zeros(2, 64), torch.zeros(2, 64), (8, 8),
                        "grey")  # fmt: skip
    with pytest.raises(ValueError, match=r"data.train: the Bernoulli decoder needs pixels"):
        train(vae, grey, epochs=1, progress=False)
    small = BinaryImages(torch.zeros(4, 16), torch.zeros(2, 16), torch.zeros(2, 16), (4, 4), "s")
    with pytest.raises(ValueError, match=r"data.train must have shape \(batch, 64\)"):
        train(vae, small, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"optimizer must be one of"):
        train(vae, load("digits"), epochs=1, optimizer="sgd", progress=False)


def test_the_gated_convolutional_vae_on_28x28_images():
    vae = VAE((28, 28), latent_dim=4, flow="sylvester-o", num_layers=1, architecture="conv")
    x = torch.bernoulli(torch.full((3, 784), 0.2))
    loss = vae.loss(x)
    loss.backward()
    assert loss.shape == () and vae.sample(2).shape == (2, 784)
    assert all(p.grad is not None for p in vae.parameters())
