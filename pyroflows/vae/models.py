"""A VAE with a Bernoulli decoder as a Pyro model, and its amortized flow posterior.

The posterior is chosen by recipe name: ``"none"`` (the diagonal Gaussian of the plain VAE),
or any of :data:`POSTERIORS` (``planar``, ``radial``, ``iaf``, ``sylvester-o``/``-h``/``-t``,
``cnf``, ...), conditioned on the encoder's output as in the IAF and Sylvester-flow papers.
Two architectures: ``"mlp"`` (two hidden layers each way) and ``"conv"``, the gated
convolutions of van den Berg et al. (2018), for 28x28 images.

>>> vae = VAE((8, 8), latent_dim=4, flow="planar", num_layers=2, hidden_dim=32)
>>> x = torch.bernoulli(torch.full((5, 64), 0.3))
>>> vae.loss(x).shape, vae.model(x).shape
(torch.Size([]), torch.Size([5, 64]))
"""

from __future__ import annotations

from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks
from ..amortized import AmortizedFlowGuide
from ..autoguide import HALF_LOG_2PI
from ..flows import RECIPES
from ..infer.kl import kl_with_free_bits

POSTERIORS = ("none", *RECIPES)
ARCHITECTURES = ("mlp", "conv")


class VAE(nn.Module):
    """``p(z) = N(0, I)``, ``p(x | z) = Bernoulli(decoder(z))`` over the flattened pixels, and
    ``q(z | x)`` an :class:`~pyroflows.AmortizedFlowGuide` with ``flow``.

    ``model(x)`` and ``guide(x)`` are a Pyro model and guide for ``x`` of shape ``(batch,
    H * W)`` (0/1 floats): use them with SVI, the objectives and
    :func:`~pyroflows.infer.log_marginal_likelihood`. :meth:`loss` computes the same
    objective as ``pyroflows.infer.ELBO(kl_weight=..., free_bits=...).differentiable_loss``
    without Pyro's tracing (a test checks they agree); the trainer combines the per-image
    terms of ``forward`` the same way, summed over the processes that share a batch.

    >>> import pyro
    >>> from pyroflows.infer import ELBO
    >>> vae = VAE((8, 8), latent_dim=4, flow="iaf", num_layers=2, hidden_dim=32)
    >>> x = torch.bernoulli(torch.full((10, 64), 0.3))
    >>> svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), ELBO())
    >>> loss = svi.step(x)  # or train with vae.loss(x) and one torch optimizer
    >>> vae.sample(3).shape, vae.reconstruct(x).shape
    (torch.Size([3, 64]), torch.Size([10, 64]))
    """

    def __init__(
        self,
        image_shape: tuple[int, int] = (28, 28),
        latent_dim: int = 64,
        flow: str = "iaf",
        num_layers: int = 4,
        *,
        architecture: str = "mlp",
        hidden_dim: int = 300,
        **flow_options: Any,
    ) -> None:
        super().__init__()
        _checks.one_of("flow", flow, POSTERIORS)
        _checks.one_of("architecture", architecture, ARCHITECTURES)
        shape = _checks.int_sequence("image_shape", image_shape)
        if len(shape) != 2:
            raise ValueError(f"image_shape must be (height, width), got {image_shape!r}")
        if architecture == "conv" and shape != (28, 28):
            raise ValueError(
                f"architecture='conv' is built for 28x28 images, got image_shape {shape}; "
                "use architecture='mlp' for other sizes"
            )
        self.image_shape = shape
        self.pixels = shape[0] * shape[1]
        self.latent_dim = _checks.positive_int("latent_dim", latent_dim)
        hidden = _checks.positive_int("hidden_dim", hidden_dim)
        if architecture == "mlp":
            encoder, context_dim = _mlp(self.pixels, hidden, hidden), hidden
            self.decoder = nn.Sequential(
                _mlp(latent_dim, hidden, hidden), nn.Linear(hidden, self.pixels)
            )
        else:
            encoder, context_dim = GatedConvEncoder(), GatedConvEncoder.context_dim
            self.decoder = GatedConvDecoder(latent_dim)
        self.guide = AmortizedFlowGuide(
            encoder, latent_dim, context_dim, None if flow == "none" else flow, num_layers,
            site="z", plate="data", **flow_options,
        )  # fmt: skip
        self.config = {
            "image_shape": list(shape), "latent_dim": latent_dim, "flow": flow,
            "num_layers": num_layers, "architecture": architecture, "hidden_dim": hidden,
            **flow_options,
        }  # fmt: skip

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def check_images(self, x: Tensor, name: str = "x") -> Tensor:
        """``x`` as ``(batch, H * W)``, checked against the architecture's image size."""
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[-1] != self.pixels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{name} must have shape (batch, {self.pixels}) for {self.image_shape[0]}x"
                f"{self.image_shape[1]} images, got {shape}"
            )
        return x

    def model(self, x: Tensor) -> Tensor:
        """The generative model; returns the decoder's logits (``sigmoid`` gives the pixel
        probabilities), which cost no allocation of their own."""
        pyro.module("decoder", self.decoder)
        prior = dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", prior)
            logits = self.decoder(z)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)
        return logits

    def forward(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per image, at one draw ``z ~ q(z | x)`` (from the standard normal ``noise`` of
        shape ``(*sample, batch, latent_dim)`` where given, ``sample`` draws per image):
        ``log p(x | z)`` and ``log q(z | x) - log p(z)``, the single-draw estimate of its
        KL, of shape ``(*sample, batch)``."""
        z, log_q = self.guide.rsample_and_log_prob(x, noise)
        log_prior = -0.5 * z.square().sum(-1) - HALF_LOG_2PI * self.latent_dim
        logits = self.decoder(z)
        likelihood = -F.binary_cross_entropy_with_logits(
            logits, x.expand(logits.shape), reduction="none"
        ).sum(-1)  # fmt: skip
        return likelihood, log_q - log_prior

    def log_weights(self, x: Tensor, num_particles: int) -> Tensor:
        """``log p(x, z) - log q(z | x)`` at ``num_particles`` draws ``z ~ q(z | x)`` per
        image, shape ``(num_particles, batch)``: the importance weights of
        :func:`~pyroflows.infer.log_marginal_likelihood`, which takes this method for the
        VAE's ``model`` and ``guide`` instead of tracing them through Pyro (the same weights
        from the same draws, tested)."""
        noise = x.new_empty(num_particles, x.shape[0], self.latent_dim).normal_()
        likelihood, kl = self(x, noise)
        return likelihood - kl

    def loss(self, x: Tensor, kl_weight: float = 1.0, free_bits: float = 0.0) -> Tensor:
        """``-(E_q[log p(x | z)] - kl_weight * KL)`` summed over the batch, one draw of
        ``z`` per image; with ``free_bits`` λ the KL is ``max(λ, mean KL) * batch``."""
        likelihood, kl = self(x)
        if kl_weight == 1.0 and not free_bits:
            return (kl - likelihood).sum()
        return kl_weight * kl_with_free_bits(kl, free_bits) - likelihood.sum()

    @torch.no_grad()
    def sample(self, num_images: int) -> Tensor:
        """Pixel probabilities of ``num_images`` images decoded from the prior."""
        z = torch.randn(num_images, self.latent_dim, device=self.device)
        return torch.sigmoid(self.decoder(z))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Pixel probabilities decoded from one posterior draw per image."""
        return torch.sigmoid(self.decoder(self.guide.posterior(x).sample()))


