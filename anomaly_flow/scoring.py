"""Scoring images by exact likelihood with a model: batches of images, whole datasets, and
the decisions a calibration makes of their scores.

Scores, higher always more anomalous (the README's "Scores" defines each):

- ``bpd``: bits per dimension of the quantised image, deterministic (bin centres).
- ``complexity``: ``bpd`` minus the length of the losslessly PNG-compressed quantised
  image in bits per dimension (Serrà et al. 2020).
- ``coarse_complexity``: ``level_L`` minus the PNG length of the image at the coarsest
  scale, in bits per dimension of the full image
  (:func:`anomaly_flow.complexity.coarse_complexity`).
- ``typicality`` (models with a normal reference, i.e. trained with a validation set):
  how far the image's per-pixel bits/dim map is from the normal images' map, pixel by
  pixel, in units of its normal spread (:meth:`~anomaly_flow.glow.Glow.typicality`).
- ``knn`` (the same models): the mean distance from the image's bits/dim map to the five
  nearest maps of held-out normal images, compared on a coarse grid, in units of the
  normal spread (:meth:`~anomaly_flow.glow.Glow.knn`).
- ``pixel_knn`` (the same models): the mean distance from the image itself to the five
  nearest held-out normal images, both averaged to the same coarse grid
  (:meth:`~anomaly_flow.glow.Glow.pixel_knn`).
- ``ensemble`` (the same models): ``knn`` plus ``coarse_complexity`` plus ``pixel_knn``,
  each in standard deviations from its mean over the held-out normal images
  (:meth:`~anomaly_flow.glow.Glow.ensemble`); the default score. (A model trained before
  ``pixel_knn`` has neither it nor its term in ``ensemble``.)
- ``level_1`` ... ``level_L``: each scale's exact share of ``-log p(x)`` in bits/dim,
  finest first; ``bpd == n_bits + sum(level_l)``.

Decoding and both PNG compressions happen in DataLoader workers; the model sees whole
batches (failed files ride along as blank images and are masked out afterwards, so
shapes never depend on the data), with no per-image Python work on the device side.
Results come back to the host one batch late, so the device is never idle while the
host turns a batch into table rows.

A batch that does not fit in memory raises :class:`BatchOutOfMemory`, whose message names
the batch size to lower it to. Scoring a whole folder into a table, resumably, is
:mod:`anomaly_flow.folder_scoring`.

Which call gives what: :func:`score_images` scores uint8 tensors the model's size and
gives the model's own scores (``bpd``, the level bits, ``typicality``, ``knn``,
``pixel_knn``), not those that need each image's PNG length (``complexity``,
``coarse_complexity``, ``ensemble``); :func:`score_dataset` over a
:class:`ScoringDataset` of paths or encoded bytes gives every score, and
:func:`apply_calibration` then adds ``score``, ``p_value`` and ``is_anomaly``, as
``score`` and the served model do.

Example:
    >>> model = Glow.load("my-model")  # doctest: +SKIP
    >>> images = torch.from_numpy(uint8_array).to(model.device)  # (B, C, H, W)  # doctest: +SKIP
    >>> scores = score_images(model, images)  # doctest: +SKIP
    >>> scores.bpd.shape  # doctest: +SKIP
    torch.Size([8])
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from anomaly_flow.calibration import min_calibration_size, rounded_up
from anomaly_flow.complexity import (
    batch_coarse_png_bits_per_dim,
    batch_png_bits_per_dim,
    coarse_complexity,
)
from anomaly_flow.config import GlowConfig
from anomaly_flow.data import InvalidSource, display_path, load_item, warnings_caught
from anomaly_flow.glow import Glow, breakdown_from_output, ensemble_score, preprocess
from anomaly_flow.score_kinds import (  # noqa: F401 (SCORE_CHOICES, is_score_name: re-exported)
    LIKELIHOOD_SCORES,
    REFERENCE_SCORES,
    SCORE_CHOICES,
    is_score_name,
)
from anomaly_flow.score_table import DECISION_COLUMNS, ScoringError
from anomaly_flow.stopping import (
    loader_worker_options,
    raise_if_stopped,
    worker_batches,
    worker_count,
)

logger = logging.getLogger(__name__)

NON_FINITE_ERROR = "the model gave a non-finite bits/dim for this image (numerical overflow)"


class BatchOutOfMemory(ScoringError):
    """A batch did not fit in memory (:func:`score_dataset`); the message names the batch
    size and what to lower it to (:meth:`advice`).

    Attributes:
        ran_out: ``out of memory on <device>`` and the allocation that failed
            (:func:`out_of_memory`).
    """

    def __init__(self, ran_out: str, batch_size: int, n_items: int, device: torch.device,
                 compiled: bool) -> None:
        self.ran_out, self.batch_size, self.n_items = ran_out, batch_size, n_items
        self.device, self.compiled = device, compiled
        super().__init__(self.advice())

    def advice(self, kept: str = "", option: str = "--batch-size") -> str:
        """The message; ``kept`` says which rows an output holds, for resuming, or is
        empty; ``option`` is where the batch size was set."""
        floor = _min_batch(self.device)  # shorter batches are padded to it (see _launch)
        asked = self.batch_size
        # a compiled flow pads every batch to the batch size (see _Forward)
        ran = asked if self.compiled else max(min(asked, self.n_items), floor)
        size = f"batch_size = {asked} ({option})"
        if ran != asked:
            size += f", {ran} images a forward pass here"
        smallest = 1 if self.compiled else floor
        advice = (f"lower it, e.g. to {max(ran // 4, smallest)}" if ran > smallest else
                  f"even the smallest batch ({ran} image(s), padded so that every batch size "
                  "gives the same sums) does not fit: free memory, or score on a device "
                  "with more")
        rest = f"; {kept}: run again with resume (--resume) to score the rest" if kept else ""
        return f"scoring ran {self.ran_out} with {size}; {advice}{rest}"


def level_columns(levels: int) -> list[str]:
    """Names of the per-level columns, finest scale first."""
    return [f"level_{i + 1}" for i in range(levels)]


def score_names(model: Glow) -> list[str]:
    """Every score ``model`` gives, which a calibration can be built on, in column (and
    tie-break) order: ``typicality`` only when the model has a normal reference, ``knn``
    and ``ensemble`` only when that reference has maps, ``pixel_knn`` only when it has
    images too (every reference this version fits has all of them)."""
    reference = ([name for name in REFERENCE_SCORES
                  if name != "pixel_knn" or model.has_image_reference]
                 if model.has_knn_reference
                 else ["typicality"] if model.has_reference else [])
    return [*LIKELIHOOD_SCORES, *reference, *level_columns(model.config.levels)]


def default_score(model: Glow) -> str:
    """The score a calibration uses when none is named: ``ensemble`` for a model with a
    normal reference (``typicality`` for an older one without maps), else ``bpd``.

    Chosen on evidence: on the one-class Fashion-MNIST benchmark (B4,
    ``benchmarks/NOTES.md``, CPU-sized models) ``ensemble`` has the best mean AUROC of the
    scores, ahead of ``pixel_knn``, ``knn``, ``typicality`` and far ahead of ``bpd`` (94.8
    mean over the ten classes, against 93.4, 92.4, 90.6 and 69.7).
    """
    if model.has_knn_reference:
        return "ensemble"
    return "typicality" if model.has_reference else "bpd"


def output_columns(model: Glow) -> list[str]:
    """The columns of a :func:`~anomaly_flow.folder_scoring.score_folder` table, in order."""
    return ["path", *score_names(model), *DECISION_COLUMNS]


# ------------------------------------------------------------------------------- batches


Precision = Literal["float32", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ScoringError(f"unknown precision {precision!r}; choose one of "
                           f"{', '.join(PRECISIONS)}")


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
            or batch_size < 1:
        raise ScoringError(f"batch_size is the number of images per forward pass, a whole "
                           f"number >= 1; got {batch_size!r}")


def check_initialized(model: Glow) -> None:
    if not model.initialized:
        raise ScoringError(
            "the model's ActNorm layers were never initialised, so it has learned nothing "
            "and its scores say nothing about the images; score a trained model "
            "(anomaly_flow.tracking.load_model, Glow.load), or initialise and train this "
            "one first (Glow.initialize on a batch of normal images, then training)")


_SAID_ONCE: dict[str, bool] = {}
"""Notes a process gives once, however often the code that gives them runs."""

_NUMERICS = threading.RLock()
"""Held while :func:`numerics` has its settings in place: they are a model's and the
process's (cuDNN and TF32 flags), so a second thread scoring at the same time would
restore them under the first, whose later batches would then score in another precision."""


def _new_numerics_lock() -> None:
    global _NUMERICS
    _NUMERICS = threading.RLock()  # a fork may copy it held by a thread the child lacks


os.register_at_fork(after_in_child=_new_numerics_lock)


@contextlib.contextmanager
def numerics(model: Glow, precision: Precision = "float32") -> Iterator[None]:
    """The arithmetic scoring runs in, set for the duration and then restored.

    - ``float32`` (default): exact float32 everywhere. On CUDA, TF32 is switched off and
      cuDNN uses deterministic kernels without run-time benchmarking, so the same file
      gets the same numbers in every run.
    - ``tf32``: on CUDA, convolutions and matrix products in TF32 on tensor cores
      (about 1e-3 relative error per product; still deterministic). Same as
      ``float32`` on CPU.
    - ``bf16``: the coupling networks under bf16 autocast (log-determinants and priors
      stay float32), the fastest on a GPU; bits/dim move by about 1e-4 to 1e-3.

    The settings belong to the model and the process, so threads take turns: scoring in
    one waits while another thread of the process is inside ``numerics``.

    Raises:
        ScoringError: An unknown ``precision``.
    """
    check_precision(precision)
    with _NUMERICS:
        yield from _numerics_held(model, precision)


def _numerics_held(model: Glow, precision: Precision) -> Iterator[None]:
    """:func:`numerics` with its lock held."""
    cuda = model.device.type == "cuda"
    if precision == "tf32" and not cuda and not _SAID_ONCE.get("tf32"):
        _SAID_ONCE["tf32"] = True  # entered for every batch of a library caller's loop
        logger.warning("precision tf32 changes nothing on %s (TF32 is CUDA's): the scores "
                       "are float32's", model.device.type.upper())
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    with warnings_caught():
        warnings.simplefilter("ignore")  # newer torch prefers fp32_precision; both work
        saved = (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32)
        if cuda:
            cudnn.benchmark, cudnn.deterministic = False, True
            cudnn.allow_tf32 = matmul.allow_tf32 = precision == "tf32"
    autocast = model.levels[0].steps[0].coupling.net.autocast_dtype  # as training left it
    model.set_coupling_autocast(torch.bfloat16 if precision == "bf16" else None)
    try:
        yield
    finally:
        model.set_coupling_autocast(autocast)
        with warnings_caught():
            warnings.simplefilter("ignore")
            cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = saved


class ScoreItem(NamedTuple):
    image: torch.Tensor  # uint8 (C, H, W); zeros when ok is False
    ok: bool
    error: str
    index: int
    shape: tuple[int, int]  # the decoded file's upright (width, height); (0, 0) when not ok
    more_frames: bool  # the file holds frames or pages after the first (not scored)
    png_bpd: float  # NaN when ok is False
    coarse_png_bpd: float  # NaN when ok is False


# a ScoreItem is built from an ImageItem positionally: its fields, then the PNG lengths
# (tests/test_scoring.py holds the two field lists together)
_NO_PNG = (float("nan"), float("nan"))  # the PNG lengths of an image not decoded


class ScoreBatch(NamedTuple):
    """A batch of :class:`ScoreItem` (:meth:`ScoringDataset.collate`): the images as one
    tensor, everything else as small arrays."""

    images: torch.Tensor  # uint8 (B, C, H, W)
    ok: np.ndarray  # bool (B,)
    errors: list[str]
    index: np.ndarray  # int64 (B,)
    shapes: np.ndarray  # int64 (B, 2): each file's upright (width, height)
    more_frames: np.ndarray  # bool (B,): each file holds frames after the first (not read)
    png_bpd: np.ndarray  # float64 (B,)
    coarse_png_bpd: np.ndarray  # float64 (B,)


class ScoringDataset(Dataset[ScoreItem]):
    """Images from file paths or encoded bytes, decoded (and PNG-measured) in workers.

    ``config`` is the scoring model's: images are converted to its mode, size and
    ``resize``, quantised to its ``n_bits``, and its ``levels`` set the resolution of the
    coarse PNG length (:func:`~anomaly_flow.complexity.coarse_png_bits_per_dim`). A
    DataLoader fetches whole batches (``__getitems__``), so the PNG lengths of a batch
    are measured together (:func:`~anomaly_flow.complexity.batch_png_bits_per_dim`).

    Never raises for a bad input: the item carries ``ok=False`` and a one-line reason.
    """

    def __init__(self, sources: Sequence[str | Path | bytes | InvalidSource | None],
                 config: GlowConfig) -> None:
        self.sources = list(sources)
        self.config = config

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> ScoreItem:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[ScoreItem]:
        c = self.config
        items = [load_item(self.sources[i], c.mode, c.image_size, i, c.resize)
                 for i in indices]
        ok = [item for item in items if item.ok]
        if not ok:
            return [ScoreItem(*item, *_NO_PNG) for item in items]
        images = torch.stack([item.image for item in ok]).numpy()
        png_bpd = batch_png_bits_per_dim(images, c.n_bits)
        coarse = (png_bpd if c.levels == 1
                  else batch_coarse_png_bits_per_dim(images, c.n_bits, c.levels))
        measured = iter(zip(png_bpd.tolist(), coarse.tolist(), strict=True))
        return [ScoreItem(*item, *(next(measured) if item.ok else _NO_PNG)) for item in items]

    @staticmethod
    def collate(items: Sequence[ScoreItem]) -> ScoreBatch:
        """The DataLoader's ``collate_fn`` for this dataset.

        Only the images travel from a worker as a tensor (in shared memory); the rest goes
        as arrays inside the pickled batch. torch's default collate would make five
        tensors, and each tensor from a worker costs a socket connection with an
        authentication handshake to receive (~0.5–1 ms; at 50,000 images, up to 0.8 s of
        the main process's time). In a worker, ``default_collate`` stacks the images
        straight into shared memory, saving the copy there a plain ``torch.stack`` costs.
        """
        return ScoreBatch(
            images=default_collate([item.image for item in items]),
            ok=np.fromiter((item.ok for item in items), dtype=bool, count=len(items)),
            errors=[item.error for item in items],
            index=np.fromiter((item.index for item in items), dtype=np.int64,
                              count=len(items)),
            shapes=np.array([item.shape for item in items], dtype=np.int64).reshape(-1, 2),
            more_frames=np.fromiter((item.more_frames for item in items), dtype=bool,
                                    count=len(items)),
            png_bpd=np.fromiter((item.png_bpd for item in items), dtype=np.float64,
                                count=len(items)),
            coarse_png_bpd=np.fromiter((item.coarse_png_bpd for item in items),
                                       dtype=np.float64, count=len(items)),
        )


@dataclass(frozen=True)
class BatchScores:
    """Scores of a batch of decoded images (CPU tensors).

    Attributes:
        bpd: ``(B,)`` float64 bits/dim.
        level_bits: ``(B, L)`` float64 per-level share in bits/dim.
        typicality: ``(B,)`` float64, or None for a model without a normal reference.
        knn: ``(B,)`` float64, or None for a model without reference maps.
        pixel_knn: ``(B,)`` float64, or None for a model without reference images.
        pixel_bpd: ``(B, H, W)`` float32 per-pixel bits/dim, or None when not asked for.
    """

    bpd: torch.Tensor
    level_bits: torch.Tensor
    typicality: torch.Tensor | None
    knn: torch.Tensor | None
    pixel_knn: torch.Tensor | None
    pixel_bpd: torch.Tensor | None


def score_images(model: Glow, images: torch.Tensor, pixel_maps: bool = False,
                 precision: Precision = "float32") -> BatchScores:
    """Score uint8 images ``(B, C, H, W)`` (a tensor already on the model's device, or a
    numpy array).

    ``precision`` is ``float32`` (exact), ``tf32`` or ``bf16``; see :func:`numerics`.

    Raises:
        TypeError: ``model`` is not a :class:`Glow` (a ``LoadedModel``: pass its
            ``.model``), or ``images`` are neither a tensor nor an array, or floats.
        ValueError: ``images`` are not ``(B, C, H, W)`` at the model's channels and size.
        ScoringError: The model was never initialised (it has learned nothing).
    """
    images = _checked_images(model, images)
    levels = model.config.levels
    with numerics(model, precision), torch.inference_mode():
        stats, maps = _launch(model, images, "bpd" if pixel_maps else None)
        stats = stats.cpu()
        return BatchScores(bpd=stats[:, 0], level_bits=stats[:, 1:1 + levels],
                           typicality=stats[:, 1 + levels] if model.has_reference else None,
                           knn=stats[:, 2 + levels] if model.has_knn_reference else None,
                           pixel_knn=(stats[:, 3 + levels] if model.has_image_reference
                                      else None),
                           pixel_bpd=None if maps is None else maps.cpu())


def _checked_images(model: Glow, images: Any) -> torch.Tensor:
    """``images`` as :func:`score_images` scores them, refused, before a short batch is
    padded, in terms of what the caller gave."""
    if not isinstance(model, Glow):
        inner = getattr(model, "model", None)
        hint = ("; pass its .model (and its .calibration to apply_calibration or "
                "score_folder)" if isinstance(inner, Glow) else "")
        raise TypeError(f"score_images takes a Glow, not a {type(model).__name__}{hint}")
    if isinstance(images, np.ndarray):  # a copy: flipped (BGR to RGB) or read-only too
        images = torch.from_numpy(np.array(images, order="C")).to(model.device)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"score_images takes uint8 pixels as a torch.Tensor or numpy array "
                        f"(B, C, H, W), not a {type(images).__name__}")
    c, size = model.config.in_channels, model.config.image_size
    if images.dim() != 4 or tuple(images.shape[1:]) != (c, size, size):
        raise ValueError(
            f"score_images takes uint8 pixels of shape (B, {c}, {size}, {size}), channels "
            f"first, not {tuple(images.shape)}; convert each image to the model's mode and "
            "size with anomaly_flow.data.image_to_array and stack them (score_folder reads "
            "files itself)")
    check_initialized(model)
    return images


HeatmapKind = Literal["bpd", "typicality"]
"""Which per-pixel map a heatmap draws: the bits/dim, or the typicality terms
(:meth:`~anomaly_flow.glow.Glow.typicality_map`)."""


class _Forward:
    """The flow's forward pass for a scoring run, compiled by ``torch.compile`` for
    batches of one size (a shorter last batch is padded with blank images, whose rows are
    dropped), so it compiles once. Where compiling or a compiled call fails (no C++
    compiler, an unsupported platform) and the model itself runs the batch, the run goes on
    uncompiled with one warning; where the model fails too, its own error is raised.

    Compiled kernels fuse the elementwise work around the convolutions: 2.1-2.3x the
    images/s of eager on 2 CPU cores (tiny and small presets, batch 256), after ~30-40 s
    of compiling. The numbers are the same float32 sums in another order: each score
    within a few millionths of its size of eager's (measured on 600 Fashion-MNIST images,
    tiny and small presets: up to 2e-6 relative for ``bpd``, ``typicality`` and ``knn``;
    differences such as ``complexity`` and ``ensemble`` keep the absolute error of their
    parts).
    """

    def __init__(self, model: Glow, batch_size: int) -> None:
        self.model, self.batch_size = model, batch_size
        self.compiled: Callable[[torch.Tensor], Any] | None = None
        self.failed = False

    def min_batch(self) -> int:
        """The batch size compiled for (while compiling is in use)."""
        return 1 if self.failed else self.batch_size

    def __call__(self, x: torch.Tensor) -> Any:
        if self.failed:
            return self.model(x)
        try:
            if self.compiled is None:
                logger.info("compiling the model for scoring (once per run; about half a "
                            "minute on a CPU unless torch has it cached)")
                self.compiled = torch.compile(self.model)
            return self.compiled(x)
        except Exception as exc:  # no C++ compiler, an unsupported platform, ...
            if out_of_memory(exc, x.device) is not None:  # the batch, not compiling
                raise
            # the model itself must work on this batch, or the problem is not compiling
            # and its own error says what it is
            out = self.model(x)
            logger.warning("could not compile the model here (%s: %s); scoring without "
                           "compiling", type(exc).__name__, " ".join(str(exc).split())[:300])
            self.failed = True
            return out


_ALLOCATION = re.compile(r"tried to allocate (?:(\d+) bytes|(\d+(?:\.\d+)? ?[KMGTP]i?B))",
                         re.IGNORECASE)
"""The failed allocation in torch's out-of-memory messages: ``you tried to allocate N
bytes`` (CPU), ``Tried to allocate 2.00 GiB`` (CUDA)."""


def out_of_memory(error: BaseException, device: torch.device | str) -> str | None:
    """``out of memory on <device>``, with the allocation that failed where torch's
    message names it (`` (an allocation of 2.25 GiB failed)``), or None when ``error`` is
    not torch's out-of-memory error (``torch.cuda.OutOfMemoryError`` on CUDA, a RuntimeError
    "DefaultCPUAllocator: can't allocate memory" on the CPU): the words training and
    scoring tell a user whose batch did not fit."""
    if not isinstance(error, RuntimeError):
        return None
    text = str(error)
    if not (isinstance(error, torch.cuda.OutOfMemoryError) or "can't allocate memory" in text
            or "out of memory" in text.lower()):
        return None
    failed = ""
    if found := _ALLOCATION.search(text):
        size = found[2] or (f"{int(found[1]) / 2**30:.2f} GiB" if int(found[1]) >= 2**30
                            else f"{int(found[1]) / 2**20:.1f} MiB")
        failed = f" (an allocation of {size} failed)"
    return f"out of memory on {device}{failed}"


def _min_batch(device: torch.device) -> int:
    """The smallest batch whose sums come out as in any larger batch.

    On a CPU, oneDNN convolves small batches with other kernels than large ones, and the
    float32 sums then run in another order (a few images in a hundred differ in the last
    digit of bits/dim). Measured with torch 2.13 on x86: batches of 2 or more agree when
    torch uses several threads, batches of 16 or more with one thread (as in a Spark
    worker with ``OMP_NUM_THREADS=1``). Shorter batches are padded to this size, so a file
    scored alone (a served request, the last rows of a Spark batch) gets the numbers of
    a folder run, at the cost of the padding's compute. On CUDA a lone image is padded
    to two, so the kernels a batch of one might get are never used.
    """
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return 16
    return 2


def _n_stats(model: Glow) -> int:
    """The width of :func:`_launch`'s stats: bpd, the level bits, typicality, knn and
    pixel_knn where the model has them."""
    return (1 + model.config.levels + model.has_reference + model.has_knn_reference
            + model.has_image_reference)


def _launch(model: Glow, images: torch.Tensor, maps: HeatmapKind | None,
            forward: _Forward | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Queue the forward pass: ``(B, 1 + L [+ 1 [+ 1 [+ 1]]])`` float64 ``[bpd, level
    bits, typicality when the model has a normal reference, knn when it has reference
    maps, pixel_knn when it has reference images]`` and the ``maps`` asked for.
    ``forward`` (default: the model itself) runs the flow."""
    n = len(images)
    smallest = max(_min_batch(images.device), 1 if forward is None else forward.min_batch())
    if n < smallest:  # padded with blank images, whose rows are dropped
        blank = images.new_zeros((smallest - n, *images.shape[1:]))
        stats, pixel_maps = _launch(model, torch.cat([images, blank]), maps, forward)
        return stats[:n], None if pixel_maps is None else pixel_maps[:n]
    reference = model.has_reference
    flow = model if forward is None else forward
    x = preprocess(images, model.config.n_bits)
    parts = breakdown_from_output(flow(x), model.config, maps is not None or reference)
    columns = [parts.bpd[:, None], parts.level_bits]
    typical = model.typicality_map(parts.pixel_bpd) if reference else None
    if typical is not None:
        columns.append(typical.mean(dim=(1, 2))[:, None])
    if model.has_knn_reference:
        columns.append(model.knn(parts.pixel_bpd)[:, None])
    if model.has_image_reference:
        columns.append(model.pixel_knn(x)[:, None])
    stats = torch.cat(columns, dim=1).double()
    if maps is None:
        return stats, None
    if maps == "typicality":
        if typical is None:
            raise ScoringError("typicality heatmaps need the model's normal reference, and "
                               "this model has none")
        return stats, typical.float()
    return stats, parts.pixel_bpd.float()


