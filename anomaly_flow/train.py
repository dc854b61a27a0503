"""Training a Glow on images of normal data: a library function with a metrics callback.

Nothing here knows MLflow or click: :func:`train` reports through ``callback`` and
returns a :class:`TrainResult`; the tracking module and the CLI sit on top.

Determinism: the image order of every epoch is a permutation drawn from
``(seed, epoch)`` and the dequantisation noise of every step from ``(seed, step)``,
so a resumed run sees exactly the batches and noise of an uninterrupted one, and a
DDP run (each rank taking its share of the same global batch) sees those of a
single-process run.

Checkpoints (:mod:`anomaly_flow.checkpoint`) are written every ``checkpoint_every``
steps and at the end; ``resume`` goes on from the latest as if the run had never stopped.

Several processes: started by ``torchrun``, :func:`train` joins the process group
(:mod:`anomaly_flow.distributed`), wraps the model in DistributedDataParallel after the
ActNorm initialisation, and leaves the group again at the end if it was the one that
joined it. Only rank 0 calls the callback, shows the progress bar and writes
checkpoints; validation is shared out over the ranks.

Example:
    >>> data = folder_datasets("parts/normal", config)  # doctest: +SKIP
    >>> result = train(config, data.train, data.val, checkpoint_dir="ckpt")  # doctest: +SKIP
    >>> result.val_bpd  # doctest: +SKIP
    3.41
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate
from tqdm.auto import tqdm

from anomaly_flow.checkpoint import (
    TRAINING_STATE_KEYS,
    UNFINISHED_CHECKPOINT,
    TrainingError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from anomaly_flow.complexity import batch_coarse_png_bits_per_dim, coarse_complexity
from anomaly_flow.config import RunConfig, TrainConfig
from anomaly_flow.data import (
    DataError,
    ImageFolderDataset,
    ImageItem,
    display_path,
    split_train_val,
)
from anomaly_flow.distributed import join_process_group, launch_device, world_size
from anomaly_flow.errors import one_line, peer_lost
from anomaly_flow.fingerprint import duplicate_note, fingerprint_and_digests, is_unreadable
from anomaly_flow.folders import find_images
from anomaly_flow.glow import (
    REFERENCE_MAX_MAPS,
    Glow,
    SamplingError,
    bits_per_dim,
    breakdown_from_output,
    knn_grid,
    log_prob_from_output,
    pool_images,
    pool_to_grid,
    postprocess,
    preprocess,
)
from anomaly_flow.scoring import numerics, out_of_memory, to_host_async
from anomaly_flow.stopping import (
    loader_worker_options,
    raise_if_stopped,
    remove_leftovers,
    worker_batches,
    worker_count,
)
from anomaly_flow.survey import conversion_look

logger = logging.getLogger(__name__)

REFERENCE_MIN_IMAGES = 30
"""Fewer validation images than this for the normal reference draw a warning."""


@dataclass(frozen=True)
class TrainEvent:
    """What the callback receives.

    ``kind`` is ``"step"`` after every optimiser step (train bits/dim, lr, images/s,
    grad norm, skipped steps), ``"epoch"`` after every epoch (validation bits/dim,
    epoch means) and ``"checkpoint"`` when a checkpoint was written (``path`` set).
    ``step`` counts the optimiser steps done; ``epoch`` is the epoch in progress
    (0-based) for step events and checkpoints within an epoch, and the number of epochs
    completed for epoch events and checkpoints at an epoch's end.
    """

    kind: Literal["step", "epoch", "checkpoint"]
    step: int
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)
    path: Path | None = None


Callback = Callable[[TrainEvent], None]


@dataclass
class TrainResult:
    """The outcome of :func:`train`; ``model`` is on the training device, in eval mode.

    Attributes:
        steps: Optimiser steps taken in all (skipped ones included).
        val_bpd: Validation bits/dim after the last epoch (NaN without a validation set).
        train_bpd: Bits/dim of the last finite training batch.
        images_per_sec: Training throughput over the last epoch, decoding included.
        skipped_steps: Steps skipped for a non-finite loss or gradient.
        failed_files: Undecodable images of both splits, file (or ``item N``) -> reason.
        samples: uint8 grid of 16 samples, ``(H, W)`` or ``(H, W, 3)``; empty off rank 0,
            and empty when the model cannot draw samples (``samples_skipped`` says why).
        checkpoint_dir: The final checkpoint (None when none was written).
        history: One dict of epoch metrics per epoch.
        samples_skipped: Why rank 0 drew no sample grid (a :class:`SamplingError`'s
            message: a singular 1x1 convolution, or samples that overflow), else None.
    """

    model: Glow
    config: RunConfig
    steps: int
    val_bpd: float
    train_bpd: float
    images_per_sec: float
    skipped_steps: int
    failed_files: dict[str, str]
    samples: np.ndarray
    checkpoint_dir: Path | None
    history: list[dict[str, float]]
    samples_skipped: str | None = None


@dataclass(frozen=True)
class FolderData:
    """Training and validation sets drawn from one image folder.

    ``digests``: the sorted, distinct SHA-256 content digests of the folder's files,
    both splits (the validation split is fitted by the normal reference), so that
    calibration can tell the images the model was trained on from held-out ones.
    ``shapes``: the sizes of a sample of its images (:func:`conversion_look`), which the
    trained model records (:attr:`Glow.training_shapes`).
    """

    train: Dataset
    val: Dataset | None
    paths: list[Path]
    fingerprint: str
    digests: tuple[str, ...] = ()
    shapes: tuple[tuple[int, int, int], ...] = ()


def folder_datasets(folder: str | Path, config: RunConfig) -> FolderData:
    """Find the images under ``folder`` and split them reproducibly (seed, val_fraction).

    Raises:
        DataError: The folder is missing, holds no image files, or holds a single image
            while a validation split is asked for.
    """
    root = Path(folder)
    paths = find_images(root)
    try:
        train_idx, val_idx = split_train_val(len(paths), config.train.val_fraction,
                                             config.train.seed)
    except DataError:  # a single image and a validation split asked for
        only = ImageFolderDataset(paths, config.model.mode, config.model.image_size,
                                  config.model.resize)[0]
        what = (f"a single image ({display_path(paths[0])})" if only.ok else
                f"a single image file, {display_path(paths[0])}, and it cannot be read as an "
                f"image ({only.error})")
        raise DataError(
            f"{display_path(root)} holds {what}; training needs at least 2 images, some to "
            "train on and at least one held out to measure validation bits/dim (a model is "
            "registered only with a finite one). Add more normal images to the folder."
        ) from None
    if len(train_idx) < len(val_idx):
        logger.warning("%s: train.val_fraction = %g holds out %d of the %d image files for "
                       "validation, so the model trains on %d; lower val_fraction (the "
                       "presets hold out 0.1)", display_path(root), config.train.val_fraction,
                       len(val_idx), len(paths), len(train_idx))
    look = conversion_look(paths, config.model.mode, config.model.image_size,
                           resize=config.model.resize)
    for note in look.notes:
        logger.warning("%s: %s", display_path(root), note)
    dataset = ImageFolderDataset(paths, config.model.mode, config.model.image_size,
                                 config.model.resize)
    val = Subset(dataset, val_idx.tolist()) if len(val_idx) else None
    digest, digests = fingerprint_and_digests(paths, root)
    if note := duplicate_note(digests, paths):
        logger.warning("%s: %s", display_path(root), note)
    return FolderData(Subset(dataset, train_idx.tolist()), val, paths, digest,
                      tuple(sorted({d for d in digests if not is_unreadable(d)})),
                      look.shapes)


class GlobalBatchSampler(Sampler[list[int]]):
    """Batches of a per-epoch permutation; under DDP each rank takes every world-th
    index of the same global batch. ``start`` skips batches already done (resume).

    The DataLoader iterates this sampler in the main process, so :meth:`set_epoch`
    between epochs works with persistent workers.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.start, self.rank, self.world = epoch, start, rank, world

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size) - self.start

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        for b in range(self.start, math.ceil(self.n / self.batch_size)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield batch[self.rank :: self.world]


def _collate_share(items: list[ImageItem], image_shape: tuple[int, int, int]
                   ) -> tuple[torch.Tensor, np.ndarray, list[str], np.ndarray]:
    """A rank's share of a batch: uint8 images ``(b, C, H, W)``, the ``ok`` mask and the
    dataset indices as arrays, the error strings.

    Only the images travel from a worker as a tensor (in shared memory); the mask and
    indices ride in the pickled batch, since receiving each tensor from a worker costs
    the training process a socket connection with a handshake (~0.5 ms per tensor per
    step). An empty share is an empty batch: under DDP a last global batch shorter than
    the process count leaves some ranks nothing. ``default_collate`` stacks the images
    straight into shared memory in a worker (no copy after stacking).
    """
    return (default_collate([item.image for item in items]) if items
            else torch.zeros((0, *image_shape), dtype=torch.uint8),
            np.fromiter((item.ok for item in items), dtype=bool, count=len(items)),
            [item.error for item in items],
            np.fromiter((item.index for item in items), dtype=np.int64, count=len(items)))


def _step_noise(seed: int, step: int, shape: tuple[int, ...],
                device: torch.device | None = None) -> torch.Tensor:
    """Dequantisation noise ``U[0, 1)`` of one global batch, drawn from ``(seed, step)``.

    Drawn on ``device`` (default the CPU) by that device's generator, so a GPU run has no
    host work or copy for it; CPU and CUDA runs with the same seed therefore see
    different (equally distributed) noise, and each is reproducible on its own.
    """
    device = torch.device("cpu") if device is None else device
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step + 1)
    return torch.rand(shape, generator=gen, device=device)


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based): linear warm-up, then flat.

    A pure function of the step, so a resumed run continues the same schedule.
    """
    return config.lr * min(1.0, (step + 1) / max(config.warmup_steps, 1))


def resolve_device(device: str | torch.device, *, option: str = "--device") -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is an error.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        option: How the user gave ``device``, for the messages (``--device``).
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):  # torch knows meta, mps...
        raise TrainingError(f"unknown device {str(device)!r}; use auto, cpu, cuda or cuda:N "
                            "(N a GPU's index, e.g. cuda:0).")
    if resolved.type == "cuda" and resolved.index is not None and world_size() > 1:
        raise TrainingError(f"{option} {resolved} names one GPU, but under torchrun each "
                            "process takes its own (LOCAL_RANK); use cuda, and choose the "
                            "GPUs with CUDA_VISIBLE_DEVICES")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"{option} {resolved} was asked for but CUDA is not available on "
                            f"this machine; use {option} cpu or auto.")
    if resolved.type == "cuda" and resolved.index is not None \
            and resolved.index >= torch.cuda.device_count():
        raise TrainingError(f"{option} {resolved} was asked for but this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                            f"cuda:{torch.cuda.device_count() - 1}; name one of them, or cuda.")
    return resolved


def uses_bf16(config: RunConfig, device: torch.device) -> bool:
    """Whether training runs the coupling networks under bf16 autocast: asked for
    (``train.bf16``) and on CUDA, the only device it is used on."""
    return config.train.bf16 and device.type == "cuda"


def check_batch_split(config: RunConfig) -> None:
    """Refuse a global batch that the processes torchrun started cannot share equally."""
    world = world_size()
    if config.train.batch_size % world:
        raise TrainingError(f"batch_size {config.train.batch_size} is not divisible by the "
                            f"{world} processes; pick a multiple of the process count.")


def _file_paths(dataset: Dataset | None) -> list[Path] | None:
    """The files behind a dataset's indices (:class:`ImageItem.index` is the index in the
    base set, under any :class:`Subset`), or None for images in memory."""
    base = dataset
    while isinstance(base, Subset):
        base = base.dataset
    return getattr(base, "paths", None)


FAILED_FILES_LOGGED = 10
"""Undecodable training images logged one by one; the rest are counted (the run's
``failed_files.txt`` lists them all)."""


class _FailedFiles:
    """Undecodable images of the data folder met so far, in either split: name -> reason,
    the first :data:`FAILED_FILES_LOGGED` logged (rank 0) with the split each is in.

    Args:
        dataset: The training split; ``val_set``, the validation split (the same folder's
            other share, or a dataset of its own given to :func:`train`).
    """

    def __init__(self, dataset: Dataset, log: bool, val_set: Dataset | None = None) -> None:
        self._paths = {"training": _file_paths(dataset), "validation": _file_paths(val_set)}
        self._log = log
        self.reasons: dict[str, str] = {}
        self._splits: dict[str, str] = {}  # name -> "training" or "validation"
        self._logged = 0  # by this process: those a checkpoint restored were said before

    def _name(self, index: int, split: str = "training") -> str:
        paths = self._paths[split]
        return display_path(paths[index]) if paths is not None else f"item {index}"

    def add(self, name: str, reason: str, split: str = "training") -> None:
        self._splits.setdefault(name, split)  # a failure a checkpoint restored learns it here
        if name not in self.reasons:
            self.reasons[name] = reason
            # a folder emptied while it trains (or a damaged disk) fails every file
            if self._log and self._logged < FAILED_FILES_LOGGED:
                self._logged += 1
                logger.warning("skipping undecodable image %s (%s split): %s%s",
                               one_line(name), split, reason,
                               "; further ones are counted, not listed"
                               if self._logged == FAILED_FILES_LOGGED else "")

    def record(self, batch: Any, split: str = "training") -> torch.Tensor:
        """Note the undecodable items of a collated batch (:func:`_collate_share`'s, or
        default-collated :class:`ImageItem` fields) of ``split``; return its ``ok`` mask."""
        ok, errors, index = batch[1], batch[2], batch[3]
        ok = torch.as_tensor(ok)  # the training loop's mask is a CPU tensor
        if not bool(ok.all()):
            for i in torch.nonzero(~ok).flatten().tolist():
                self.add(self._name(int(index[i]), split), errors[i], split)
        return ok

    def keep(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded images ``(b, C, H, W)`` of a collated training batch and its ``ok``
        mask."""
        ok = self.record(batch)
        if bool(ok.all()):
            return batch[0], ok  # no copy: the loader's pinned memory stays pinned
        return batch[0][ok], ok

    def example(self, split: str) -> str:
        """`` (e.g. NAME: REASON)`` for the first failure met in ``split``, else ``""``."""
        name = next((n for n, s in self._splits.items() if s == split), None)
        return "" if name is None else f" (e.g. {name}: {self.reasons[name]})"

    def gather(self, world: int) -> None:
        """Merge what every rank has met (a collective: all ranks call it)."""
        if world > 1:
            mine = {name: (reason, self._splits.get(name, "training"))
                    for name, reason in self.reasons.items()}
            everyone: list[dict[str, tuple[str, str]] | None] = [None] * world
            dist.all_gather_object(everyone, mine)
            for met in everyone:
                for name, (reason, split) in (met or {}).items():
                    self.add(name, reason, split)


