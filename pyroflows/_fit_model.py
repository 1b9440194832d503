"""Reverse-KL fitting of a Pyro model's posterior with :class:`~pyroflows.AutoFlow`, the
model path of :func:`pyroflows.fit`: the objectives of :mod:`pyroflows.infer` under one torch
optimizer, the same non-finite policy, and importance diagnostics of the joint weights."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _training, diagnostics, distributed
from ._random import seeded
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
    regularization: float = 0.0,
) -> dict[str, Any]:
    """Fit an AutoFlow to ``model(*args, **kwargs)``; the fields of a ``FitResult``."""
    guide = AutoFlow(model, flow, num_layers, **flow_options)
    guide._pyro_name = f"pyroflows_fit_{next(_FITS)}"  # its own names in Pyro's param store
    with torch.no_grad():
        guide(*args, **kwargs)  # builds the flow where the model's tensors live
    if guide.loc.device.type != device.type:
        raise ValueError(
            f"device is {device} but the model's tensors are on {guide.loc.device}: create "
            "them on the device you ask for"
        )
    rank, world = distributed.rank_and_world()
    share = len(range(rank, particles, world))  # this rank's particles
    if world > 1 and estimator == "dreg":
        raise ValueError(
            "estimator 'dreg' (an IWAE bound over all the particles together) does not split "
            f"over {world} processes; use 'standard' or 'stl'"
        )
    if particles < world:  # alike on every rank
        raise ValueError(f"particles must be at least the number of processes ({world}), "
                         f"got {particles}")  # fmt: skip
    objective = IWAE(particles, "dreg") if estimator == "dreg" else ELBO(share, estimator)
    solver = _training.SolverTerms(guide, regularization, f"{flow!r} guide")

    def loss_at(step: int) -> tuple[Tensor, str | None]:
        solver.start_step()
        loss = objective.differentiable_loss(model, guide, *args, **kwargs)
        loss = loss * (share / particles)  # summed over the ranks: the mean over all
        if regularization:  # the terms of the solve that drew the particles, in the gradient
            loss = loss + solver.gradient_only(particles)
        return loss, None

    # with several processes each rank draws its own particles (Pyro makes the guide's draws
    # inside its trace, so they cannot be shared out), from a stream forked off the common
    # seed; the common stream continues afterwards, so every rank evaluates the fit alike
    own = torch.randint(2**62, ()).item() + rank if world > 1 else None
    with seeded(own, device), solver.switched_on():
        losses, stopped = optimize(loss_at, guide, make_optimizer, steps, progress,
                                   sharded=world > 1)  # fmt: skip
    samples, log_w, _ = w.weighted_draws(model, guide, args, kwargs, num_eval)
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


_FITS = itertools.count()


def optimize(
    loss_at: Callable[[int], tuple[Tensor, str | None]],
    module: torch.nn.Module,
    make_optimizer: Callable,
    steps: int,
    progress: Callable,
    *,
    sharded: bool = False,
) -> tuple[list[float], str | None]:
    """``steps`` updates of ``module``'s parameters on ``loss_at(step)``, which returns the
    loss and any reason to stop first; a non-finite loss or gradient stops the loop before
    its update too. Returns the losses and why it stopped (None if it did not), after a
    warning. ``sharded``: each rank of ``torch.distributed`` returns its share of the loss,
    and losses and gradients are summed over the ranks (every rank stops together)."""
    opt, scheduler = make_optimizer(module.parameters())
    losses: list[float] = []
    bar = progress(steps)
    for step in bar:
        loss, problem = loss_at(step)
        opt.zero_grad()
        if sharded:  # one all-reduce: the summed loss and how many ranks have a problem
            summed = torch.stack([loss.detach(), loss.new_tensor(float(problem is not None))])
            distributed.all_reduce_sum([summed])
            if summed[1] > 0 and problem is None:
                problem = f"another process stopped at step {step}"
            loss_value = summed[0]
        else:
            loss_value = loss
        if problem is None and not torch.isfinite(loss_value):
            problem = f"the loss is {loss_value.item()} at step {step}"
        if problem is None:
            loss.backward()
            if sharded:
                grads = [p.grad for p in module.parameters() if p.grad is not None]
                distributed.all_reduce_sum(grads)
            name = _training.nonfinite_gradient(module)
            if name is not None:
                problem = f"the gradient of {name} is not finite at step {step}; lower lr"
        if problem is not None:
            warnings.warn(f"fit stopped: {problem}", RuntimeWarning, stacklevel=4)
            return losses, problem
        opt.step()
        scheduler.step()
        losses.append(loss_value.item())
        if step % 25 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses, None
