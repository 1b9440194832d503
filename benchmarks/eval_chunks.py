"""VAE evaluation time against the chunk size: ``pyroflows.vae.evaluate`` on 100 images at
K = 1000 with the importance samples drawn 10 to 500 at a time.

On a CPU a chunk's tensors (chunk x batch rows of 784 pixels) stop fitting in cache as the
chunk grows; on a GPU larger chunks mean fewer, fuller kernels. The draws are the same for
every chunk size, so the NLL differs by rounding alone (``nll_difference``, against the
largest chunk). The posteriors are
untrained (the time does not depend on the weights) and the images random, so no data set is
needed::

    python benchmarks/eval_chunks.py [--device cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics

import common
import torch

from pyroflows.vae import VAE, evaluate

POSTERIORS = {"none": {}, "iaf": {"hidden_dims": (320,)}}  # IAF: the Sylvester paper's MADE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunks", type=int, nargs="+", default=[10, 20, 50, 100, 500])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = common.cuda_device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((args.images, 784), 0.13), generator=g).to(device)
    base = max(args.chunks)
    rows = []
    print(f"{'posterior':10}{'chunk':>7}{'ms/image':>10}{'vs ' + str(base):>20}{'peak MiB':>10}")
    for posterior, options in POSTERIORS.items():
        torch.manual_seed(0)
        vae = VAE((28, 28), 64, posterior, 4, hidden_dim=300, **options).to(device)

        def run(chunk: int, vae=vae) -> dict:
            return evaluate(vae, x, num_samples=args.samples, chunk_size=chunk)

        figures = {c: run(c) for c in args.chunks}  # also the warm-up
        calls = {c: (lambda c=c: run(c)) for c in args.chunks}
        timed = common.alternate(calls, args.rounds, device)
        for chunk in args.chunks:
            seconds = timed[chunk]["seconds"]
            peak = timed[chunk]["peak_mib"]
            if device.type == "cpu":
                peak = common.cpu_peak_mib(calls[chunk])
            r = common.ratio(seconds, timed[base]["seconds"])
            rows.append({
                "posterior": posterior, "chunk": chunk, "images": args.images,
                "samples": args.samples,
                "ms_per_image": 1e3 * statistics.median(seconds) / args.images,
                "ratio": r, "peak_mib": peak, "nll": figures[chunk]["nll"],
                "nll_difference": abs(figures[chunk]["nll"] - figures[base]["nll"]),
            })  # fmt: skip
            print(f"{posterior:10}{chunk:7d}{rows[-1]['ms_per_image']:10.2f}"
                  f"{common.ratio_text(r):>20}{peak:10.1f}")  # fmt: skip
    settings = {"images": args.images, "samples": args.samples, "chunks": args.chunks,
                "rounds": args.rounds, "base_chunk": base, "batch_size": 100,
                "vae": "MLP 784-300-300, 64 latents, 4 flow layers, untrained"}  # fmt: skip
    common.write("eval_chunks", device, {"settings": settings, "rows": rows})


if __name__ == "__main__":
    main()
