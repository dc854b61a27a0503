"""The multi-scale Glow and its exact likelihood.

``Glow.forward`` maps an image batch to its latents and returns, per level, the
log-determinant and the prior log-density *per spatial position*. Everything else
(``log_prob``, bits/dim, the per-level breakdown, the per-pixel heatmap) is a sum of
those maps, so the pieces add up to the total exactly, by construction.

Images enter the flow as ``x = (k + u) / n_bins - 0.5`` for quantised values
``k in {0, ..., n_bins - 1}``: ``u ~ U[0, 1)`` while training (dequantisation), ``u = 0.5``
when scoring, so the same image always gets the same number.

A trained model may also carry a *normal reference* (:meth:`Glow.set_reference`): the
per-pixel mean and spread of the bits/dim map over held-out normal images, and those
images' maps and the images themselves averaged over blocks (:func:`knn_grid`). From it
:meth:`Glow.typicality` scores how far an image's map is from the average normal map,
:meth:`Glow.knn` how far it is from the nearest normal maps and :meth:`Glow.pixel_knn`
how far the image is from the nearest normal images; the mean and spread of ``knn``,
``coarse_complexity`` and ``pixel_knn`` over those images put the three on one scale for
the ``ensemble`` score (:meth:`Glow.ensemble`). It lives in the state dict
(``reference_mean``, ``reference_std``, ``reference_maps``, ``reference_scale``,
``reference_images``) only once set.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import Tensor, nn

from anomaly_flow.config import GlowConfig
from anomaly_flow.errors import first_line
from anomaly_flow.layers import FlowStep, SplitPrior, TopPrior, squeeze, unsqueeze

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAINING_SHAPES_KEY = "anomaly_flow.training_shapes"
"""The weights file's metadata key for :attr:`Glow.training_shapes` (JSON)."""


DIGESTED_CONFIG = ("in_channels", "image_size", "levels", "steps_per_level", "hidden_channels",
                   "coupling", "invconv", "n_bits", "resize")
"""The config fields every :meth:`Glow.digest` covers. A field added to
:class:`~anomaly_flow.config.GlowConfig` later enters a digest only where it differs from
its default, so that the digests calibrations recorded before it stay valid."""


