"""Calibration: turning anomaly scores into p-values, thresholds and decisions.

Everything here is a plain function over 1-D numpy arrays of scores, one score per
image, where **a higher score means more anomalous** (bits per dimension, a complexity-
corrected score, a per-level score, ...). Nothing here knows about models, MLflow or
the command line.

The decision rule, used everywhere in this package, is strict::

    is_anomaly = score > threshold

so a threshold is "the highest score still called normal". Every threshold-selection
function returns its value in that convention, and `operating_point` measures rates
under that same rule.

Split-conformal calibration (no anomalies needed). Given ``n`` scores of held-out
normal images (never training images), ``c_(1) <= ... <= c_(n)``:

* the p-value of a new score ``s`` is ``p(s) = (1 + #{i : c_i >= s}) / (n + 1)``;
* the threshold for a target false-positive rate ``alpha`` is ``t = c_(k)`` with
  ``k = ceil((1 - alpha) (n + 1))`` (1-indexed). It exists only if ``k <= n``, i.e.
  ``n >= 1/alpha - 1``; with fewer images we refuse rather than guess.

If the new normal score and the calibration scores are exchangeable (same
distribution, independent of which image went where), then
``P(s > t) = P(p(s) <= alpha) <= alpha``, ties included.

The two rules are the same rule. For any score ``s``, ties included,
``s > c_(k)  <=>  p(s) <= alpha``. Proof: ``s > c_(k)`` holds iff at least ``k``
calibration scores are ``< s``, i.e. ``#{c_i >= s} <= n - k``. And ``p(s) <= alpha``
iff ``1 + #{c_i >= s} <= alpha (n + 1)`` iff (the left side is an integer)
``#{c_i >= s} <= floor(alpha (n + 1)) - 1 = n - k``, using
``floor(alpha (n + 1)) = (n + 1) - ceil((1 - alpha)(n + 1))``. A score equal to the
threshold is therefore normal under both.

In floats, ``k`` is taken from the same comparison the p-values meet: ``n - m`` for the
largest ``m`` whose p-value ``(1 + m)/(n + 1)``, a correctly rounded float, is
``<= alpha``. The two rules then agree for every float ``alpha`` (a subnormal one,
below 2.2e-308, excepted: there ``1/(n + 1)`` rounds to few bits), and for one that is
a short decimal, with ``n`` below 10^12, ``k`` is ``ceil((1 - alpha)(n + 1))`` with
``alpha`` read as that decimal (``0.3`` as 3/10, not the binary float just below it):
``alpha=0.3, n=9`` gives ``k=7``, not the ``8`` that ``ceil(0.7 * 10)`` gives in
floats. An ``alpha`` computed rather than typed (``1/3``, ``0.05/3``) may sit a
rounding error from the rational it stands for; the p-value equal to that rational is
flagged, as ``p <= alpha`` says, which can put ``k`` one below the decimal rule's.
Calibrations stored before this rule took ``k`` from the decimal rule; they still load
(:class:`Calibration` accepts either rank), and for them the two rules can disagree on
that one boundary p-value.

With labelled anomalies, `f1_threshold`, `youden_threshold` and `cost_threshold`
pick an operating point from scikit-learn's ROC curve. scikit-learn flags
``score >= t``; we convert each of its thresholds to the equivalent strict threshold:
the next lower distinct observed score (or, if every image is flagged, the largest
float below the smallest score). Among equally good operating points the one that
flags the fewest images (the highest threshold) wins.

`Calibration` is what is stored, as JSON, with a model version: the score name, the
chosen `Threshold` and the sorted calibration scores, from which p-values (and
Benjamini-Hochberg decisions over a batch) can be recomputed later, and, when the score
itself was chosen from data, the :class:`~anomaly_flow.detection.ScoreSelection` that
chose it, and the digest of the model it belongs to (checked wherever the two meet).
How well a score separates anomalies regardless of any threshold (AUROC, and the choice
of a score type by it) is :mod:`anomaly_flow.detection`.

Example:
    >>> import numpy as np
    >>> t = conformal_threshold(np.arange(1.0, 10.0), alpha=0.1)
    >>> t.value
    9.0
    >>> conformal_p_values(np.arange(1.0, 10.0), np.array([9.0, 9.5]))
    array([0.2, 0.1])
"""

from __future__ import annotations

import decimal
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from anomaly_flow.calibration_checks import (
    CalibrationError,
    as_scores,
    check_fields,
    invalid_as_calibration_error,
    is_int,
)
from anomaly_flow.detection import TIE_RTOL, ScoreSelection, labelled_scores
from anomaly_flow.threshold_methods import METHODS, Method

__all__ = [
    "Calibration",
    "Method",
    "Threshold",
    "benjamini_hochberg",
    "calibrate",
    "conformal_p_values",
    "conformal_threshold",
    "cost_threshold",
    "f1_threshold",
    "min_calibration_size",
    "operating_point",
    "rate_interval",
    "shown_precision",
    "youden_threshold",
]

SCHEMA_VERSION = 1


