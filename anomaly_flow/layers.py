"""The bijections of Glow (Kingma & Dhariwal 2018), in the paper's order.

Direction, stated once for the whole package: ``forward`` maps data to noise
(x -> z) and ``inverse`` maps noise to data. Every bijection returns its
log-determinant in nats as a tensor; it is never ``None``.

Every layer that acts on a ``(B, C, H, W)`` tensor without changing its shape
implements ``forward_map(x) -> (y, logdet_map)``, where ``logdet_map`` has shape
``(B, H, W)``: the log-determinant decomposed exactly over spatial positions.
``forward(x) -> (y, logdet)`` with ``logdet`` of shape ``(B,)`` is its sum. The
per-position form is what the likelihood heatmaps are built from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)


class Bijection(nn.Module):
    """Base class: a shape-preserving invertible map with a per-position log-det."""

    def forward_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map x -> y; return y and the log-det per position, shape ``(B, H, W)``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map x -> y; return y and the log-det, shape ``(B,)``, in nats."""
        y, logdet_map = self.forward_map(x)
        return y, logdet_map.sum(dim=(1, 2))

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Map y -> x; return x and the log-det of the inverse map, shape ``(B,)``."""
        raise NotImplementedError


def _broadcast_map(value: Tensor, x: Tensor) -> Tensor:
    """A data-independent per-position log-det ``value`` as a ``(B, H, W)`` map."""
    b, _, h, w = x.shape
    return value.to(x.dtype).expand(b, h, w)


class ActNorm(Bijection):
    """Per-channel affine map ``y = (x + loc) * exp(log_scale)``.

    The data-dependent initialisation (zero mean, unit variance per channel on the
    first batch) is the explicit call :meth:`initialize`; it sets the ``initialized``
    buffer, so the state dict carries it and ``forward`` has no hidden branch.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor, eps: float = 1e-6) -> None:
        """Set loc and scale so that this batch leaves with zero mean, unit std (a channel
        without spread: zero mean, scale 1)."""
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        # a channel with no spread (one image at a 1x1 level: one value per channel) says
        # nothing about its scale; 1/eps would multiply it by a million and the model's
        # bits/dim by as much, so such a channel keeps the scale 1
        scale = torch.where(std > eps, std + eps, torch.ones_like(std))
        self.loc.copy_(-mean)
        self.log_scale.copy_(-torch.log(scale))
        self.initialized.fill_(True)

    def transform(self, x: Tensor) -> Tensor:
        """``y`` alone; its log-det per position is ``sum(log_scale)`` whatever ``x``."""
        return (x + self.loc) * torch.exp(self.log_scale)

    def forward_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.transform(x), _broadcast_map(self.log_scale.sum(), x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = y * torch.exp(-self.log_scale) - self.loc
        h, w = y.shape[2:]
        return x, (-self.log_scale.sum() * h * w).expand(y.shape[0])


class InvConv1x1(Bijection):
    """Invertible 1x1 convolution with a dense weight ``W`` (the "plain" variant).

    ``log|det|`` per position is ``log|det W|``, computed with ``slogdet``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels))
        self.weight = nn.Parameter(q)

    def _weight_and_logdet(self) -> tuple[Tensor, Tensor]:
        return self.weight, torch.linalg.slogdet(self.weight)[1]

    @staticmethod
    def stacked_weights(convs: Sequence[InvConv1x1]) -> tuple[Tensor, Tensor]:
        """The weights ``(K, C, C)`` and ``log|det|`` ``(K,)`` of ``convs`` (all of this
        class, same C) in one batch of operations instead of K: what a level's K flow
        steps need per pass, in a handful of kernel launches."""
        weights = torch.stack([conv.weight for conv in convs])
        return weights, torch.linalg.slogdet(weights)[1]

    @staticmethod
    def transform(x: Tensor, weight: Tensor) -> Tensor:
        """``y`` alone, for the weight of :meth:`_weight_and_logdet` or a row of
        :meth:`stacked_weights`; its log-det per position is the matching log-det."""
        return F.conv2d(x, weight.to(x.dtype)[:, :, None, None])

    def forward_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        weight, logdet = self._weight_and_logdet()
        return self.transform(x, weight), _broadcast_map(logdet, x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        weight, logdet = self._weight_and_logdet()
        inv = torch.linalg.inv(weight.to(torch.float64)).to(y.dtype)
        h, w = y.shape[2:]
        return F.conv2d(y, inv[:, :, None, None]), (-logdet * h * w).expand(y.shape[0])


class InvConv1x1LU(InvConv1x1):
    """Invertible 1x1 convolution parametrised as ``W = P L (U + diag(s))``.

    ``P`` is a fixed permutation, ``L`` unit lower-triangular, ``U`` strictly upper
    triangular and ``s = sign * exp(log_s)``, so ``log|det W| = sum(log_s)`` costs
    nothing and ``W`` stays invertible.
    """

    def __init__(self, channels: int) -> None:
        nn.Module.__init__(self)
        q, _ = torch.linalg.qr(torch.randn(channels, channels))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))

    def _weight_and_logdet(self) -> tuple[Tensor, Tensor]:
        return self._compose(self.perm, self.lower, self.upper, self.sign_s, self.log_s,
                             self.lower_mask, self.eye)

    @staticmethod
    def _compose(perm: Tensor, lower: Tensor, upper: Tensor, sign_s: Tensor, log_s: Tensor,
                 lower_mask: Tensor, eye: Tensor) -> tuple[Tensor, Tensor]:
        """``W = P L (U + diag(s))`` and ``sum(log_s)``, for one layer or a stack of them
        (leading dimension K)."""
        lower = lower * lower_mask + eye
        upper = upper * lower_mask.mT + torch.diag_embed(sign_s * torch.exp(log_s))
        return perm @ lower @ upper, log_s.sum(-1)

    @staticmethod
    def stacked_weights(convs: Sequence[InvConv1x1]) -> tuple[Tensor, Tensor]:
        first = convs[0]
        return InvConv1x1LU._compose(
            *(torch.stack([getattr(conv, name) for conv in convs])
              for name in ("perm", "lower", "upper", "sign_s", "log_s")),
            first.lower_mask, first.eye)


class ZeroConv2d(nn.Module):
    """3x3 convolution initialised to output zeros, with a learned per-channel gain.

    Zero initialisation makes every coupling start as the identity (Glow, sec. 3.3).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.log_gain = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * torch.exp(self.log_gain * 3)


class CouplingNet(nn.Sequential):
    """The coupling network: 3x3 conv, ReLU, 1x1 conv, ReLU, zero-initialised 3x3 conv.

    ``autocast_dtype`` (set through
    :meth:`~anomaly_flow.glow.Glow.set_coupling_autocast`) runs only this network under
    autocast, so log-dets and priors stay in the input's precision.
    """

    def __init__(self, in_channels: int, hidden: int, out_channels: int) -> None:
        first = nn.Conv2d(in_channels, hidden, 3, padding=1)
        middle = nn.Conv2d(hidden, hidden, 1)
        for conv in (first, middle):
            nn.init.normal_(conv.weight, std=0.05)
            nn.init.zeros_(conv.bias)
        super().__init__(first, nn.ReLU(), middle, nn.ReLU(), ZeroConv2d(hidden, out_channels))
        self.autocast_dtype: torch.dtype | None = None

    def forward(self, x: Tensor) -> Tensor:
        dtype = self.autocast_dtype
        if dtype is None:  # no autocast context to build, 96 times a pass in eager mode
            return super().forward(x)
        with torch.autocast(x.device.type, dtype=dtype):
            return super().forward(x).to(x.dtype)


class AffineCoupling(Bijection):
    """``y_b = (x_b + t(x_a)) * sigmoid(h(x_a) + 2)``, ``y_a = x_a``.

    The ``+ 2`` starts the scale near 0.88 and the sigmoid bounds it in (0, 1), which
    keeps training stable. The network may run under bf16 autocast; its output is cast
    back to the input's dtype before the log-det is taken.
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.net = CouplingNet(channels // 2, hidden, 2 * (channels - channels // 2))

    def _shift_log_scale(self, x_a: Tensor) -> tuple[Tensor, Tensor]:
        h = self.net(x_a)
        shift, raw = h[:, 0::2], h[:, 1::2]
        return shift, F.logsigmoid(raw + 2.0)

    def forward_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_a, x_b = x.chunk(2, dim=1)
        shift, log_scale = self._shift_log_scale(x_a)
        y_b = (x_b + shift) * torch.exp(log_scale)
        return torch.cat([x_a, y_b], dim=1), log_scale.sum(dim=1)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        y_a, y_b = y.chunk(2, dim=1)
        shift, log_scale = self._shift_log_scale(y_a)
        x_b = y_b * torch.exp(-log_scale) - shift
        return torch.cat([y_a, x_b], dim=1), -log_scale.sum(dim=(1, 2, 3))


class AdditiveCoupling(Bijection):
    """``y_b = x_b + t(x_a)``: volume preserving, log-det zero."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.net = CouplingNet(channels // 2, hidden, channels - channels // 2)

    def forward_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_a, x_b = x.chunk(2, dim=1)
        y_b = x_b + self.net(x_a)
        return torch.cat([x_a, y_b], dim=1), x.new_zeros(x.shape[0], *x.shape[2:])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        y_a, y_b = y.chunk(2, dim=1)
        x_b = y_b - self.net(y_a)
        return torch.cat([y_a, x_b], dim=1), y.new_zeros(y.shape[0])


class FlowStep(Bijection):
    """One Glow step: actnorm, invertible 1x1 convolution, coupling."""

    def __init__(self, channels: int, hidden: int, coupling: str = "affine",
                 invconv: str = "lu") -> None:
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1LU(channels) if invconv == "lu" else InvConv1x1(channels)
        coupling_cls = AffineCoupling if coupling == "affine" else AdditiveCoupling
        self.coupling = coupling_cls(channels, hidden)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> Tensor:
        """Initialise the actnorm on ``x``; return this step's output."""
        self.actnorm.initialize(x)
        return self.forward_map(x)[0]

    def transform(self, x: Tensor, conv_weight: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, the coupling's log-det map)``, given the 1x1 convolution's weight. The
        rest of the step's log-det, ``sum(actnorm.log_scale)`` plus the convolution's
        ``log|det W|``, is the same at every position of every image: a level runs this
        and adds its steps' constants once (:meth:`anomaly_flow.glow.Level.run_steps`)."""
        x = self.invconv.transform(self.actnorm.transform(x), conv_weight)
        return self.coupling.forward_map(x)

    def forward_map(self, x: Tensor) -> tuple[Tensor, Tensor]:
        weight, conv_logdet = self.invconv._weight_and_logdet()
        y, coupling_map = self.transform(x, weight)
        return y, coupling_map + _broadcast_map(self.actnorm.log_scale.sum() + conv_logdet, x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        y, ld_coup = self.coupling.inverse(y)
        y, ld_conv = self.invconv.inverse(y)
        y, ld_act = self.actnorm.inverse(y)
        return y, ld_coup + ld_conv + ld_act


def squeeze(x: Tensor) -> Tensor:
    """``(B, C, H, W) -> (B, 4C, H/2, W/2)``: each 2x2 block becomes 4 channels. log-det 0."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unsqueeze(x: Tensor) -> Tensor:
    """Inverse of :func:`squeeze`."""
    b, c, h, w = x.shape
    x = x.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, h * 2, w * 2)


def gaussian_log_prob(z: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """Elementwise log N(z; mean, exp(log_std)^2) in nats."""
    return -0.5 * (LOG_2PI + 2.0 * log_std + (z - mean) ** 2 * torch.exp(-2.0 * log_std))


class SplitPrior(nn.Module):
    """Learned conditional prior ``p(z2 | z1)`` of the half split off after a level.

    A zero-initialised convolution of the kept half gives the mean and log-std of
    the other half, so the prior starts as a standard normal.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.kept = channels // 2
        self.net = ZeroConv2d(self.kept, 2 * (channels - self.kept))

    def _params(self, z1: Tensor) -> tuple[Tensor, Tensor]:
        h = self.net(z1).to(z1.dtype)
        return h[:, 0::2], h[:, 1::2]

    def log_prob_map(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Split ``x``; return the kept half, the split-off half and ``log p(z2|z1)`` per
        position, shape ``(B, H, W)``."""
        z1, z2 = x[:, : self.kept], x[:, self.kept :]
        mean, log_std = self._params(z1)
        return z1, z2, gaussian_log_prob(z2, mean, log_std).sum(dim=1)

    def sample(self, z1: Tensor, temperature: float, z2: Tensor | None = None) -> Tensor:
        """Rebuild the full tensor from the kept half, drawing ``z2`` when not given."""
        if z2 is None:
            mean, log_std = self._params(z1)
            z2 = mean + torch.exp(log_std) * temperature * torch.randn_like(mean)
        return torch.cat([z1, z2], dim=1)


class TopPrior(nn.Module):
    """Learned diagonal Gaussian over the last level's latent, zero-initialised."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(1, channels, size, size))
        self.log_std = nn.Parameter(torch.zeros(1, channels, size, size))

    def log_prob_map(self, z: Tensor) -> Tensor:
        """``log p(z)`` per position, shape ``(B, H, W)``."""
        return gaussian_log_prob(z, self.mean.to(z.dtype), self.log_std.to(z.dtype)).sum(dim=1)

    def sample(self, n: int, temperature: float) -> Tensor:
        eps = torch.randn(n, *self.mean.shape[1:], device=self.mean.device)
        return self.mean + torch.exp(self.log_std) * temperature * eps
