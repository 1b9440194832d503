"""Forward + log-det, back-propagation and inverse time per batch: pyroflows vs Pyro.

    python benchmarks/transforms.py [--device cuda] [--dims 16 64] [--batch 1024] [--rounds 7]

Each round times ``--calls`` calls of pyroflows' layer and then of Pyro's; a figure is the
median over rounds, and the ratio (below 1: pyroflows faster) is the median of the per-round
ratios with their min-max spread. Peak memory is CUDA max allocated above what was allocated
before (GPU), or the peak of torch's CPU allocations during one call (CPU). Pyro's Sylvester
builds a CPU matrix inside its forward and fails on CUDA; the JSON says so. Prints a table
and writes benchmarks/results/transforms.json (transforms-cuda.json on CUDA).

The inverse (with its log-det) of points the flow did not produce is timed for both where
Pyro has one (IAF); Pyro's planar, radial and Sylvester cannot invert such points, so only
pyroflows' numerical inverse is timed there.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
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
    # new values each call, so that neither library's cache (nor a warm start) short-cuts it
    points = itertools.cycle([torch.randn(batch, dim, device=device) for _ in range(5)])

    def forward():
        x = next(points).clone()
        y = t(x)
        return y, t.log_abs_det_jacobian(x, y)

    def forward_backward():
        y, ladj = forward()
        (y.square().sum() + ladj.sum()).backward()

    def inverse():
        with torch.no_grad():
            y = next(points).clone()  # a point the flow did not produce
            x = t.inv(y)
            return x, t.log_abs_det_jacobian(x, y)

    return {
        "forward": forward,
        "forward+backward": forward_backward,
        "inverse": inverse if invertible else None,
    }


def compare(ours: dict, theirs: dict, device: torch.device, args) -> dict:
    """Per workload: each side's median ms per call, peak memory, and the median ratio with
    its spread over rounds, the two sides taking turns within each round."""
    out = {}
    for key, mine in ours.items():
        calls = {"pyroflows": mine}
        if theirs.get(key) is not None:
            calls["pyro"] = theirs[key]
        for call in calls.values():
            for _ in range(3):  # warm-up
                call()
        runs = common.alternate(calls, args.rounds, device, repeat=args.calls)
        row = {}
        for name, run in runs.items():
            if device.type == "cpu":
                run["peak_mib"] = common.cpu_peak_mib(calls[name])
            row[name] = {"ms": 1e3 * statistics.median(run["seconds"]), "peak_mib": run["peak_mib"]}
        if "pyro" in runs:
            row["ratio"] = common.ratio(runs["pyroflows"]["seconds"], runs["pyro"]["seconds"])
        out[key] = row
    return out


def pyro_fails(make: Callable, dim: int, device: torch.device) -> str | None:
    """Why Pyro's layer cannot run here (its Sylvester builds a CPU identity matrix), or None."""
    try:
        t = make().to(device)
        t(torch.randn(2, dim, device=device))
    except RuntimeError as error:
        return str(error).splitlines()[0]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20, help="calls per contender and round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = common.cuda_device(args.device)
    rows = []
    print(f"{'family':24}{'dim':>5}  {'workload':21}{'ours ms':>9}{'pyro ms':>9}"
          f"  {'ratio [spread]':20}{'ours MiB':>9}{'pyro MiB':>9}")  # fmt: skip
    for dim in args.dims:
        for family, (ours, theirs) in pairs(dim).items():
            failure = pyro_fails(theirs, dim, device)
            peer = {} if failure else workloads(theirs, dim, args.batch, device, family == "iaf")
            result = compare(workloads(ours, dim, args.batch, device, True), peer, device, args)
            rows.append({"family": family, "dim": dim, "batch": args.batch,
                         "pyro_fails": failure, "workloads": result})  # fmt: skip
            for key, r in result.items():
                theirs_r = r.get("pyro", {})
                ratio = common.ratio_text(r.get("ratio"))
                print(
                    f"{family:24}{dim:5d}  {key:21}{r['pyroflows']['ms']:9.3f}"
                    f"{theirs_r.get('ms', float('nan')):9.3f}  {ratio:20}"
                    f"{_mib(r['pyroflows']['peak_mib'])}{_mib(theirs_r.get('peak_mib'))}"
                )
            if failure:
                print(f"{'':29}pyro fails on {device.type}: {failure}")
    common.write(
        "transforms",
        device,
        {"settings": {"batch": args.batch, "rounds": args.rounds, "calls": args.calls},
         "rows": rows},
        pyro=pyro.__version__,
    )  # fmt: skip


def _mib(value: float | None) -> str:
    return f"{'-':>9}" if value is None else f"{value:9.1f}"


if __name__ == "__main__":
    main()
