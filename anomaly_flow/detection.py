"""Detection on labelled data: how well a score separates anomalies from normal images.

A calibration (:mod:`anomaly_flow.calibration`) turns a score into decisions at one
threshold. Before that, and independently of any threshold, the question is how well the
score ranks: given normal images and labelled anomalies, does an anomaly score above a
normal image? This module answers it with the usual threshold-free numbers, and uses them
to choose which score type to calibrate:

* :func:`detection_metrics`: AUROC, average precision (AUPR) and the false-positive rate
  at 95 % true-positive rate, in a :class:`DetectionMetrics`;
* :func:`select_score`: the score type with the highest AUROC among candidates measured
  on the same images, with the evidence kept in a :class:`ScoreSelection`, which a
  :class:`~anomaly_flow.calibration.Calibration` stores in its JSON (and so validates on
  load, refusing a selection that was altered).

Anomalies are the positive class and, as everywhere in this package, **a higher score
means more anomalous**, so scores go to scikit-learn's ``roc_curve``, ``roc_auc_score``
and ``average_precision_score`` as they are, with no sign flipped: scikit-learn ranks by
``score >= t``, exactly what "higher is more anomalous" asks. :func:`labelled_scores`
builds their ``(y_true, y_score)`` inputs, for the ROC-based thresholds of
:mod:`anomaly_flow.calibration` and the curves of :mod:`anomaly_flow.plots` as well.
Ties between a normal and an anomalous score count half in AUROC.

Scores are checked as calibration checks them (:mod:`anomaly_flow.calibration_checks`),
with the same :class:`~anomaly_flow.calibration_checks.CalibrationError`. This module
never imports :mod:`anomaly_flow.calibration`; that one imports this.

Example:
    >>> metrics = detection_metrics([0.1, 0.2, 0.3, 0.4], [0.35, 0.5, 0.6])
    >>> round(metrics.auroc, 4), metrics.n_normal, metrics.n_anomalous
    (0.9167, 4, 3)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
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

__all__ = [
    "SCORE_SELECTION_RULE",
    "TIE_RTOL",
    "DetectionMetrics",
    "ScoreSelection",
    "detection_metrics",
    "labelled_scores",
    "select_score",
]

# Relative tolerance under which two rounded objective values (cost, AUROC) count as a tie;
# the cost threshold of anomaly_flow.calibration uses it too.
TIE_RTOL = 1e-12

SCORE_SELECTION_RULE = "max AUROC on labelled anomalies"
"""The rule `select_score` applies; ties go to the candidate listed first."""


@dataclass(frozen=True)
class DetectionMetrics:
    """Threshold-free separation of normal and anomalous scores (anomalies positive).

    Attributes:
        auroc: Area under the ROC curve.
        aupr: Average precision (area under the precision-recall curve).
        fpr_at_95_tpr: Smallest FPR among ROC points with TPR >= 0.95.
        n_normal: Number of normal scores.
        n_anomalous: Number of anomalous scores.
    """

    auroc: float
    aupr: float
    fpr_at_95_tpr: float
    n_normal: int
    n_anomalous: int

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict, e.g. for ``mlflow.log_metrics``."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def labelled_scores(normal: np.ndarray, anomalous: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels (1 = anomaly) and scores, concatenated, for scikit-learn."""
    y_true = np.concatenate([np.zeros(normal.size, np.int8), np.ones(anomalous.size, np.int8)])
    return y_true, np.concatenate([normal, anomalous])


def detection_metrics(normal_scores: ArrayLike, anomalous_scores: ArrayLike) -> DetectionMetrics:
    """AUROC, AUPR and FPR at 95 % TPR, anomalies being the positive class.

    Args:
        normal_scores: Scores of normal images, shape (N,).
        anomalous_scores: Scores of anomalous images, shape (M,).

    Returns:
        The metrics; ties between a normal and an anomalous score count half in AUROC.

    Example:
        >>> detection_metrics([0.1, 0.2, 0.3, 0.4], [0.35, 0.5, 0.6]).fpr_at_95_tpr
        0.25
    """
    normal = as_scores(normal_scores, "normal")
    anomalous = as_scores(anomalous_scores, "anomalous")
    # scikit-learn loads in a second: imported where used, so the scripts that only read
    # METHODS (their --help, their option errors) answer at once
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    y_true, y_score = labelled_scores(normal, anomalous)
    fpr, tpr, _ = roc_curve(y_true, y_score, drop_intermediate=False)
    return DetectionMetrics(
        auroc=float(roc_auc_score(y_true, y_score)),
        # scikit-learn sums the recall steps in floats: a perfect ranking of 20 anomalies
        # gives 1.0000000000000002, a precision above 1
        aupr=min(1.0, float(average_precision_score(y_true, y_score))),
        fpr_at_95_tpr=float(fpr[tpr >= 0.95].min()),
        n_normal=normal.size,
        n_anomalous=anomalous.size,
    )


# ------------------------------------------------------------------------ score selection


def _first_best(auroc: Mapping[str, float]) -> str:
    """The first name, in order, whose AUROC is maximal (up to float round-off)."""
    best = max(auroc.values())
    return next(name for name, value in auroc.items()
                if value >= best - TIE_RTOL * max(1.0, abs(best)))


