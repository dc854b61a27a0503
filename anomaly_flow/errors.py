"""The exceptions a user can cause, in one list, for the CLI and the pipeline scripts.

Each lives beside the code that raises it; this module only names them, and looks them
up lazily so that importing it loads neither torch nor mlflow (a class whose module was
never imported cannot have been raised).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from types import ModuleType

USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("anomaly_flow.config", "ConfigError"),
    ("anomaly_flow.data", "DataError"),
    ("anomaly_flow.glow", "ModelFileError"),
    ("anomaly_flow.checkpoint", "TrainingError"),
    ("anomaly_flow.score_table", "ScoringError"),
    ("anomaly_flow.calibration_checks", "CalibrationError"),
    ("anomaly_flow.tracking.models", "ModelNotFoundError"),
    ("anomaly_flow.tracking.store", "TrackingError"),
    ("mlflow.exceptions", "MlflowException"),
)
"""(module, class) of every exception a user can cause. MLflow's own errors are among
them: past the store check, what reaches the user from MLflow is a store or server that
went away or refused a request mid-run (:func:`describe`)."""


_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*):[^\s/@]+@")


def without_passwords(text: str) -> str:
    """``text`` with the password of every URL in it masked (``scheme://user:***@host``):
    a tracking URI may carry one, and MLflow's errors repeat the URI they failed on."""
    return _CREDENTIALS.sub(r"\1:***@", text)


def is_store_error(error: BaseException) -> bool:
    """Whether ``error`` is MLflow's: a tracking store or server failing a request."""
    return type(error).__module__.startswith("mlflow")


def unreachable_reason(error: BaseException) -> str | None:
    """Why a tracking server could not be reached, in a few words, where ``error`` (MLflow's
    error for a request) comes from the network, not from an answer of the server; else
    None. MLflow raises its own error inside the ``except`` of the ``requests`` error, so
    the latter is in its context chain. ``requests`` is looked up, not imported: where it
    was never loaded, no request failed."""
    requests = sys.modules.get("requests")
    exceptions = getattr(requests, "exceptions", None)
    if exceptions is None:
        return None
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, exceptions.SSLError):
            return "TLS handshake failed: an http:// server named with https://?"
        if isinstance(current, exceptions.Timeout):
            return "no answer in time"
        if isinstance(current, exceptions.ConnectionError):
            text = str(current)
            if "NameResolutionError" in text or "Failed to resolve" in text:
                return "its host name does not resolve"
            if "Connection refused" in text:
                return "connection refused: nothing listens at that address and port"
            if "Read timed out" in text:  # requests' word for retries spent on read timeouts
                return ("no answer in time: something listens at that address and port but "
                        "sent nothing back")
            return "no connection could be made"
        current = current.__cause__ or current.__context__
    return None


_SQL_DETAILS = re.compile(r"\(raised as a result of Query-invoked autoflush;[^)]*\) ?"
                          r"| ?\[SQL: .*| ?\(Background on this error at: [^)]*\)")
"""What SQLAlchemy adds to a database's own error (sqlite's "database or disk is full"):
the statement with its values, the step that ran it, a link; MLflow passes it all on."""


def describe(error: BaseException) -> str:
    """The message for a user error: its own, or for an MLflow error (whose message is
    the failed request) what to check and to run the command again."""
    message = without_passwords(" ".join(str(error).split())) or type(error).__name__
    if is_store_error(error) and (reason := unreachable_reason(error)) is not None:
        return (f"the MLflow tracking server became unreachable ({reason}); check "
                "MLFLOW_TRACKING_URI and that the server is running, then run the command "
                "again (the run it was logging may be incomplete)")
    if is_store_error(error):
        message = _SQL_DETAILS.sub("", message) or message
        if len(message) > 400:
            message = message[:397] + "..."
        return (f"MLflow failed: {message}; check the tracking store (MLFLOW_TRACKING_URI, "
                "or --mlruns) and run the command again (the run it was logging may be "
                "incomplete)")
    return message


def user_error_types() -> tuple[type[BaseException], ...]:
    """The classes of :data:`USER_ERRORS` whose modules are loaded; use in ``except``."""
    types = []
    for module_name, class_name in USER_ERRORS:
        module = sys.modules.get(module_name)
        error = getattr(module, class_name, None) if module is not None else None
        if isinstance(error, type):
            types.append(error)
    return tuple(types)


def first_line(error: BaseException) -> str:
    """An error's first line of text, or its type's name where it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """``text`` (a file name, say) with its control characters escaped, a newline as
    ``\\n``: in a log message, a line-per-file report or a CLI message it stays on its
    line and cannot pass itself off as another message."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def _runs() -> ModuleType | None:
    """:mod:`anomaly_flow.tracking.runs` where it is loaded, else None: it is not loaded
    here (a ``--help`` stays fast), and a command that never loaded it started no run,
    registered nothing and moved no alias."""
    return sys.modules.get("anomaly_flow.tracking.runs")


