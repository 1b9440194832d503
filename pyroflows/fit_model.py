"""Reverse-KL fitting of a Pyro model's posterior with :class:`~pyroflows.AutoFlow`, the
model path of :func:`pyroflows.fit`: the objectives of :mod:`pyroflows.infer` under one torch
optimizer, the same non-finite policy, and importance diagnostics of the joint weights."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pyro
import torch
from torch import Tensor

from . import diagnostics
from .autoguide import AutoFlow
from .infer import ELBO, IWAE
from .infer import weights as w


def fit_model(
    model: Callable,
    flow: str,
    *,
    args: tuple,
    kwargs: dict,
    num_layers: int | None,
    steps: int,
    particles: int,
    make_optimizer: Callable,
    estimator: str,
    num_eval: int,
    device: torch.device,
    progress: Callable,
    flow_options: dict[str, Any],
) -> dict[str, Any]:
    """Fit an AutoFlow to ``model(*args, **kwargs)``; the fields of a ``FitResult``."""
    pyro.clear_param_store()
    guide = AutoFlow(model, flow, num_layers, **flow_options)
    with torch.no_grad():
        guide(*args, **kwargs)  # builds the flow where the model's tensors live
    if guide.loc.device.type != device.type:
        raise ValueError(
            f"device is {device} but the model's tensors are on {guide.loc.device}: create "
            "them on the device you ask for"
        )
    objective = IWAE(particles, "dreg") if estimator == "dreg" else ELBO(particles, estimator)
    opt, scheduler = make_optimizer(guide.parameters())
    losses: list[float] = []
    stopped = None
    bar = progress(steps)
    for step in bar:
        loss = objective.differentiable_loss(model, guide, *args, **kwargs)
        opt.zero_grad()
        if torch.isfinite(loss):
            loss.backward()
        stopped = _problem(step, loss, guide)
        if stopped is not None:
            warnings.warn(f"fit stopped: {stopped}", RuntimeWarning, stacklevel=3)
            break
        opt.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    samples, log_w = weighted_draws(model, guide, args, kwargs, num_eval)
    zeros = torch.zeros_like(log_w)
    return {
        "q": guide.get_posterior(*args, **kwargs),
        "log_density": None,
        "losses": losses,
        "diagnostics": diagnostics.importance_diagnostics(log_w, zeros, warn=False),
        "stopped": stopped,
        "guide": guide,
        "_eval": (samples, log_w, zeros),
    }


def _problem(step: int, loss: Tensor, guide: AutoFlow) -> str | None:
    if not torch.isfinite(loss):
        return f"the loss is {loss.item()} at step {step}: the model's log density or the flow"
    for name, p in guide.named_parameters():
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return f"the gradient of {name} is not finite at step {step}; lower lr"
    return None


@torch.no_grad()
def weighted_draws(
    model, guide: AutoFlow, args, kwargs, num: int, chunk: int = 1000
) -> tuple[dict[str, Tensor], Tensor]:
    """``num`` draws of the guide by site, ``(num, *site shape)``, with their log weights
    ``log p(x, z) - log q(z)`` summed over data."""
    nesting = w.plate_nesting(model, guide, args, kwargs)
    shapes = {
        name: guide.prototype_trace.nodes[name]["value"].shape
        for name in guide._unconstrained_shapes
    }
    draws: dict[str, list[Tensor]] = {name: [] for name in shapes}
    log_w = []
    for start in range(0, num, chunk):
        k = min(chunk, num - start)
        model_trace, guide_trace = w.traces(model, guide, args, kwargs, k, nesting)
        values = w.log_weights(model_trace, guide_trace, nesting).values
        log_w.append(values.reshape(k, -1).sum(-1))
        for name, shape in shapes.items():
            draws[name].append(guide_trace.nodes[name]["value"].reshape(k, *shape))
    return {name: torch.cat(parts) for name, parts in draws.items()}, torch.cat(log_w)
