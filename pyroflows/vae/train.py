"""Training a :class:`~pyroflows.vae.VAE` the way the flow-VAE papers do: Adamax (or Adam),
KL warm-up, free bits, early stopping on the validation ELBO, a checkpoint every epoch
written atomically, and ``resume`` that continues an interrupted run bit for bit.

Under ``torchrun`` (an initialised :mod:`torch.distributed` process group) the same call
trains data-parallel: the VAE is wrapped in ``DistributedDataParallel``, and each batch of
``batch_size`` images is dealt out over the ranks (rank ``r`` takes rows ``r, r + N, ...``)
together with its standard normal draws, which every rank draws alike. The free-bits KL
floor applies to the whole batch's mean KL (summed over the ranks first), so each step
takes the gradient of the one-process step on the same batch, to rounding. The epoch's
order comes from ``seed + epoch``, not the global generator, so checkpoints resume on any
number of processes. Rank 0 alone writes checkpoints and shows the bar.

>>> from pyroflows.vae import VAE, load
>>> data = load("digits")
>>> vae = VAE(data.image_shape, latent_dim=4, flow="iaf", num_layers=1, hidden_dim=32)
>>> run = train(vae, data, epochs=2, progress=False)
>>> len(run.history), run.stopped is None
(2, True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import _checks, _training, distributed
from .data import BinaryImages, check_binary
from .models import VAE

OPTIMIZERS = {"adamax": torch.optim.Adamax, "adam": torch.optim.Adam}
CHECKPOINT, BEST = _training.CHECKPOINT, _training.BEST


@dataclass
class Settings:
    """What a run's result depends on besides the VAE: a checkpoint records them, and
    ``resume`` refuses a checkpoint written under other settings.

    >>> Settings(epochs=10, warmup_epochs=2).optimizer
    'adamax'
    """

    epochs: int = 100
    batch_size: int = 100
    lr: float = 5e-4
    optimizer: str = "adamax"
    warmup_epochs: int = 0  # β rises linearly from 0 to 1 over these epochs, step by step
    free_bits: float = 0.0
    patience: int | None = None  # epochs without a better validation ELBO before stopping
    seed: int = 0
    # λ of a CNF posterior's RNODE terms (Finlay et al., 2020): λ (kinetic energy + Jacobian
    # Frobenius norm) per image joins the training loss, keeping the dynamics non-stiff
    regularization: float = 0.0


@dataclass
class TrainRun:
    """Per-epoch records (train loss per image, validation -ELBO per image, β; for a CNF
    posterior the mean and most function evaluations of a batch's solves), the best epoch,
    and why training ended early (``None`` when it ran every epoch).

    >>> run = TrainRun(history=[{"valid_loss": 90.0}, {"valid_loss": 88.5}], best_epoch=2)
    >>> run.best_valid
    88.5
    """

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    stopped: str | None = None

    @property
    def best_valid(self) -> float:
        return min((h["valid_loss"] for h in self.history), default=math.inf)


def train(
    vae: VAE,
    data: BinaryImages,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    **settings: Any,
) -> TrainRun:
    """Train ``vae`` on ``data`` (already on the VAE's device) with :class:`Settings`
    (``epochs``, ``batch_size``, ``lr``, ...). With ``out``, ``checkpoint.pt`` is written there
    after every epoch and ``best.pt`` whenever the validation ELBO improves; ``resume=True``
    continues from ``checkpoint.pt``. At the end the VAE holds its best parameters (by
    validation ELBO). A non-finite loss or gradient stops training with the epoch and step in
    ``stopped``, before the step is taken, and writes no checkpoint.

    >>> import tempfile
    >>> from pyroflows.vae import load
    >>> data, out = load("digits"), Path(tempfile.mkdtemp())
    >>> vae = VAE(data.image_shape, latent_dim=4, flow="planar", num_layers=1, hidden_dim=16)
    >>> run = train(vae, data, epochs=1, lr=1e-3, out=out, progress=False)
    >>> run = train(vae, data, epochs=2, lr=1e-3, out=out, resume=True, progress=False)
    >>> [h["epoch"] for h in run.history], sorted(p.name for p in out.iterdir())
    ([1, 2], ['best.pt', 'checkpoint.pt'])
    """
    config = Settings(**settings)
    _check_settings(config)
    rank, world = distributed.rank_and_world()
    if config.batch_size % world:
        raise ValueError(
            f"batch_size must be a multiple of the number of processes ({world}) so that "
            f"each takes the same share of a batch, got {config.batch_size}"
        )
    distributed.check_devices(vae.device)
    solver = _training.SolverTerms(vae.guide, config.regularization,
                                   f"{vae.config['flow']!r} posterior")  # fmt: skip
    train_x = vae.check_images(data.train, "data.train")
    vae.check_images(data.valid, "data.valid")
    for split in ("train", "valid") if not data.dynamic else ("valid",):
        check_binary(getattr(data, split), f"data.{split}")
    optimizer = OPTIMIZERS[config.optimizer](vae.parameters(), lr=config.lr)
    run, start = TrainRun(), 0
    out = Path(out) if out is not None else None
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if resume:
        run = load_checkpoint(_training.resume_from(out), vae, config, optimizer)
        start = len(run.history)
    else:
        torch.manual_seed(config.seed)
    net = vae if world == 1 else _data_parallel(vae)
    steps_per_epoch = math.ceil(len(train_x) / config.batch_size)
    warmup_steps = config.warmup_epochs * steps_per_epoch
    best_state = None  # the best parameters seen in this call
    bar = _training.progress(progress and rank == 0, config.epochs, start)
    for epoch in range(start, config.epochs):
        if _training.stalled(len(run.history), run.best_epoch, config.patience):
            run.stopped = f"early stop after epoch {epoch}: no better validation ELBO in " \
                f"{config.patience} epochs"  # fmt: skip
            break
        vae.train()
        images = data.train_epoch()
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(
            config.seed + epoch)).to(images.device)  # fmt: skip
        total, evaluations = 0.0, []
        with solver.switched_on():
            for step in range(steps_per_epoch):
                batch = images[order[step * config.batch_size : (step + 1) * config.batch_size]]
                done = epoch * steps_per_epoch + step
                beta = min(1.0, (done + 1) / warmup_steps) if warmup_steps else 1.0
                # the same noise on every rank
                noise = torch.randn(len(batch), vae.latent_dim, device=batch.device)
                solver.start_step()
                loss, value = _batch_loss(net, batch, noise, beta, config.free_bits, rank,
                                          world, solver)
                if not math.isfinite(value):
                    run.stopped = f"non-finite loss {value} at epoch {epoch + 1}, step {step + 1}"
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                name = _training.nonfinite_gradient(vae)
                if name is not None:
                    run.stopped = f"non-finite gradient of {name} at epoch {epoch + 1}, step " \
                        f"{step + 1}{_training.GRADIENT_ADVICE}"  # fmt: skip
                    break
                optimizer.step()
                total += value * len(batch)
                if solver.layers:  # the solver's work: what stiff dynamics drive up
                    evaluations.append(solver.evaluations())
                if bar is not None and step % 10 == 0:
                    shown = {"nfe": evaluations[-1]} if evaluations else {}
                    bar.set_postfix(loss=f"{value:.2f}", beta=f"{beta:.2f}", **shown,
                                    refresh=False)  # fmt: skip
        if run.stopped:
            break
        valid = validation_loss(vae, data.valid, config.batch_size)
        run.history.append({"epoch": epoch + 1, "train_loss": total / len(images),
                            "valid_loss": valid, "kl_weight": beta})  # fmt: skip
        run.history[-1] |= solver.record(evaluations)  # a CNF's evaluations per batch
        improved = _training.after_epoch(
            run, valid <= run.best_valid, vae, out if rank == 0 else None,
            lambda path: save_checkpoint(path, vae, config, optimizer, run), bar,
            valid=f"{valid:.2f}",
        )  # fmt: skip
        if improved is not None:
            best_state = improved
    if bar is not None:
        bar.close()
    # the best before resuming, where this call found none better
    _training.restore_best(vae, best_state, out, lambda path: load_checkpoint(path, vae),
                           bool(run.history))  # fmt: skip
    return run


def _batch_loss(
    net: nn.Module, batch: Tensor, noise: Tensor, beta: float, free_bits: float, rank: int,
    world: int, solver: _training.SolverTerms | None = None,
) -> tuple[Tensor, float]:  # fmt: skip
    """This rank's share of the batch loss per image, whose gradient averaged over the ranks
    (as DistributedDataParallel does) is the whole batch's, and the whole batch's value (the
    -ELBO: ``solver``'s RNODE penalty joins the loss alone)."""
    rows, weight = slice(rank, None, world), 1.0
    if rank >= len(batch):  # fewer images than ranks: a weightless row keeps this rank in step
        rows, weight = slice(0, 1), 0.0
    likelihood, kl = (weight * t for t in net(batch[rows], noise[rows]))
    sums = torch.stack([likelihood.sum(), kl.sum()]).detach()
    distributed.all_reduce_sum([sums])
    n = len(batch)
    mean_kl = sums[1].item() / n
    if free_bits and mean_kl < free_bits:  # the floor holds: no gradient to the KL
        kl_share, kl_value = 0.0, free_bits * n
    else:
        kl_share, kl_value = kl.sum(), sums[1].item()
    value = (beta * kl_value - sums[0].item()) / n
    loss = beta * kl_share - likelihood.sum()
    if solver is not None and solver.strength:
        loss = loss + weight * solver.penalty().sum()
    return loss * (world / n), value


@torch.no_grad()
def validation_loss(vae: VAE, x: Tensor, batch_size: int = 1000) -> float:
    """-ELBO per image (one draw per image, β = 1, no free bits), shared out over the
    ranks of a process group as in training.

    >>> from pyroflows.vae import load
    >>> data = load("digits")
    >>> vae = VAE(data.image_shape, latent_dim=4, flow="none", hidden_dim=16)
    >>> 0 < validation_loss(vae, data.valid) < 64 * 2  # about 64 log 2 nats untrained
    True
    """
    vae.eval()
    rank, world = distributed.rank_and_world()
    total = torch.zeros((), device=x.device)
    for i in range(0, len(x), batch_size):
        batch = x[i : i + batch_size]
        noise = torch.randn(len(batch), vae.latent_dim, device=x.device)
        if rank < len(batch):
            likelihood, kl = vae(batch[rank::world], noise[rank::world])
            total += (kl - likelihood).sum()
    distributed.all_reduce_sum([total])
    return total.item() / len(x)


def _data_parallel(vae: VAE) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    devices = [vae.device] if vae.device.type == "cuda" else None
    return DistributedDataParallel(vae, device_ids=devices)


def save_checkpoint(path: Path, vae: VAE, config: Settings, optimizer, run: TrainRun) -> None:
    """Everything ``resume`` needs, written atomically (:func:`pyroflows._training.save_run`).

    >>> import tempfile
    >>> vae, path = VAE((8, 8), latent_dim=2, hidden_dim=8), Path(tempfile.mkdtemp()) / "v.pt"
    >>> save_checkpoint(path, vae, Settings(), torch.optim.Adamax(vae.parameters()), TrainRun())
    >>> load_checkpoint(path, VAE((8, 8), latent_dim=2, hidden_dim=8)).history
    []
    """
    _training.save_run(
        path, "vae", vae, vae.config, asdict(config), optimizer, run.history, run.best_epoch
    )


def load_checkpoint(path: Path, vae: VAE, config: Settings | None = None, optimizer=None):
    """Restore ``vae`` (and, given them, the optimizer and the random state) from ``path``,
    after checking that it was written for the same VAE and, with ``config``, the same
    settings but for ``epochs`` and ``patience``.

    >>> import tempfile
    >>> vae, path = VAE((8, 8), latent_dim=2, hidden_dim=8), Path(tempfile.mkdtemp()) / "v.pt"
    >>> save_checkpoint(path, vae, Settings(), torch.optim.Adamax(vae.parameters()), TrainRun())
    >>> load_checkpoint(path, VAE((8, 8), latent_dim=3, hidden_dim=8))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: '...v.pt' was written for a different VAE (latent_dim: 2 there, 3 here)
    """
    settings = None if config is None else asdict(config)
    history, best = _training.load_run(
        path, "vae", vae, vae.config, vae.device, settings, optimizer, what="VAE",
        defaults=asdict(Settings()),
    )
    return TrainRun(history=history, best_epoch=best)


def _check_settings(config: Settings) -> None:
    _checks.positive_int("epochs", config.epochs)
    _checks.positive_int("batch_size", config.batch_size)
    _checks.positive_number("lr", config.lr)
    _checks.one_of("optimizer", config.optimizer, OPTIMIZERS)
    _checks.nonnegative_int("warmup_epochs", config.warmup_epochs)
    _checks.nonnegative_number("free_bits", config.free_bits)
    if config.patience is not None:
        _checks.positive_int("patience", config.patience)
    _checks.nonnegative_number("regularization", config.regularization)
