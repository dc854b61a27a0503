"""Where runs go: the tracking URI, the store it names, and experiments.

The default store is ``sqlite:///<mlruns>/mlflow.db`` with artifacts under
``<mlruns>/artifacts/<experiment>``, where ``<mlruns>`` is ``./mlruns`` (absolute) unless
a folder is given (``--mlruns DIR`` makes ``DIR`` itself the folder). The environment
variable ``MLFLOW_TRACKING_URI``, read at call time, overrides it (e.g. a real
``mlflow server``); the server then decides where artifacts go. The runs
logged there are opened and ended by :mod:`anomaly_flow.tracking.runs`.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shlex
import urllib.parse
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import mlflow
from mlflow.exceptions import MlflowException
from sqlalchemy.engine import make_url

from anomaly_flow import file_lock
from anomaly_flow.data import warnings_caught
from anomaly_flow.errors import first_line, unreachable_reason, without_passwords

logger = logging.getLogger(__name__)

TRACKING_ENV = "MLFLOW_TRACKING_URI"
REGISTRY_ENV = "MLFLOW_REGISTRY_URI"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
CHECKPOINTS_DIR = "checkpoints"


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or used; the message says which and what to do."""


@dataclass
class _State:
    uri: str | None = None
    artifact_root: Path | None = None  # set for sqlite stores: where new experiments go
    default_store: bool = False  # the store under --mlruns, not MLFLOW_TRACKING_URI's
    warned: set[tuple[str, str]] = field(default_factory=set)  # said once per process
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
            what = f"artifacts folder in {folder}" if folder.is_dir() else f"folder {folder}"
            raise TrackingError(f"cannot create the MLflow store {what}: "
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
    with first_contact():
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
def first_contact() -> Iterator[None]:
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
