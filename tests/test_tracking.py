"""Tests for anomaly_flow.tracking with real parts: sqlite stores, image files on disk,
``mlflow models serve`` and ``mlflow server`` processes, and Spark in local mode."""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException
from mlflow.models.utils import _enforce_schema
from mlflow.types.schema import AnyType, DataType
from PIL import Image

from anomaly_flow import tracking
from anomaly_flow.calibration import CalibrationError, calibrate
from anomaly_flow.config import GlowConfig
from anomaly_flow.data import InvalidSource, split_train_val, write_image_folder
from anomaly_flow.fashion_mnist import SampleData
from anomaly_flow.glow import Glow, ModelFileError, preprocess
from anomaly_flow.scoring import ScoringDataset, score_dataset
from anomaly_flow.tracking import ModelNotFoundError
from anomaly_flow.tracking.pyfunc import (
    GlowPyfunc,
    ModelLoadError,
    PredictError,
    input_sources,
    model_signature,
    output_columns,
    path_root,
    predict_frame,
    rows_from_columns,
)
from tests.conftest import ImageDirs, TrainedModel, new_store, stop_during, tiny_config

# The pyfunc runs on CUDA when there is one ("auto"); references load the same way, so
# that exact comparisons hold on a GPU machine too.
AUTO = "auto"


def library_scores(model: Glow, sources: list) -> pd.DataFrame:
    """What the library itself says for these files: the reference for every path."""
    cfg = model.config
    return score_dataset(model, ScoringDataset(sources, cfg))


# ------------------------------------------------------------------- the store


