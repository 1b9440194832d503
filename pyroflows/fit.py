"""Fit a flow to an unnormalised log density by reverse KL, then say how far to trust it.

``fit`` minimises ``E_q[log q(x) - β log p(x)]`` (β = 1 after an optional warm-up from 0)
over a flow ``q`` pushed forward from ``N(0, I)``, and returns the fitted ``q`` with its loss
curve and :class:`~pyroflows.diagnostics.ImportanceDiagnostics` (log Z, PSIS k-hat, ESS).

Non-finite values follow one policy: the fit stops *before* the update of the step where
``log p`` is NaN, ``+inf`` or ``-inf`` at a draw (``-inf``: ``q`` puts mass outside the support
of ``p``, where reverse KL is infinite; map constrained coordinates to an unconstrained space
first, or write the target as a Pyro model and use :class:`~pyroflows.AutoFlow`, which does)
or where the loss or a gradient is not finite. It keeps the last good parameters, says why in
``FitResult.stopped`` (the step, how many draws, one of them) and warns.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import InitMessenger
from torch import Tensor, nn
from tqdm.auto import trange

from . import _checks, diagnostics, distributed
from ._fit_model import fit_model, optimize
from ._scores import stopped_log_prob
from ._training import SolverTerms
from .autoguide import init_to_median_or_feasible
from .flows import RECIPES, build
from .infer.weights import weighted_draws
from .targets import Target
from .targets import target as make_target
from .transforms.continuous import exact_traces

ESTIMATORS = ("standard", "stl", "dreg")
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
SCHEDULES = ("constant", "cosine")
# layers where none are given: a continuous-time flow is deep on its own
DEFAULT_LAYERS = {"cnf": 1, "iaf": 4, "maf": 4, "nsf-ar": 4}
FALLBACK_LAYERS = 6


class _Density(nn.Module):
    """``log q`` as a module, so that it can be called with swapped (stopped) parameters."""

    def __init__(self, base: dist.Distribution, transform: nn.Module) -> None:
        super().__init__()
        self.base, self.transform = base, transform

    def distribution(self) -> dist.TransformedDistribution:
        return dist.TransformedDistribution(self.base, [self.transform])

    def forward(self, x: Tensor) -> Tensor:
        return self.distribution().log_prob(x)


@dataclass
class FitResult:
    """A fitted flow ``q`` with its record; ``q`` samples and scores like any distribution.

    For a Pyro model ``q`` is the ``AutoFlow`` guide's posterior over the unconstrained
    latent vector, ``guide`` the guide, and draws are dictionaries by site name.

    >>> r = fit("banana", "planar", num_layers=2, steps=5, num_eval=500, progress=False)
    >>> r.sample((3,)).shape, r.resample(10).shape, len(r.losses), r.stopped
    (torch.Size([3, 2]), torch.Size([10, 2]), 5, None)
    >>> r.q.log_prob(torch.zeros(2)).shape, r.diagnostics.num_samples
    (torch.Size([]), 500)
    """

    q: dist.TransformedDistribution
    log_density: Callable[[Tensor], Tensor] | None
    losses: list[float]
    diagnostics: diagnostics.ImportanceDiagnostics
    stopped: str | None = None  # why the fit ended before its last step
    guide: Any = None  # the AutoFlow, for a Pyro model
    _eval: tuple[Any, Tensor, Tensor] | None = field(default=None, repr=False)
    _model_call: tuple | None = field(default=None, repr=False)

    def sample(self, shape: int | tuple[int, ...] = ()) -> Tensor | dict[str, Tensor]:
        """Draws of ``q``; for a Pyro model a dict of site values with ``shape`` in front."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if self._model_call is None:
            with torch.no_grad():
                return self.q.sample(shape)
        model, args, kwargs = self._model_call
        draws, _, _ = weighted_draws(model, self.guide, args, kwargs, math.prod(shape))
        return {k: v.reshape(*shape, *v.shape[1:]) for k, v in draws.items()}

    def resample(self, num_samples: int | None = None) -> Tensor | dict[str, Tensor]:
        """Draws debiased towards ``p``: the evaluation draws resampled by their PSIS
        weights (see :func:`pyroflows.diagnostics.resample`)."""
        x, log_p, log_q = self._evaluation()
        if not isinstance(x, dict):
            return diagnostics.resample(x, log_p, log_q, num_samples)
        index = torch.arange(len(log_p), device=log_p.device).unsqueeze(-1)
        index = diagnostics.resample(index, log_p, log_q, num_samples)[:, 0]
        return {k: v[index.to(v.device)] for k, v in x.items()}

    def to_inference_data(self, name: str = "x") -> Any:
        """The evaluation draws as arviz ``InferenceData`` (see
        :func:`pyroflows.diagnostics.draws_to_inference_data`); by site for a Pyro model."""
        return diagnostics.draws_to_inference_data(*self._evaluation(), name=name)

    def against_exact(self, num_samples: int = 10_000) -> dict[str, float]:
        """For a target with an exact sampler: the EUBO ``E_p[log p - log q]`` (an upper bound
        of log Z), the forward KL ``KL(p || q)`` (EUBO - log Z, where log Z is known) and the
        sliced Wasserstein distance between draws of ``q`` and exact draws. Mode collapse
        shows here as a large forward KL, which the reverse-KL fit does not see."""
        target = self.log_density
        if not isinstance(target, Target):
            raise ValueError("against_exact needs a pyroflows.targets.Target with a sampler")
        with torch.no_grad():
            exact = target.sample((num_samples,)).to(self.q.base_dist.mean)
            eubo = (target.log_prob(exact) - self.q.log_prob(exact)).mean().item()
            drawn = self.q.sample((num_samples,))
        out = {"eubo": eubo}
        if target.log_z is not None:
            out["forward_kl"] = eubo - target.log_z
        out["sliced_wasserstein"] = diagnostics.sliced_wasserstein(drawn, exact)
        return out

    def _evaluation(self) -> tuple[Tensor, Tensor, Tensor]:
        assert self._eval is not None
        return self._eval