HeatmapSink = Callable[[Sequence[int], torch.Tensor, torch.Tensor, np.ndarray], None]
"""Receives (dataset indices, uint8 images (B, C, H, W), per-pixel maps (B, H, W), each
file's upright (width, height) as decoded, int64 (B, 2))."""


class _Pending(NamedTuple):
    """A batch whose results are still on their way back from the device."""

    batch: ScoreBatch
    stats: torch.Tensor  # (B, 1 + L [+ 1 [+ 1 [+ 1]]]) float64 on the host, once `ready` is done
    maps: torch.Tensor | None
    ready: Any  # torch.cuda.Event, or None on CPU


def _conversion(config: GlowConfig) -> tuple[str, int, str, int, int]:
    """What :class:`ScoringDataset` takes from a model's config: how a file becomes its
    input, and the PNG lengths' resolution."""
    return config.mode, config.image_size, config.resize, config.n_bits, config.levels


def score_dataset(
    model: Glow,
    dataset: ScoringDataset,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    heatmaps: HeatmapSink | None = None,
    heatmap_kind: HeatmapKind = "bpd",
    progress: bool | None = None,
    on_batch: Callable[[pd.DataFrame], Any] | None = None,
    precision: Precision = "float32",
    compile: bool = False,
    layered: list[int] | None = None,
) -> pd.DataFrame:
    """Score every item of ``dataset``; one row per item, in dataset order.

    Args:
        model: The flow, on its scoring device.
        dataset: What to score.
        batch_size: Images per forward pass.
        num_workers: DataLoader worker processes that decode images.
        heatmaps: Receives each batch's scored images and per-pixel maps.
        heatmap_kind: The maps ``heatmaps`` receives: ``bpd`` (per-pixel bits/dim) or
            ``typicality`` (its per-pixel terms; needs the model's normal reference).
        progress: Progress bar on stderr; None shows it only on a terminal.
        on_batch: Receives each batch's rows as they are done (for incremental output).
        precision: ``float32`` (exact), ``tf32`` or ``bf16``; see :func:`numerics`.
        compile: Run the flow compiled by ``torch.compile``: about twice the images/s once
            compiled (tens of seconds), scores within a few millionths of their size of
            the eager ones (see :class:`_Forward`); falls back to eager, with a warning,
            where compiling fails.
        layered: Receives the dataset index of each scored file that holds frames or
            pages after its first (only the first is scored), for the caller to say so.

    Returns:
        Columns :func:`score_names` (``bpd``, ``complexity``, ``coarse_complexity``,
        ``typicality``, ``knn``, ``pixel_knn`` and ``ensemble`` as far as the model's
        normal reference gives them, ``level_1..level_L``) and ``error`` (empty for scored
        images; the score columns are NaN for failed ones, including images on which the
        model overflows), indexed by dataset index.

    Raises:
        ValueError: The dataset was built for a model that prepares images otherwise.
        ScoringError: ``batch_size`` is not a whole number >= 1, ``precision`` unknown, or
            the model never initialised (:attr:`Glow.initialized`).
        BatchOutOfMemory: A batch did not fit in memory.
    """
    check_batch_size(batch_size)
    check_initialized(model)
    if _conversion(dataset.config) != _conversion(model.config):
        raise ValueError(f"the dataset prepares images for another model (mode, size, "
                         f"resize, n_bits, levels: {_conversion(dataset.config)}, this model's "
                         f"{_conversion(model.config)}); build it with the model's config")
    device = model.device
    model.eval()
    asked = batch_size
    batch_size = min(batch_size, max(len(dataset), 1))  # a batch past the data is the data
    num_workers = worker_count(num_workers, math.ceil(len(dataset) / batch_size))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=ScoringDataset.collate,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        generator=torch.Generator(),  # not the caller's random state
                        **loader_worker_options(num_workers))
    names = score_names(model)
    # ensemble's (mean, std) table on the host once: copying it per batch would make the
    # host wait for the batch just launched on the device
    scale = model.reference_scale.cpu() if model.reference_scale is not None else None
    # one batch shape: the batch size, or the whole dataset when it is smaller
    forward = _Forward(model, min(batch_size, len(dataset))) if compile else None
    frames = []

    def finish(pending: _Pending) -> None:
        if pending.ready is not None:
            pending.ready.synchronize()
        frame = _batch_frame(pending, names, scale)
        batch = pending.batch
        scored = batch.ok & (frame["error"].to_numpy() == "")
        if heatmaps is not None and pending.maps is not None:
            heatmaps(batch.index[scored].tolist(), batch.images[torch.from_numpy(scored)],
                     pending.maps[torch.from_numpy(scored)], batch.shapes[scored])
        if layered is not None:
            layered.extend(batch.index[scored & batch.more_frames].tolist())
        frames.append(frame)
        if on_batch is not None:
            on_batch(frame)
        bar.update(len(frame))

    try:
        with (
            tqdm(total=len(dataset), disable=(not progress) if progress is not None else None,
                 desc="score", unit="img", dynamic_ncols=True) as bar,
            numerics(model, precision),
            torch.inference_mode(),
        ):
            pending: _Pending | None = None
            for batch in worker_batches(loader):
                raise_if_stopped()  # a stop whose signal landed where Python ignores it
                if not batch.ok.any():  # nothing decoded: rows with errors, no forward pass
                    stats = torch.full((len(batch.ok), _n_stats(model)), float("nan"),
                                       dtype=torch.float64)  # as _launch's
                    maps = None
                else:
                    stats, maps = _launch(model, batch.images.to(device, non_blocking=True),
                                          None if heatmaps is None else heatmap_kind, forward)
                (stats, maps), ready = to_host_async(stats, maps)
                launched = _Pending(batch, stats, maps, ready)
                if pending is not None:
                    finish(pending)  # the device is already busy with `launched`
                pending = launched
            if pending is not None:
                finish(pending)
    except RuntimeError as error:  # a batch that does not fit: a smaller one may
        if (ran_out := out_of_memory(error, device)) is None:
            raise
        raise BatchOutOfMemory(ran_out, asked, len(dataset), device, compile) from None
    if not frames:  # the columns' types all the same
        return pd.DataFrame({**{name: pd.Series(dtype=np.float64) for name in names},
                             "error": pd.Series(dtype=str)})
    return pd.concat(frames)


