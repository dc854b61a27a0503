"""A training run in MLflow: :func:`train_and_register`.

Checkpoints and ``--resume``: checkpoints of model ``NAME`` go to
``<mlruns>/checkpoints/<NAME>/`` (``<mlruns>`` is ``./mlruns`` or ``--mlruns DIR``, also
when ``MLFLOW_TRACKING_URI`` points elsewhere: they are local files for resuming, not
results). Beside them, ``run.json`` records the MLflow run, the data fingerprint and the
configuration. A fresh training of ``NAME`` clears that folder; ``resume=True`` continues
from its latest checkpoint, logging into the same MLflow run when the store still has it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from matplotlib.figure import Figure
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from anomaly_flow import file_lock
from anomaly_flow import fingerprint as folder_digest
from anomaly_flow.checkpoint import (
    RESUME_MUST_MATCH,
    TrainingError,
    checkpoint_step,
    latest_checkpoint,
    trajectory_changes,
)
from anomaly_flow.config import RunConfig, changed_fields
from anomaly_flow.data import DataError, display_path
from anomaly_flow.distributed import (
    gathered,
    join_launch_group,
    launch_rank,
    leave_launch_group,
    share_verdict,
    world_size,
)
from anomaly_flow.errors import alike_on_every_process, first_line, one_line, raised_alike
from anomaly_flow.folders import find_images, replace_text
from anomaly_flow.stopping import stops_deferred
from anomaly_flow.survey import describe_shapes
from anomaly_flow.tracking.models import (
    CANDIDATE,
    check_not_foreign,
    log_model,
    register_model,
    registered_from_run,
    set_alias,
)
from anomaly_flow.tracking.runs import Run, end_if_running, flatten, git_commit, start_run
from anomaly_flow.tracking.store import (
    CHECKPOINTS_DIR,
    check_store_folder,
    configure,
    mlruns_dir,
    moved_location,
    quiet_mlflow,
    redacted,
    require_writable_store,
    safe_name,
)
from anomaly_flow.train import (
    FolderData,
    TrainEvent,
    check_batch_split,
    folder_datasets,
    resolve_device,
    total_steps,
    train,
    uses_bf16,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

RUN_STATE_FILE = "run.json"
MAX_NAME_LENGTH = 200
"""Longest model name: it names a checkpoint folder, and file names stop at 255 bytes."""
TRAINING_IMAGES_FILE = "training_images.sha256"
"""Run artifact: the SHA-256 content digest of each image of the training folder (both
splits), one per line."""
_STEP_METRICS = ("train_bpd", "lr", "grad_norm", "images_per_sec", "skipped_steps")
_RESUME_MUST_MATCH = (*RESUME_MUST_MATCH, "seed", "val_fraction")  # the split too


@dataclass(frozen=True)
class TrainOutcome:
    """What a training run produced.

    Attributes:
        run_id: The MLflow run.
        model_uri: ``models:/NAME/VERSION`` when registered, else the logged model's URI.
        version: The registered version, or None when the model was not registered.
        val_bpd: Validation bits/dim of the final model (NaN when there was none).
        message: One line for the user: what was registered, or why nothing was.
    """

    run_id: str
    model_uri: str
    version: str | None
    val_bpd: float
    message: str


def checkpoint_dir(name: str, mlruns: str | Path | None = None) -> Path:
    """Where the checkpoints of model ``name`` live: ``<mlruns>/checkpoints/<name>``."""
    return mlruns_dir(mlruns) / CHECKPOINTS_DIR / safe_name(name)


class _MetricLogger:
    """The training callback: per-step and per-epoch metrics into the run (batched).

    A resumed training replays the steps between its checkpoint and the interruption;
    those the run already holds (up to ``logged_steps`` and ``logged_epochs``, the last
    steps with a per-step and a per-epoch metric) are not logged twice, so each metric
    keeps one value per step.

    The run's buffer is flushed before every checkpoint (at each step that is a multiple
    of ``checkpoint_every`` and at each epoch's end, the only places one is written): a
    store that fails then stops the training before the checkpoint, so the store holds
    every step up to the checkpoint a resume starts from, and the replay fills in the rest.
    """

    def __init__(self, run: Run, checkpoint_every: int, logged_steps: int = 0,
                 logged_epochs: int = 0) -> None:
        self.run, self.checkpoint_every = run, checkpoint_every
        self.logged_steps, self.logged_epochs = logged_steps, logged_epochs

    @classmethod
    def resuming(cls, run: Run, checkpoint_every: int) -> _MetricLogger:
        """A logger for a run reopened by a resumed training."""
        client = mlflow.MlflowClient()

        def last(key: str) -> int:
            return max((m.step for m in client.get_metric_history(run.run_id, key)), default=0)

        return cls(run, checkpoint_every, last("train_bpd"), last("val_bpd"))

    def has_value(self, key: str, step: int) -> bool:
        """Whether the run's store already holds metric ``key`` at ``step``."""
        self.run.flush()
        history = mlflow.MlflowClient().get_metric_history(self.run.run_id, key)
        return any(m.step == step for m in history)

    def __call__(self, event: TrainEvent) -> None:
        if event.kind == "step":
            if event.step > self.logged_steps:
                self.run.log_metrics({k: v for k, v in event.metrics.items()
                                      if k in _STEP_METRICS}, step=event.step)
            if event.step % self.checkpoint_every == 0:
                self.run.flush()
        elif event.kind == "epoch":
            if event.step > self.logged_epochs:
                # skipped_steps is already a per-step metric at this step.
                self.run.log_metrics({k: v for k, v in event.metrics.items()
                                      if k != "skipped_steps"}, step=event.step)
            self.run.flush()
        elif event.kind == "checkpoint" and event.path is not None:
            self.run.set_tags({"last_checkpoint": str(event.path)})


