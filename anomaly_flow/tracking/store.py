"""Where runs go: the tracking URI, experiments, and a small handle on one run.

The default store is ``sqlite:///<mlruns>/mlflow.db`` with artifacts under
``<mlruns>/artifacts/<experiment>``, where ``<mlruns>`` is ``./mlruns`` (absolute) unless
a folder is given (``--mlruns DIR`` makes ``DIR`` itself the folder). The environment
variable ``MLFLOW_TRACKING_URI``, read at call time, overrides it (e.g. a real
``mlflow server``); the server then decides where artifacts go.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import io
import logging
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import mlflow
import numpy as np
import PIL
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from PIL import Image
from sqlalchemy.engine import make_url

import anomaly_flow
from anomaly_flow import file_lock
from anomaly_flow.data import warnings_caught
from anomaly_flow.errors import describe, first_line, unreachable_reason, without_passwords
from anomaly_flow.stopping import process_running, stops_deferred

logger = logging.getLogger(__name__)

TRACKING_ENV = "MLFLOW_TRACKING_URI"
REGISTRY_ENV = "MLFLOW_REGISTRY_URI"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
CHECKPOINTS_DIR = "checkpoints"

# MLflow's limits per log_batch call.
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100
_MAX_PARAM_LENGTH = 6000


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or used; the message says which and what to do."""


@dataclass
class _State:
    uri: str | None = None
    artifact_root: Path | None = None  # set for sqlite stores: where new experiments go
    default_store: bool = False  # the store under --mlruns, not MLFLOW_TRACKING_URI's
    warned: set[tuple[str, str]] = field(default_factory=set)  # said once per process
    killed: list[str] = field(default_factory=list)  # runs a stop ended, oldest first
    registered: list[str] = field(default_factory=list)  # models:/NAME/N made, oldest first
    promoted: list[str] = field(default_factory=list)  # what each promotion moved, said
    to_promote: set[str] = field(default_factory=set)  # registered, champion not yet moved
    folder: Path | None = None  # the store folder last given to configure(): mlruns=None's


_state = _State()


def mlruns_dir(mlruns: str | Path | None = None) -> Path:
    """The absolute folder of the default store: ``mlruns``; else the folder last given
    to :func:`configure` in this process (so ``configure(folder)`` then a library call
    without ``mlruns`` uses that store, as it reads); else ``./mlruns``."""
    if mlruns is None:
        mlruns = _state.folder if _state.folder is not None else Path.cwd() / "mlruns"
    return Path(mlruns).expanduser().absolute()


@contextlib.contextmanager
def own_store_folder() -> Iterator[None]:
    """While a command (``anomaly-flow ...``, a pipeline script) runs inside a Python
    process: ``mlruns=None`` means ``./mlruns``, whatever folder the caller gave
    :func:`configure`; after it the caller's store is back, MLflow's URIs too."""
    saved = _configuration()
    _state.folder = None
    try:
        yield
    finally:
        if saved.folder is not None:  # the caller configured a folder: its store, as it was
            _restore(saved)


class _Configuration(NamedTuple):
    """What :func:`configure` set."""

    uri: str | None
    artifact_root: Path | None
    default_store: bool  # the store under --mlruns, not MLFLOW_TRACKING_URI's
    folder: Path | None  # the folder mlruns=None means


def _configuration() -> _Configuration:
    return _Configuration(_state.uri, _state.artifact_root, _state.default_store,
                          _state.folder)


def _restore(saved: _Configuration) -> None:
    """Put back a :func:`_configuration`, MLflow's URIs with it."""
    _state.uri, _state.artifact_root, _state.default_store, _state.folder = saved
    if saved.uri is not None:
        _point_mlflow(saved.uri)


