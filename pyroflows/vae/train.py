"""Training a :class:`~pyroflows.vae.VAE` the way the flow-VAE papers do: Adamax (or Adam),
KL warm-up, free bits, early stopping on the validation ELBO, a checkpoint every epoch
written atomically, and ``resume`` that continues an interrupted run bit for bit.

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
from torch import Tensor

from .. import _checks, _training
from .data import BinaryImages, check_binary
from .models import VAE

OPTIMIZERS = {"adamax": torch.optim.Adamax, "adam": torch.optim.Adam}
CHECKPOINT, BEST = _training.CHECKPOINT, _training.BEST


@dataclass
class Settings:
    """What a run's result depends on besides the VAE: a checkpoint records them, and
    ``resume`` refuses a checkpoint written under other settings."""

    epochs: int = 100
    batch_size: int = 100
    lr: float = 5e-4
    optimizer: str = "adamax"
    warmup_epochs: int = 0  # β rises linearly from 0 to 1 over these epochs, step by step
    free_bits: float = 0.0
    patience: int | None = None  # epochs without a better validation ELBO before stopping
    seed: int = 0


@dataclass
class TrainRun:
    """Per-epoch records (train loss per image, validation -ELBO per image, β), the best
    epoch, and why training ended early (``None`` when it ran every epoch)."""

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
    validation ELBO). A non-finite loss stops training with the epoch and step in
    ``stopped``, before the step is taken, and writes no checkpoint."""
    config = Settings(**settings)
    _check_settings(config)
    train_x = vae.check_images(data.train, "data.train")
    vae.check_images(data.valid, "data.valid")
    for split in ("train", "valid") if not data.dynamic else ("valid",):
        check_binary(getattr(data, split), f"data.{split}")
    optimizer = OPTIMIZERS[config.optimizer](vae.parameters(), lr=config.lr)
    run, start = TrainRun(), 0
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if resume:
        run = load_checkpoint(_training.resume_from(out), vae, config, optimizer)
        start = len(run.history)
    else:
        torch.manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(train_x) / config.batch_size)
    warmup_steps = config.warmup_epochs * steps_per_epoch
    best_state = None  # the best parameters seen in this call
    bar = _training.progress(progress, config.epochs, start)
    for epoch in range(start, config.epochs):
        if _training.stalled(len(run.history), run.best_epoch, config.patience):
            run.stopped = f"early stop after epoch {epoch}: no better validation ELBO in " \
                f"{config.patience} epochs"  # fmt: skip
            break
        vae.train()
        images = data.train_epoch()
        order = torch.randperm(len(images), device=images.device)
        total = 0.0
        for step in range(steps_per_epoch):
            batch = images[order[step * config.batch_size : (step + 1) * config.batch_size]]
            done = epoch * steps_per_epoch + step
            beta = min(1.0, (done + 1) / warmup_steps) if warmup_steps else 1.0
            loss = vae.loss(batch, kl_weight=beta, free_bits=config.free_bits) / len(batch)
            if not torch.isfinite(loss):
                run.stopped = f"non-finite loss {loss.item()} at epoch {epoch + 1}, step {step + 1}"
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            if bar is not None and step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.2f}", beta=f"{beta:.2f}", refresh=False)
        if run.stopped:
            break
        valid = validation_loss(vae, data.valid, config.batch_size)
        run.history.append({"epoch": epoch + 1, "train_loss": total / len(images),
                            "valid_loss": valid, "kl_weight": beta})  # fmt: skip
        improved = _training.after_epoch(
            valid <= run.best_valid, vae, out,
            lambda path: save_checkpoint(path, vae, config, optimizer, run), bar,
            valid=f"{valid:.2f}",
        )  # fmt: skip
        if improved is not None:
            run.best_epoch, best_state = epoch + 1, improved
    if bar is not None:
        bar.close()
    # the best before resuming, where this call found none better
    _training.restore_best(vae, best_state, out, lambda path: load_checkpoint(path, vae),
                           bool(run.history))  # fmt: skip
    return run


@torch.no_grad()
def validation_loss(vae: VAE, x: Tensor, batch_size: int = 1000) -> float:
    """-ELBO per image (one draw per image, β = 1, no free bits)."""
    vae.eval()
    total = sum(vae.loss(x[i : i + batch_size]).item() for i in range(0, len(x), batch_size))
    return total / len(x)


def save_checkpoint(path: Path, vae: VAE, config: Settings, optimizer, run: TrainRun) -> None:
    """Everything ``resume`` needs, written atomically (:func:`pyroflows._training.save_run`)."""
    _training.save_run(
        path, "vae", vae, vae.config, asdict(config), optimizer, run.history, run.best_epoch
    )


def load_checkpoint(path: Path, vae: VAE, config: Settings | None = None, optimizer=None):
    """Restore ``vae`` (and, given them, the optimizer and the random state) from ``path``,
    after checking that it was written for the same VAE and, with ``config``, the same
    settings but for ``epochs`` and ``patience``."""
    settings = None if config is None else asdict(config)
    history, best = _training.load_run(
        path, "vae", vae, vae.config, vae.device, settings, optimizer, what="VAE"
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