@dataclass(frozen=True)
class ScoreSelection:
    """Which score type a calibration uses, and the evidence it was chosen on.

    The AUROCs are measured on the same labelled images that chose the score, so the
    winner's AUROC is optimistic (a maximum over candidates); judge it on other data
    (``anomaly-flow evaluate``) before trusting the number.

    Attributes:
        chosen: The selected score, e.g. ``"complexity"``.
        auroc: AUROC of every candidate, in candidate order (the tie-break order), e.g.
            ``{"bpd": 0.61, "complexity": 0.83, "coarse_complexity": 0.86,
            "level_1": 0.58, "level_2": 0.66}``.
        n_normal: Normal images the AUROCs were measured on (the same for every candidate).
        n_anomalous: Labelled anomalous images they were measured on.
        rule: How ``chosen`` follows from ``auroc``.
    """

    chosen: str
    auroc: Mapping[str, float] = field(hash=False)
    n_normal: int
    n_anomalous: int
    rule: str = SCORE_SELECTION_RULE

    def __post_init__(self) -> None:
        if not isinstance(self.rule, str) or not self.rule:
            raise CalibrationError(f"ScoreSelection.rule must be a non-empty string; got "
                                   f"{self.rule!r}.")
        if not isinstance(self.auroc, Mapping) or not self.auroc:
            raise CalibrationError(
                "ScoreSelection.auroc must map each candidate score name to its AUROC; "
                f"got {self.auroc!r}."
            )
        auroc: dict[str, float] = {}
        for name, value in self.auroc.items():
            if not isinstance(name, str) or not name:
                raise CalibrationError(f"score names must be non-empty strings; got {name!r}.")
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                    or not 0.0 <= float(value) <= 1.0:
                raise CalibrationError(
                    f"the AUROC of {name!r} must be a number in [0, 1]; got {value!r}."
                )
            auroc[name] = float(value)
        object.__setattr__(self, "auroc", MappingProxyType(auroc))  # read-only, like the rest
        if self.chosen not in auroc:
            raise CalibrationError(
                f"the chosen score {self.chosen!r} is not among the candidates {list(auroc)}."
            )
        if self.rule == SCORE_SELECTION_RULE and self.chosen != _first_best(auroc):
            raise CalibrationError(
                f"score {self.chosen!r} (AUROC {auroc[self.chosen]}) does not have the highest "
                f"AUROC among {auroc}; the selection was altered. Re-run calibration."
            )
        for name in ("n_normal", "n_anomalous"):
            count = getattr(self, name)
            if not is_int(count) or count < 1:
                raise CalibrationError(
                    f"ScoreSelection.{name} must be an integer >= 1; got {count!r}."
                )
            object.__setattr__(self, name, int(count))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        return {"rule": self.rule, "chosen": self.chosen, "auroc": dict(self.auroc),
                "n_normal": self.n_normal, "n_anomalous": self.n_anomalous}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoreSelection:
        """Rebuild from `to_dict` output, validating every field.

        Raises:
            CalibrationError: Missing or unknown keys, or invalid values.
        """
        known = set(cls.__dataclass_fields__)
        check_fields(data, "score_selection", known, known)
        with invalid_as_calibration_error("score_selection"):
            return cls(**data)


def select_score(
    normal_scores: Mapping[str, ArrayLike], anomalous_scores: Mapping[str, ArrayLike]
) -> ScoreSelection:
    """Choose the score type that best separates labelled anomalies from normal images.

    Each candidate's AUROC (anomalies positive) is measured on the same images; the
    highest wins, and ties go to the candidate that comes first in ``normal_scores``
    (:func:`anomaly_flow.evaluation.select_folder_score` puts the model's default score
    first, then :func:`anomaly_flow.scoring.score_names` order).

    The winner's AUROC is measured on the images that chose it, so it is optimistic.

    Args:
        normal_scores: ``{score name: scores of the normal images, shape (N,)}``, the
            same N images, in the same order, for every candidate.
        anomalous_scores: ``{score name: scores of the anomalous images, shape (M,)}``,
            with the same names.

    Returns:
        A `ScoreSelection` with every candidate's AUROC and the chosen name.

    Raises:
        CalibrationError: No candidates, different names on the two sides, different
            image counts between candidates, or empty / non-finite scores.

    Example:
        >>> normal = {"bpd": [1.0, 2.0, 3.0], "complexity": [1.0, 2.0, 3.0]}
        >>> anomalous = {"bpd": [2.5, 0.5], "complexity": [4.0, 5.0]}
        >>> select_score(normal, anomalous).chosen
        'complexity'
    """
    names = list(normal_scores)
    if not names:
        raise CalibrationError("no candidate scores were given to choose from.")
    if set(anomalous_scores) != set(names):
        raise CalibrationError(
            f"normal and anomalous scores must name the same candidates; got {names} and "
            f"{list(anomalous_scores)}."
        )
    auroc: dict[str, float] = {}
    sizes: set[tuple[int, int]] = set()
    for name in names:
        metrics = detection_metrics(normal_scores[name], anomalous_scores[name])
        auroc[name] = metrics.auroc
        sizes.add((metrics.n_normal, metrics.n_anomalous))
    if len(sizes) > 1:
        raise CalibrationError(
            "every candidate score must be measured on the same images, but the candidates "
            f"have different numbers of (normal, anomalous) scores: {sorted(sizes)}."
        )
    n_normal, n_anomalous = sizes.pop()
    return ScoreSelection(_first_best(auroc), auroc, n_normal, n_anomalous)
