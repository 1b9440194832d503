"""Importance-sampled log p(x) for a VAE on binarized MNIST: seconds per image and peak memory.

    python benchmarks/iwae_eval.py [--device cuda] [--images 20] [--samples 1000 5000]
    python benchmarks/iwae_eval.py --device cuda --images 10000 --samples 5000  # the GPU aim

The VAE has a 2-layer IAF posterior (encoder 784-300-300 giving the context, IAF networks of
width 300, decoder 40-300-300-784 Bernoulli), freshly initialised: the figures are timings,
not likelihoods. Contenders, each estimating log p(x) of the same test images with K samples:

- ``pyroflows``: ``pyroflows.infer.log_marginal_likelihood`` (vectorized chunks of samples,
  ``--image-batch`` images per call);
- ``torch-loop``: a hand-written chunked torch loop over the same modules (no Pyro), on the
  same image batches and chunks;
- ``pyro-renyi``: Pyro's ``RenyiELBO(alpha=0)`` with vectorized particles (one image at a time:
  all K particles at once; ``--renyi-images`` images);
- ``pyro-importance``: Pyro's ``Importance`` (one sample at a time; ``--importance-images``
  images, timed once).

The others are timed ``--repeats`` times, alternating; the median time counts.

Reads ../shared/data/binarized_mnist.npz (skips with a message where absent); prints a table
and writes benchmarks/results/iwae_eval.json.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import common
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Importance, RenyiELBO
from torch import nn

from pyroflows import AmortizedFlowGuide
from pyroflows.infer import log_marginal_likelihood

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "binarized_mnist.npz"
LATENT = 40


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(LATENT, 300), nn.ReLU(), nn.Linear(300, 300), nn.ReLU(), nn.Linear(300, 784)
        )

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(LATENT), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.net(z)).to_event(1), obs=x)


def torch_loop(decoder: Decoder, guide: AmortizedFlowGuide, x: torch.Tensor, k: int, chunk: int):
    """The same estimate without Pyro: chunked samples, running logsumexp."""
    q = guide.posterior(x)
    prior = dist.Normal(x.new_zeros(LATENT), 1.0).to_event(1)
    total = None
    for start in range(0, k, chunk):
        z = q.rsample((min(chunk, k - start),))
        log_w = prior.log_prob(z) + dist.Bernoulli(logits=decoder.net(z)).to_event(1).log_prob(x)
        log_w = torch.logsumexp(log_w - q.log_prob(z), 0)
        total = log_w if total is None else torch.logaddexp(total, log_w)
    return total - math.log(k)


def timed(fn, device: torch.device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**20
    return time.perf_counter() - start, float("nan")  # CPU: no allocator statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--image-batch", type=int, default=1000)
    parser.add_argument("--renyi-images", type=int, default=20)
    parser.add_argument("--importance-images", type=int, default=1)
    parser.add_argument("--samples", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--chunk", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5, help="median of, except Importance")
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"skipped: {DATA} not found (statically binarized MNIST, see shared/data/README)")
    device = common.cuda_device(args.device)
    with np.load(DATA) as f:
        test = np.ascontiguousarray(np.unpackbits(f["test"], axis=1)[:, :784])
    x = torch.tensor(test[: args.images], dtype=torch.float32, device=device)
    renyi_images = min(args.renyi_images, len(x))

    torch.manual_seed(0)
    decoder = Decoder().to(device)
    encoder = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 300), nn.ReLU())
    guide = AmortizedFlowGuide(
        encoder, LATENT, 300, flow="iaf", num_layers=2, hidden_dims=(300,)
    ).to(device)
    model = decoder.model

    def contenders(k: int) -> dict:
        """name: (images, the call estimating their log p(x) with k samples)."""
        renyi = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
        batches = x.split(args.image_batch)
        return {
            "pyroflows": (len(x), lambda: [log_marginal_likelihood(
                model, guide, b, num_samples=k, chunk_size=args.chunk) for b in batches]),
            "torch-loop": (len(x), lambda: [
                torch_loop(decoder, guide, b, k, args.chunk) for b in batches]),
            "pyro-renyi": (renyi_images, lambda: [
                renyi.loss(model, guide, x[i : i + 1]) for i in range(renyi_images)]),
            "pyro-importance": (args.importance_images, lambda: [
                Importance(model, guide, num_samples=k).run(x[i : i + 1]).get_log_normalizer()
                for i in range(args.importance_images)]),
        }  # fmt: skip

    for name, (_, fn) in contenders(min(args.samples)).items():  # warm-up, untimed
        if name != "pyro-importance":
            timed(fn, device)
    rows = []
    print(
        f"{'K':>6} {'contender':16}{'images':>7}{'seconds':>9}{'s/image':>10}{'peak MiB':>10}"
        f"{'vs pyroflows':>14}"
    )
    for k in args.samples:
        calls = contenders(k)
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
        for repeat in range(args.repeats):  # contenders alternate, so drift hits all alike
            for name, (_, fn) in calls.items():
                if name != "pyro-importance" or repeat == 0:
                    pyro.clear_param_store()
                    runs[name].append(timed(fn, device))
        base = statistics.median(t for t, _ in runs["pyroflows"]) / calls["pyroflows"][0]
        for name, (n, _) in calls.items():
            seconds = statistics.median(t for t, _ in runs[name])
            peak = max(p for _, p in runs[name])
            per_image = seconds / n
            rows.append({
                "samples": k, "contender": name, "images": n, "seconds": seconds,
                "seconds_per_image": per_image,
                "peak_mib": None if math.isnan(peak) else peak,
                "time_vs_pyroflows": per_image / base,
            })  # fmt: skip
            peak_text = "-" if math.isnan(peak) else f"{peak:.0f}"
            print(
                f"{k:6d} {name:16}{n:7d}{seconds:9.2f}{per_image:10.4f}{peak_text:>10}"
                f"{per_image / base:14.2f}"
            )
    common.write(
        "iwae_eval",
        device,
        {
            "settings": {
                "images": len(x),
                "image_batch": args.image_batch,
                "chunk": args.chunk,
                "latent": LATENT,
                "posterior": "2-layer IAF, width 300, untrained (timing only)",
            },
            "rows": rows,
        },
        pyro=pyro.__version__,
    )


if __name__ == "__main__":
    main()
