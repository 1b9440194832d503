"""Parameters near their constraints and points far from the data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyroflows.transforms import Autoregressive, Planar


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("wu", [-5.0, -20.0, -60.0])
def test_planar_log_det_near_the_invertibility_bound(dtype, wu):
    """With wᵀu → -∞, wᵀû → -1: at wᵀx + b = 0 the log-det is log softplus(wᵀu) exactly."""
    flow = Planar(3).to(dtype)
    w = torch.tensor([1.0, 2.0, -0.5], dtype=dtype)
    free = flow.params.free()
    with torch.no_grad():
        free["w"].copy_(w)
        free["u"].copy_(wu * w / w.square().sum())
    x = torch.tensor([[2.0, -1.0, 0.0]], dtype=dtype)  # wᵀx = 0 and b = 0
    _, ladj = flow.call_and_ladj(x)
    expected = F.softplus(torch.tensor(wu, dtype=torch.float64)).log()
    assert torch.isfinite(ladj).all()
    torch.testing.assert_close(ladj.double(), expected.expand(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [2, 5, 10])
def test_gated_autoregressive_inverse_of_points_far_out(dtype, dim):
    torch.manual_seed(0)
    flow = Autoregressive(dim, stable=True).to(dtype)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    y = 20 * torch.randn(200, dim, dtype=dtype)
    x, ladj = flow.inverse_and_ladj(y)
    assert torch.isfinite(x).all() and torch.isfinite(ladj).all()
    flow.clear_cache()
    y_back, forward_ladj = flow.call_and_ladj(x)
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(y_back, y, rtol=tol, atol=tol * 20)
    torch.testing.assert_close(forward_ladj, -ladj, rtol=tol, atol=tol)