def to_host_async(*tensors: torch.Tensor | None) -> tuple[list[torch.Tensor | None], Any]:
    """``tensors`` (all on one device; None passes through) copied to the host without
    waiting for the device, and the ``torch.cuda.Event`` to wait on before reading them:
    None for tensors on the CPU, which are only ever copied at once. From CUDA the copies
    land in pinned memory, queued behind the work that makes the tensors; the event is
    recorded on their own device's stream, which need not be the current device's."""
    cuda = [t.device for t in tensors if t is not None and t.is_cuda]
    host = [None if t is None else t.to("cpu", non_blocking=bool(cuda)) for t in tensors]
    if not cuda:
        return host, None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(cuda[0]))
    return host, event


def _batch_frame(pending: _Pending, names: list[str], scale: torch.Tensor | None
                 ) -> pd.DataFrame:
    """One batch's rows (columns ``names``, then ``error``): scores where decoding worked
    and the result is finite; ``scale`` is the model's ``reference_scale`` on the host
    (for ``ensemble``)."""
    batch = pending.batch
    stats = pending.stats.numpy().copy()  # bpd, level bits, [typicality, knn, pixel_knn]
    errors = np.array(batch.errors, dtype=object)
    ok = batch.ok
    non_finite = ok & ~np.isfinite(stats).all(axis=1)
    errors[non_finite] = NON_FINITE_ERROR
    stats[~ok | non_finite] = np.nan
    levels = [name for name in names if name.startswith("level_")]
    level_bits = stats[:, 1:1 + len(levels)]
    columns = {
        "bpd": stats[:, 0],
        "complexity": stats[:, 0] - batch.png_bpd,
        "coarse_complexity": coarse_complexity(level_bits, batch.coarse_png_bpd),
        **dict(zip(levels, level_bits.T, strict=True)),
    }
    if "typicality" in names:
        columns["typicality"] = stats[:, 1 + len(levels)]
    if scale is not None:  # reference maps: knn and ensemble (pixel_knn with images too)
        columns["knn"] = stats[:, 2 + len(levels)]
        pixel_knn = None
        if "pixel_knn" in names:
            columns["pixel_knn"] = stats[:, 3 + len(levels)]
            pixel_knn = torch.from_numpy(columns["pixel_knn"])
        columns["ensemble"] = ensemble_score(
            torch.from_numpy(columns["knn"]), torch.from_numpy(columns["coarse_complexity"]),
            scale, pixel_knn).numpy()
    frame = pd.DataFrame({name: columns[name] for name in names},
                         index=batch.index)
    frame["error"] = errors.astype(str)
    return frame


