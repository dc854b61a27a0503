"""The compressed length of an image, and the scores that subtract it from the likelihood.

Likelihood models give simple images (blank, low-texture) high likelihood; subtracting
the image's losslessly compressed length corrects that (Serrà et al. 2020, "Input
complexity and out-of-distribution detection with likelihood-based generative models").
The compressor is PNG at its strongest deterministic level, measured on the quantised
image the model sees, in bits per dimension of the full image (the model's units):

- :func:`png_bits_per_dim` / :func:`batch_png_bits_per_dim`: ``L_png(x) / D``, what the
  ``complexity`` score (``bpd − L_png(x) / D``) subtracts;
- :func:`coarse_png_bits_per_dim` / :func:`batch_coarse_png_bits_per_dim`: the same of
  the image box-downsampled to the coarsest level's resolution, and
  :func:`coarse_complexity`, the score built on it.

The batch functions are what scoring uses: the PNG filters of a whole batch are a few
array operations and only the deflate runs per image.

The deflate is Python's ``zlib`` module, so a length is reproducible wherever the zlib
library is the same (``zlib.ZLIB_RUNTIME_VERSION``); another implementation (zlib-ng,
say) may compress a few bytes differently, which moves these scores slightly. Calibrate
and score with the same one.

Example:
    >>> image = np.zeros((1, 16, 16), dtype=np.uint8)
    >>> round(png_bits_per_dim(image, n_bits=8), 4)  # a blank image compresses to little
    2.1875
"""

from __future__ import annotations

import zlib

import numpy as np
from PIL import ImageFile


def png_bits_per_dim(image: np.ndarray, n_bits: int, downsample: int = 1) -> float:
    """Length in bits/dim of the quantised image ``(C, H, W)`` uint8 compressed as PNG.

    The quantised values ``k = pixel >> (8 - n_bits)`` are what is compressed, at the
    strongest (deterministic) PNG compression level. With ``downsample`` f > 1, ``k`` is
    first box-downsampled by f in each spatial direction (the mean of each f×f block,
    rounded half up); the length is still divided by the full image's ``C·H·W``, so it is
    in the units of the model's bits/dim. One image of :func:`batch_png_bits_per_dim`.

    Raises:
        ValueError: ``downsample`` is not a positive divisor of ``H`` and ``W``.
    """
    return float(batch_png_bits_per_dim(image[None], n_bits, downsample)[0])