class _Throughput:
    """Images per second over an epoch: decoding and the training step count, the
    callback and checkpoint writing do not."""

    def __init__(self) -> None:
        self.start, self.paused, self.images = time.perf_counter(), 0.0, 0

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        tick = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - tick

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start - self.paused
        return self.images / elapsed if elapsed > 0 else 0.0


def evaluate_bpd(model: Glow, dataset: Dataset, batch_size: int, device: torch.device,
                 num_workers: int = 0, rank: int = 0, world: int = 1) -> float:
    """Mean bits/dim (deterministic, bin centres) over the decodable images of a set.

    With ``world > 1`` every rank scores its share and the sums are all-reduced (a
    collective: all ranks call it); every rank gets the same figure.
    """
    return _held_out_pass(model, dataset, batch_size, device, num_workers, rank, world,
                          reference=False)[0]


def fit_reference(model: Glow, dataset: Dataset, batch_size: int, device: torch.device,
                  num_workers: int = 0, rank: int = 0, world: int = 1) -> int:
    """Set the model's normal reference from held-out normal images; return how many
    images it is built on (0 leaves the model as it was).

    The reference is the per-pixel mean and (population) standard deviation of the
    deterministic per-pixel bits/dim map over the decodable images of ``dataset``, and
    those maps and the images themselves pooled to :func:`~anomaly_flow.glow.knn_grid`,
    with the same images' ``coarse_complexity`` (:meth:`Glow.set_reference`) — all of
    them, or beyond ``REFERENCE_MAX_MAPS`` images an evenly spaced subset (every k-th);
    scoring turns it into the ``typicality``, ``knn``, ``pixel_knn`` and ``ensemble``
    scores. An image whose map is not finite (the model overflows on it) is left out and
    counted in a warning; this never raises. Sums are accumulated in float64. With
    ``world > 1`` every rank maps its share, the sums are all-reduced and the pooled maps
    gathered in the dataset's order (a collective: all ranks call it); every rank gets the
    same reference as a single process would.
    """
    return _held_out_pass(model, dataset, batch_size, device, num_workers, rank, world,
                          reference=True)[1]


