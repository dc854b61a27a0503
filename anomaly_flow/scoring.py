"""Scoring images by exact likelihood.

Scores, higher always more anomalous (PRODUCT.md "Scores"):

- ``bpd``: bits per dimension of the quantised image, deterministic (bin centres).
- ``complexity``: ``bpd`` minus the length of the losslessly PNG-compressed quantised
  image in bits per dimension (Serrà et al. 2020).
- ``level_1`` ... ``level_L``: each scale's exact share of ``-log p(x)`` in bits/dim,
  finest first; ``bpd == n_bits + sum(level_l)``.

Decoding and PNG compression happen in DataLoader workers; the model sees whole
batches, with no per-image Python work on the device side.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from anomaly_flow.data import ImageMode, display_path, try_load_image
from anomaly_flow.glow import Glow, breakdown_from_output, preprocess

logger = logging.getLogger(__name__)

BASE_COLUMNS = ("path", "bpd", "complexity")
DECISION_COLUMNS = ("score", "p_value", "is_anomaly", "error")


def level_columns(levels: int) -> list[str]:
    """Names of the per-level columns, finest scale first."""
    return [f"level_{i + 1}" for i in range(levels)]


def score_names(levels: int) -> list[str]:
    """Every score a calibration can be built on."""
    return ["bpd", "complexity", *level_columns(levels)]


def png_bits_per_dim(image: np.ndarray, n_bits: int) -> float:
    """Length in bits/dim of the quantised image ``(C, H, W)`` uint8 compressed as PNG.

    The quantised values ``k = pixel >> (8 - n_bits)`` are what is compressed, at the
    strongest (deterministic) PNG compression level.
    """
    k = (image >> (8 - n_bits)).astype(np.uint8)
    pil = Image.fromarray(k[0] if k.shape[0] == 1 else np.moveaxis(k, 0, -1))
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", optimize=False, compress_level=9)
    return 8.0 * buffer.tell() / k.size


class ScoreItem(NamedTuple):
    image: torch.Tensor  # uint8 (C, H, W); zeros when ok is False
    ok: bool
    error: str
    index: int
    png_bpd: float  # NaN when ok is False


class ScoringDataset(Dataset[ScoreItem]):
    """Images from file paths or encoded bytes, decoded (and PNG-measured) in workers.

    Never raises for a bad input: the item carries ``ok=False`` and a one-line reason.
    """

    def __init__(self, sources: Sequence[str | Path | bytes], mode: ImageMode, size: int,
                 n_bits: int) -> None:
        self.sources = list(sources)
        self.mode, self.size, self.n_bits = mode, size, n_bits
        self.channels = 1 if mode == "L" else 3

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> ScoreItem:
        source = self.sources[index]
        if source is None or (isinstance(source, float) and np.isnan(source)):
            array, error = None, "no image given (empty value)"
        else:
            array, error = try_load_image(source, self.mode, self.size)
        if array is None:
            blank = torch.zeros(self.channels, self.size, self.size, dtype=torch.uint8)
            return ScoreItem(blank, False, error or "unknown error", index, float("nan"))
        return ScoreItem(torch.from_numpy(array), True, "", index,
                         png_bits_per_dim(array, self.n_bits))


@dataclass(frozen=True)
class BatchScores:
    """Scores of a batch of decoded images (CPU tensors).

    Attributes:
        bpd: ``(B,)`` float64 bits/dim.
        level_bits: ``(B, L)`` float64 per-level share in bits/dim.
        pixel_bpd: ``(B, H, W)`` float32 per-pixel bits/dim, or None when not asked for.
    """

    bpd: torch.Tensor
    level_bits: torch.Tensor
    pixel_bpd: torch.Tensor | None


@torch.no_grad()
def score_images(model: Glow, images: torch.Tensor, pixel_maps: bool = False) -> BatchScores:
    """Score uint8 images ``(B, C, H, W)`` (already on the model's device)."""
    x = preprocess(images, model.config.n_bits)
    parts = breakdown_from_output(model(x), model.config)
    return BatchScores(
        bpd=parts.bpd.double().cpu(),
        level_bits=parts.level_bits.double().cpu(),
        pixel_bpd=parts.pixel_bpd.float().cpu() if pixel_maps else None,
    )


HeatmapSink = Callable[[Sequence[int], torch.Tensor, torch.Tensor], None]
"""Receives (dataset indices, uint8 images (B, C, H, W), per-pixel bits/dim (B, H, W))."""


def score_dataset(
    model: Glow,
    dataset: ScoringDataset,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    heatmaps: HeatmapSink | None = None,
    progress: bool | None = None,
    on_batch: Callable[[pd.DataFrame], Any] | None = None,
) -> pd.DataFrame:
    """Score every item of ``dataset``; one row per item, in dataset order.

    Columns: ``bpd``, ``complexity``, ``level_1..level_L`` and ``error`` (empty for
    scored images; the score columns are NaN for failed ones). ``on_batch`` receives
    each batch's rows as they are done (for incremental output).
    """
    device = model.device
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda",
                        persistent_workers=False)
    levels = level_columns(model.config.levels)
    frames = []
    with tqdm(total=len(dataset), disable=(not progress) if progress is not None else None,
              desc="score", unit="img", dynamic_ncols=True) as bar:
        for images, ok, errors, index, png_bpd in loader:
            n = len(ok)
            bpd = np.full(n, np.nan)
            level_bits = np.full((n, len(levels)), np.nan)
            if bool(ok.any()):
                good = images[ok].to(device, non_blocking=True)
                scores = score_images(model, good, pixel_maps=heatmaps is not None)
                mask = ok.numpy()
                bpd[mask] = scores.bpd.numpy()
                level_bits[mask] = scores.level_bits.numpy()
                if heatmaps is not None:
                    heatmaps(index[ok].tolist(), images[ok], scores.pixel_bpd)
            frame = pd.DataFrame(level_bits, columns=levels)
            frame.insert(0, "complexity", bpd - png_bpd.double().numpy())
            frame.insert(0, "bpd", bpd)
            frame["error"] = list(errors)
            frame.index = index.numpy()
            frames.append(frame)
            if on_batch is not None:
                on_batch(frame)
            bar.update(n)
    if not frames:
        return pd.DataFrame(columns=["bpd", "complexity", *levels, "error"])
    return pd.concat(frames)


