"""The device the GPU-marked tests run on: CUDA where it is present (they skip without it),
or, with ``PYROFLOWS_GPU_TESTS=cpu``, the CPU, which runs their code paths on a machine
without a GPU (device placement is then not what they check)."""

from __future__ import annotations

import os

import pytest
import torch

GPU = os.environ.get("PYROFLOWS_GPU_TESTS", "cuda")
needs_gpu = pytest.mark.skipif(
    GPU == "cuda" and not torch.cuda.is_available(), reason="needs CUDA"
)
