"""Throughput of VAE training and log p(x) evaluation on 1 and N processes of
torch.distributed, and the scaling efficiency.

    python benchmarks/distributed.py [--device cuda] [--processes 2] [--rounds 5]
        [--batch-sizes 100 1000]

The VAE is the IAF paper's MLP one (784-300-300 encoder and decoder, 40 latent dimensions,
a 2-layer IAF), trained with ``pyroflows.vae.train`` (Adamax) for one epoch on
``--train-images`` images at each of ``--batch-sizes`` (the global batch), then evaluated
with ``pyroflows.vae.evaluate`` (``--samples`` importance samples per image) on
``--eval-images`` images. Each round starts fresh processes (one thread each): one process
alone, without a process group, then ``--processes`` under gloo (CPU) or NCCL (CUDA, one GPU
each), taking turns. The time of each job is taken inside the processes between barriers,
after an untimed warm-up epoch on 200 images, so start-up and rendezvous do not count.

Reported: images per second, the time ratio (N processes / one) per round as median and
min-max spread, the scaling efficiency ``speed-up / N``, the peak RSS of each process (CPU;
every process holds the data) or its CUDA peak allocation, and how far the N-process run's
final validation -ELBO and test NLL are from the one-process run's (the same steps, so
rounding only). Images are statically binarized MNIST from ../shared/data when present, the
bundled digits otherwise. Writes benchmarks/results/distributed.json (``-cuda`` on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import common
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyroflows as pf
from pyroflows.vae import VAE, BinaryImages, evaluate, train


def _data(args: argparse.Namespace) -> tuple[BinaryImages, str]:
    data = pf.vae.load(common.MNIST if common.MNIST.exists() else "digits")
    n = args.train_images
    train_x = data.train.repeat(-(-n // len(data.train)), 1)[:n]
    return BinaryImages(train_x, data.valid[:500], data.test[: args.eval_images],
                        data.image_shape, data.name), data.name  # fmt: skip


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _worker(rank: int, world: int, folder: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    if world > 1:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{folder}/rendezvous",
                                rank=rank, world_size=world)  # fmt: skip
    data, _ = _data(args)
    data = data.to(device)
    torch.manual_seed(0)
    vae = VAE(data.image_shape, latent_dim=40, flow="iaf", num_layers=2, hidden_dim=300)
    vae.to(device)
    warnings.filterwarnings("ignore", message="log_marginal_likelihood")  # untrained: timing
    warm = BinaryImages(data.train[:200], data.valid[:100], data.test[:1], data.image_shape, "")
    train(vae, warm, epochs=1, batch_size=100, progress=False)  # first calls, not timed
    times = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for job in [*(f"train, batch {b}" for b in args.batch_sizes), "evaluate"]:
        if world > 1:
            dist.barrier()
        common.sync(device)
        start = time.perf_counter()
        if job == "evaluate":
            nll = evaluate(vae, data.test, num_samples=args.samples, chunk_size=args.chunk)["nll"]
        else:
            run = train(vae, data, epochs=1, batch_size=int(job.split()[-1]), progress=False)
        common.sync(device)
        times[job] = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
            else _rss_mib())  # fmt: skip
    record = {"times": times, "peak_mib": peak, "valid": run.history[-1]["valid_loss"],
              "nll": nll}  # fmt: skip
    Path(folder, f"rank{rank}.json").write_text(json.dumps(record))
    if world > 1:
        dist.destroy_process_group()


def _round(world: int, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_worker, args=(world, folder, args), nprocs=world, join=True,
                           start_method="spawn")  # fmt: skip
        return [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--chunk", type=int, default=250)
    args = parser.parse_args()
    device = common.cuda_device(args.device)
    if device.type == "cuda" and torch.cuda.device_count() < args.processes:
        raise SystemExit(f"--processes {args.processes} needs as many GPUs, "
                         f"found {torch.cuda.device_count()}")  # fmt: skip
    name = _data(args)[1]
    worlds = (1, args.processes)
    rounds = {w: [] for w in worlds}
    for _ in range(args.rounds):
        for w in worlds:  # taking turns
            rounds[w].append(_round(w, args))
    one, many = rounds[1], rounds[args.processes]
    figures = {"settings": {**vars(args), "data": name, "threads_per_process": 1,
                            "vae": "784-300-300 MLPs, 40 latent, 2-layer IAF"}}
    rows = []
    jobs = [(f"train, batch {b}", args.train_images) for b in args.batch_sizes]
    for job, count in [*jobs, ("evaluate", args.eval_images)]:
        t1 = [r[0]["times"][job] for r in one]
        tn = [max(p["times"][job] for p in r) for r in many]  # the slowest process
        r = common.ratio(tn, t1)
        speedup = 1 / r["median"]
        figures[job] = {
            "images": count,
            "seconds": {"1": t1, str(args.processes): tn},
            "images_per_second": {"1": count / statistics.median(t1),
                                  str(args.processes): count / statistics.median(tn)},
            "time_ratio": r, "speedup": speedup, "efficiency": speedup / args.processes,
        }  # fmt: skip
        rows.append((job, count / statistics.median(t1), count / statistics.median(tn), r,
                     speedup / args.processes))  # fmt: skip
    figures["peak_mib_per_process"] = {
        "1": max(r[0]["peak_mib"] for r in one),
        str(args.processes): max(p["peak_mib"] for r in many for p in r),
    }
    figures["agreement"] = {
        "valid_loss_abs_diff": max(abs(p["valid"] - one[0][0]["valid"]) for r in many for p in r),
        "nll_abs_diff": max(abs(p["nll"] - one[0][0]["nll"]) for r in many for p in r),
    }
    n = args.processes
    print(f"{name}, {device.type}, one thread per process, {args.rounds} rounds")
    print(f"{'job':18}{'images/s (1)':>14}{f'images/s ({n})':>14}{f'time {n}/1':>22}"
          f"{'efficiency':>12}")  # fmt: skip
    for job, a, b, r, eff in rows:
        print(f"{job:18}{a:14.1f}{b:14.1f}{common.ratio_text(r):>22}{eff:12.2f}")
    peaks = figures["peak_mib_per_process"]
    print(f"peak MiB per process: {peaks['1']:.0f} (1), {peaks[str(n)]:.0f} ({n})")
    print("N against 1 process:", figures["agreement"])
    common.write("distributed", device, figures)


if __name__ == "__main__":
    main()