def apply_calibration(scores: pd.DataFrame, calibration: Any | None) -> pd.DataFrame:
    """Add ``score``, ``p_value`` and ``is_anomaly`` from a calibration.

    Uncalibrated: ``score`` is ``bpd``, ``p_value`` NaN and ``is_anomaly`` None.
    ``calibration`` is an :class:`anomaly_flow.calibration.Calibration`.
    """
    out = scores.copy()
    if calibration is None:
        out["score"] = out["bpd"]
        out["p_value"] = np.nan
        out["is_anomaly"] = pd.array([None] * len(out), dtype="boolean")
        return out
    name = calibration.score_name
    if name not in out.columns:
        raise ValueError(f"the calibration uses score {name!r}, which this model does not "
                         f"produce (columns: {list(out.columns)}); recalibrate the model.")
    values = out[name].to_numpy(dtype=float)
    finite = np.isfinite(values)
    p = np.full(len(out), np.nan)
    verdict = pd.array([None] * len(out), dtype="boolean")
    if finite.any():
        p[finite] = calibration.p_values(values[finite])
        verdict[finite] = calibration.decide(values[finite])
    out["score"] = values
    out["p_value"] = p
    out["is_anomaly"] = verdict
    return out


def paths_frame(paths: Sequence[Path]) -> pd.Series:
    """The ``path`` column for a list of files: printable even for non-UTF-8 names."""
    return pd.Series([display_path(p) for p in paths], dtype="string")