def test_default_uri_is_absolute_sqlite_and_env_overrides(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert tracking.default_tracking_uri() == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert tracking.default_tracking_uri(Path("store")) == f"sqlite:///{tmp_path}/store/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.default_tracking_uri(tmp_path) == "http://127.0.0.1:1"


def test_configure_creates_the_store_and_leaves_the_environment_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = tmp_path / "store"  # nothing there yet (MLflow builds the database: seconds)
    uri = tracking.configure(folder)
    assert uri == f"sqlite:///{folder}/mlflow.db"
    assert (folder / "artifacts").is_dir() and (folder / "mlflow.db").is_file()
    assert mlflow.get_tracking_uri() == uri and mlflow.get_registry_uri() == uri
    assert "MLFLOW_TRACKING_URI" not in os.environ  # MLflow exports it; configure undoes that
    assert "MLFLOW_REGISTRY_URI" not in os.environ


def test_a_store_whose_artifacts_were_moved_away_is_not_given_new_ones(
        tmp_path: Path, mlflow_db_template: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """An empty folder made in its place would hide the loss, and catch the folder when
    it is moved back (``mv artifacts.away artifacts`` puts it inside)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = new_store(tmp_path / "store", mlflow_db_template)
    tracking.configure(folder)
    (folder / "artifacts").rename(tmp_path / "artifacts.away")
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.tracking.store"):
        tracking.configure(folder)
    assert not (folder / "artifacts").exists()
    assert f"the MLflow store {folder} has no artifacts folder: the models and files its " \
        "runs logged cannot be read; put the folder back if it was moved" in caplog.text


def test_a_copied_store_says_its_artifacts_still_go_to_the_original(
        tmp_path: Path, mlflow_db_template: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    original = new_store(tmp_path / "original", mlflow_db_template)
    tracking.configure(original)
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.tracking.store"):
        tracking.ensure_experiment("parts")
        tracking.ensure_experiment("parts")  # its own store: nothing to say
    assert "outside this store" not in caplog.text
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    tracking.configure(copy)
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.tracking.store"):
        tracking.ensure_experiment("parts")
    assert f"experiment 'parts' keeps its artifacts in {original / 'artifacts' / 'parts'}, " \
        f"outside this store's {copy / 'artifacts'} (was the store moved or copied?" \
        in caplog.text


def test_unreachable_store_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    with pytest.raises(tracking.TrackingError, match="cannot open the MLflow tracking store"):
        tracking.configure()


def test_a_store_uri_with_a_password_never_shows_it(monkeypatch: pytest.MonkeyPatch,
                                                   free_port: int) -> None:
    """Nothing listens there; the message names the store with its password masked."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cret@127.0.0.1:{free_port}")
    with pytest.raises(tracking.TrackingError) as info:
        tracking.configure()
    assert f"cannot open the MLflow tracking store http://alice:***@127.0.0.1:{free_port}: " \
        in str(info.value)
    assert "s3cret" not in str(info.value)
    assert tracking.redacted("postgresql://bob:p%40ss@db:5432/mlflow") == \
        "postgresql://bob:***@db:5432/mlflow"
    assert tracking.ui_command("https://carol:pw@mlflow.example:443") == \
        "open https://carol:***@mlflow.example:443 in a browser (the tracking server's UI)"
    for plain in ("sqlite:////srv/mlflow.db", "http://127.0.0.1:5000", "databricks"):
        assert tracking.redacted(plain) == plain
    # an error met mid-run repeats the URI it failed on
    from mlflow.exceptions import MlflowException

    from anomaly_flow.errors import describe

    said = describe(MlflowException("API request to http://alice:s3cret@10.0.0.1:5000/api/2.0/"
                                    "mlflow/runs/log-batch failed with exception"))
    assert "http://alice:***@10.0.0.1:5000/api" in said and "s3cret" not in said


def test_a_short_password_is_masked_without_mangling_the_rest_of_the_message(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's error names what to install ('psycopg'); a password that is part of a
    word there ('g') once turned it into 'psyco***', a module no one can install."""
    from anomaly_flow.tracking.store import password_masked

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://bob:g@127.0.0.1:1/mlflow")
    with pytest.raises(tracking.TrackingError) as info:
        tracking.configure()
    said = str(info.value)
    assert said.startswith("cannot open the MLflow tracking store "
                           "postgresql://bob:***@127.0.0.1:1/mlflow: ")
    assert said.count("***") == 1, said  # the URI's password, and nothing in the words
    uri = "postgresql://bob:p.g@db/mlflow"
    assert password_masked("login p.g refused for bob:p.g@db; (p.g) psycopg p.gx",
                           uri) == "login *** refused for bob:***@db; (***) psycopg p.gx"


@pytest.mark.parametrize("where", ["store folder", "folder", "mlruns"])
def test_a_sqlite_database_that_cannot_be_there_is_refused_at_once(
        where: str, tmp_path: Path, mlflow_db_template: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A store's folder given for its database, a folder in the database's place: MLflow
    would retry for minutes."""
    store = new_store(tmp_path / "store", mlflow_db_template)
    (tmp_path / "plain").mkdir()
    (tmp_path / "taken" / "mlflow.db").mkdir(parents=True)
    database, said = {
        "store folder": (store, f"{store} is a store folder, not its database; point "
                                f"MLFLOW_TRACKING_URI at sqlite:///{store / 'mlflow.db'}"),
        "folder": (tmp_path / "plain", f"{tmp_path / 'plain'} is not a file, where the sqlite "
                                       "database goes; move it away, or point "
                                       "MLFLOW_TRACKING_URI at a database file"),
        "mlruns": (None, f"{tmp_path / 'taken' / 'mlflow.db'} is not a file, where the sqlite "
                         "database goes; move it away, or pass another --mlruns DIR"),
    }[where]
    if database is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    with pytest.raises(tracking.TrackingError, match="cannot open the MLflow tracking "
                                                     "store sqlite:///") as info:
        tracking.configure(tmp_path / "taken" if database is None else None)
    assert said in str(info.value)


def test_databricks_is_not_taken_for_a_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "databricks")  # MLflow's name, no colon
    with pytest.raises(tracking.TrackingError, match="cannot open the MLflow tracking "
                       "store databricks: "):  # no credentials here: MLflow's own answer
        tracking.configure()


@pytest.mark.parametrize("uri", ["garbage", "/srv/mlruns", "file:///srv/mlruns"])
def test_a_folder_as_tracking_uri_is_named_for_what_it_is(
        uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's answer is a paragraph about its file store's maintenance mode."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(tracking.TrackingError) as info:
        tracking.configure()
    assert str(info.value) == (
        f"MLFLOW_TRACKING_URI={uri!r} is neither a database nor a server (MLflow takes it "
        "for a folder of its retired file store); give a database "
        "(sqlite:////ABSOLUTE/PATH/mlflow.db) or a server (http://HOST:PORT), or unset it to "
        "use the store under --mlruns")


def test_a_folder_where_the_database_goes_is_named(tmp_path: Path) -> None:
    (tmp_path / "mlruns" / "mlflow.db").mkdir(parents=True)
    with pytest.raises(ModelNotFoundError, match=r"mlflow.db is not a file, where the "
                       "MLflow store's sqlite database goes; move it away"):
        tracking.require_store("models:/parts@champion", tmp_path / "mlruns")


def test_an_empty_database_file_is_not_made_a_store_by_reading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model reads the store: an empty file there is reported, not given
    MLflow's tables (as opening it would)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    db.touch()
    for where in ({"mlruns": tmp_path / "mlruns"}, {}):
        if not where:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
        with pytest.raises(ModelNotFoundError, match=f"cannot load models:/parts@champion: "
                                                     f"{re.escape(str(db))} is an empty "
                                                     r"file, not an MLflow store \(nothing "
                                                     r"was trained or logged there\)"):
            tracking.require_store("models:/parts@champion", **where)
    assert db.stat().st_size == 0


@pytest.mark.parametrize("given", ["mlruns", "environment"])
def test_a_damaged_database_file_is_named_not_the_folder_permissions(
        given: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database file that is not one (overwritten, a bad copy): the fix is the file, not
    the folder's permissions the message once sent the user to check."""
    db = tmp_path / "mlruns" / "mlflow.db"
    (tmp_path / "mlruns" / "artifacts").mkdir(parents=True)
    db.write_bytes(b"not a database, but text long enough to fill a page " * 100)
    if given == "mlruns":
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    with pytest.raises(tracking.TrackingError) as info:
        tracking.configure(tmp_path / "mlruns" if given == "mlruns" else None)
    said = str(info.value)
    assert "file is not a database" in said
    assert f"; {db} is damaged or not an MLflow database; restore it from a backup, or " \
        + ("pass another --mlruns DIR" if given == "mlruns"
           else "point MLFLOW_TRACKING_URI at another database") in said
    assert "writable" not in said and "server" not in said


def test_a_database_another_process_holds_is_not_blamed_on_the_folder(
        mlruns: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sqlite's "database is locked" after MLflow's 20 s wait: another process holds the
    store; the folder's permissions, which the message sent the user to check, are fine.
    The store is really locked (an open exclusive transaction); the open that meets it
    is sqlite's own, without MLflow's wait, so that the test takes no 20 s."""
    import sqlite3

    from anomaly_flow.tracking import store

    holder = sqlite3.connect(mlruns / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")

    def open_store(*args: Any, **kwargs: Any) -> None:
        sqlite3.connect(mlruns / "mlflow.db", timeout=0).execute("SELECT 1 FROM experiments")

    monkeypatch.setattr(store, "_open_store", open_store)
    try:
        with pytest.raises(tracking.TrackingError) as info:
            tracking.configure(mlruns)
    finally:
        holder.rollback()
        holder.close()
    said = str(info.value)
    assert said.startswith(f"cannot open the MLflow tracking store sqlite:///{mlruns}/mlflow.db"
                           ": database is locked; another process has held the database for "
                           "longer than a command waits"), said
    assert "writable" not in said


def test_a_server_that_is_down_is_reported_in_seconds(
        monkeypatch: pytest.MonkeyPatch, free_port: int) -> None:
    import time

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port}")
    start = time.monotonic()
    with pytest.raises(tracking.TrackingError,
                       match="check MLFLOW_TRACKING_URI and that the server is running"):
        tracking.configure()
    assert time.monotonic() - start < 30  # MLflow's own retries take about four minutes
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_a_server_that_is_down_is_one_short_line(
        monkeypatch: pytest.MonkeyPatch, free_port: int,
        caplog: pytest.LogCaptureFixture) -> None:
    """Not urllib3's "Retrying ..." warning before it, nor MLflow's nested exception text."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port}")
    pool = logging.getLogger("urllib3.connectionpool")
    level = pool.level
    with caplog.at_level(logging.WARNING), pytest.raises(tracking.TrackingError) as info:
        tracking.configure()
    assert str(info.value) == (
        f"cannot open the MLflow tracking store http://127.0.0.1:{free_port}: the server is "
        "unreachable (connection refused: nothing listens at that address and port); check "
        "MLFLOW_TRACKING_URI and that the server is running")
    assert not [r for r in caplog.records if r.name.startswith("urllib3")]
    assert pool.level == level


def test_a_training_logged_to_a_server_that_is_down_leaves_no_files(
        monkeypatch: pytest.MonkeyPatch, free_port: int, image_dirs: ImageDirs,
        tmp_path: Path) -> None:
    """The store is opened before the name's lock file is made: a server that is down
    left <mlruns>/checkpoints/.NAME.lock (in ./mlruns by default) and nothing else."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port}")
    with pytest.raises(tracking.TrackingError, match="the server is unreachable"):
        tracking.train_and_register(image_dirs.train, "parts", tiny_config(1), device="cpu",
                                    mlruns=tmp_path / "mlruns")
    assert not (tmp_path / "mlruns").exists()


def test_the_store_configure_was_given_is_the_one_later_calls_use(
        image_dirs: ImageDirs, tmp_path: Path, mlflow_db_template: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``configure(folder)`` as the README's Python API begins, then the library's calls
    without ``mlruns``: training, its checkpoints, evaluation and promotion went to a new
    ./mlruns instead (or failed on its absence); a command run in the same process
    without --mlruns still means ./mlruns."""
    from click.testing import CliRunner

    from anomaly_flow.cli import main
    from anomaly_flow.evaluation import evaluate_model

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    store = new_store(tmp_path / "store", mlflow_db_template)
    tracking.configure(store)
    outcome = tracking.train_and_register(image_dirs.train, "kept", tiny_config(1),
                                          device="cpu", progress=False)
    assert outcome.version == "1"
    assert (store / "checkpoints" / "kept").is_dir()
    evaluated = evaluate_model("models:/kept@candidate", image_dirs.test_normal,
                               image_dirs.test_anomalous, device="cpu", progress=False)
    assert mlflow.get_run(evaluated.run_id).info.status == "FINISHED"
    assert tracking.load_model("models:/kept/1", device="cpu").version == "1"
    assert list(work.iterdir()) == []

    result = CliRunner().invoke(main, ["promote", "models:/kept/1"])
    assert result.exit_code == 1
    assert f"there is no MLflow store at {work / 'mlruns' / 'mlflow.db'}" in result.output
    assert list(work.iterdir()) == []
    # and after the command, the store configured before it again
    assert tracking.load_model("models:/kept/1", device="cpu").version == "1"
    assert tracking.mlruns_dir() == store
    assert list(work.iterdir()) == []


def test_a_store_that_fails_to_open_leaves_the_one_configured_before(
        tmp_path: Path, mlflow_db_template: Path) -> None:
    """MLflow's URI pointed at the broken store while the checkpoints' folder stayed at
    the one before: plain MLflow calls then read the broken one."""
    good = new_store(tmp_path / "good", mlflow_db_template)
    tracking.configure(good)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "mlflow.db").write_bytes(b"not a database" * 100)
    with pytest.raises(tracking.TrackingError, match="damaged or not an MLflow database"):
        tracking.configure(broken)
    assert mlflow.get_tracking_uri() == f"sqlite:///{good / 'mlflow.db'}"
    assert tracking.mlruns_dir() == good


def test_a_server_that_takes_the_connection_but_never_answers_is_said_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung server (or a port something else listens on) accepts the connection: it is
    reachable, but silent, which "no connection could be made" told the wrong way round."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nothing ever reads or answers
        port = silent.getsockname()[1]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
        with pytest.raises(tracking.TrackingError) as info:
            tracking.configure()
    assert str(info.value) == (
        f"cannot open the MLflow tracking store http://127.0.0.1:{port}: the server is "
        "unreachable (no answer in time: something listens at that address and port but "
        "sent nothing back); check "
        "MLFLOW_TRACKING_URI and that the server is running")


def test_mlruns_given_beside_the_environment_store_is_named(
        tmp_path: Path, mlflow_db_template: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    store = new_store(tmp_path / "env-store", mlflow_db_template)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with caplog.at_level(logging.WARNING):
        assert tracking.configure(tmp_path / "typed") == uri
    assert f"MLFLOW_TRACKING_URI is set, so runs and models go to {uri}, not to the store " \
        f"in {tmp_path / 'typed'}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a command configures more than once: said once
        tracking.configure(tmp_path / "typed")
    assert "MLFLOW_TRACKING_URI is set" not in caplog.text
    # the environment naming the --mlruns store itself (the README's export for MLflow's
    # own tools, here through a relative path) is no news
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert tracking.configure(Path("env-store")) == uri
    assert "MLFLOW_TRACKING_URI is set" not in caplog.text


def test_a_database_given_by_the_environment_keeps_its_artifacts_beside_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow would put them in ./mlruns of whatever folder a command ran in, MLflow's own
    Default experiment included: a store that cannot be moved or deleted as one."""
    elsewhere = tmp_path / "working-folder"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    db = tmp_path / "shared" / "mlflow.db"  # a new database in a new folder
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    tracking.configure()
    (tmp_path / "a.json").write_text("{}")
    with tracking.start_run("env-parts", "train") as run:
        run.log_artifact(tmp_path / "a.json")
    client = mlflow.MlflowClient()
    for name in ("env-parts", "Default"):
        location = Path(client.get_experiment_by_name(name).artifact_location)
        assert location.parent == db.parent / "mlflow-artifacts", (name, location)
    assert list((db.parent / "mlflow-artifacts" / "env-parts").rglob("a.json"))
    assert list(elsewhere.iterdir()) == []  # nothing in the folder the command ran in

    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the store under --mlruns: the same
    store = tmp_path / "default-store"
    tracking.configure(store)
    assert Path(mlflow.MlflowClient().get_experiment("0").artifact_location) \
        == store / "artifacts" / "0"
    # that store named through the variable (as MLflow's own tools need): its artifacts/
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    tracking.configure()
    tracking.ensure_experiment("env-parts-too")
    assert Path(mlflow.MlflowClient().get_experiment_by_name("env-parts-too")
                .artifact_location) == store / "artifacts" / "env-parts-too"
    # opening a store makes nothing beside it (a read-only one stays readable): the
    # artifacts folder comes with the first artifact
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copyfile(store / "mlflow.db", plain / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{plain / 'mlflow.db'}")
    tracking.configure()
    assert [p.name for p in plain.iterdir()] == ["mlflow.db"]


def test_a_model_name_is_claimed_once_and_kept_from_other_owners(mlruns: Path) -> None:
    tracking.claim_model_name("claimed-parts", "demo")  # new: created with the tag
    tracking.claim_model_name("claimed-parts", "demo")  # ours already
    client = mlflow.MlflowClient()
    assert client.get_registered_model("claimed-parts").tags == {"anomaly_flow.owner": "demo"}
    with pytest.raises(tracking.TrackingError, match="already holds a registered model "
                                                     "'claimed-parts' that anomaly-flow's "
                                                     "pipeline did not make"):
        tracking.claim_model_name("claimed-parts", "pipeline")
    client.create_registered_model("made-by-hand")
    with pytest.raises(tracking.TrackingError, match="'made-by-hand'"):
        tracking.claim_model_name("made-by-hand", "demo")
    tracking.claim_model_name("made-by-hand", "demo", check=False)  # a store of its own
    assert client.get_registered_model("made-by-hand").tags == {"anomaly_flow.owner": "demo"}
    assert tracking.ui_command("http://127.0.0.1:5000") \
        == "open http://127.0.0.1:5000 in a browser (the tracking server's UI)"
    assert tracking.ui_command(f"sqlite:///{mlruns}/mlflow.db") \
        == f"mlflow ui --backend-store-uri sqlite:///{mlruns}/mlflow.db"
    # a folder name a shell would split or act on is quoted: the line can be pasted
    assert tracking.ui_command("sqlite:////data/my runs & co/mlflow.db") \
        == "mlflow ui --backend-store-uri 'sqlite:////data/my runs & co/mlflow.db'"


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


# ------------------------------------------------------------------- training runs


def test_training_run_has_params_metrics_artifacts_tags_and_candidate(
        trained: TrainedModel, tmp_path: Path) -> None:
    client = mlflow.MlflowClient()
    run = client.get_run(trained.run_id)
    params = run.data.params
    assert params["model.levels"] == str(trained.config.model.levels)
    assert params["train.epochs"] == "2" and params["train.lr"] == str(trained.config.train.lr)
    assert params["data.n_images"] == "48"
    # MLflow records the packaged model's load-time setting as a param (README: "MLflow")
    assert params["device"] == "auto"
    steps = client.get_metric_history(trained.run_id, "train_bpd")
    assert len(steps) >= 4 and [m.step for m in steps] == sorted(m.step for m in steps)
    assert len(client.get_metric_history(trained.run_id, "val_bpd")) == 2  # per epoch
    for key in ("images_per_sec", "skipped_steps", "lr", "images_per_sec_epoch"):
        assert key in run.data.metrics
    assert np.isclose(run.data.metrics["val_bpd"], trained.val_bpd)
    files = {f.path for f in client.list_artifacts(trained.run_id)}
    assert {"config.json", "samples.png", "training_curves.png"} <= files
    config = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=trained.run_id, artifact_path="config.json", dst_path=str(tmp_path))
        ).read_text())
    assert config == trained.config.to_dict()
    tags = run.data.tags
    assert len(tags["data_fingerprint"]) == 64
    assert (tags["device"], tags["precision"]) == ("cpu", "float32")
    assert tags["data_folder"] == str(trained.data.resolve())
    assert tags["data_shapes"] == "28×28 (all 48 looked at)"  # the sample's Fashion-MNIST
    commit = tracking.git_commit()
    assert tags.get("git_commit") == commit  # present whenever the tests run in a checkout
    version = client.get_model_version_by_alias(trained.name, "candidate")
    assert str(version.version) == trained.version and version.run_id == trained.run_id
    assert version.tags["training_run_id"] == trained.run_id
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == trained.name
    checkpoints = tracking.checkpoint_dir(trained.name, trained.mlruns)
    assert (checkpoints / "latest").is_file() and (checkpoints / "run.json").is_file()


def test_model_loads_the_same_from_every_kind_of_uri(trained: TrainedModel,
                                                     tmp_path: Path) -> None:
    by_alias = tracking.load_model(trained.alias_uri)
    assert (by_alias.name, by_alias.version, by_alias.run_id) == (
        trained.name, trained.version, trained.run_id)
    assert by_alias.calibration is None
    mlflow_folder = mlflow.artifacts.download_artifacts(trained.alias_uri,
                                                        dst_path=str(tmp_path / "mlflow"))
    plain_folder = by_alias.model.save(tmp_path / "plain")
    others = {
        trained.version_uri: tracking.load_model(trained.version_uri),
        trained.run_uri: tracking.load_model(trained.run_uri),
        "mlflow folder": tracking.load_model(mlflow_folder),
        "plain folder": tracking.load_model(str(plain_folder)),
    }
    assert others[trained.run_uri].run_id == trained.run_id
    assert others["mlflow folder"].run_id == trained.run_id
    reference = by_alias.model.state_dict()
    assert by_alias.model.training_shapes == ((28, 28, 48),)
    for where, loaded in others.items():
        assert loaded.model.training_shapes == ((28, 28, 48),), where
        state = loaded.model.state_dict()
        assert state.keys() == reference.keys(), where
        assert all(torch.equal(state[k], reference[k]) for k in reference), where


def test_scoring_says_when_images_come_in_a_size_the_trained_model_never_saw(
        trained: TrainedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The registered model knows its training images were 28×28: a folder of 64×48
    photos is scored, with a warning that their size alone can make them look
    anomalous; a folder of 28×28 images gets none."""
    from anomaly_flow.folder_scoring import score_folder

    loaded = tracking.load_model(trained.alias_uri)
    photos, alike = tmp_path / "photos", tmp_path / "alike"
    rng = np.random.default_rng(0)
    for folder, shape in ((photos, (48, 64)), (alike, (28, 28))):
        folder.mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
                folder / f"{i}.png")
    caplog.set_level(logging.WARNING, logger="anomaly_flow")
    score_folder(loaded.model, None, photos, tmp_path / "photos.csv")
    said = [r.getMessage() for r in caplog.records if "none of the model's training" in
            r.getMessage()]
    assert said == [f"{photos}: all images looked at are of a size none of the model's "
                    "training images looked at had (e.g. 64×48; the training images were "
                    "28×28): brought to 16×16 (model.image_size) from another size than "
                    "they were, their detail (and proportions, where the aspect ratio "
                    "differs) is unlike every training image's, which alone can make them "
                    "score as anomalous; score images from the same source and size as the "
                    "training images, or train a model on images like these"]
    assert len(pd.read_csv(tmp_path / "photos.csv")) == 4  # scored all the same
    caplog.clear()
    score_folder(loaded.model, None, alike, tmp_path / "alike.csv")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # resumed, the notes speak of the files the run scores, not of the folder
    shutil.copy(photos / "0.png", alike / "photo.png")
    score_folder(loaded.model, None, alike, tmp_path / "alike.csv", resume=True)
    said = [r.getMessage() for r in caplog.records if "none of the model's training" in
            r.getMessage()]
    assert said and said[0].startswith(f"{alike} (the 1 file not scored before): all images "
                                       "looked at are of a size none")


@pytest.mark.parametrize(("uri", "message"), [
    ("models:/no-such-model@candidate", "no registered model 'no-such-model'"),
    ("models:/Tiny-Parts@candidate", "no registered model 'Tiny-Parts' in sqlite:///.* "
                                     r"\(did you mean 'tiny-parts'\?\); train one"),
    ("models:/tiny-parts@champion", "has no alias 'champion'"),
    ("models:/tiny-parts/99", "has no version 99"),
    ("models:/tiny-parts/99999999999999999999", "has no version 99999999999999999999"),
    ("models:/tiny-parts", "names a model but not which of its versions; use "
                           "models:/tiny-parts@candidate, models:/tiny-parts@champion or "
                           "models:/tiny-parts/VERSION"),
    ("runs:/0123456789abcdef0123456789abcdef/model", "no model at runs:/"),
    ("/no/such/folder", "that path does not exist"),
    (__file__, f"{__file__} is a file, not a model folder"),
    # other storage: its client library missing (as here), else what its store said
    ("s3://no-bucket/model", r"cannot read s3://no-bucket/model: MLflow needs the Python "
                             r"package '\w+' for that storage, and it is not installed; "
                             r"install it \(boto3 for s3://|no model at s3://no-bucket"),
    # a web address: what MLflow reads there and what to do (not its parser's Python error,
    # "not enough values to unpack")
    ("http://127.0.0.1:9/model", r"^cannot load a model from the web address "
                                 r"http://127\.0\.0\.1:9/model: MLflow reads such an "
                                 r"address only as a model folder on an MLflow artifact "
                                 r"server; download the model folder and give its local path"),
    ("https://x/y", r"^cannot load a model from the web address https://x/y: MLflow"),
])
def test_missing_models_give_one_line_errors(trained: TrainedModel, uri: str,
                                             message: str) -> None:
    with pytest.raises(ModelNotFoundError, match=message) as info:
        tracking.load_model(uri)
    assert "\n" not in str(info.value)


def test_a_damaged_registry_is_not_called_a_missing_model(
        trained: TrainedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store whose registry tables are broken: MLflow's error, not "train one first"."""
    import sqlite3

    from mlflow.exceptions import MlflowException

    shutil.copy(trained.mlruns / "mlflow.db", tmp_path / "mlflow.db")
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute("DROP TABLE registered_model_aliases")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.configure()
    with pytest.raises(MlflowException) as info:
        tracking.load_model(f"models:/{trained.name}@candidate")
    assert not isinstance(info.value, ModelNotFoundError)
    assert "registered_model_aliases" in str(info.value)


def test_a_model_whose_files_were_moved_away_is_named_so(trained: TrainedModel) -> None:
    artifacts = trained.mlruns / "artifacts"
    away = trained.mlruns / "artifacts.away"
    artifacts.rename(away)
    try:
        with pytest.raises(ModelNotFoundError, match=r"models:/tiny-parts@candidate is known "
                                                     r"to sqlite:///.*, but none of its files "
                                                     r"came from the artifact store \(MLflow "
                                                     r"looked in .*/artifacts/.*\): .* was "
                                                     r"moved or deleted \(MLflow records absolute "
                                                     r"paths, so a moved or copied store"):
            tracking.load_model(trained.alias_uri)
    finally:
        away.rename(artifacts)


def test_a_store_moved_whole_still_loads_its_models(
        trained: TrainedModel, caplog: pytest.LogCaptureFixture) -> None:
    """Moved with its database to another --mlruns (a bigger disk), the store records
    the absolute paths of where it was made: its models read from the same place below
    its own artifacts folder, with a warning, not "train and register it again"."""
    moved = trained.mlruns.parent / "elsewhere" / "mlruns"
    moved.parent.mkdir()
    trained.mlruns.rename(moved)
    try:
        tracking.configure(moved)
        loaded = tracking.load_model(trained.alias_uri)
        assert (loaded.name, loaded.version) == (trained.name, trained.version)
        assert f"which is gone; reading them from {moved / 'artifacts'}/" in caplog.text
    finally:
        moved.rename(trained.mlruns)
        moved.parent.rmdir()
        tracking.configure(trained.mlruns)
    reference = tracking.load_model(trained.alias_uri).model.state_dict()
    assert all(torch.equal(value, reference[key])
               for key, value in loaded.model.state_dict().items())


@pytest.mark.parametrize(("damage", "said"), [
    ("model.safetensors", r"is damaged or incomplete"),
    ("config.json", r"is not a model configuration anomaly-flow can read"),
])
@pytest.mark.parametrize("uri_kind", ["alias_uri", "run_uri"])
def test_a_damaged_stored_model_names_the_store_file_not_a_temporary_copy(
        trained: TrainedModel, damage: str, said: str, uri_kind: str) -> None:
    """The files are downloaded to a temporary folder, gone when the user reads the
    message: the message names the file in the store's artifacts."""
    originals = {path: path.read_bytes()
                 for path in (trained.mlruns / "artifacts").rglob(damage)}
    assert originals
    try:
        for path, data in originals.items():
            path.write_bytes(data[: len(data) // 2])
        with pytest.raises(ModelFileError, match=said) as info:
            tracking.load_model(getattr(trained, uri_kind))
    finally:
        for path, data in originals.items():
            path.write_bytes(data)
    named = Path(str(info.value).split(" ", 1)[0])
    assert named in originals, str(info.value)


def test_a_damaged_calibration_file_is_named(trained: TrainedModel, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    tracking.load_model(trained.alias_uri).model.save(folder)
    for damaged, said in (("{", "is not valid JSON"), ("[]", "must be a JSON object"),
                          ('{"schema_version": 1}', "")):
        (folder / "calibration.json").write_text(damaged)
        with pytest.raises(ModelFileError, match=rf"^{re.escape(str(folder))}/calibration.json "
                                                 rf"is not a calibration anomaly-flow can read "
                                                 rf"\(.*{said}.*\); copy or download the model "
                                                 "again, or calibrate"):
            tracking.load_model(str(folder))
    (folder / "calibration.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ModelFileError, match=r"calibration\.json is not a calibration"):
        tracking.load_model(str(folder))


def test_the_readmes_python_api_runs(trained: TrainedModel, image_dirs: ImageDirs,
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python example, as written, with this test's store, model and folder
    in place of its made-up names."""
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    code = re.search(r"## Python API\n+```python\n(.*?)```", readme, re.DOTALL)
    assert code is not None
    source = code.group(1)
    for made_up, real in (("path/to/mlruns", str(trained.mlruns)),
                          ("models:/bottles@champion", trained.alias_uri),
                          ("incoming/", str(image_dirs.test_normal))):
        assert made_up in source
        source = source.replace(made_up, real)
    monkeypatch.chdir(tmp_path)
    names: dict[str, Any] = {}
    exec(compile(source, "README.md", "exec"), names)
    n_images = len(image_dirs.files(image_dirs.test_normal))
    assert names["summary"].n_scored == n_images
    assert len(pd.read_csv(tmp_path / "scores.csv")) == n_images
    parts = names["parts"]
    torch.testing.assert_close(parts.bpd, 8 + parts.level_bits.sum(dim=1))

    # the next example: every column of images in memory, as `score` wrote them above
    after = readme[code.end():]
    every = re.search(r"```python\n(.*?)```", after, re.DOTALL)
    assert every is not None and "paths_or_png_bytes" in every.group(1)
    files = image_dirs.files(image_dirs.test_normal)
    names["paths_or_png_bytes"] = [path.read_bytes() for path in files]
    exec(compile(every.group(1), "README.md", "exec"), names)
    written = pd.read_csv(tmp_path / "scores.csv")
    assert written["path"].tolist() == [str(path) for path in files]
    columns = [c for c in written.columns if c not in ("path", "error")]
    in_memory = names["table"][columns].astype({"is_anomaly": float})  # NA as CSV reads it
    pd.testing.assert_frame_equal(in_memory.reset_index(drop=True), written[columns],
                                  check_exact=True, check_dtype=False)


def test_a_folder_without_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="holds no model"):
        tracking.load_model(str(tmp_path))


def test_input_sources_take_the_bytes_else_the_path_and_blank_is_no_image() -> None:
    frame = pd.DataFrame({"path": ["a.png", "b.png", "", "  ", None, None],
                          "image": [b"PNG", None, None, None, b"", np.nan]})
    assert input_sources(frame) == [b"PNG", "b.png", None, None, None, None]
    # a blank path is "no image given", not the working directory
    grey_16 = GlowConfig(image_size=16, levels=2)
    dataset = ScoringDataset(input_sources(pd.DataFrame({"path": [""]})), grey_16)
    assert dataset[0].error == "no image given (empty value)"
    odd = input_sources(pd.DataFrame({"path": [3, Path("c.png"), None],
                                      "image": [None, None, bytearray(b"PNG")]}))
    assert odd[1:] == ["c.png", b"PNG"]
    dataset = ScoringDataset(odd, grey_16)
    assert dataset[0].error == "the 'path' value is an int (3), not a string; pass one file " \
        "path per row"


def test_a_path_as_a_scores_table_prints_it_is_read_back(tmp_path: Path) -> None:
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")  # Latin-1, not UTF-8
    Path(os.fsdecode(raw)).write_bytes(b"PNG")
    printed = f"{tmp_path}/caf\\xe9.png"  # the scores table's `path` of that file
    assert input_sources(pd.DataFrame({"path": [printed]})) == [os.fsdecode(raw)]


def test_pyfunc_answers_empty_input_and_refuses_bad_params_clearly() -> None:
    wrapper = tiny_wrapper()
    empty = wrapper.predict(None, pd.DataFrame({"path": []}))  # type: ignore[arg-type]
    assert len(empty) == 0 and list(empty.columns) == output_columns(wrapper.model)
    failed = wrapper.predict(None, pd.DataFrame({"path": ["missing.png"]}))  # type: ignore[arg-type]
    for answer in (empty, failed):  # the signature's doubles, rows or none, failed or not
        for name in ("bpd", "complexity", "level_1", "score", "p_value"):
            assert answer[name].dtype == np.float64, name
    for columnless, empty_too in ((pd.DataFrame(index=[0, 1]), ""),  # what MLflow leaves
                                  (pd.DataFrame(), "; an empty request, or a plain list of "
                                   "values that is no table, reads the same")):
        with pytest.raises(PredictError, match=r"the input has no 'path' or 'image' column "
                                               r"\(MLflow drops every column the model's "
                                               r"signature does not name, a misspelt one too, "
                                               r"before the model sees the input"
                                               + re.escape(empty_too) + r"\), but the model "
                                               r"needs a 'path'") as info:
            wrapper.predict(None, columnless)  # type: ignore[arg-type]
        assert isinstance(info.value, ValueError)  # for Python callers
        assert info.value.get_http_status_code() == 400  # for REST clients
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="the threshold param must be a finite score"):
            wrapper.predict(None, pd.DataFrame({"path": ["x.png"]}),  # type: ignore[arg-type]
                            params={"threshold": bad})
    with pytest.raises(ValueError, match="has columns \\['foo'\\], but the model needs"):
        wrapper.predict(None, pd.DataFrame({"foo": ["x"]}))  # type: ignore[arg-type]
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"the batch_size param must be a positive number "
                                             f"of images, not {bad}"):
            wrapper.predict(None, pd.DataFrame({"path": ["x.png"]}),  # type: ignore[arg-type]
                            params={"batch_size": bad})


def test_a_batch_that_does_not_fit_is_a_400_naming_the_batch_size_param(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of memory once reached a REST client as MLflow's "unexpected error" with a
    stack trace (only an MlflowException keeps its message), and a Python caller was told
    to lower --batch-size, an option the model does not have."""
    from mlflow.pyfunc import scoring_server

    def out_of_memory(self: Glow, x: torch.Tensor) -> Any:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                           "allocate 123456789 bytes. Error code 12 (Cannot allocate memory)")

    wrapper = tiny_wrapper()
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes())
    monkeypatch.setattr(Glow, "forward", out_of_memory)
    with pytest.raises(PredictError, match=(
            r"^scoring ran out of memory on cpu \(an allocation of 117\.7 MiB failed\) with "
            r"batch_size = 256 \(the batch_size param\), \d+ images a forward pass here; ")
    ) as info:
        wrapper.predict(None, pd.DataFrame({"path": [str(image)] * 2}))  # type: ignore[arg-type]
    assert info.value.get_http_status_code() == 400

    class Loaded:  # what mlflow.pyfunc.load_model wraps the pyfunc in
        def predict(self, data: Any, params: dict | None = None) -> pd.DataFrame:
            return wrapper.predict(None, data, params)  # type: ignore[arg-type]

    model = mlflow.pyfunc.PyFuncModel(model_meta=mlflow.models.Model(), model_impl=Loaded())
    with pytest.raises(MlflowException) as served:  # what `mlflow models serve` answers
        scoring_server.invocations(json.dumps({"inputs": {"path": [str(image)] * 2}}),
                                   "application/json", model, None)
    answer = json.loads(served.value.serialize_as_json())
    assert served.value.get_http_status_code() == 400
    assert "batch_size = 256 (the batch_size param)" in answer["message"]
    assert "stack_trace" not in answer


def test_predict_from_two_threads_at_once_leaves_the_process_as_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scoring sets process-wide state for its duration (warning filters while an image
    decodes; on CUDA, torch's TF32 and cuDNN flags) and restores what it saw on entry: two
    calls at once each restored the other's, which left "ignore every warning" in force
    in the process for good (and, on CUDA, TF32 on for a call still running)."""
    wrapper = tiny_wrapper()
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes())
    opened, entered, second_in = Image.open, [], threading.Event()

    def slow_open(*args: Any, **kwargs: Any) -> Image.Image:
        # the first decode waits (a while) for the other call's to begin, and ends first
        entered.append(None)
        if len(entered) == 1:
            second_in.wait(timeout=1)
        else:
            second_in.set()
            time.sleep(0.2)
        return opened(*args, **kwargs)

    monkeypatch.setattr(Image, "open", slow_open)
    before = list(warnings.filters)
    answers: list[pd.DataFrame] = []
    threads = [threading.Thread(target=lambda: answers.append(wrapper.predict(
        None, pd.DataFrame({"path": [str(image)]})))) for _ in range(2)]  # type: ignore[arg-type]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert warnings.filters == before
    assert len(answers) == 2 and answers[0]["bpd"].equals(answers[1]["bpd"])


def test_a_column_mlflow_packed_into_one_cell_is_a_row_per_image(tmp_path: Path) -> None:
    """MLflow turns ``{"inputs": {"path": ["a.png", "b.png"]}}`` (REST) and
    ``predict({"path": [...]})`` into one row holding the list, unless the list has a
    null in it; both must be answered with a row per image."""
    wrapper = tiny_wrapper()
    files = [tmp_path / "a.png", tmp_path / "b.png"]
    for value, file in enumerate(files):
        file.write_bytes(png_bytes(value))
    paths = [str(f) for f in files]
    schema = model_signature(wrapper.model).inputs
    packed = _enforce_schema({"path": paths}, schema)
    assert len(packed) == 1  # what MLflow gives the model
    with_null = _enforce_schema({"path": [*paths, None]}, schema)
    by_list = wrapper.predict(None, packed)  # type: ignore[arg-type]
    by_rows = wrapper.predict(None, with_null)  # type: ignore[arg-type]
    assert (by_list["error"] == "").all() and len(by_list) == 2
    assert by_list["bpd"].tolist() == by_rows["bpd"].tolist()[:2]
    images = [base64.b64encode(f.read_bytes()).decode() for f in files]
    by_bytes = wrapper.predict(None, _enforce_schema({"image": images}, schema))  # type: ignore[arg-type]
    assert by_bytes["bpd"].tolist() == by_list["bpd"].tolist()
    both = rows_from_columns(pd.DataFrame({"path": [paths], "image": [None]}))
    assert both["path"].tolist() == paths and both["image"].tolist() == [None, None]
    empty = wrapper.predict(None, _enforce_schema({"path": []}, schema))  # type: ignore[arg-type]
    assert len(empty) == 0
    # not what MLflow packs: left as it is, an error in its one row
    for cell in ([1, 2], np.array(paths)):
        unchanged = pd.DataFrame({"path": [cell]})
        assert rows_from_columns(unchanged) is unchanged
    uneven = pd.DataFrame({"path": [paths], "image": [images[:1]]})
    with pytest.raises(PredictError, match=r"^the input's columns hold lists of different "
                                           r"lengths \(2 in 'path' and 1 in 'image'\), so"):
        rows_from_columns(uneven)  # one row back would drop a path without a word
    with pytest.raises(PredictError, match=r"\(3 in 'path' and 2 in 'image'\)"):
        rows_from_columns(pd.DataFrame({"path": [[*paths, paths[0]]], "image": [[None, "x"]]}))
    # the advice followed: one value per image, null where it has none
    followed = rows_from_columns(pd.DataFrame({"path": [[paths[0], None]],
                                               "image": [[None, images[1]]]}))
    assert followed["path"].tolist() == [paths[0], None]
    assert followed["image"].tolist() == [None, images[1]]


def test_a_file_uri_is_its_file_and_other_uris_and_bytes_say_what_to_do(
        tmp_path: Path) -> None:
    """Spark's binaryFile source gives ``file:/...`` paths; bytes in the path column are
    what ``spark_udf(...)("content")`` sends (it names unnamed columns path first)."""
    folder = tmp_path / "my parts"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"PNG")
    local = str(folder / "a.png")
    uris = [f"file:{local}", f"file://{local}", f"file://localhost{local}",
            f"file:{local.replace(' ', '%20')}"]
    assert input_sources(pd.DataFrame({"path": uris})) == [local] * 4
    assert input_sources(pd.DataFrame({"path": [f"FILE://{local}"]})) == [local]
    # another host's file is not this one's /HOST/...: the URI message answers it
    (other_host,) = input_sources(pd.DataFrame({"path": [f"file://fileserver{local}"]}))
    assert isinstance(other_host, InvalidSource)
    assert "the model reads local files only" in other_host.reason
    remote, raw = input_sources(pd.DataFrame({"path": ["s3://bucket/a.png", b"\x89PNG"]}))
    assert isinstance(remote, InvalidSource) and isinstance(raw, InvalidSource)
    assert "is a URI ('s3://bucket/a.png'); the model reads local files only" in remote.reason
    assert "pass them in the 'image' column" in raw.reason
    assert "struct(col(...).alias('image'))" in raw.reason


def test_base64_as_bytes_and_data_uris_are_the_image_they_encode() -> None:
    """``base64.b64encode(data)`` gives bytes, not text; a browser's ``readAsDataURL`` gives
    ``data:image/png;base64,...``: both were "not an image" / "not base64"."""
    png = png_bytes()
    text = base64.b64encode(png).decode()
    sources = input_sources(pd.DataFrame({"image": [
        text.encode(), base64.encodebytes(png), f"data:image/png;base64,{text}",
        "DATA:image/png;base64," + text, b"PNG", base64.b64encode(b"hello")]}))
    assert sources == [png, png, png, png, b"PNG", base64.b64encode(b"hello")]
    grey_8 = GlowConfig(image_size=8, levels=2, steps_per_level=1, hidden_channels=4)
    assert ScoringDataset(sources, grey_8)[0].ok


def test_a_path_root_confines_a_served_model_to_one_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A served model read any file its process could, and its row errors told a client
    which paths exist ("file not found" / "not a regular file"): with
    ANOMALY_FLOW_PATH_ROOT it reads under one folder, and everything outside gets one
    answer."""
    root = tmp_path / "served"
    (root / "parts").mkdir(parents=True)
    (root / "parts" / "a.png").write_bytes(png_bytes(7))
    (root / "parts" / "b\udcff.png").write_bytes(png_bytes(7))  # a name not UTF-8
    (tmp_path / "secret.png").write_bytes(png_bytes(9))
    (tmp_path / "xA.png").write_bytes(png_bytes(9))  # file:...x%41.png, decoded
    (root / "parts" / "leak.png").symlink_to(tmp_path / "secret.png")
    folder = tiny_wrapper().model.save(tmp_path / "glow")
    context = mlflow.pyfunc.PythonModelContext(artifacts={"glow": str(folder)},
                                               model_config={"device": "cpu"})
    unconfined = GlowPyfunc()
    unconfined.load_context(context)
    monkeypatch.setenv("ANOMALY_FLOW_PATH_ROOT", str(root / "parts" / ".."))
    confined = GlowPyfunc()
    confined.load_context(context)
    assert confined.root == str(root)
    inside = ["parts/a.png", str(root / "parts" / "a.png"), f"file://{root}/parts/a.png",
              "parts/../parts/a.png", f"file:{root}/parts/%61.png", "parts/b\\xff.png"]
    # whether a file is there or not, outside is one answer: secret.png and xA.png exist
    outside = [str(tmp_path / "secret.png"), str(tmp_path / "nothing.png"), "../secret.png",
               "parts/leak.png", "/", f"file://{tmp_path}/x%41.png",
               f"file://{tmp_path}/y%41.png"]
    answer = confined.predict(None, pd.DataFrame({"path": inside + outside}))  # type: ignore[arg-type]
    expected = unconfined.predict(None, pd.DataFrame(  # type: ignore[arg-type]
        {"path": [str(root / "parts" / "a.png")]}))["bpd"].item()
    n = len(inside)
    assert answer["bpd"].tolist()[:n] == [expected] * n
    assert answer["error"].tolist()[:n] == [""] * n
    for name, error in zip(outside, answer["error"].tolist()[n:], strict=True):
        assert error == (f"the 'path' value {name!r} is outside the one folder this model "
                         "reads (ANOMALY_FLOW_PATH_ROOT); pass a path under it, relative to "
                         "it or whole, or the file's bytes in the 'image' column")
    assert answer["bpd"].iloc[n:].isna().all()
    # no file name can be these: an error in their rows, the others still answered
    odd = confined.predict(None, pd.DataFrame(  # type: ignore[arg-type]
        {"path": ["a\x00b.png", "a\ud800.png", "parts/a.png", "http://host/a.png"]},
        dtype=object))
    assert odd["error"].tolist()[:2] == [
        f"the 'path' value {name!r} is not a file name this model can read (it holds a NUL "
        "character, a lone surrogate, or another drive's name)"
        for name in ("a\x00b.png", "a\ud800.png")]
    assert odd["bpd"].iloc[2] == expected
    assert odd["error"].iloc[3].startswith("the 'path' value is a URI ('http://host/a.png')")
    missing = confined.predict(None, pd.DataFrame({"path": ["parts/b.png"]}))  # type: ignore[arg-type]
    assert "not found" in missing["error"].item()  # inside, a file's absence is still said
    assert np.isfinite(confined.predict(None, pd.DataFrame(  # type: ignore[arg-type]
        {"image": [png_bytes(9)]}))["bpd"].item())  # bytes are no file: not confined
    (tmp_path / "a-file").write_text("")
    for bad in (str(tmp_path / "a-file"), str(tmp_path / "nowhere")):
        monkeypatch.setenv("ANOMALY_FLOW_PATH_ROOT", bad)
        with pytest.raises(ModelLoadError, match=(
                f"^ANOMALY_FLOW_PATH_ROOT is '{re.escape(bad)}', which is not a folder; set it "
                "to the folder whose images the model may read, or unset it")):
            GlowPyfunc().load_context(context)
    monkeypatch.setenv("ANOMALY_FLOW_PATH_ROOT", " ")
    assert path_root() is None


def test_a_calibration_of_a_score_the_model_lacks_is_refused_at_load(tmp_path: Path) -> None:
    """Refused by every predict, it reached REST clients as "verify that the serialized
    input Dataframe is compatible with the model" with a stack trace."""
    folder = tiny_wrapper().model.save(tmp_path / "glow")
    calibration = calibrate("level_3", np.linspace(0, 1, 40), alpha=0.1)
    (folder / "calibration.json").write_text(calibration.to_json())
    context = mlflow.pyfunc.PythonModelContext(artifacts={"glow": str(folder)},
                                               model_config={"device": "cpu"})
    with pytest.raises(ModelFileError, match=r"calibration\.json calibrates score 'level_3', "
                                             r"which this model does not produce \(its "
                                             r"scores: bpd, .*level_2\); copy or download"):
        GlowPyfunc().load_context(context)
    # the library's loader (score, calibrate, evaluate) refuses it alike, not per batch
    with pytest.raises(ModelFileError, match=r"calibrates score 'level_3', which this model "
                                             r"does not produce"):
        tracking.load_model(str(folder))


@pytest.mark.parametrize("replaced", ["weights", "config"])
def test_a_model_put_in_place_of_the_calibrated_one_is_refused_at_load(
        replaced: str, tmp_path: Path) -> None:
    """A calibration's threshold and p-values hold for the model it was fitted to; other
    weights saved into the folder (Glow.save, a copied file), or a config that scores
    otherwise (n_bits), leave it stale, and a model with it would answer with confident,
    wrong verdicts."""
    wrapper = tiny_wrapper()
    folder = wrapper.model.save(tmp_path / "glow")
    calibration = calibrate("bpd", np.linspace(0, 1, 40), alpha=0.1,
                            model_digest=wrapper.model.digest())
    (folder / "calibration.json").write_text(calibration.to_json())
    assert tracking.load_model(str(folder)).calibration == calibration
    assert wrapper.model.digest() == Glow.load(folder).digest()
    if replaced == "weights":
        other = tiny_wrapper().model
        with torch.no_grad():
            next(other.parameters()).add_(1e-3)
        other.save(folder)
    else:
        (folder / "config.json").write_text(
            dataclasses.replace(wrapper.model.config, n_bits=5).to_json())
        other = Glow.load(folder)
    context = mlflow.pyfunc.PythonModelContext(artifacts={"glow": str(folder)},
                                               model_config={"device": "cpu"})
    said = (rf"^{re.escape(str(folder))}/calibration\.json was fitted to another model than "
            rf"the config\.json and model\.safetensors beside it \(its digest "
            rf"{calibration.model_digest[:12]}\.\.\., theirs {other.digest()[:12]}\.\.\.\): "
            r"they were replaced after calibration, .*; put back the files it was calibrated "
            r"with, or delete it to score uncalibrated and calibrate a registered version")
    for load in (lambda: tracking.load_model(str(folder)),
                 lambda: GlowPyfunc().load_context(context)):
        with pytest.raises(ModelFileError, match=said):
            load()


def test_predict_frame_refuses_another_models_calibration(tmp_path: Path) -> None:
    model = tiny_wrapper().model
    frame = pd.DataFrame({"image": [png_bytes()]})
    calibration = calibrate("bpd", np.linspace(0, 1, 40), alpha=0.1,
                            model_digest=model.digest())
    assert predict_frame(model, calibration, frame)["error"].tolist() == [""]
    with pytest.raises(CalibrationError, match=(
            r"^this calibration was fitted to the scores of another model \(its digest "
            r"000000000000\.\.\., this model's .*; predict with the calibration loaded with "
            r"this model \(load_model\(URI\)\.calibration\), or calibrate this model")):
        predict_frame(model, dataclasses.replace(calibration, model_digest="0" * 64), frame)


def test_log_model_records_the_model_and_refuses_another_models_calibration(
        mlruns: Path) -> None:
    model, other = tiny_wrapper().model, tiny_wrapper().model
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    bare = calibrate("bpd", np.linspace(0, 1, 40), alpha=0.1)
    with tracking.start_run("digests", "log") as run:
        logged = tracking.log_model(run, model, bare, artifact_path="a")
        stored = tracking.load_model(logged).calibration
        assert stored is not None and stored.model_digest == model.digest()
        assert stored == dataclasses.replace(bare, model_digest=model.digest())
        with pytest.raises(CalibrationError, match=(
                r"^this calibration was fitted to the scores of another model \(its digest "
                rf"{model.digest()[:12]}\.\.\., this model's {other.digest()[:12]}\.\.\.; a "
                r"digest covers the config and the weights\), so its threshold and p-values "
                "do not hold for this one; log it with the model it was fitted to, or "
                "calibrate")):
            tracking.log_model(run, other, stored, artifact_path="b")
        # a model converted to float64 (as Glow.check_input advises for float64 images)
        # is the same model: logged with its calibration, it loads as saved, in float32
        doubled = copy.deepcopy(model).double()
        uri = tracking.log_model(run, doubled, bare, artifact_path="c")
        assert tracking.load_model(uri).calibration == stored


@pytest.mark.parametrize("device", ["meta", "mps", "xpu"])
def test_a_device_the_model_cannot_score_on_is_refused_at_load(device: str,
                                                               tmp_path: Path) -> None:
    """torch knows these devices, so they once passed: ``meta`` loaded a model without
    weights that failed every request ("Cannot copy out of meta tensor"), ``mps`` and
    ``xpu`` failed in torch's words."""
    folder = tiny_wrapper().model.save(tmp_path / "glow")
    context = mlflow.pyfunc.PythonModelContext(artifacts={"glow": str(folder)},
                                               model_config={"device": device})
    with pytest.raises(Exception,
                       match=f"unknown device '{device}'; use auto, cpu, cuda or cuda:N"):
        GlowPyfunc().load_context(context)


def tiny_wrapper() -> GlowPyfunc:
    """The pyfunc over an 8×8 Glow, its ActNorms initialised on random images (scoring
    refuses a model never initialised), uncalibrated."""
    wrapper = GlowPyfunc()
    wrapper.model = Glow(GlowConfig(image_size=8, levels=2, steps_per_level=1,
                                    hidden_channels=4)).eval()
    noise = torch.Generator().manual_seed(0)
    wrapper.model.initialize(preprocess(
        torch.randint(0, 256, (4, 1, 8, 8), generator=noise, dtype=torch.uint8), 8))
    wrapper.calibration = None
    return wrapper


def png_bytes(value: int = 7) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, "PNG")
    return buffer.getvalue()


CELLS = st.one_of(st.none(), st.just(png_bytes()), st.binary(max_size=20), st.text(max_size=10),
                  st.integers(-5, 10**20), st.floats(), st.booleans(),
                  st.lists(st.integers(0, 255), max_size=4), st.just("/no/such/file.png"),
                  st.just("a\x00b.png"), st.just("a\ud800.png"), st.just(""))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_pyfunc_answers_every_row_of_any_table(data: st.DataObject) -> None:
    """Any mix of columns and cell values (what a REST client or a Spark table can send):
    one row out per row in, in the same order and index, scores or a reason in each; a
    table without a usable column is a PredictError (HTTP 400), never another exception.
    A path with a NUL character or a lone surrogate in it once raised out of the whole
    batch."""
    wrapper = tiny_wrapper()
    columns = data.draw(st.lists(st.sampled_from(["path", "image", "other", "Path"]),
                                 max_size=3, unique=True))
    n = data.draw(st.integers(0, 4))
    index = data.draw(st.sampled_from([None, list(range(10, 10 + n))]))
    cells = {c: [data.draw(CELLS) for _ in range(n)] for c in columns}
    try:
        frame = pd.DataFrame(cells, index=index if n else None)
    except UnicodeEncodeError:  # pandas' Arrow strings hold no lone surrogate; objects do
        frame = pd.DataFrame(cells, index=index if n else None, dtype=object)
    params = data.draw(st.sampled_from([None, {"threshold": 1.0}, {"batch_size": 1}]))
    try:
        out = wrapper.predict(None, frame, params=params)  # type: ignore[arg-type]
    except PredictError as error:
        assert str(error).strip()
        return
    assert list(out.columns) == output_columns(wrapper.model)
    # (a one-row frame of lists of strings is what MLflow makes of a columnar request)
    assert list(out.index) == list(rows_from_columns(frame).index)
    failed = out["error"] != ""
    assert out.loc[~failed, "bpd"].notna().all() and out.loc[failed, "bpd"].isna().all()


def test_pyfunc_predicts_the_library_bpd_from_paths_and_bytes(
        trained: TrainedModel, image_dirs: ImageDirs, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = tracking.load_model(trained.alias_uri, device=AUTO)
    files = image_dirs.files(image_dirs.test_normal)[:6] + image_dirs.files(
        image_dirs.test_anomalous)[:6]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    paths = [str(p) for p in files]
    expected = library_scores(loaded.model, paths)

    pyfunc = mlflow.pyfunc.load_model(trained.alias_uri)
    by_path = pyfunc.predict(pd.DataFrame({"path": [*paths, str(broken)]}))
    by_bytes = pyfunc.predict(pd.DataFrame({"image": [p.read_bytes() for p in files]}))

    columns = ["bpd", "complexity", "coarse_complexity", "typicality", "knn", "pixel_knn",
               "ensemble", "level_1", "level_2", "score", "p_value", "is_anomaly", "error"]
    assert list(by_path.columns) == columns
    np.testing.assert_array_equal(by_path["bpd"].to_numpy()[:-1], expected["bpd"].to_numpy())
    np.testing.assert_array_equal(by_bytes["bpd"].to_numpy(), expected["bpd"].to_numpy())
    for name in ("complexity", "coarse_complexity", "typicality", "knn", "pixel_knn",
                 "ensemble"):
        assert by_path[name].dtype == by_bytes[name].dtype == np.float64, name
        np.testing.assert_array_equal(by_path[name].to_numpy()[:-1], expected[name].to_numpy())
        np.testing.assert_array_equal(by_bytes[name].to_numpy(), expected[name].to_numpy())
    assert np.isnan(by_path["coarse_complexity"].iloc[-1])
    signature = {spec.name: spec.type for spec in pyfunc.metadata.get_output_schema().inputs}
    assert list(signature) == columns
    assert signature["coarse_complexity"] == DataType.double
    assert signature["is_anomaly"] == DataType.double  # so Spark keeps nulls (see pyfunc)
    inputs = {spec.name: spec.type for spec in pyfunc.metadata.get_input_schema().inputs}
    assert inputs == {"path": AnyType(), "image": AnyType()}  # see model_signature
    # a device given at load time reaches the model (a bad one is refused by name)
    assert pyfunc.model_config == {"device": "auto"}
    on_cpu = mlflow.pyfunc.load_model(trained.alias_uri, model_config={"device": "cpu"})
    assert on_cpu.model_config == {"device": "cpu"}
    assert on_cpu.predict(pd.DataFrame({"path": paths[:2]}))["bpd"].tolist() == \
        expected["bpd"].tolist()[:2]
    with pytest.raises(Exception, match="unknown device 'tpu'; use auto, cpu, cuda or cuda:N"):
        mlflow.pyfunc.load_model(trained.alias_uri, model_config={"device": "tpu"})
    # null is the default, auto; a missing CUDA is said in the words the device was set in
    assert mlflow.pyfunc.load_model(trained.alias_uri, model_config={"device": None}).predict(
        pd.DataFrame({"path": paths[:1]}))["bpd"].tolist() == expected["bpd"].tolist()[:1]
    if not torch.cuda.is_available():
        with pytest.raises(Exception, match='the model_config "device" cuda was asked for but '
                                            'CUDA is not available on this machine; use the '
                                            'model_config "device" cpu or auto'):
            mlflow.pyfunc.load_model(trained.alias_uri, model_config={"device": "cuda"})
        # `mlflow models serve` takes it from the environment: the advice names that
        monkeypatch.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", '{"device": "cuda"}')
        with pytest.raises(Exception, match="MLFLOW_PYFUNC_INFERENCE_CONFIG's \"device\" "
                                            "cuda was asked for but CUDA is not available"):
            mlflow.pyfunc.load_model(trained.alias_uri)
        # a load's own model_config wins over the environment: the advice names it
        monkeypatch.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", '{"device": "cpu"}')
        with pytest.raises(Exception, match='the model_config "device" cuda was asked for'):
            mlflow.pyfunc.load_model(trained.alias_uri, model_config={"device": "cuda"})
        monkeypatch.delenv("MLFLOW_PYFUNC_INFERENCE_CONFIG")
    assert by_path["score"].equals(by_path["bpd"])  # uncalibrated: score is bpd
    assert by_path["p_value"].isna().all() and by_path["is_anomaly"].isna().all()
    assert (by_path["error"][:-1] == "").all()
    assert np.isnan(by_path["bpd"].iloc[-1]) and by_path["error"].iloc[-1]

    # a misnamed column reaches the model as no column at all: refused, not 0 rows
    with pytest.raises(ValueError, match="but the model needs a 'path'"):
        pyfunc.predict(pd.DataFrame({"Path": paths}))
    assert len(pyfunc.predict(pd.DataFrame({"path": pd.Series([], dtype=str)}))) == 0

    threshold = float(np.median(expected["bpd"]))
    decided = pyfunc.predict(pd.DataFrame({"path": paths}), params={"threshold": threshold})
    assert decided["is_anomaly"].tolist() == (expected["bpd"] > threshold).tolist()

    # a cell that cannot name an image is an error in its own row, not a failed request
    png = files[0].read_bytes()
    mixed = pyfunc.predict(pd.DataFrame({"image": [png, base64.b64encode(png).decode(),
                                                   base64.encodebytes(png).decode(),
                                                   paths[1]]}))
    assert mixed["bpd"].tolist()[:3] == [expected["bpd"].iloc[0]] * 3  # line breaks allowed
    assert mixed["error"].tolist() == ["", "", "", "the 'image' value is text but not base64; "
                                       "pass the image file's bytes (or its path in the "
                                       "'path' column)"]
    # a path column that is not all text (a missing value makes pandas' column float):
    # each cell answered in its row, where MLflow used to refuse the whole call
    odd = pyfunc.predict(pd.DataFrame({"path": [np.nan, 1.5, None, paths[0]]}, dtype=object))
    assert odd["error"].tolist() == [
        "no image given (empty value)", "the 'path' value is a float (1.5), not a string; "
        "pass one file path per row", "no image given (empty value)", ""]
    assert odd["bpd"].iloc[3] == expected["bpd"].iloc[0]
    assert pyfunc.predict(pd.DataFrame({"path": [np.nan]}))["error"].tolist() == [
        "no image given (empty value)"]
    # MLflow makes a dict of strings one row of a list: answered a row per path
    listed = pyfunc.predict({"path": paths[:2]})
    assert listed["bpd"].tolist() == expected["bpd"].tolist()[:2]
    assert listed["error"].tolist() == ["", ""]
    # a list in one row of a real table is no path: an error in its row
    nested = pyfunc.predict(pd.DataFrame({"path": [paths[:2], paths[2]]}))
    assert nested["error"].iloc[0].startswith("the 'path' value is a list (['")
    assert nested["error"].iloc[0].endswith("not a string; pass one file path per row")
    assert nested["error"].iloc[1] == ""
    # the answer keeps the request's index, so it lines up with (and joins onto) it
    frame = pd.DataFrame({"path": paths[:3]}, index=[10, 5, 7])
    joined = frame.join(pyfunc.predict(frame))
    assert joined["bpd"].tolist() == expected["bpd"].tolist()[:3]


_NO_UNPICKLING = """
import sys
sys.modules["_pickle"] = None  # pickle falls back to its Python unpickler, patched below
import pickle


def refuse(*args, **kwargs):
    raise RuntimeError("something was unpickled while loading the model")


pickle._Unpickler.load = refuse
import json

import mlflow
import pandas as pd

from anomaly_flow import tracking

uri, paths = sys.argv[1], sys.argv[2:]
tracking.configure(None)
loaded = tracking.load_model(uri)
frame = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"path": paths}))
print(json.dumps({"config": loaded.model.config.to_dict(), "bpd": frame["bpd"].tolist()}))
"""


def test_loading_a_model_never_unpickles(trained: TrainedModel, image_dirs: ImageDirs,
                                         tracking_env: dict[str, str]) -> None:
    # a fresh process where any unpickling raises loads the registered model with the
    # library and as a pyfunc, and scores: the same numbers as here
    paths = [str(p) for p in image_dirs.files(image_dirs.test_normal)[:4]]
    env = {**tracking_env, "MLFLOW_TRACKING_URI": trained.tracking_uri}
    done = subprocess.run([sys.executable, "-c", _NO_UNPICKLING, trained.alias_uri, *paths],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    loaded = tracking.load_model(trained.alias_uri)
    assert result["config"] == loaded.model.config.to_dict()
    assert result["bpd"] == library_scores(loaded.model, paths)["bpd"].tolist()
    # and the unpickler really is refused in such a process
    probe = subprocess.run(
        [sys.executable, "-c", _NO_UNPICKLING.split("import json")[0]
         + "pickle.loads(pickle.dumps(1))"], capture_output=True, text=True, check=False)
    assert probe.returncode != 0 and "something was unpickled" in probe.stderr


def test_calibrated_version_is_registered_linked_and_promoted(
        trained: TrainedModel, image_dirs: ImageDirs, mlruns: Path) -> None:
    tracking.configure(trained.mlruns)  # the `mlruns` fixture configured the empty store
    source_weights = tracking.load_model(trained.alias_uri, device="cpu").model
    # A store of our own, so the shared one keeps a single uncalibrated version.
    tracking.configure(mlruns)
    with tracking.start_run("calibrated-parts", "train") as run:
        uri = tracking.log_model(run, source_weights, None)
        assert tracking.register_model(uri, "calibrated-parts", alias="candidate",
                                       tags={"training_run_id": run.run_id}) == "1"
        training_run = run.run_id
    source = tracking.load_model("models:/calibrated-parts@candidate", device=AUTO)
    cal_paths = [str(p) for p in image_dirs.files(image_dirs.calibration)]
    cal_scores = library_scores(source.model, cal_paths)["bpd"].to_numpy()
    calibration = calibrate("bpd", cal_scores, alpha=0.1)

    with tracking.start_run("calibrated-parts", "calibrate") as run:
        registered = tracking.register_calibrated_version(source, calibration, run, promote=True)
        calibration_run = run.run_id
    assert registered == ("models:/calibrated-parts/2", "2", None)  # no champion before
    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias("calibrated-parts", "champion")
    assert str(mv.version) == "2"
    assert mv.tags["calibration_run_id"] == calibration_run
    assert mv.tags["training_run_id"] == training_run
    # what chose the threshold, readable in the registry
    assert (mv.tags["threshold_method"], mv.tags["target_fpr"]) == ("conformal", "0.1")
    assert "previous_champion" not in mv.tags and "cost_fp" not in mv.tags
    assert str(client.get_model_version_by_alias("calibrated-parts", "candidate").version) == "1"
    # promoted again: the version champion left is returned and tagged, to undo a promotion
    with tracking.start_run("calibrated-parts", "calibrate") as run:
        again = tracking.register_calibrated_version(
            source, calibrate("bpd", cal_scores, alpha=0.2), run, promote=True)
    assert again == ("models:/calibrated-parts/3", "3", "2")
    assert client.get_model_version("calibrated-parts", "3").tags["previous_champion"] == "2"
    client.set_registered_model_alias("calibrated-parts", "champion", "2")

    champion = tracking.load_model("models:/calibrated-parts@champion")
    # the calibration, now recording the weights it was fitted to
    assert champion.calibration == dataclasses.replace(
        calibration, model_digest=source.model.digest())
    test_paths = [str(p) for p in image_dirs.files(image_dirs.test_anomalous)]
    out = mlflow.pyfunc.load_model("models:/calibrated-parts@champion").predict(
        pd.DataFrame({"path": test_paths}))
    scores = library_scores(source.model, test_paths)["bpd"].to_numpy()
    np.testing.assert_array_equal(out["p_value"].to_numpy(), calibration.p_values(scores))
    assert out["is_anomaly"].tolist() == calibration.decide(scores).tolist()

    # the run URI of a registered model is that version; of an unregistered one, none
    from_run = tracking.load_model(f"runs:/{training_run}/model")
    assert (from_run.name, from_run.version) == ("calibrated-parts", "1")
    with tracking.start_run("calibrated-parts", "unregistered") as run:
        tracking.log_model(run, source_weights, None)
        unregistered = tracking.load_model(f"runs:/{run.run_id}/model")
        assert unregistered.name is None and unregistered.version is None
        with pytest.raises(ModelNotFoundError, match="not a registered model version"):
            tracking.register_calibrated_version(unregistered, calibration, run, promote=False)


def test_registration_prints_nothing_and_links_the_logged_model(
        mlruns: Path, capfd: pytest.CaptureFixture[str]) -> None:
    model = Glow(GlowConfig(image_size=8, levels=1, n_bits=5))
    with tracking.start_run("quiet-parts", "train") as run:
        first_uri = tracking.log_model(run, model)
        second_uri = tracking.log_model(run, model, artifact_path="again")
    capfd.readouterr()
    assert tracking.register_model(first_uri, "quiet-parts", alias="candidate",
                                   tags={"val_bpd": 1.5}) == "1"  # a new registered model
    assert tracking.register_model(second_uri, "quiet-parts") == "2"  # an existing one
    assert tracking.register_model(f"runs:/{run.run_id}/again", "other-parts") == "1"
    err = capfd.readouterr().err
    for chatter in ("Successfully registered", "already exists", "Created version",
                    "registering model based on"):
        assert chatter not in err, err

    client = mlflow.MlflowClient()
    first, second = (uri.removeprefix("models:/") for uri in (first_uri, second_uri))
    expected = {("quiet-parts", "1"): first_uri, ("quiet-parts", "2"): second_uri,
                ("other-parts", "1"): second_uri}
    for (name, version), source in expected.items():
        mv = client.get_model_version(name, version)
        assert (mv.source, mv.run_id, mv.status) == (source, run.run_id, "READY")
    assert client.get_model_version("quiet-parts", "1").tags == {"val_bpd": "1.5"}
    assert json.loads(client.get_logged_model(first).tags["mlflow.modelVersions"]) == [
        {"name": "quiet-parts", "version": 1}]
    assert json.loads(client.get_logged_model(second).tags["mlflow.modelVersions"]) == [
        {"name": "quiet-parts", "version": 2}, {"name": "other-parts", "version": 1}]
    for uri, version in (("models:/quiet-parts@candidate", "1"), ("models:/quiet-parts/2", "2")):
        loaded = tracking.load_model(uri)
        assert (loaded.version, loaded.run_id) == (version, run.run_id)
        assert mlflow.pyfunc.load_model(uri).metadata.run_id == run.run_id


def test_a_stop_during_a_run_start_model_logging_or_registration_finishes_it_first(
        mlruns: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop landing inside one of these writes is raised once it is done, so the store
    is never left with a run that stays RUNNING, a half-written model, or a version without
    the alias it was registered for."""
    from anomaly_flow.stopping import Terminated, sigterm_as_interrupt

    client = mlflow.MlflowClient()
    model = Glow(GlowConfig(image_size=8, levels=1, n_bits=5))
    with monkeypatch.context() as patch:
        stop_during(patch, mlflow, "start_run")
        with pytest.raises(Terminated), sigterm_as_interrupt(), \
                tracking.start_run("stopped-parts", "started"):
            pytest.fail("the stop should be raised before the block runs")
    assert mlflow.active_run() is None
    (started,) = client.search_runs([client.get_experiment_by_name("stopped-parts")
                                     .experiment_id])
    assert started.info.status == "KILLED"
    # a nested run stopped as it starts is ended; its parent goes on
    with tracking.start_run("stopped-parts", "parent") as parent:
        with monkeypatch.context() as patch:
            stop_during(patch, mlflow, "start_run")
            with pytest.raises(Terminated), sigterm_as_interrupt(), \
                    tracking.start_run("stopped-parts", "child", nested=True):
                pytest.fail("the stop should be raised before the block runs")
        assert mlflow.active_run().info.run_id == parent.run_id
    (child,) = client.search_runs([parent.experiment_id], "attributes.run_name = 'child'")
    assert (child.info.status, client.get_run(parent.run_id).info.status) \
        == ("KILLED", "FINISHED")

    with pytest.raises(Terminated), sigterm_as_interrupt(), \
            tracking.start_run("stopped-parts", "logged") as run:
        with monkeypatch.context() as patch:
            stop_during(patch, mlflow.pyfunc, "log_model")
            tracking.log_model(run, model)  # raises once the model is logged
        pytest.fail("the stop should be raised as the model is logged")
    assert client.get_run(run.run_id).info.status == "KILLED"
    logged = mlflow.pyfunc.load_model(f"runs:/{run.run_id}/model")  # whole and loadable
    assert logged.metadata.run_id == run.run_id
    logged_uri = f"runs:/{run.run_id}/model"

    with monkeypatch.context() as patch:
        stop_during(patch, mlflow, "register_model")
        with pytest.raises(Terminated), sigterm_as_interrupt():
            tracking.register_model(logged_uri, "stopped-parts", alias="candidate")
    assert str(client.get_model_version_by_alias("stopped-parts", "candidate").version) == "1"


def test_non_finite_validation_bpd_is_never_registered(
        tmp_path: Path, sample: SampleData, mlruns: Path) -> None:
    """An honest way to get a NaN validation bits/dim: the only validation image is a
    file that cannot be decoded. A broken training file rides along to check reporting."""
    config = tiny_config(epochs=1)
    n = 12
    train_idx, val_idx = split_train_val(n, config.train.val_fraction, config.train.seed)
    assert len(val_idx) == 1
    folder = tmp_path / "data"
    paths = write_image_folder(sample.train[:n], folder, "img-")
    for index in (int(val_idx[0]), int(train_idx[0])):
        paths[index].write_bytes(b"not an image")

    outcome = tracking.train_and_register(folder, "never", config, device="cpu",
                                          mlruns=mlruns, progress=False)
    assert outcome.version is None
    assert "not registered" in outcome.message and "not finite" in outcome.message
    # both broken files, the validation one included, are reported
    assert "2 training file(s) could not be decoded" in outcome.message
    client = mlflow.MlflowClient()
    assert client.search_registered_models(filter_string="name = 'never'") == []
    run = client.get_run(outcome.run_id)
    assert "not finite" in run.data.tags["not_registered_reason"]
    assert run.info.status == "FAILED"
    assert run.data.tags["failed_files"] == "2"
    failed = Path(mlflow.artifacts.download_artifacts(run_id=outcome.run_id,
                                                      artifact_path="failed_files.txt",
                                                      dst_path=str(tmp_path)))
    assert paths[int(train_idx[0])].name in failed.read_text()
    assert paths[int(val_idx[0])].name in failed.read_text()
    assert outcome.model_uri.startswith("models:/m-")  # logged for inspection, not registered


# ------------------------------------------------------------------- real processes


@contextlib.contextmanager
def process(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Run ``command`` in its own process group; kill the whole group afterwards."""
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with (contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
              urllib.request.urlopen(url, timeout=2) as response):
            if response.status == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def strict_json(text: str | bytes) -> Any:
    """JSON as a strict parser reads it: a bare NaN or Infinity is an error."""
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: a bare {constant}")
    return json.loads(text, parse_constant=refuse)


def post_json(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return strict_json(response.read())


def post_refused(url: str, payload: dict) -> tuple[int, str]:
    """The HTTP status and message of a request the server refuses."""
    with pytest.raises(urllib.error.HTTPError) as info:
        post_json(url, payload)
    return info.value.code, strict_json(info.value.read())["message"]


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_same_scores(
        trained: TrainedModel, image_dirs: ImageDirs, tracking_env: dict[str, str],
        free_port: int, tmp_path: Path) -> None:
    files = image_dirs.files(image_dirs.test_normal)[:4] + image_dirs.files(
        image_dirs.test_anomalous)[:4]
    paths = [str(p) for p in files]
    expected = library_scores(tracking.load_model(trained.alias_uri, device=AUTO).model, paths)
    # the server reads under the images' folder only, relative paths taken from there
    root = Path(os.path.commonpath(files)).resolve()
    env = {**tracking_env, "MLFLOW_TRACKING_URI": trained.tracking_uri,
           "ANOMALY_FLOW_PATH_ROOT": str(root)}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", trained.alias_uri,
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(free_port), "-w", "1"]
    log = tmp_path / "serve.log"
    with process(command, env, log) as proc:
        base = f"http://127.0.0.1:{free_port}"
        wait_for(f"{base}/ping", proc, log)
        by_path = post_json(f"{base}/invocations", {
            "dataframe_split": {"columns": ["path"], "data": [[p] for p in paths]},
            "params": {"threshold": 100.0}})
        by_bytes = post_json(f"{base}/invocations", {"dataframe_split": {
            "columns": ["image"],
            "data": [[base64.b64encode(f.read_bytes()).decode()] for f in files]}})
        # one file per request, as a live service sends them: the same bits
        alone = [post_json(f"{base}/invocations", {
            "dataframe_split": {"columns": ["path"], "data": [[p]]}})["predictions"][0]["bpd"]
            for p in paths[:3]]
        # a cell that names no image is an error in its row, not a refused request
        png = base64.b64encode(files[0].read_bytes()).decode()
        mixed = post_json(f"{base}/invocations", {"dataframe_split": {
            "columns": ["image", "path"],
            "data": [[png, None], [None, paths[1]], ["!!", None], [None, None], ["", ""]]}})
        # the other request formats: a null path is no image, not a file named "None"
        other_formats = [post_json(f"{base}/invocations", payload)["predictions"]
                         for payload in ({"inputs": {"path": [None, paths[0]]}},
                                         {"instances": [{"path": None}, {"path": paths[0]}]})]
        # columns of strings only, which MLflow packs into one row of lists: a row each
        columnar = [post_json(f"{base}/invocations", payload)["predictions"]
                    for payload in ({"inputs": {"path": paths[:3]}},
                                    {"instances": {"path": paths[:3]}})]
        empty = post_refused(f"{base}/invocations", {"dataframe_records": []})
        misnamed = post_refused(f"{base}/invocations", {
            "dataframe_split": {"columns": ["Path"], "data": [[p] for p in paths]}})
        bad_param = post_refused(f"{base}/invocations", {
            "dataframe_split": {"columns": ["path"], "data": [[paths[0]]]},
            "params": {"batch_size": 0}})
        confined = post_json(f"{base}/invocations", {"dataframe_split": {
            "columns": ["path"], "data": [[os.path.relpath(paths[0], root)], [str(log)]]}})
        uneven = post_refused(f"{base}/invocations",
                              {"inputs": {"path": paths[:2], "image": [png]}})
    rows = by_path["predictions"]
    assert confined["predictions"][0]["bpd"] == expected["bpd"].iloc[0]
    assert confined["predictions"][1]["error"] == (
        f"the 'path' value {str(log)!r} is outside the one folder this model reads "
        "(ANOMALY_FLOW_PATH_ROOT); pass a path under it, relative to it or whole, or the "
        "file's bytes in the 'image' column")
    assert uneven[0] == 400
    assert "columns hold lists of different lengths (2 in 'path' and 1 in 'image')" in uneven[1]
    assert [row["bpd"] for row in rows] == expected["bpd"].tolist()
    assert [row["p_value"] for row in rows] == [None] * len(paths)  # null, not NaN
    mixed_rows = mixed["predictions"]
    assert [row["bpd"] for row in mixed_rows[:2]] == expected["bpd"].tolist()[:2]
    assert [row["bpd"] for row in mixed_rows[2:]] == [None] * 3
    assert [row["is_anomaly"] for row in mixed_rows] == [None] * 5
    assert [row["error"] for row in mixed_rows] == [
        "", "", "the 'image' value is text but not base64; pass the image file's bytes (or "
        "its path in the 'path' column)", "no image given (empty value)",
        "no image given (empty value)"]
    for status, message in (empty, misnamed):
        assert status == 400
        assert "the input has no 'path' or 'image' column" in message
        assert "but the model needs a 'path' (string) or an 'image' (bytes) column" in message
    assert "an empty request, or a plain list of values that is no table, reads the same" \
        in empty[1]
    assert bad_param[0] == 400
    assert "the batch_size param must be a positive number of images, not 0" in bad_param[1]
    assert alone == expected["bpd"].tolist()[:3]
    for answer in columnar:
        assert [row["bpd"] for row in answer] == expected["bpd"].tolist()[:3]
    for answer in other_formats:
        assert [row["error"] for row in answer] == ["no image given (empty value)", ""]
        assert answer[1]["bpd"] == expected["bpd"].iloc[0]
    assert [row["is_anomaly"] for row in rows] == [False] * len(paths)
    assert [row["bpd"] for row in by_bytes["predictions"]] == expected["bpd"].tolist()
    assert all(row["error"] == "" for row in rows)


@pytest.mark.slow
def test_training_logs_and_registers_on_a_real_mlflow_server(
        image_dirs: ImageDirs, tracking_env: dict[str, str], free_port: int, tmp_path: Path,
        mlflow_db_template: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    server_store = new_store(tmp_path / "server", mlflow_db_template)
    command = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{server_store / 'mlflow.db'}",
               "--artifacts-destination", str(server_store / "artifacts"),
               "-h", "127.0.0.1", "-p", str(free_port), "--workers", "1"]
    log = tmp_path / "server.log"
    with process(command, tracking_env, log) as proc:
        url = f"http://127.0.0.1:{free_port}"
        wait_for(f"{url}/health", proc, log)
        # credentials in the URI (this server ignores them): never shown anywhere
        with_password = f"http://alice:s3cret@127.0.0.1:{free_port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", with_password)
        outcome = tracking.train_and_register(image_dirs.train, "served", tiny_config(1),
                                              device="cpu", mlruns=tmp_path / "local",
                                              progress=False)
        # MLflow's link to the run goes to stderr: stdout is a command's data
        captured = capsys.readouterr()
        assert "View run" not in captured.out and "View run" in captured.err
        assert "alice:***@" in captured.err and "s3cret" not in captured.out + captured.err
        assert "s3cret" not in (tmp_path / "local" / "checkpoints" / "served" /
                                "run.json").read_text()
        assert mlflow.get_tracking_uri() == with_password
        client = mlflow.MlflowClient(tracking_uri=url, registry_uri=url)
        run = client.get_run(outcome.run_id)
        assert run.data.params["model.levels"] == "2" and "val_bpd" in run.data.metrics
        assert str(client.get_model_version_by_alias("served", "candidate").version) == "1"
        loaded = tracking.load_model("models:/served@candidate")
        assert loaded.run_id == outcome.run_id
    # the server holds the files (proxied: clients on other hosts reach them through it)
    assert list((server_store / "artifacts").rglob("model.safetensors"))
    assert not (tmp_path / "local" / "mlflow.db").exists()  # nothing went to a local store
    assert (tmp_path / "local" / "checkpoints" / "served" / "latest").is_file()


@pytest.mark.slow
@pytest.mark.filterwarnings(  # pyspark 4's note on pandas 3; the scores are checked below
    "ignore:PySpark does not yet fully support pandas:FutureWarning")
def test_spark_udf_scores_a_table_of_paths_with_the_registered_model(
        trained: TrainedModel, image_dirs: ImageDirs, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    pyspark_sql = pytest.importorskip("pyspark.sql")
    java_home = os.environ.get("JAVA_HOME")
    if shutil.which("java") is None and not (java_home and Path(java_home, "bin", "java")
                                             .is_file()):
        pytest.skip("Spark needs a Java runtime (17 or later), which this machine lacks: "
                    "install one (e.g. apt-get install openjdk-17-jre-headless) or set "
                    "JAVA_HOME to run this test")
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    monkeypatch.setenv("PYSPARK_DRIVER_PYTHON", sys.executable)
    files = image_dirs.files(image_dirs.test_normal) + image_dirs.files(
        image_dirs.test_anomalous)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    paths = [str(p) for p in files] + [str(not_an_image)]
    expected = library_scores(tracking.load_model(trained.alias_uri, device=AUTO).model, paths)
    spark = (pyspark_sql.SparkSession.builder.master("local[1]").appName("anomaly-flow-test")
             .config("spark.ui.enabled", "false").config("spark.driver.memory", "1g")
             .config("spark.sql.shuffle.partitions", "1")
             .config("spark.local.dir", str(tmp_path / "spark"))
             .getOrCreate())
    try:
        udf = mlflow.pyfunc.spark_udf(spark, trained.alias_uri, env_manager="local")
        table = spark.createDataFrame([(p,) for p in paths], ["path"])
        scored = table.withColumn("scores", udf("path")).select(
            "path", "scores.bpd", "scores.score", "scores.is_anomaly", "scores.error"
        ).toPandas()
        # a decision threshold passed as a param: 1.0 or 0.0, null where the row failed
        decide = mlflow.pyfunc.spark_udf(spark, trained.alias_uri, env_manager="local",
                                         params={"threshold": 100.0})
        decided = table.withColumn("scores", decide("path")).selectExpr(
            "scores.is_anomaly", "isnull(scores.is_anomaly) AS missing").toPandas()
        # a binary column of file bytes, with a null where the path is to be read
        with_bytes = spark.createDataFrame(
            [(p, None if i % 2 else Path(p).read_bytes()) for i, p in enumerate(paths)],
            "path string, image binary")
        by_bytes = with_bytes.withColumn("scores", udf("path", "image")).select(
            "scores.bpd", "scores.error").toPandas()
        # Spark's own file source: file: URIs in path, the bytes in content
        from pyspark.sql.functions import col, struct
        source = spark.read.format("binaryFile").load(str(image_dirs.test_normal))
        binary = source.select(
            "path", udf("path").alias("by_path"),
            udf(struct(col("content").alias("image"))).alias("by_content"),
        ).selectExpr("path", "by_path.bpd AS by_path", "by_path.error AS path_error",
                     "by_content.bpd AS by_content").toPandas()
    finally:
        spark.stop()
    assert scored["path"].tolist() == paths
    np.testing.assert_array_equal(scored["bpd"].to_numpy(), expected["bpd"].to_numpy())
    assert scored["is_anomaly"].isna().all()  # uncalibrated
    assert (scored["error"].iloc[:-1] == "").all()
    assert np.isnan(scored["bpd"].iloc[-1]) and scored["error"].iloc[-1] == \
        expected["error"].iloc[-1] != ""
    assert decided["is_anomaly"].iloc[:-1].tolist() == [0.0] * len(files)
    assert decided["missing"].tolist() == [False] * len(files) + [True]  # null, not NaN
    np.testing.assert_array_equal(by_bytes["bpd"].to_numpy(), expected["bpd"].to_numpy())
    assert by_bytes["error"].tolist() == expected["error"].tolist()
    normal = image_dirs.files(image_dirs.test_normal)
    binary = binary.sort_values("path", ignore_index=True)
    assert binary["path"].tolist() == [f"file:{p}" for p in normal]
    assert (binary["path_error"] == "").all()
    np.testing.assert_array_equal(binary["by_path"].to_numpy(),
                                  expected["bpd"].to_numpy()[:len(normal)])
    np.testing.assert_array_equal(binary["by_content"].to_numpy(), binary["by_path"].to_numpy())


def test_commands_started_at_once_on_a_new_store_all_open_it(tmp_path: Path) -> None:
    """Several commands started together on a new --mlruns (a sweep) all built its
    database: MLflow's migrations raced, and all but one failed with "Online migration
    expected to match one row ... in 'alembic_version'" and advice to check that the
    folder is writable."""
    folder = tmp_path / "mlruns"
    code = (f"from anomaly_flow import tracking; tracking.configure({str(folder)!r}); "
            "import mlflow; mlflow.MlflowClient().search_experiments()")
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parent.parent) for _ in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL])
def test_a_command_stopped_while_it_builds_a_new_store_leaves_none(tmp_path: Path,
                                                                  stop: int) -> None:
    """MLflow's migrations take a second on a new database; a command stopped then (Ctrl-C
    a second into the first ``train``) left a half-built mlflow.db that every later command
    refused ("table _alembic_tmp_... already exists"). The schema is built under a hidden
    name and takes the database's name whole: the stop leaves no database, and the next
    command builds one (and removes what a killed build left)."""
    folder = tmp_path / "mlruns"
    code = (f"from anomaly_flow import tracking; tracking.configure({str(folder)!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)
    deadline = time.monotonic() + 120
    while not list(folder.glob(".mlflow.db.building-*")):  # the migrations are running
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
        time.sleep(0.002)
    proc.send_signal(stop)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not (folder / "mlflow.db").exists()
    assert len(list(folder.glob(".mlflow.db.building-*"))) == (stop == signal.SIGKILL)
    tracking.configure(folder)  # the next command: a whole store
    assert not list(folder.glob(".mlflow.db.building-*"))
    assert [e.name for e in mlflow.MlflowClient().search_experiments()] == ["Default"]


def test_a_half_built_database_says_to_delete_it(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """One that an older version (or MLflow itself) left half-built when stopped: the
    error says so, not "check that the folder is writable"."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = tmp_path / "mlruns"
    (folder / "artifacts").mkdir(parents=True)
    import sqlite3

    with contextlib.closing(sqlite3.connect(folder / "mlflow.db")) as db:
        db.execute("CREATE TABLE _alembic_tmp_latest_metrics (key TEXT)")  # as they leave it
        db.commit()
    with pytest.raises(tracking.TrackingError) as info:
        tracking.configure(folder)
    assert str(info.value).endswith(
        f"{folder / 'mlflow.db'} was left half-built by a command stopped while it made the "
        "database, and it holds no runs; delete it and run the command again")


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


def test_a_half_built_database_that_holds_runs_is_not_called_empty(tmp_path: Path) -> None:
    """A newer MLflow upgrades an old store's tables in place; stopped half way, it leaves
    an ``_alembic_tmp_`` table beside the runs: the advice is to back it up and finish
    the upgrade, never to delete it."""
    import sqlite3

    from anomaly_flow.tracking.store import _half_built_hint

    db = tmp_path / "mlflow.db"
    with contextlib.closing(sqlite3.connect(db)) as connection:
        connection.execute("CREATE TABLE runs (run_uuid TEXT)")
        connection.executemany("INSERT INTO runs VALUES (?)", [("a",), ("b",)])
        connection.execute("CREATE TABLE _alembic_tmp_latest_metrics (key TEXT)")
        connection.commit()
    assert _half_built_hint(db, f"sqlite:///{db}") == (
        f"{db} holds 2 runs, and an upgrade of its tables by a newer MLflow was stopped half "
        "way; copy it somewhere safe, then drop the table(s) it left "
        f"(_alembic_tmp_latest_metrics) with sqlite3 and run 'mlflow db upgrade sqlite:///{db}'")


def test_a_store_built_where_another_command_built_one_meanwhile_keeps_that_one(
        tmp_path: Path) -> None:
    """Where no lock can be taken (a file system without locks), two commands can build
    a new store at once: the second's database must not replace the first's, which may
    already hold its runs."""
    from anomaly_flow.tracking.store import _build_database

    folder = tmp_path / "mlruns"
    tracking.configure(folder)
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("kept")
    before = (folder / "mlflow.db").stat().st_ino
    _build_database(folder / "mlflow.db", folder / "artifacts", locked=False)
    assert (folder / "mlflow.db").stat().st_ino == before
    assert client.get_experiment(experiment).name == "kept"
    assert not list(folder.glob(".mlflow.db.building-*"))


def test_a_database_of_something_else_is_not_made_a_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLFLOW_TRACKING_URI (or --mlruns) at a sqlite file of another application: MLflow
    added its twenty tables to it, even for a command that only reads. Refused, the file
    left as it was."""
    import sqlite3

    other = tmp_path / "sales.db"
    with contextlib.closing(sqlite3.connect(other)) as db:
        db.execute("CREATE TABLE invoices (id INTEGER)")
        db.commit()
    before = other.read_bytes()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    with pytest.raises(tracking.TrackingError) as info:
        tracking.configure()
    assert str(info.value) == (
        f"cannot open the MLflow tracking store sqlite:///{other}: {other} is a database of "
        "something else (its tables are invoices), not an MLflow store, and MLflow would add "
        "its tables to it; point MLFLOW_TRACKING_URI at an MLflow database or a new file")
    assert other.read_bytes() == before
    with contextlib.closing(sqlite3.connect(other)) as db:  # alembic is not only MLflow's
        db.execute("CREATE TABLE alembic_version (version_num TEXT)")
        db.commit()
    before = other.read_bytes()
    with pytest.raises(tracking.TrackingError, match="its tables are alembic_version, "
                                                     "invoices"):
        tracking.configure()
    assert other.read_bytes() == before
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    (tmp_path / "mlruns").mkdir()
    shutil.copy(other, tmp_path / "mlruns" / "mlflow.db")
    with pytest.raises(tracking.TrackingError, match=r"pass another --mlruns DIR$"):
        tracking.configure(tmp_path / "mlruns")


def test_a_new_store_in_a_path_with_both_quote_kinds_is_refused_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """MLflow quotes the first row of a new sqlite database with repr(): a path holding
    both ' and " made an SQL syntax error, logged by MLflow with its traceback."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = tmp_path / "it's a \"store\""
    with caplog.at_level(logging.ERROR), \
            pytest.raises(tracking.TrackingError, match="holds both ' and \"") as info:
        tracking.configure(folder)
    assert "\n" not in str(info.value) and "pass a --mlruns DIR whose path" in str(info.value)
    assert "Traceback" not in caplog.text and "syntax error" not in caplog.text
    assert not folder.exists()  # refused before any folder is made
    database = tmp_path / "it's" / '"here"' / "mlflow.db"  # through the variable too
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    with pytest.raises(tracking.TrackingError, match="point MLFLOW_TRACKING_URI at a database "
                                                     "in a folder whose path has at most"):
        tracking.configure(tmp_path / "unused")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    single = tmp_path / "it's a store"  # one kind of quote: MLflow copes
    assert tracking.configure(single) == f"sqlite:///{single}/mlflow.db"


@pytest.mark.parametrize("name", ["runs?1", "100%41"])
def test_a_store_in_a_path_with_a_question_mark_or_percent_is_refused_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """SQLAlchemy read ``sqlite:////t/runs?1/mlruns/mlflow.db`` as the database file
    ``/t/runs`` (the demo trained into it, then said there was no store under --out), and
    decoded ``%41`` to ``A`` (minutes of retries, then "check that the folder is
    writable"; MLflow decodes a plain artifact path likewise)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = tmp_path / name / "mlruns"
    with pytest.raises(tracking.TrackingError, match="which MLflow reads as part of a URL") \
            as info:
        tracking.configure(folder)
    assert "\n" not in str(info.value) and "pass a --mlruns DIR" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing made, anywhere


@pytest.mark.parametrize("name, refusal", [("runs?1", "which MLflow reads as part of a URL"),
                                           ("100%41", "which MLflow reads as part of a URL"),
                                           ("it's \"here\"", "holds both ' and \"")])
def test_training_and_the_demo_refuse_such_a_store_before_making_any_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image_dirs: ImageDirs,
        name: str, refusal: str) -> None:
    """``train --mlruns 'a?b'`` was refused only after its training lock had made
    ``a?b/checkpoints/.NAME.lock``, and ``demo --out 'a?b'`` after writing its marker into
    the new folder: a refused command left a folder behind (a path with both quote
    characters, likewise)."""
    from anomaly_flow.demo import run_demo

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(tracking.TrackingError, match=refusal):
        tracking.train_and_register(image_dirs.train, "m", tiny_config(epochs=1),
                                    device="cpu", mlruns=tmp_path / name / "mlruns")
    with pytest.raises(tracking.TrackingError, match=refusal):
        run_demo(tmp_path / name / "demo", preset="tiny", device="cpu", epochs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing made, anywhere


def test_a_store_in_a_path_with_a_hash_is_not_taken_for_a_moved_one(
        tmp_path: Path, mlflow_db_template: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The experiment's plain artifact path was read as a URL, cut at '#': every command
    warned that the store had been moved or copied."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = new_store(tmp_path / "c#" / "mlruns", mlflow_db_template)
    assert tracking.configure(folder) == f"sqlite:///{folder}/mlflow.db"
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.tracking.store"):
        tracking.ensure_experiment("parts")
        tracking.ensure_experiment("parts")
    assert "outside this store" not in caplog.text


@pytest.mark.parametrize("locked", [False, True])
def test_a_store_that_fails_to_open_says_why_with_or_without_its_creation_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, locked: bool) -> None:
    """An error while the store opens reaches the message as itself: the creation lock's
    context manager once caught it (an OSError or ImportError of the store's) and said
    "generator didn't stop after throw()"."""
    from anomaly_flow.tracking import store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = tmp_path / "mlruns"
    tracking.configure(folder)  # an existing store, with its lock file
    if not locked:  # as a store made before the lock was
        (folder / ".mlflow.db.lock").unlink()

    def no_driver(*args: object, **kwargs: object) -> None:
        raise ModuleNotFoundError("No module named '_sqlite3'")

    monkeypatch.setattr(store, "_open_store", no_driver)
    with pytest.raises(tracking.TrackingError, match="No module named '_sqlite3'; install the "
                                                     "database driver it names"):
        tracking.configure(folder)


def test_the_checks_before_a_training_reads_its_folder(tmp_path: Path) -> None:
    """What ``precheck_checkpoints`` says of a name's checkpoint folder before the
    training folder is read: a stopped training is kept from a plain start, but not
    named as resumable when another process is training the name (it is that one's), when
    its record is another name's, or when there is no record to resume from."""
    import fcntl

    from anomaly_flow.checkpoint import TrainingError

    config = tiny_config()
    folder = tracking.checkpoint_dir("parts", tmp_path)
    (folder / "step-00000004").mkdir(parents=True)
    (folder / "step-00000004" / "state.json").write_text("{}")

    def says(name: str = "parts", **flags: bool) -> str:
        with pytest.raises(TrainingError) as refused:
            tracking.precheck_checkpoints(name, config, tmp_path, **flags)
        return str(refused.value)

    assert says(resume=True, restart=True) == (
        "resume continues the last training and restart deletes it: pass one of them "
        "(--resume or --restart), not both")
    latest = folder / "step-00000004"
    assert says() == (f"the checkpoint folder of 'parts' holds a checkpoint ({latest}) and "
                      "no training record (run.json), so whether that training finished is "
                      "unknown; pass --restart to delete it and start afresh")
    (folder / "run.json").write_text("[]")
    assert says().startswith(f"the checkpoint folder of 'parts' holds a checkpoint ({latest}) "
                             f"and a damaged training record ({folder / 'run.json'}), so")
    record = {"model_name": "parts", "config": config.to_dict()}  # an older record
    (folder / "run.json").write_text(json.dumps(record))
    tracking.precheck_checkpoints("parts", config, tmp_path)  # finished, as it had no word
    (folder / "run.json").write_text(json.dumps({**record, "concluded": False}))
    assert says().startswith("the last training of 'parts' stopped before its end, and its "
                             f"checkpoint {folder / 'step-00000004'} (step 4) can go on")
    tracking.precheck_checkpoints("parts", config, tmp_path, restart=True)
    assert says("parts!").startswith(  # the same folder: not its training to resume
        f"the checkpoint folder {folder} holds the training of model 'parts'")
    with open(folder.parent / ".parts.lock", "w") as lock:
        lock.write("pid 4321 on elsewhere\n")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # flock locks belong to the open file: another open of it is another holder
        for flags in ({}, {"resume": True}, {"restart": True}):
            assert says(**flags) == (
                "another training of 'parts' is running (pid 4321 on elsewhere, holding "
                f"{folder.parent / '.parts.lock'}); wait for it to end, or train under "
                "another --name")
    tracking.precheck_checkpoints("parts", config, tmp_path, restart=True)  # released