def store_mark() -> tuple[int, int, int]:
    """Where the store's record of registrations and promotions stands
    (:func:`anomaly_flow.tracking.stop_mark`)."""
    runs = _runs()
    return runs.stop_mark() if runs is not None else (0, 0, 0)


@contextmanager
def command_scope() -> Iterator[tuple[int, int, int]]:
    """Around a command (``anomaly-flow ...``, a pipeline script), also one run inside a
    Python process: yields :func:`store_mark`; while it runs, ``./mlruns`` is the store
    when it is given no ``--mlruns``, whatever folder the caller gave
    :func:`anomaly_flow.tracking.configure`, which is back after it
    (:func:`~anomaly_flow.tracking.store.own_store_folder`)."""
    store = sys.modules.get("anomaly_flow.tracking.store")
    with store.own_store_folder() if store is not None else nullcontext():
        yield store_mark()


def describe_failure(error: BaseException, mark: tuple[int, int, int]) -> str:
    """:func:`describe`, and for a command that registered a model version since ``mark``
    before it failed (a store lost in between) which version that is and how to finish
    (:func:`anomaly_flow.tracking.failure_advice`): running it again would register
    another."""
    message = describe(error)
    runs = _runs()
    if runs is not None and (advice := runs.failure_advice(mark)):
        message = message.rstrip(".") + advice
    return message


def stop_advice(mark: tuple[int, int, int]) -> str:
    """For a stopped command's message, what it leaves and what to do
    (:func:`anomaly_flow.tracking.stop_advice`)."""
    runs = _runs()
    return (runs.stop_advice(mark) if runs is not None
            else "(before it started an MLflow run); run the same command again")


_ALIKE = "_anomaly_flow_alike_on_every_process"


def alike_on_every_process(error: BaseException) -> BaseException:
    """Mark ``error`` as one that every process of a ``torchrun`` training raises with the
    same message (a check of the same arguments and files before the processes meet, or
    a refusal they share), so that one process per host says it (:func:`told_nearby`)."""
    setattr(error, _ALIKE, True)
    return error


@contextmanager
def raised_alike() -> Iterator[None]:
    """Mark what the block raises :func:`alike_on_every_process`: for checks every process
    makes alike (the same arguments, the same files) before the processes meet."""
    try:
        yield
    except Exception as exc:
        alike_on_every_process(exc)
        raise


def _processes() -> tuple[int, int]:
    """(``WORLD_SIZE``, ``LOCAL_RANK``) as torchrun sets them; (1, 0) alone or when they are
    not numbers."""
    try:
        return (int(os.environ.get("WORLD_SIZE", "1")),
                int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError:
        return 1, 0


_PEER_GONE = re.compile(r"gloo|nccl|connection (reset|closed) by peer|broken pipe", re.I)
_SOURCE_PLACE = re.compile(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*")


_AGAIN = ("mend that, then run the same command again (a training: with --resume, from its "
          "last checkpoint)")


def peer_lost(error: BaseException, then: str | None = None) -> str | None:
    """Under ``torchrun``, what to tell a user whose process failed in a collective
    because another process of the training stopped (killed, out of memory, a refusal
    of its own) or lost its connection: gloo's and NCCL's errors name a socket and a
    source line, not that; ``then`` says what to do (by default: mend it and run the
    command again). None for any other error, or alone."""
    if _processes()[0] <= 1 or not isinstance(error, RuntimeError):
        return None
    if not (type(error).__module__.startswith("torch.distributed")
            or _PEER_GONE.search(str(error))):
        return None
    cause = _SOURCE_PLACE.sub("", first_line(error)).split(". ")[0].rstrip(".")
    return (f"another process of this torchrun stopped or lost its connection "
            f"({one_line(cause)[:200]}); its own message (above, or in its host's log) says "
            f"why: {then or _AGAIN}")


def told_nearby(error: BaseException | None = None) -> bool:
    """Whether this process should leave ``error`` unsaid: under ``torchrun`` (``WORLD_SIZE``
    above 1) in a process of ``LOCAL_RANK`` above 0, for an error marked
    :func:`alike_on_every_process` (``None``: one alike by nature, a usage error), which
    the host's local rank 0 says as well. Eight GPUs then print one line, not eight; an
    error of this process alone (its GPU out of memory) is still said."""
    if error is not None and not getattr(error, _ALIKE, False):
        return False
    world, local_rank = _processes()
    return world > 1 and local_rank > 0
