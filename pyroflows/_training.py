"""What every training loop shares: checkpoints written atomically and read with
``weights_only=True`` (refusing another configuration by name), the random state that makes
``resume`` bit for bit, early stopping, the progress bar, the check for non-finite
gradients, and a continuous flow's RNODE terms and solver record."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .transforms.continuous import Continuous, continuous_settings


def atomic_save(state: dict[str, Any], path: Path) -> None:
    """``torch.save(state)`` to a temporary file in ``path``'s folder, then renamed over
    ``path``, so an interrupted write never leaves a broken checkpoint."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(state, f)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# what a training loop's message adds to "non-finite gradient of NAME at ..."
GRADIENT_ADVICE = (
    "; lower lr, or, for a continuous flow whose dynamics turned stiff (back-propagation "
    "through hundreds of solver steps overflows), weigh its RNODE terms into the loss (the "
    "regularization setting) or set adjoint=True"
)


class SolverTerms:
    """The continuous-time layers of a module being trained: RNODE's terms (Finlay et al.,
    2020) for the loss and the solver's evaluations per batch for the record.

    ``strength`` λ weighs the kinetic energy plus the Jacobian's squared Frobenius norm of
    each row (summed over the layers): :meth:`penalty` is what joins the loss. Training runs
    inside :meth:`switched_on`, which, while ``strength`` is positive, sets ``regularize`` on
    the layers and has them keep the terms of the first solve after each
    :meth:`start_step` (the solve that draws or scores the batch; STL and DReG solve again
    with stopped parameters), and restores them after. A positive ``strength`` for a module
    without continuous layers is an error naming ``what`` the module is.

    >>> from pyroflows.transforms import Continuous
    >>> flow = Continuous(2, hidden_dims=(8,))
    >>> terms = SolverTerms(flow, 0.1, "flow")
    >>> with terms.switched_on():
    ...     terms.start_step()
    ...     first = flow(torch.randn(5, 2))
    ...     second = flow(torch.randn(3, 2))  # a later solve of the same step
    ...     penalty = terms.penalty()
    >>> penalty.shape, flow.regularize, terms.record([20, 26])
    (torch.Size([5]), False, {'nfe_mean': 23.0, 'nfe_max': 26})
    """

    def __init__(self, module: nn.Module, strength: float, what: str) -> None:
        self.module, self.strength = module, strength
        self.layers = [m for m in module.modules() if isinstance(m, Continuous)]
        if strength and not self.layers:
            raise ValueError(
                f"regularization weighs a continuous flow's RNODE terms; the {what} has no "
                "continuous layer (use the 'cnf' recipe, or set regularization=0)"
            )

    def switched_on(self) -> contextlib.AbstractContextManager[None]:
        on = {"regularize": True, "first_terms_only": True} if self.strength else {}
        return continuous_settings(self.module, **on)

    def start_step(self) -> None:
        """The next solve of each layer is a new training step's first."""
        for layer in self.layers:
            layer.regularization = {}

    def penalty(self) -> Tensor:
        """``strength`` times each row's terms from the layers' first solves of this step."""
        return self.strength * sum(
            m.regularization["kinetic"] + m.regularization["jacobian"] for m in self.layers
        )

    def gradient_only(self, rows: int) -> Tensor:
        """The penalty summed and divided by ``rows`` as a zero that carries its gradient: for
        a loss whose recorded value leaves the penalty out."""
        penalty = self.penalty().sum() / rows
        return penalty - penalty.detach()

    def evaluations(self) -> int:
        """The layers' function evaluations in their last forward solves."""
        return sum(m.nfe_forward for m in self.layers)

    @staticmethod
    def record(evaluations: list[int]) -> dict[str, float]:
        """The epoch's mean and largest evaluations per batch (empty without any)."""
        if not evaluations:
            return {}
        return {"nfe_mean": sum(evaluations) / len(evaluations), "nfe_max": max(evaluations)}


def nonfinite_gradient(module: nn.Module) -> str | None:
    """The name of the first parameter of ``module`` whose gradient has a NaN or infinite
    entry (None where all are finite): a finite loss can still give one, and the optimizer's
    step would spread it to every parameter. One synchronization for all the gradients.

    >>> layer = nn.Linear(2, 1)
    >>> layer(torch.ones(1, 2)).sum().backward()
    >>> nonfinite_gradient(layer) is None
    True
    >>> layer.bias.grad[0] = float("inf")
    >>> nonfinite_gradient(layer)
    'bias'
    """
    named = [(n, p.grad) for n, p in module.named_parameters() if p.grad is not None]
    if not named or bool(torch.stack([g.isfinite().all() for _, g in named]).all()):
        return None
    return next(n for n, g in named if not bool(g.isfinite().all()))


