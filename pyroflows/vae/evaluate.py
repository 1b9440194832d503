"""Test figures of a trained :class:`~pyroflows.vae.VAE`: -ELBO and the importance-sampled
negative log-likelihood (the papers' NLL, K = 5000), and image grids.

>>> from pyroflows.vae import VAE
>>> vae = VAE((8, 8), latent_dim=2, flow="planar", num_layers=1, hidden_dim=16)
>>> x = torch.bernoulli(torch.full((4, 64), 0.5))
>>> r = evaluate(vae, x, num_samples=200)
>>> sorted(r), r["nll"] <= r["neg_elbo"] + 1.0
(['images', 'neg_elbo', 'nll', 'nll_stderr', 'num_samples'], True)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from .. import _checks, distributed, plots
from .models import VAE

# draws x images per chunk on a CPU: about the most whose tensors stay in cache
CPU_CHUNK_ROWS = 2000


@torch.no_grad()
def evaluate(
    vae: VAE,
    x: Tensor,
    num_samples: int = 5000,
    batch_size: int = 100,
    chunk_size: int | None = None,
    progress: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """On the images ``x``, from :func:`~pyroflows.infer.log_marginal_likelihood` with
    ``num_samples`` importance samples per image drawn ``chunk_size`` at a time,
    ``batch_size`` images at a time: ``neg_elbo``, -ELBO per image (the mean log weight),
    and ``nll``, ``-log p(x)`` per image, with its standard error ``nll_stderr``. The batches
    draw from ``seed`` on and are shared out over the processes of ``torch.distributed``
    when it runs (:func:`pyroflows.distributed.log_marginal_likelihood`): the figures are the
    same for any number of processes. A CNF posterior trained on Hutchinson's trace estimate
    is evaluated with the exact trace, as :func:`pyroflows.infer.log_marginal_likelihood`
    does.
    ``chunk_size`` defaults to 500 on a GPU, where large chunks make full kernels, and on a
    CPU to ``2000 // batch_size`` (20 for batches of 100), so that a chunk's tensors stay in
    cache: 0.61-0.66 times the time of chunks of 500 at one thread, with a 25th of the memory
    (``benchmarks/eval_chunks.py``).

    >>> from pyroflows.vae import load
    >>> data = load("digits")
    >>> vae = VAE(data.image_shape, latent_dim=4, flow="iaf", num_layers=1, hidden_dim=16)
    >>> r = evaluate(vae, data.test[:20], num_samples=100)
    >>> r["nll"] <= r["neg_elbo"], r["images"]  # log p(x) estimates bound the ELBO from above
    (True, 20)
    """
    x = vae.check_images(x)
    _checks.positive_int("num_samples", num_samples)
    _checks.positive_int("batch_size", batch_size)
    if chunk_size is None:
        chunk_size = 500 if x.device.type == "cuda" else max(1, CPU_CHUNK_ROWS // batch_size)
    vae.eval()
    r = distributed.log_marginal_likelihood(
        vae.model, vae.guide, x, num_samples=num_samples, chunk_size=chunk_size,
        batch_size=batch_size, seed=seed, progress=progress,
    )  # fmt: skip
    n = len(x)
    return {
        "neg_elbo": -r.elbo.sum().item() / n,
        "nll": -r.log_px.mean().item(),
        "nll_stderr": r.stderr.square().sum().sqrt().item() / n if num_samples > 1 else math.nan,
        "num_samples": num_samples,
        "images": n,
    }


@torch.no_grad()
def save_figures(
    vae: VAE, x: Tensor, out: str | Path, num_images: int = 64, prefix: str = ""
) -> list[Path]:  # fmt: skip
    """``samples.png`` (``num_images`` images decoded from the prior) and
    ``reconstructions.png`` (the first 32 of ``x`` above, one posterior reconstruction of
    each below), their names after ``prefix``, in the folder ``out``; returns their paths.

    >>> import tempfile
    >>> vae = VAE((8, 8), latent_dim=2, hidden_dim=8)
    >>> paths = save_figures(vae, torch.zeros(4, 64), tempfile.mkdtemp(), prefix="untrained-")
    >>> [p.name for p in paths]
    ['untrained-samples.png', 'untrained-reconstructions.png']
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x = vae.check_images(x)[:32]
    shape = vae.image_shape
    samples, reconstructions = out / f"{prefix}samples.png", out / f"{prefix}reconstructions.png"
    plots.plot_images([vae.sample(num_images)], shape, samples, math.ceil(num_images**0.5))
    plots.plot_images([x, vae.reconstruct(x)], shape, reconstructions, 16)
    return [samples, reconstructions]