def default_tracking_uri(mlruns: str | Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<mlruns>/mlflow.db`` (absolute).

    Args:
        mlruns: The store's folder; ``None``: :func:`mlruns_dir`'s default.
    """
    env = os.environ.get(TRACKING_ENV)
    if env:
        return env
    return f"sqlite:///{mlruns_dir(mlruns) / DB_FILE}"


def quiet_mlflow_logs() -> None:
    """Keep MLflow's INFO lines ("Creating initial MLflow database tables...") off the
    terminal unless the user asked for INFO logs (``-v``) or set ``MLFLOW_LOGGING_LEVEL``."""
    if logging.getLogger().getEffectiveLevel() >= logging.WARNING \
            and not os.environ.get("MLFLOW_LOGGING_LEVEL"):
        mlflow_logger = logging.getLogger("mlflow")
        if mlflow_logger.getEffectiveLevel() < logging.WARNING:
            mlflow_logger.setLevel(logging.WARNING)
        # a database error (a full disk) is logged there with its traceback, then raised
        # as an MlflowException, which the command reports in one line
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def check_store_folder(mlruns: str | Path | None = None) -> None:
    """Refuse a default-store folder MLflow would misread, before anything is made: a
    command that would also make its training lock or the demo's folder calls it first,
    so a refused ``--mlruns`` leaves no folder behind. Nothing to check when
    ``MLFLOW_TRACKING_URI`` names the store.

    Raises:
        TrackingError: The folder's path holds ``?`` or ``%``, or holds both quote
            characters and the folder has no database yet.
    """
    if os.environ.get(TRACKING_ENV):
        return
    folder = mlruns_dir(mlruns)
    if {"'", '"'} <= set(str(folder)) and not _has_database(folder / DB_FILE):
        _refuse_quotes(f"sqlite:///{folder / DB_FILE}", folder / ARTIFACTS_DIR, False)
    if {"?", "%"} & set(str(folder)):
        # SQLAlchemy reads '?' in a sqlite URI as the start of its query (a store under
        # runs?1/ would be the file runs) and decodes %XX, as MLflow does in a plain
        # artifact path: the store would be made, or its files written, somewhere else
        odd = " and ".join(repr(c) for c in "?%" if c in str(folder))
        raise TrackingError(
            f"cannot make an MLflow store in {folder}: its path holds {odd}, which MLflow "
            "reads as part of a URL, so the database or its artifacts would go to another "
            "folder; pass a --mlruns DIR (for the demo, an --out DIR) without them")


def _refuse_quotes(uri: str, artifact_root: Path, env_given: bool) -> NoReturn:
    """Refuse a new store whose artifacts folder's path holds both ' and ": MLflow writes
    a new database's first row as SQL text quoted by Python's repr(), which such a path
    breaks (an SQL syntax error, with MLflow's own traceback on stderr)."""
    raise TrackingError(
        f"cannot make an MLflow store at {redacted(uri)}: the path of its artifacts "
        f"folder ({artifact_root}) holds both ' and \", which MLflow cannot write to a "
        "new database; " + ("point MLFLOW_TRACKING_URI at a database in a folder"
                            if env_given else "pass a --mlruns DIR")
        + " whose path has at most one kind of quote")


def configure(mlruns: str | Path | None = None) -> str:
    """Point MLflow's tracking and registry at :func:`default_tracking_uri` and check it.

    Creates ``<mlruns>/`` and ``<mlruns>/artifacts/`` for the default store (where a
    store's database is there but its artifacts folder is not, it warns instead). MLflow's
    own ``set_tracking_uri`` exports the URI to the environment; that is undone, so
    ``MLFLOW_TRACKING_URI`` keeps meaning only what the user set.

    Args:
        mlruns: The default store's folder (and the checkpoints'), kept for the rest of
            the process: a later call without one, here or in any library function that
            takes ``mlruns``, means it too. ``None``: the folder kept, else ``./mlruns``.

    Returns:
        The tracking URI now in use.

    Raises:
        TrackingError: The store cannot be opened (bad URI, server down, locked file).
    """
    quiet_mlflow_logs()
    uri = default_tracking_uri(mlruns)
    env_given = bool(os.environ.get(TRACKING_ENV))
    sqlite_db = _sqlite_file(uri)
    same_store = (mlruns is not None and sqlite_db is not None  # the README's export for
                  and os.path.realpath(sqlite_db)  # MLflow's own tools: no news
                  == os.path.realpath(Path(mlruns) / "mlflow.db"))
    if env_given and mlruns is not None and not same_store \
            and (uri, str(mlruns)) not in _state.warned:
        _state.warned.add((uri, str(mlruns)))  # once: a command configures more than once
        logger.warning("MLFLOW_TRACKING_URI is set, so runs and models go to %s, not to the "
                       "store in %s (that folder still holds training checkpoints); unset it "
                       "to use that store (mlflow.set_tracking_uri sets it too, in a Python "
                       "process)", redacted(uri), mlruns)
    file_store = ((not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) and uri != "databricks")
                  or uri.startswith("file:"))
    if env_given and file_store and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() \
            not in ("true", "1"):
        raise TrackingError(
            f"MLFLOW_TRACKING_URI={uri!r} is neither a database nor a server (MLflow takes "
            "it for a folder of its retired file store); give a database "
            "(sqlite:////ABSOLUTE/PATH/mlflow.db) or a server (http://HOST:PORT), or unset it "
            "to use the store under --mlruns")
    artifact_root = None
    if env_given and sqlite_db is not None:
        # a database alone: MLflow would put its artifacts in ./mlruns of whatever folder
        # the command ran in. Beside the database instead: in its artifacts/ folder where
        # it has one (a default store named through the variable), else <name>-artifacts/.
        # Made by the first artifact logged, not here: a read-only store stays readable.
        shared = sqlite_db.parent / ARTIFACTS_DIR
        artifact_root = (shared if shared.is_dir()
                         else sqlite_db.parent / f"{sqlite_db.stem}-{ARTIFACTS_DIR}")
    if not env_given:
        folder = mlruns_dir(mlruns)
        artifact_root = folder / ARTIFACTS_DIR
    if env_given and sqlite_db is not None and artifact_root is not None \
            and not _has_database(sqlite_db) and {"'", '"'} <= set(str(artifact_root)):
        _refuse_quotes(uri, artifact_root, True)
    check_store_folder(mlruns)
    if not env_given:
        try:
            if (folder / DB_FILE).is_file() and not os.path.lexists(artifact_root):
                # a store whose artifacts were moved away: an empty folder made here would
                # hide that, and catch the folder moved back (`mv` puts it inside)
                logger.warning("the MLflow store %s has no %s folder: the models and files "
                               "its runs logged cannot be read; put the folder back if it "
                               "was moved", folder, ARTIFACTS_DIR)
            else:
                artifact_root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"cannot create the MLflow store folder {folder}: "
                                f"{exc.strerror or exc}; pass a writable --mlruns DIR") from None
    before = _configuration()
    _point_mlflow(uri)
    _state.uri, _state.artifact_root, _state.default_store = uri, artifact_root, not env_given
    try:
        _open_or_say_why(uri, sqlite_db, artifact_root, env_given)
    except BaseException:  # the store configured before stays the one in use
        _restore(before)
        raise
    if mlruns is not None:  # what mlruns=None means from now on in this process
        _state.folder = mlruns_dir(mlruns)
    if ("configured", uri) not in _state.warned:
        _state.warned.add(("configured", uri))
        logger.info("MLflow tracking store: %s", redacted(uri))
    return uri


