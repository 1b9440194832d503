"""A VAE with an IAF posterior in plain Pyro: your model, pyroflows' amortized guide, Pyro's SVI.

Binarized 8x8 digits (bundled with scikit-learn), 8 latent dimensions, a 2-layer IAF
conditioned on the encoder, KL warm-up over the first 300 steps, then the test NLL with 1000
importance samples per image.

    python examples/vae_iaf.py
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI
from torch import nn

import pyroflows as pf

LATENT, HIDDEN = 8, 128
data = pf.vae.load("digits")  # BinaryImages: train / valid / test, (N, 64) of 0 and 1
decoder = nn.Sequential(nn.Linear(LATENT, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 64))


def model(x):
    pyro.module("decoder", decoder)
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(torch.zeros(LATENT), 1.0).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)


encoder = nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU())  # its output conditions the flow
guide = pf.AmortizedFlowGuide(encoder, LATENT, context_dim=HIDDEN, flow="iaf", num_layers=2)

pyro.set_rng_seed(0)
elbo = pf.infer.ELBO()
svi = SVI(model, guide, pyro.optim.Adam({"lr": 3e-3}), elbo)
for step in range(1000):
    elbo.kl_weight = min(1.0, step / 300)  # KL warm-up
    batch = data.train[torch.randint(len(data.train), (32,))]
    loss = svi.step(batch) / len(batch)
    if step % 250 == 0:
        print(f"step {step:5d}  loss per image {loss:.2f}")

r = pf.infer.log_marginal_likelihood(model, guide, data.test, num_samples=1000)
print(f"test NLL {-r.log_px.mean():.2f} nats per image ({len(data.test)} images)")
