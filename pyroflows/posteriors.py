"""Two real posteriors as Pyro models, for :func:`pyroflows.fit` and the benchmarks: each
function returns a model that takes no arguments, with its data on ``device``.

>>> import pyro
>>> trace = pyro.poutine.trace(eight_schools()).get_trace()
>>> [name for name, site in trace.nodes.items() if site["type"] == "sample"]
['mu', 'tau', 'schools', 'theta_tilde', 'y']
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch

from . import _checks

SCHOOLS_Y = (28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0)
SCHOOLS_SIGMA = (15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0)


def eight_schools(device: str | torch.device = "cpu") -> Callable[[], None]:
    """Rubin's eight schools, non-centred: ``mu ~ N(0, 5²)``, ``tau ~ HalfCauchy(5)``,
    ``theta_tilde ~ N(0, 1)`` per school, ``y ~ N(mu + tau theta_tilde, sigma²)`` (10 latent
    coordinates).

    >>> eight_schools()() is None  # a model without arguments, its data inside
    True
    """
    device = _checks.device("device", device)
    y = torch.tensor(SCHOOLS_Y, device=device)
    sigma = torch.tensor(SCHOOLS_SIGMA, device=device)

    def model() -> None:
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, device=device), 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(5.0, device=device)))
        with pyro.plate("schools", 8):
            theta_tilde = pyro.sample(
                "theta_tilde", dist.Normal(torch.tensor(0.0, device=device), 1.0)
            )
            pyro.sample("y", dist.Normal(mu + tau * theta_tilde, sigma), obs=y)

    return model


def breast_cancer_logistic(device: str | torch.device = "cpu") -> Callable[[], None]:
    """Bayesian logistic regression on scikit-learn's bundled Wisconsin breast-cancer data
    (569 tumours, 30 standardised features): ``w ~ N(0, I₃₀)``, ``b ~ N(0, 1)``,
    ``malignant ~ Bernoulli(sigmoid(x w + b))`` (31 latent coordinates).

    >>> import pyro
    >>> trace = pyro.poutine.trace(breast_cancer_logistic()).get_trace()
    >>> trace.nodes["w"]["value"].shape, trace.nodes["malignant"]["value"].shape
    (torch.Size([30]), torch.Size([569]))
    """
    from sklearn.datasets import load_breast_cancer

    device = _checks.device("device", device)
    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = ((x - x.mean(0)) / x.std(0)).to(device)
    y = torch.tensor(data.target == 0, dtype=torch.float32, device=device)  # 0: malignant

    def model() -> None:
        w = pyro.sample("w", dist.Normal(torch.zeros(30, device=device), 1.0).to_event(1))
        b = pyro.sample("b", dist.Normal(torch.tensor(0.0, device=device), 1.0))
        with pyro.plate("data", len(y)):
            # w: (particles, 1, 30) when vectorized; (w * x).sum(-1): (particles, 569)
            logits = (w * x).sum(-1) + b
            pyro.sample("malignant", dist.Bernoulli(logits=logits), obs=y)

    return model


POSTERIORS: dict[str, Callable[..., Callable[[], None]]] = {
    "eight-schools": eight_schools,
    "logistic-regression": breast_cancer_logistic,
}
