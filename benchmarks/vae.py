"""Training-step time of a VAE with a 2-layer IAF posterior: pyroflows' paths against a
hand-written torch loop with the same networks.

    python benchmarks/vae.py [--device cuda] [--rounds 7] [--steps 20] [--threads 1]
        [--flow-hidden-dims 320]

The VAE is the IAF paper's MLP one: 784-300-300 encoder and decoder, 40 latent dimensions, a
2-layer IAF conditioned on the encoder's output, batch 100, Adamax. Contenders, each timed
for ``--steps`` full steps (loss, backward, optimizer step) per round, alternating:

- ``hand-written``: the same modules, the objective written out by hand (the floor);
- ``pyroflows VAE.loss``: the fast path ``pyroflows.vae.train`` uses;
- ``pf.infer.ELBO.differentiable_loss``: the Pyro model and guide, one torch optimizer;
- ``Pyro SVI + pf.infer.ELBO``: the Pyro model and guide through ``SVI`` (Pyro's Adamax);
- ``pf ELBO(stl)``, ``pf IWAE(5)`` and ``pf IWAE(5, dreg)`` through ``differentiable_loss``:
  the price of the stopped density, reported against ``pf ELBO`` and ``pf IWAE(5)``.

Ratios are medians over rounds of the per-round ratio to the hand-written loop, with the
min-max spread; peak memory per step is torch's above what was allocated before the step
(CPU profiler or CUDA max allocated), gradients held between steps by every contender. Images
are statically binarized MNIST from ../shared/data when present, random bits otherwise (the
time does not depend on the pixel values). Writes benchmarks/results/vae.json, or
vae-made320.json with ``--flow-hidden-dims 320`` (the MADE's widths; default two of 80).
"""

from __future__ import annotations

import argparse

import common
import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI

import pyroflows as pf
from pyroflows.vae import VAE


def hand_loss(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """The same objective as ``VAE.loss`` for an IAF posterior, written out by hand."""
    guide = vae.guide
    h = guide.encoder(x)
    loc, scale = guide.loc(h), F.softplus(guide.scale(h)) + 1e-5
    eps = torch.randn_like(loc)
    z = loc + scale * eps
    log_q = (-0.5 * eps**2 - scale.log() - 0.9189385332046727).sum(-1)
    for layer in guide.flow.transforms:
        m, s = layer.net(z, h)
        log_scale = F.hardtanh(s, -5.0, 5.0)
        z = z * log_scale.exp() + m
        log_q = log_q - log_scale.sum(-1)
    log_prior = (-0.5 * z**2 - 0.9189385332046727).sum(-1)
    log_lik = -F.binary_cross_entropy_with_logits(vae.decoder(z), x, reduction="none").sum(-1)
    return -(log_lik + log_prior - log_q).sum()


def images(batch: int, device: torch.device) -> tuple[torch.Tensor, str]:
    if common.MNIST.exists():
        return pf.vae.load(common.MNIST).train[:batch].to(device), "binarized MNIST"
    return torch.bernoulli(torch.full((batch, 784), 0.13, device=device)), "random bits"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--flow-hidden-dims", type=int, nargs="+", default=None,
                        help="the MADE's widths (default: two of 80)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = common.cuda_device(args.device)
    x, source = images(args.batch, device)
    torch.manual_seed(0)
    made = {} if args.flow_hidden_dims is None else {"hidden_dims": tuple(args.flow_hidden_dims)}
    vae = VAE((28, 28), latent_dim=40, flow="iaf", num_layers=2, hidden_dim=300, **made)
    vae.to(device)
    torch.testing.assert_close(  # the hand-written objective is the same function
        (torch.manual_seed(1), hand_loss(vae, x))[1], (torch.manual_seed(1), vae.loss(x))[1]
    )
    adamax = torch.optim.Adamax(vae.parameters(), lr=5e-4)
    elbo = pf.infer.ELBO(max_plate_nesting=1)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adamax({"lr": 5e-4}), elbo)

    def torch_step(loss_fn):
        def step():
            adamax.zero_grad(set_to_none=False)  # gradients stay allocated, as in Pyro's SVI
            loss = loss_fn()
            loss.backward()
            adamax.step()

        return step

    calls = {
        "hand-written": torch_step(lambda: hand_loss(vae, x)),
        "pyroflows VAE.loss": torch_step(lambda: vae.loss(x)),
        "pf ELBO.differentiable_loss": torch_step(
            lambda: elbo.differentiable_loss(vae.model, vae.guide, x)
        ),
        "Pyro SVI + pf ELBO": lambda: svi.step(x),
    }
    estimators = {
        "pf ELBO(stl)": pf.infer.ELBO(1, "stl", max_plate_nesting=1),
        "pf IWAE(5)": pf.infer.IWAE(5, max_plate_nesting=1),
        "pf IWAE(5, dreg)": pf.infer.IWAE(5, "dreg", max_plate_nesting=1),
    }
    for name, objective in estimators.items():
        calls[name] = torch_step(
            lambda o=objective: o.differentiable_loss(vae.model, vae.guide, x)
        )  # fmt: skip
    standard = {"pf ELBO(stl)": "pf ELBO.differentiable_loss", "pf IWAE(5, dreg)": "pf IWAE(5)"}
    for call in calls.values():  # warm-up
        for _ in range(3):
            call()
    timed = common.alternate(calls, args.rounds, device, repeat=args.steps)
    base = timed["hand-written"]["seconds"]
    rows = []
    print(f"{'contender':30}{'ms/step':>9}  {'ratio to hand-written':24}{'peak MiB':>9}")
    for name, t in timed.items():
        peak = t["peak_mib"] if device.type == "cuda" else common.cpu_peak_mib(calls[name])
        ms = 1e3 * sorted(t["seconds"])[len(t["seconds"]) // 2]
        r = common.ratio(t["seconds"], base)
        row = {"contender": name, "ms_per_step": ms, "ratio": r, "peak_mib": peak,
               "seconds": t["seconds"]}  # fmt: skip
        extra = ""
        if name in standard:
            row["ratio_to_standard"] = common.ratio(t["seconds"], timed[standard[name]]["seconds"])
            extra = f"  {common.ratio_text(row['ratio_to_standard'])} of {standard[name]}"
        rows.append(row)
        print(f"{name:30}{ms:9.2f}  {common.ratio_text(r):24}{peak:9.1f}{extra}")
    settings = {"rounds": args.rounds, "steps": args.steps, "batch": args.batch, "images": source,
                "latent_dim": 40, "hidden_dim": 300, "flow": "iaf x2", **made}  # fmt: skip
    name = "vae" + ("-made" + "x".join(map(str, args.flow_hidden_dims)) if made else "")
    common.write(name, device, {"settings": settings, "rows": rows}, pyro=pyro.__version__)


if __name__ == "__main__":
    main()