@torch.no_grad()
def _held_out_pass(model: Glow, dataset: Dataset, batch_size: int, device: torch.device,
                   num_workers: int, rank: int, world: int, reference: bool,
                   failed: _FailedFiles | None = None) -> tuple[float, int]:
    """One pass over held-out images in the arithmetic of scoring: their mean bits/dim
    (:func:`evaluate_bpd`) and, with ``reference``, the normal reference fitted on the
    same forward passes (:func:`fit_reference`) and the number of images behind it.
    Undecodable images are noted in ``failed`` (this rank's share) when given."""
    model.eval()
    shard = dataset if world == 1 else Subset(dataset, range(rank, len(dataset), world))
    num_workers = worker_count(num_workers, math.ceil(len(shard) / batch_size))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers,
                        generator=torch.Generator(), **loader_worker_options(num_workers))
    size, grid = model.config.image_size, knn_grid(model.config)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # Σbpd, images, mapped, bad
    map_sums = (torch.zeros(2, size, size, dtype=torch.float64, device=device)  # Σm, Σm²
                if reference else None)
    # The knn maps: every `stride`-th image of `dataset` (all of them up to
    # REFERENCE_MAX_MAPS), pooled to the knn grid, with the image pooled to the same grid,
    # its coarse_complexity and its index.
    stride = max(1, math.ceil(len(dataset) / REFERENCE_MAX_MAPS))
    pooled: list[torch.Tensor] = []
    pooled_images: list[torch.Tensor] = []
    coarse: list[torch.Tensor] = []
    positions: list[torch.Tensor] = []
    start = 0  # index in `shard` of the batch's first item
    n_bits, levels = model.config.n_bits, model.config.levels
    with numerics(model, "float32"):  # no bf16, no TF32
        for batch in worker_batches(loader):
            ok = failed.record(batch, "validation") if failed is not None else batch[1]
            index = (start + torch.arange(len(ok)))[ok] * world + rank
            start += len(ok)
            host_images = batch[0][ok]
            images = host_images.to(device)
            if not len(images):
                continue
            x = preprocess(images, model.config.n_bits)
            parts = breakdown_from_output(model(x), model.config, pixel_maps=reference)
            sums[0] += parts.bpd.double().sum()
            sums[1] += len(images)
            if map_sums is not None and parts.pixel_bpd is not None:
                maps = parts.pixel_bpd.double()
                finite = torch.isfinite(maps).all(dim=(1, 2))
                maps = maps[finite]
                sums[2] += len(maps)
                sums[3] += (~finite).sum()
                map_sums[0] += maps.sum(dim=0)
                map_sums[1] += maps.square().sum(dim=0)
                kept = finite.cpu() & (index % stride == 0)
                if kept.any():
                    on_device = kept.to(device)
                    pooled.append(pool_to_grid(parts.pixel_bpd[on_device], grid).cpu())
                    pooled_images.append(pool_images(x[on_device], grid).cpu())
                    positions.append(index[kept])
                    png = batch_coarse_png_bits_per_dim(host_images[kept].numpy(), n_bits,
                                                        levels)
                    coarse.append(torch.from_numpy(coarse_complexity(
                        parts.level_bits[on_device].cpu().numpy(), png)))
    if world > 1:
        dist.all_reduce(sums)
        if map_sums is not None:
            dist.all_reduce(map_sums)
    total, count, n, n_bad = sums.tolist()
    if n_bad and rank == 0:
        logger.warning("the normal reference leaves out %d validation image(s) on which the "
                       "model gives a non-finite bits/dim", int(n_bad))
    if map_sums is not None and n:
        mean = map_sums[0] / n
        std = (map_sums[1] / n - mean.square()).clamp_min(0).sqrt()
        maps, values, pooled_x = _gathered_maps(pooled, coarse, positions, pooled_images,
                                                model.config.in_channels, grid, world)
        if len(maps):
            model.set_reference(mean, std, maps, values, pooled_x)
        else:  # every k-th image failed: no maps, so no knn, pixel_knn or ensemble
            model.set_reference(mean, std)
            if rank == 0:
                logger.warning(
                    "none of the %d validation images sampled for the knn reference (every "
                    "%d-th) could be used (undecodable, or the model overflows on them), so "
                    "this model scores typicality but not knn, pixel_knn or ensemble; remove "
                    "the files reported as failed from the training folder and train again",
                    math.ceil(len(dataset) / stride), stride)
    return (total / count if count else float("nan")), int(n)


