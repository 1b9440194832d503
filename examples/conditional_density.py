"""An amortized MAF learns p(z | c) = N(c, 0.5² I) by maximum likelihood.

python examples/conditional_density.py
"""

import pyro.distributions as dist
import torch

import pyroflows as pf


def main(steps=400):
    torch.manual_seed(0)
    flow = pf.build("maf", dim=2, num_layers=3, context_dim=2, hidden_dims=(32,))
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    q = dist.ConditionalTransformedDistribution(base, [flow])
    optimizer = torch.optim.Adam(flow.parameters(), lr=5e-3)
    for step in range(steps):
        c = torch.randn(256, 2)
        z = c + 0.5 * torch.randn(256, 2)
        loss = -q.condition(c).log_prob(z).mean()
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss at step {step}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    c = torch.randn(5000, 2)
    z = c + 0.5 * torch.randn(5000, 2)
    with torch.no_grad():
        nll = -q.condition(c).log_prob(z).mean().item()
    exact = -dist.Normal(c, 0.5).to_event(1).log_prob(z).mean().item()
    print(f"test NLL {nll:.4f}   true conditional entropy {exact:.4f}")


if __name__ == "__main__":
    main()
