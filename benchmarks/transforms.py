"""Forward + log-det, back-propagation and inverse time per batch: pyroflows vs Pyro.

    python benchmarks/transforms.py [--device cuda] [--dims 16 64] [--batch 1024]

Prints a table and writes benchmarks/results/transforms.json (device, versions, figures).
A ratio below 1 means pyroflows is faster. The inverse (with its log-det) of points the flow
did not produce is timed for both where Pyro has one (IAF); Pyro's planar, radial and
Sylvester cannot invert such points, so only pyroflows' numerical inverse is timed there.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import common
import pyro
import pyro.distributions.transforms as T
import torch

from pyroflows.transforms import Autoregressive, Planar, Radial, Sylvester

NUM_HOUSEHOLDER = 4


def pairs(dim: int) -> dict[str, tuple[Callable, Callable]]:
    hidden = [4 * dim, 4 * dim]
    return {
        "iaf": (
            lambda: Autoregressive(dim, hidden_dims=hidden),
            lambda: T.AffineAutoregressive(pyro.nn.AutoRegressiveNN(dim, hidden)),
        ),
        "planar": (lambda: Planar(dim), lambda: T.Planar(dim)),
        "radial": (lambda: Radial(dim), lambda: T.Radial(dim)),
        "sylvester-householder": (
            lambda: Sylvester(dim, kind="householder", num_householder=NUM_HOUSEHOLDER),
            lambda: T.Sylvester(dim, count_transforms=NUM_HOUSEHOLDER),
        ),
    }


def workloads(
    make: Callable, dim: int, batch: int, device: torch.device, invertible: bool
) -> dict[str, Callable | None]:
    torch.manual_seed(0)
    t = make().to(device)
    x0 = torch.randn(batch, dim, device=device)

    def forward():
        x = x0.clone()  # a new tensor each call, so neither library's cache short-cuts it
        y = t(x)
        return y, t.log_abs_det_jacobian(x, y)

    def forward_backward():
        y, ladj = forward()
        (y.square().sum() + ladj.sum()).backward()

    def inverse():
        with torch.no_grad():
            y = x0.clone()  # a point the flow did not produce
            x = t.inv(y)
            return x, t.log_abs_det_jacobian(x, y)

    return {
        "forward_ms": forward,
        "forward_backward_ms": forward_backward,
        "inverse_ms": inverse if invertible else None,
    }


def compare(ours: dict, theirs: dict, device: torch.device, repeats: int) -> tuple[dict, dict]:
    """Median milliseconds of each workload, the two implementations timed alternately."""
    times: dict = {(who, k): [] for who in ("ours", "theirs") for k in ours}
    for key in ours:
        contenders = [(who, fn[key]) for who, fn in (("ours", ours), ("theirs", theirs))]
        contenders = [(who, fn) for who, fn in contenders if fn is not None]
        for _, fn in contenders:
            for _ in range(5):
                fn()
        for _ in range(repeats):
            for who, fn in contenders:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[who, key].append(1e3 * (time.perf_counter() - start))
    a = {k: statistics.median(times["ours", k]) for k in ours}
    b = {k: statistics.median(times["theirs", k]) if times["theirs", k] else None for k in ours}
    return a, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    device = common.cuda_device(args.device)
    rows = []
    columns = ("ours fwd", "pyro fwd", "ratio", "ours f+b", "pyro f+b", "ratio", "ours inv")
    columns += ("pyro inv", "ratio")
    widths = (11, 11, 7, 11, 11, 7, 11, 11, 7)
    cells = (f"{c:>{w}}" for c, w in zip(columns, widths, strict=True))
    print(f"{'family':24}{'dim':>5}" + "".join(cells))
    for dim in args.dims:
        for family, (ours, theirs) in pairs(dim).items():
            a, b = compare(
                workloads(ours, dim, args.batch, device, invertible=True),
                workloads(theirs, dim, args.batch, device, invertible=family == "iaf"),
                device,
                args.repeats,
            )
            ratios = {k: a[k] / b[k] if b[k] else None for k in a}
            rows.append(
                {
                    "family": family,
                    "dim": dim,
                    "batch": args.batch,
                    "pyroflows": a,
                    "pyro": b,
                    "forward_ratio": ratios["forward_ms"],
                    "forward_backward_ratio": ratios["forward_backward_ms"],
                    "inverse_ratio": ratios["inverse_ms"],
                }
            )
            line = f"{family:24}{dim:5d}"
            for key in a:
                theirs_text = "-" if b[key] is None else f"{b[key]:9.3f}ms"
                ratio_text = "-" if ratios[key] is None else f"{ratios[key]:.2f}"
                line += f"{a[key]:9.3f}ms{theirs_text:>11}{ratio_text:>7}"
            print(line)
    common.write("transforms", device, {"rows": rows}, pyro=pyro.__version__)


if __name__ == "__main__":
    main()