def _gathered_maps(pooled: list[torch.Tensor], coarse: list[torch.Tensor],
                   positions: list[torch.Tensor], pooled_images: list[torch.Tensor],
                   channels: int, grid: int, world: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pooled maps ``(N, G, G)`` in the dataset's order (at most
    ``REFERENCE_MAX_MAPS``), their images' ``coarse_complexity`` ``(N,)`` and the pooled
    images ``(N, C, G, G)``, from every rank's share when ``world > 1`` (a collective)."""
    maps = torch.cat(pooled) if pooled else torch.empty(0, grid, grid)
    values = torch.cat(coarse) if coarse else torch.empty(0, dtype=torch.float64)
    index = torch.cat(positions) if positions else torch.empty(0, dtype=torch.long)
    images = (torch.cat(pooled_images) if pooled_images
              else torch.empty(0, channels, grid, grid))
    if world > 1:
        shares: list[Any] = [None] * world
        dist.all_gather_object(shares, (index, maps, values, images))
        index, maps, values, images = (torch.cat([share[i] for share in shares])
                                       for i in range(4))
    order = torch.argsort(index)[:REFERENCE_MAX_MAPS]
    return maps[order], values[order], images[order]


def sample_grid(model: Glow, n: int = 16, temperature: float = 0.7,
                seed: int = 0) -> np.ndarray:
    """A square grid of ``n`` samples as a uint8 image (H, W) or (H, W, 3).

    Drawn from ``seed`` without touching the caller's random state.

    Raises:
        SamplingError: The model cannot draw samples: a singular 1x1 convolution (a
            diverged training's), or samples that are not finite at ``temperature`` (a
            diverged or a briefly trained model's).
    """
    model.eval()
    side = math.isqrt(n)
    device = model.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":  # that GPU's generator only: the others are not restored
            torch.cuda.default_generators[device.index].manual_seed(seed)
        images = postprocess(model.sample(side * side, temperature), model.config.n_bits)
    c, h, w = images.shape[1:]
    grid = images.cpu().view(side, side, c, h, w).permute(0, 3, 1, 4, 2)
    grid = grid.reshape(side * h, side * w, c)
    return grid[..., 0].numpy() if c == 1 else grid.numpy()


def total_steps(config: RunConfig, n_train: int) -> int:
    """Optimiser steps of a whole training of ``n_train`` images."""
    return math.ceil(n_train / config.train.batch_size) * config.train.epochs


# ------------------------------------------------------------------------ training