def _read_run_state(folder: Path) -> tuple[dict[str, Any], RunConfig]:
    """The record of the training whose checkpoints ``folder`` holds, and its
    configuration (what a resume is compared with)."""
    path = folder / RUN_STATE_FILE
    if not path.is_file():
        if not (folder.is_dir() and any(folder.iterdir())):
            raise TrainingError(f"--resume found no earlier training in {folder}: nothing of "
                                "this name was trained in this store; train without --resume "
                                "to start (or pass the --mlruns DIR used before).")
        raise TrainingError(f"--resume found no earlier training in {folder}; train with "
                            "--restart instead to start afresh (or pass the --mlruns DIR used "
                            "before).")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise ValueError(f"a JSON object was expected, got {type(state).__name__}")
        config = RunConfig.from_dict(state["config"])
    except OSError as exc:
        raise TrainingError(f"cannot read {path} ({exc.strerror or exc}); check its "
                            "permissions, or train with --restart instead of --resume (it "
                            "deletes the checkpoints).") from None
    except (ValueError, KeyError, TypeError) as exc:  # JSON, UTF-8 and ConfigError too
        what = (f"no {exc}" if isinstance(exc, KeyError) else "not UTF-8 text"
                if isinstance(exc, UnicodeDecodeError) else str(exc))
        raise TrainingError(f"{path} is damaged ({what}); train with --restart instead of "
                            "--resume (a fresh training clears it).") from None
    return state, config


def _write_record(folder: Path, record: dict[str, Any]) -> None:
    """Replace the training record ``folder/run.json`` with ``record`` at once (written
    beside it, then renamed over it): a write cut short by a full disk or a kill leaves
    the record before it, which --resume still reads, not an empty file it refuses.

    Raises:
        TrainingError: The record could not be written.
    """
    path = folder / RUN_STATE_FILE
    try:
        replace_text(path, json.dumps(record, indent=2))
    except OSError as exc:
        raise TrainingError(f"could not write the training record {path}: "
                            f"{exc.strerror or exc}; free space there or make it writable, "
                            "then run the same command again (with --resume where "
                            "checkpoints were written)") from None


def _running_message(handle: Any, name: str, path: Path) -> str:
    """What to tell a training of ``name`` whose lock ``path`` (open as ``handle``)
    another process holds."""
    return (f"another training of {name!r} is running ({file_lock.holder(handle)}, holding "
            f"{path}); wait for it to end, or train under another --name")


def _check_not_running(ckpt: Path, name: str) -> None:
    """Refuse, as :func:`_training_lock` will, while another process trains ``name``:
    checked before the checkpoints, which are then that training's, not a stopped one's.
    Nothing is held after it; where locks cannot be taken nothing is said.

    Raises:
        TrainingError: Another process holds the name's lock.
    """
    if not file_lock.SUPPORTED:
        return
    path = ckpt.parent / f".{ckpt.name}.lock"
    try:
        handle = open(path)  # noqa: SIM115 (closed below)
    except OSError:  # no lock file: no training of the name ever ran here
        return
    with handle:
        try:
            held = file_lock.lock(handle)
        except OSError:  # no locks on this file system: the lock itself will say so
            return
        if not held:
            raise TrainingError(_running_message(handle, name, path))
        file_lock.unlock(handle)


@contextlib.contextmanager
def _training_lock(ckpt: Path, name: str) -> Iterator[bool]:
    """Hold ``<checkpoints>/.<folder>.lock`` while training ``name``: a second training of
    the same name (another terminal, a scheduler's retry) would delete or take over the
    checkpoints of the first. Where there is no ``flock`` (Windows) nothing is held.
    Yields whether the lock is held."""
    if ckpt.exists() and not ckpt.is_dir():
        raise TrainingError(f"{ckpt} is a file, where the checkpoints of {name!r} go; move "
                            "it away, or train under another --name")
    if not file_lock.SUPPORTED:
        yield False
        return
    path = ckpt.parent / f".{ckpt.name}.lock"
    try:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")  # noqa: SIM115 (held until the training ends)
    except OSError as exc:
        raise TrainingError(f"cannot use the checkpoint folder {ckpt.parent} ({exc.strerror}); "
                            "check --mlruns and its permissions") from None
    with handle:
        try:
            held = file_lock.lock(handle)
        except OSError as exc:  # no locks on this file system (NFS without lockd, FUSE)
            logger.warning("cannot lock %s (%s), so nothing stops a second training of %r "
                           "from using its checkpoints meanwhile", path, exc.strerror, name)
            yield False
            return
        if not held:
            raise TrainingError(_running_message(handle, name, path))
        try:
            file_lock.claim(handle)
        except OSError as exc:  # a full disk: no checkpoint would fit either
            raise TrainingError(f"cannot write in the checkpoint folder {ckpt.parent} "
                                f"({exc.strerror}); free space there, or train with another "
                                "--mlruns DIR (checkpoints go under it)") from None
        try:
            yield True
        finally:
            file_lock.unlock(handle)


def _check_resumable(state: dict[str, Any], before: RunConfig, config: RunConfig,
                     fingerprint: str, data: Path) -> None:
    """Refuse a resume that would not continue the same training (``before``: the
    configuration the checkpoint's training ran with; ``data``: the folder given now)."""
    _check_same_settings(before, config)
    if state.get("data_fingerprint") != fingerprint:
        recorded = state.get("data_folder")
        given = display_path(data.resolve())
        if recorded and recorded != given:  # another folder, not the same one changed
            raise TrainingError(
                f"the checkpoint's training ran on the images of {recorded}, and {given} "
                "holds other images, so the train/validation split would change; resume "
                f"with {recorded}, or train afresh with --restart instead of --resume.")
        raise TrainingError("the images in the training folder changed since the checkpoint "
                            "(different fingerprint), so the train/validation split would "
                            "change; train afresh with --restart instead of --resume.")