def batch_png_bits_per_dim(images: np.ndarray, n_bits: int, downsample: int = 1
                           ) -> np.ndarray:
    """:func:`png_bits_per_dim` of each image of uint8 ``(N, C, H, W)``: ``(N,)`` float64.

    The length is that of the file Pillow writes with ``save(format="PNG",
    compress_level=9)`` (8-bit grey or RGB): signature, IHDR, the IDAT chunks, IEND
    around a zlib stream (level 9, 32 KiB window, ``memLevel`` 9, ``Z_FILTERED``) of
    the rows, each behind the filter Pillow picks for it (of None, Up, Sub, Paeth, in
    that order, the first with the least sum of the filtered bytes read as signed), the
    stream cut into IDAT chunks of Pillow's block size. Built here, the filters of a batch
    are a few array operations and only the deflate runs per image; the tests check the
    lengths against Pillow's own files.

    Raises:
        ValueError: ``downsample`` is not a positive divisor of ``H`` and ``W``.
    """
    k = images.astype(np.uint8, copy=False)
    if not len(k):
        return np.empty(0, dtype=np.float64)
    if n_bits < 8:
        k = k >> (8 - n_bits)  # stays uint8
    n_dims = int(np.prod(k.shape[1:]))
    if downsample != 1:
        k = _box_downsample(k, downsample)
    width = k.shape[-1]
    # Pillow's encoder fills blocks of max(MAXBLOCK, 4·width) bytes, each one IDAT chunk
    block = max(ImageFile.MAXBLOCK, 4 * width)
    per_slice = max(1, _FILTER_SLICE_BYTES // max(1, k[0].size))  # bounded scratch memory
    lengths = np.empty(len(k), dtype=np.float64)
    for start in range(0, len(k), per_slice):
        rows = _png_filtered_rows(k[start:start + per_slice])
        for i, image_rows in enumerate(rows, start):
            deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_FILTERED)
            stream = len(deflate.compress(image_rows.tobytes())) + len(deflate.flush())
            lengths[i] = PNG_FIXED_BYTES + stream + PNG_CHUNK_BYTES * -(-stream // block)
    return 8.0 * lengths / n_dims


PNG_FIXED_BYTES = 8 + 25 + 12
"""Bytes of every PNG file here besides its IDAT chunks: signature, IHDR, IEND."""

PNG_CHUNK_BYTES = 12
"""Bytes of a chunk besides its data: length, type, CRC."""

_FILTER_SLICE_BYTES = 1 << 20
"""Bytes of image filtered at once: the filters' scratch arrays are about 20 times this."""

_PNG_FILTER_TYPES = np.array([0, 2, 1, 4], dtype=np.uint8)
"""PNG filter types (None, Up, Sub, Paeth) in the order Pillow tries them."""


def _png_filtered_rows(k: np.ndarray) -> np.ndarray:
    """uint8 ``(N, C, H, W)`` → ``(N, H, 1 + W·C)`` uint8: each scanline of the
    interleaved image behind its filter-type byte, filtered as Pillow filters it.

    Every step is a whole-array operation (no ``np.where``, ``take_along_axis`` or table
    look-up: each of those costs more than all the rest at these sizes); uint8
    arithmetic wraps modulo 256, as PNG's filters do.
    """
    n, channels, height, width = k.shape
    x = np.ascontiguousarray(k.transpose(0, 2, 3, 1)).reshape(n, height, width * channels)
    up = np.zeros_like(x)
    up[:, 1:] = x[:, :-1]
    left = np.zeros_like(x)  # the same channel of the pixel to the left
    left[:, :, channels:] = x[:, :, :-channels]
    up_left = np.zeros_like(x)
    up_left[:, 1:, channels:] = x[:, :-1, :-channels]
    a, b, c = (v.astype(np.int16) for v in (left, up, up_left))
    pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
    # Paeth predictor: left if pa is least, else up if pb <= pc, else up-left
    paeth = up_left + (pb <= pc).view(np.uint8) * (up - up_left)
    paeth += ((pa <= pb) & (pa <= pc)).view(np.uint8) * (left - paeth)
    candidates = np.stack([x, x - up, x - left, x - paeth])  # (4, N, H, W·C)
    magnitude = candidates.astype(np.int16)
    np.minimum(magnitude, 256 - magnitude, out=magnitude)  # |byte| read as signed
    # row sums by a matrix product (a tenth of the time of a sum over the last axis),
    # exact in float32 while a row's sum (at most 128 per byte) stays below 2**24
    exact = np.float32 if 128 * width * channels < 2**24 else np.float64
    cost = magnitude.astype(exact) @ np.ones(width * channels, dtype=exact)
    best = cost.argmin(axis=0)  # (N, H); ties go to the earlier filter, as Pillow's '<'
    rows = candidates.reshape(4 * n * height, -1)
    chosen = rows[best.reshape(-1) * (n * height) + np.arange(n * height)]
    return np.concatenate([_PNG_FILTER_TYPES[best].reshape(-1, 1), chosen],
                          axis=-1).reshape(n, height, -1)


def _box_downsample(k: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each ``factor × factor`` block of uint8 ``(N, C, H, W)``, rounded half up."""
    n, channels, height, width = k.shape
    if factor < 1 or height % factor or width % factor:
        raise ValueError(f"cannot box-downsample a {height}x{width} image by {factor}: the "
                         "factor must be a positive divisor of both sides")
    blocks = k.reshape(n, channels, height // factor, factor, width // factor, factor)
    sums = blocks.sum(axis=(3, 5), dtype=np.int64)
    area = factor * factor
    return ((2 * sums + area) // (2 * area)).astype(np.uint8)  # floor(mean + 1/2), exactly


def coarse_png_bits_per_dim(image: np.ndarray, n_bits: int, levels: int) -> float:
    """``L_png(x↓) / D`` of uint8 ``(C, H, W)`` for a model with ``levels`` levels: what
    :func:`coarse_complexity` subtracts (``x↓`` downsampled by ``2**(levels - 1)``)."""
    return png_bits_per_dim(image, n_bits, downsample=2 ** (levels - 1))


def batch_coarse_png_bits_per_dim(images: np.ndarray, n_bits: int, levels: int
                                  ) -> np.ndarray:
    """:func:`coarse_png_bits_per_dim` of each image of uint8 ``(N, C, H, W)``."""
    return batch_png_bits_per_dim(images, n_bits, downsample=2 ** (levels - 1))


def coarse_complexity(level_bits: np.ndarray, coarse_png_bpd: np.ndarray) -> np.ndarray:
    """The ``coarse_complexity`` score: ``level_L − L_png(x↓) / D``.

    ``level_L`` is the coarsest scale's share of ``−log p(x)`` in bits/dim of the full
    image. ``x↓`` is the quantised image box-downsampled by ``f = 2**(L−1)`` in each
    spatial direction (the resolution level L works at; each f×f block's mean, rounded
    half up), ``L_png(x↓)`` its PNG-compressed length in bits, and ``D = C·H·W`` the full
    image's dimensions, so both terms are in the same units. For ``L = 1`` it is
    ``level_1 − L_png(x) / D``.

    Why: likelihood models give simple images high likelihood, and subtracting the
    image's compressed length corrects that (Serrà et al. 2020, "Input complexity and
    out-of-distribution detection with likelihood-based generative models"). In a
    multi-scale flow the finest scales carry local pixel statistics, which dominate
    ``bpd`` for any image, while the coarsest carries the global structure (Schirrmeister
    et al. 2020, "Understanding anomaly detection with deep invertible networks through
    hierarchies of distributions and features"). This score applies the complexity
    correction at the coarsest scale only, where it matters.

    Args:
        level_bits: ``(N, L)`` per-level bits/dim, finest first.
        coarse_png_bpd: ``(N,)`` :func:`coarse_png_bits_per_dim` of the same images.

    Returns:
        ``(N,)`` float64; higher means more anomalous.
    """
    level_bits = np.asarray(level_bits, dtype=np.float64)
    return level_bits[:, -1] - np.asarray(coarse_png_bpd, dtype=np.float64)