def _make_optimizer(model: Glow, config: RunConfig) -> torch.optim.Optimizer:
    """Adam as one fused kernel over all parameters (the reference architecture has
    1,160 tensors; the per-tensor update costs 6x more on the CPU, more launches on a
    GPU); Adamax, which has no fused kernel, as multi-tensor ops."""
    if config.train.optimizer == "adamax":
        return torch.optim.Adamax(model.parameters(), lr=config.train.lr, foreach=True)
    return torch.optim.Adam(model.parameters(), lr=config.train.lr, fused=True)


INIT_READ_LIMIT = 4
"""The ActNorm init reads at most this many times ``init_batch_size`` images looking for
decodable ones: a folder in which none of those decode is refused before training."""


def _init_batch(dataset: Dataset, config: RunConfig, failed: _FailedFiles) -> torch.Tensor:
    """The first ``init_batch_size`` decodable images of epoch 0's order, for the
    data-dependent ActNorm init: undecodable ones are passed over, further images read in
    their place (up to :data:`INIT_READ_LIMIT` times ``init_batch_size`` in all)."""
    t = config.train
    order = next(iter(GlobalBatchSampler(len(dataset), len(dataset), t.seed, epoch=0)))
    order = order[: INIT_READ_LIMIT * t.init_batch_size]
    kept: list[torch.Tensor] = []
    found = read = 0
    while found < t.init_batch_size and read < len(order):
        chunk = order[read: read + t.init_batch_size]
        loader = DataLoader(Subset(dataset, chunk), batch_size=len(chunk), num_workers=0,
                            generator=torch.Generator())
        images, _ = failed.keep(next(iter(loader)))
        kept.append(images)
        found, read = found + len(images), read + len(chunk)
    if found == 0:
        example = next(iter(failed.reasons.items()), None)
        seen = f" (e.g. {example[0]}: {example[1]})" if example else ""
        first = "" if read == len(dataset) else f"first {read} of the "
        raise TrainingError(f"none of the {first}{len(dataset)} image(s) of the training "
                            f"split (the validation split is held apart) could be "
                            f"decoded{seen}; check that the training folder holds readable "
                            "images.")
    return torch.cat(kept)[: t.init_batch_size]


def _check_validation_decodes(dataset: Dataset, failed: _FailedFiles) -> None:
    """Refuse, before any training, a validation split none of whose images decodes: its
    bits/dim would be NaN after every epoch and the model would never be registered. Reads
    the split in small chunks until an image decodes (the first one, usually)."""
    read = 0
    while read < len(dataset):
        part = range(read, min(read + 16, len(dataset)))
        loader = DataLoader(Subset(dataset, part), batch_size=len(part), num_workers=0,
                            generator=torch.Generator())
        if bool(failed.record(next(iter(loader)), "validation").any()):
            return
        read += len(part)
    raise TrainingError(
        f"none of the {len(dataset)} image(s) of the validation split (the share of the "
        f"folder held out for validation bits/dim and the normal reference) could be "
        f"decoded{failed.example('validation')}, so the model could not be validated or "
        "registered; replace or remove the undecodable files (the split is drawn again "
        "from what is left), or add readable images.")


def train(
    config: RunConfig,
    train_set: Dataset,
    val_set: Dataset | None = None,
    *,
    device: str | torch.device = "auto",
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    callback: Callback | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train a Glow by maximum likelihood on ``train_set`` (items as in ``anomaly_flow.data``).

    The loss is the mean bits/dim of each global batch's decodable images under
    uniform dequantisation. A step whose loss or gradient is not finite is skipped
    (no update; counted in ``skipped_steps``); ``max_nonfinite_steps`` of them in a row
    stop training with a :class:`TrainingError`. Undecodable images are left out of
    their batch, logged once each and listed in ``failed_files``.

    Args:
        config: Model and training configuration.
        train_set: Images of normal data; undecodable files are skipped and reported.
        val_set: Held-out images for per-epoch validation bits/dim and, after the last
            epoch, the model's normal reference (:func:`fit_reference`).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a torch device.
        checkpoint_dir: Where checkpoints go (every ``checkpoint_every`` steps and at the
            end); ``None`` writes none. A fresh run needs a folder without checkpoints.
        resume: Continue from the latest checkpoint in ``checkpoint_dir``, with the same
            configuration: the result equals that of an uninterrupted run.
        callback: Receives a :class:`TrainEvent` per step, epoch and checkpoint (rank 0).
            An exception it raises stops training (the checkpoints stay).
        progress: Show a progress bar on stderr; ``None`` shows it only on a terminal.

    Returns:
        The trained model and its figures.

    Raises:
        TrainingError: Empty training set, CUDA asked for but missing, a batch size not
            divisible by the process count, resume without a checkpoint (or a fresh run
            over old checkpoints), no decodable first images, a diverged model, or out of
            memory (CPU or GPU).
    """
    dev = resolve_device(device)
    if len(train_set) == 0:
        raise TrainingError("the training set is empty; put images of normal data in the "
                            "training folder.")
    check_batch_split(config)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    latest = latest_checkpoint(ckpt_dir) if ckpt_dir is not None else None
    if resume and latest is None:
        where = f"in {ckpt_dir}" if ckpt_dir is not None else "(no checkpoint_dir was given)"
        raise TrainingError(f"resume was asked for but there is no checkpoint {where}; "
                            "train without --resume to start afresh.")
    if not resume and latest is not None:
        raise TrainingError(f"the checkpoint folder {ckpt_dir} already holds a run "
                            f"({latest.name}); pass --resume to continue it, or choose an "
                            "empty folder.")

    dev = launch_device(dev)
    rank, world, joined = join_process_group(dev)
    together = world > 1  # a group, this call's or the caller's: leave training together
    if rank == 0 and ckpt_dir is not None:  # the one writer; another host's ids mean nothing
        removed = remove_leftovers(ckpt_dir, UNFINISHED_CHECKPOINT)
        if removed:
            logger.info("removed %d unfinished checkpoint folder(s) that a stopped run left "
                        "in %s", removed, ckpt_dir)
    try:
        with _convolutions_autotuned(dev):
            result = _train(config, train_set, val_set, dev, rank, world, ckpt_dir,
                            latest if resume else None, callback, progress)
        if together:  # rank 0 draws samples after the last collective; the others wait
            dist.barrier()  # for it, so every rank leaves training at the same step
        return result
    except RuntimeError as exc:
        if isinstance(exc, TrainingError):
            raise
        message = _out_of_memory(exc, config, dev)
        if message is None and together:  # another rank died: say so, and what is kept
            message = peer_lost(exc, _resume_advice(ckpt_dir if rank == 0 else None))
        if message is None:
            raise
        raise TrainingError(message) from None
    finally:
        if joined:  # whoever joined the group leaves it; a caller's own group stays
            dist.destroy_process_group()


def _resume_advice(ckpt_dir: Path | None) -> str | None:
    """What to do after another process of a training failed, for the rank that writes
    the checkpoints into ``ckpt_dir`` (None: another rank, or none are written; the
    general advice of :func:`~anomaly_flow.errors.peer_lost` then)."""
    if ckpt_dir is None:
        return None
    if (latest := latest_checkpoint(ckpt_dir)) is not None:
        return (f"mend that, then run the same command with --resume to go on from the last "
                f"checkpoint ({latest.name} in {ckpt_dir})")
    return "mend that, then run the same command again (no checkpoint was written yet)"


def _rate(images_per_sec: float) -> str:
    """A throughput for people: whole images/s from 10 up, two decimals below (a big
    model on a CPU trains at 0.31 images/s, which ``%.0f`` shows as 0)."""
    return f"{images_per_sec:.0f}" if images_per_sec >= 10 else f"{images_per_sec:.2f}"


@contextlib.contextmanager
def _convolutions_autotuned(device: torch.device) -> Iterator[None]:
    """On CUDA, cuDNN times its convolution algorithms for each new shape and keeps the
    fastest (``cudnn.benchmark``): training repeats a few fixed shapes for thousands of
    steps, and Glow's odd ones (a 3x3 convolution from 2 to 8 channels, the zero-initialised
    one down to 4 to 16) are where the default heuristic is weakest. Restored after; the
    validation and reference passes set their own deterministic numerics inside
    (:func:`anomaly_flow.scoring.numerics`)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def _out_of_memory(error: RuntimeError, config: RunConfig, device: torch.device) -> str | None:
    """What to tell a user whose training ran out of memory, or None when ``error`` is
    not torch's out-of-memory error (see :func:`anomaly_flow.scoring.out_of_memory`)."""
    ran_out = out_of_memory(error, device)
    if ran_out is None:
        return None
    m, t = config.model, config.train
    return (f"training ran {ran_out} with batch_size = "
            f"{t.batch_size}, init_batch_size = {t.init_batch_size}, image_size = "
            f"{m.image_size} and hidden_channels = {m.hidden_channels}; lower "
            "train.batch_size (--batch-size) or train.init_batch_size, or use a smaller "
            "model.image_size (the images are resized to it) or model.hidden_channels")