def fit(
    target: str | Target | Callable,
    flow: str = "realnvp",
    *,
    dim: int | None = None,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    num_layers: int | None = None,
    steps: int = 2000,
    particles: int = 256,
    lr: float = 3e-3,
    optimizer: str = "adam",
    schedule: str = "cosine",
    estimator: str = "standard",
    warmup_steps: int = 0,
    regularization: float = 0.0,
    num_eval: int = 10_000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    **flow_options: Any,
) -> FitResult:
    """Fit the recipe ``flow`` to ``target`` by reverse KL.

    ``target`` is a name in :data:`pyroflows.targets.TARGETS` (with ``dim`` for the sized
    ones), a :class:`~pyroflows.targets.Target`, any batched log density ``x ↦ log p(x)``
    for ``x`` of shape ``(particles, dim)`` (then ``dim`` is required; it must work on
    ``device``), or a Pyro model, called as ``model(*model_args, **model_kwargs)``: its
    posterior is fitted by :class:`~pyroflows.AutoFlow` (``pyro.factor`` models with
    ``ImproperUniform`` sites included), in the unconstrained space of its latent sites.
    ``particles`` draws per step; ``optimizer`` ``"adam"`` or ``"adamw"`` at ``lr`` with a
    ``"cosine"`` (to zero) or ``"constant"`` schedule; ``estimator`` ``"standard"``,
    ``"stl"`` (sticking the landing: the gradient through the draws only, Roeder et al.,
    2017) or, for Pyro models, ``"dreg"`` (the IWAE bound with ``particles`` samples and
    doubly reparameterized gradients); ``warmup_steps`` raises β from 0 to 1 over as many
    steps, fitting ``p^β N(0, I)^(1-β)``: tempering from the flow's base to the target (log
    densities only); ``regularization`` λ adds a ``cnf``'s RNODE terms (Finlay et al., 2020),
    λ (kinetic energy + Jacobian Frobenius norm) per draw, to the gradient, not to the
    recorded loss, keeping the dynamics non-stiff;
    ``num_eval`` draws for the diagnostics; ``seed`` sets torch's seed; ``flow_options`` go
    to :func:`pyroflows.build`. See the module docstring for non-finite values. Run under
    ``torchrun``, the particles are shared out over the processes (a Pyro model's drawn
    afresh on each; :mod:`pyroflows.distributed`).

    >>> r = fit("banana", "realnvp", num_layers=2, steps=50, num_eval=500, progress=False)
    >>> r.q.sample((3,)).shape, len(r.losses)
    (torch.Size([3, 2]), 50)
    """
    _checks.one_of("flow", flow, RECIPES)
    model_kwargs = model_kwargs or {}
    log_p, dim = _resolve(target, dim, model_args, model_kwargs)
    steps = _checks.positive_int("steps", steps)
    particles = _checks.positive_int("particles", particles)
    lr = _checks.positive_number("lr", lr)
    _checks.one_of("optimizer", optimizer, OPTIMIZERS)
    _checks.one_of("schedule", schedule, SCHEDULES)
    _checks.one_of("estimator", estimator, ESTIMATORS)
    warmup_steps = _checks.nonnegative_int("warmup_steps", warmup_steps)
    regularization = _checks.nonnegative_number("regularization", regularization)
    num_eval = _checks.positive_int("num_eval", num_eval)
    device = _checks.device("device", device)
    torch.manual_seed(seed)

    def make_optimizer(params):
        opt = OPTIMIZERS[optimizer](params, lr=lr)
        if schedule == "cosine":
            return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)

    def bar(n: int):
        return trange(n, disable=not progress, desc=f"fitting {flow}")

    if dim is None:  # a Pyro model
        if warmup_steps:
            raise ValueError("warmup_steps applies to log densities, not to Pyro models")
        fields = fit_model(
            log_p, flow, args=tuple(model_args), kwargs=model_kwargs, num_layers=num_layers,
            steps=steps, particles=particles, make_optimizer=make_optimizer,
            estimator=estimator, num_eval=num_eval, device=device, progress=bar,
            flow_options=flow_options, regularization=regularization,
        )  # fmt: skip
        result = FitResult(**fields, _model_call=(log_p, tuple(model_args), model_kwargs))
        _warn_if_unreliable(result.diagnostics)
        return result
    if estimator == "dreg":
        raise ValueError("estimator 'dreg' applies to Pyro models; use 'standard' or 'stl'")
    if isinstance(log_p, nn.Module):
        log_p = log_p.to(device)
    layers = num_layers or DEFAULT_LAYERS.get(flow, FALLBACK_LAYERS)

    transform = build(flow, dim, layers, **flow_options).to(device)
    density = _Density(dist.Normal(torch.zeros(dim, device=device), 1.0).to_event(1), transform)
    q = density.distribution()

    rank, world = distributed.rank_and_world()
    solver = SolverTerms(transform, regularization, f"{flow!r} flow")

    def loss_at(step: int) -> tuple[Tensor, str | None]:
        solver.start_step()
        # the same base draws on every rank, each rank its share of them (all, alone)
        x = transform(density.base.rsample((particles,))[rank::world])
        log_q = stopped_log_prob(q, x) if estimator == "stl" else q.log_prob(x)
        if log_q is None:  # a layer without a score pullback: the density, parameters swapped
            stopped_params = {k: v.detach() for k, v in density.named_parameters()}
            log_q = torch.func.functional_call(density, stopped_params, (x,))
        target_values = log_p(x)
        problem = _check_step(step, x, target_values, log_q)
        beta = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        if beta < 1.0:  # the target p^β base^(1-β): from the flow's base to p
            target_values = beta * target_values + (1 - beta) * density.base.log_prob(x)
        loss = (log_q - target_values).sum() / particles  # summed over the ranks
        if regularization:  # the terms of the solve that drew x, in the gradient alone
            loss = loss + solver.gradient_only(particles)
        return loss, problem

    with solver.switched_on():
        losses, stopped = optimize(loss_at, transform, make_optimizer, steps, bar, sharded=True)
    with torch.no_grad(), exact_traces(transform):  # Hutchinson's log q would bias the weights
        x = q.sample((num_eval,))
        log_q, values = q.log_prob(x), log_p(x)
    report = diagnostics.importance_diagnostics(values, log_q, warn=False)
    _warn_if_unreliable(report)
    return FitResult(q, log_p, losses, report, stopped, _eval=(x, values, log_q))