# --------------------------------------------------------------------------- validation


def _check_rate(value: float, name: str, hint: str) -> float:
    """Return ``value`` as a float strictly inside (0, 1), or raise with ``hint``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise CalibrationError(f"{name} must be a number in (0, 1); got {value!r}. {hint}")
    value = float(value)
    if not 0.0 < value < 1.0:
        raise CalibrationError(f"{name} must be strictly between 0 and 1; got {value}. {hint}")
    return value


def _check_alpha(alpha: float) -> Fraction:
    """Validate a target false-positive rate and return it as an exact decimal fraction."""
    alpha = _check_rate(
        alpha, "alpha (the target false-positive rate)", "Use e.g. 0.01 for 1 false alarm in 100."
    )
    # repr gives the shortest decimal that round-trips, i.e. the number the user wrote.
    return Fraction(repr(alpha))


def _first_true(predicate, low: int, high: int) -> int:
    """Smallest ``i`` in ``[low, high]`` with ``predicate(i)``, for a predicate false then
    true along the range and true at ``high``; bisection, so a range of 1e310 is fine."""
    while low < high:
        middle = (low + high) // 2
        if predicate(middle):
            high = middle
        else:
            low = middle + 1
    return low


def _conformal_rank(n: int, alpha: float) -> int:
    """The 1-indexed rank ``k`` of the threshold among ``n`` sorted calibration scores:
    ``n - m`` for the largest count ``m`` of calibration scores at or above a score whose
    p-value ``(1 + m)/(n + 1)`` is ``<= alpha`` as floats (``n + 1`` when none is), so
    that ``score > threshold`` and ``p <= alpha`` agree (module docstring)."""
    # int / int is correctly rounded, so the p-value grows with m and bisection applies
    first_too_large = _first_true(lambda m: (m + 1) / (n + 1) > alpha, 0, n)
    return n - (first_too_large - 1)


def rounded_up(value: float, digits: int = 4) -> float:
    """``value`` (positive) to ``digits`` significant digits, rounded up: a bound printed
    for the user to type back that the check it came from accepts.

    Example:
        >>> rounded_up(1 / 41), rounded_up(1 / 160), rounded_up(1 / 10000)
        (0.0244, 0.00625, 0.0001)
    """
    nearest = f"{value:.{digits - 1}e}"  # the decimal nearest to value, correctly rounded
    if float(nearest) >= value:
        return float(nearest)
    up = decimal.Decimal(nearest)
    return float(up + decimal.Decimal(1).scaleb(up.adjusted() - digits + 1))


def min_calibration_size(alpha: float) -> int:
    """Smallest number of calibration scores for which a conformal threshold exists.

    That is the smallest ``n >= 1`` whose smallest p-value, ``1/(n + 1)``, is ``<= alpha``
    compared as floats, as the p-values are: for a short decimal ``alpha`` down to 1e-16,
    the smallest ``n >= 1/alpha - 1`` with ``alpha`` read as that decimal.

    Args:
        alpha: Target false-positive rate, in (0, 1).

    Returns:
        The minimum number of held-out normal images.

    Example:
        >>> min_calibration_size(0.01), min_calibration_size(0.1), min_calibration_size(0.3)
        (99, 9, 3)
    """
    alpha = float(_check_alpha(alpha))
    # 1/(n + 1) <= alpha holds from here on, exactly and so once rounded
    enough = max(1, math.ceil(1 / Fraction(alpha) - 1))
    return _first_true(lambda n: 1 / (n + 1) <= alpha, 1, enough)


# ---------------------------------------------------------------------- operating points


def _counts(
    normal: np.ndarray, anomalous: np.ndarray | None, threshold: float
) -> tuple[int, int, int, int]:
    """(false positives, true negatives, true positives, false negatives) under ``s > t``."""
    fp = int(np.count_nonzero(normal > threshold))
    tn = normal.size - fp
    if anomalous is None:
        return fp, tn, 0, 0
    tp = int(np.count_nonzero(anomalous > threshold))
    return fp, tn, tp, anomalous.size - tp


def _rates(fp: int, tn: int, tp: int, fn: int, labelled: bool) -> dict[str, float]:
    rates = {"fpr": fp / (fp + tn)}
    if labelled:
        recall = tp / (tp + fn)
        # Nothing flagged: precision is taken as 1 (no false alarms), as scikit-learn's
        # precision-recall curve does at its end point; F1 is then 0.
        precision = tp / (tp + fp) if tp + fp else 1.0
        f1 = 2 * tp / (2 * tp + fp + fn)
        rates.update(tpr=recall, recall=recall, precision=precision, f1=f1)
    return rates


def rate_interval(count: int, total: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper–Pearson) interval, at confidence ``level``, of a rate measured as
    ``count`` of ``total`` images: where a false-positive rate measured on a test set may
    lie by chance alone (4 of 300 is 1.3 %, and 0.4 % to 3.4 % at 95 %).

    Raises:
        ValueError: ``total`` is not positive, or ``count`` is outside 0..``total``.
    """
    if total < 1 or not 0 <= count <= total:
        raise ValueError(f"a rate needs 0 <= count <= total and total >= 1; got {count} of "
                         f"{total}")
    from scipy.stats import binomtest  # seconds of import, for the report only

    interval = binomtest(count, total).proportion_ci(confidence_level=level, method="exact")
    return float(interval.low), float(interval.high)