def _train(config: RunConfig, train_set: Dataset, val_set: Dataset | None,
           dev: torch.device, rank: int, world: int, ckpt_dir: Path | None,
           resume_from: Path | None, callback: Callback | None,
           progress: bool | None) -> TrainResult:
    """The training loop of :func:`train`, inside the process group."""
    t, m = config.train, config.model

    def emit(event: TrainEvent) -> None:
        if callback is not None and rank == 0:
            callback(event)

    with torch.random.fork_rng(devices=[]):  # the seed decides the weights, not the caller
        torch.default_generator.manual_seed(t.seed)  # built on the CPU; no GPU's generator
        model = Glow(m)
    model.to(dev)
    optimizer = _make_optimizer(model, config)
    failed = _FailedFiles(train_set, log=rank == 0, val_set=val_set)
    step, skipped_steps, nonfinite_run, last_bpd = 0, 0, 0, float("nan")
    epoch_sum, epoch_n = 0.0, 0  # the running epoch's bits/dim sum over its images
    history: list[dict[str, float]] = []
    if resume_from is not None:
        meta = load_checkpoint(resume_from, model, optimizer, config, TRAINING_STATE_KEYS)
        step, skipped_steps = meta["step"], meta["skipped_steps"]
        nonfinite_run, last_bpd = meta["nonfinite_run"], meta["train_bpd"]
        epoch_sum, epoch_n = meta["epoch_bpd_sum"], meta["epoch_images"]
        history = meta["history"]
        for name, reason in meta["failed_files"].items():
            failed.reasons[name] = reason  # already reported before the interruption
        logger.info("resuming from %s at step %d", resume_from, step)
        if rank == 0 and meta.get("processes", world) != world:  # older ones: unrecorded
            logger.warning("resuming with %d process(es) a training of %d wrote: the same "
                           "global batches, each split otherwise, so its float rounding "
                           "differs and the run will not match an uninterrupted one "
                           "exactly", world, meta["processes"])
    else:
        init = _init_batch(train_set, config, failed).to(dev)
        noise = _step_noise(t.seed, -1, tuple(init.shape), dev)
        model.initialize(preprocess(init, m.n_bits, noise))
    if val_set is not None and len(val_set):
        _check_validation_decodes(val_set, failed)
    use_bf16 = uses_bf16(config, dev)
    if t.bf16 and not use_bf16:
        logger.info("bf16 autocast is CUDA-only; training in float32 on %s", dev)
    model.set_coupling_autocast(torch.bfloat16 if use_bf16 else None)

    net: torch.nn.Module = model
    if world > 1:  # after the ActNorm init, so every rank starts from the same weights
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if t.compile:  # shares the parameters; everything but the training step stays eager
        net = torch.compile(net)

    steps_per_epoch = math.ceil(len(train_set) / t.batch_size)
    n_steps = total_steps(config, len(train_set))
    shape = (t.batch_size, m.in_channels, m.image_size, m.image_size)
    max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
    val_bpd = history[-1]["val_bpd"] if history else float("nan")
    imgs_per_sec, saved_step = 0.0, step if resume_from is not None else -1
    n_reference: int | None = None  # validation images of the normal reference, once fitted
    sampler = GlobalBatchSampler(len(train_set), t.batch_size, t.seed, 0, rank=rank,
                                 world=world)
    collate = functools.partial(_collate_share, image_shape=shape[1:])
    # each loader's own generator: a DataLoader draws its workers' base seed from the one
    # it is given, else from the caller's global random state, which train() leaves alone
    workers = worker_count(t.num_workers, steps_per_epoch)  # and the validation passes
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=workers,
                        collate_fn=collate, pin_memory=dev.type == "cuda",
                        persistent_workers=workers > 0, generator=torch.Generator(),
                        **loader_worker_options(workers))

    def checkpoint(epoch: int, at_step: int) -> None:
        nonlocal saved_step
        failed.gather(world)
        if rank == 0 and ckpt_dir is not None:
            extra = {"skipped_steps": skipped_steps, "nonfinite_run": nonfinite_run,
                     "train_bpd": last_bpd, "epoch_bpd_sum": epoch_sum,
                     "epoch_images": epoch_n, "history": history,
                     "failed_files": failed.reasons, "processes": world}
            path = save_checkpoint(ckpt_dir, model, optimizer, config, at_step, extra)
            emit(TrainEvent("checkpoint", at_step, epoch, path=path))
        saved_step = at_step

    def settle(done: _LaunchedStep, epoch: int, clock: _Throughput, bar: tqdm) -> None:
        """The host's side of a finished step: counts, metrics, its event, a checkpoint
        when one is due. Runs before the next step's update, so a checkpoint holds the
        weights and optimizer state of ``done.step`` exactly."""
        nonlocal skipped_steps, nonfinite_run, last_bpd, epoch_sum, epoch_n, imgs_per_sec
        batch_bpd, n_bad, n_images, grad_norm = done.read()
        if n_images == 0:
            logger.warning("step %d: no image of the batch could be decoded; no update",
                           done.step)
        elif not n_bad:
            nonfinite_run, last_bpd = 0, batch_bpd
            epoch_sum += batch_bpd * n_images
            epoch_n += int(n_images)
        else:
            skipped_steps += 1
            nonfinite_run += 1
            logger.warning("step %d: non-finite loss or gradient; step skipped", done.step)
            if nonfinite_run >= t.max_nonfinite_steps:
                raise TrainingError(
                    f"{nonfinite_run} non-finite losses in a row (step {done.step}); the "
                    "model diverged. Lower lr, raise warmup_steps or grad clipping, or "
                    "check the images.")
        clock.images += int(n_images)
        imgs_per_sec = clock.rate
        bar.set_postfix(bpd=f"{last_bpd:.3f}", img_s=_rate(imgs_per_sec), refresh=False)
        bar.update(1)
        with clock.pause():
            emit(TrainEvent("step", done.step, epoch, {
                "train_bpd": last_bpd, "lr": done.lr, "grad_norm": grad_norm,
                "images_per_sec": imgs_per_sec, "skipped_steps": float(skipped_steps)}))
            # The epoch's last step is checkpointed after validation, below.
            if done.step % t.checkpoint_every == 0 and done.step % steps_per_epoch:
                checkpoint(epoch, done.step)

    # Fused Adam skips a non-finite step on the device (it takes a `found_inf` flag, as
    # under GradScaler), so the host reads each step's figures one step late and never
    # waits for the device; Adamax reads them at once to decide on the update.
    deferred = _skips_on_device(optimizer)
    disable = True if rank != 0 else (None if progress is None else not progress)
    try:
        with tqdm(total=n_steps, initial=step, disable=disable, desc="train", unit="step",
                  dynamic_ncols=True) as bar:
            first_epoch = step // steps_per_epoch
            for epoch in range(first_epoch, t.epochs):
                model.train()
                sampler.set_epoch(epoch, start=step - epoch * steps_per_epoch)
                if step == epoch * steps_per_epoch:
                    epoch_sum, epoch_n = 0.0, 0
                clock = _Throughput()
                pending: _LaunchedStep | None = None
                for batch in worker_batches(loader):
                    raise_if_stopped()  # a stop whose signal landed where Python ignores it
                    images, ok = failed.keep(batch)
                    noise = _step_noise(t.seed, step, shape, dev)[rank::world][: len(ok)]
                    if not bool(ok.all()):  # a CPU mask: no device sync when all decoded
                        noise = noise[ok.to(dev)]
                    x = preprocess(images.to(dev, non_blocking=True), m.n_bits, noise)
                    if t.compile:  # one graph for every batch size: without the hint the
                        # shorter last batch of an epoch compiles a second (a third of the
                        # compile time on a CPU)
                        torch._dynamo.maybe_mark_dynamic(x, 0)
                    figures = _forward_backward(net, model, optimizer, x, world, max_norm)
                    launched = _LaunchedStep(step + 1, learning_rate(t, step), figures)
                    step += 1
                    if pending is not None:  # the previous step, before this one's update
                        # (a checkpoint written here already lists this batch's undecodable
                        # files: harmless, they are only not logged again after a resume)
                        settle(pending, epoch, clock, bar)
                    for group in optimizer.param_groups:
                        group["lr"] = launched.lr
                    if deferred:
                        optimizer.found_inf = launched.skip  # type: ignore[attr-defined]
                        optimizer.step()
                        pending = launched
                    else:
                        if not launched.skips():
                            optimizer.step()
                        settle(launched, epoch, clock, bar)
                if pending is not None:
                    settle(pending, epoch, clock, bar)
                if val_set is not None and len(val_set):
                    # after the last epoch the same pass fits the normal reference, before
                    # the final checkpoint, which keeps it
                    last = epoch == t.epochs - 1
                    val_bpd, n = _held_out_pass(model, val_set, t.batch_size, dev,
                                                workers, rank, world, reference=last,
                                                failed=failed)
                    if last:
                        n_reference = _checked_reference(n, rank)
                failed.gather(world)  # both splits' failures, once an epoch
                epoch_metrics = {"epoch": float(epoch + 1), "val_bpd": val_bpd,
                                 "train_bpd_epoch": epoch_sum / epoch_n if epoch_n else
                                 float("nan"), "images_per_sec_epoch": imgs_per_sec,
                                 "skipped_steps": float(skipped_steps),
                                 "failed_files": float(len(failed.reasons))}
                if n_reference is not None:
                    epoch_metrics["reference_images"] = float(n_reference)
                history.append(epoch_metrics)
                if rank == 0 and bar.disable:  # no bar (not a terminal): a line an epoch
                    # the first epoch a process runs pays its start-up (the first steps
                    # build the kernels), which a short epoch's rate shows
                    logger.info("epoch %d of %d: train %.4f bits/dim, validation %.4f, "
                                "%s images/s%s", epoch + 1, t.epochs,
                                epoch_metrics["train_bpd_epoch"], val_bpd, _rate(imgs_per_sec),
                                " (start-up included)" if epoch == first_epoch else "")
                emit(TrainEvent("epoch", step, epoch + 1, epoch_metrics))
                if step % t.checkpoint_every == 0:
                    checkpoint(epoch + 1, step)
    finally:
        # ends the persistent workers, also when an error leaves the traceback holding
        # this frame (the loader's only other holder: no closure takes it)
        del loader

    model.eval()
    model.set_coupling_autocast(None)
    if n_reference is None and val_set is not None and len(val_set) \
            and not model.has_image_reference:  # a finished run resumed from an older one
        _checked_reference(fit_reference(model, val_set, t.batch_size, dev, workers,
                                         rank, world), rank)
    if step != saved_step:
        checkpoint(t.epochs, step)
    final = (latest_checkpoint(ckpt_dir) if ckpt_dir is not None and rank == 0 else None)
    if failed.reasons and rank == 0:
        names = sorted(failed.reasons)
        more = len(names) - FAILED_FILES_LOGGED
        logger.warning("%d file(s) of the data folder could not be decoded and were "
                       "skipped: %s%s", len(names),
                       ", ".join(map(one_line, names[:FAILED_FILES_LOGGED])),
                       f", and {more} more" if more > 0 else "")
    samples, samples_skipped = np.zeros((0, 0), dtype=np.uint8), None
    if rank == 0:
        try:
            samples = sample_grid(model, 16, t.sample_temperature, t.seed)
        except SamplingError as exc:  # the model is still returned, to be judged by val_bpd
            samples_skipped = str(exc)
            logger.warning("no sample grid: %s", exc)
    return TrainResult(model=model, config=config, steps=step, val_bpd=val_bpd,
                       train_bpd=last_bpd, images_per_sec=imgs_per_sec,
                       skipped_steps=skipped_steps, failed_files=dict(failed.reasons),
                       samples=samples, checkpoint_dir=final, history=history,
                       samples_skipped=samples_skipped)