def _check_same_settings(before: RunConfig, config: RunConfig) -> None:
    """Refuse a resume with another model configuration or another value of a setting
    that must match (``before``: the configuration the checkpoint's training ran with)."""
    if differ := changed_fields(before.model, config.model, "model"):
        raise TrainingError(f"the model configuration differs from the checkpoint's "
                            f"({'; '.join(differ)}); resume with the same preset or config "
                            "file, or train afresh with --restart instead of --resume.")
    changed = changed_fields(before.train, config.train, "train", _RESUME_MUST_MATCH)
    if changed:
        raise TrainingError(f"cannot resume: {'; '.join(changed)} in the checkpoint's run; "
                            "resume with the same values, or train afresh with --restart "
                            "instead of --resume.")


def _check_owner(state: dict[str, Any], name: str, ckpt: Path) -> None:
    """Refuse checkpoints of another model whose name maps to the same folder."""
    owner = state.get("model_name", name)
    if owner != name:
        raise TrainingError(
            f"the checkpoint folder {ckpt} holds the training of model {owner!r}, whose name "
            f"maps to the same folder as {name!r}; choose a name that differs in letters, "
            "digits, '.', '_' or '-', or another --mlruns DIR")


def _check_has_checkpoint(ckpt: Path, name: str, every: int) -> Path:
    """The latest checkpoint, or a refusal (before the comparisons with the checkpoint,
    and before the earlier run is reopened and retagged); ``every``: the earlier
    training's ``checkpoint_every``."""
    latest = latest_checkpoint(ckpt)
    if latest is None:
        raise TrainingError(
            f"resume was asked for but there is no checkpoint in {ckpt} (the training of "
            f"{name!r} stopped before its first, one every {every} steps); train without "
            "--resume to start afresh")
    return latest


def _check_nothing_resumable(ckpt: Path, name: str) -> None:
    """Refuse to start afresh over a training of ``name`` that stopped before its end
    with a checkpoint a resume can go on from: starting afresh deletes it, hours of work
    lost to a forgotten --resume. A finished training's checkpoints (its record
    concluded, or a record from before that was recorded) go without a word; checkpoints
    without a readable record are refused too, since nothing says whether they are
    finished (and --resume cannot take them: --restart can). The record must be this
    name's (:func:`_check_owner`).

    Raises:
        TrainingError: There is such a training; --resume or --restart says what to do.
    """
    latest = latest_checkpoint(ckpt)
    if latest is None:
        return
    try:
        earlier, _ = _read_run_state(ckpt)
    except TrainingError:
        what = (f"a damaged training record ({ckpt / RUN_STATE_FILE})"
                if (ckpt / RUN_STATE_FILE).exists() else f"no training record ({RUN_STATE_FILE})")
        raise TrainingError(
            f"the checkpoint folder of {name!r} holds a checkpoint ({latest}) and {what}, "
            "so whether that training finished is unknown; pass --restart to delete it and "
            "start afresh") from None
    _check_owner(earlier, name, ckpt)
    if earlier.get("concluded", True):
        return
    raise TrainingError(
        f"the last training of {name!r} stopped before its end, and its checkpoint "
        f"{latest} (step {checkpoint_step(latest)}) can go on: pass --resume to continue "
        "it, or --restart to delete it and start afresh")


def _check_unfinished(latest: Path, config: RunConfig, n_train: int, name: str,
                      state: dict[str, Any]) -> None:
    """Refuse to resume a training that already reached its last step and was logged and
    registered (one whose store failed after the last step resumes to finish that)."""
    done = checkpoint_step(latest)
    planned = total_steps(config, n_train)
    concluded = state.get("concluded", True)
    if done > planned:
        per_epoch = planned // config.train.epochs
        # a finished training is replaced by a plain one; a stopped one only with --restart
        again = "train without --resume" if concluded else "--restart instead of --resume"
        raise TrainingError(
            f"the checkpoint of {name!r} is at step {done}, past the {planned} steps of the "
            f"{config.train.epochs} epoch(s) asked for; to go on, resume with --epochs "
            f"{done // per_epoch + 1} or more; to start again, {again}")
    if done == planned and concluded:
        raise TrainingError(
            f"the training of {name!r} already finished ({done} of {planned} steps, "
            f"{config.train.epochs} epoch(s)), so there is nothing to resume; to train "
            "longer, resume with a larger --epochs; to start again, train without --resume")


def _reusable_run(run_id: str | None, experiment: str) -> str | None:
    """``run_id`` if the current store still has it, live, in ``experiment``."""
    if not run_id:
        return None
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
        experiment_name = client.get_experiment(run.info.experiment_id).name
    except mlflow.exceptions.MlflowException:
        return None
    live = run.info.lifecycle_stage == "active" and experiment_name == experiment
    return run_id if live else None


def _run_status(run_id: str) -> str | None:
    """The status of a run in the current store, or None where it cannot be read."""
    try:
        return mlflow.MlflowClient().get_run(run_id).info.status
    except MlflowException:
        return None


def _end_abandoned_run(earlier: dict[str, Any], name: str) -> None:
    """End as KILLED the run of an earlier training of ``name`` that never concluded and
    that the store still shows RUNNING: its process was killed outright (SIGKILL, the OOM
    killer, a lost machine), so nothing ended it. Called with the name's training lock
    held (no process trains it now) before a fresh training deletes the checkpoints it
    could have resumed from; without this the run would read as running forever."""
    run_id = earlier.get("run_id")
    if earlier.get("concluded", True) or _reusable_run(run_id, name) is None:
        return
    if end_if_running(run_id, "a fresh training of the same name found it abandoned (its "
                               "process was killed, or cut off from the store)"):
        logger.warning("the run %s of an earlier training of %r was left RUNNING by a "
                       "process that ended without closing it (killed, or cut off from the "
                       "store); marked KILLED", run_id, name)
        _end_abandoned_pipeline(earlier, name)


