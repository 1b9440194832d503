"""What every benchmark shares: alternating timing, ratios with their spread, peak memory, and
the record of device, threads and versions written beside the figures."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import pyroflows
from pyroflows import _checks

RESULTS = Path(__file__).parent / "results"
# statically binarized MNIST beside the project (see ../shared/data/README.md)
MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist.npz"


def cuda_device(name: str) -> torch.device:
    """The ``--device`` asked for; an exit with the reason where it does not exist here."""
    try:
        return _checks.device("--device", name)
    except ValueError as error:
        raise SystemExit(str(error)) from None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(
    calls: dict[str, Callable[[], Any]], rounds: int, device: torch.device, repeat: int = 1
) -> dict[str, dict]:
    """Time every contender ``repeat`` calls per round, the contenders taking turns within
    each round so that drift of a shared machine hits all alike.

    Returns ``{name: {"seconds": [seconds per call, one per round], "peak_mib": ...}}``;
    ``peak_mib`` is the most CUDA memory allocated during any round above what was allocated
    before it (None on CPU, where :func:`cpu_peak_mib` measures it).
    """
    out = {name: {"seconds": [], "peak_mib": None} for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            before = cuda_peak_reset(device)
            start = time.perf_counter()
            for _ in range(repeat):
                call()
            sync(device)
            out[name]["seconds"].append((time.perf_counter() - start) / repeat)
            if device.type == "cuda":
                peak = cuda_peak_mib(device, before)
                out[name]["peak_mib"] = max(out[name]["peak_mib"] or 0.0, peak)
    return out


def cuda_peak_reset(device: torch.device) -> float:
    """Synchronise, restart CUDA's peak statistic and return the bytes allocated now (0 on
    CPU), for :func:`cuda_peak_mib`."""
    sync(device)
    if device.type != "cuda":
        return 0.0
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def cuda_peak_mib(device: torch.device, before: float) -> float:
    """CUDA's peak allocation since :func:`cuda_peak_reset` above what was allocated then
    (other contenders' resident tensors do not count), in MiB."""
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def ratio(times: list[float], base: list[float]) -> dict[str, Any]:
    """Median and min-max spread of the per-round ratios ``times / base`` (below 1: faster)."""
    ratios = [a / b for a, b in zip(times, base, strict=True)]
    return {"median": statistics.median(ratios), "spread": [min(ratios), max(ratios)]}


def ratio_text(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    lo, hi = r["spread"]
    return f"{r['median']:.2f} [{lo:.2f}-{hi:.2f}]"


def cpu_peak_mib(call: Callable[[], Any]) -> float:
    """Peak of torch's CPU memory during ``call()`` above what was allocated before, in MiB.

    Replays the profiler's record of every allocation and free in the order they happened
    (exact and repeatable, unlike a process's RSS, which the C allocator's caching blurs).
    Summing each operator's own memory at its start instead would book the frees inside a
    long operator (an autograd function's backward pass, say) before the allocations of the
    operators it calls, and understate the peak. Python objects other than tensors are not
    counted.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        call()
    changes = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    current = peak = 0
    for _, change in changes:
        current += change
        peak = max(peak, current)
    return peak / 2**20


def result_path(name: str, device: torch.device) -> Path:
    """``results/NAME.json``, or ``NAME-cuda.json`` for a CUDA device."""
    return RESULTS / (f"{name}-cuda.json" if device.type == "cuda" else f"{name}.json")


def write(name: str, device: torch.device, figures: dict[str, Any], **versions: str) -> Path:
    """Write ``results/NAME.json`` (``NAME-cuda.json`` on CUDA) with the environment and
    ``figures``; returns the path."""
    is_cuda = device.type == "cuda"
    result = {
        "benchmark": name,
        "device": torch.cuda.get_device_name(device) if is_cuda else platform.machine(),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pyroflows": pyroflows.__version__,
            **versions,
        },
        **figures,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = result_path(name, device)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path
