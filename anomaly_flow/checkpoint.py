"""Training checkpoints on disk: writing them atomically, finding the newest, and
restoring a training from one.

A checkpoint is a folder ``step-N`` (``N`` the optimiser steps done) in a checkpoint
folder: the model as :meth:`Glow.save <anomaly_flow.glow.Glow.save>` writes it, the run's
``run_config.json``, the optimizer's tensors in ``optimizer.safetensors`` and, in
``state.json``, the step, the optimizer's groups and scalars and the training state
(:data:`TRAINING_STATE_KEYS`). The file :data:`CHECKPOINT_LATEST` beside them names the
newest; the :data:`CHECKPOINTS_KEPT` newest are kept.

Atomic writes: a checkpoint is written and flushed under a temporary name, renamed into
place, and only then named by the pointer (swapped with ``os.replace``), so a run killed
at any moment leaves the previous checkpoint usable and no ``step-N`` folder half
written. The temporary folders of a killed writer (:data:`UNFINISHED_CHECKPOINT`, with
its process id) are cleared when the next training starts.

Resume equivalence: a checkpoint holds all a training needs to go on as if it had never
stopped (weights, optimizer state, counters, history); the batch order and noise being
drawn from the seed and the step (:mod:`anomaly_flow.train`), a resumed run equals an
uninterrupted one. :func:`load_checkpoint` refuses another model configuration and a
change of :data:`RESUME_MUST_MATCH`, and warns of any other setting that changes the steps
a run takes (:func:`trajectory_changes`).

Under several processes only rank 0 writes checkpoints; this module knows nothing of
ranks or of the training loop. :class:`TrainingError` lives here, the lowest of the
training modules, since writing and loading checkpoints raise it as
:mod:`anomaly_flow.train` does; this module never imports that one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from anomaly_flow.config import ConfigError, RunConfig, TrainConfig, changed_fields
from anomaly_flow.glow import Glow, save_tensors

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


CHECKPOINT_LATEST = "latest"
"""Name of the file in a checkpoint folder that names the newest checkpoint."""

CHECKPOINTS_KEPT = 2
"""How many checkpoints a checkpoint folder keeps; older ones are deleted."""

_CHECKPOINT_NAME = re.compile(r"step-(\d{8,})")
_EXECUTION_ONLY = frozenset({"compile", "num_workers", "epochs", "checkpoint_every",
                             "init_batch_size"})
"""Training settings that change how fast a run goes, where it stops or what it keeps on
the way, not the steps it takes (the learning rate depends on the step alone, so a longer
run's first steps are a shorter one's; the ActNorm initialisation is in the checkpoint's
weights, so its batch size is past by a resume)."""
RESUME_MUST_MATCH = ("batch_size", "optimizer")
"""Training settings a resumed run cannot change: the step count of an epoch, and the
optimizer whose state the checkpoint holds."""
_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")
"""Optimizer settings that choose a kernel, not the arithmetic."""


def trajectory_changes(before: TrainConfig, after: TrainConfig) -> list[str]:
    """The training settings (sorted) that differ between ``before`` and ``after`` and
    change the steps a run takes: a resume with them does not continue the same run."""
    old = before.to_dict()
    return sorted(k for k, v in after.to_dict().items()
                  if old[k] != v and k not in _EXECUTION_ONLY)


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk (folders: where the OS allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint folder holds (from its ``step-N`` name), or None."""
    found = _CHECKPOINT_NAME.fullmatch(path.name)
    return int(found[1]) if found and path.is_dir() else None


def _checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first (only finished ones carry the
    ``step-N`` name: they are written under a temp name and renamed)."""
    if not folder.is_dir():
        return []
    found = [(s, p) for p in folder.iterdir() if (s := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


UNFINISHED_CHECKPOINT = re.compile(r"\.(?:tmp|old)-step-\d{8}-(?P<pid>\d+)")
"""The folders :func:`save_checkpoint` writes, or sets aside, before a rename; the
writer's process id as ``pid``."""