def _point_mlflow(uri: str) -> None:
    """Point MLflow's tracking and registry at ``uri``. MLflow's own ``set_tracking_uri``
    exports the URI to the environment; that is undone, so ``MLFLOW_TRACKING_URI`` keeps
    meaning only what the user set."""
    saved = {name: os.environ.get(name) for name in (TRACKING_ENV, REGISTRY_ENV)}
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _open_or_say_why(uri: str, sqlite_db: Path | None, artifact_root: Path | None,
                     env_given: bool) -> None:
    """Open the store :func:`configure` points at (creating a new one's tables).

    Raises:
        TrackingError: It cannot be opened, with what to do about it.
    """
    if sqlite_db is not None and (problem := _sqlite_place_problem(sqlite_db, env_given)):
        raise TrackingError(f"cannot open the MLflow tracking store {uri}: {problem}")
    try:
        with _creation_lock(sqlite_db) as locked:
            _open_store(uri, sqlite_db, artifact_root, locked=locked)
    except Exception as exc:  # any failure here means the store is unusable
        first = first_line(exc)
        if isinstance(exc, ModuleNotFoundError) or "No module named" in first:
            hint = "install the database driver it names (pip install it), or use another store"
        elif sqlite_db is not None and "_alembic_tmp_" in first:
            hint = _half_built_hint(sqlite_db, uri)
        elif sqlite_db is not None and _DAMAGED_DATABASE.search(first):
            hint = (f"{sqlite_db} is damaged or not an MLflow database; restore it from a "
                    "backup, or " + ("point MLFLOW_TRACKING_URI at another database"
                                     if env_given else "pass another --mlruns DIR"))
        elif sqlite_db is not None and "database is locked" in first:
            hint = ("another process has held the database for longer than a command waits "
                    "(a long write, or a process stopped while writing it, such as a "
                    "suspended sqlite3 shell); let it finish or end it, then run this again")
        elif env_given:
            hint = "check MLFLOW_TRACKING_URI and that the server is running"
        else:
            hint = "check that the folder is writable, or pass another --mlruns DIR"
        reason = unreachable_reason(exc)
        problem = (f"the server is unreachable ({reason})" if reason is not None
                   else password_masked(first, uri))
        raise TrackingError(f"cannot open the MLflow tracking store {redacted(uri)}: "
                            f"{problem}; {hint}") from None


