"""Training a Glow on images of normal data: a library function with a metrics callback.

Nothing here knows MLflow or click: :func:`train` reports through ``callback`` and
returns a :class:`TrainResult`; the tracking module and the CLI sit on top.

Determinism: the image order of every epoch is a permutation drawn from
``(seed, epoch)`` and the dequantisation noise of every step from ``(seed, step)``,
so a resumed run sees exactly the batches and noise of an uninterrupted one, and a
DDP run (each rank taking its share of the same global batch) sees those of a
single-process run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm.auto import tqdm

from anomaly_flow.config import RunConfig
from anomaly_flow.data import ImageFolderDataset, find_images, fingerprint, split_train_val
from anomaly_flow.glow import Glow, bits_per_dim, log_prob_from_output, postprocess, preprocess

logger = logging.getLogger(__name__)

CHECKPOINT_LATEST = "latest"


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class TrainEvent:
    """What the callback receives.

    ``kind`` is ``"step"`` after every optimiser step (train bits/dim, lr, images/s,
    grad norm, skipped steps), ``"epoch"`` after every epoch (validation bits/dim,
    epoch means) and ``"checkpoint"`` when a checkpoint was written (``path`` set).
    """

    kind: Literal["step", "epoch", "checkpoint"]
    step: int
    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)
    path: Path | None = None


Callback = Callable[[TrainEvent], None]


@dataclass
class TrainResult:
    """The outcome of :func:`train`; ``model`` is on the training device, in eval mode."""

    model: Glow
    config: RunConfig
    steps: int
    val_bpd: float
    train_bpd: float
    images_per_sec: float
    skipped_steps: int
    failed_files: dict[int, str]
    samples: np.ndarray  # uint8 (H, W) or (H, W, 3) grid of samples
    checkpoint_dir: Path | None
    history: list[dict[str, float]]


@dataclass(frozen=True)
class FolderData:
    """Training and validation sets drawn from one image folder."""

    train: Dataset
    val: Dataset | None
    paths: list[Path]
    fingerprint: str


def folder_datasets(folder: str | Path, config: RunConfig) -> FolderData:
    """Find the images under ``folder`` and split them reproducibly (seed, val_fraction)."""
    root = Path(folder)
    paths = find_images(root)
    train_idx, val_idx = split_train_val(len(paths), config.train.val_fraction,
                                         config.train.seed)
    dataset = ImageFolderDataset(paths, config.model.mode, config.model.image_size)
    val = Subset(dataset, val_idx.tolist()) if len(val_idx) else None
    return FolderData(Subset(dataset, train_idx.tolist()), val, paths,
                      fingerprint(paths, root))


class GlobalBatchSampler(Sampler[list[int]]):
    """Batches of a per-epoch permutation; under DDP each rank takes every world-th
    index of the same global batch. ``start`` skips batches already done (resume)."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.start, self.rank, self.world = start, rank, world

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size) - self.start

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        for b in range(self.start, math.ceil(self.n / self.batch_size)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield batch[self.rank :: self.world]


def _step_noise(seed: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step + 1)
    return torch.rand(shape, generator=gen)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but CUDA is not available on this "
                            "machine; use --device cpu or auto.")
    return torch.device(device)


def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun set up, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _batch_images(batch: Any, failed: dict[int, str]) -> torch.Tensor:
    """Keep the decoded images of a collated batch; remember the files that failed."""
    images, ok, errors, index = batch
    if not bool(ok.all()):
        for i in torch.nonzero(~ok).flatten().tolist():
            idx = int(index[i])
            if idx not in failed:
                failed[idx] = errors[i]
                logger.warning("skipping an undecodable training image: %s", errors[i])
    return images[ok], ok


