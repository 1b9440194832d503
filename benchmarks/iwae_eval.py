"""Importance-sampled log p(x) for a VAE on binarized MNIST: time per image and peak memory.

    python benchmarks/iwae_eval.py [--device cuda] [--images 1000] [--samples 1000]
    python benchmarks/iwae_eval.py --device cuda --images 10000 --samples 5000  # the GPU aim

The VAE is :class:`pyroflows.vae.VAE` with a 2-layer IAF posterior (encoder 784-300-300
giving the context, IAF networks of width 300, decoder 40-300-300-784 Bernoulli), freshly
initialised: the figures are timings, not likelihoods. Contenders, each estimating log p(x)
of the same test images with K samples drawn ``--chunk`` at a time:

- ``pyroflows``: ``pyroflows.infer.log_marginal_likelihood(vae.model, vae.guide, ...)``,
  which takes the VAE's own log weights (``VAE.log_weights``, no Pyro tracing);
  ``pyroflows-1chunk``: the same with all K samples in one chunk;
- ``pyroflows-traced``: the same call on ``lambda x: vae.model(x)``, any Pyro model's path
  (traced through Pyro, ``max_plate_nesting=1`` given, as to Pyro's ELBO);
  ``pyroflows-traced-1chunk``: that path with all K samples in one chunk, at RenyiELBO's memory;
- ``torch-loop``: a hand-written chunked torch loop over the same modules (no Pyro);
- ``pyro-renyi``: Pyro's ``RenyiELBO(alpha=0)`` with vectorized particles, Pyro's fastest path
  (one image per call, all K particles at once: its memory grows with K);
- ``pyro-importance``: Pyro's ``Importance`` (one sample at a time; one image, timed once).

Two cases: ``--image-batch`` images per call over ``--images`` images (pyroflows and the
torch loop), and one image per call over ``--single-images`` images (all but Importance).
Within a case the contenders take turns for ``--rounds`` rounds; each figure is the median
time per image with the min-max spread of the per-round ratio to the torch loop. Peak memory
is CUDA max allocated above what was allocated before (GPU), or the peak of torch's CPU
allocations during one call (CPU).

Reads ../shared/data/binarized_mnist.npz or ``--data`` (skips with a message where absent);
prints a table and writes benchmarks/results/iwae_eval.json (iwae_eval-cuda.json on CUDA;
``--name`` changes the name).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import common
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Importance, RenyiELBO

from pyroflows.infer import log_marginal_likelihood
from pyroflows.vae import VAE
from pyroflows.vae import load as load_images

LATENT = 40


def torch_loop(vae: VAE, x: torch.Tensor, k: int, chunk: int):
    """The same estimate without Pyro: chunked samples, running logsumexp."""
    q = vae.guide.posterior(x)
    prior = dist.Normal(x.new_zeros(LATENT), 1.0).to_event(1)
    total = None
    for start in range(0, k, chunk):
        z = q.rsample((min(chunk, k - start),))
        log_w = prior.log_prob(z) + dist.Bernoulli(logits=vae.decoder(z)).to_event(1).log_prob(x)
        log_w = torch.logsumexp(log_w - q.log_prob(z), 0)
        total = log_w if total is None else torch.logaddexp(total, log_w)
    return total - math.log(k)


def build(args: argparse.Namespace, device: torch.device):
    """Test images and the VAE, the same in every process."""
    if not args.data.exists():
        sys.exit(f"skipped: {args.data} not found (statically binarized MNIST, see shared/data)")
    x = load_images(args.data).test[: max(args.images, args.single_images)]
    torch.manual_seed(0)
    vae = VAE((28, 28), latent_dim=LATENT, flow="iaf", num_layers=2, hidden_dim=300,
              hidden_dims=(300,))  # fmt: skip
    return x.to(device), vae.to(device)


def contenders(args, x, vae: VAE, case: str, k: int) -> dict[str, tuple[int, Callable]]:
    """name: (images, the call estimating their log p(x) with k samples)."""
    guide, chunk = vae.guide, args.chunk
    if case == "batch":
        batches = x[: args.images].split(args.image_batch)
    else:
        batches = x[: args.single_images].split(1)
    n = sum(len(b) for b in batches)

    def traced(b: torch.Tensor) -> torch.Tensor:  # not vae.model: any Pyro model's path
        return vae.model(b)

    def ours(chunk_size: int, model: Callable = vae.model) -> Callable:
        return lambda: [log_marginal_likelihood(model, guide, b, num_samples=k,
                        chunk_size=chunk_size, max_plate_nesting=1) for b in batches]  # fmt: skip

    out = {
        "pyroflows": (n, ours(chunk)),
        "pyroflows-traced": (n, ours(chunk, traced)),
        "torch-loop": (n, lambda: [torch_loop(vae, b, k, chunk) for b in batches]),
    }
    if case == "single":  # Pyro's fastest path, and ours at its memory (one chunk of K)
        renyi = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
        out["pyro-renyi"] = (n, lambda: [renyi.loss(vae.model, guide, b) for b in batches])
        out["pyroflows-1chunk"] = (n, ours(k))
        out["pyroflows-traced-1chunk"] = (n, ours(k, traced))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--image-batch", type=int, default=1000)
    parser.add_argument("--single-images", type=int, default=10)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", type=Path, default=common.MNIST, help="default: %(default)s")
    parser.add_argument("--name", default="iwae_eval",
                        help="results/NAME.json (default: %(default)s)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", "log_marginal_likelihood: importance ESS")  # untrained
    device = common.cuda_device(args.device)
    x, vae = build(args, device)
    k = args.samples
    rows = []
    print(
        f"{'case':15}{'contender':25}{'images':>7}{'ms/image':>10}{'peak MiB':>10}"
        f"  {'vs torch-loop [spread]':24}{'vs pyro-renyi [spread]'}"
    )
    for case, label in (("batch", f"{args.image_batch} img/call"), ("single", "1 img/call")):
        calls = contenders(args, x, vae, case, k)
        with torch.no_grad():
            for _, call in calls.values():  # warm-up, untimed
                call()
            runs = common.alternate({n: c for n, (_, c) in calls.items()}, args.rounds, device)
        for name, (n, _) in calls.items():
            run = runs[name]
            if device.type == "cpu":
                with torch.no_grad():
                    run["peak_mib"] = common.cpu_peak_mib(calls[name][1])
            row = {
                "case": label, "samples": k, "contender": name, "images": n,
                "ms_per_image": 1e3 * statistics.median(run["seconds"]) / n,
                "peak_mib": run["peak_mib"],
                "ratio_to_torch_loop": common.ratio(run["seconds"], runs["torch-loop"]["seconds"]),
                "ratio_to_pyro_renyi": common.ratio(run["seconds"], runs["pyro-renyi"]["seconds"])
                if "pyro-renyi" in runs else None,
            }  # fmt: skip
            rows.append(row)
            print(
                f"{label:15}{name:25}{n:7d}{row['ms_per_image']:10.3f}{row['peak_mib']:10.1f}"
                f"  {common.ratio_text(row['ratio_to_torch_loop']):24}"
                f"{common.ratio_text(row['ratio_to_pyro_renyi'])}"
            )
    pyro.clear_param_store()
    one = x[:1]
    common.sync(device)
    start = time.perf_counter()
    Importance(vae.model, vae.guide, num_samples=k).run(one).get_log_normalizer()
    common.sync(device)
    importance_ms = 1e3 * (time.perf_counter() - start)
    single = next(r for r in rows if r["case"] == "1 img/call" and r["contender"] == "pyroflows")
    print(f"pyro Importance, 1 image: {importance_ms:.0f} ms "
          f"({importance_ms / single['ms_per_image']:.0f}x pyroflows at 1 img/call)")  # fmt: skip
    settings = {key: getattr(args, key) for key in ("images", "image_batch", "single_images",
                                                      "samples", "chunk", "rounds")}  # fmt: skip
    settings["posterior"] = "2-layer IAF, width 300, untrained (timing only)"
    common.write(
        args.name,
        device,
        {"settings": settings, "rows": rows, "pyro_importance_ms_one_image": importance_ms},
        pyro=pyro.__version__,
    )


if __name__ == "__main__":
    main()