_DAMAGED_DATABASE = re.compile(r"file is not a database|database disk image is malformed")
"""sqlite's words for a file that is not (or no longer) a database: neither the folder's
permissions nor the server is at fault, as the other hints would say. (A database
MLflow's migrations left half-built, by an older anomaly-flow or MLflow itself stopped
while making it, names an ``_alembic_tmp_`` table.)"""


def _open_store(uri: str, sqlite_db: Path | None, artifact_root: Path | None, *,
                locked: bool = False) -> None:
    """Build a new sqlite database (where ``sqlite_db`` is missing or empty), then reach
    the store once."""
    if sqlite_db is not None and artifact_root is not None and not _has_database(sqlite_db):
        # a new database: built here so that even MLflow's "Default" experiment keeps
        # its artifacts under the store's artifacts folder, not in ./mlruns
        _build_database(sqlite_db, artifact_root, locked=locked)
    with _first_contact():
        mlflow.MlflowClient().search_experiments(max_results=1)


_BUILDING = ".building-"
"""Infix of the name a new database is built under (:func:`_build_database`)."""


def _build_database(db: Path, artifact_root: Path, *, locked: bool) -> None:
    """Make MLflow's sqlite database ``db`` whole or not at all: its schema is built (by
    MLflow's migrations, a second or so) in a hidden file beside it, which then takes its
    name. A command stopped during the migrations (Ctrl-C a second into the first
    ``train`` or ``demo``) left a half-built ``mlflow.db`` that every later command
    refused ("table _alembic_tmp_... already exists").

    Under :func:`_creation_lock` (``locked``) a file a killed build left is removed here.
    The built file takes the name only where none is there (or an empty one is): where
    no lock could be taken, another command may have built and begun to use one meanwhile,
    which must not be replaced."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    if locked:  # no other build can be under way
        for stale in db.parent.glob(f"{glob.escape('.' + db.name)}{_BUILDING}*"):
            with contextlib.suppress(OSError):
                stale.unlink()
    building = db.with_name(f".{db.name}{_BUILDING}{os.getpid()}")
    building_uri = f"sqlite:///{building}"
    try:
        store = SqlAlchemyStore(building_uri, str(artifact_root))
        store.engine.dispose()  # its connections closed before the file moves
        SqlAlchemyStore._engine_map.pop(building_uri, None)
        # a pool this process kept for an earlier database of that name (deleted since)
        # would go on writing to the deleted file
        cached = SqlAlchemyStore._engine_map.pop(f"sqlite:///{db}", None)
        if cached is not None:
            cached.dispose()
        try:
            os.link(building, db)
        except FileExistsError:
            if not _has_database(db):  # an empty file: nothing in it to lose
                os.replace(building, db)
            # else another command built it meanwhile: its database stands, ours goes
    finally:
        with contextlib.suppress(OSError):
            building.unlink(missing_ok=True)


def _read_only(db: Path) -> contextlib.closing[Any]:
    """A read-only connection to the sqlite database ``db`` (nothing written, nor made
    where it is missing), closed at the end of a ``with`` block."""
    import sqlite3

    return contextlib.closing(sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True))


def _half_built_hint(db: Path, uri: str) -> str:
    """What to do with a sqlite store MLflow's migrations left half-built (``_alembic_tmp_``
    tables): a new one holds nothing yet and can go; one an upgrade was stopped in
    (the first command after a newer MLflow came) holds runs."""
    import sqlite3

    try:
        with _read_only(db) as connection:
            runs = connection.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
            tables = [row[0] for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE name LIKE '\\_alembic\\_tmp\\_%' "
                "ESCAPE '\\'")]
    except sqlite3.Error:  # no runs table: the build stopped before it
        runs, tables = 0, []
    if not runs:
        return (f"{db} was left half-built by a command stopped while it made the database, "
                "and it holds no runs; delete it and run the command again")
    return (f"{db} holds {runs} runs, and an upgrade of its tables by a newer MLflow was "
            f"stopped half way; copy it somewhere safe, then drop the table(s) it left "
            f"({', '.join(tables) or '_alembic_tmp_*'}) with sqlite3 and run "
            f"'mlflow db upgrade {uri}'")


@contextmanager
def _creation_lock(sqlite_db: Path | None) -> Iterator[bool]:
    """Hold ``.<db>.lock`` beside a sqlite database while it is built and first read: two
    commands started at once on a new store both ran MLflow's migrations, and all but one
    failed ("Online migration expected to match one row ... in 'alembic_version'") or read
    a half-built schema. Made only for a database that does not exist yet (or is empty);
    once there, every command takes it (a database made beside it may still be being
    built). Nothing is held where it cannot be opened (a read-only folder, no ``flock``).
    Yields whether the lock is held."""
    if sqlite_db is None:
        yield False
        return
    lock = sqlite_db.parent / f".{sqlite_db.name}.lock"
    handle = None
    if file_lock.SUPPORTED:
        try:  # the body runs outside this try: an error of its own must not reach the except
            if lock.is_file():
                handle = open(lock)  # noqa: SIM115 (a read-only store: flock needs no write)
            elif not _has_database(sqlite_db):
                handle = open(lock, "a")  # noqa: SIM115
        except OSError:
            handle = None
    if handle is None:
        yield False
        return
    with handle:
        try:
            locked = file_lock.lock(handle, wait=True)
        except OSError:  # no locks on this file system
            locked = False
        try:
            yield locked
        finally:
            if locked:
                file_lock.unlock(handle)


def uses_default_store() -> bool:
    """Whether runs go to the store under ``--mlruns`` (``MLFLOW_TRACKING_URI`` unset)."""
    ensure_configured()
    return _state.default_store


def ui_command(uri: str) -> str:
    """How to look at the store ``uri`` in MLflow's UI: a server's own address, else
    ``mlflow ui`` on the store, with the URI quoted for a shell where it needs it (a
    store under a folder named ``my runs`` or ``a&b``), so the line can be pasted."""
    if uri.startswith(("http://", "https://")):
        return f"open {redacted(uri)} in a browser (the tracking server's UI)"
    if uri.startswith("databricks"):
        return "open the Experiments page of your Databricks workspace"
    return f"mlflow ui --backend-store-uri {shlex.quote(redacted(uri))}"


def redacted(uri: str) -> str:
    """``uri`` with the password in it, if any, masked (``user:***@host``): what messages,
    logs and records show of a tracking URI."""
    return without_passwords(uri)


def password_masked(text: str, uri: str) -> str:
    """``text`` (an error from the store) with the password of ``uri``, if any, masked
    where it stands on its own: not inside a longer word, where a short password (``pg``)
    would mangle the rest of the message (``No module named 'psyco***2'``)."""
    with contextlib.suppress(ValueError):
        password = urllib.parse.urlsplit(uri).password
        if password:
            return re.sub(rf"(?<!\w){re.escape(password)}(?!\w)", "***", text)
    return text


def _sqlite_place_problem(db: Path, env_given: bool) -> str | None:
    """Why the sqlite database ``db`` cannot be opened or made there, or None. Said at
    once: MLflow would retry for minutes before giving up."""
    if db.exists() and not db.is_file():
        if env_given and (db / DB_FILE).is_file():
            return (f"{db} is a store folder, not its database; point MLFLOW_TRACKING_URI "
                    f"at sqlite:///{db / DB_FILE}")
        return (f"{db} is not a file, where the sqlite database goes; move it away, or "
                + ("point MLFLOW_TRACKING_URI at a database file" if env_given
                   else "pass another --mlruns DIR"))
    if not db.exists() and db.parent.is_dir() and not os.access(db.parent, os.W_OK | os.X_OK):
        return (f"the folder {db.parent} is not writable, so the database cannot be made "
                "there; fix its permissions, or name a database in a writable folder")
    if (others := _foreign_tables(db)) is not None:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        return (f"{db} is a database of something else (its tables are {shown}), not an "
                "MLflow store, and MLflow would add its tables to it; "
                + ("point MLFLOW_TRACKING_URI at an MLflow database or a new file"
                   if env_given else "pass another --mlruns DIR"))
    return None  # a missing folder is made


def _foreign_tables(db: Path) -> list[str] | None:
    """The tables of the sqlite database ``db`` where it holds some and none of them is
    MLflow's (``experiments``, which MLflow makes first, or a migration's
    ``_alembic_tmp_*``);
    None for an MLflow database, an empty one, or a file sqlite cannot read (opening it
    says what is wrong)."""
    if not _has_database(db):
        return None
    import sqlite3

    try:
        with _read_only(db) as connection:
            tables = sorted(row[0] for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"))
    except sqlite3.Error:
        return None
    # not alembic_version alone: other applications keep their migrations with alembic too
    mlflow_own = any(name == "experiments" or name.startswith("_alembic_tmp_")
                     for name in tables)
    return tables if tables and not mlflow_own else None


def _has_database(db: Path) -> bool:
    """Whether the sqlite file ``db`` holds a database: there and not empty (opening an
    empty file, as a missing one, would build a store there)."""
    return db.is_file() and db.stat().st_size > 0


def _sqlite_file(uri: str) -> Path | None:
    """The database file a ``sqlite:`` URI names, read as SQLAlchemy reads it (absolute),
    or None: another store, an in-memory database, or a URI that is not one."""
    if not uri.startswith("sqlite:"):
        return None
    try:
        database = make_url(uri).database
    except Exception:  # not a URL SQLAlchemy can read: MLflow says so when it opens it
        return None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    db = Path(database)
    return db if db.is_absolute() else Path.cwd() / db


FIRST_CONTACT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
"""MLflow's HTTP settings for the first request to a tracking server, where the user has
set none: a server that is down is reported in seconds, not after MLflow's default
seven retries (about four minutes). Later requests keep MLflow's patient defaults."""


