"""The flow-VAE table on statically binarized MNIST: test -ELBO and NLL per posterior, with
the published numbers beside them.

    python benchmarks/vae_table.py [--device cuda] [--epochs 10] [--flows none iaf ...]
        [--eval-samples 5000] [--eval-images 10000] [--merge] [--out DIR]

Every posterior is trained by ``pyroflows.vae.train`` with the same settings (MLP 784-300-300
encoder and decoder, ``--latent-dim`` latents, Adamax at ``--lr``, batch 100, KL warm-up over
``--warmup-epochs``, the best epoch by validation ELBO kept), then evaluated on the first
``--eval-images`` test images: -ELBO and the importance-sampled NLL with ``--eval-samples``
samples per image. The published numbers (van den Berg et al., 2018; Grathwohl et al., 2019)
come from hundreds of epochs with larger flows and gated-convolution networks; the ordering
is what a short run can be compared on. Needs ../shared/data/binarized_mnist.npz (or
``--data``). Writes benchmarks/results/vae_table.json and docs/vae-results.md; with
``--merge`` the rows of posteriors not run now (or run with other options) are kept from the
existing JSON (same device), each row with its own epochs and evaluation settings. With
``--out DIR`` each posterior trains with checkpoints in ``DIR/NAME`` (``DIR/cnf-exact`` with
``--cnf-trace exact``) and a later call resumes from them (a
finished training just loads its best epoch), so a run stopped during a long evaluation
need not train again; such a row says ``resumed`` and its time is that call's. Under
``torchrun`` (gloo on the CPU, NCCL on GPUs) each posterior trains data-parallel (the
one-process gradients, to rounding) and is evaluated with the test images shared out over
the processes (the one-process figures); rank 0 writes them, and each row names its number
of ``processes``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common
import torch

import pyroflows as pf
from pyroflows.vae import VAE, evaluate, train
from pyroflows.vae.train import CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]
MNIST_TEST_IMAGES = 10_000  # statically binarized MNIST's test set
PUBLISHED_NEG_ELBO = {  # test -ELBO on static binarized MNIST
    "none": 86.55, "planar": 86.06, "iaf": 84.20, "sylvester-o": 83.32, "cnf": 82.82,
}  # fmt: skip
FLOWS = ["none", "planar", "iaf", "sylvester-o", "sylvester-h", "sylvester-t", "cnf"]
FLOW_OPTIONS = {
    "iaf": {"hidden_dims": (320,)},  # the Sylvester paper's MADE: one hidden layer of 320 units
    "sylvester-o": {"num_columns": 32},  # the paper's M = 32 orthogonal columns
    # FFJORD: Hutchinson's estimate in training (evaluation is exact), per-image low-rank updates
    "cnf": {"trace": "hutchinson", "rank": 16},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default=str(common.MNIST))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--flows", nargs="+", default=FLOWS)
    parser.add_argument("--layers", type=int, default=4, help="flow layers (cnf: 1)")
    parser.add_argument("--latent-dim", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup-epochs", type=int, default=2)
    parser.add_argument("--cnf-regularization", type=float, default=0.0,
                        help="the CNF's RNODE weight in training (default 0)")  # fmt: skip
    parser.add_argument("--cnf-trace", default="hutchinson", choices=["hutchinson", "exact"],
                        help="the CNF's trace in training (FFJORD's by default)")  # fmt: skip
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--merge", action="store_true", help="keep the other posteriors' rows")
    parser.add_argument("--out", type=Path, default=None, help="checkpoints, to resume")
    parser.add_argument("--name", default="vae_table", help="results/NAME.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = common.cuda_device(args.device)
    if not Path(args.data).exists():
        raise SystemExit(f"needs statically binarized MNIST: {args.data} is absent (--data)")
    with pf.distributed.from_environment(device) as device:
        _run(args, device)


def _run(args: argparse.Namespace, device: torch.device) -> None:
    """Train and evaluate each posterior (every process, under ``torchrun``); rank 0 prints
    and writes."""
    rank, processes = pf.distributed.rank_and_world()
    data = pf.vae.load(args.data).to(device)
    settings = {k: getattr(args, k) for k in ("epochs", "layers", "latent_dim", "lr",
                "warmup_epochs", "eval_samples", "eval_images")}  # fmt: skip
    settings |= {"batch_size": 100, "optimizer": "adamax", "architecture": "mlp 300-300"}
    rows = []
    header = f"{'posterior':14}{'epochs':>7}{'train s':>9}{'-ELBO':>9}{'NLL':>9}{'published':>11}"
    if rank == 0:
        print(header)
    for flow in args.flows:
        torch.manual_seed(0)
        layers = 1 if flow == "cnf" else args.layers
        options = FLOW_OPTIONS.get(flow, {})
        if flow == "cnf":
            options = {**options, "trace": args.cnf_trace}
        vae = VAE(data.image_shape, args.latent_dim, flow, layers, hidden_dim=300, **options)
        vae.to(device)
        folder = f"{flow}-exact" if options.get("trace") == "exact" else flow
        out = None if args.out is None else args.out / folder
        resumed = out is not None and (out / CHECKPOINT).exists()
        start = time.perf_counter()
        regularization = args.cnf_regularization if flow == "cnf" else 0.0
        run = train(vae, data, epochs=args.epochs, batch_size=100, lr=args.lr,
                    warmup_epochs=args.warmup_epochs, regularization=regularization,
                    progress=False, out=out, resume=resumed)  # fmt: skip
        if regularization:
            options = {**options, "regularization": regularization}
        seconds = time.perf_counter() - start
        test = evaluate(vae, data.test[: args.eval_images], num_samples=args.eval_samples)
        published = PUBLISHED_NEG_ELBO.get(flow)
        rows.append({"posterior": flow, "layers": layers, "options": options,
                     "epochs": len(run.history),
                     "best_epoch": run.best_epoch, "train_seconds": seconds, **test,
                     "published_neg_elbo": published, "stopped": run.stopped,
                     "resumed": resumed, "processes": processes,
                     "settings": settings})  # fmt: skip
        if rank != 0:
            continue
        shown = "-" if published is None else f"{published:.2f}"
        print(f"{flow:14}{len(run.history):7d}{seconds:9.0f}{test['neg_elbo']:9.2f}"
              f"{test['nll']:9.2f}{shown:>11}")  # fmt: skip
        # written after every posterior, so that a long run stopped later keeps what it finished
        kept = _merged(rows, args.name, device) if args.merge else rows
        common.write(args.name, device, {"settings": settings, "rows": kept})
        _markdown()


def _merged(rows: list[dict], name: str, device: torch.device) -> list[dict]:
    """The existing rows of other posteriors with the new ones, in the order of ``FLOWS``;
    each keeps the settings it ran with (``settings`` in its row)."""
    path = common.result_path(name, device)
    if not path.exists():
        return rows
    old = json.loads(path.read_text())
    new = {_key(row): row for row in rows}
    kept = [r | {"settings": r.get("settings", old["settings"])} for r in old["rows"]]
    merged = {_key(r): r for r in kept} | new
    return sorted(merged.values(), key=lambda r: [*FLOWS, r["posterior"]].index(r["posterior"]))


def _key(row: dict) -> tuple[str, str]:
    """A row's posterior and options: a posterior trained another way gets a row of its own."""
    return row["posterior"], json.dumps(row["options"], sort_keys=True)


