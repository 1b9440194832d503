"""Bad input gives a ValueError naming the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

import pyroflows as pf
from pyroflows.transforms import Autoregressive, Coupling, Planar, Sylvester


@pytest.mark.parametrize("name", list(pf.flows.RECIPES))
def test_wrong_event_size(name):
    flow = pf.build(name, 3, num_layers=1)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3\)"):
        flow(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"y must have shape \(\.\.\., 3\)"):
        flow.inv(torch.randn(5, 2))


@pytest.mark.parametrize("name", list(pf.flows.RECIPES))
def test_wrong_context_size(name):
    flow = pf.build(name, 3, num_layers=1, context_dim=2)
    with pytest.raises(ValueError, match=r"context must have shape \(\.\.\., 2\)"):
        flow.condition(torch.randn(5, 3))


def test_context_missing_for_amortized_flow():
    with pytest.raises(ValueError, match="context: Planar is amortized"):
        Planar(3, context_dim=2)(torch.randn(3))


def test_context_given_to_unconditional_flow():
    with pytest.raises(ValueError, match="context: Planar is unconditional"):
        Planar(3).condition(torch.randn(2))


@pytest.mark.parametrize("dim", [0, -1, 2.5, True])
def test_non_positive_dims(dim):
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        Planar(dim)
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        pf.build("iaf", dim)


def test_negative_context_dim_and_layers():
    with pytest.raises(ValueError, match="context_dim must be a non-negative integer"):
        Planar(3, context_dim=-1)
    with pytest.raises(ValueError, match="num_layers must be a positive integer"):
        pf.build("planar", 3, num_layers=0)
    with pytest.raises(ValueError, match=r"hidden_dims\[1\] must be a positive integer"):
        Planar(3, context_dim=2, hidden_dims=(4, 0))


def test_sylvester_options():
    with pytest.raises(
        ValueError, match="kind must be one of 'orthogonal', 'householder', 'triangular'"
    ):
        Sylvester(3, kind="lower")
    with pytest.raises(ValueError, match="num_columns must be at most dim=3, got 4"):
        Sylvester(3, num_columns=4)
    with pytest.raises(ValueError, match="num_columns applies to kind='orthogonal' only"):
        Sylvester(3, kind="householder", num_columns=2)
    with pytest.raises(ValueError, match="num_householder must be a positive integer"):
        Sylvester(3, kind="householder", num_householder=0)


def test_other_family_options():
    with pytest.raises(ValueError, match="direction must be one of 'iaf', 'maf'"):
        Autoregressive(3, direction="forward")
    with pytest.raises(ValueError, match=r"permutation must be a permutation of range\(3\)"):
        Autoregressive(3, permutation=torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="parity must be 0 or 1"):
        Coupling(3, parity=2)
    with pytest.raises(ValueError, match="kind must be one of 'affine', 'additive', 'spline'"):
        Coupling(3, kind="quadratic")


def test_unknown_recipe_lists_the_valid_names():
    with pytest.raises(
        ValueError,
        match=r"name must be one of 'iaf', 'maf', 'planar'.*'nsf-ar', 'nsf-coupling'; got 'flowy'",
    ):
        pf.build("flowy", 3)


def test_non_tensor_input():
    with pytest.raises(ValueError, match=r"x must be a torch\.Tensor, got list"):
        Planar(2)([0.0, 1.0])
