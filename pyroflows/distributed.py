"""Work sharded over the processes of :mod:`torch.distributed` (launched by ``torchrun``),
with results that do not depend on how many processes there are.

:func:`pyroflows.vae.train` trains data-parallel (each batch and its noise dealt out over the
ranks, ``DistributedDataParallel``; see its module). :func:`pyroflows.fit` of a log density
splits each step's particles over the ranks: every rank draws the same base noise (the same
seed), pushes its share through the flow, evaluates the target there (the expensive part),
and the gradients are summed over the ranks, so each step is the one-process step (to
rounding; tested with two gloo processes). A Pyro model's particles are drawn afresh on each
rank instead. :func:`from_environment` joins the group that ``torchrun`` describes.

``log_marginal_likelihood`` splits the data into batches, draws batch ``b``'s importance
samples from the seed ``seed + b``, deals the batches round-robin to the ranks and gathers
the per-datum estimates back in the data's order on every rank. One process computes every
batch with the same seeds, so one process and ``N`` processes agree to rounding (tested with
two gloo processes). Without an initialised process group it runs in this process alone.

>>> import pyro, pyro.distributions as dist
>>> from pyroflows.vae import VAE
>>> vae = VAE((2, 2), latent_dim=2, flow="planar", num_layers=1, hidden_dim=8)
>>> x = torch.bernoulli(torch.full((5, 4), 0.5))
>>> a = log_marginal_likelihood(vae.model, vae.guide, x, num_samples=50, batch_size=2)
>>> b = log_marginal_likelihood(vae.model, vae.guide, x, num_samples=50, batch_size=2)
>>> a.log_px.shape, bool(torch.equal(a.log_px, b.log_px))
(torch.Size([5]), True)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import _checks
from ._random import seeded
from .infer.evaluation import LogMarginal, warn_if_few
from .infer.evaluation import log_marginal_likelihood as _log_marginal_likelihood

BACKENDS = {"cuda": "nccl", "cpu": "gloo"}
ESS_WARNING = "log_marginal_likelihood: importance ESS below"


@contextmanager
def from_environment(device: torch.device) -> Iterator[torch.device]:
    """Join, for the ``with`` block, the process group that ``torchrun`` describes in the
    environment (``WORLD_SIZE`` above 1), with the backend that suits ``device``: NCCL for
    CUDA, gloo for the CPU. Yields this process's device: ``cuda:LOCAL_RANK`` for CUDA,
    ``device`` otherwise. Without ``WORLD_SIZE`` (one process), or with a group already
    initialised, nothing is joined.

    >>> with from_environment(torch.device("cpu")) as device:  # one process
    ...     device
    device(type='cpu')
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        yield device
        return
    if device.type not in BACKENDS:
        raise ValueError(f"device must be cpu or cuda to run on {world} processes, got {device}")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world} is set but not {', '.join(missing)}: launch with torchrun "
            "(or set the rendezvous variables yourself)"
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(BACKENDS[device.type])
    try:
        yield device
        dist.barrier()  # no rank tears its connections down while another still works
    finally:
        dist.destroy_process_group()


def check_devices(device: torch.device) -> None:
    """A clear error where the ranks hold their modules on different kinds of device, or
    where the backend cannot carry this device's tensors (NCCL needs CUDA).

    >>> check_devices(torch.device("cpu"))  # one process: nothing to compare
    """
    world = rank_and_world()[1]
    if world == 1:
        return
    kinds: list[str | None] = [None] * world
    dist.all_gather_object(kinds, device.type)
    if len(set(kinds)) > 1:
        where = ", ".join(f"{kind} on rank {r}" for r, kind in enumerate(kinds))
        raise ValueError(f"every process must use the same kind of device, got {where}")
    if dist.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError(
            f"the process group's backend is nccl, which needs CUDA tensors, but the device "
            f"is {device}: use device='cuda' or init_process_group('gloo')"
        )


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (``(0, 1)`` without a process
    group).

    >>> rank_and_world()
    (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def log_marginal_likelihood(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    num_samples: int = 5000,
    chunk_size: int = 500,
    batch_size: int = 100,
    seed: int = 0,
    max_plate_nesting: int | None = 1,
    progress: bool = False,
) -> LogMarginal:
    """Per-datum :func:`pyroflows.infer.log_marginal_likelihood` of a model called as
    ``model(x)``, whose data plate runs over the first dimension of ``x`` (a VAE), computed
    ``batch_size`` rows at a time and sharded over the ranks of the process group (see the
    module docstring). ``max_plate_nesting`` defaults to 1, the data plate; ``progress``
    shows a bar over this rank's batches. Every rank returns the whole result on ``x``'s
    device; rank 0 alone warns where the importance ESS is low.

    >>> from pyroflows.vae import VAE
    >>> vae = VAE((2, 2), latent_dim=2, flow="none", hidden_dim=8)
    >>> x = torch.bernoulli(torch.full((5, 4), 0.5))
    >>> r = log_marginal_likelihood(vae.model, vae.guide, x, num_samples=20, batch_size=2)
    >>> r.log_px.shape, r.stderr.shape  # per image, whatever the batches
    (torch.Size([5]), torch.Size([5]))
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor of data rows, got {type(x).__name__}")
    _checks.positive_int("batch_size", batch_size)
    rank, world = rank_and_world()
    starts = list(range(0, len(x), batch_size))[rank::world]
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="log p(x)", unit="batch", disable=rank != 0)
    mine = {}
    for start in starts:
        with seeded(seed + start // batch_size, x.device), warnings.catch_warnings():
            warnings.filterwarnings("ignore", ESS_WARNING)  # one for every batch, below
            r = _log_marginal_likelihood(
                model, guide, x[start : start + batch_size], num_samples=num_samples,
                chunk_size=chunk_size, max_plate_nesting=max_plate_nesting,
            )  # fmt: skip
        mine[start] = [t.cpu() for t in r]
    parts = _gathered(mine, world)
    fields = zip(*(parts[start] for start in sorted(parts)), strict=True)
    result = LogMarginal(*(torch.cat(f).to(x.device) for f in fields))
    if rank == 0:  # one warning for the whole result, like the one progress bar
        warn_if_few(result.ess, num_samples, stacklevel=4)
    return result


def all_reduce_sum(tensors: list[Tensor]) -> None:
    """Sum each tensor over the ranks, in place (nothing without a process group).

    >>> total = torch.tensor([1.0, 2.0])
    >>> all_reduce_sum([total]); total  # one process: unchanged
    tensor([1., 2.])
    """
    if rank_and_world()[1] > 1:
        for t in tensors:
            dist.all_reduce(t)


def _gathered(mine: dict[int, Any], world: int) -> dict[int, Any]:
    if world == 1:
        return mine
    everyone: list[dict[int, Any] | None] = [None] * world
    dist.all_gather_object(everyone, mine)
    return {k: v for part in everyone for k, v in (part or {}).items()}
