"""Forward + log-det, back-propagation and inverse time per batch: pyroflows vs Pyro (and zuko).

    python benchmarks/transforms.py [--device cuda] [--dims 16 64] [--batch 1024] [--rounds 7]

Each round times ``--calls`` calls of pyroflows' layer and then of Pyro's; a figure is the
median over rounds, and the ratio (below 1: pyroflows faster) is the median of the per-round
ratios with their min-max spread. Peak memory is CUDA max allocated above what was allocated
before (GPU), or the peak of torch's CPU allocations during one call (CPU). Pyro's Sylvester
builds a CPU matrix inside its forward and fails on CUDA; the JSON says so. Prints a table
and writes benchmarks/results/transforms.json (transforms-cuda.json on CUDA).

The inverse (with its log-det) of points the flow did not produce is timed for both where
Pyro has one (IAF, splines); Pyro's planar, radial and Sylvester cannot invert such points,
so only pyroflows' numerical inverse is timed there.

The neural spline layers (8 bins on [-5, 5], the same widths) are compared with Pyro's
rational-quadratic ``SplineAutoregressive`` and ``SplineCoupling`` (``order="quadratic"``)
and with zuko's ``NSF`` (one autoregressive transform; two passes for the coupling), whose
fastest path builds its transform from the module and calls ``call_and_ladj``.
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
import zuko
from pyro.nn import DenseNN

from pyroflows.transforms import Autoregressive, Coupling, Planar, Radial, Sylvester

NUM_HOUSEHOLDER = 4
BINS, BOUND = 8, 5.0


def pyro_spline_autoregressive(dim: int, hidden: list[int]) -> T.SplineAutoregressive:
    """Built by hand: Pyro's ``spline_autoregressive(order="quadratic")`` gives its network
    the linear spline's four outputs and fails."""
    net = pyro.nn.AutoRegressiveNN(dim, hidden, param_dims=[BINS, BINS, BINS - 1])
    return T.SplineAutoregressive(dim, net, count_bins=BINS, bound=BOUND, order="quadratic")


def pyro_spline_coupling(dim: int, hidden: list[int]) -> T.SplineCoupling:
    split, rest = (dim + 1) // 2, dim - (dim + 1) // 2
    net = DenseNN(split, hidden, param_dims=[rest * BINS, rest * BINS, rest * (BINS - 1)])
    return T.SplineCoupling(dim, split, net, count_bins=BINS, bound=BOUND, order="quadratic")


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
        "spline-autoregressive": (
            lambda: Autoregressive(dim, hidden_dims=hidden, transformer="spline", bins=BINS,
                                   bound=BOUND),
            lambda: pyro_spline_autoregressive(dim, hidden),
            lambda: zuko.flows.NSF(dim, bins=BINS, transforms=1, hidden_features=hidden),
        ),
        "spline-coupling": (
            lambda: Coupling(dim, kind="spline", hidden_dims=hidden, bins=BINS, bound=BOUND),
            lambda: pyro_spline_coupling(dim, hidden),
            lambda: zuko.flows.NSF(dim, bins=BINS, transforms=1, passes=2,
                                   hidden_features=hidden),
        ),
    }  # fmt: skip


def workloads(
    make: Callable, dim: int, batch: int, device: torch.device, invertible: bool
) -> dict[str, Callable | None]:
    torch.manual_seed(0)
    t = make().to(device)
    # new values each call, so that neither library's cache (nor a warm start) short-cuts it
    points = itertools.cycle([torch.randn(batch, dim, device=device) for _ in range(5)])
    if isinstance(t, zuko.flows.Flow):  # zuko: build the transform, then call_and_ladj
        return _zuko_workloads(t.transform, points)

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


def _zuko_workloads(lazy, points) -> dict[str, Callable]:
    def forward():
        return lazy(None).call_and_ladj(next(points).clone())

    def forward_backward():
        y, ladj = forward()
        (y.square().sum() + ladj.sum()).backward()

    def inverse():
        with torch.no_grad():
            return lazy(None).inv.call_and_ladj(next(points).clone())

    return {"forward": forward, "forward+backward": forward_backward, "inverse": inverse}


def compare(ours: dict, peers: dict[str, dict], device: torch.device, args) -> dict:
    """Per workload: each contender's median ms per call and peak memory, and the median
    ratio to each peer with its spread over rounds, all taking turns within each round."""
    out = {}
    for key, mine in ours.items():
        calls = {"pyroflows": mine}
        calls |= {name: w[key] for name, w in peers.items() if w.get(key) is not None}
        for call in calls.values():
            for _ in range(3):  # warm-up
                call()
        runs = common.alternate(calls, args.rounds, device, repeat=args.calls)
        row = {}
        for name, run in runs.items():
            if device.type == "cpu":
                run["peak_mib"] = common.cpu_peak_mib(calls[name])
            row[name] = {"ms": 1e3 * statistics.median(run["seconds"]), "peak_mib": run["peak_mib"]}
        for name in calls.keys() - {"pyroflows"}:
            suffix = "" if name == "pyro" else f"_{name}"
            row[f"ratio{suffix}"] = common.ratio(runs["pyroflows"]["seconds"],
                                                 runs[name]["seconds"])  # fmt: skip
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
    parser.add_argument("--families", nargs="+", default=None, help="default: all")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = common.cuda_device(args.device)
    rows = []
    print(f"{'family':24}{'dim':>5}  {'workload':21}{'ours ms':>9}{'pyro ms':>9}"
          f"  {'ratio [spread]':20}{'ours MiB':>9}{'pyro MiB':>9}")  # fmt: skip
    for dim in args.dims:
        for family, (ours, theirs, *zuko_nsf) in pairs(dim).items():
            if args.families and family not in args.families:
                continue
            failure = pyro_fails(theirs, dim, device)
            invertible = family == "iaf" or family.startswith("spline")
            peers = {} if failure else {"pyro": workloads(theirs, dim, args.batch, device,
                                                          invertible)}  # fmt: skip
            if zuko_nsf:
                peers["zuko"] = workloads(zuko_nsf[0], dim, args.batch, device, True)
            result = compare(workloads(ours, dim, args.batch, device, True), peers, device, args)
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
                if "zuko" in r:
                    print(f"{'':29}{'zuko':21}{'':9}{r['zuko']['ms']:9.3f}  "
                          f"{common.ratio_text(r['ratio_zuko']):20}{'':9}"
                          f"{_mib(r['zuko']['peak_mib'])}")  # fmt: skip
            if failure:
                print(f"{'':29}pyro fails on {device.type}: {failure}")
            _write(rows, args, device, complete=False)  # a run stopped early keeps its rows
    _write(rows, args, device, complete=True)


def _write(rows: list[dict], args: argparse.Namespace, device: torch.device, complete: bool):
    settings = {"batch": args.batch, "rounds": args.rounds, "calls": args.calls,
                "dims": args.dims, "families": args.families, "complete": complete}  # fmt: skip
    common.write("transforms", device, {"settings": settings, "rows": rows},
                 pyro=pyro.__version__, zuko=zuko.__version__)  # fmt: skip


def _mib(value: float | None) -> str:
    return f"{'-':>9}" if value is None else f"{value:9.1f}"


if __name__ == "__main__":
    main()
