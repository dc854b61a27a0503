"""The exceptions a user can cause, in one list, for the CLI and the pipeline scripts.

Each lives beside the code that raises it; this module only names them, and looks them
up lazily so that importing it loads neither torch nor mlflow (a class whose module was
never imported cannot have been raised).
"""

from __future__ import annotations

import re
import sys

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


def store_mark() -> tuple[int, int, int]:
    """Where the store's record of registrations and promotions stands
    (:func:`anomaly_flow.tracking.stop_mark`); nothing is registered before the store
    module is loaded, which is not loaded here (a ``--help`` stays fast)."""
    store = sys.modules.get("anomaly_flow.tracking.store")
    return store.stop_mark() if store is not None else (0, 0, 0)


def describe_failure(error: BaseException, mark: tuple[int, int, int]) -> str:
    """:func:`describe`, and for a command that registered a model version since ``mark``
    before it failed (a store lost in between) which version that is and how to finish
    (:func:`anomaly_flow.tracking.failure_advice`): running it again would register
    another."""
    message = describe(error)
    store = sys.modules.get("anomaly_flow.tracking.store")
    if store is not None and (advice := store.failure_advice(mark)):
        message = message.rstrip(".") + advice
    return message