@contextmanager
def _first_contact() -> Iterator[None]:
    """MLflow's HTTP settings of :data:`FIRST_CONTACT`, and urllib3's "Retrying ..." line
    kept off the terminal: a server that is down is then reported in the one line of
    :func:`configure`'s error, not with a warning about its retry before it."""
    added = {key: value for key, value in FIRST_CONTACT.items() if key not in os.environ}
    os.environ.update(added)
    pool = logging.getLogger("urllib3.connectionpool")
    level = pool.level
    if logging.DEBUG < pool.getEffectiveLevel() < logging.ERROR:
        pool.setLevel(logging.ERROR)  # -vv (DEBUG) still shows it
    try:
        yield
    finally:
        pool.setLevel(level)
        for key in added:
            os.environ.pop(key, None)


@contextmanager
def quiet_mlflow() -> Iterator[None]:
    """Silence MLflow's artifact progress bars and its advice to add an input example,
    unless the user asked for the bars (``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    saved = os.environ.get(key)
    if saved is None:
        os.environ[key] = "false"
    try:
        with warnings_caught():
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            yield
    finally:
        if saved is None:
            os.environ.pop(key, None)


def missing_default_store(mlruns: str | Path | None = None) -> Path | None:
    """The store's sqlite database file when it does not exist yet (or is empty), else
    None: the default store's, or the one a ``sqlite:///`` ``MLFLOW_TRACKING_URI`` names
    (other URIs: None). Opening a missing or empty sqlite store builds one there; a
    command that only reads from the store checks this first."""
    env = os.environ.get(TRACKING_ENV)
    db = _sqlite_file(env) if env else mlruns_dir(mlruns) / DB_FILE
    if db is None:
        return None
    return None if _has_database(db) else db


def require_writable_store(what: str = "logs a run and registers a model", *,
                           experiment: str | None = None) -> None:
    """Refuse, before any work, a local sqlite store this process cannot write (a
    read-only mount, a file without write permission), or an ``experiment`` whose
    artifacts folder on this machine it cannot write: MLflow would fail only at the first
    write, after the folders were scored, with pages of SQL or a traceback. MLflow keeps
    each experiment's folder as the absolute path it had when made, so in a store that
    was copied or moved, or made by another user, it need not be the store's.

    Raises:
        TrackingError: The database file, its folder (sqlite writes a journal beside
            it), the artifact folder or the experiment's (or the nearest folder above it
            that exists) is read-only; the message says the command ``what`` there.
    """
    uri = ensure_configured()
    db = _sqlite_file(uri)
    places = [] if db is None else [db, db.parent]  # else a server, or another store:
    if db is not None and _state.artifact_root is not None:  # its own answer says
        places.append(_state.artifact_root)
    for place in places:
        if place.exists() and not os.access(place, os.W_OK):
            where = ("pass a writable --mlruns DIR" if _state.default_store else
                     "point MLFLOW_TRACKING_URI at a writable store (or unset it and pass a "
                     "writable --mlruns DIR)")
            raise TrackingError(
                f"the MLflow store {uri} cannot be written ({place} is read-only); this "
                f"command {what} there: {where} (a copy of the store, to keep its "
                "models), or fix the permissions")
    found = None if experiment is None else mlflow.MlflowClient().get_experiment_by_name(
        experiment)  # a new one is made under the artifact folder checked above
    folder = None if found is None else local_folder(found.artifact_location)
    if folder is None:
        return  # none yet, or a server's or a cloud store's: its own answer says
    place = next((above for above in (folder, *folder.parents) if above.exists()), None)
    if place is not None and not os.access(place, os.W_OK):
        raise TrackingError(
            f"the artifacts of MLflow experiment {experiment!r} go to {folder}, and {place} "
            f"cannot be written; this command {what} there: fix the permissions of {place}, "
            "or log to another store (--mlruns DIR, or MLFLOW_TRACKING_URI)")


def configured_uri() -> str | None:
    """The tracking URI :func:`configure` set, or None before the first call."""
    return _state.uri


def ensure_configured() -> str:
    """The configured tracking URI, configuring the default one on first use."""
    return _state.uri if _state.uri is not None else configure()


def safe_name(name: str) -> str:
    """``name`` reduced to characters safe in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def ensure_experiment(name: str) -> str:
    """The id of experiment ``name``, created (or restored from deletion) when needed.

    On the default store its artifacts go to ``<mlruns>/artifacts/<name>``.
    """
    ensure_configured()
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            logger.info("restoring deleted experiment %r", name)
            client.restore_experiment(experiment.experiment_id)
        _warn_if_elsewhere(name, experiment.artifact_location)
        return experiment.experiment_id
    location = None
    if _state.artifact_root is not None:
        location = str(_state.artifact_root / safe_name(name))
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        experiment = client.get_experiment_by_name(name)  # created concurrently
        if experiment is None:
            raise
        return experiment.experiment_id


