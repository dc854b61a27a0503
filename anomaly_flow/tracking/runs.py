"""One MLflow run: the :class:`Run` handle, and what a command that ran one can say after.

:func:`start_run` opens a run in an experiment of the configured store
(:mod:`anomaly_flow.tracking.store`), tags it with what its numbers depend on
(:func:`environment_tags`) and the process that runs it, and ends it as its block ends:
``FINISHED``, ``FAILED`` or ``KILLED``. Runs that a killed process left ``RUNNING`` are
ended by the next run of their experiment. What a command registered and promoted is
noted here (:func:`note_registered`, :func:`note_promoted`), so that a stopped or failed
command's message can say which model versions are whole (:func:`stop_advice`,
:func:`failure_advice`).

Example:
    >>> with start_run("parts", "train") as run:  # doctest: +SKIP
    ...     run.log_metrics({"val_bpd": 3.1}, step=100)
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import PIL
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from PIL import Image

import anomaly_flow
from anomaly_flow.errors import describe, unreachable_reason, without_passwords
from anomaly_flow.stopping import process_running, stops_deferred
from anomaly_flow.tracking.store import ensure_experiment, first_contact, quiet_mlflow

logger = logging.getLogger(__name__)

# MLflow's limits per log_batch call.
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100
_MAX_PARAM_LENGTH = 6000


@dataclass
class _Outcomes:
    """What this process's runs and commands did so far, for the advice after a stop or
    a failure."""

    killed: list[str] = field(default_factory=list)  # runs a stop ended, oldest first
    registered: list[str] = field(default_factory=list)  # models:/NAME/N made, oldest first
    promoted: list[str] = field(default_factory=list)  # what each promotion moved, said
    to_promote: set[str] = field(default_factory=set)  # registered, champion not yet moved


_outcomes = _Outcomes()


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"levels": 3}}`` -> ``{"model.levels": 3}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The commit of anomaly-flow's own code (``git rev-parse HEAD`` where the package
    lies, when git tracks it there: a source checkout), or of the checkout at ``cwd``
    when given; None where there is none (an installed package: its version is a tag of
    every run, :func:`environment_tags`)."""
    package = Path(__file__).resolve().parents[1]
    try:
        if cwd is None:
            tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "__init__.py"],
                                     cwd=package, capture_output=True, timeout=10,
                                     check=False)
            if tracked.returncode != 0:  # not a checkout, or a venv inside someone's repo
                return None
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or package,
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def environment_tags() -> dict[str, str]:
    """What a run's numbers depend on besides its data and config: the versions of
    anomaly-flow, torch, Pillow and the zlib library (the PNG lengths of the complexity
    scores are zlib's), and Python. :func:`start_run` sets them on every run."""
    return {"anomaly_flow_version": anomaly_flow.__version__, "torch_version": torch.__version__,
            "pillow_version": PIL.__version__, "zlib_version": zlib.ZLIB_RUNTIME_VERSION,
            "python_version": platform.python_version()}


@contextmanager
def artifact_errors() -> Iterator[None]:
    """An ``OSError`` writing a run's or a model's files (a full disk, a folder without
    write permission), which MLflow's local artifact store lets through as it is, raised
    as the :class:`MlflowException` a server's refusal is: one line for the user, and
    ``train`` says where to resume from, not a traceback."""
    try:
        yield
    except OSError as exc:
        where = exc.filename2 or exc.filename
        raise MlflowException(f"cannot write the run's files: {exc.strerror or exc}"
                              + (f" ({os.fsdecode(where)})" if where else "")) from exc


