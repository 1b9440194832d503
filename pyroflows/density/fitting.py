"""Maximum-likelihood (forward-KL) fitting of a flow to data.

``fit_data`` minimises the mean negative log-likelihood ``-E_data[log p(x)]``, i.e. the
forward KL ``KL(p_data || p)`` up to a constant: the fit covers every mode of the data, where
a reverse-KL fit (:func:`pyroflows.fit`) may drop some. Early stopping watches the held-out
negative log-likelihood; a checkpoint is written atomically every epoch, and ``resume``
continues an interrupted run bit for bit.

>>> import torch
>>> x = torch.randn(500, 2) @ torch.tensor([[1.0, 0.9], [0.0, 0.4]])
>>> result = fit_data(x, flow="maf", num_layers=2, epochs=3, progress=False)
>>> len(result.history), result.model.log_prob(x[:4]).shape
(3, torch.Size([4]))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import _checks, _training
from . import training_data
from .model import LOG_2, DensityModel
from .training_data import Batches

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@dataclass
class Settings:
    """What a fit depends on besides the model (:func:`fit_data`'s training arguments);
    ``resume`` refuses other settings but for ``epochs`` and ``patience``.

    >>> Settings(epochs=20).patience
    10
    """

    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    patience: int | None = 10  # epochs without a better validation loss before stopping
    seed: int = 0
    # λ of a CNF's RNODE terms (Finlay et al., 2020): λ (kinetic energy + Jacobian Frobenius
    # norm) per row joins the training loss, keeping the dynamics non-stiff
    regularization: float = 0.0


@dataclass
class DensityFit:
    """The fitted model (at its best validation epoch) and the per-epoch record: training
    and validation negative log-likelihood in nats per row, and bits per dimension for
    discrete data; ``stopped`` says why training ended early.

    >>> fit = fit_data(torch.randn(200, 2), "realnvp", num_layers=2, epochs=2, progress=False)
    >>> fit.best_epoch in (1, 2), sorted(fit.history[-1])
    (True, ['epoch', 'train_nll', 'valid_nll'])
    """

    model: DensityModel
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    stopped: str | None = None


def fit_data(
    x: Batches,
    flow: str = "maf",
    *,
    context: Tensor | None = None,
    valid: Batches | None = None,
    valid_context: Tensor | None = None,
    valid_fraction: float = 0.1,
    dequantize: str | None = None,
    levels: int | None = None,
    alpha: float = 0.05,
    dequantizer: dict[str, Any] | None = None,
    num_layers: int = 4,
    standardize: bool = True,
    device: str | torch.device | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    patience: int | None = 10,
    seed: int = 0,
    regularization: float = 0.0,
    **flow_options: Any,
) -> DensityFit:
    """Fit ``flow`` (a recipe name) to the rows of ``x`` by maximum likelihood.

    ``x``: a tensor ``(N, *features)`` (features are flattened), or an iterable of batches
    (a ``DataLoader``) yielding tensors or ``(x, context)`` pairs; ``context`` (rows
    matching ``x``) makes it a conditional density estimate ``p(x | context)``.
    ``valid`` (tensor or batches) is held out for early stopping; without it a tensor ``x``
    gives up ``valid_fraction`` of its rows (a seeded shuffle), and batches of ``x`` train
    every epoch without early stopping.

    ``dequantize="uniform"`` or ``"variational"`` with ``levels`` fits discrete data on
    ``{0, ..., levels - 1}`` (see :class:`~pyroflows.density.Dequantization`; ``alpha`` is
    its logit margin, ``dequantizer`` the options of its noise flow). ``standardize`` sets the
    model's affine map from the training rows first. Training: ``epochs`` of Adam
    (``optimizer="adamw"`` with ``weight_decay``) at ``lr`` over shuffled batches of
    ``batch_size``, stopped after ``patience`` epochs without a better validation loss
    (``None``: never), from ``seed``; ``flow_options`` go to the recipe. Standardization uses
    the training tensor, or a loader's first batch. ``regularization`` λ adds a ``cnf``'s
    RNODE terms, λ (kinetic energy + Jacobian Frobenius norm) per row, to the training loss
    (not to the recorded likelihoods): fewer solver steps for some likelihood; the record
    holds the solver's evaluations per batch (``nfe_mean``, ``nfe_max``) of any ``cnf``.
    With ``out`` the checkpoints
    ``checkpoint.pt`` (every epoch) and ``best.pt`` are written there; ``resume=True``
    continues from ``checkpoint.pt``. A non-finite loss or gradient stops training before
    its update, with the epoch and step in ``stopped``, and writes no checkpoint.

    >>> _ = torch.manual_seed(0)
    >>> x = torch.randn(500, 2) @ torch.tensor([[1.0, 0.9], [0.0, 0.4]])  # correlated
    >>> fit = fit_data(x, "realnvp", num_layers=2, epochs=5, progress=False)
    >>> fit.model.log_prob(x[:3]).shape, len(fit.history)
    (torch.Size([3]), 5)
    """
    config = Settings(epochs, batch_size, lr, optimizer, weight_decay, patience, seed,
                      regularization)
    _check_settings(config)
    dev = _checks.device("device", device) if device is not None else torch.device("cpu")
    torch.manual_seed(config.seed)
    train, valid, context, valid_context = training_data.split(
        x, context, valid, valid_context, valid_fraction
    )
    first, first_context = training_data.first_rows(train, context)
    model = DensityModel(
        first.shape[-1], flow, num_layers,
        context_dim=0 if first_context is None else first_context.shape[-1],
        dequantize=dequantize, levels=levels, alpha=alpha, dequantizer=dequantizer,
        **flow_options,
    ).to(dev)  # fmt: skip
    if isinstance(train, Tensor):  # checked and moved once; batches are checked as they come
        train, context = training_data.on_device(model, train, context, "x")
        first = train
    else:
        first, _ = training_data.on_device(model, first, first_context, "x")
    if isinstance(valid, Tensor):
        valid, valid_context = training_data.on_device(model, valid, valid_context, "valid")
    if standardize:
        model.standardize(first)
    return _train(model, train, context, valid, valid_context, config, out, resume, progress)


def _train(model, train, context, valid, valid_context, config, out, resume, progress):
    optimizer = OPTIMIZERS[config.optimizer](
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    result, start = DensityFit(model), 0
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if resume:
        result = load_checkpoint(_training.resume_from(out), model, config, optimizer)
        start = len(result.history)
    best_state = None
    solver = _training.SolverTerms(model, config.regularization, f"{model.config['flow']!r} model")
    bar = _training.progress(progress, config.epochs, start)
    for epoch in range(start, config.epochs):
        if _training.stalled(len(result.history), result.best_epoch, config.patience):
            result.stopped = (f"early stop after epoch {epoch}: no better validation loss in "
                              f"{config.patience} epochs")  # fmt: skip
            break
        model.train()
        total, rows, evaluations = 0.0, 0, []
        batches = training_data.batches(model, train, context, config.batch_size, "x")
        with solver.switched_on():
            for step, (x, c) in enumerate(batches):
                if not isinstance(train, Tensor):
                    x = model.check(x, c)
                solver.start_step()
                nll = -model.log_prob(x, c).mean()
                if not torch.isfinite(nll):
                    result.stopped = (f"non-finite loss {nll.item()} at epoch {epoch + 1}, "
                                      f"step {step + 1}")  # fmt: skip
                    break
                optimizer.zero_grad(set_to_none=True)
                (nll + solver.penalty().mean() if solver.strength else nll).backward()
                name = _training.nonfinite_gradient(model)
                if name is not None:
                    result.stopped = (f"non-finite gradient of {name} at epoch {epoch + 1}, "
                                      f"step {step + 1}{_training.GRADIENT_ADVICE}")  # fmt: skip
                    break
                optimizer.step()
                total, rows = total + nll.item() * len(x), rows + len(x)
                if solver.layers:
                    evaluations.append(solver.evaluations())
                if bar is not None and step % 10 == 0:
                    shown = {"nfe": evaluations[-1]} if evaluations else {}
                    bar.set_postfix(nll=f"{nll.item():.3f}", **shown, refresh=False)
        if result.stopped:
            break
        record = {"epoch": epoch + 1, "train_nll": total / max(rows, 1),
                  **solver.record(evaluations)}  # fmt: skip
        if valid is not None:
            record["valid_nll"] = validation_nll(model, valid, valid_context, config.batch_size)
        if model.discrete:
            for key in [k for k in record if k.endswith("nll")]:
                record[key.replace("nll", "bits_per_dim")] = record[key] / (model.dim * LOG_2)
        result.history.append(record)
        score = record.get("valid_nll", record["train_nll"])
        improved = _training.after_epoch(
            result, score <= min(h.get("valid_nll", h["train_nll"]) for h in result.history),
            model, out, lambda path: save_checkpoint(path, model, config, optimizer, result),
            bar, nll=f"{score:.3f}",
        )  # fmt: skip
        if improved is not None:
            best_state = improved
    if bar is not None:
        bar.close()
    _training.restore_best(model, best_state, out, lambda path: load_checkpoint(path, model),
                           bool(result.history))  # fmt: skip
    model.eval()
    return result


@torch.no_grad()
def validation_nll(
    model: DensityModel, x: Batches, context: Tensor | None = None, batch_size: int = 1000
) -> float:  # fmt: skip
    """Mean negative log-likelihood per row (nats); the one-draw bound for discrete data.

    >>> model = DensityModel(2, "realnvp", num_layers=1)  # N(0, I) at initialisation
    >>> round(validation_nll(model, torch.zeros(4, 2)), 4)  # log 2π per row at the origin
    1.8379
    """
    model.eval()
    total, rows = 0.0, 0
    if isinstance(x, Tensor):
        parts = [(x[i : i + batch_size], None if context is None else context[i : i + batch_size])
                 for i in range(0, len(x), batch_size)]  # fmt: skip
    else:
        parts = training_data.batches(model, x, None, batch_size, "valid")
    for rows_x, rows_c in parts:
        rows_x = model.check(rows_x, rows_c, "valid")
        total += -model.log_prob(rows_x, rows_c).sum().item()
        rows += len(rows_x)
    return total / rows


def save_checkpoint(path: Path, model: DensityModel, config: Settings, optimizer, run) -> None:
    """Everything ``resume`` needs, written atomically (:func:`pyroflows._training.save_run`).

    >>> import tempfile
    >>> model, path = DensityModel(2, "maf", 1), Path(tempfile.mkdtemp()) / "fit.pt"
    >>> optimizer = torch.optim.Adam(model.parameters())
    >>> save_checkpoint(path, model, Settings(), optimizer, DensityFit(model))
    >>> load_checkpoint(path, DensityModel(2, "maf", 1)).history
    []
    """
    _training.save_run(path, "density", model, model.config, asdict(config), optimizer,
                       run.history, run.best_epoch)  # fmt: skip


def load_checkpoint(path: Path, model: DensityModel, config: Settings | None = None,
                    optimizer=None) -> DensityFit:  # fmt: skip
    """Restore ``model`` (and, given them, the optimizer and the random state) from
    ``path``, refusing a checkpoint of another model or, with ``config``, other settings
    (``epochs`` and ``patience`` may differ).

    >>> import tempfile
    >>> model, path = DensityModel(2, "maf", 1), Path(tempfile.mkdtemp()) / "fit.pt"
    >>> optimizer = torch.optim.Adam(model.parameters())
    >>> save_checkpoint(path, model, Settings(), optimizer, DensityFit(model))
    >>> load_checkpoint(path, DensityModel(2, "realnvp", 1))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: '...fit.pt' was written for a different density model (...)
    """
    settings = None if config is None else asdict(config)
    history, best = _training.load_run(path, "density", model, model.config, model.loc.device,
                                       settings, optimizer, what="density model",
                                       defaults=asdict(Settings()))  # fmt: skip
    return DensityFit(model, history, best)


def _check_settings(config: Settings) -> None:
    _checks.positive_int("epochs", config.epochs)
    _checks.positive_int("batch_size", config.batch_size)
    _checks.positive_number("lr", config.lr)
    _checks.one_of("optimizer", config.optimizer, OPTIMIZERS)
    _checks.nonnegative_number("weight_decay", config.weight_decay)
    if config.patience is not None:
        _checks.positive_int("patience", config.patience)
    _checks.nonnegative_number("regularization", config.regularization)