def _end_abandoned_pipeline(record: dict[str, Any], name: str) -> None:
    """End as KILLED the end-to-end pipeline run that the training attempt of ``record``
    (the run record of a training of ``name`` whose process was killed outright) was
    nested in, where the store still shows it RUNNING: the pipeline ran in that process
    and died with it. The parent is the one the record names: a resumed training keeps
    its first parent's tag (MLflow does not move a reopened run), so the tag is read only
    for a record written before parents were recorded. Only a parent tagged as this
    package's ``end_to_end`` pipeline, and never the run active here (an ``end_to_end
    --resume`` logs under a new parent), is ended; a caller's own parent run is left to
    its owner. Called with the name's training lock held."""
    run_id = record.get("run_id")
    try:
        parent_id = (record["parent_run_id"] if "parent_run_id" in record
                     else mlflow.MlflowClient().get_run(run_id).data.tags.get(
                         MLFLOW_PARENT_RUN_ID))
        active = mlflow.active_run()
        if (not isinstance(parent_id, str) or not parent_id  # none, or a damaged record
                or (active is not None and active.info.run_id == parent_id)):
            return
        if mlflow.MlflowClient().get_run(parent_id).data.tags.get("pipeline") != "end_to_end":
            return
    except MlflowException:
        return
    if end_if_running(parent_id, f"a later training of {name!r} found its training run "
                                  f"{run_id} abandoned (their process was killed)"):
        logger.warning("the end-to-end pipeline run %s of a killed training of %r was left "
                       "RUNNING; marked KILLED", parent_id, name)


def _log_params(run: Run, params: dict[str, Any], resumed: bool) -> None:
    """Log params; on a resumed run only the new ones (MLflow forbids changing a param),
    with changed values recorded as ``resumed.<key>`` tags."""
    if not resumed:
        run.log_params(params)
        return
    logged = mlflow.MlflowClient().get_run(run.run_id).data.params
    new = {k: v for k, v in params.items() if k not in logged}
    changed = {f"resumed.{k}": v for k, v in params.items()
               if k in logged and logged[k] != str(v)}
    if new:
        run.log_params(new)
    if changed:
        run.set_tags(changed)


def _tag_kept_steps(run: Run, metrics: _MetricLogger, start: int, changes: list[str]) -> None:
    """A resume with other settings takes other steps after its checkpoint than the
    attempt it resumes took, but the per-step metrics that attempt logged past the
    checkpoint stay (MLflow keeps every value; the replay logs no second one): say which
    steps they are, and why they differ from the resumed weights' own history."""
    if changes and metrics.logged_steps > start:
        run.set_tags({"resumed.steps_from_before": (
            f"{start + 1}-{metrics.logged_steps}: their per-step metrics are the interrupted "
            f"attempt's, before {', '.join(changes)} changed; this attempt resumed from the "
            f"checkpoint of step {start}")})


def curves_figure(run_id: str) -> Figure:
    """Train (per step) and validation (per epoch) bits/dim of a run, from the store. A
    non-finite value (a diverged step or model) is left out; the sqlite store keeps ±inf
    as ±sys.float_info.max, which no bits/dim reaches."""
    client = mlflow.MlflowClient()
    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    for key, style in (("train_bpd", {"lw": 1, "alpha": 0.8}),
                       ("val_bpd", {"marker": "o", "lw": 2})):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)
                         if abs(m.value) < sys.float_info.max)  # NaN fails it too
        if history:
            steps, values = zip(*history, strict=True)
            axes.plot(steps, values, label=key, **style)
    axes.set_xlabel("step")
    axes.set_ylabel("bits/dim")
    axes.set_title("training curves")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend()
    figure.tight_layout()
    return figure


def _failed_files_report(result_failed: dict[str, str]) -> list[str]:
    """``file<TAB>reason`` lines; ``TrainResult.failed_files`` is keyed by file name."""
    return [f"{one_line(name)}\t{reason}" for name, reason in sorted(result_failed.items())]


def _not_registered_reason(val_bpd: float, data: FolderData,
                           failed_files: dict[str, str]) -> str:
    """Why a model whose validation bits/dim is not finite is not registered: its images
    could not be decoded, or the model gives non-finite bits/dim on them (diverged)."""
    if data.val is None:
        return ("there is no validation set (val_fraction = 0), so the model cannot be "
                "checked; set train.val_fraction > 0")
    indices = getattr(data.val, "indices", None)  # folder_datasets' split is a Subset
    undecodable = (None if indices is None else
                   sum(display_path(data.paths[i]) in failed_files for i in indices))
    if undecodable == len(data.val):
        return (f"validation bits/dim is {val_bpd} (not finite): none of the {len(data.val)} "
                "validation images could be decoded; check the images (failed_files.txt "
                "lists them)")
    if undecodable is not None:
        return (f"validation bits/dim is {val_bpd} (not finite) on the "
                f"{len(data.val) - undecodable} validation image(s) that could be decoded: "
                "the model diverged; lower lr or raise warmup_steps")
    return (f"validation bits/dim is {val_bpd} (not finite): the model diverged or none of "
            f"the {len(data.val)} validation images could be decoded; check the images, or "
            "lower lr / raise warmup_steps")