def _uninterrupted(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method``, with a stop (Ctrl-C, SIGTERM) that comes during its store write raised
    once the write is done (:func:`anomaly_flow.stopping.stops_deferred`), and a file it
    cannot write an :class:`MlflowException` (:func:`artifact_errors`)."""

    @functools.wraps(method)
    def write(*args: Any, **kwargs: Any) -> Any:
        with stops_deferred(), artifact_errors():
            return method(*args, **kwargs)

    return write


class Run:
    """A handle on one MLflow run, as :func:`start_run` yields it.

    Metrics are buffered and sent in batches (at most every ``flush_seconds``, or when
    1,000 are waiting, and when the run ends), so per-step logging does not make the
    store the bottleneck. Everything else is written at once.

    Attributes:
        run_id: The MLflow run id.
        experiment_id: Its experiment's id.
    """

    def __init__(self, run_id: str, experiment_id: str, flush_seconds: float = 5.0) -> None:
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.flush_seconds = flush_seconds
        self._client = mlflow.MlflowClient()
        self._pending: list[Metric] = []
        self._last_flush = time.monotonic()
        self.failed = False  # set by mark_failed: the run ends FAILED though nothing raised

    def mark_failed(self) -> None:
        """End the run ``FAILED`` when its block ends without an exception: a run that
        logged everything it could but did not make what it was for (a training that
        registered no model), so its status agrees with its command's exit status."""
        self.failed = True

    def __repr__(self) -> str:
        return f"Run(run_id={self.run_id!r}, experiment_id={self.experiment_id!r})"

    @_uninterrupted
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters; nested dicts are flattened to ``a.b`` keys."""
        items = [Param(key, str(value)[:_MAX_PARAM_LENGTH])
                 for key, value in flatten(params).items()]
        for start in range(0, len(items), _MAX_PARAMS):
            self._client.log_batch(self.run_id, params=items[start : start + _MAX_PARAMS])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Queue metrics (at ``step``, default 0); see the class docstring for batching."""
        stamp = int(time.time() * 1000)
        for key, value in metrics.items():
            number = float(value)
            self._pending.append(Metric(key, number, stamp, int(step or 0)))
        if (len(self._pending) >= _MAX_METRICS
                or time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    @_uninterrupted
    def flush(self) -> None:
        """Send the queued metrics now."""
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), _MAX_METRICS):
            self._client.log_batch(self.run_id, metrics=pending[start : start + _MAX_METRICS])
        self._last_flush = time.monotonic()

    @_uninterrupted
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values as strings)."""
        items = [RunTag(key, str(value)) for key, value in tags.items()]
        for start in range(0, len(items), _MAX_TAGS):
            self._client.log_batch(self.run_id, tags=items[start : start + _MAX_TAGS])

    @_uninterrupted
    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Store a dict as a JSON (or YAML, by extension) artifact."""
        self._client.log_dict(self.run_id, obj, artifact_file)

    @_uninterrupted
    def log_text(self, text: str, artifact_file: str) -> None:
        """Store text as an artifact file."""
        self._client.log_text(self.run_id, text, artifact_file)

    @_uninterrupted
    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """Store a matplotlib figure (PNG, SVG, ... by extension)."""
        self._client.log_figure(self.run_id, figure, artifact_file)

    @_uninterrupted
    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """Store a uint8 image ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` as a PNG artifact."""
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise ValueError(f"log_image needs a uint8 (H, W) or (H, W, C) array, got "
                             f"{array.dtype} {array.shape}")
        path = Path(artifact_file)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / path.name
            Image.fromarray(array).save(local)
            self.log_artifact(local, str(path.parent) if str(path.parent) != "." else None)

    @_uninterrupted
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file or folder into the run's artifacts (under ``artifact_path``)."""
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)