def _warn_if_unreliable(report: diagnostics.ImportanceDiagnostics) -> None:
    if report.verdict == "unreliable":
        warnings.warn(diagnostics.unreliable_message(report.k_hat), RuntimeWarning, stacklevel=3)


def _resolve(
    target: object, dim: int | None, args: tuple, kwargs: dict
) -> tuple[Callable, int | None]:
    """The log density (or Pyro model) and its dimension (None for a Pyro model)."""
    if isinstance(target, str):
        made = make_target(target, dim)
        return made, made.dim
    if isinstance(target, Target):
        if dim is not None and dim != target.dim:
            raise ValueError(f"dim is {dim} but the target's dimension is {target.dim}")
        return target, target.dim
    if callable(target):
        if dim is None:
            if not _is_pyro_model(target, args, kwargs):
                raise ValueError(
                    "dim is required when target is a log density function (a Pyro model "
                    "needs sample sites when called with model_args and model_kwargs)"
                )
            return target, None
        return target, _checks.positive_int("dim", dim)
    raise ValueError(
        "target must be a target name, a pyroflows.targets.Target or a log density "
        f"function, got {type(target).__name__}"
    )


def _is_pyro_model(fn: Callable, args: tuple, kwargs: dict) -> bool:
    try:  # placed as AutoFlow places them: sites that cannot sample do not need to
        with poutine.block(), InitMessenger(init_to_median_or_feasible):
            trace = poutine.trace(fn).get_trace(*args, **kwargs)
    except TypeError:  # a log density called without its argument
        return False
    return any(s["type"] == "sample" and not s["is_observed"] for s in trace.nodes.values())


def _check_step(step: int, x: Tensor, log_p: Tensor, log_q: Tensor) -> str | None:
    """A reason to stop before this step's update, if any."""
    if not isinstance(log_p, Tensor) or log_p.shape != x.shape[:-1]:
        got = tuple(log_p.shape) if isinstance(log_p, Tensor) else type(log_p).__name__
        raise ValueError(
            f"the log density must return a tensor of shape {tuple(x.shape[:-1])} for draws of "
            f"shape {tuple(x.shape)}, got {got}"
        )
    bad = ~torch.isfinite(log_p)
    if bool(bad.any()):
        where = x[bad.nonzero()[0, 0]].tolist()
        value, count = log_p[bad][0].item(), int(bad.sum())
        outside = " (outside its support: map to an unconstrained space)" if value < 0 else ""
        return f"log p is {value}{outside} at {count} draw(s) of step {step}, e.g. x = {where}"
    if not bool(torch.isfinite(log_q).all()):
        return f"log q is not finite at step {step}: the flow diverged; lower lr"
    return None