def train_and_register(data: str | Path, name: str, config: RunConfig, *,
                       device: str = "auto", resume: bool = False, restart: bool = False,
                       mlruns: str | Path | None = None,
                       progress: bool | None = None, nested: bool = False
                       ) -> TrainOutcome | None:
    """Train a Glow on the images under ``data``, log the run and register the model.

    One experiment per model ``name``. The run gets: params (the whole config, flattened,
    plus the data counts) and ``config.json``; per-step metrics (``train_bpd``, ``lr``,
    ``grad_norm``, ``images_per_sec``, ``skipped_steps``) and per-epoch ones
    (``val_bpd``, ``train_bpd_epoch``, ``images_per_sec_epoch``, ``failed_files``);
    ``samples.png`` (or, when the model cannot draw samples, a tag ``samples_skipped``
    saying why), ``training_curves.png``, ``training_images.sha256`` (the content
    digests of the training folder, which calibration checks its images against) and,
    when files failed to decode, ``failed_files.txt``; tags ``data_fingerprint``,
    ``data_folder``, ``git_commit`` (of this code, when it runs from a git checkout). The
    model is logged as a pyfunc and, when its validation bits/dim is finite, registered
    as a new version of ``name`` with alias ``candidate``.

    Args:
        data: Folder of images of normal data (searched recursively).
        name: Registered model name (also the experiment name).
        config: Model and training configuration.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        resume: Continue the last training of ``name`` from its latest checkpoint (see
            the module docstring for where checkpoints live).
        restart: Start afresh even where the last training of ``name`` stopped before
            its end and ``resume`` could go on from its checkpoint (deleted then); without
            it such a training is refused, so a forgotten ``resume`` loses no work.
        mlruns: Folder of the default store and of the checkpoints (default ``./mlruns``).
        progress: Progress bar on stderr; ``None``: only on a terminal.
        nested: Log the run as a child of the active run (e.g. an end-to-end pipeline's).

    Returns:
        What was trained and registered; None in the processes of rank above 0 under
        ``torchrun``, which train their share and leave the store to rank 0.

    Raises:
        DataError: The folder is missing or holds no images.
        TrainingError: Training failed (diverged, nothing to resume, ...).
        TrackingError: The tracking store cannot be used.
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be a RunConfig, got {type(config).__name__}; read one "
                        "with anomaly_flow.config.load_preset, load_config or "
                        "RunConfig.from_dict")
    with raised_alike():  # under torchrun every process checks the same, so fails alike
        precheck_training(name, config)
        _check_one_way(resume, restart)
        check_store_folder(mlruns)  # before the lock makes <mlruns>/checkpoints/
        ckpt = checkpoint_dir(name, mlruns)
        _CONCLUDED_HERE.pop(ckpt.resolve(), None)  # a stop from here on is this training's
        dev = resolve_device(device)  # before the store, the checkpoints or the data
        check_batch_split(config)
        if world_size() == 1:  # under torchrun rank 0 alone checks, under the lock below
            precheck_checkpoints(name, config, mlruns, resume=resume, restart=restart)
        folder = folder_datasets(data, config)
    joined = join_launch_group(dev)  # under torchrun: the group before rank 0's checks
    try:
        _check_same_images(folder, Path(data))
        _check_same_options(name, config, dev, resume=resume, restart=restart)
        if launch_rank() != 0:  # rank 0 checks, clears, logs and registers
            refused = share_verdict()
            if refused is not None:  # rank 0 says why; this rank only leaves with it
                raise alike_on_every_process(
                    TrainingError(f"rank 0 did not start the training: {refused}"))
            _check_same_checkpoint(ckpt, resume)
            train(config, folder.train, folder.val, device=device,
                  checkpoint_dir=ckpt if resume else None, resume=resume, progress=False)
            return None
        verdict = _Verdict(ckpt, resume)
        try:
            configure(mlruns)  # a store that cannot be opened leaves no lock file behind
            with _training_lock(ckpt, name) as locked:  # one training of a name at a time
                return _train_and_register_locked(data, name, config, dev, folder, ckpt,
                                                  locked=locked, device=device, resume=resume,
                                                  restart=restart,
                                                  mlruns=mlruns, progress=progress,
                                                  nested=nested, ready=verdict.go)
        except BaseException as exc:
            verdict.refuse(exc)  # the other ranks wait for word before training
            raise
    finally:
        if joined:
            leave_launch_group()


def precheck_training(name: str, config: RunConfig) -> None:
    """What :func:`train_and_register` refuses about its name and configuration before it
    touches the store: for a caller (the end-to-end pipeline) that opens a parent run
    first, and must not leave an experiment named ``a/b`` or a FAILED run behind.

    Raises:
        TrainingError: The name cannot be a registered model's, or the configuration
            keeps no validation images.
    """
    if (not name or len(name) > MAX_NAME_LENGTH or any(c in name for c in "/:?@")
            or any(c.isspace() for c in name) or name.startswith(".")):
        shown = name if len(name) <= 60 else f"{name[:57]}..."
        raise TrainingError(
            f"model name {shown!r} is invalid; use 1 to {MAX_NAME_LENGTH} characters "
            "without spaces, '/', ':', '?' or '@', not starting with '.' (model URIs such as "
            "models:/NAME@candidate could not name it, and MLflow refuses '.' and '..'), "
            "e.g. --name bottle-caps.")
    if config.train.val_fraction == 0:
        raise TrainingError(
            "train.val_fraction is 0, so there would be no validation images to check the "
            "model (and fit its normal reference) before registering it; set "
            "train.val_fraction > 0, e.g. 0.1 (anomaly_flow.train.train trains without one)")


def precheck_checkpoints(name: str, config: RunConfig, mlruns: str | Path | None = None, *,
                         resume: bool = False, restart: bool = False) -> None:
    """What :func:`train_and_register` refuses about the checkpoints of ``name``'s last
    training, checked before the training folder is read (and again once the name's lock
    is held): for ``resume``, a missing record or checkpoint and settings that cannot
    continue it; without ``resume`` or ``restart``, an unfinished training a resume could
    continue (starting afresh would delete it). For a caller that opens a run first
    (the end-to-end pipeline), as :func:`precheck_training`.

    Raises:
        TrainingError: The checkpoints refuse this training; the message says what to do.
    """
    _check_one_way(resume, restart)
    ckpt = checkpoint_dir(name, mlruns)
    _check_not_running(ckpt, name)  # its checkpoints are no stopped training's
    if resume:
        state, before = _read_run_state(ckpt)
        _check_owner(state, name, ckpt)
        _check_has_checkpoint(ckpt, name, before.train.checkpoint_every)
        _check_same_settings(before, config)
    elif not restart:
        _check_nothing_resumable(ckpt, name)


def _check_one_way(resume: bool, restart: bool) -> None:
    """Refuse ``resume`` and ``restart`` together."""
    if resume and restart:
        raise TrainingError("resume continues the last training and restart deletes it: "
                            "pass one of them (--resume or --restart), not both")


class _Verdict:
    """Rank 0's word to the other ranks under torchrun, sent once: go (just before
    training; then every rank checks it has the checkpoint a resume starts from) or the
    error that stopped it before."""

    def __init__(self, ckpt: Path, resume: bool) -> None:
        self.sent = False
        self.ckpt, self.resume = ckpt, resume

    def go(self) -> None:
        if not self.sent:
            self.sent = True
            share_verdict(None)
            _check_same_checkpoint(self.ckpt, self.resume)

    def refuse(self, exc: BaseException) -> None:
        if not self.sent:
            self.sent = True
            share_verdict(first_line(exc))


def _check_same_images(folder: FolderData, data: Path) -> None:
    """Under torchrun, refuse on every rank a training whose ranks listed different images
    (each lists the folder itself): they would split it differently, and validate on
    images another rank trains on. A collective; alone, nothing to compare."""
    views = gathered((folder.fingerprint, len(folder.paths), socket.gethostname()))
    if len({view[:2] for view in views}) == 1:
        return
    groups: dict[tuple[str, int], list[str]] = {}
    for rank, (fingerprint, n, host) in enumerate(views):
        groups.setdefault((fingerprint, n), []).append(f"{rank} ({host})")
    seen = "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}: {n} images, "
                     f"fingerprint {fingerprint[:12]}"
                     for (fingerprint, n), ranks in groups.items())
    raise alike_on_every_process(DataError(
        f"the processes of this training see different images in {display_path(data)} "
        f"({seen}): the folder changed while they read it, or the hosts' copies differ; "
        "keep it unchanged while training, the same on every host, and train again"))


def _check_same_options(name: str, config: RunConfig, dev: torch.device, *,
                         resume: bool, restart: bool) -> None:
    """Under torchrun, refuse on every rank a training whose ranks were given different
    settings (another --epochs, --batch-size, configuration file or --resume on one host):
    they would train different models, or stop at different steps and leave the others
    waiting in a collective until the group's timeout. A collective; alone, nothing to
    compare."""
    mine = {"--name": name, "--resume": resume, "--restart": restart,
            "--device": dev.type, **flatten(config.to_dict())}
    views = gathered((mine, socket.gethostname()))
    differ = [key for key in mine if len({repr(view[key]) for view, _ in views}) > 1]
    if not differ:
        return
    said = []
    for key in differ[:3]:
        groups: dict[str, list[str]] = {}
        for rank, (view, host) in enumerate(views):
            groups.setdefault(repr(view[key]), []).append(f"{rank} ({host})")
        said.append(f"{key} is " + ", ".join(
            f"{value} on rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}"
            for value, ranks in groups.items()))
    more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
    raise alike_on_every_process(TrainingError(
        f"the processes of this training were given different settings: {'; '.join(said)}"
        f"{more}; give every process the same command, options and configuration file, then "
        "train again"))


def _check_same_checkpoint(ckpt: Path, resume: bool) -> None:
    """Under torchrun, refuse on every rank a resume that some rank cannot read the
    checkpoint of: each loads it from its own ``ckpt``, which only rank 0 writes (another
    host's folder of that path is another folder). A collective; alone, nothing to do."""
    if not resume:
        return
    latest = latest_checkpoint(ckpt)
    views = gathered((latest.name if latest is not None else None, socket.gethostname()))
    wanted = views[0][0]
    for rank, (name, host) in enumerate(views):
        if name != wanted:
            found = f"finds {name}" if name else "finds none"
            raise alike_on_every_process(TrainingError(
                f"rank 0 resumes from the checkpoint {wanted} in {ckpt}, but rank {rank} "
                f"(host {host}) {found} there: every process reads the checkpoint, and only "
                "rank 0 writes it; on several hosts put --mlruns on a file system they all "
                "share (or copy that folder to the same path on each), then run the same "
                "command again"))


def _train_and_register_locked(data: str | Path, name: str, config: RunConfig,
                               dev: torch.device, folder: FolderData, ckpt: Path, *,
                               locked: bool, device: str, resume: bool, restart: bool,
                               mlruns: str | Path | None,
                               progress: bool | None, nested: bool,
                               ready: Callable[[], None]) -> TrainOutcome:
    """:func:`train_and_register` past its checks, with the name's training lock held;
    ``ready`` is called once everything but the training is in place."""
    previous_run, state = None, {}
    earlier: dict[str, Any] = {}  # the record of a training this one replaces
    if resume:
        state, before = _read_run_state(ckpt)
        _check_owner(state, name, ckpt)
        latest = _check_has_checkpoint(ckpt, name, before.train.checkpoint_every)
        _check_resumable(state, before, config, folder.fingerprint, Path(data))
        _check_unfinished(latest, config, len(folder.train), name, state)
    else:
        if not restart:
            _check_nothing_resumable(ckpt, name)
        if (ckpt / RUN_STATE_FILE).is_file():
            with contextlib.suppress(TrainingError):  # a damaged one is cleared below anyway
                earlier, _ = _read_run_state(ckpt)
            _check_owner(earlier, name, ckpt)
    require_writable_store(experiment=name)
    check_not_foreign(name)
    if resume:
        previous_run = _reusable_run(state.get("run_id"), name)
        recorded = state.get("tracking_uri")
        here = redacted(mlflow.get_tracking_uri())  # as the record keeps it
        recorded = recorded and redacted(recorded)  # an older record kept it whole
        if previous_run is None and recorded and recorded != here:
            raise TrainingError(
                f"the training of {name!r} was logged to {recorded} (run "
                f"{state.get('run_id')}), not to {here}; resume it where "
                f"it was logged (MLFLOW_TRACKING_URI={recorded}, or that store's --mlruns), "
                "or start afresh here with --restart instead of --resume")
        if previous_run is None:
            logger.warning("the run %s of the checkpoint is not in %s; logging the "
                           "resumed training as a new run", state.get("run_id"), here)
        elif locked and _run_status(previous_run) == "RUNNING":  # its process was killed
            _end_abandoned_pipeline(state, name)
    elif ckpt.exists():
        if locked:  # unlocked (no flock here), the earlier training may still be running
            _end_abandoned_run(earlier, name)
        if (latest := latest_checkpoint(ckpt)) is not None:
            finished = bool(earlier) and earlier.get("concluded", True)  # as resume reads
            could = "was the finished model" if finished else "had stopped before its end"
            logger.warning("starting afresh: deleting the earlier training's checkpoints "
                           "in %s (the latest, %s, %s)", ckpt, latest.name, could)
        shutil.rmtree(ckpt)

    data_root = Path(data).resolve()
    tags: dict[str, Any] = {"data_fingerprint": folder.fingerprint,
                            "data_folder": display_path(data_root), "model_name": name,
                            "data_shapes": describe_shapes(folder.shapes),
                            "command": "train", "device": dev.type,
                            "precision": "bf16" if uses_bf16(config, dev) else "float32"}
    if commit := git_commit():
        tags["git_commit"] = commit
    if resume:
        tags["resumed"] = "true"
        if previous_run is None:
            tags["resumed_from_run_id"] = state.get("run_id", "unknown")
    # the run this one nests in: a later training ends it if this process is killed
    parent = mlflow.active_run() if nested else None
    # a stop held back by the registration is raised once the run has ended, so a run
    # whose model is registered and recorded ends FINISHED, not KILLED
    with (contextlib.ExitStack() as after_run,
          start_run(name, run_name=f"train-{safe_name(name)}", tags=tags,
                    run_id=previous_run, nested=nested) as run):
        ckpt.mkdir(parents=True, exist_ok=True)
        record = {"model_name": name, "run_id": run.run_id,
                  "tracking_uri": redacted(mlflow.get_tracking_uri()),
                  "data_fingerprint": folder.fingerprint,
                  "data_folder": display_path(data_root), "config": config.to_dict(),
                  "parent_run_id": parent.info.run_id if parent is not None else None,
                  "concluded": False}  # True once the model is logged and registered
        _write_record(ckpt, record)
        params = {**flatten(config.to_dict()), "processes": world_size(),
                  "data.n_images": len(folder.paths),
                  "data.n_train": len(folder.train),
                  "data.n_val": len(folder.val) if folder.val is not None else 0}
        _log_params(run, params, resumed=previous_run is not None)
        run.log_dict(config.to_dict(), "config.json")
        run.log_text("".join(f"{d}\n" for d in folder.digests), TRAINING_IMAGES_FILE)

        every = config.train.checkpoint_every
        metrics = (_MetricLogger.resuming(run, every) if previous_run is not None
                   else _MetricLogger(run, every))
        if previous_run is not None:
            _tag_kept_steps(run, metrics, checkpoint_step(latest),
                            trajectory_changes(before.train, config.train))
        ready()
        result = train(config, folder.train, folder.val, device=device, checkpoint_dir=ckpt,
                       resume=resume, callback=metrics, progress=progress)
        finals = {"final_val_bpd": result.val_bpd, "final_train_bpd": result.train_bpd,
                  "steps": float(result.steps)}
        if previous_run is not None:  # a resume that only finishes the logging
            finals = {key: value for key, value in finals.items()
                      if not metrics.has_value(key, result.steps)}
        run.log_metrics(finals, step=result.steps)
        run.flush()

        if result.samples.size:
            run.log_image(result.samples, "samples.png")
        elif result.samples_skipped:  # the model cannot sample (warned about)
            run.set_tags({"samples_skipped": result.samples_skipped})
        run.log_figure(curves_figure(run.run_id), "training_curves.png")
        if result.failed_files:
            lines = _failed_files_report(result.failed_files)
            run.log_text("\n".join(lines) + "\n", "failed_files.txt")
            run.set_tags({"failed_files": len(lines),
                          "failed_files_examples": "; ".join(lines[:3]).replace("\t", ": ")})
            logger.warning("%d file(s) of the data folder could not be decoded and were "
                           "skipped; see failed_files.txt in run %s", len(lines), run.run_id)

        result.model.training_shapes = folder.shapes  # scoring compares sizes with it
        logged_uri = _logged_earlier(state, run.run_id, result.steps) if previous_run else None
        if logged_uri is None:
            logged_uri = log_model(run, result.model, None)
        # kept for a resume after this attempt too (its registration may fail again)
        record.update(logged_model_uri=logged_uri, logged_at_step=result.steps)
        _write_record(ckpt, record)
        diverged = 2 * result.skipped_steps > result.steps
        # registered and recorded as one step: a stop in between would leave a version the
        # record does not know, and the --resume it asks for would register it again
        after_run.enter_context(stops_deferred())
        if math.isfinite(result.val_bpd) and not diverged:
            # an attempt killed between registering the model and recording it: its version
            earlier = registered_from_run(run.run_id, logged_uri.removeprefix("models:/")) \
                if previous_run else None
            if earlier is not None and earlier[0] == name:
                version = earlier[1]
                set_alias(name, CANDIDATE, version)
            else:
                version = register_model(logged_uri, name, alias=CANDIDATE, tags={
                    "training_run_id": run.run_id, "data_fingerprint": folder.fingerprint,
                    "val_bpd": repr(result.val_bpd)})
            run.set_tags({"registered_version": version})
            model_uri = f"models:/{name}/{version}"
            message = (f"registered {model_uri} with alias {CANDIDATE} "
                       f"(validation bits/dim {result.val_bpd:.4f})")
        else:
            version, model_uri = None, logged_uri
            reason = (f"{result.skipped_steps} of its {result.steps} steps were skipped for a "
                      "non-finite loss or gradient: training diverged; lower lr or raise "
                      "warmup_steps" if diverged else
                      _not_registered_reason(result.val_bpd, folder, result.failed_files))
            run.set_tags({"registered_version": "none", "not_registered_reason": reason})
            run.mark_failed()  # as the command fails: FINISHED would read as a model
            message = f"model not registered: {reason}"
            logger.warning(message)
        if result.skipped_steps and not diverged:
            message += (f"; {result.skipped_steps} of {result.steps} steps skipped for a "
                        "non-finite loss or gradient")
        if result.failed_files:
            message += (f"; {len(result.failed_files)} file(s) of the data folder could not "
                        "be decoded")
        _write_record(ckpt, {**record, "concluded": True, "outcome": message,
                             "version": version,  # strict JSON: no NaN
                             "val_bpd": result.val_bpd if math.isfinite(result.val_bpd)
                             else None})
        outcome = TrainOutcome(run.run_id, model_uri, version, result.val_bpd, message)
        _CONCLUDED_HERE[ckpt.resolve()] = outcome
    return outcome


_CONCLUDED_HERE: dict[Path, TrainOutcome] = {}
"""The outcome of each training this process concluded, by checkpoint folder."""


def finished_training(data: str | Path, name: str, config: RunConfig,
                      mlruns: str | Path | None = None) -> TrainOutcome | None:
    """The outcome of the last training of ``name`` in the configured store where it
    finished and registered its model with ``config`` (every setting alike) on the images
    now in ``data``; None otherwise. For a pipeline resumed after a stop past its training
    (the end-to-end pipeline's calibration), which goes on from that model instead of
    refusing a resume with nothing left to train."""
    ckpt = checkpoint_dir(name, mlruns)
    try:
        state, before = _read_run_state(ckpt)
    except TrainingError:
        return None
    if (not state.get("concluded") or not isinstance(state.get("version"), str)
            or state.get("model_name") != name or before.to_dict() != config.to_dict()
            or state.get("tracking_uri") != redacted(mlflow.get_tracking_uri())):
        return None
    try:  # the version must still be that training's (not deleted, nor a new one's)
        with quiet_mlflow():
            registered = mlflow.MlflowClient().get_model_version(name, state["version"])
    except MlflowException:
        return None
    if registered.run_id != state.get("run_id") or str(registered.status) != "READY":
        return None
    root = Path(data)
    if folder_digest.fingerprint(find_images(root), root) != state.get("data_fingerprint"):
        return None
    val_bpd = state.get("val_bpd")
    outcome = TrainOutcome(state["run_id"], f"models:/{name}/{state['version']}",
                           state["version"],
                           float(val_bpd) if isinstance(val_bpd, int | float) else math.nan,
                           state.get("outcome", ""))
    _CONCLUDED_HERE[ckpt.resolve()] = outcome  # a stop from here on comes after it
    return outcome


def training_concluded(name: str, mlruns: str | Path | None = None) -> TrainOutcome | None:
    """The outcome of the training of ``name`` this process ran to its end (registered,
    or why not), or None: none did, or a newer one of that name has started since."""
    return _CONCLUDED_HERE.get(checkpoint_dir(name, mlruns).resolve())


def _logged_earlier(state: dict[str, Any], run_id: str, steps: int) -> str | None:
    """The model an earlier attempt of this run logged after its last step (its store
    failed at registration), so that a resume which only finishes the logging registers
    that one instead of leaving it beside a second copy; None when there is none to use."""
    uri = state.get("logged_model_uri")
    if not isinstance(uri, str) or state.get("logged_at_step") != steps:
        return None
    try:
        with quiet_mlflow():
            model = mlflow.get_logged_model(uri.removeprefix("models:/"))
    except MlflowException:
        return None
    ready = str(model.status).upper().endswith("READY")
    return uri if ready and model.source_run_id == run_id else None


def interrupted_message(name: str, config: RunConfig, mlruns: str | Path | None = None, *,
                        what: str = "interrupted") -> str:
    """What to tell a user whose training of ``name`` stopped (``what``: interrupted, or
    how else it stopped): where it can go on from, or that no checkpoint was written
    yet."""
    folder = checkpoint_dir(name, mlruns)
    # the stop came after the end of a training this process ran (run.json may hold the
    # outcome of an earlier one, which a new training stopped early has not replaced yet)
    if (outcome := training_concluded(name, mlruns)) is not None:
        return f"{what} after the training had finished ({outcome.message})"
    latest = latest_checkpoint(folder)
    every = config.train.checkpoint_every
    if latest is None:
        return (f"{what}; no checkpoint was written yet (one every {every} steps, "
                "train.checkpoint_every), so a new run starts from the beginning")
    return (f"{what}; the last checkpoint is {latest} (one every {every} steps, "
            "train.checkpoint_every); run the same command with --resume to go on from it "
            "(or with --restart to delete it and start afresh)")


_RECORDS: dict[tuple[str, str], frozenset[str]] = {}
"""Training records read so far, by (tracking URI, run id): a run's record never changes
(a resumed training must see the same folder), and calibrating then evaluating asks twice."""


def training_run_of(run_id: str) -> str:
    """The run that trained the weights a run logged: for a calibration run (which logs
    the calibrated model) its ``training_run_id`` tag, else the run itself (also when the
    store does not have it)."""
    try:
        tags = mlflow.MlflowClient().get_run(run_id).data.tags
    except MlflowException:
        return run_id
    return tags.get("training_run_id") or run_id


def training_image_digests(run_id: str) -> frozenset[str] | None:
    """The content digests of the images of the folder run ``run_id`` trained on (both
    splits), or None where the run recorded none (trained before they were recorded, or
    not by this package)."""
    key = (mlflow.get_tracking_uri(), run_id)
    if key not in _RECORDS:
        try:
            with quiet_mlflow():
                text = mlflow.artifacts.load_text(f"runs:/{run_id}/{TRAINING_IMAGES_FILE}")
        except (MlflowException, OSError):
            # a store moved whole keeps the run's old absolute artifact path: read the
            # record where the model's files are read from too (tracking.models)
            with quiet_mlflow():
                try:
                    where = mlflow.get_run(run_id).info.artifact_uri
                except MlflowException:
                    return None
            if (moved := moved_location(where)) is None:
                return None
            try:
                text = (moved / TRAINING_IMAGES_FILE).read_text(encoding="ascii")
            except (OSError, UnicodeDecodeError):
                return None
        _RECORDS[key] = frozenset(text.split())
    return _RECORDS[key]
