"""Tests for anomaly_flow.tracking.store with real sqlite stores, a real ``mlflow server``
where one is down or slow, and the files of stores built, damaged or moved."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest

from anomaly_flow import tracking
from anomaly_flow.tracking import ModelNotFoundError
from tests.conftest import (
    ImageDirs,
    new_store,
    tiny_config,
)


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


def test_a_store_folder_that_exists_but_cannot_take_its_artifacts_folder_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An existing --mlruns (a read-only mount, or a file where its artifacts/ goes) is
    not said to be a folder that could not be created."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "artifacts").write_text("not a folder")
    with pytest.raises(tracking.TrackingError, match=rf"^cannot create the MLflow store "
                       rf"artifacts folder in {re.escape(str(tmp_path))}: File exists; pass a "
                       r"writable --mlruns DIR$"):
        tracking.configure(tmp_path)
    with pytest.raises(tracking.TrackingError,
                       match=r"^cannot create the MLflow store folder .*/file/store: "):
        (tmp_path / "file").write_text("")
        tracking.configure(tmp_path / "file" / "store")


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