def save_tensors(tensors: dict[str, Tensor], path: Path,
                 metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (and the file's string ``metadata``) to a safetensors file,
    atomically (a temp file renamed into place), with the mode any new file gets (0644
    under umask 022): safetensors' ``save_file`` makes its file 0600, which another user
    (a serving account, a shared registry's reader) could not read."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(safetensors.torch.save(tensors, metadata=metadata or None))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)

REFERENCE_KEYS = ("reference_mean", "reference_std", "reference_maps", "reference_scale",
                  "reference_images")
"""State-dict keys of the normal reference (:meth:`Glow.set_reference`); optional. The
references of older anomaly-flows also load: the first two alone (before ``knn``), and the
first four (before ``pixel_knn``: ``reference_scale`` then has two rows)."""

_REFERENCE_LAYOUTS = frozenset({(False,) * 5, (True, True, False, False, False),
                                (True, True, True, True, False), (True,) * 5})
"""Which of :data:`REFERENCE_KEYS` a state may hold together: none, the typicality-only
reference, the one before ``pixel_knn``, all."""

REFERENCE_MAX_MAPS = 10_000
"""Most held-out maps (and pooled images) a normal reference keeps for :meth:`Glow.knn`
and :meth:`Glow.pixel_knn` (training keeps every k-th held-out image beyond it); 10,000
maps of 16x16 are 10 MB of weights, and their pooled images as much again per channel."""

KNN_NEIGHBOURS = 5
"""How many nearest normal maps :meth:`Glow.knn` averages the distance to (fewer when
the reference holds fewer maps). On B4 (benchmarks/NOTES.md) 3, 5, 10 and 20 give mean
AUROCs within 0.2 of each other; 1 is 0.4 to 0.8 lower."""

KNN_MIN_GRID = 7
"""The smallest grid side :func:`knn_grid` pools maps to."""

KNN_MAX_GRID = 16
"""The grid side :func:`knn_grid` halves down to, where it can: bounds the stored maps
and images (10,000 of 16x16 are 10 MB, per channel for the images)."""

REFERENCE_STD_FLOOR = 0.1
"""Bits/dim added to every per-pixel standard deviation of the normal reference: a pixel
that barely varies over the normal images (a blank border, or any pixel when there are
few of them) must not turn a difference of a few hundredths of a bit into a large score.
On B4 (benchmarks/NOTES.md) floors of 0.001 and 0.1 give every class the same AUROC to
within 0.1."""


def knn_grid(config: GlowConfig) -> int:
    """Side of the grid on which :meth:`Glow.knn` compares maps: the image size divided by
    the largest ``2**l`` (``l <= levels``) that leaves at least :data:`KNN_MIN_GRID`
    positions per side (28x28 at L=2: 7x7; 32x32 at L=3: 8x8; 256x256 at L=4: 16x16), or
    the image size itself for images too small for that; then halved while it is even,
    above :data:`KNN_MAX_GRID` and stays at least :data:`KNN_MIN_GRID` (256x256 at L=1:
    16x16, not 128x128).

    The blocks are positions of level ``l`` or unions of them, so no block straddles two
    positions of a coarser level. Averaging over them keeps the maps small enough to
    store thousands of them in the model, and on B4 comparing at 7x7 does as well as at
    14x14 (mean AUROC 92.4 against 92.0), while blocks that do straddle (4x4 at 28x28)
    do worse (90.7).
    """
    size = config.image_size
    grid = next((size // 2**level for level in range(config.levels, 0, -1)
                 if size // 2**level >= KNN_MIN_GRID), size)
    if grid < size:  # a level grid: halving it keeps blocks whole
        while grid > KNN_MAX_GRID and grid % 2 == 0 and grid // 2 >= KNN_MIN_GRID:
            grid //= 2
    return grid


_RETRAIN = ("train it with a validation set (val_fraction > 0); a model trained by an older "
            "anomaly-flow has a smaller reference, without what this score needs: train it "
            "again")


def ensemble_score(knn: Tensor, coarse_complexity: Tensor, scale: Tensor,
                   pixel_knn: Tensor | None = None) -> Tensor:
    """:meth:`Glow.ensemble` ``(B,)`` float64 for a ``reference_scale`` already at hand
    (scoring keeps a host copy, so that no batch waits for the device): ``(3, 2)`` with
    ``pixel_knn`` given, ``(2, 2)`` (an older reference) without."""
    if (pixel_knn is not None) != (len(scale) == 3):
        raise ValueError(f"a reference_scale of {len(scale)} rows goes with "
                         f"{'a' if len(scale) == 3 else 'no'} pixel_knn")
    scale = scale.to(knn.device, torch.float64)
    terms = [knn, coarse_complexity] + ([] if pixel_knn is None else [pixel_knn])
    return sum(((term.double() - scale[i, 0]) / scale[i, 1] for i, term in enumerate(terms)),
               torch.zeros(len(knn), dtype=torch.float64, device=knn.device))


def _mean_and_std(values: Tensor) -> Tensor:
    """``[mean, std]`` float64 of ``(N,)`` values for standardising them: the population
    std, or 1 where it is 0 or there are no values (mean 0 then), so dividing by it
    never fails."""
    if not len(values):
        return torch.tensor([0.0, 1.0], dtype=torch.float64, device=values.device)
    std = values.std(correction=0)
    return torch.stack([values.mean(), torch.where(std > 0, std, torch.ones_like(std))])


def _reference_shape_problem(config: GlowConfig, mean: Tensor, std: Tensor,
                             maps: Tensor | None = None,
                             *companions: tuple[str, Tensor | None, tuple[int, ...]]
                             ) -> str | None:
    """What is wrong with the shapes of a normal reference for a model of ``config``, or
    None: ``mean`` and ``std`` ``(H, W)``; ``maps`` ``(N, G, G)`` with
    ``1 <= N <= REFERENCE_MAX_MAPS``; and the maps' ``companions`` (name, tensor or None
    for absent, shape it must have: their ``coarse_complexity`` when set,
    ``reference_scale`` when loaded, the pooled images ``(N, C, G, G)``)."""
    size, grid = config.image_size, knn_grid(config)
    for name, value in (("mean", mean), ("std", std)):
        if tuple(value.shape) != (size, size):
            return (f"the reference {name} must have shape ({size}, {size}), the model's "
                    f"image size; got {tuple(value.shape)}")
    if maps is not None and (maps.ndim != 3 or tuple(maps.shape[1:]) != (grid, grid)
                             or not 1 <= len(maps) <= REFERENCE_MAX_MAPS):
        return (f"the reference maps must have shape (N, {grid}, {grid}) with "
                f"1 <= N <= {REFERENCE_MAX_MAPS}; got {tuple(maps.shape)}")
    for name, value, shape in companions:
        if value is not None and tuple(value.shape) != shape:
            return f"the reference {name} must have shape {shape}; got {tuple(value.shape)}"
    return None


def pool_to_grid(pixel_bpd: Tensor, grid: int) -> Tensor:
    """Average per-pixel maps ``(B, H, W)`` over square blocks to ``(B, grid, grid)``."""
    return F.avg_pool2d(pixel_bpd[:, None], pixel_bpd.shape[-1] // grid)[:, 0]


def pool_images(x: Tensor, grid: int) -> Tensor:
    """Average flow inputs ``(B, C, H, W)`` (:func:`preprocess`) over square blocks to
    ``(B, C, grid, grid)``, float32: what :meth:`Glow.pixel_knn` compares."""
    return F.avg_pool2d(x.float(), x.shape[-1] // grid)


def _mean_nearest(queries: Tensor, keys: Tensor, exclude: Tensor | None = None) -> Tensor:
    """``(B,)`` float64: the mean Euclidean distance of each row of ``queries`` ``(B, D)``
    to its :data:`KNN_NEIGHBOURS` nearest rows of ``keys`` ``(N, D)`` (both float64);
    ``exclude`` ``(B,)`` names a key each query must not count (itself, for
    leave-one-out)."""
    # |a|² + |b|² − 2a·b as one matrix product: several times faster than differencing
    # every pair, but torch's (2.13, CPU) is off by up to ~1e-7 even in float64, by an
    # amount that depends on the number of queries: it only picks candidates, twice as
    # many as needed, whose distances are then taken by differencing, so that a file's
    # score does not depend on the batch it came in.
    distances = torch.cdist(queries, keys, compute_mode="use_mm_for_euclid_dist")
    available = len(keys)
    if exclude is not None:
        distances[torch.arange(len(queries), device=distances.device), exclude] = math.inf
        available -= 1
    k = min(KNN_NEIGHBOURS, available)
    candidates = distances.topk(min(2 * k, available), dim=1, largest=False).indices
    exact = (queries[:, None, :] - keys[candidates]).square().sum(dim=2).sqrt()
    return exact.topk(k, dim=1, largest=False).values.mean(dim=1)


def _leave_one_out(keys: Tensor, nearest: Callable[..., Tensor], chunk: int = 1024) -> Tensor:
    """``nearest(rows, exclude=rows)`` for every row of ``keys`` ``(N, ...)`` against the
    other N − 1 (empty for N = 1), in chunks of rows so the distance matrix never exceeds
    chunk × N; float64 ``(N,)``."""
    n = len(keys)
    if n < 2:
        return keys.new_zeros(0, dtype=torch.float64)
    parts = []
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n), device=keys.device)
        parts.append(nearest(keys[rows], exclude=rows))
    return torch.cat(parts)


class ModelFileError(ValueError):
    """A saved model folder cannot be loaded: a file is missing or does not match its
    config, or the model does not fit in the free memory of the device asked for."""


class SamplingError(RuntimeError):
    """The model cannot draw samples: its flow has no inverse, or its samples overflow.

    A singular 1x1 convolution comes from a diverged training. Samples overflow where the
    inverse divides by small scales: an actnorm's (one per channel, whatever the input)
    or an affine coupling's (which can be near 0 for latents unlike the training
    images'). A diverged training does it, and so does a briefly trained model at higher
    temperatures, whose density (:meth:`Glow.forward`) is fine.
    """


class FlowOutput(NamedTuple):
    """What :meth:`Glow.forward` returns; lists are indexed by level, finest first.

    Attributes:
        latents: The latent split off at each level (the last is the top latent),
            ``(B, C_l, H_l, W_l)``.
        logdet_maps: Log-determinant of each level's flow steps per position,
            ``(B, H_l, W_l)``, nats.
        prior_maps: Log-density of each level's latent under its prior per position,
            ``(B, H_l, W_l)``, nats.
    """

    latents: list[Tensor]
    logdet_maps: list[Tensor]
    prior_maps: list[Tensor]


@dataclass(frozen=True)
class LikelihoodBreakdown:
    """Exact decomposition of ``log p(x)`` for a batch.

    Attributes:
        log_prob: ``(B,)`` log-density of the dequantised image in nats.
        bpd: ``(B,)`` bits per dimension of the quantised image.
        level_bits: ``(B, L)`` each level's share of ``-log p(x)`` in bits/dim;
            ``bpd == n_bits + level_bits.sum(1)``.
        pixel_bpd: ``(B, H, W)`` per-pixel bits/dim; its mean over pixels is ``bpd``
            (None when not asked for).
    """

    log_prob: Tensor
    bpd: Tensor
    level_bits: Tensor
    pixel_bpd: Tensor | None


def _check_flow_range(x: Tensor, method: str) -> None:
    """Refuse flow inputs outside [-0.5, 0.5], where :func:`preprocess` puts images (0.5
    only by float32 rounding), and NaN: raw pixels (0-1 or 0-255 floats) would get a
    bits/dim that looks plausible, or inf."""
    if not x.numel():
        return
    low, high = torch.stack(torch.aminmax(x.detach())).tolist()  # one read of the device
    if math.isnan(low) or math.isnan(high):
        raise ValueError(f"{method} takes flow inputs in [-0.5, 0.5]; these hold NaN")
    if not (low >= -0.5 and high <= 0.5):  # noise of 1 - 2**-24 rounds up to 0.5
        raise ValueError(
            f"{method} takes flow inputs in [-0.5, 0.5], as preprocess(images, n_bits) gives "
            f"them; these run from {low:g} to {high:g} (raw pixels?): pass uint8 images "
            "through preprocess first")


def preprocess(images: Tensor, n_bits: int, noise: Tensor | None = None) -> Tensor:
    """Quantise ``uint8`` images to ``n_bits`` and map them into the flow's input range.

    Args:
        images: ``(B, C, H, W)`` uint8 (or integer-valued) pixels in [0, 255].
        n_bits: Bits per channel kept.
        noise: Dequantisation noise in [0, 1) of the same shape; ``None`` puts every
            value at the centre of its bin (deterministic scoring).

    Returns:
        ``(B, C, H, W)`` float32 in [-0.5, 0.5) (0.5 itself where ``noise`` within
        2**-17 of 1 meets a top bin: float32 rounds it up).

    Raises:
        TypeError: ``images`` are floats: their scale (0-1 or 0-255) cannot be told from
            the dtype, and truncating 0-1 floats to integers would score black images.
        ValueError: ``n_bits`` is not from 1 to 8, integer ``images`` other than uint8
            hold values outside [0, 255] (16-bit pixels, say; checked here, a host sync),
            or ``noise`` has another shape.
    """
    if images.is_floating_point() or images.is_complex() or images.dtype == torch.bool:
        raise TypeError(
            f"preprocess takes integer pixels in [0, 255] (uint8), not {images.dtype}; "
            "convert floats in [0, 1] with (images * 255).round().to(torch.uint8), or "
            "floats in [0, 255] with images.round().to(torch.uint8)")
    if isinstance(n_bits, bool) or not isinstance(n_bits, numbers.Integral) \
            or not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be a whole number from 1 to 8 (the model's "
                         f"config.n_bits); got {n_bits!r}")
    if images.dtype != torch.uint8 and images.numel():
        wide = images.to(torch.int64)  # torch has no min() for uint16 (a 16-bit PNG's)
        low, high = int(wide.min()), int(wide.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"preprocess takes pixels in [0, 255]; these {images.dtype} pixels run from "
                f"{low} to {high}: scale them to 8 bits first (16-bit pixels as image_to_array "
                "does: (images / 257).round().to(torch.uint8))")
    if noise is not None and noise.shape != images.shape:  # broadcasting would hide it
        raise ValueError(f"noise must have the images' shape {tuple(images.shape)}, one value "
                         f"per pixel; got {tuple(noise.shape)}")
    n_bins = 2**n_bits
    k = torch.div(images.to(torch.int32), 2 ** (8 - n_bits), rounding_mode="floor")
    u = 0.5 if noise is None else noise
    return (k.to(torch.float32) + u) / n_bins - 0.5


def postprocess(x: Tensor, n_bits: int) -> Tensor:
    """Map flow inputs back to ``uint8`` images (inverse of :func:`preprocess`)."""
    n_bins = 2**n_bits
    k = torch.floor((x + 0.5) * n_bins).clamp(0, n_bins - 1)
    return (k * 2 ** (8 - n_bits)).to(torch.uint8)


class Level(nn.Module):
    """Squeeze, K flow steps, then a split with a conditional prior (or the top prior)."""

    def __init__(self, in_channels: int, size: int, config: GlowConfig, last: bool) -> None:
        super().__init__()
        channels = in_channels * 4
        self.steps = nn.ModuleList(
            FlowStep(channels, config.hidden_channels, config.coupling, config.invconv)
            for _ in range(config.steps_per_level)
        )
        self.last = last
        self.prior = TopPrior(channels, size) if last else SplitPrior(channels)
        self.out_channels = channels if last else channels // 2

    def run_steps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The K flow steps (each :meth:`FlowStep.forward_map`): the output and the summed
        log-det map ``(B, H, W)``, computed in fewer, larger operations than step by step.
        Every step's 1x1 convolution weight comes from one batch of small matrix
        operations, and the parts of the log-det that are the same at every position
        (actnorm, 1x1 convolutions) are summed once for the level and added once: K times
        fewer kernel launches for them, in the backward pass too."""
        x = squeeze(x)
        convs = [step.invconv for step in self.steps]
        weights, conv_logdets = type(convs[0]).stacked_weights(convs)
        constant = (torch.stack([step.actnorm.log_scale for step in self.steps]).sum()
                    + conv_logdets.sum())
        logdet_map = None
        for step, weight in zip(self.steps, weights.unbind(), strict=True):  # one view op
            x, coupling_map = step.transform(x, weight)
            logdet_map = coupling_map if logdet_map is None else logdet_map + coupling_map
        return x, logdet_map + constant.to(logdet_map.dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return (what goes on to the next level, this level's latent, log-det map,
        prior map)."""
        x, logdet_map = self.run_steps(x)
        if self.last:
            return x, x, logdet_map, self.prior.log_prob_map(x)
        z1, z2, prior_map = self.prior.log_prob_map(x)
        return z1, z2, logdet_map, prior_map

    def inverse(self, z: Tensor, latent: Tensor | None, temperature: float) -> Tensor:
        """Rebuild this level's input from the next level's output and this level's
        latent (drawn from the prior at ``temperature`` when ``None``)."""
        if self.last:
            x = latent if latent is not None else self.prior.sample(z.shape[0], temperature)
        else:
            x = self.prior.sample(z, temperature, latent)
        for step in reversed(self.steps):
            x, _ = step.inverse(x)
        return unsqueeze(x)


class Glow(nn.Module):
    """Multi-scale Glow density model over ``(B, C, H, W)`` images.

    Example:
        >>> model = Glow(GlowConfig(image_size=8, levels=2, steps_per_level=2,
        ...                         hidden_channels=8))
        >>> images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
        >>> model.initialize(preprocess(images, 8))
        >>> model.bpd(preprocess(images, 8)).shape
        torch.Size([4])
    """

    def __init__(self, config: GlowConfig) -> None:
        super().__init__()
        self.config = config
        levels = []
        channels, size = config.in_channels, config.image_size
        for i in range(config.levels):
            size //= 2
            level = Level(channels, size, config, last=i == config.levels - 1)
            levels.append(level)
            channels = level.out_channels
        self.levels = nn.ModuleList(levels)
        # The normal reference: per-pixel mean and std of pixel_bpd over held-out normal
        # images, their maps pooled to knn_grid, the (mean, std) of their knn,
        # coarse_complexity and pixel_knn, and the images pooled to knn_grid (set by
        # training); None until set, and then absent from the state dict.
        self.reference_mean: Tensor | None
        self.reference_std: Tensor | None
        self.reference_maps: Tensor | None
        self.reference_scale: Tensor | None
        self.reference_images: Tensor | None
        for key in REFERENCE_KEYS:
            self.register_buffer(key, None)
        # per reference tensor name: (the tensor itself, its version, what was made of it)
        self._reference_cache: dict[str, tuple[Tensor, int, Any]] = {}
        self.training_shapes: tuple[tuple[int, int, int], ...] = ()
        """``(width, height, count)`` of the training folder's images looked at
        (:attr:`anomaly_flow.survey.ConversionLook.shapes`), most common first; empty when unknown
        (set by :func:`anomaly_flow.tracking.train_and_register`, saved with the weights
        as the file's metadata), so that scoring can say when images come in a size the
        model never trained on."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def initialized(self) -> bool:
        """Whether every ActNorm has had its data-dependent initialisation."""
        flags = [step.actnorm.initialized for lvl in self.levels for step in lvl.steps]
        return bool(torch.stack(flags).all())  # one read of the device, not one per step

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Data-dependent ActNorm initialisation on a batch ``x`` of flow inputs.

        Call once, on the first batch, before training (and before wrapping the model
        in DistributedDataParallel, so every rank starts from the same weights).

        Raises:
            ValueError: ``x`` is not a batch of this model's flow inputs, or the model is
                already initialised (trained or loaded): initialising it again would
                replace what its ActNorm layers learned.
        """
        self.check_input(x)
        if self.initialized:  # one partly initialised (a failed first try) may go again
            raise ValueError(
                "the model is already initialised (trained, or loaded with its weights): "
                "initialising it again would replace what its ActNorm layers learned and "
                "change its scores; score it as it is, or build a new Glow(config) to train "
                "from scratch")
        for level in self.levels:
            x = squeeze(x)
            for step in level.steps:
                x = step.initialize(x)
            if not level.last:
                x = x[:, : level.prior.kept]

    @property
    def has_reference(self) -> bool:
        """Whether the model carries a normal reference, so it can score ``typicality``."""
        return self.reference_mean is not None

    @property
    def has_knn_reference(self) -> bool:
        """Whether its normal reference also holds the maps behind ``knn`` and
        ``ensemble`` (every reference fitted by this version does; an older one does not)."""
        return self.reference_maps is not None

    @property
    def has_image_reference(self) -> bool:
        """Whether its normal reference also holds the pooled images behind ``pixel_knn``
        (every reference fitted by this version does; an older one does not), so that
        ``ensemble`` has three terms."""
        return self.reference_images is not None

    def set_reference(self, mean: Tensor, std: Tensor, maps: Tensor | None = None,
                      coarse_complexity: Tensor | None = None,
                      images: Tensor | None = None) -> None:
        """Store the normal reference, from N held-out normal images: the per-pixel mean
        and standard deviation of ``pixel_bpd`` (:class:`LikelihoodBreakdown`), each
        ``(H, W)`` at the model's image size; and, for ``knn``, ``pixel_knn`` and
        ``ensemble``, the images' maps pooled to :func:`knn_grid`, ``(N, G, G)`` with
        ``1 <= N <= REFERENCE_MAX_MAPS``, their ``coarse_complexity`` scores ``(N,)`` and
        the images themselves as flow inputs pooled to the same grid (:func:`pool_images`,
        ``(N, C, G, G)``). From those it derives the mean and standard deviation over the
        N images of ``knn`` and ``pixel_knn`` (each image against the other N − 1,
        leave-one-out) and of ``coarse_complexity`` (``reference_scale``: rows ``knn``,
        ``coarse_complexity`` and ``pixel_knn``, columns mean and std), which
        :meth:`ensemble` uses. Without maps the model scores ``typicality`` only; with maps
        but without images (an older anomaly-flow's reference) ``ensemble`` has two terms
        and there is no ``pixel_knn``. Saved and loaded with the weights.

        Raises:
            ValueError: A shape other than these, only one of ``maps`` and
                ``coarse_complexity``, images without maps, or a non-finite or negative
                value.
        """
        if (maps is None) != (coarse_complexity is None):
            raise ValueError("the reference maps and coarse_complexity go together: give both "
                             "or neither")
        if images is not None and maps is None:
            raise ValueError("the reference images need the reference maps and "
                             "coarse_complexity too")
        grid, channels = knn_grid(self.config), self.config.in_channels
        problem = _reference_shape_problem(
            self.config, mean, std, maps,
            *([] if maps is None else [
                ("coarse_complexity", coarse_complexity, (len(maps),)),
                ("images", images, (len(maps), channels, grid, grid))]))
        if problem:
            raise ValueError(problem)
        for name, value in (("mean", mean), ("std", std), ("maps", maps),
                            ("coarse_complexity", coarse_complexity), ("images", images)):
            if value is not None and not bool(torch.isfinite(value).all()):
                raise ValueError(f"the reference {name} has non-finite values")
        if bool((std < 0).any()):
            raise ValueError("the reference std has negative values")
        device = self.device
        self._reference_cache = {}
        self.reference_mean = mean.detach().to(device, torch.float32).clone()
        self.reference_std = std.detach().to(device, torch.float32).clone()
        self.reference_maps = self.reference_scale = self.reference_images = None
        if maps is not None and coarse_complexity is not None:
            self.reference_maps = maps.detach().to(device, torch.float32).clone()
            rows = [_mean_and_std(self._reference_knn()),
                    _mean_and_std(coarse_complexity.detach().to(device, torch.float64))]
            if images is not None:
                self.reference_images = images.detach().to(device, torch.float32).clone()
                rows.append(_mean_and_std(_leave_one_out(
                    self.reference_images.flatten(1).double(), self._pixel_knn_pooled)))
            self.reference_scale = torch.stack(rows).float()

    def _reference_knn(self) -> Tensor:
        """``knn`` ``(N,)`` float64 of each reference map against the other N − 1 (empty
        for N = 1)."""
        assert self.reference_maps is not None
        return _leave_one_out(self.reference_maps.flatten(1), self._knn_pooled)

    def typicality_map(self, pixel_bpd: Tensor) -> Tensor:
        """The per-pixel terms ``(B, H, W)`` of :meth:`typicality` for per-pixel bits/dim
        maps ``(B, H, W)``: ``|pixel_bpd − μ| / (σ + REFERENCE_STD_FLOOR)``, with μ, σ the
        normal reference.

        Raises:
            ValueError: The model has no normal reference.
        """
        if self.reference_mean is None or self.reference_std is None:
            raise ValueError("this model has no normal reference, so it cannot score "
                             "typicality; train it with a validation set (val_fraction > 0)")
        return ((pixel_bpd - self.reference_mean)
                / (self.reference_std + REFERENCE_STD_FLOOR)).abs()

    def typicality(self, pixel_bpd: Tensor) -> Tensor:
        """The ``typicality`` score ``(B,)`` of per-pixel bits/dim maps ``(B, H, W)``: the
        mean over pixels of :meth:`typicality_map`. 0 for an image exactly like the
        average normal one; higher means further from what the normal images look like
        to the model, per pixel, in either direction (too likely counts as much as too
        unlikely).

        Raises:
            ValueError: The model has no normal reference.
        """
        return self.typicality_map(pixel_bpd).mean(dim=(1, 2))

    def knn(self, pixel_bpd: Tensor) -> Tensor:
        """The ``knn`` score ``(B,)`` of per-pixel bits/dim maps ``(B, H, W)``: the mean
        Euclidean distance to the :data:`KNN_NEIGHBOURS` nearest normal reference maps,
        all pooled to :func:`knn_grid` and each grid position measured in units of its
        spread over the reference maps (plus ``REFERENCE_STD_FLOOR``). 0 for an image
        whose map equals several normal ones; higher means no normal image looks like it
        to the model.

        Where :meth:`typicality` compares with the *average* normal map, this compares
        with the nearest actual ones, so normal images that come in several looks are
        each measured against their own kind rather than against a blend of all.

        Raises:
            ValueError: The model has no normal reference.
        """
        if self.reference_maps is None:
            raise ValueError(f"this model has no reference maps, so it cannot score knn; "
                             f"{_RETRAIN}")
        pooled = pool_to_grid(pixel_bpd, knn_grid(self.config)).flatten(1)
        return self._knn_pooled(pooled).to(pixel_bpd.dtype)

    def _knn_pooled(self, pooled: Tensor, exclude: Tensor | None = None) -> Tensor:
        """``knn`` ``(B,)`` float64 of pooled maps ``(B, G·G)``; ``exclude`` ``(B,)`` names
        a reference map each one must not count (itself, for leave-one-out)."""
        centre, spread, keys = self._standardised_reference()
        return _mean_nearest((pooled.double() - centre) / spread, keys, exclude)

    def pixel_knn(self, x: Tensor) -> Tensor:
        """The ``pixel_knn`` score ``(B,)`` of flow inputs ``x`` ``(B, C, H, W)``
        (:func:`preprocess`): the mean Euclidean distance to the :data:`KNN_NEIGHBOURS`
        nearest normal reference images, all pooled to :func:`knn_grid`
        (:func:`pool_images`), in the flow's input units (a pixel's range is 1). 0 for an
        image that looks like several normal ones at that resolution.

        Where :meth:`knn` compares where the model finds an image unlikely, this compares
        what the image looks like. Each sees anomalies the other misses, so
        :meth:`ensemble` adds them (B4, ``benchmarks/NOTES.md``).

        Raises:
            ValueError: The model's reference has no images.
        """
        if self.reference_images is None:
            raise ValueError("this model's normal reference has no images, so it cannot "
                             f"score pixel_knn; {_RETRAIN}")
        pooled = pool_images(x, knn_grid(self.config)).flatten(1)
        return self._pixel_knn_pooled(pooled.double()).to(x.dtype)

    def _pixel_knn_pooled(self, pooled: Tensor, exclude: Tensor | None = None) -> Tensor:
        """``pixel_knn`` ``(B,)`` float64 of pooled images ``(B, C·G·G)`` float64."""
        keys = self._cached("reference_images", lambda images: images.flatten(1).double())
        return _mean_nearest(pooled, keys, exclude)

    def _cached(self, name: str, make: Callable[[Tensor], Any]) -> Any:
        """``make(tensor)`` for the reference tensor ``name``, computed once per tensor.

        Known by the tensor object and its version, not its address: a refit's new maps
        often land where the freed old ones were. The cache holds the tensor, so its
        identity stays unique."""
        tensor = getattr(self, name)
        assert tensor is not None
        cache = self._reference_cache.get(name)
        if cache is None or cache[0] is not tensor or cache[1] != tensor._version:
            cache = self._reference_cache[name] = (tensor, tensor._version, make(tensor))
        return cache[2]

    def _standardised_reference(self) -> tuple[Tensor, Tensor, Tensor]:
        """(centre ``(G·G,)``, spread ``(G·G,)``, standardised maps ``(N, G·G)``), float64,
        of the reference maps; computed once per set of maps (on its device)."""
        def standardise(maps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            refs = maps.flatten(1).double()
            centre = refs.mean(dim=0)
            spread = refs.std(dim=0, correction=0) + REFERENCE_STD_FLOOR
            return centre, spread, (refs - centre) / spread

        return self._cached("reference_maps", standardise)

    def ensemble(self, knn: Tensor, coarse_complexity: Tensor,
                 pixel_knn: Tensor | None = None) -> Tensor:
        """The ``ensemble`` score ``(B,)``: ``knn``, ``coarse_complexity`` and ``pixel_knn``
        ``(B,)``, each in standard deviations from its mean over the normal reference
        images (``reference_scale``), summed. 0 for an image average on all three; each
        term counts as much as the others whatever its units. A model whose reference has
        no images (an older anomaly-flow's) sums the first two, and takes no
        ``pixel_knn``.

        Why: ``knn`` sees how unlike normal images the likelihood map is,
        ``coarse_complexity`` how likely the image's global structure is for its
        simplicity (:func:`anomaly_flow.complexity.coarse_complexity`), and ``pixel_knn``
        how unlike normal images the image itself looks; their errors differ, so the sum
        separates better than any of them (B4, ``benchmarks/NOTES.md``).

        Raises:
            ValueError: The model has no normal reference, or ``pixel_knn`` is given to a
                model without reference images or missing for one with them.
        """
        if self.reference_scale is None:
            raise ValueError(f"this model has no reference maps, so it cannot score "
                             f"ensemble; {_RETRAIN}")
        return ensemble_score(knn, coarse_complexity, self.reference_scale, pixel_knn)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: Any,
                              strict: bool, missing_keys: list[str],
                              unexpected_keys: list[str], error_msgs: list[str]) -> None:
        """The normal reference is optional in a state dict: a state with all of it gives
        the model one, a state with only its mean and std (an older anomaly-flow's) gives
        a reference for ``typicality`` only, a state without it leaves the model without
        one. Runs for every way of loading (``load_state_dict`` on the model or on a
        wrapper such as DistributedDataParallel)."""
        present = tuple(prefix + key in state_dict for key in REFERENCE_KEYS)
        if present not in _REFERENCE_LAYOUTS:
            error_msgs.append(f"the state has only part of the normal reference "
                              f"({', '.join(REFERENCE_KEYS)} go together; the first two "
                              "may come alone, or the first four)")
            return
        values = [state_dict[prefix + key] if there else None
                  for key, there in zip(REFERENCE_KEYS, present, strict=True)]
        mean, std, maps, scale, images = values
        size, grid = self.config.image_size, knn_grid(self.config)
        n, rows = (0 if maps is None else len(maps)), 2 if images is None else 3
        if mean is not None and std is not None and _reference_shape_problem(
                self.config, mean, std, maps, ("reference_scale", scale, (rows, 2)),
                ("reference_images", images, (n, self.config.in_channels, grid, grid))):
            shapes = [tuple(value.shape) for value in values if value is not None]
            error_msgs.append(f"the normal reference has shapes {shapes}; this model "
                              f"needs ({size}, {size}) twice, then (N, {grid}, {grid}), "
                              f"(3, 2) and (N, {self.config.in_channels}, {grid}, {grid}) "
                              f"(an older reference: (2, 2) and no images)")
            return
        self._reference_cache = {}
        for key, value in zip(REFERENCE_KEYS, values, strict=True):  # buffers to copy into
            setattr(self, key, None if value is None
                    else torch.empty(value.shape, device=self.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def set_coupling_autocast(self, dtype: torch.dtype | None) -> None:
        """Run the coupling networks (only) under autocast to ``dtype``; None turns it off."""
        for level in self.levels:
            for step in level.steps:
                step.coupling.net.autocast_dtype = dtype

    def check_input(self, x: Tensor) -> None:
        """Refuse what is not a batch of this model's flow inputs (a check of shape and
        dtype only: no values are looked at, so :meth:`forward` stays compilable).

        Raises:
            ValueError: Not ``(B, C, H, W)`` floats at the model's channels and size, on
                the model's device, of a dtype its weights can take (theirs or narrower;
                under autocast, any but float64 for weights narrower than that).
        """
        c, size = self.config.in_channels, self.config.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, size, size):
            raise ValueError(
                f"the model takes flow inputs of shape (B, {c}, {size}, {size}), not "
                f"{tuple(x.shape)}; convert the images to its mode and size "
                "(anomaly_flow.data.image_to_array) and pass them through preprocess()")
        if not x.is_floating_point():
            raise ValueError(
                f"the model takes flow inputs (floats in [-0.5, 0.5)), not {x.dtype} pixels; "
                f"pass preprocess(images, n_bits={self.config.n_bits}) instead")
        weight = self.levels[0].steps[0].actnorm.log_scale  # the first the inputs meet
        if x.device != weight.device:
            raise ValueError(
                f"the model is on {weight.device} but the flow inputs are on {x.device}; "
                f"move them with x.to(model.device), or the model with model.to('{x.device}')")
        # wider inputs meet the first convolution wider than its weight, which it refuses,
        # unless autocast casts both for it (it leaves float64 alone): a bfloat16 model
        # under autocast takes preprocess()'s float32
        wider = torch.promote_types(x.dtype, weight.dtype) != weight.dtype
        if wider and (x.dtype == torch.float64
                      or not torch.is_autocast_enabled(x.device.type)):
            raise ValueError(
                f"the model's weights are {weight.dtype} and take flow inputs of that dtype "
                f"(preprocess() returns float32), not {x.dtype}; convert the inputs with "
                f"x.to({weight.dtype}), or the model with model.to({x.dtype})")

    def forward(self, x: Tensor) -> FlowOutput:
        """Map flow inputs ``(B, C, H, W)`` to latents with per-position log-det and
        prior maps (see :class:`FlowOutput`)."""
        self.check_input(x)
        latents, logdet_maps, prior_maps = [], [], []
        for level in self.levels:
            x, latent, logdet_map, prior_map = level(x)
            latents.append(latent)
            logdet_maps.append(logdet_map)
            prior_maps.append(prior_map)
        return FlowOutput(latents, logdet_maps, prior_maps)

    def encode(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """Latents and total log-determinant ``(B,)`` of a batch of flow inputs."""
        out = self(x)
        return out.latents, sum(m.sum(dim=(1, 2)) for m in out.logdet_maps)

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)`` in nats, shape ``(B,)``, of flow inputs ``x`` ``(B, C, H, W)``."""
        return log_prob_from_output(self(x))

    def bpd(self, x: Tensor) -> Tensor:
        """Bits per dimension ``(B,)`` of the quantised images behind flow inputs ``x``
        (:func:`preprocess`'s output; other values are refused, a host sync)."""
        self.check_input(x)  # before the values are read: a tensor on another device
        _check_flow_range(x, "bpd")
        return bits_per_dim(self.log_prob(x), self.config)

    def breakdown(self, x: Tensor) -> LikelihoodBreakdown:
        """Exact per-level and per-pixel decomposition of ``-log p(x)``, of flow inputs
        ``x`` (:func:`preprocess`'s output; other values are refused, a host sync)."""
        self.check_input(x)
        _check_flow_range(x, "breakdown")
        return breakdown_from_output(self(x), self.config)

    def _latent_shapes(self) -> list[tuple[int, int, int]]:
        """``(C_l, H_l, W_l)`` of each level's latent in :class:`FlowOutput`, finest first."""
        shapes, channels, size = [], self.config.in_channels, self.config.image_size
        for level in self.levels:
            channels, size = channels * 4, size // 2
            latent = channels if level.last else channels - level.prior.kept
            shapes.append((latent, size, size))
            channels = level.out_channels
        return shapes

    @torch.no_grad()
    def inverse(self, latents: list[Tensor]) -> Tensor:
        """Reconstruct flow inputs ``(B, C, H, W)`` from all the latents :meth:`forward`
        returned (:attr:`FlowOutput.latents`, one per level, finest first).

        Raises:
            ValueError: Not one latent per level, each ``(B, C_l, H_l, W_l)`` of this
                model, with one batch size.
        """
        shapes = self._latent_shapes()
        given = [tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
                 for z in latents]
        if [shape[1:] if isinstance(shape, tuple) else shape for shape in given] != shapes \
                or len({shape[0] for shape in given}) != 1:
            expected = ", ".join(f"(B, {c}, {h}, {w})" for c, h, w in shapes)
            raise ValueError(
                f"inverse takes this model's {len(shapes)} latent(s), one per level, of "
                f"shapes {expected} with one B: the latents of its forward() (or encode()); "
                f"got {len(given)}: {', '.join(map(str, given)) or 'none'}")
        z = latents[-1]
        for level, latent in zip(reversed(self.levels), reversed(latents), strict=True):
            z = level.inverse(z, latent, temperature=1.0)
        return z

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 0.7) -> Tensor:
        """Draw ``n`` flow inputs ``(n, C, H, W)``; temperature scales the prior std.

        Raises:
            ValueError: ``n`` is not a whole number >= 0, or ``temperature`` not a finite
                number >= 0 (1 samples the model's own density, lower values images
                more typical of it, 0 its most likely latents).
            SamplingError: A 1x1 convolution's weight is singular, so the flow cannot be
                inverted, or the samples are not finite (checked here, a host sync).
        """
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"sample takes the number of images to draw, a whole number "
                             f">= 0; got {n!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
                or not 0 <= temperature < math.inf:
            raise ValueError(
                f"the temperature scales the prior's standard deviation and must be a "
                f"finite number >= 0 (1 samples the model's density, lower values more "
                f"typical images, 0 the most likely latents); got {temperature!r}")
        z = torch.empty(int(n), 0, device=self.device)
        for index in reversed(range(len(self.levels))):
            try:
                z = self.levels[index].inverse(z, None, temperature)
            except torch.linalg.LinAlgError:
                raise SamplingError(
                    f"the model cannot draw samples: a 1x1 convolution of level {index + 1} "
                    "has a singular weight, so the flow has no inverse there; such weights "
                    "come from a training that diverged (train again with a lower lr or a "
                    "longer warmup_steps)") from None
        bad = int((~torch.isfinite(z)).sum())
        if bad:
            couplings = (", its affine couplings by scales that can be near 0 for latents "
                         "unlike the training images'" if self.config.coupling == "affine"
                         else "")
            raise SamplingError(
                f"the model cannot draw samples: {bad} of the {z.numel()} values sampled at "
                f"temperature {temperature:g} are NaN or infinite, so the flow's inverse "
                f"overflows (its actnorms divide by their scales{couplings}); a briefly "
                "trained model often does this: a lower train.sample_temperature or more "
                "epochs usually mend it, and after a diverged training (validation bits/dim "
                "far above training's) train again with a lower lr or a longer warmup_steps")
        return z

    def digest(self) -> str:
        """SHA-256 (hex) of what the model's scores depend on: the config (see
        :data:`DIGESTED_CONFIG`) and each state-dict entry's name, shape and values, in
        name order, floating-point ones as float32, the precision :meth:`load` gives
        them. The same model gives the same digest wherever it is (CPU or GPU, as
        trained, converted with ``.double()`` or saved and loaded); a calibration records
        the digest of the model it was fitted to, so weights or a config put in their
        place later are caught when the model loads."""
        defaults = GlowConfig().to_dict()
        config = {key: value for key, value in self.config.to_dict().items()
                  if key in DIGESTED_CONFIG or value != defaults[key]}
        hasher = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            value = tensor.detach().cpu()
            if value.is_floating_point():
                value = value.float()
            value = value.contiguous()
            hasher.update(f"\n{name}|{value.dtype}|{list(value.shape)}\n".encode())
            hasher.update(value.reshape(-1).view(torch.uint8).numpy())
        return hasher.hexdigest()

    def save(self, folder: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(self.config.to_json())
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        metadata = ({TRAINING_SHAPES_KEY: json.dumps([list(s) for s in self.training_shapes])}
                    if self.training_shapes else None)
        save_tensors(state, folder / WEIGHTS_FILE, metadata)
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> Glow:
        """Rebuild a model from the config and weights :meth:`save` wrote; never unpickles.

        Raises:
            ModelFileError: A file is missing, unreadable, or does not fit the other.
            ValueError: The model cannot go on ``device`` (not a device torch knows, or
                ``cuda`` where CUDA is not available).
        """
        folder = Path(folder)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise ModelFileError(
                    f"{folder / name} is missing; a model folder holds {CONFIG_FILE} and "
                    f"{WEIGHTS_FILE} as written by Glow.save."
                )
        try:
            config = GlowConfig.from_json((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # not JSON, not UTF-8, or not a model's config
            raise ModelFileError(
                f"{folder / CONFIG_FILE} is not a model configuration anomaly-flow can read "
                f"({first_line(exc)}); copy or download the model again, or re-register it "
                "from its training run's artifacts") from None
        try:
            model = cls(config)
        except (RuntimeError, MemoryError) as exc:  # a size no memory holds (an edit)
            first = first_line(exc)
            raise ModelFileError(
                f"the model {folder / CONFIG_FILE} describes cannot be built here ({first}); "
                "check its image_size, levels and hidden_channels") from None
        try:
            with safetensors.safe_open(str(folder / WEIGHTS_FILE), "pt") as opened:
                weights = {key: opened.get_tensor(key) for key in opened.keys()}  # noqa: SIM118
                metadata = opened.metadata() or {}
        except (SafetensorError, OSError) as exc:
            raise ModelFileError(
                f"{folder / WEIGHTS_FILE} is damaged or incomplete ({exc}); "
                "copy or download the model again, or re-register it from its training "
                "run's artifacts") from None
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:
            raise ModelFileError(
                f"the weights in {folder} do not fit its {CONFIG_FILE} "
                f"({_load_errors_in_brief(exc)}); copy or download the model again (its "
                f"{CONFIG_FILE} and {WEIGHTS_FILE} must come from the same save), or "
                "re-register it from its training run's artifacts") from None
        model.training_shapes = _read_shapes(metadata.get(TRAINING_SHAPES_KEY))
        try:
            return model.to(device).eval()
        except torch.cuda.OutOfMemoryError as exc:  # the device is there, its memory is taken
            raise ModelFileError(
                f"the model in {folder} does not fit in the free memory of {device} "
                f"({first_line(exc)}); free it (other processes on that GPU), or load the "
                "model on 'cpu'") from None
        except (RuntimeError, AssertionError) as exc:  # torch asserts it has CUDA
            raise ValueError(
                f"cannot put the model on device {str(device)!r} ({first_line(exc)}); use "
                "'cpu', or 'cuda' (or 'cuda:N') on a machine with CUDA") from None


def _read_shapes(text: str | None) -> tuple[tuple[int, int, int], ...]:
    """:attr:`Glow.training_shapes` from the weights file's metadata; empty (unknown) when
    absent or not a list of ``[width, height, count]`` positive integers: the record only
    informs a note, so a damaged one is passed over rather than refusing the model."""
    try:
        shapes = tuple(tuple(entry) for entry in json.loads(text)) if text else ()
    except (ValueError, TypeError):
        return ()
    if all(len(entry) == 3 and all(type(v) is int and v > 0 for v in entry)
           for entry in shapes):
        return shapes  # type: ignore[return-value]
    return ()


def _load_errors_in_brief(error: RuntimeError) -> str:
    """``load_state_dict``'s error in a line: its key lists and size mismatches, which
    run to hundreds of names, as a count and the first of each; other lines as they are."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    parts, mismatches = [], []
    for line in lines:
        head, _, names = line.partition(": ")
        if head in ("Missing key(s) in state_dict", "Unexpected key(s) in state_dict"):
            keys = re.findall(r'"([^"]+)"', names)
            first = f", e.g. {keys[0]}" if keys else ""
            kind = "missing" if head.startswith("Missing") else "unexpected"
            parts.append(f"{len(keys)} {kind} tensor(s){first}")
        elif line.startswith("size mismatch for "):
            mismatches.append(line.removeprefix("size mismatch for ").rstrip("."))
        else:
            parts.append(line.rstrip("."))
    if mismatches:
        parts.append(f"{len(mismatches)} tensor(s) of another shape, e.g. {mismatches[0]}")
    return "; ".join(parts) or first_line(error)


def log_prob_from_output(out: FlowOutput) -> Tensor:
    """Total ``log p(x)`` ``(B,)`` in nats from a :class:`FlowOutput`."""
    maps = out.logdet_maps + out.prior_maps
    return torch.stack([m.sum(dim=(1, 2)) for m in maps], dim=1).sum(dim=1)


def bits_per_dim(log_prob: Tensor, config: GlowConfig) -> Tensor:
    """``(-log p + D log n_bins) / (D ln 2)`` for log-densities in nats."""
    d = config.n_dims
    return (-log_prob + d * math.log(config.n_bins)) / (d * math.log(2.0))


def breakdown_from_output(out: FlowOutput, config: GlowConfig,
                          pixel_maps: bool = True) -> LikelihoodBreakdown:
    """See :meth:`Glow.breakdown`; ``pixel_maps=False`` skips the per-pixel map."""
    d, ln2, size = config.n_dims, math.log(2.0), config.image_size
    level_maps = [ld + pr for ld, pr in zip(out.logdet_maps, out.prior_maps, strict=True)]
    level_log_prob = torch.stack([m.sum(dim=(1, 2)) for m in level_maps], dim=1)
    log_prob = level_log_prob.sum(dim=1)
    pixel_bpd = None
    if pixel_maps:  # spread each position's nats evenly over its pixels: sums are kept
        pixel_log_prob = sum(
            F.interpolate(m[:, None], size=(size, size), mode="nearest")[:, 0]
            / (size // m.shape[-1]) ** 2
            for m in level_maps
        )
        pixel_bpd = -pixel_log_prob / (config.in_channels * ln2) + config.n_bits
    return LikelihoodBreakdown(
        log_prob=log_prob,
        bpd=bits_per_dim(log_prob, config),
        level_bits=-level_log_prob / (d * ln2),
        pixel_bpd=pixel_bpd,
    )