def _flags(row: dict) -> str:
    """The command-line flags that give a row's CNF options."""
    options = row["options"]
    flags = "" if options.get("trace", "hutchinson") == "hutchinson" else " --cnf-trace exact"
    if options.get("regularization"):
        flags += f" --cnf-regularization {options['regularization']}"
    return flags


def _markdown() -> None:
    """docs/vae-results.md: a table per results file (``vae_table*.json``), with its settings
    and the commands that give it."""
    paths = common.RESULTS.glob("vae_table*.json")
    results = [(path, json.loads(path.read_text())) for path in paths]
    results.sort(key=lambda pair: [pair[1]["settings"][k] for k in ("epochs", "eval_images")])
    lines = [
        "# VAE results on statically binarized MNIST",
        "",
        "Every posterior: MLP 784-300-300 encoder and decoder, 4 flow layers (CNF: 1), each "
        "posterior's options beside it (IAF's MADE with one hidden layer of 320 units, as in "
        "the Sylvester paper; orthogonal Sylvester's 32 columns; the CNF's trace in training, "
        "evaluation being exact, with `rank`, FFJORD's per-image low-rank updates of its "
        "dynamics, and with `regularization`, the RNODE weight in its training loss), "
        "Adamax, batch 100, KL warm-up, the best epoch by validation ELBO; test "
        "figures on the first test images (columns), NLL with K importance samples per image.",
        "",
        "The published -ELBO (van den Berg et al., 2018, for the VAE, planar, IAF and "
        "orthogonal Sylvester; Grathwohl et al., 2019, for FFJORD) comes from hundreds of "
        "epochs with gated-convolution networks and 16-layer flows: a short run is compared "
        "with it on ordering, not on value.",
    ]
    for path, result in results:
        lines += _table(result, path)
    (ROOT / "docs" / "vae-results.md").write_text("\n".join(lines) + "\n")


