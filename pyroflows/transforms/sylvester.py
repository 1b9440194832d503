"""Sylvester flows (van den Berg et al., 2018): orthogonal, Householder and triangular."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _checks
from ..nn import ParameterMap, matvec
from ..roots import solve_increasing
from .base import Flow, Params

KINDS = ("orthogonal", "householder", "triangular")


class Sylvester(Flow):
    r"""``y = x + Q R tanh(R̃ Qᵀ x + b)``.

    ``Q`` (``dim x M``) has orthonormal columns and ``R``, ``R̃`` are upper triangular
    ``M x M``, so ``log|det J| = Σᵢ log(1 + tanh'(·)ᵢ Rᵢᵢ R̃ᵢᵢ)`` (Sylvester's determinant
    identity). The diagonals are ``tanh`` of free parameters, so ``Rᵢᵢ R̃ᵢᵢ > -1 =
    -1 / sup tanh'`` and the map is invertible for every parameter value.

    ``kind`` chooses ``Q``:

    * ``"orthogonal"``: ``M = num_columns`` columns, kept exactly orthonormal by a QR
      decomposition of a free ``dim x M`` matrix (the paper iterates Björck steps to a
      tolerance; QR is exact to rounding and differentiable);
    * ``"householder"``: ``M = dim``, ``Q`` is a product of ``num_householder`` reflections;
    * ``"triangular"``: ``M = dim``, ``Q`` is the identity, or the reversal permutation with
      ``reverse=True`` (the paper alternates the two between layers).

    With ``context_dim > 0`` a network of widths ``hidden_dims`` maps the context to ``R``,
    ``R̃``, ``b`` and ``Q``'s free matrix or reflection vectors, as in the paper's amortized
    VAE posterior.

    The inverse works in the ``Q`` basis: with ``v = Qᵀx`` the map is
    ``Qᵀy = v + R tanh(R̃ v + b)``, upper triangular in ``v``, so back-substitution from the
    last coordinate needs one increasing scalar root per coordinate (bracketed Newton,
    1e-12 relative in float64, 1e-6 in float32); the orthogonal complement of ``Q`` is left
    unchanged by the map.

    >>> t = Sylvester(4, kind="householder", num_householder=2)
    >>> x = torch.randn(5, 4)
    >>> torch.allclose(t.inv(t(x).clone()), x, atol=1e-5)
    True
    """

    _solves_backward = True
    _warm_starts = True
    _pulls_back_scores = True

    def __init__(
        self,
        dim: int,
        *,
        context_dim: int = 0,
        kind: str = "orthogonal",
        num_columns: int | None = None,
        num_householder: int = 1,
        reverse: bool = False,
        hidden_dims: Sequence[int] = (),
    ) -> None:
        super().__init__(dim, context_dim=context_dim)
        self.kind = _checks.one_of("kind", kind, KINDS)
        if kind == "orthogonal":
            m = dim if num_columns is None else _checks.positive_int("num_columns", num_columns)
            if m > dim:
                raise ValueError(f"num_columns must be at most dim={dim}, got {m}")
        elif num_columns not in (None, dim):
            raise ValueError(f"num_columns applies to kind='orthogonal' only; got {num_columns}")
        else:
            m = dim
        self.num_columns = m
        self.reverse = bool(reverse)
        # R and R̃ stacked: index 0 is R, index 1 is R̃
        init = {
            "diag": torch.full((2, m), 0.5),
            "upper": torch.randn(2, m * (m - 1) // 2) * 0.1,
            "b": torch.zeros(m),
        }
        if kind == "orthogonal":
            init["q"] = torch.randn(dim, m)
        elif kind == "householder":
            k = _checks.positive_int("num_householder", num_householder)
            init["v"] = torch.randn(k, dim)
        self.params = ParameterMap(init, context_dim, hidden_dims)
        rows, cols = torch.triu_indices(m, m, 1)
        diag = torch.arange(m)
        self.register_buffer("_rows", torch.cat((rows, diag)), persistent=False)
        self.register_buffer("_cols", torch.cat((cols, diag)), persistent=False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kind={self.kind!r}, num_columns={self.num_columns}"

    def _params(self, context: Tensor | None) -> Params:
        p = self.params(context)
        diag = torch.tanh(p["diag"])
        values = torch.cat((p["upper"], diag), dim=-1)
        m = self.num_columns
        triangular = values.new_zeros((*values.shape[:-1], m, m))
        triangular[..., self._rows, self._cols] = values
        r, rt = triangular.unbind(-3)
        out = {"r": r, "rt": rt, "b": p["b"], "diag": diag.prod(-2)}
        if self.kind == "orthogonal":
            q, qr_r = torch.linalg.qr(p["q"])
            out["q"] = q * torch.sign(torch.diagonal(qr_r, dim1=-2, dim2=-1)).unsqueeze(-2)
        elif self.kind == "householder":
            v = p["v"]
            v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
            q = torch.eye(self.dim, dtype=v.dtype, device=v.device).expand(*v.shape[:-2], -1, -1)
            for u in v.unbind(-2):  # Q = H_1 ... H_K, with Q H = Q - 2 (Q u) uᵀ
                q = torch.addcmul(q, matvec(q, u).unsqueeze(-1), u.unsqueeze(-2), value=-2)
            out["q"] = q
        if "q" in out:  # the forward map in two products: R̃ Qᵀ x and Q R a
            out["into"], out["out"] = rt @ out["q"].mT, out["q"] @ r
        elif self.reverse:
            out["into"], out["out"] = rt.flip(-1), r.flip(-2)
        else:
            out["into"], out["out"] = rt, r
        return out

    def _to_basis(self, x: Tensor, p: Params) -> Tensor:
        """``Qᵀ x``."""
        if "q" in p:
            return matvec(p["q"].mT, x)
        return x.flip(-1) if self.reverse else x

    def _from_basis(self, v: Tensor, p: Params) -> Tensor:
        """``Q v``."""
        if "q" in p:
            return matvec(p["q"], v)
        return v.flip(-1) if self.reverse else v

    def _forward(self, x: Tensor, p: Params) -> tuple[Tensor, Tensor]:
        a = torch.tanh(matvec(p["into"], x, p["b"]))
        y = x + matvec(p["out"], a)
        return y, torch.log1p((1 - a * a) * p["diag"]).sum(-1)

    def _backward(self, y: Tensor, p: Params, start: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r, rt, b = p["r"], p["rt"], p["b"]
        w = self._to_basis(y, p)  # Qᵀy = v + R tanh(R̃ v + b)
        if start is not None:  # a known solution (see Flow._warm_start): v = Qᵀx
            with torch.no_grad():
                v = self._to_basis(start, p)
        else:
            v = self._solve(w, p)
        # one Newton step with gradients on attaches the implicit-function derivatives
        a = torch.tanh(matvec(rt, v) + b)
        residual = v + matvec(r, a) - w
        jac = (
            torch.eye(self.num_columns, dtype=v.dtype, device=v.device)
            + r * (1 - a * a).unsqueeze(-2) @ rt
        )
        v = v - torch.linalg.solve_triangular(jac, residual.unsqueeze(-1), upper=True).squeeze(-1)
        a = torch.tanh(matvec(rt, v) + b)
        x = y + self._from_basis(v - w, p)
        return x, -torch.log1p((1 - a * a) * p["diag"]).sum(-1)

    def _score_pullback(self, x: Tensor, p: Params, score: Tensor) -> Tensor:
        # Jᵀ = I + Aᵀ diag(1 - a²) Bᵀ with A = Q R (out) and B = R̃ Qᵀ (into): Woodbury,
        # whose inner matrix I + diag(1 - a²) Rᵀ R̃ᵀ is m x m and lower triangular
        with torch.no_grad():
            a = torch.tanh(matvec(p["into"], x, p["b"]))
            tangent = 1 - a * a
            grad = -2 * a * tangent * p["diag"] / (1 + tangent * p["diag"])
            v = score - matvec(p["into"].mT, grad)
            eye = torch.eye(self.num_columns, dtype=x.dtype, device=x.device)
            inner = eye + tangent.unsqueeze(-1) * (p["r"].mT @ p["rt"].mT)
            rhs = (tangent * matvec(p["out"].mT, v)).unsqueeze(-1)
            c = torch.linalg.solve_triangular(inner, rhs, upper=False).squeeze(-1)
            return v - matvec(p["into"].mT, c)

    def _solve(self, w: Tensor, p: Params) -> Tensor:
        """``v`` with ``v + R tanh(R̃ v + b) = w``, by back-substitution, without gradients."""
        r, rt, b = p["r"], p["rt"], p["b"]
        batch = torch.broadcast_shapes(w.shape, b.shape)
        v = w.new_zeros(batch).detach()
        a = torch.zeros_like(v)
        with torch.no_grad():
            for i in reversed(range(self.num_columns)):
                # entries above i are solved; entries at and below i are still zero
                shift = (rt[..., i, :] * v).sum(-1) + b[..., i]
                target = w[..., i] - (r[..., i, :] * a).sum(-1)
                r_ii, rt_ii = r[..., i, i], rt[..., i, i]

                def g(vi: Tensor, r_ii=r_ii, rt_ii=rt_ii, shift=shift) -> tuple[Tensor, Tensor]:
                    t = torch.tanh(rt_ii * vi + shift)
                    return vi + r_ii * t, 1 + r_ii * rt_ii * (1 - t * t)

                radius = r_ii.abs().expand_as(target)
                v[..., i] = solve_increasing(g, target, target - radius, target + radius)
                a[..., i] = torch.tanh(rt_ii * v[..., i] + shift)
        return v