def save_run(
    path: Path, name: str, module: nn.Module, config: dict, settings: dict, optimizer,
    history: list[dict[str, float]], best_epoch: int | None,
) -> None:  # fmt: skip
    """Everything ``resume`` needs: the module as ``name`` with its configuration as
    ``name + "_config"``, the settings, the optimizer, the record and the random state."""
    atomic_save({
        name: module.state_dict(), f"{name}_config": config, "settings": settings,
        "optimizer": optimizer.state_dict(), "history": history, "best_epoch": best_epoch,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }, path)  # fmt: skip


def load_run(
    path: Path, name: str, module: nn.Module, config: dict, device: torch.device,
    settings: dict | None = None, optimizer=None, *, what: str | None = None,
    defaults: dict | None = None,
) -> tuple[list[dict[str, float]], int | None]:  # fmt: skip
    """Restore ``module`` (and, given them, the optimizer and the random state) from a
    :func:`save_run` checkpoint, after checking that it was written for the same
    configuration and, with ``settings``, the same settings but for ``epochs`` and
    ``patience`` (``what`` names the module in the messages; a setting the checkpoint
    predates counts as its value in ``defaults``); returns the record and the best epoch."""
    what = what or name
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # any unreadable file gets the same message
        raise ValueError(f"{str(path)!r} is not a readable checkpoint: {error}") from None
    if f"{name}_config" not in state:
        raise ValueError(f"{str(path)!r} is not a checkpoint of a {what}")
    _same(path, what, state[f"{name}_config"], config)
    if settings is not None:
        loose = ("epochs", "patience")
        saved = {**(defaults or {}), **state["settings"]}
        _same(path, "settings", {k: v for k, v in saved.items() if k not in loose},
              {k: v for k, v in settings.items() if k not in loose})  # fmt: skip
    module.load_state_dict(state[name])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"].cpu())
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    return list(state["history"]), state["best_epoch"]


def _same(path: Path, what: str, saved: dict, now: dict) -> None:
    saved = {k: list(v) if isinstance(v, tuple) else v for k, v in saved.items()}
    now = {k: list(v) if isinstance(v, tuple) else v for k, v in now.items()}
    if saved != now:
        keys = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
        diff = ", ".join(f"{k}: {saved.get(k)!r} there, {now.get(k)!r} here" for k in keys)
        raise ValueError(f"{str(path)!r} was written for a different {what} ({diff})")


def stalled(history_len: int, best_epoch: int | None, patience: int | None) -> bool:
    """Whether ``patience`` epochs have passed without a better validation score."""
    return bool(patience and best_epoch and history_len - best_epoch >= patience)


def copy_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def progress(enabled: bool, epochs: int, start: int):
    """A tqdm bar over epochs, or ``None``."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=epochs, initial=start, desc="epochs", unit="epoch")


CHECKPOINT, BEST = "checkpoint.pt", "best.pt"


def resume_from(out: Path | None) -> Path:
    """The checkpoint ``resume=True`` continues from, or a clear error where there is none."""
    if out is None or not (out / CHECKPOINT).exists():
        raise FileNotFoundError(f"resume: no {CHECKPOINT} in out={str(out)!r}")
    return out / CHECKPOINT


def after_epoch(
    run: Any, improved: bool, module: nn.Module, out: Path | None, save, bar, **postfix: str
) -> dict[str, Tensor] | None:  # fmt: skip
    """The end of an epoch of ``run`` (its ``history`` holds this epoch): when it
    ``improved``, ``run.best_epoch`` becomes this epoch before any checkpoint records it;
    with ``out``, ``save(path)`` writes ``best.pt`` when it improved and ``checkpoint.pt``
    always; the bar shows ``postfix``. Returns a copy of the module's state when it improved
    (``None`` otherwise)."""
    best = None
    if improved:
        run.best_epoch = len(run.history)
        best = copy_state(module)
    if out is not None:
        if improved:
            save(out / BEST)
        save(out / CHECKPOINT)
    if bar is not None:
        bar.set_postfix(**postfix, refresh=False)
        bar.update()
    return best


def restore_best(module: nn.Module, best: dict[str, Tensor] | None, out: Path | None, load,
                 trained: bool) -> None:  # fmt: skip
    """Leave ``module`` at its best parameters: those of this call, or, when this call found
    none better (a resumed run), ``load(out / "best.pt")``."""
    if best is not None:
        module.load_state_dict(best)
    elif trained and out is not None and (out / BEST).exists():
        load(out / BEST)


def environment(device: torch.device) -> dict[str, Any]:
    """The device and versions a command's results record."""
    import platform

    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())  # fmt: skip
    return {"device": str(device), "device_name": name,
            "versions": {"torch": torch.__version__, "python": platform.python_version()}}
