"""A flow guide for a Pyro model with a known evidence, through Pyro's AutoNormalizingFlow.

Model: z ~ N(0, I₂), xᵢ ~ N(z, 0.5² I₂) for 20 data points. The posterior is Gaussian and the
log evidence is known in closed form, so the ELBO's gap to it is the KL of the guide.

    python examples/autoguide_conjugate.py
"""

from functools import partial

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow

import pyroflows as pf

NOISE = 0.5


def model(x):
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(z, NOISE).to_event(1), obs=x)


def log_evidence(x):
    n = len(x)
    cov = torch.ones(n, n) + NOISE**2 * torch.eye(n)  # each coordinate: N(0, 11ᵀ + σ²I)
    mvn = dist.MultivariateNormal(torch.zeros(n), cov)
    return mvn.log_prob(x.T).sum()


def main(steps=1500):
    pyro.set_rng_seed(0)
    x = torch.randn(2) + NOISE * torch.randn(20, 2)
    guide = AutoNormalizingFlow(model, partial(pf.build, "iaf", num_layers=2, hidden_dims=(16,)))
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    for _ in range(steps):
        svi.step(x)
    evaluation = Trace_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1)
    elbo = -evaluation.loss(model, guide, x)
    exact = log_evidence(x).item()
    print(f"ELBO {elbo:.4f}   log evidence {exact:.4f}   gap {exact - elbo:.4f}")


if __name__ == "__main__":
    main()