def _checked_reference(n: int, rank: int) -> int:
    """``n``, the validation images behind the normal reference, with a warning when
    they are too few for it to be reliable."""
    if rank == 0 and n < REFERENCE_MIN_IMAGES:
        logger.warning(
            "the normal reference (typicality, knn, pixel_knn, ensemble) rests on %d "
            "validation image(s); with fewer than %d its per-pixel spread is unreliable: "
            "raise val_fraction or add images", n, REFERENCE_MIN_IMAGES)
    return n


class _LaunchedStep:
    """A training step whose figures are on their way to the host.

    ``figures`` ``(4,)`` on the training device: the global batch's mean bits/dim, how
    many ranks saw a non-finite loss or gradient, the decodable images of the global
    batch, the gradient norm before clipping. From CUDA they are copied to pinned memory
    without waiting; :meth:`read` waits for that copy only.
    """

    def __init__(self, step: int, lr: float, figures: torch.Tensor) -> None:
        self.step, self.lr = step, lr
        # No update when any rank saw a non-finite value or no image was decoded.
        self.skip = ((figures[1] > 0) | (figures[2] == 0)).float()
        (self._host,), self._ready = to_host_async(figures)
        self._values: tuple[float, float, float, float] | None = None

    def read(self) -> tuple[float, float, float, float]:
        """(mean bits/dim, ranks with a non-finite value, images, gradient norm)."""
        if self._values is None:
            if self._ready is not None:
                self._ready.synchronize()
            bpd, n_bad, n_images, norm = self._host.tolist()
            self._values = (bpd, n_bad, n_images, norm)
        return self._values

    def skips(self) -> bool:
        """Whether this step must leave the weights alone (reads the figures)."""
        _, n_bad, n_images, _ = self.read()
        return n_bad > 0 or n_images == 0


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` honours a ``found_inf`` flag (the fused kernels)."""
    return all(group.get("fused") for group in optimizer.param_groups)


def _forward_backward(net: torch.nn.Module, model: Glow, optimizer: torch.optim.Optimizer,
                      x: torch.Tensor, world: int, max_norm: float) -> torch.Tensor:
    """Gradients of the global batch's mean bits/dim, clipped; nothing waits for them.

    ``x`` ``(b, C, H, W)`` is this rank's share (``b`` may be 0). DDP averages gradients
    over ranks, so each rank's sum is scaled by ``world / n`` with ``n`` the decodable
    images of the whole global batch: the gradient is that of the global mean,
    whatever share of it each rank could decode.

    Returns:
        ``(4,)`` on ``x``'s device, the same on every rank: the batch's mean bits/dim,
        how many ranks saw a non-finite loss or gradient, ``n``, and the gradient norm
        before clipping (see :class:`_LaunchedStep`).
    """
    n = torch.full((), float(len(x)), device=x.device)  # torch.tensor() would wait on CUDA
    if world > 1:
        dist.all_reduce(n)
    bpd = bits_per_dim(log_prob_from_output(net(x)), model.config)
    loss = bpd.sum() * (world / n.clamp_min(1.0))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
    flags = torch.stack([loss.detach() / world, bad.float()])
    if world > 1:
        dist.all_reduce(flags)  # the mean loss over ranks; how many ranks saw a NaN
    return torch.cat([flags, n[None], grad_norm[None].float()])