def shown_precision(precision: float, recall: float, fpr: float, spec: str = ".4g") -> str:
    """Precision as a person reads it: formatted by ``spec``, or ``n/a (nothing flagged)``
    where the threshold flags no image (recall and false-positive rate both 0), whose
    precision is 0/0, held as 1 in the figures (scikit-learn's end point), not a perfect
    one."""
    if recall == 0 and fpr == 0:
        return "n/a (nothing flagged)"
    return format(precision, spec)


def operating_point(
    normal_scores: ArrayLike, anomalous_scores: ArrayLike | None, threshold: float
) -> dict[str, float]:
    """Error rates at ``threshold`` under the rule ``score > threshold``.

    Args:
        normal_scores: Scores of normal images, shape (N,).
        anomalous_scores: Scores of known anomalies, shape (M,), or None.
        threshold: Decision threshold; a score equal to it is normal.

    Returns:
        ``{"fpr": ...}`` and, when anomalies are given, also ``"tpr"``, ``"recall"``
        (the same number), ``"precision"`` (1.0 when nothing is flagged) and ``"f1"``.

    Example:
        >>> operating_point([0.1, 0.2, 0.3, 0.4], [0.35, 0.5, 0.6], 0.3)["f1"]
        0.8571428571428571
    """
    normal = as_scores(normal_scores, "normal")
    anomalous = None if anomalous_scores is None else as_scores(anomalous_scores, "anomalous")
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise CalibrationError(f"threshold must be a finite number; got {threshold}.")
    return _rates(*_counts(normal, anomalous, threshold), labelled=anomalous is not None)


# ------------------------------------------------------------------------ result objects


def _optional_unit(value: Any, name: str) -> float | None:
    if value is None:
        return None
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise CalibrationError(f"Threshold.{name} must be in [0, 1]; got {value}.")
    return value