def _table(result: dict, path: Path) -> list[str]:
    """One results file as a markdown section."""
    rows, settings = result["rows"], result["settings"]
    where = result["device"] if result["device_type"] == "cuda" else "CPU, 1 thread"
    name = "" if result["benchmark"] == "vae_table" else f" --name {result['benchmark']}"
    runs = {}
    for r in rows:
        s = r["settings"]
        command = (f"python benchmarks/vae_table.py --epochs {s['epochs']} --warmup-epochs "
                   f"{s['warmup_epochs']} --eval-samples {s['eval_samples']} --eval-images "
                   f"{s['eval_images']}{name}{_flags(r)}")  # fmt: skip
        runs.setdefault(command, []).append(r["posterior"])
    commands = [f"`{c}`" + (f" (with `--flows {' '.join(names)} --merge`)" if len(runs) > 1
                else "") for c, names in runs.items()]  # fmt: skip
    epochs = sorted({r["settings"]["epochs"] for r in rows})
    n = settings["eval_images"]
    images = f"all {n}" if n == MNIST_TEST_IMAGES else f"the first {n}"
    lines = [
        "",
        f"## {' and '.join(map(str, epochs))} epochs, {where}: {images} test images, "
        f"K = {settings['eval_samples']}",
        "",
        f"Measured by {'; '.join(commands)} (figures in `benchmarks/results/{path.name}`): "
        f"{settings['latent_dim']} latents, Adamax at {settings['lr']}, KL warm-up over "
        f"{settings['warmup_epochs']} epochs.",
        "",
        "| posterior | options | epochs | train time (s) | test images | test -ELBO | "
        "test NLL (K) | published -ELBO |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        published = "-" if r["published_neg_elbo"] is None else f"{r['published_neg_elbo']:.2f}"
        options = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        # a resumed row's time is its own call's, not its training's
        seconds = "resumed" if r.get("resumed") else f"{r['train_seconds']:.0f}"
        if r.get("processes", 1) > 1:
            seconds += f" ({r['processes']} processes)"
        lines.append(f"| {r['posterior']} | {options} | {r['epochs']} | {seconds} | "
                     f"{r['images']} | {r['neg_elbo']:.2f} | {r['nll']:.2f} ± "
                     f"{r['nll_stderr']:.2f} ({r['num_samples']}) | {published} |")  # fmt: skip
    return lines


if __name__ == "__main__":
    main()