@contextmanager
def start_run(experiment: str, run_name: str | None = None, *, nested: bool = False,
              tags: Mapping[str, Any] | None = None, run_id: str | None = None) -> Iterator[Run]:
    """Start (or, given ``run_id``, reopen) a run in ``experiment`` and make it active.

    A new run is tagged with :func:`environment_tags` (``tags`` win on a clash); a
    reopened one keeps its tags and gets ``resumed.<tag>`` for each that differs now from
    the last resume (or the start): a training resumed under another torch, say. The run
    ends when the block does: ``FINISHED``, or ``FAILED`` on an exception or after
    :meth:`Run.mark_failed` (``KILLED`` on Ctrl-C). Queued metrics are flushed either way.

    Example:
        >>> with start_run("parts", "train") as run:  # doctest: +SKIP
        ...     run.log_metrics({"val_bpd": 3.1}, step=100)
    """
    experiment_id = ensure_experiment(experiment)
    tag_values = environment_tags()
    if run_id:  # told before it reads as running again, so no sweep takes it for dead
        mlflow.MlflowClient().set_tag(run_id, PROCESS_TAG, _this_process())
    else:
        _end_abandoned_runs(experiment_id)
    if run_id:
        before = mlflow.MlflowClient().get_run(run_id).data.tags
        # against the latest resume's values, else the start's; a run started without
        # these tags (before they existed) gets resumed.* tags only, never a start value
        tag_values = {f"resumed.{key}": value for key, value in tag_values.items()
                      if before.get(f"resumed.{key}", before.get(key)) != value}
    tag_values.update({key: str(value) for key, value in (tags or {}).items()})
    if not run_id:
        tag_values[PROCESS_TAG] = _this_process()
    parent = mlflow.active_run()
    try:
        with stops_deferred():  # a stop waits for the run's row and tags to be written
            active = mlflow.start_run(
                run_id=run_id, experiment_id=None if run_id else experiment_id,
                run_name=None if run_id else run_name, nested=nested, tags=tag_values or None)
    except KeyboardInterrupt:
        started = mlflow.active_run()
        if started is not None and (parent is None
                                    or started.info.run_id != parent.info.run_id):
            _end_run("KILLED")  # the stop came as it started: end it, not a parent
        raise
    run = Run(active.info.run_id, active.info.experiment_id)
    status = "FINISHED"
    raised = unreachable = False
    try:
        yield run
        if run.failed:
            status = "FAILED"
    except KeyboardInterrupt:
        status, raised = "KILLED", True
        raise
    except BaseException as exc:
        status, raised = "FAILED", True
        unreachable = unreachable_reason(exc) is not None
        raise
    finally:
        with contextlib.ExitStack() as ending:
            if unreachable:
                # the server went away and MLflow's retries of the request that failed took
                # minutes already: one quick try to end the run, not minutes more per
                # request, and the error that stopped the block stays the one reported
                ending.enter_context(first_contact())
                ending.enter_context(contextlib.suppress(MlflowException))
            elif raised:
                # the error (or stop) that ended the block stays the one reported, not a
                # store failing to record it as well (a full disk fails both)
                ending.enter_context(_unended_run_noted(run.run_id, status))
            try:
                run.flush()
            finally:
                _end_run(status)


PROCESS_TAG = "anomaly_flow.process"
"""The run tag naming the process that runs it: ``HOST PID START`` (``START`` the
process's start time from ``/proc``, ``-`` where there is none)."""


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/PID/stat``'s 22nd
    field): with the pid, a process's identity (pids are reused). None without ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
        return stat[stat.rindex(b")") + 2:].split()[19].decode()
    except (OSError, ValueError, IndexError):
        return None


def _this_process() -> str:
    return f"{socket.gethostname()} {os.getpid()} {_start_time(os.getpid()) or '-'}"


def _process_gone(value: str) -> bool:
    """Whether the process a :data:`PROCESS_TAG` value names has ended: only known for
    this host's processes (another host's may be running)."""
    try:
        host, pid_text, start = value.split(" ")
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    if not process_running(pid):
        return True
    now = _start_time(pid)
    return start != "-" and now is not None and now != start  # its pid, reused


def _end_abandoned_runs(experiment_id: str) -> None:
    """End as KILLED the runs of ``experiment_id`` that the store shows RUNNING though the
    process that ran them on this host has ended: one killed outright (SIGKILL, the OOM
    killer) cannot end its run, which would read as running forever. Looked at as each
    new run starts; a store that cannot be asked is left as it is."""
    client = mlflow.MlflowClient()
    try:
        with quiet_mlflow():
            running = client.search_runs([experiment_id], "attributes.status = 'RUNNING'",
                                         max_results=200)
    except MlflowException:
        return
    for run in running:
        value = run.data.tags.get(PROCESS_TAG)
        if value and _process_gone(value) and end_if_running(
                run.info.run_id, "a later run found its process gone (killed, or cut off "
                                  "from the store)"):
            logger.warning("the run %s (%s) was left RUNNING by a process that ended without "
                           "closing it (killed, or cut off from the store); marked KILLED%s",
                           run.info.run_id, run.info.run_name,
                           " (a --resume of its training, from a checkpoint it wrote, "
                           "reopens it)"
                           if run.data.tags.get("command") == "train" else "")