# ------------------------------------------------------------------------------ decisions


def apply_calibration(scores: pd.DataFrame, calibration: Any | None,
                      fdr: float | None = None) -> pd.DataFrame:
    """Add ``score``, ``p_value`` and ``is_anomaly`` from a calibration.

    Uncalibrated: ``score`` is ``bpd``, ``p_value`` NaN and ``is_anomaly`` missing (NA).
    Rows without a finite score get NaN and NA.

    Args:
        scores: A table with the score columns.
        calibration: An :class:`anomaly_flow.calibration.Calibration`, or None.
        fdr: Decide by Benjamini-Hochberg over all rows at this false discovery rate
            instead of the calibration's threshold.
    """
    out = scores.copy()
    if calibration is None:
        if fdr is not None:
            raise ScoringError(
                "--fdr needs conformal p-values, but this model has no calibration; "
                "calibrate it first (anomaly-flow calibrate) or drop --fdr."
            )
        out["score"] = out["bpd"]
        out["p_value"] = np.nan
        out["is_anomaly"] = pd.array([None] * len(out), dtype="boolean")
        return out
    n = len(calibration.calibration_scores)
    if fdr is not None and (isinstance(fdr, bool) or not isinstance(fdr, numbers.Real)
                            or not 0 < fdr < 1):
        raise ScoringError(f"the false discovery rate (fdr, --fdr) must be a number strictly "
                           f"between 0 and 1; got {fdr!r}. Use e.g. 0.05 or 0.1.")
    if fdr is not None and 1 / (n + 1) > fdr * (1 + 1e-12):  # BH's own tolerance
        raise ScoringError(
            f"--fdr {fdr:g} can never flag an image: the calibration holds {n} scores, so "
            f"the smallest p-value is 1/{n + 1} = {1 / (n + 1):.6g}, above {fdr:g}; raise "
            f"--fdr to at least {rounded_up(1 / (n + 1)):g}, or recalibrate on at least "
            f"{min_calibration_size(fdr)} held-out normal images.")
    name = calibration.score_name
    if name not in out.columns:
        raise ScoringError(
            f"the calibration uses score {name!r}, which this model does not produce "
            f"(columns: {list(out.columns)}); recalibrate the model."
        )
    values = out[name].to_numpy(dtype=float)
    finite = np.isfinite(values)
    p = np.full(len(out), np.nan)
    verdict = pd.array([None] * len(out), dtype="boolean")
    if finite.any():
        p[finite] = calibration.p_values(values[finite])
        verdict[finite] = calibration.decide(values[finite], fdr=fdr)
    out["score"] = values
    out["p_value"] = p
    out["is_anomaly"] = verdict
    return out


def paths_frame(paths: Sequence[Path]) -> pd.Series:
    """The ``path`` column for a list of files: printable even for non-UTF-8 names."""
    return pd.Series([display_path(p) for p in paths], dtype="string")
