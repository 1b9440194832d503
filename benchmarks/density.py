"""Density estimation on the 8x8 digits: bits per dimension and training time per epoch of
pyroflows' recipes against zuko's MAF and NSF, on the same budget, in one run.

    python benchmarks/density.py [--device cuda] [--epochs 10] [--flows maf realnvp ...]

scikit-learn's 1797 digits on their 17 grey levels (the fixed 1397 / 200 / 200 split), every
contender on the same preprocessing: uniform dequantization, RealNVP's logit with alpha 0.05
and a standardization from the training images (pyroflows' ``Dequantization`` and
``DensityModel.standardize``, so only the flow differs). Each trains ``--epochs`` epochs of
Adam (lr 1e-3, batch 100, no early stopping), the contenders taking turns epoch by epoch;
time per epoch is the median over epochs and its ratio to zuko's MAF the median of the
per-epoch ratios with their min-max spread. Peak memory is that of one training step (torch's
CPU allocations, or CUDA max allocated above what was allocated before). Test bits per
dimension use 16 dequantization draws per image (the importance-weighted bound). Five layers
of (128, 128) hidden units everywhere; the CNF is one Hutchinson-trace layer trained with
``checkpoint=True`` and evaluated with the exact trace.
Prints a table and writes benchmarks/results/density.json (density-cuda.json on CUDA).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import common
import torch
import zuko
from torch import nn

from pyroflows.density import DensityModel
from pyroflows.density.data import load

HIDDEN = (128, 128)
LAYERS = 5
LOG_2 = math.log(2.0)


class Zuko(nn.Module):
    """A zuko flow on the same dequantized, standardized space as pyroflows' models."""

    def __init__(self, reference: DensityModel, flow: nn.Module) -> None:
        super().__init__()
        self.dequantizer, self.flow, self.dim = reference.dequantizer, flow, reference.dim
        self.register_buffer("loc", reference.loc.clone())
        self.register_buffer("scale", reference.scale.clone())

    def log_prob(self, x: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
        z, correction = self.dequantizer(x.expand(num_samples, *x.shape))
        u = (z - self.loc) / self.scale
        draws = self.flow().log_prob(u) - self.scale.log().sum() + correction
        return torch.logsumexp(draws, 0) - math.log(num_samples)


def ours(flow: str, train: torch.Tensor, device: torch.device) -> DensityModel:
    options: dict = {"hidden_dims": HIDDEN}
    if flow == "cnf":
        options = {"hidden_dims": HIDDEN, "trace": "hutchinson", "checkpoint": True,
                   "rtol": 1e-4, "atol": 1e-5}  # fmt: skip
    model = DensityModel(64, flow, 1 if flow == "cnf" else LAYERS, dequantize="uniform",
                         levels=17, **options).to(device)  # fmt: skip
    model.standardize(train)
    return model


def train_epoch(model: nn.Module, optimizer, train: torch.Tensor, batch: int) -> None:
    order = torch.randperm(len(train), device=train.device)
    for start in range(0, len(train), batch):
        loss = -model.log_prob(train[order[start : start + batch]]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def step_peak(model: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        (-model.log_prob(x).mean()).backward()

    if device.type == "cpu":
        return common.cpu_peak_mib(step)
    before = common.cuda_peak_reset(device)
    step()
    return common.cuda_peak_mib(device, before)


@torch.no_grad()
def test_bits(model: nn.Module, test: torch.Tensor) -> float:
    model.eval()
    if isinstance(model, DensityModel) and model.config["flow"] == "cnf":
        for layer in model.layers:
            layer.trace = "exact"
    torch.manual_seed(0)
    return -model.log_prob(test, num_samples=16).mean().item() / (64 * LOG_2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    flows = ["maf", "realnvp", "glow", "nsf-coupling", "cnf"]
    parser.add_argument("--flows", nargs="+", default=flows)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = common.cuda_device(args.device)
    data = load("digits").to(device)
    torch.manual_seed(0)
    contenders: dict[str, nn.Module] = {f"pyroflows {f}": ours(f, data.train, device)
                                        for f in args.flows}  # fmt: skip
    reference = contenders[next(iter(contenders))]
    contenders["zuko MAF"] = Zuko(reference, zuko.flows.MAF(64, transforms=LAYERS,
                                                            hidden_features=HIDDEN)).to(device)
    contenders["zuko NSF"] = Zuko(reference, zuko.flows.NSF(64, transforms=LAYERS,
                                                            hidden_features=HIDDEN)).to(device)
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in contenders.items()}
    seconds: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(args.epochs):
        for name, model in contenders.items():
            model.train()
            start = time.perf_counter()
            train_epoch(model, optimizers[name], data.train, args.batch)
            common.sync(device)
            seconds[name].append(time.perf_counter() - start)
    rows = {}
    batch = data.train[: args.batch]
    print(f"{'contender':24}{'s/epoch':>9}  {'vs zuko MAF [spread]':22}{'peak MiB':>9}"
          f"{'valid b/d':>11}{'test b/d':>10}")  # fmt: skip
    for name, model in contenders.items():
        with torch.no_grad():
            torch.manual_seed(0)
            model.eval()
            valid = -model.log_prob(data.valid).mean().item() / (64 * LOG_2)
        model.train()
        row = {
            "seconds_per_epoch": statistics.median(seconds[name]),
            "ratio_to_zuko_maf": common.ratio(seconds[name], seconds["zuko MAF"]),
            "peak_mib": step_peak(model, batch, device),
            "valid_bits_per_dim": valid,
            "test_bits_per_dim": test_bits(model, data.test),
        }
        rows[name] = row
        print(f"{name:24}{row['seconds_per_epoch']:9.2f}  "
              f"{common.ratio_text(row['ratio_to_zuko_maf']):22}{row['peak_mib']:9.1f}"
              f"{row['valid_bits_per_dim']:11.3f}{row['test_bits_per_dim']:10.3f}")  # fmt: skip
    print(f"uniform over 17 levels: {math.log2(17):.3f} bits/dim")
    common.write(
        "density",
        device,
        {
            "settings": {
                "data": "digits (17 levels)",
                "epochs": args.epochs,
                "batch": args.batch,
                "layers": LAYERS,
                "hidden": HIDDEN,
                "dequantization": "uniform, logit alpha 0.05",
                "lr": 1e-3,
                "test_samples": 16,
            },
            "rows": rows,
        },
        zuko=zuko.__version__,
    )


if __name__ == "__main__":
    main()
