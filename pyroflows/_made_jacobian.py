"""The Jacobian of a MADE's outputs in its input, without a graph, from the masked weights and
the ReLUs' gates at a batch of inputs (:meth:`pyroflows.nn.MADE.bind`).

An autoregressive layer needs three things from it: the vector-Jacobian product of the
log-derivative's sensitivities, the layer's Jacobian (lower triangular in the autoregressive
order: a Newton step of the inverse), and the transposed Jacobian's solve (the score pullback
of STL and DReG). The matrix costs ``dim`` times the products of a network pass, per draw.
The transposed solve needs no matrix: in the autoregressive order a hidden unit of degree
``m`` (it sees the first ``m`` inputs) reaches only outputs from position ``m`` on, so
back-substitution from the last position can finish each unit's backward value once, when
the solution beyond its degree is known, and add it to the inputs it sees: one pass over the
units, taken in blocks of positions (the sweep), where the matrix multiplies ``dim`` times as
much.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

# draws x inputs x units from which the Jacobian is taken in blocks of rows: below it the
# blocks' overhead costs more than their zeros would (CPU, one thread: 8 draws of a 31-D
# network with 94 units 0.55 ms in blocks against 0.34 dense; 128 draws of 62-62 units 1.3
# against 3.0 ms)
BLOCKED_WORK = 150_000
# draws x inputs² x hidden units (the matrix's products) from which the transposed solve sweeps
# rather than forming the matrix (CPU, one thread, ms of dense against sweep: 500 draws, 40
# inputs, 300 units 14.9 against 6.2; 100 draws 3.4 against 1.8; 100 draws of 80-80 units
# 1.3 against 1.2; 128 draws, 31 inputs, 62-62 units 1.1 against 1.2; 256 draws, 10 inputs,
# 64-64 units 0.7 against 0.9)
SWEEP_WORK = 20_000_000


class Structure:
    """What the masks of one MADE say about its Jacobian: built once per network."""

    def __init__(self, masks: list[Tensor], context_dim: int, permutation: Tensor, outputs: int):
        bools = [m.bool() for m in masks]
        self.dim, self.outputs = len(permutation), outputs
        hidden = tuple(m.shape[0] for m in bools[:-1])
        self.units = sum(hidden)
        first = bools[0][:, context_dim:][:, permutation]
        last = bools[-1].unflatten(0, (outputs, self.dim))[:, permutation]
        self.dense = [(0, self.dim, (self.dim, *hidden))]  # one block: every row, input, unit
        self.blocks = _blocks(first, bools[1:-1], last)
        self.sweep_blocks = _sweep_blocks(first, bools[1:-1])


class MADEJacobian:
    """The Jacobian at one batch of inputs: ``weights`` the masked weights (the first without
    its context columns), ``gates`` the ReLUs' derivatives of each hidden layer. Coefficients
    of the outputs, ``rows`` and ``vector``, have the outputs' shape ``(..., outputs, dim)``.

    >>> from pyroflows.nn import MADE
    >>> _, jacobian = MADE(3, (8,)).bind()(torch.randn(5, 3), jacobian=True)
    >>> rows, diagonal, rhs = torch.randn(5, 2, 3), torch.ones(5, 3), torch.randn(5, 3)
    >>> g = jacobian.solve_transposed(rows, diagonal, rhs)
    >>> system = jacobian.matrix(rows) + torch.diag_embed(diagonal)
    >>> torch.allclose((system.mT @ g.unsqueeze(-1)).squeeze(-1), rhs, atol=1e-5)
    True
    """

    def __init__(
        self, structure: Structure, weights: list[Tensor], gates: list[Tensor], permutation: Tensor
    ):
        self.s, self.weights, self.gates, self.order = structure, weights, gates, permutation

    def vector_product(self, vector: Tensor) -> Tensor:
        """``(..., dim)``, entry ``j = Σ_{k,i} vector[k, i] ∂ output k at i / ∂x_j``."""
        v = vector.flatten(-2) @ self.weights[-1]
        for i in reversed(range(len(self.gates))):
            v = (v * self.gates[i]) @ self.weights[i]
        return v

    def matrix(self, rows: Tensor, ordered: bool = False) -> Tensor:
        """``(..., dim, dim)`` with entry ``[i, j] = Σ_k rows[k, i] ∂ output k at i / ∂x_j``
        (each coordinate's own outputs); with ``ordered``, rows and columns in the order
        ``permutation``, which makes it lower triangular. In that order a block of rows
        reaches only leading units of each layer (Pyro's masks sort them by degree), so for
        many draws (``BLOCKED_WORK``) the rows are taken a block at a time and the zeros are
        not multiplied."""
        s, weights, gates = self.s, self.weights, self.gates
        first, last = weights[0], weights[-1].unflatten(0, (s.outputs, s.dim))
        blocks = s.dense
        if ordered:
            order = self.order
            first, last, rows = first[:, order], last[:, order], rows[..., order]
            work = rows.numel() // s.outputs * last.shape[-1]
            if s.blocks and work >= BLOCKED_WORK:
                blocks = s.blocks
        lower = None
        for start, end, widths in blocks:
            r = _combine(rows[..., start:end], last[:, start:end, : widths[-1]])
            for i in reversed(range(len(gates))):
                weight = first if i == 0 else weights[i]
                r = r * gates[i][..., None, : widths[i + 1]]
                r = r @ weight[: widths[i + 1], : widths[i]]
            if len(blocks) == 1:  # dense: the whole Jacobian, as computed
                return r
            if lower is None:  # each entry written once, the zeros beyond a block too
                lower = r.new_empty((*r.shape[:-2], s.dim, s.dim))
            lower[..., start:end, : widths[0]] = r
            lower[..., start:end, widths[0] :] = 0
        assert lower is not None
        return lower

    def solve_transposed(self, rows: Tensor, diagonal: Tensor, rhs: Tensor) -> Tensor:
        """``g`` with ``(diag(diagonal) + matrix(rows))ᵀ g = rhs``, all ``(..., dim)`` but
        ``rows``: by the sweep (module docstring) where the matrix would take ``SWEEP_WORK``
        products or more, else by a triangular solve with the matrix."""
        s, order = self.s, self.order
        if s.sweep_blocks and rhs.numel() * s.dim * s.units >= SWEEP_WORK:
            g = self._sweep(rows[..., order], diagonal[..., order], rhs[..., order])
        else:
            lower = self.matrix(rows, ordered=True)
            lower.diagonal(dim1=-2, dim2=-1).add_(diagonal[..., order])
            ordered = rhs[..., order].unsqueeze(-1)
            g = torch.linalg.solve_triangular(lower.mT, ordered, upper=True).squeeze(-1)
        out = torch.empty_like(rhs)
        out[..., order] = g  # back to the network's own order
        return out

    def _sweep(self, rows: Tensor, diagonal: Tensor, rhs: Tensor) -> Tensor:
        """The transposed solve by back-substitution over blocks of positions, in the
        autoregressive order. Each block's units (their degrees in the block) are finished
        in two passes: from the outputs solved so far, which gives the block's right-hand
        side, then, once the block's small triangular system (paths through its own units
        only) is solved, from its outputs too; a finished first-layer unit adds its backward
        value to the inputs it sees."""
        s, weights, gates = self.s, self.weights, self.gates
        first = weights[0][:, self.order]
        last = weights[-1].unflatten(0, (s.outputs, s.dim))[:, self.order]  # (outputs, dim, units)
        top = len(gates) - 1
        backward = [torch.zeros_like(g) for g in gates]  # each unit's, once finished
        into_top = torch.zeros_like(gates[top])  # from the solved outputs, through their weights
        into_inputs = torch.zeros_like(rhs)  # matrixᵀ g from the finished first-layer units
        solved = torch.empty_like(rhs)

        def finish(units: list[tuple[int, int]]) -> None:
            for i in reversed(range(top + 1)):
                a, b = units[i]
                into = into_top[..., a:b] if i == top else backward[i + 1] @ weights[i + 1][:, a:b]
                backward[i][..., a:b] = gates[i][..., a:b] * into

        for start, end, units in s.sweep_blocks:  # from the last block
            finish(units)  # from the outputs beyond the block
            a, b = units[0]
            known = into_inputs[..., start:end] + backward[0][..., a:b] @ first[a:b, start:end]
            a, b = units[top]
            triangle = _combine(rows[..., start:end], last[:, start:end, a:b])
            for i in reversed(range(top + 1)):
                a, b = units[i]
                triangle = triangle * gates[i][..., None, a:b]
                below = first[a:b, start:end] if i == 0 else weights[i][a:b, slice(*units[i - 1])]
                triangle = triangle @ below
            triangle.diagonal(dim1=-2, dim2=-1).add_(diagonal[..., start:end])
            system = triangle.mT, (rhs[..., start:end] - known).unsqueeze(-1)
            g = torch.linalg.solve_triangular(*system, upper=True).squeeze(-1)
            solved[..., start:end] = g
            coefficients = (rows[..., start:end] * g.unsqueeze(-2)).flatten(-2)
            into_top += coefficients @ last[:, start:end].flatten(0, 1)
            finish(units)  # and from the block's own outputs
            a, b = units[0]
            into_inputs += backward[0][..., a:b] @ first[a:b]
        return solved


def _combine(rows: Tensor, last: Tensor) -> Tensor:
    """``Σ_k rows[..., k, i] last[k, i, u]``: each coordinate's outputs' coefficients on the
    last hidden layer's units."""
    if len(last) > 4:  # a spline's many outputs: one batched product
        return torch.einsum("...ki,kiu->...iu", rows, last)
    r = rows[..., 0, :, None] * last[0]  # a few: multiply-adds, where a product over 2
    for k in range(1, len(last)):  # terms runs slowly
        r.addcmul_(rows[..., k, :, None], last[k])
    return r


def _sweep_blocks(
    first: Tensor, hidden: list[Tensor], size: int = 8
) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Blocks of about ``size`` positions of the autoregressive order, the last first, each
    ``(start, end, units)`` with ``units`` the range of each hidden layer's units whose
    degree is in ``(start, end]`` (a unit of degree ``m`` sees the inputs before position
    ``m``). ``first`` is ``(units, dim)`` with its columns in that order, ``hidden`` the
    masks between hidden layers. Empty where a layer's degrees are not sorted (Pyro's masks
    sort them): the matrix is formed then."""
    dim = first.shape[1]
    positions = torch.arange(1, dim + 1)
    degree = (first * positions).amax(1)
    starts, ends = [], []
    for mask in [None, *hidden]:
        if mask is not None:
            degree = (mask * degree).amax(1)
        if bool((degree[1:] < degree[:-1]).any()):
            return []
        starts.append(torch.searchsorted(degree, positions, right=False).tolist())
        ends.append(torch.searchsorted(degree, positions, right=True).tolist())
    bounds = torch.linspace(0, dim, -(-dim // size) + 1).round().long().tolist()
    blocks = []
    for start, end in itertools.pairwise(bounds):
        units = [(s[start], e[end - 1]) for s, e in zip(starts, ends, strict=True)]
        blocks.append((start, end, units))
    return blocks[::-1]


def _blocks(
    first: Tensor, hidden: list[Tensor], last: Tensor, rows_per_block: int = 8
) -> list[tuple[int, int, tuple[int, ...]]]:
    """A MADE's Jacobian rows in blocks, with the masks' columns and rows in the
    autoregressive order: ``(start, end, widths)`` with ``widths`` the leading inputs and
    units of each hidden layer that rows ``start:end`` can reach (beyond them every
    product is zero). ``first`` is ``(units, dim)``, ``hidden`` the masks between hidden
    layers and ``last`` ``(outputs, dim, units)``, all boolean; none for a network too small
    to split (under ``2 rows_per_block`` inputs): it is taken dense."""
    dim = first.shape[1]
    count = min(8, dim // rows_per_block)
    if count < 2:
        return []
    bounds = torch.linspace(0, dim, count + 1).round().long().tolist()

    def width(reached: Tensor) -> int:
        return int(reached.nonzero().max()) + 1 if bool(reached.any()) else 0

    blocks = []
    for start, end in itertools.pairwise(bounds):
        widths = [width(last[:, start:end].any(0).any(0))]
        for mask in [first, *hidden][::-1]:
            widths.append(width(mask[: widths[-1]].any(0)))
        blocks.append((start, end, tuple(widths[::-1])))
    return blocks