def local_folder(location: str | None) -> Path | None:
    """The folder an artifact location names on this machine, or None for a server's or
    a cloud store's: a ``file:`` URI decoded, a plain path as it is (read as a URL, a
    '#' in it would cut it short)."""
    parsed = urllib.parse.urlparse(location or "")
    if not location or parsed.scheme not in ("", "file"):
        return None
    return Path(urllib.parse.unquote(parsed.path) if parsed.scheme else location)


def moved_location(location: str | None) -> Path | None:
    """Where the files at the local ``location`` the store recorded are now, when the
    default store was moved whole (its ``mlflow.db`` and artifacts folder together, now
    under another ``--mlruns``): MLflow records the absolute paths of the place the store
    was made in. The same path below this store's artifacts folder, where the recorded one
    is gone and that one exists; None otherwise."""
    folder = local_folder(location)
    root = _state.artifact_root
    if folder is None or root is None or not _state.default_store or folder.exists():
        return None
    parts = folder.parts
    for i, part in enumerate(parts):  # the old store's own folder, wherever it was
        if part == ARTIFACTS_DIR and (moved := root.joinpath(*parts[i + 1:])).exists():
            return moved
    return None


def _warn_if_elsewhere(name: str, location: str) -> None:
    """Warn when a local experiment keeps its artifacts outside this store's folder: MLflow
    records absolute paths, so a store that was moved or copied keeps writing to (and
    reading from) the old place."""
    root = _state.artifact_root
    folder = local_folder(location)
    if root is None or not _state.default_store or folder is None:
        return  # a store of the user's may hold experiments other tools put elsewhere
    where = folder.resolve()
    if not where.is_relative_to(root.resolve()):
        logger.warning("experiment %r keeps its artifacts in %s, outside this store's %s (was "
                       "the store moved or copied? MLflow records absolute paths); its new "
                       "runs' artifacts go there too", name, where, root)


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
                ending.enter_context(_first_contact())
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
                           "closing it (killed, or cut off from the store); marked KILLED",
                           run.info.run_id, run.info.run_name)


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
        _state.killed.append(active.info.run_id)