@dataclass(frozen=True)
class Threshold:
    """A decision threshold and how well it did on the data that chose it.

    The rule is ``is_anomaly = score > value``. Rates are measured in-sample on the
    calibration data; for the conformal method the out-of-sample guarantee is the
    expected false-positive rate ``<= alpha``.

    Attributes:
        value: The highest score still called normal (same units as the score).
        method: How it was chosen: ``"conformal"``, ``"f1"``, ``"youden"`` or ``"cost"``.
        alpha: Target false-positive rate for ``"conformal"``; None otherwise.
        n_calibration: Number of normal scores it was chosen on.
        fpr: False-positive rate on those normal scores.
        n_anomalous: Number of labelled anomalous scores used (0 if none).
        precision: Precision on the labelled data, or None without anomalies.
        recall: Recall (true-positive rate) on the labelled data, or None.
        f1: F1 on the labelled data, or None.
        cost_fp: Cost of one false positive, for ``"cost"``; None otherwise.
        cost_fn: Cost of one false negative, for ``"cost"``; None otherwise.
    """

    value: float
    method: Method
    alpha: float | None
    n_calibration: int
    fpr: float
    n_anomalous: int = 0
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    cost_fp: float | None = None
    cost_fn: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CalibrationError(
                f"unknown threshold method {self.method!r}; expected one of {list(METHODS)}."
            )
        value = float(self.value)
        if not math.isfinite(value):
            raise CalibrationError(f"Threshold.value must be finite; got {value}.")
        object.__setattr__(self, "value", value)
        if self.method == "conformal":
            if self.alpha is None:
                raise CalibrationError("a conformal threshold needs its alpha (target FPR).")
            object.__setattr__(self, "alpha", float(_check_alpha(self.alpha)))
        elif self.alpha is not None:
            raise CalibrationError(
                f"alpha is only meaningful for the conformal method; got alpha={self.alpha} "
                f"with method {self.method!r}."
            )
        for name, minimum in (("n_calibration", 1), ("n_anomalous", 0)):
            count = getattr(self, name)
            if not is_int(count) or count < minimum:
                raise CalibrationError(
                    f"Threshold.{name} must be an integer >= {minimum}; got {count!r}."
                )
            object.__setattr__(self, name, int(count))
        object.__setattr__(self, "fpr", _optional_unit(self.fpr, "fpr"))
        if self.fpr is None:
            raise CalibrationError("Threshold.fpr is required.")
        for name in ("precision", "recall", "f1"):
            object.__setattr__(self, name, _optional_unit(getattr(self, name), name))
        labelled = self.n_anomalous > 0
        missing = [n for n in ("precision", "recall", "f1") if getattr(self, n) is None]
        if labelled and missing:
            raise CalibrationError(
                f"Threshold has {self.n_anomalous} anomalies but no {', '.join(missing)}."
            )
        if self.method != "conformal" and not labelled:
            raise CalibrationError(
                f"method {self.method!r} needs labelled anomalies; n_anomalous is 0."
            )
        costs = (self.cost_fp, self.cost_fn)
        if self.method == "cost":
            if None in costs:
                raise CalibrationError("a cost threshold needs both cost_fp and cost_fn.")
            object.__setattr__(self, "cost_fp", float(self.cost_fp))  # type: ignore[arg-type]
            object.__setattr__(self, "cost_fn", float(self.cost_fn))  # type: ignore[arg-type]
        elif costs != (None, None):
            raise CalibrationError(
                f"cost_fp/cost_fn are only meaningful for the cost method, not {self.method!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Threshold:
        """Rebuild from `to_dict` output, validating every field.

        Raises:
            CalibrationError: Missing or unknown keys, or invalid values.
        """
        check_fields(data, "threshold", set(cls.__dataclass_fields__),
                      {"value", "method", "alpha", "n_calibration", "fpr"})
        with invalid_as_calibration_error("threshold"):
            return cls(**data)


# -------------------------------------------------------------------- conformal p-values


def _sorted_calibration(calibration_scores: ArrayLike) -> np.ndarray:
    return np.sort(as_scores(calibration_scores, "calibration"))


def _p_values_sorted(sorted_cal: np.ndarray, scores: np.ndarray) -> np.ndarray:
    n = sorted_cal.size
    n_at_least = n - np.searchsorted(sorted_cal, scores, side="left")
    return (1.0 + n_at_least) / (n + 1.0)


def conformal_p_values(calibration_scores: ArrayLike, scores: ArrayLike) -> np.ndarray:
    """Split-conformal p-values ``p = (1 + #{cal >= s}) / (n + 1)``.

    A small p-value means the score is higher than almost all calibration (normal)
    scores. For a normal image exchangeable with the calibration set,
    ``P(p <= alpha) <= alpha`` for every alpha.

    Args:
        calibration_scores: Scores of held-out normal images, shape (n,).
        scores: Scores to test, shape (B,).

    Returns:
        p-values in ``[1/(n+1), 1]``, shape (B,), float64.

    Example:
        >>> conformal_p_values([1.0, 2.0, 2.0, 3.0], [0.0, 2.0, 2.5, 4.0])
        array([1. , 0.8, 0.4, 0.2])
    """
    return _p_values_sorted(_sorted_calibration(calibration_scores), as_scores(scores, "test"))


def conformal_need(alpha: float) -> str:
    """The refusal's first clause, the same wherever it is said: how many held-out normal
    images a conformal threshold at ``alpha`` needs (rounded past a billion: an α of
    1e-300 would otherwise print a 300-digit count; no float, since it may pass 1e308)."""
    n = min_calibration_size(alpha)
    count = str(n) if n <= 10**9 else f"{decimal.Decimal(n):.3g}".replace(".00e", "e")
    return (f"the conformal threshold needs at least {count} held-out normal images for a "
            f"false-positive rate of {alpha:.10g}")


def _refusal(n: int, alpha: float) -> CalibrationError:
    return CalibrationError(
        f"{conformal_need(alpha)}; got {n}. Add more normal images to the calibration "
        "folder or raise --target-fpr."
    )


def _conformal_from_sorted(
    sorted_cal: np.ndarray, alpha: float, anomalous: np.ndarray | None = None
) -> Threshold:
    n = sorted_cal.size
    k = _conformal_rank(n, float(_check_alpha(alpha)))
    if k > n:
        raise _refusal(n, float(alpha))
    value = float(sorted_cal[k - 1])
    rates = _rates(*_counts(sorted_cal, anomalous, value), labelled=anomalous is not None)
    return Threshold(
        value=value,
        method="conformal",
        alpha=float(alpha),
        n_calibration=n,
        fpr=rates["fpr"],
        n_anomalous=0 if anomalous is None else anomalous.size,
        precision=rates.get("precision"),
        recall=rates.get("recall"),
        f1=rates.get("f1"),
    )


def conformal_threshold(
    calibration_scores: ArrayLike,
    alpha: float,
    *,
    anomalous_scores: ArrayLike | None = None,
) -> Threshold:
    """Threshold whose false-positive rate on new normal images is at most ``alpha``.

    The threshold is the ``ceil((1 - alpha)(n + 1))``-th smallest calibration score
    (1-indexed, ``alpha`` read as the decimal it prints as; for an ``alpha`` computed
    rather than typed, such as ``0.05/3``, it can be the one below: the module docstring
    says how floats are met). With the rule ``score > threshold`` this flags exactly the
    scores whose conformal p-value is ``<= alpha``.

    Args:
        calibration_scores: Scores of held-out normal images (never training
            images), shape (n,).
        alpha: Target false-positive rate, in (0, 1).
        anomalous_scores: Optional scores of known anomalies, shape (M,), only used
            to report precision, recall and F1 at the threshold.

    Returns:
        A `Threshold` with method ``"conformal"``.

    Raises:
        CalibrationError: If ``n < 1/alpha - 1`` (the message says how many images
            are needed), or on empty / non-finite scores or alpha outside (0, 1).

    Example:
        >>> conformal_threshold([1, 2, 3, 4, 5, 6, 7, 8, 9], alpha=0.3).value
        7.0
    """
    anomalous = None if anomalous_scores is None else as_scores(anomalous_scores, "anomalous")
    return _conformal_from_sorted(_sorted_calibration(calibration_scores), alpha, anomalous)


# ------------------------------------------------------------- thresholds from labels


def _candidates(
    normal: np.ndarray, anomalous: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every distinct operating point, as (strict thresholds, FP counts, TP counts).

    scikit-learn's ROC thresholds ``t`` flag ``score >= t`` (the first one is +inf,
    flagging nothing). The same set of images is flagged by ``score > t'`` where ``t'``
    is the largest observed score below ``t``, or the largest float below the smallest
    score when there is none; when the smallest score is the lowest float, flagging every
    image has no finite threshold, and that point is left out.
    """
    from sklearn.metrics import roc_curve

    y_true, y_score = labelled_scores(normal, anomalous)
    fpr, tpr, sk_thresholds = roc_curve(y_true, y_score, drop_intermediate=False)
    distinct = np.unique(y_score)
    below = np.searchsorted(distinct, sk_thresholds, side="left")
    with np.errstate(over="ignore"):  # below the lowest float: -inf, left out below
        below_all = np.nextafter(distinct[0], -np.inf)
    strict = np.where(below > 0, distinct[np.maximum(below - 1, 0)], below_all)
    # Rates are counts / totals; recover the integer counts exactly.
    fp = np.rint(fpr * normal.size).astype(np.int64)
    tp = np.rint(tpr * anomalous.size).astype(np.int64)
    finite = np.isfinite(strict)
    return strict[finite], fp[finite], tp[finite]


def _pick(objective: np.ndarray, strict: np.ndarray, *, rtol: float) -> float:
    """Highest threshold whose objective is maximal, up to ``rtol`` relative to the best
    value: 0 where equal objectives are equal floats, as F1 (a correctly rounded quotient
    of integers) and J (integers) are; a weighted sum of costs is rounded, so it needs
    :data:`~anomaly_flow.detection.TIE_RTOL`."""
    best = objective.max()
    ties = objective >= best - rtol * abs(best)
    return float(strict[ties].max())


def _labelled_threshold(
    normal_scores: ArrayLike,
    anomalous_scores: ArrayLike,
    method: Method,
    cost_fp: float | None = None,
    cost_fn: float | None = None,
) -> Threshold:
    normal = as_scores(normal_scores, "normal")
    anomalous = as_scores(anomalous_scores, "anomalous")
    strict, fp, tp = _candidates(normal, anomalous)
    fn = anomalous.size - tp
    if method == "f1":
        objective = 2.0 * tp / (2 * tp + fp + fn)
    elif method == "youden":
        # J = TPR - FPR, kept in integers over the common denominator for exact ties.
        objective = (tp * normal.size - fp * anomalous.size).astype(np.float64)
    else:
        # only the ratio matters: in units of the larger cost, two huge costs (1e308
        # each) do not overflow every sum to inf, nor two tiny ones (1e-300) sink into
        # subnormals, and the tie tolerance is relative at any scale
        largest = max(cost_fp, cost_fn)  # type: ignore[type-var]
        # a positive cost whose ratio underflows (1e-300 against 1e300) stays positive,
        # the smallest float: it still breaks ties, instead of counting as a free error
        w_fp, w_fn = (0.0 if c == 0 else max(c / largest, math.ulp(0.0))  # type: ignore[operator]
                      for c in (cost_fp, cost_fn))
        objective = -(w_fp * fp + w_fn * fn)
    value = _pick(objective, strict, rtol=TIE_RTOL if method == "cost" else 0.0)
    rates = _rates(*_counts(normal, anomalous, value), labelled=True)
    return Threshold(
        value=value,
        method=method,
        alpha=None,
        n_calibration=normal.size,
        fpr=rates["fpr"],
        n_anomalous=anomalous.size,
        precision=rates["precision"],
        recall=rates["recall"],
        f1=rates["f1"],
        cost_fp=cost_fp,
        cost_fn=cost_fn,
    )


def f1_threshold(normal_scores: ArrayLike, anomalous_scores: ArrayLike) -> Threshold:
    """Threshold maximising F1 (anomalies positive) on labelled data.

    Args:
        normal_scores: Scores of normal images, shape (N,).
        anomalous_scores: Scores of known anomalies, shape (M,).

    Returns:
        A `Threshold` with method ``"f1"``; ties go to the highest threshold.

    Example:
        >>> f1_threshold([0.1, 0.2, 0.3, 0.4], [0.35, 0.5, 0.6]).value
        0.3
    """
    return _labelled_threshold(normal_scores, anomalous_scores, "f1")


def youden_threshold(normal_scores: ArrayLike, anomalous_scores: ArrayLike) -> Threshold:
    """Threshold maximising Youden's J = TPR - FPR on labelled data.

    Args:
        normal_scores: Scores of normal images, shape (N,).
        anomalous_scores: Scores of known anomalies, shape (M,).

    Returns:
        A `Threshold` with method ``"youden"``; ties go to the highest threshold.
    """
    return _labelled_threshold(normal_scores, anomalous_scores, "youden")


def cost_threshold(
    normal_scores: ArrayLike,
    anomalous_scores: ArrayLike,
    cost_fp: float = 1.0,
    cost_fn: float = 1.0,
) -> Threshold:
    """Threshold minimising ``cost_fp * FP + cost_fn * FN`` on labelled data.

    The counts are over the given data, so with unbalanced sets the costs act on
    counts, not rates: pass costs per image as they are felt in production.

    Args:
        normal_scores: Scores of normal images, shape (N,).
        anomalous_scores: Scores of known anomalies, shape (M,).
        cost_fp: Cost of one false alarm (normal image flagged), >= 0.
        cost_fn: Cost of one missed anomaly, >= 0.

    Returns:
        A `Threshold` with method ``"cost"``; ties go to the highest threshold.
    """
    costs = []
    for name, cost in (("cost_fp", cost_fp), ("cost_fn", cost_fn)):
        if isinstance(cost, bool) or not isinstance(cost, (int, float, np.number)):
            raise CalibrationError(f"{name} must be a number; got {cost!r}.")
        if not (math.isfinite(cost) and cost >= 0):
            raise CalibrationError(f"{name} must be a finite number >= 0; got {cost}.")
        costs.append(float(cost))
    if costs[0] == 0 and costs[1] == 0:
        raise CalibrationError(
            "cost_fp and cost_fn are both 0, so every threshold costs the same. "
            "Give at least one of them a positive cost."
        )
    return _labelled_threshold(normal_scores, anomalous_scores, "cost", *costs)


# --------------------------------------------------------------------------- multiplicity


def benjamini_hochberg(p_values: ArrayLike, q: float) -> np.ndarray:
    """Benjamini-Hochberg step-up procedure controlling the false discovery rate.

    With ``p_(1) <= ... <= p_(m)`` and ``k`` the largest index with
    ``p_(k) <= k q / m``, reject (flag as anomalous) every p-value ``<= p_(k)``.
    Conformal p-values of one batch share their calibration set; they are positively
    dependent in the way BH tolerates (Bates et al., 2023), so FDR <= q still holds.

    Args:
        p_values: p-values in [0, 1], shape (B,).
        q: Target false discovery rate, in (0, 1).

    Returns:
        Boolean reject mask, shape (B,), in the input order.

    Example:
        >>> benjamini_hochberg([0.001, 0.025, 0.026, 0.035, 0.3], q=0.05)
        array([ True,  True,  True,  True, False])
    """
    q = _check_rate(q, "q (the target false discovery rate)", "Use e.g. 0.05 or 0.1.")
    p = as_scores(p_values, "", "p-values")
    if p.min() < 0 or p.max() > 1:
        raise CalibrationError(
            f"p-values must lie in [0, 1]; got values from {p.min()} to {p.max()}. "
            "Pass p-values, not raw scores."
        )
    m = p.size
    sorted_p = np.sort(p)
    # a p-value equal to q·k/m passes; computed in floats q·k/m can land a rounding step
    # below it (0.3·1/3 = 0.09999999999999999), so allow a relative 1e-12, far below the
    # gap between distinct conformal p-values (1/(n+1))
    passing = np.flatnonzero(sorted_p <= q * np.arange(1, m + 1) / m * (1 + 1e-12))
    if passing.size == 0:
        return np.zeros(m, dtype=bool)
    return p <= sorted_p[passing[-1]]


# ----------------------------------------------------------------------------- storage


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Calibration:
    """Everything needed to turn one kind of score into decisions, stored as JSON.

    Built with `calibrate` (or from parts); stored with a model version via
    `to_json` and read back with `from_json`, which validates it.

    Attributes:
        score_name: Which score this calibrates, e.g. ``"bpd"``, ``"complexity"``,
            ``"level_1"``.
        threshold: The chosen `Threshold` (rule: ``score > threshold.value``).
        calibration_scores: The normal calibration scores, sorted ascending, shape
            (n,) as a tuple of floats; any array-like is accepted and sorted.
        created_at: ISO 8601 timestamp (UTC) of creation.
        score_selection: How ``score_name`` was chosen from data
            (:func:`~anomaly_flow.detection.select_score`), or
            None when it was named by the user (and in calibrations stored before
            selection existed).
        model_digest: :meth:`~anomaly_flow.glow.Glow.digest` of the model the
            calibration belongs to: the one whose scores it was fitted on where
            :func:`~anomaly_flow.evaluation.calibrate_model` made it (it records that),
            else the one :func:`~anomaly_flow.tracking.log_model` first logged it with;
            None for one fitted from bare scores and not yet logged, or stored before
            digests. Loading the pair, scoring a folder or a frame with it checks it.
    """

    score_name: str
    threshold: Threshold
    calibration_scores: tuple[float, ...] = field(repr=False)
    created_at: str = field(default_factory=_now)
    score_selection: ScoreSelection | None = None
    model_digest: str | None = None
    _sorted: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.score_name, str) or not self.score_name:
            raise CalibrationError(
                f"score_name must be a non-empty string; got {self.score_name!r}."
            )
        if not isinstance(self.threshold, Threshold):
            raise CalibrationError(
                f"threshold must be a Threshold; got {type(self.threshold).__name__}."
            )
        sorted_cal = _sorted_calibration(self.calibration_scores)
        sorted_cal.setflags(write=False)
        object.__setattr__(self, "_sorted", sorted_cal)
        object.__setattr__(self, "calibration_scores", tuple(sorted_cal.tolist()))
        threshold = self.threshold
        if threshold.n_calibration != sorted_cal.size:
            raise CalibrationError(
                f"threshold was chosen on {threshold.n_calibration} normal scores but "
                f"{sorted_cal.size} calibration scores are stored; they must be the same set."
            )
        if threshold.method == "conformal":
            alpha = threshold.alpha
            expected = _conformal_from_sorted(sorted_cal, alpha).value  # type: ignore[arg-type]
            # or, stored before the float rule, the decimal rule's rank (module docstring)
            n = sorted_cal.size
            decimal_k = math.ceil((1 - _check_alpha(alpha)) * (n + 1))  # type: ignore[arg-type]
            if threshold.value != expected and not (
                    decimal_k <= n and threshold.value == sorted_cal[decimal_k - 1]):
                raise CalibrationError(
                    f"conformal threshold {threshold.value} does not match the stored "
                    f"calibration scores (expected {expected} for alpha={threshold.alpha}); "
                    "the calibration data was altered. Re-run calibration."
                )
        try:
            datetime.fromisoformat(self.created_at)
        except (TypeError, ValueError) as error:
            raise CalibrationError(
                f"created_at must be an ISO 8601 timestamp; got {self.created_at!r}."
            ) from error
        digest = self.model_digest
        if digest is not None and not (isinstance(digest, str)
                                       and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise CalibrationError(
                f"model_digest must be a SHA-256 as 64 lowercase hex digits (what "
                f"Glow.digest returns), or None; got {digest!r}."
            )
        selection = self.score_selection
        if selection is not None:
            if not isinstance(selection, ScoreSelection):
                raise CalibrationError(
                    f"score_selection must be a ScoreSelection; got {type(selection).__name__}."
                )
            if selection.chosen != self.score_name:
                raise CalibrationError(
                    f"the score selection chose {selection.chosen!r} but the calibration is "
                    f"for {self.score_name!r}; they must be the same score."
                )

    @property
    def sorted_scores(self) -> np.ndarray:
        """Calibration scores as a read-only sorted float64 array, shape (n,)."""
        return self._sorted

    def p_values(self, scores: ArrayLike) -> np.ndarray:
        """Conformal p-values of ``scores`` (shape (B,)) against the stored scores."""
        return _p_values_sorted(self._sorted, as_scores(scores, "test"))

    def decide(self, scores: ArrayLike, fdr: float | None = None) -> np.ndarray:
        """Flag anomalies in a batch of scores.

        Args:
            scores: Scores to decide on, shape (B,).
            fdr: If given, ignore the threshold and flag by Benjamini-Hochberg on the
                conformal p-values at this false discovery rate, in (0, 1).

        Returns:
            Boolean mask, shape (B,): ``scores > threshold.value``, or the BH rejections.
        """
        scores = as_scores(scores, "test")
        if fdr is not None:
            return benjamini_hochberg(_p_values_sorted(self._sorted, scores), fdr)
        return scores > self.threshold.value

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (see `to_json` for the layout)."""
        data = {
            "schema_version": SCHEMA_VERSION,
            "score_name": self.score_name,
            "created_at": self.created_at,
            "threshold": self.threshold.to_dict(),
            "calibration_scores": list(self.calibration_scores),
        }
        if self.score_selection is not None:
            data["score_selection"] = self.score_selection.to_dict()
        if self.model_digest is not None:
            data["model_digest"] = self.model_digest
        return data

    def to_json(self, indent: int | None = None) -> str:
        """Serialise to strict JSON; floats round-trip exactly.

        Layout::

            {"schema_version": 1, "score_name": "bpd", "created_at": "...",
             "threshold": {Threshold.to_dict()}, "calibration_scores": [sorted floats],
             "score_selection": {ScoreSelection.to_dict()}, "model_digest": "<sha256>"}

        ``score_selection`` is present only when the score was chosen from data; files
        without it (named scores, older files) read back with ``score_selection=None``.
        ``model_digest`` likewise only when the model is known; without it, None.
        """
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        """Rebuild from `to_dict` output, validating it.

        Raises:
            CalibrationError: Wrong schema version, missing or unknown fields, unknown method,
                non-finite scores, or a threshold inconsistent with the scores.
        """
        if not isinstance(data, Mapping):
            raise CalibrationError(
                f"a calibration must be a JSON object; got {type(data).__name__}."
            )
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CalibrationError(
                f"unsupported calibration schema_version {version!r}; this version of "
                f"anomaly-flow reads {SCHEMA_VERSION}. Re-run calibration or upgrade."
            )
        required = {"score_name", "created_at", "threshold", "calibration_scores"}
        check_fields(data, "calibration",
                     required | {"schema_version", "score_selection", "model_digest"}, required)
        scores = data["calibration_scores"]
        if not isinstance(scores, list) or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores
        ):
            raise CalibrationError("calibration_scores must be a JSON list of numbers.")
        selection = data.get("score_selection")
        with invalid_as_calibration_error("calibration"):
            return cls(
                score_name=data["score_name"],
                threshold=Threshold.from_dict(data["threshold"]),
                calibration_scores=scores,  # type: ignore[arg-type]
                created_at=data["created_at"],
                score_selection=(None if selection is None
                                 else ScoreSelection.from_dict(selection)),
                model_digest=data.get("model_digest"),
            )

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        """Parse and validate `to_json` output."""

        def reject_constant(name: str) -> None:
            raise CalibrationError(f"calibration JSON contains {name}; scores must be finite.")

        try:
            data = json.loads(text, parse_constant=reject_constant)
        except json.JSONDecodeError as error:
            raise CalibrationError(f"calibration file is not valid JSON: {error}.") from error
        return cls.from_dict(data)