@torch.no_grad()
def evaluate_bpd(model: Glow, dataset: Dataset, batch_size: int, device: torch.device,
                 num_workers: int = 0) -> float:
    """Mean bits/dim (deterministic, bin centres) over the decodable images of a set."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in loader:
        images = batch[0][batch[1]].to(device)
        if len(images):
            total += model.bpd(preprocess(images, model.config.n_bits)).double().sum()
            count += len(images)
    return float(total) / max(count, 1) if count else float("nan")


def sample_grid(model: Glow, n: int = 16, temperature: float = 0.7) -> np.ndarray:
    """A square grid of ``n`` samples as a uint8 image (H, W) or (H, W, 3)."""
    model.eval()
    side = math.isqrt(n)
    images = postprocess(model.sample(side * side, temperature), model.config.n_bits).cpu()
    c, h, w = images.shape[1:]
    grid = images.view(side, side, c, h, w).permute(0, 3, 1, 4, 2).reshape(side * h, side * w, c)
    return grid[..., 0].numpy() if c == 1 else grid.numpy()


# --------------------------------------------------------------------- checkpoints


def save_checkpoint(folder: Path, model: Glow, optimizer: torch.optim.Optimizer,
                    config: RunConfig, step: int, extra: dict[str, Any]) -> Path:
    """Write ``folder/step-N`` atomically (a temp folder renamed into place), point
    ``folder/latest`` at it, and keep the two newest."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    (tmp / "run_config.json").write_text(config.to_json())
    opt_state = optimizer.state_dict()
    tensors = {f"{pid}.{key}": value.detach().cpu().contiguous()
               for pid, state in opt_state["state"].items() for key, value in state.items()}
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {"step": step, "param_groups": opt_state["param_groups"], **extra}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    pointer = folder / f".{CHECKPOINT_LATEST}.tmp"
    pointer.write_text(final.name)
    pointer.replace(folder / CHECKPOINT_LATEST)
    for old in sorted(folder.glob("step-*"))[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder``, or None."""
    pointer = folder / CHECKPOINT_LATEST
    if not pointer.is_file():
        return None
    path = folder / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def _load_checkpoint(path: Path, model: Glow, optimizer: torch.optim.Optimizer,
                     device: torch.device) -> dict[str, Any]:
    loaded = Glow.load(path, device)
    model.load_state_dict(loaded.state_dict())
    meta = json.loads((path / "state.json").read_text())
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(str(path / "optimizer.safetensors")).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


# ------------------------------------------------------------------------ training


def _make_optimizer(model: Glow, config: RunConfig) -> torch.optim.Optimizer:
    cls = torch.optim.Adamax if config.train.optimizer == "adamax" else torch.optim.Adam
    return cls(model.parameters(), lr=config.train.lr)


def _init_batch(dataset: Dataset, config: RunConfig, failed: dict[int, str]) -> torch.Tensor:
    """The first images of epoch 0's order, for the data-dependent ActNorm init."""
    t = config.train
    order = next(iter(GlobalBatchSampler(len(dataset), len(dataset), t.seed, epoch=0)))
    loader = DataLoader(Subset(dataset, order[: t.init_batch_size]),
                        batch_size=t.init_batch_size, num_workers=0)
    images, _ = _batch_images(next(iter(loader)), failed)
    if len(images) == 0:
        raise TrainingError("none of the first training images could be decoded; check the "
                            "training folder holds readable images.")
    return images


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

    Args:
        config: Model and training configuration.
        train_set: Images of normal data; undecodable files are skipped and reported.
        val_set: Held-out images for per-epoch validation bits/dim.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a torch device.
        checkpoint_dir: Where checkpoints go (every ``checkpoint_every`` steps and at the
            end); ``None`` writes none.
        resume: Continue from the latest checkpoint in ``checkpoint_dir``.
        callback: Receives a :class:`TrainEvent` per step, epoch and checkpoint (rank 0).
        progress: Show a progress bar; ``None`` shows it only on a terminal.

    Returns:
        The trained model and its figures.
    """
    t, m = config.train, config.model
    rank, world = _distributed()
    dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if len(train_set) == 0:
        raise TrainingError("the training set is empty; put images of normal data in the "
                            "training folder.")
    if t.batch_size % world:
        raise TrainingError(f"batch_size {t.batch_size} is not divisible by the {world} "
                            "processes; pick a multiple of the process count.")
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    emit = callback if (callback is not None and rank == 0) else (lambda event: None)

    torch.manual_seed(t.seed)
    model = Glow(m).to(dev)
    optimizer = _make_optimizer(model, config)
    failed: dict[int, str] = {}
    step, skipped_steps = 0, 0
    history: list[dict[str, float]] = []
    latest = latest_checkpoint(ckpt_dir) if (resume and ckpt_dir is not None) else None
    if resume and latest is None:
        raise TrainingError(f"--resume found no checkpoint in {ckpt_dir}; train without "
                            "--resume to start afresh.")
    if latest is not None:
        meta = _load_checkpoint(latest, model, optimizer, dev)
        step, skipped_steps = meta["step"], meta.get("skipped_steps", 0)
        history = meta.get("history", [])
        failed = {int(k): v for k, v in meta.get("failed_files", {}).items()}
        logger.info("resuming from %s at step %d", latest, step)
    else:
        init = _init_batch(train_set, config, failed).to(dev)
        noise = _step_noise(t.seed, -1, tuple(init.shape)).to(dev)
        model.initialize(preprocess(init, m.n_bits, noise))
    if t.bf16 and dev.type == "cuda":
        model.set_coupling_autocast(torch.bfloat16)

    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)

    steps_per_epoch = math.ceil(len(train_set) / t.batch_size)
    total_steps = steps_per_epoch * t.epochs
    shape = (t.batch_size, m.in_channels, m.image_size, m.image_size)
    nonfinite_run, last_bpd, val_bpd, imgs_per_sec = 0, float("nan"), float("nan"), 0.0
    bar = tqdm(total=total_steps, initial=step, disable=(not progress) if progress is not None
               else None, desc="train", unit="step", dynamic_ncols=True)
    start_epoch = step // steps_per_epoch
    for epoch in range(start_epoch, t.epochs):
        model.train()
        sampler = GlobalBatchSampler(len(train_set), t.batch_size, t.seed, epoch,
                                     start=step - epoch * steps_per_epoch, rank=rank,
                                     world=world)
        loader = DataLoader(train_set, batch_sampler=sampler, num_workers=t.num_workers,
                            pin_memory=dev.type == "cuda",
                            persistent_workers=False)
        epoch_sum, epoch_n, epoch_time, epoch_images = 0.0, 0, 0.0, 0
        for batch in loader:
            tick = time.perf_counter()
            images, ok = _batch_images(batch, failed)
            noise = _step_noise(t.seed, step, shape)[rank :: world][: len(ok)][ok]
            x = preprocess(images.to(dev, non_blocking=True), m.n_bits, noise.to(dev))
            for group in optimizer.param_groups:
                group["lr"] = t.lr * min(1.0, (step + 1) / max(t.warmup_steps, 1))
            loss = _bpd_loss(net, model, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
            finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
            if world > 1:
                finite = finite.to(torch.int32)
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            step += 1
            if bool(finite):
                optimizer.step()
                nonfinite_run = 0
                last_bpd = float(loss.detach())
                epoch_sum += last_bpd * len(images)
                epoch_n += len(images)
            else:
                skipped_steps += 1
                nonfinite_run += 1
                logger.warning("step %d: non-finite loss or gradient; step skipped", step)
                if nonfinite_run >= t.max_nonfinite_steps:
                    bar.close()
                    raise TrainingError(
                        f"{nonfinite_run} non-finite losses in a row (step {step}); the "
                        "model diverged. Lower lr, raise warmup_steps or grad clipping, "
                        "or check the images.")
            elapsed = time.perf_counter() - tick
            epoch_time += elapsed
            epoch_images += len(images) * world
            imgs_per_sec = epoch_images / max(epoch_time, 1e-9)
            bar.update(1)
            bar.set_postfix(bpd=f"{last_bpd:.3f}", img_s=f"{imgs_per_sec:.0f}")
            emit(TrainEvent("step", step, epoch, {
                "train_bpd": last_bpd, "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm), "images_per_sec": imgs_per_sec,
                "skipped_steps": float(skipped_steps)}))
            if ckpt_dir is not None and step % t.checkpoint_every == 0 and rank == 0:
                extra = {"skipped_steps": skipped_steps, "history": history,
                         "failed_files": failed}
                path = save_checkpoint(ckpt_dir, model, optimizer, config, step, extra)
                emit(TrainEvent("checkpoint", step, epoch, path=path))
        if val_set is not None and rank == 0:
            val_bpd = evaluate_bpd(model, val_set, t.batch_size, dev, t.num_workers)
            model.train()
        epoch_metrics = {"epoch": float(epoch + 1), "val_bpd": val_bpd,
                         "train_bpd_epoch": epoch_sum / max(epoch_n, 1) if epoch_n else
                         float("nan"), "images_per_sec_epoch": imgs_per_sec,
                         "skipped_steps": float(skipped_steps),
                         "failed_files": float(len(failed))}
        history.append(epoch_metrics)
        emit(TrainEvent("epoch", step, epoch + 1, epoch_metrics))
    bar.close()

    model.eval()
    model.set_coupling_autocast(None)
    checkpoint = None
    if ckpt_dir is not None and rank == 0:
        extra = {"skipped_steps": skipped_steps, "history": history, "failed_files": failed}
        checkpoint = save_checkpoint(ckpt_dir, model, optimizer, config, step, extra)
        emit(TrainEvent("checkpoint", step, t.epochs, path=checkpoint))
    if failed:
        logger.warning("%d training file(s) could not be decoded and were skipped",
                       len(failed))
    samples = sample_grid(model, 16, t.sample_temperature) if rank == 0 else np.zeros((0, 0))
    return TrainResult(model=model, config=config, steps=step, val_bpd=val_bpd,
                       train_bpd=last_bpd, images_per_sec=imgs_per_sec,
                       skipped_steps=skipped_steps, failed_files=failed, samples=samples,
                       checkpoint_dir=checkpoint, history=history)


def _bpd_loss(net: torch.nn.Module, model: Glow, x: torch.Tensor) -> torch.Tensor:
    """Mean bits/dim of a batch through ``net`` (the model, or its DDP wrapper)."""
    return bits_per_dim(log_prob_from_output(net(x)), model.config).mean()