def note_registered(uri: str) -> None:
    """Record a model version this process registered (``models:/NAME/N``), for
    :func:`stop_advice`."""
    _state.registered.append(uri)


def note_to_promote(uri: str) -> None:
    """Record that the version ``uri`` this process registered is to become ``champion``,
    for :func:`failure_advice`, until :func:`note_promoted` says it did."""
    _state.to_promote.add(uri)


def note_promoted(what: str, uri: str | None = None) -> None:
    """Record an alias this process moved (``alias 'champion' of NAME moved to version N
    from M``), to version ``uri``, for :func:`stop_advice`: a stop after it leaves the
    alias moved."""
    _state.promoted.append(what)
    if uri is not None:
        _state.to_promote.discard(uri)


def stop_mark() -> tuple[int, int, int]:
    """Where this process stands in runs ended KILLED, versions registered and aliases
    moved: what :func:`stop_advice` counts from."""
    return len(_state.killed), len(_state.registered), len(_state.promoted)


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
    for uri in (uri for uri in made if uri in _state.to_promote):
        said += (f", but did not move alias 'champion' to it (to do so: anomaly-flow "
                 f"promote {uri})")
    return said + "; use it rather than running the command again for another version"


def stop_advice(mark: tuple[int, int, int]) -> str:
    """For a stopped command's message: the runs a stop ended KILLED since ``mark`` (or
    that it came before any run started) and, where the command had already registered
    a version, that the version is whole, and which alias it moved to it; then what to
    do."""
    ids = _state.killed[mark[0]:]
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
    made, moved = _state.registered[mark[1]:], _state.promoted[mark[2]:]
    whole = "which is whole" if len(made) == 1 else "which are whole"
    return made, (f"registered {', '.join(made)}, {whole}"
                  + "".join(f", and {what}" for what in moved))

