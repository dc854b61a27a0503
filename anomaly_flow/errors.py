"""The exceptions a user can cause, in one list, for the CLI and the pipeline scripts.

Each lives beside the code that raises it; this module only names them, and looks them
up lazily so that importing it loads neither torch nor mlflow (a class whose module was
never imported cannot have been raised).
"""

from __future__ import annotations

import sys

USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("anomaly_flow.config", "ConfigError"),
    ("anomaly_flow.data", "DataError"),
    ("anomaly_flow.glow", "ModelFileError"),
    ("anomaly_flow.train", "TrainingError"),
    ("anomaly_flow.scoring", "ScoringError"),
    ("anomaly_flow.calibration", "CalibrationError"),
    ("anomaly_flow.tracking.models", "ModelNotFoundError"),
    ("anomaly_flow.tracking.store", "TrackingError"),
)
"""(module, class) of every exception a user can cause."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The classes of :data:`USER_ERRORS` whose modules are loaded; use in ``except``."""
    types = []
    for module_name, class_name in USER_ERRORS:
        module = sys.modules.get(module_name)
        error = getattr(module, class_name, None) if module is not None else None
        if isinstance(error, type):
            types.append(error)
    return tuple(types)
