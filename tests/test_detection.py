"""Tests for anomaly_flow.detection: AUROC, AUPR and FPR at 95 % TPR on hand-computed
examples, and the choice of a score type by AUROC with its stored evidence."""

from __future__ import annotations

import numpy as np
import pytest

from anomaly_flow.calibration_checks import CalibrationError
from anomaly_flow.detection import (
    SCORE_SELECTION_RULE,
    ScoreSelection,
    detection_metrics,
    select_score,
)

# The small labelled set of the hand-computed thresholds in test_calibration.py. Ranked
# from the top: .6 A, .5 A, .4 N, .35 A, .3 N, .2 N, .1 N; 11 of the 12 (normal,
# anomalous) pairs are ordered correctly.
NORMAL = [0.1, 0.2, 0.3, 0.4]
ANOMALOUS = [0.35, 0.5, 0.6]


# --------------------------------------------------------------------- metrics


def test_detection_metrics_hand_computed():
    metrics = detection_metrics(NORMAL, ANOMALOUS)
    assert metrics.auroc == pytest.approx(11 / 12)  # 11 of 12 pairs ordered correctly
    # ranking .6A .5A .4N .35A: AP = 1/3 * 1 + 1/3 * 1 + 1/3 * 3/4
    assert metrics.aupr == pytest.approx(11 / 12)
    assert metrics.fpr_at_95_tpr == 0.25  # TPR >= .95 needs all three anomalies
    assert (metrics.n_normal, metrics.n_anomalous) == (4, 3)
    assert set(metrics.to_dict()) == {"auroc", "aupr", "fpr_at_95_tpr", "n_normal", "n_anomalous"}


def test_fpr_at_95_tpr_uses_smallest_fpr_reaching_it():
    normal = np.arange(100.0)
    anomalous = np.concatenate([np.full(19, 1000.0), [50.5]])  # 19/20 = 0.95 exactly
    # TPR 0.95 is reached before any normal image is flagged
    assert detection_metrics(normal, anomalous).fpr_at_95_tpr == 0.0
    anomalous = np.concatenate([np.full(18, 1000.0), [50.5, 60.5]])
    # TPR 0.95 needs 60.5 flagged (t < 60.5): normals 61..99 flagged -> 39 / 100
    assert detection_metrics(normal, anomalous).fpr_at_95_tpr == pytest.approx(0.39)


def test_detection_metrics_perfect_and_tied_separation():
    assert detection_metrics([0.0, 1.0], [2.0, 3.0]).auroc == 1.0
    assert detection_metrics([1.0, 1.0], [1.0, 1.0]).auroc == 0.5


@pytest.mark.parametrize("n_anomalous", range(1, 41))
def test_a_perfect_ranking_has_an_aupr_of_one_not_more(n_anomalous: int) -> None:
    # scikit-learn's sum of recall steps gives 1.0000000000000002 for 20 anomalies
    metrics = detection_metrics(np.arange(40.0), 100.0 + np.arange(float(n_anomalous)))
    assert metrics.aupr == pytest.approx(1.0) and metrics.aupr <= 1.0


def test_empty_scores_are_refused():
    with pytest.raises(CalibrationError, match=r"no .* were given"):
        detection_metrics([], [1.0])


# ------------------------------------------------------------------- score selection

# Four candidates with hand-computed AUROCs on the same 4 normal and 3 anomalous images:
# bpd as in NORMAL/ANOMALOUS (11 of 12 pairs ordered), complexity separates perfectly,
# level_1 is reversed, level_2 is constant (every pair tied).
CANDIDATES_NORMAL = {"bpd": NORMAL, "complexity": [1.0, 2.0, 3.0, 4.0],
                     "level_1": [4.0, 3.0, 2.0, 1.0], "level_2": [7.0] * 4}
CANDIDATES_ANOMALOUS = {"bpd": ANOMALOUS, "complexity": [5.0, 6.0, 7.0],
                        "level_1": [-1.0, -2.0, -3.0], "level_2": [7.0] * 3}


def test_select_score_picks_the_highest_auroc_and_keeps_the_evidence():
    selection = select_score(CANDIDATES_NORMAL, CANDIDATES_ANOMALOUS)
    assert selection.chosen == "complexity"
    assert dict(selection.auroc) == {"bpd": 11 / 12, "complexity": 1.0, "level_1": 0.0,
                                     "level_2": 0.5}
    assert list(selection.auroc) == ["bpd", "complexity", "level_1", "level_2"]
    assert (selection.n_normal, selection.n_anomalous) == (4, 3)
    assert selection.rule == SCORE_SELECTION_RULE == "max AUROC on labelled anomalies"
    for name in CANDIDATES_NORMAL:  # the same numbers as the detection metrics
        assert selection.auroc[name] == detection_metrics(
            CANDIDATES_NORMAL[name], CANDIDATES_ANOMALOUS[name]).auroc
    with pytest.raises(TypeError):
        selection.auroc["bpd"] = 1.0  # type: ignore[index]


def test_select_score_ties_go_to_the_first_candidate():
    normal = {"bpd": [1.0, 2.0, 3.0], "complexity": [0.0, 0.5, 2.0], "level_1": [0.5, 1.0, 1.5]}
    anomalous = {"bpd": [4.0, 5.0], "complexity": [3.0, 9.0], "level_1": [2.0, 2.5]}
    assert {name: detection_metrics(normal[name], anomalous[name]).auroc
            for name in normal} == {"bpd": 1.0, "complexity": 1.0, "level_1": 1.0}
    assert select_score(normal, anomalous).chosen == "bpd"
    reordered = {name: normal[name] for name in ("level_1", "complexity", "bpd")}
    assert select_score(reordered, anomalous).chosen == "level_1"


def test_select_score_needs_the_same_candidates_and_images():
    with pytest.raises(CalibrationError, match="same candidates"):
        select_score({"bpd": NORMAL}, {"complexity": ANOMALOUS})
    with pytest.raises(CalibrationError, match="same images"):
        select_score({"bpd": NORMAL, "complexity": NORMAL[:3]},
                     {"bpd": ANOMALOUS, "complexity": ANOMALOUS})
    with pytest.raises(CalibrationError, match="no candidate"):
        select_score({}, {})


def test_a_score_selection_of_another_rule_keeps_its_choice():
    selection = ScoreSelection("bpd", {"bpd": 0.6, "complexity": 0.9}, 10, 5,
                               rule="named by an engineer after a review")
    assert ScoreSelection.from_dict(selection.to_dict()) == selection
