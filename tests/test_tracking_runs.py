"""Tests for anomaly_flow.tracking.runs: the Run handle, its tags and its end, on real
sqlite stores and real processes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import zlib
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException

from anomaly_flow import tracking


def test_git_commit_is_the_codes_not_the_working_directorys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    package = Path(tracking.__file__).resolve().parents[1]
    own = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True,
                         text=True, check=False).stdout.strip()
    project = tmp_path / "user-project"  # the user's own checkout, where they train
    project.mkdir()
    git = ["git", "-c", "user.name=u", "-c", "user.email=u@example.org"]
    subprocess.run([*git, "init", "-q"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=project,
                   check=True)
    theirs = tracking.git_commit(project)
    assert theirs is not None and theirs != own
    monkeypatch.chdir(project)
    assert tracking.git_commit() == (own or None)


def test_run_handle_logs_everything_and_batches_metrics(mlruns: Path) -> None:
    import matplotlib.figure

    with tracking.start_run("handles", "unit", tags={"purpose": "test"}) as run:
        run.log_params({"model": {"levels": 2}, "lr": 0.1})
        for step in range(1, 251):
            run.log_metrics({"loss": 1.0 / step}, step=step)
        assert len(run._pending) > 0  # queued, not one request per step
        run.log_dict({"a": 1}, "d/config.json")
        run.log_text("hello", "notes.txt")
        run.log_image(np.zeros((4, 6), np.uint8), "img/zeros.png")
        figure = matplotlib.figure.Figure()
        figure.add_subplot().plot([1, 2])
        run.log_figure(figure, "fig.png")
        run.set_tags({"stage": "done"})
        run_id = run.run_id
    client = mlflow.MlflowClient()
    data = client.get_run(run_id)
    assert data.info.status == "FINISHED"
    assert data.data.params == {"model.levels": "2", "lr": "0.1"}
    assert data.data.tags["purpose"] == "test" and data.data.tags["stage"] == "done"
    # what the numbers depend on besides data and config, on every run
    assert data.data.tags["torch_version"] == torch.__version__
    assert data.data.tags["zlib_version"] == zlib.ZLIB_RUNTIME_VERSION
    assert data.data.tags["anomaly_flow_version"] == metadata.version("anomaly-flow")
    assert {"pillow_version", "python_version"} <= set(data.data.tags)
    assert len(client.get_metric_history(run_id, "loss")) == 250
    files = {f.path for f in client.list_artifacts(run_id)}
    assert {"d", "notes.txt", "img", "fig.png"} <= files
    artifacts = Path(data.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(mlruns / "artifacts" / "handles")


def test_a_reopened_run_records_what_changed_in_its_environment(
        mlruns: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with tracking.start_run("handles", "first") as run:
        run_id = run.run_id
    same = tracking.runs.environment_tags()
    monkeypatch.setattr(tracking.runs, "environment_tags",
                        lambda: {**same, "torch_version": "9.9.9"})
    with tracking.start_run("handles", run_id=run_id):
        pass
    tags = mlflow.MlflowClient().get_run(run_id).data.tags
    assert tags["torch_version"] == torch.__version__  # what the run started under
    assert tags["resumed.torch_version"] == "9.9.9"
    assert not {"resumed.zlib_version", "resumed.python_version"} & set(tags)
    # resumed again under the torch it started with: the latest resume says so
    monkeypatch.setattr(tracking.runs, "environment_tags", lambda: same)
    with tracking.start_run("handles", run_id=run_id):
        pass
    tags = mlflow.MlflowClient().get_run(run_id).data.tags
    assert tags["torch_version"] == tags["resumed.torch_version"] == torch.__version__


def test_a_run_started_without_environment_tags_is_not_given_start_values(
        mlruns: Path) -> None:
    # a run from before these tags existed: what it started under is unknown, so a resume
    # records only what it ran under
    tracking.ensure_experiment("handles")
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("handles")
                          .experiment_id) as bare:
        run_id = bare.info.run_id
    with tracking.start_run("handles", run_id=run_id):
        pass
    tags = mlflow.MlflowClient().get_run(run_id).data.tags
    assert "torch_version" not in tags
    assert tags["resumed.torch_version"] == torch.__version__


def test_failed_block_marks_the_run_failed(mlruns: Path) -> None:
    with pytest.raises(RuntimeError), tracking.start_run("handles") as run:
        raise RuntimeError("boom")
    assert mlflow.MlflowClient().get_run(run.run_id).info.status == "FAILED"


def _server_gone() -> MlflowException:
    """MLflow's error for a request to a server that went away, as MLflow raises it:
    inside the ``except`` of the ``requests`` error."""
    import requests

    try:
        raise requests.exceptions.ConnectionError(
            "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded "
            "(Caused by NewConnectionError(... [Errno 111] Connection refused))")
    except requests.exceptions.ConnectionError as error:
        try:
            raise MlflowException(f"API request to ... failed with exception {error}")
        except MlflowException as wrapped:
            return wrapped


def test_a_server_gone_mid_run_is_given_one_quick_try_to_end_it(
        mlruns: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's default retries take minutes per request: after the request that failed
    had them, ending the run must not take minutes more, nor hide the first error."""
    retries = []

    def refused(*args: Any, **kwargs: Any) -> None:
        retries.append(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"))
        raise _server_gone()

    gone = _server_gone()
    with pytest.raises(MlflowException) as info, tracking.start_run("handles") as run:
        run.log_metrics({"loss": 1.0}, step=1)
        monkeypatch.setattr(mlflow.MlflowClient, "log_batch", refused)
        monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", refused)
        raise gone
    assert info.value is gone
    assert retries == ["1", "1"]  # flush, then end: each with the first contact's settings
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert mlflow.active_run() is None


def test_a_server_gone_mid_run_is_said_in_a_few_words() -> None:
    from anomaly_flow.errors import describe

    assert describe(_server_gone()) == (
        "the MLflow tracking server became unreachable (connection refused: nothing listens "
        "at that address and port); check MLFLOW_TRACKING_URI and that the server is "
        "running, then run the command again (the run it was logging may be incomplete)")
    assert describe(MlflowException("RESOURCE_DOES_NOT_EXIST: no run")).startswith(
        "MLflow failed: RESOURCE_DOES_NOT_EXIST: no run; ")


def test_a_run_whose_process_was_killed_outright_is_ended_by_the_next_run(
        mlruns: Path, caplog: pytest.LogCaptureFixture) -> None:
    """calibrate or evaluate killed outright (SIGKILL, the OOM killer) cannot end its run,
    which read as RUNNING forever. Each run records its process; a run started later in
    the experiment marks KILLED those whose process on this host has ended (or whose pid
    another process has taken since), never a live process's or another host's."""
    from anomaly_flow.tracking.runs import PROCESS_TAG, _this_process

    code = ("import os; from anomaly_flow import tracking; "
            f"tracking.configure({str(mlruns)!r}); "
            "block = tracking.start_run('killed-parts', 'calibrate'); run = block.__enter__(); "
            "print(run.run_id, flush=True); os.kill(os.getpid(), 9)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parent.parent)
    assert done.returncode == -signal.SIGKILL, done.stderr
    killed = done.stdout.split()[0]
    client = mlflow.MlflowClient()
    assert client.get_run(killed).info.status == "RUNNING"
    host, pid, start = _this_process().split(" ")
    experiment = client.get_experiment_by_name("killed-parts").experiment_id
    others = {  # a live process's (this one's), another host's, a reused pid's
        "alive": _this_process(), "elsewhere": f"not-{host} 1 -",
        "reused": f"{host} {pid} {int(start) - 1}" if start != "-" else None}
    made = {}
    for label, value in others.items():
        if value is not None:
            made[label] = client.create_run(experiment, tags={PROCESS_TAG: value}).info.run_id
    with caplog.at_level(logging.WARNING), tracking.start_run("killed-parts", "evaluate"):
        pass
    assert client.get_run(killed).info.status == "KILLED"
    assert client.get_run(killed).data.tags["ended_by"] == \
        "a later run found its process gone (killed, or cut off from the store)"
    assert f"the run {killed} (calibrate) was left RUNNING by a process that ended without " \
        "closing it (killed, or cut off from the store); marked KILLED" in caplog.text
    assert client.get_run(made["alive"]).info.status == "RUNNING"
    assert client.get_run(made["elsewhere"]).info.status == "RUNNING"
    if "reused" in made:
        assert client.get_run(made["reused"]).info.status == "KILLED"
