"""What every benchmark records beside its figures: the device, threads and versions."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

import pyroflows
from pyroflows import _checks

RESULTS = Path(__file__).parent / "results"


def cuda_device(name: str) -> torch.device:
    """The ``--device`` asked for; an exit with the reason where it does not exist here."""
    try:
        return _checks.device("--device", name)
    except ValueError as error:
        raise SystemExit(str(error)) from None


def write(name: str, device: torch.device, figures: dict[str, Any], **versions: str) -> Path:
    """Write ``results/NAME.json`` with the environment and ``figures``; returns the path."""
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
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path