def check_fitted_to(calibration: Calibration, digest: str, *, advice: str) -> None:
    """Refuse ``calibration`` for a model whose :meth:`~anomaly_flow.glow.Glow.digest`
    is ``digest`` when it records another model's: its threshold and p-values were set
    on that model's scores. ``advice`` ends the message (what to do instead).

    Raises:
        CalibrationError: ``calibration.model_digest`` is set and is not ``digest``.
    """
    fitted = calibration.model_digest
    if fitted is not None and fitted != digest:
        raise CalibrationError(
            f"this calibration was fitted to the scores of another model (its digest "
            f"{fitted[:12]}..., this model's {digest[:12]}...; a digest covers the config "
            f"and the weights), so its threshold and p-values do not hold for this one; "
            f"{advice}")


def calibrate(
    score_name: str,
    normal_scores: ArrayLike,
    *,
    method: Method = "conformal",
    alpha: float | None = None,
    anomalous_scores: ArrayLike | None = None,
    cost_fp: float = 1.0,
    cost_fn: float = 1.0,
    score_selection: ScoreSelection | None = None,
    model_digest: str | None = None,
) -> Calibration:
    """Choose a threshold and package it with the calibration scores.

    Args:
        score_name: Name of the score, e.g. ``"bpd"``.
        normal_scores: Scores of held-out normal images, shape (n,).
        method: ``"conformal"`` (needs ``alpha``), or ``"f1"``, ``"youden"``,
            ``"cost"`` (need ``anomalous_scores``).
        alpha: Target false-positive rate for ``"conformal"``.
        anomalous_scores: Scores of known anomalies, shape (M,). Optional for
            ``"conformal"`` (then only used to report precision/recall).
        cost_fp: Cost of a false positive, for ``"cost"``.
        cost_fn: Cost of a false negative, for ``"cost"``.
        score_selection: How ``score_name`` was chosen
            (:func:`~anomaly_flow.detection.select_score`), stored with the calibration;
            None when the score was named.
        model_digest: :meth:`~anomaly_flow.glow.Glow.digest` of the model that
            gave the scores, or None (then logging the calibration with a model records
            that model's).

    Returns:
        A validated `Calibration`.
    """
    if method not in METHODS:
        raise CalibrationError(f"unknown method {method!r}; choose one of {list(METHODS)}.")
    if method == "conformal":
        if alpha is None:
            raise CalibrationError(
                "the conformal method needs a target false-positive rate (alpha / --target-fpr)."
            )
        threshold = conformal_threshold(normal_scores, alpha, anomalous_scores=anomalous_scores)
    else:
        if alpha is not None:
            raise CalibrationError(
                f"alpha (target FPR) only applies to the conformal method, not {method!r}; "
                "drop it, or use method='conformal'."
            )
        if anomalous_scores is None:
            raise CalibrationError(
                f"method {method!r} needs scores of labelled anomalous images; give an "
                "anomaly folder, or use the conformal method with a target FPR."
            )
        if method == "f1":
            threshold = f1_threshold(normal_scores, anomalous_scores)
        elif method == "youden":
            threshold = youden_threshold(normal_scores, anomalous_scores)
        else:
            threshold = cost_threshold(normal_scores, anomalous_scores, cost_fp, cost_fn)
    return Calibration(score_name, threshold, normal_scores,  # type: ignore[arg-type]
                       score_selection=score_selection, model_digest=model_digest)