def end_if_running(run_id: str, ended_by: str) -> bool:
    """Mark ``run_id`` KILLED, tagged ``ended_by``, where the store still shows it
    RUNNING; whether it did (a store that cannot be read or written leaves it)."""
    client = mlflow.MlflowClient()
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return False
        client.set_tag(run_id, "ended_by", ended_by)
        client.set_terminated(run_id, status="KILLED")
    except MlflowException:
        return False
    return True


@contextmanager
def _unended_run_noted(run_id: str, status: str) -> Iterator[None]:
    """An MLflow error ending run ``run_id`` as ``status`` said in a warning, not raised."""
    try:
        yield
    except MlflowException as exc:
        logger.warning("the MLflow run %s could not be marked %s: %s", run_id, status,
                       describe(exc))


def _end_run(status: str) -> None:
    """End the active run as ``status``, a stop waiting for the write. MLflow writes "View
    run ... at: URL" to stdout for a server store; stdout carries a command's data, so the
    link goes to stderr with the other news."""
    said = io.StringIO()  # the link carries the tracking URI, password and all
    with contextlib.redirect_stdout(said), stops_deferred():
        active = mlflow.active_run()
        mlflow.end_run(status)
    sys.stderr.write(without_passwords(said.getvalue()))
    if status == "KILLED" and active is not None:
        _outcomes.killed.append(active.info.run_id)


def note_registered(uri: str) -> None:
    """Record a model version this process registered (``models:/NAME/N``), for
    :func:`stop_advice`."""
    _outcomes.registered.append(uri)


def note_to_promote(uri: str) -> None:
    """Record that the version ``uri`` this process registered is to become ``champion``,
    for :func:`failure_advice`, until :func:`note_promoted` says it did."""
    _outcomes.to_promote.add(uri)


def note_promoted(what: str, uri: str | None = None) -> None:
    """Record an alias this process moved (``alias 'champion' of NAME moved to version N
    from M``), to version ``uri``, for :func:`stop_advice`: a stop after it leaves the
    alias moved."""
    _outcomes.promoted.append(what)
    if uri is not None:
        _outcomes.to_promote.discard(uri)


def stop_mark() -> tuple[int, int, int]:
    """Where this process stands in runs ended KILLED, versions registered and aliases
    moved: what :func:`stop_advice` counts from."""
    return len(_outcomes.killed), len(_outcomes.registered), len(_outcomes.promoted)


def failure_advice(mark: tuple[int, int, int]) -> str:
    """For a command that failed (a store gone, a disk full) after it registered a version
    since ``mark``: that the version is whole, which alias it moved, or that ``champion``
    was not moved to it though that was asked (and the command that moves it); empty
    where it registered nothing. Running the command again would register another
    version and leave this one unnamed."""
    made, registered = _registered_since(mark)
    if not made:
        return ""
    said = f"; before it failed, it {registered}"
    for uri in (uri for uri in made if uri in _outcomes.to_promote):
        said += (f", but did not move alias 'champion' to it (to do so: anomaly-flow "
                 f"promote {uri})")
    return said + "; use it rather than running the command again for another version"


def stop_advice(mark: tuple[int, int, int]) -> str:
    """For a stopped command's message: the runs a stop ended KILLED since ``mark`` (or
    that it came before any run started) and, where the command had already registered
    a version, that the version is whole, and which alias it moved to it; then what to
    do."""
    ids = _outcomes.killed[mark[0]:]
    made, registered = _registered_since(mark)
    runs = ("before it started an MLflow run" if not ids
            else f"its MLflow run {ids[0]} ends KILLED" if len(ids) == 1
            else f"its MLflow runs {', '.join(ids)} end KILLED")
    if not made:
        return f"({runs}); run the same command again"
    use = "use it" if len(made) == 1 else "use them"
    return (f"({runs}, after it {registered}); {use}, or run the same command again for a "
            "new version")


def _registered_since(mark: tuple[int, int, int]) -> tuple[list[str], str]:
    """The versions registered since ``mark``, and in words with the aliases moved since:
    ``registered models:/NAME/N, which is whole, and moved alias ...``."""
    made, moved = _outcomes.registered[mark[1]:], _outcomes.promoted[mark[2]:]
    whole = "which is whole" if len(made) == 1 else "which are whole"
    return made, (f"registered {', '.join(made)}, {whole}"
                  + "".join(f", and {what}" for what in moved))

