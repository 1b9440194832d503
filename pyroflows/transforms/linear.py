"""Glow's linear parts (Kingma & Dhariwal, 2018): ActNorm and the LU-parameterised linear map."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..nn import ParameterMap, matvec
from .base import Flow


class ActNorm(Flow):
    r"""``y = (x + shift) ⊙ exp(log_scale)``, ``log|det J| = Σ log_scale``.

    With ``data_init=True`` the first call (forward or inverse) sets ``shift`` and
    ``log_scale`` from its batch so that this call's output has zero mean and unit variance
    per coordinate (Glow's data-dependent initialisation). Whether that happened is stored
    in the ``initialized`` buffer, which ``state_dict`` carries.

    >>> t = ActNorm(2)
    >>> y = t(3 + 2 * torch.randn(1000, 2))
    >>> bool(y.mean(0).abs().max() < 1e-5)
    True
    """

    _pulls_back_scores = True

    def __init__(
        self,
        dim: int,
        *,
        context_dim: int = 0,
        hidden_dims: Sequence[int] = (),
        data_init: bool = True,
    ) -> None:
        super().__init__(dim, context_dim=context_dim)
        self.params = ParameterMap(
            {"shift": torch.zeros(dim), "log_scale": torch.zeros(dim)}, context_dim, hidden_dims
        )
        self.register_buffer("initialized", torch.tensor(not data_init))

    @torch.no_grad()
    def _initialize(self, data: Tensor, forward: bool) -> None:
        rows = data.reshape(-1, self.dim)
        mean = rows.mean(0)
        std = (
            rows.std(0).nan_to_num(1.0).clamp_min(1e-6) if len(rows) > 1 else torch.ones_like(mean)
        )
        free = self.params.free()
        if forward:  # (x + shift) / std(x) standardises x
            free["shift"].copy_(-mean)
            free["log_scale"].copy_(-std.log())
        else:  # y / std(y) - shift standardises y
            free["shift"].copy_(mean / std)
            free["log_scale"].copy_(std.log())
        self.initialized.fill_(True)

    def _forward(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        if not self.initialized:
            self._initialize(x, forward=True)
        p = self.params(context)
        y = (x + p["shift"]) * p["log_scale"].exp()
        return y, p["log_scale"].sum(-1).expand(y.shape[:-1])

    def _backward(self, y: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        if not self.initialized:
            self._initialize(y, forward=False)
        p = self.params(context)
        x = y * (-p["log_scale"]).exp() - p["shift"]
        return x, -p["log_scale"].sum(-1).expand(x.shape[:-1])

    def _score_pullback(self, x: Tensor, context: Tensor | None, score: Tensor) -> Tensor:
        with torch.no_grad():  # J = diag(exp(log_scale)), log|det J| constant in x
            return score * (-self.params(context)["log_scale"]).exp()


class LULinear(Flow):
    r"""``y = P L (U + diag(sign ⊙ exp(log_diag))) x``, Glow's invertible linear map in LU form.

    ``P`` is a fixed permutation, ``L`` unit lower triangular and ``U`` strictly upper
    triangular, so ``log|det J| = Σ log_diag`` costs O(dim) and the inverse is two
    triangular solves. Initialised at a random rotation, as in Glow. With
    ``context_dim > 0`` the entries of ``L``, ``U`` and ``log_diag`` get context-dependent
    offsets.

    >>> t = LULinear(3)
    >>> x = torch.randn(5, 3)
    >>> torch.allclose(t.inv(t(x).clone()), x, atol=1e-5)
    True
    """

    _pulls_back_scores = True

    def __init__(self, dim: int, *, context_dim: int = 0, hidden_dims: Sequence[int] = ()) -> None:
        super().__init__(dim, context_dim=context_dim)
        q, _ = torch.linalg.qr(torch.randn(dim, dim))
        perm, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        rows, cols = torch.tril_indices(dim, dim, -1)
        self.register_buffer("_lower_idx", torch.stack([rows, cols]), persistent=False)
        self.register_buffer("permutation", perm.argmax(-1))
        self.register_buffer("diag_sign", diag.sign())
        self.params = ParameterMap(
            {
                "lower": lower[rows, cols],
                "upper": upper[cols, rows],
                "log_diag": diag.abs().log(),
            },
            context_dim,
            hidden_dims,
        )

    def _factors(self, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        p = self.params(context)
        rows, cols = self._lower_idx
        batch = p["log_diag"].shape[:-1]
        eye = torch.eye(self.dim, dtype=p["log_diag"].dtype, device=p["log_diag"].device)
        lower = eye.expand(*batch, self.dim, self.dim).clone()
        lower[..., rows, cols] = p["lower"]
        upper = torch.diag_embed(self.diag_sign * p["log_diag"].exp())
        upper[..., cols, rows] = p["upper"]
        return lower, upper, p["log_diag"].sum(-1)

    def _params(self, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        return self._factors(context)

    def _forward(self, x: Tensor, p: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        lower, upper, ladj = p
        y = matvec(lower @ upper, x)[..., self.permutation]
        return y, ladj.expand(y.shape[:-1])

    def _backward(self, y: Tensor, p: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        lower, upper, ladj = p
        z = y[..., torch.argsort(self.permutation)].unsqueeze(-1)
        z = torch.linalg.solve_triangular(lower, z, upper=False, unitriangular=True)
        x = torch.linalg.solve_triangular(upper, z, upper=True).squeeze(-1)
        return x, -ladj.expand(x.shape[:-1])

    def _score_pullback(self, x: Tensor, p: tuple[Tensor, Tensor, Tensor], score: Tensor) -> Tensor:
        # J = S L U with S the row selection: J⁻ᵀ g = S L⁻ᵀ U⁻ᵀ g; log|det J| constant in x
        lower, upper, _ = p
        with torch.no_grad():
            a = torch.linalg.solve_triangular(upper.mT, score.unsqueeze(-1), upper=False)
            b = torch.linalg.solve_triangular(lower.mT, a, upper=True, unitriangular=True)
            return b.squeeze(-1)[..., self.permutation]