def save_checkpoint(folder: Path, model: Glow, optimizer: torch.optim.Optimizer,
                    config: RunConfig, step: int, extra: dict[str, Any]) -> Path:
    """Write ``folder/step-N`` and point ``folder/latest`` at it; keep the two newest.

    Atomic: everything is written and flushed under a temp name, then renamed into
    place, then the pointer is swapped with ``os.replace``. A run killed at any moment
    leaves the previous checkpoint usable (:func:`latest_checkpoint` also falls back to
    the newest complete folder should the pointer name a missing one).
    """
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-step-{step:08d}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        _write_checkpoint(tmp, model, optimizer, config, step, extra)
        if final.exists():  # same step written before (an earlier attempt): set it aside
            stale = folder / f".old-{final.name}-{os.getpid()}"
            final.rename(stale)
            tmp.rename(final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            tmp.rename(final)
        pointer = folder / f".{CHECKPOINT_LATEST}.tmp"
        pointer.write_text(final.name)
        _fsync(pointer)
        pointer.replace(folder / CHECKPOINT_LATEST)
        _fsync(folder)
    except OSError as error:  # a full disk, a folder taken away: nothing half-written kept
        shutil.rmtree(tmp, ignore_errors=True)
        kept = None
        with contextlib.suppress(OSError):
            kept = latest_checkpoint(folder) if folder.is_dir() else None
        raise TrainingError(_unwritable_checkpoint(final, error, kept)) from error
    for old in _checkpoints(folder)[:-CHECKPOINTS_KEPT]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _unwritable_checkpoint(path: Path, error: OSError, kept: Path | None) -> str:
    """What to tell a user whose checkpoint ``path`` could not be written; ``kept`` is the
    latest complete checkpoint left."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space there"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make that folder writable"
    else:
        fix = "check that folder"
    left = (f"The latest complete checkpoint, {kept.name}, is intact" if kept is not None
            else "No checkpoint was written before it")
    if kept == path:  # the folder is whole: what failed came after it (the pointer)
        left = f"The checkpoint {kept.name} itself is complete and --resume finds it"
    # the file the system refused, where it is beside the checkpoint, not in it (the
    # pointer, say): a file in its temporary folder is gone with that folder
    where = Path(os.fsdecode(error.filename2 or error.filename or path))
    shown = (f" ({where})" if where.parent == path.parent
             and not where.name.startswith((".tmp-", path.name)) else "")
    if kept is None:  # --resume would find nothing to go on from
        return (f"could not write the checkpoint {path}: {error.strerror or error}{shown}. "
                f"{left}, so there is nothing to resume; {fix}, then run the same command "
                "again")
    return (f"could not write the checkpoint {path}: {error.strerror or error}{shown}. {left}; "
            f"{fix}, then run the same command with --resume (a training started afresh "
            "with another --mlruns DIR would keep its checkpoints there, not resume these)")


def _write_checkpoint(tmp: Path, model: Glow, optimizer: torch.optim.Optimizer,
                      config: RunConfig, step: int, extra: dict[str, Any]) -> None:
    """A checkpoint's files, written and flushed into the folder ``tmp``."""
    model.save(tmp)
    (tmp / "run_config.json").write_text(config.to_json())
    opt_state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in opt_state["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    save_tensors(tensors, tmp / "optimizer.safetensors")
    meta = {"step": step, "param_groups": opt_state["param_groups"],
            "optimizer_scalars": scalars, **extra}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    for path in tmp.iterdir():
        _fsync(path)
    _fsync(tmp)


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder`` (the one ``latest`` names), or None."""
    pointer = folder / CHECKPOINT_LATEST
    if pointer.is_file():
        # a damaged pointer (bytes that are not text, a path out of the folder) names no
        # checkpoint: fall back to the newest complete one, as for a missing folder
        name = pointer.read_bytes().decode("utf-8", errors="replace").strip()
        path = folder / name
        if _CHECKPOINT_NAME.fullmatch(name) and (path / "state.json").is_file():
            return path
    complete = [p for p in _checkpoints(folder) if (p / "state.json").is_file()]
    return complete[-1] if complete else None


def _damaged_checkpoint(path: Path, error: Exception) -> str:
    return (f"the checkpoint {path} is damaged or incomplete ({error}); delete that folder "
            "to resume from the checkpoint before it, or train afresh (--restart instead "
            "of --resume)")


TRAINING_STATE_KEYS = ("skipped_steps", "nonfinite_run", "train_bpd", "epoch_bpd_sum",
                        "epoch_images", "history", "failed_files")
"""What a checkpoint's ``state.json`` holds, beside the step and the optimizer's groups,
for a training to resume from it."""


def load_checkpoint(path: Path, model: Glow, optimizer: torch.optim.Optimizer,
                     config: RunConfig, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Restore weights and optimizer state in place; return the saved training state,
    which must hold ``required`` beside the step and the optimizer's groups."""
    try:
        saved_json = json.loads((path / "run_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise TrainingError(_damaged_checkpoint(path, exc)) from None
    try:
        saved = RunConfig.from_dict(saved_json)
    except ConfigError as exc:  # valid JSON, but not a configuration
        raise TrainingError(_damaged_checkpoint(path, exc)) from None
    if differ := changed_fields(saved.model, config.model, "model"):
        raise TrainingError(
            f"the checkpoint {path} is of another model configuration than the one given "
            f"({'; '.join(differ)}); resume with the run's own configuration or start "
            "afresh in an empty checkpoint folder.")
    if refused := changed_fields(saved.train, config.train, "train", RESUME_MUST_MATCH):
        raise TrainingError(
            f"cannot resume from the checkpoint {path}: {'; '.join(refused)}; resume with "
            "the same values or start afresh in an empty checkpoint folder.")
    if changed := trajectory_changes(saved.train, config.train):
        logger.warning("resuming with changed training settings %s; the run will not "
                       "match an uninterrupted one", changed)
    try:
        weights = load_file(str(path / "model.safetensors"), device=str(model.device))
        meta = json.loads((path / "state.json").read_text())
        moments = load_file(str(path / "optimizer.safetensors"))
    except (SafetensorError, OSError, ValueError) as exc:  # JSON errors are ValueErrors
        raise TrainingError(_damaged_checkpoint(path, exc)) from None
    missing = [key for key in ("step", "param_groups", *required)
               if not isinstance(meta, dict) or key not in meta]
    if missing:  # valid JSON, but not what save_checkpoint writes
        raise TrainingError(_damaged_checkpoint(
            path, ValueError(f"state.json lacks {', '.join(missing)}")))
    model.load_state_dict(weights)
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in moments.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = tensor
    for name, value in meta.get("optimizer_scalars", {}).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    # JSON turned tuples (Adam's betas) into lists; give them back their type. Which
    # kernel runs the update (fused, foreach) is this optimizer's choice, not the
    # checkpoint's: a checkpoint of per-tensor Adam (older versions) resumes fused, with
    # the same state and the same update up to float rounding.
    how = {k: optimizer.param_groups[0][k] for k in _IMPLEMENTATION_KEYS
           if k in optimizer.param_groups[0]}
    groups = [{**{k: tuple(v) if isinstance(v, list) and k != "params" else v
                  for k, v in group.items()}, **how} for group in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return meta