def _mlp(inputs: int, *widths: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(inputs, width), nn.ReLU()]
        inputs = width
    return nn.Sequential(*layers)


class GatedConv(nn.Module):
    """``conv_h(x) * sigmoid(conv_g(x))`` (Dauphin et al., 2017), as in the Sylvester-flow
    VAE; ``transpose`` uses transposed convolutions.

    >>> GatedConv(1, 8, kernel=5, stride=2, padding=2)(torch.zeros(3, 1, 28, 28)).shape
    torch.Size([3, 8, 14, 14])
    """

    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int = 1,
                 padding: int = 0, output_padding: int = 0, transpose: bool = False,
                 ) -> None:  # fmt: skip
        super().__init__()
        if transpose:
            args = (inputs, outputs, kernel, stride, padding, output_padding)
            self.h, self.g = nn.ConvTranspose2d(*args), nn.ConvTranspose2d(*args)
        else:
            args = (inputs, outputs, kernel, stride, padding)
            self.h, self.g = nn.Conv2d(*args), nn.Conv2d(*args)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


class GatedConvEncoder(nn.Module):
    """28x28 images ``(..., 784)`` to a 256-wide context (van den Berg et al., 2018).

    >>> GatedConvEncoder()(torch.zeros(2, 5, 784)).shape
    torch.Size([2, 5, 256])
    """

    context_dim = 256

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            GatedConv(1, 32, 5, 1, 2), GatedConv(32, 32, 5, 2, 2), GatedConv(32, 64, 5, 1, 2),
            GatedConv(64, 64, 5, 2, 2), GatedConv(64, 64, 5, 1, 2), GatedConv(64, 256, 7, 1, 0),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[:-1]
        h = self.net(x.reshape(-1, 1, 28, 28))
        return h.reshape(*batch, self.context_dim)


class GatedConvDecoder(nn.Module):
    """Latent codes ``(..., latent_dim)`` to the logits of 784 pixels.

    >>> GatedConvDecoder(latent_dim=64)(torch.zeros(2, 5, 64)).shape
    torch.Size([2, 5, 784])
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        t = {"transpose": True}
        self.net = nn.Sequential(
            GatedConv(latent_dim, 64, 7, 1, 0, **t), GatedConv(64, 64, 5, 1, 2, **t),
            GatedConv(64, 32, 5, 2, 2, 1, **t), GatedConv(32, 32, 5, 1, 2, **t),
            GatedConv(32, 32, 5, 2, 2, 1, **t), GatedConv(32, 32, 5, 1, 2, **t),
            nn.Conv2d(32, 1, 1),
        )  # fmt: skip

    def forward(self, z: Tensor) -> Tensor:
        batch = z.shape[:-1]
        logits = self.net(z.reshape(-1, z.shape[-1], 1, 1))
        return logits.reshape(*batch, 784)
