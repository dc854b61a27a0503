"""The checks that calibration and detection share, and the error they raise.

:mod:`anomaly_flow.calibration` (thresholds, p-values, the stored calibration) and
:mod:`anomaly_flow.detection` (AUROC and the choice of a score type on labelled images)
take the same inputs and refuse them the same way, with a :class:`CalibrationError` whose
message says what was wrong and what to do:

* scores, one per image and higher meaning more anomalous, must be a non-empty 1-D
  array of finite numbers (:func:`as_scores`); a NaN or infinite score is an image that
  failed to score, and ranking or thresholding it would hide that;
* a stored record (a threshold, a score selection, a calibration) must be a JSON object
  with the fields this version knows and no others (:func:`check_fields`): a newer
  version's field, ignored, could change the decisions;
* what a malformed stored value makes Python raise is turned into a
  :class:`CalibrationError` naming the record (:func:`invalid_as_calibration_error`).

:class:`CalibrationError` lives here, below both modules, since both raise it; this module
imports neither (dependencies point one way: calibration imports detection, and both
import this).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "CalibrationError",
    "as_scores",
    "check_fields",
    "invalid_as_calibration_error",
    "is_int",
]


class CalibrationError(ValueError):
    """Calibration inputs or stored calibration data are unusable; the message says why."""


@contextlib.contextmanager
def invalid_as_calibration_error(what: str) -> Iterator[None]:
    """Turn what a malformed stored value makes Python raise (a list where a name goes,
    an integer past a float's range) into a :class:`CalibrationError` naming ``what``."""
    try:
        yield
    except CalibrationError:
        raise
    except (TypeError, ValueError, OverflowError) as error:
        raise CalibrationError(f"invalid {what} in the stored calibration: {error}; "
                               "re-run calibration") from error


def as_scores(values: ArrayLike, name: str, what: str = "scores") -> np.ndarray:
    """Return ``values`` as a finite, non-empty 1-D float64 array, or raise.

    Args:
        values: Scores, shape (N,). Higher = more anomalous.
        name: What these scores are, for error messages ("calibration", "normal", ...).
        what: What the values are called in those messages (``p-values`` for p-values).

    Returns:
        A float64 array of shape (N,) (a copy when conversion was needed).
    """
    label = f"{name} {what}".strip()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as error:
        raise CalibrationError(
            f"{label} must be numbers; could not convert them ({error})."
        ) from error
    if array.ndim != 1:
        raise CalibrationError(
            f"{label} must be a 1-D array with one per image; "
            f"got shape {array.shape}. Flatten or select one value per image."
        )
    if array.size == 0:
        raise CalibrationError(
            f"no {label} were given; at least one scored image is needed. "
            "Check that the image folder is not empty and that scoring succeeded."
        )
    bad = ~np.isfinite(array)
    n_bad = int(bad.sum())
    if n_bad:
        raise CalibrationError(
            f"{n_bad} of {array.size} {label} are NaN or infinite: those images "
            "failed to score (unreadable files, or a model that overflows on them). "
            "Remove or fix those images, or check the model, then run again."
        )
    return array


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_fields(data: Any, what: str, known: set[str], required: set[str]) -> None:
    """Refuse a stored ``what`` that is not a JSON object, has fields this version does not
    know, or lacks required ones."""
    if not isinstance(data, Mapping):
        raise CalibrationError(f"{what} must be a JSON object; got {type(data).__name__}.")
    unknown = sorted(set(data) - known)
    if unknown:
        raise CalibrationError(
            f"unknown {what} field(s) {unknown}; expected only {sorted(known)}. "
            "The file may come from a newer version of anomaly-flow."
        )
    missing = sorted(required - set(data))
    if missing:
        raise CalibrationError(f"{what} is missing field(s) {missing}.")
