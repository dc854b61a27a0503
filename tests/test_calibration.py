"""Tests for anomaly_flow.calibration: hand-computed examples, brute-force references,
and statistical properties of split-conformal calibration on exchangeable data."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anomaly_flow.calibration import (
    Calibration,
    Threshold,
    benjamini_hochberg,
    calibrate,
    conformal_p_values,
    conformal_threshold,
    cost_threshold,
    f1_threshold,
    min_calibration_size,
    operating_point,
    rate_interval,
    youden_threshold,
)
from anomaly_flow.calibration_checks import CalibrationError
from anomaly_flow.detection import select_score
from tests.conftest import JSON_VALUES, json_paths
from tests.test_detection import CANDIDATES_ANOMALOUS, CANDIDATES_NORMAL

PROPERTY = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

# A small labelled set used by several hand-computed examples. Under `s > t`:
#   t     flagged normal  flagged anomalous  FP FN  precision recall  F1    J
#   0.6   -               -                  0  3   (1)       0       0     0
#   0.5   -               .6                 0  2   1         1/3     1/2   1/3
#   0.4   -               .5 .6              0  1   1         2/3     4/5   2/3
#   0.35  .4              .5 .6              1  1   2/3       2/3     2/3   5/12
#   0.3   .4              all                1  0   3/4       1       6/7   3/4
#   0.2   .3 .4           all                2  0   3/5       1       3/4   1/2
NORMAL = [0.1, 0.2, 0.3, 0.4]
ANOMALOUS = [0.35, 0.5, 0.6]


# ------------------------------------------------------------------ references


def brute_p_values(cal: np.ndarray, scores: np.ndarray) -> np.ndarray:
    return np.array([(1 + np.sum(cal >= s)) / (len(cal) + 1) for s in scores])


def brute_bh(p: np.ndarray, q: float) -> np.ndarray:
    """BH in exact arithmetic, for p-values that are fractions with small denominators
    (as conformal ones are) and q a short decimal."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    exact_q = Fraction(repr(q))
    k = 0
    for rank, i in enumerate(order, start=1):
        if Fraction(p[i]).limit_denominator(10**6) <= exact_q * rank / m:
            k = rank
    reject = np.zeros(m, dtype=bool)
    for i in order[:k]:
        reject[i] = True
    return reject


def brute_best(normal, anomalous, objective) -> tuple[float, float]:
    """(best objective, highest strict threshold attaining it) over all cut points."""
    normal, anomalous = np.asarray(normal, float), np.asarray(anomalous, float)
    values = np.unique(np.concatenate([normal, anomalous]))
    cuts = [np.nextafter(values[0], -np.inf), *values]
    scored = []
    for t in cuts:
        fp, tp = int(np.sum(normal > t)), int(np.sum(anomalous > t))
        scored.append((objective(fp, tp, len(normal) - fp, len(anomalous) - tp), t))
    best = max(s for s, _ in scored)
    return best, max(t for s, t in scored if math.isclose(s, best, rel_tol=1e-12, abs_tol=1e-12))


def f1_of(fp, tp, tn, fn):
    return 2 * tp / (2 * tp + fp + fn)


def youden_of(fp, tp, tn, fn):
    return Fraction(tp, tp + fn) - Fraction(fp, fp + tn)


# -------------------------------------------------------------- conformal maths


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [(0.01, 99), (0.1, 9), (0.05, 19), (0.3, 3), (0.2, 4), (0.5, 1), (0.9, 1), (1e-4, 9999)],
)
def test_min_calibration_size(alpha, expected):
    assert min_calibration_size(alpha) == expected
    conformal_threshold(np.arange(expected, dtype=float), alpha)  # exactly enough: accepted
    if expected > 1:
        with pytest.raises(CalibrationError, match=rf"needs at least {expected} held-out "
                                                   rf"normal images .*; got {expected - 1}\."):
            conformal_threshold(np.arange(expected - 1, dtype=float), alpha)


def test_p_values_hand_computed():
    cal = np.arange(1.0, 10.0)  # 1..9, n = 9
    scores = np.array([0.0, 1.0, 5.0, 9.0, 9.5])
    # #{cal >= s} = 9, 9, 5, 1, 0  ->  p = (1 + count) / 10
    np.testing.assert_array_equal(conformal_p_values(cal, scores), [1.0, 1.0, 0.6, 0.2, 0.1])


def test_p_values_ties():
    cal = [3.0, 1.0, 2.0, 2.0, 2.0]  # unsorted on purpose; n = 5
    p = conformal_p_values(cal, [1.0, 2.0, 2.5, 3.0, 4.0])
    np.testing.assert_allclose(p, [6 / 6, 5 / 6, 2 / 6, 2 / 6, 1 / 6])


@PROPERTY
@given(
    cal=st.lists(st.integers(0, 6), min_size=1, max_size=30),
    scores=st.lists(st.integers(-1, 7), min_size=1, max_size=30),
)
def test_p_values_match_brute_force(cal, scores):
    cal, scores = np.array(cal, float), np.array(scores, float)
    np.testing.assert_array_equal(conformal_p_values(cal, scores), brute_p_values(cal, scores))


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [
        (0.1, 9.0),  # k = ceil(0.9 * 10) = 9: the largest of 1..9
        (0.2, 8.0),  # k = ceil(0.8 * 10) = 8
        (0.3, 7.0),  # k = ceil(0.7 * 10) = 7
        (0.7, 3.0),  # k = ceil(0.3 * 10) = 3 exactly; in floats (1 - 0.7) * 10 = 3.0000000000000004
        (0.25, 8.0),  # k = ceil(7.5) = 8
        (0.5, 5.0),  # k = ceil(5) = 5
    ],
)
def test_conformal_threshold_hand_computed(alpha, expected):
    cal = np.arange(9.0, 0.0, -1.0)  # 9..1, order must not matter
    threshold = conformal_threshold(cal, alpha)
    assert threshold.value == expected
    assert threshold.method == "conformal"
    assert threshold.alpha == alpha
    assert threshold.n_calibration == 9
    assert threshold.fpr == pytest.approx((9 - expected) / 9)  # in-sample: #{cal > t} / n
    assert threshold.precision is None and threshold.recall is None and threshold.f1 is None


def test_conformal_rank_is_exact_for_large_n():
    # k = ceil(0.55 * 100) = 55; in floats (1 - 0.45) * 100 = 55.00000000000001 -> 56
    assert conformal_threshold(np.arange(1.0, 100.0), alpha=0.45).value == 55.0


def test_conformal_threshold_ties_and_decision_at_the_threshold():
    cal = [1.0, 2.0, 2.0, 2.0, 3.0]
    threshold = conformal_threshold(cal, alpha=0.5)  # k = ceil(0.5 * 6) = 3 -> 2.0
    assert threshold.value == 2.0
    assert threshold.fpr == pytest.approx(1 / 5)
    scores = np.array([2.0, 2.5, 3.0])
    # a score equal to the threshold is normal; p-values 5/6, 2/6, 2/6
    calibration = Calibration("bpd", threshold, cal)
    np.testing.assert_array_equal(calibration.decide(scores), [False, True, True])
    np.testing.assert_array_equal(calibration.p_values(scores) <= 0.5, [False, True, True])


def test_conformal_threshold_reports_labelled_metrics_when_given_anomalies():
    threshold = conformal_threshold(NORMAL, alpha=0.5, anomalous_scores=ANOMALOUS)
    # n = 4, k = ceil(0.5 * 5) = 3 -> 0.3; row t = 0.3 of the table above
    assert threshold.value == 0.3
    assert (threshold.fpr, threshold.precision, threshold.recall) == (0.25, 0.75, 1.0)
    assert threshold.f1 == pytest.approx(6 / 7)
    assert threshold.n_anomalous == 3


@PROPERTY
@given(
    cal=st.lists(st.integers(0, 8), min_size=1, max_size=60),
    scores=st.lists(st.integers(-1, 9), min_size=1, max_size=20),
    alpha=st.sampled_from([0.01, 0.05, 0.1, 0.2, 0.25, 0.3, 0.5, 0.7, 0.9]),
)
def test_threshold_rule_equals_p_value_rule_with_ties(cal, scores, alpha):
    """score > threshold  <=>  p <= alpha, for every score, ties included."""
    if len(cal) < min_calibration_size(alpha):
        with pytest.raises(CalibrationError, match=rf"needs at least "
                                                   rf"{min_calibration_size(alpha)} .*; got "
                                                   rf"{len(cal)}\."):
            conformal_threshold(cal, alpha)
        return
    cal, scores = np.array(cal, float), np.array(scores, float)
    threshold = conformal_threshold(cal, alpha)
    probe = np.concatenate([scores, cal])  # include every calibration value exactly
    p = conformal_p_values(cal, probe)
    np.testing.assert_array_equal(probe > threshold.value, p <= alpha)
    # and the same with exact rational p-values
    exact = [Fraction(round(x * (len(cal) + 1)), len(cal) + 1) for x in p]
    np.testing.assert_array_equal(
        probe > threshold.value, [x <= Fraction(repr(alpha)) for x in exact]
    )


@pytest.mark.parametrize("alpha", [1 / 3, 0.1 / 3, 2 / 3, 1 / 7, 0.3, 0.01])
@pytest.mark.parametrize("n", [3, 8, 20, 59, 98, 99, 300])
def test_threshold_rule_equals_float_p_value_rule_for_computed_alphas(alpha, n):
    """An alpha computed rather than typed (a Bonferroni split, 1/3) sits a rounding error
    from its rational; the p-value equal to that rational still gets one verdict."""
    cal = np.arange(1.0, n + 1.0)
    if n < min_calibration_size(alpha):
        assert 1 / (n + 1) > alpha  # not even the smallest p-value reaches alpha
        with pytest.raises(CalibrationError, match=rf"needs at least "
                                                   rf"{min_calibration_size(alpha)} .*; got {n}\."):
            conformal_threshold(cal, alpha)
        return
    assert 1 / min_calibration_size(alpha) > alpha  # one fewer would be too few
    probe = np.concatenate([cal, cal + 0.5, [0.0]])
    calibration = Calibration("bpd", conformal_threshold(cal, alpha), cal)
    np.testing.assert_array_equal(calibration.decide(probe),
                                  calibration.p_values(probe) <= alpha)


def test_refusal_message_says_how_many_images_are_needed():
    with pytest.raises(CalibrationError) as info:
        conformal_threshold(np.linspace(0, 1, 40), alpha=0.01)
    message = str(info.value)
    assert "at least 99" in message
    assert "got 40" in message
    assert "0.01" in message
    assert "--target-fpr" in message


@pytest.mark.parametrize(("alpha", "shown"), [
    (0.01, "at least 99 "), (1e-9, "at least 999999999 "), (1e-12, "at least 1e+12 "),
    (1e-300, "at least 1e+300 "), (1e-310, "at least 1e+310 "),  # past a float's range
])
def test_refusal_message_counts_stay_readable(alpha: float, shown: str) -> None:
    with pytest.raises(CalibrationError, match=re.escape(shown)):
        conformal_threshold(np.arange(8.0), alpha=alpha)


def test_refusal_is_a_value_error():
    with pytest.raises(ValueError, match="at least 9 "):
        conformal_threshold(np.arange(8.0), alpha=0.1)


# ------------------------------------------------------- statistical properties

DISTRIBUTIONS = {
    "normal": lambda rng, size: rng.normal(3.0, 0.5, size),
    "exponential": lambda rng, size: rng.exponential(1.0, size),
    "heavy_tail": lambda rng, size: rng.standard_t(2, size),
    "discrete": lambda rng, size: rng.poisson(3.0, size).astype(float),  # many ties
}


def achieved_rates(pool, n_cal, n_test, alpha, rng, n_splits):
    """Mean over random splits of (FPR of the threshold, fraction of p <= alpha)."""
    fprs, small_p = [], []
    for _ in range(n_splits):
        permuted = rng.permutation(pool)
        cal, test = permuted[:n_cal], permuted[n_cal : n_cal + n_test]
        threshold = conformal_threshold(cal, alpha)
        fprs.append(np.mean(test > threshold.value))
        small_p.append(np.mean(conformal_p_values(cal, test) <= alpha))
    return float(np.mean(fprs)), float(np.mean(small_p))


@PROPERTY
@given(
    alpha=st.sampled_from([0.05, 0.1, 0.2, 0.3]),
    extra_cal=st.integers(0, 300),
    n_test=st.integers(20, 300),
    seed=st.integers(0, 2**32 - 1),
    distribution=st.sampled_from(sorted(DISTRIBUTIONS)),
)
def test_conformal_fpr_and_p_value_validity_on_exchangeable_data(
    alpha, extra_cal, n_test, seed, distribution
):
    n_cal = min_calibration_size(alpha) + extra_cal
    rng = np.random.default_rng(seed)
    pool = DISTRIBUTIONS[distribution](rng, n_cal + n_test)
    fpr, p_rate = achieved_rates(pool, n_cal, n_test, alpha, rng, n_splits=10)
    bound = alpha + 3 * math.sqrt(alpha * (1 - alpha) / n_test) + 1 / (n_cal + 1)
    assert fpr <= bound
    assert p_rate <= bound  # super-uniform p-values: P(p <= alpha) <= alpha
    assert fpr == pytest.approx(p_rate)  # same rule


@pytest.mark.parametrize("alpha", [0.1, 0.01])
def test_benchmark_b5_mean_fpr_over_20_splits(alpha):
    """B5: half the held-out normals calibrate, half check; 20 random splits."""
    rng = np.random.default_rng(5)
    pool = rng.gamma(4.0, 0.5, size=4000) + 3.0  # bpd-like, right-skewed
    n_check = 2000
    fpr, _ = achieved_rates(pool, 2000, n_check, alpha, rng, n_splits=20)
    assert fpr <= alpha + 2 * math.sqrt(alpha * (1 - alpha) / n_check)
    assert fpr >= alpha - 2 * math.sqrt(alpha * (1 - alpha) / n_check)  # not wastefully low


# ---------------------------------------------------------- labelled thresholds


def test_f1_threshold_hand_computed():
    threshold = f1_threshold(NORMAL, ANOMALOUS)
    assert threshold.value == 0.3
    assert threshold.method == "f1"
    assert threshold.alpha is None
    assert (threshold.n_calibration, threshold.n_anomalous) == (4, 3)
    assert (threshold.fpr, threshold.precision, threshold.recall) == (0.25, 0.75, 1.0)
    assert threshold.f1 == pytest.approx(6 / 7)


def test_youden_threshold_hand_computed():
    threshold = youden_threshold(NORMAL, ANOMALOUS)
    assert threshold.value == 0.3  # J = 3/4 there
    assert threshold.recall - threshold.fpr == pytest.approx(0.75)


def test_ties_go_to_the_highest_threshold():
    # normal 1,2,3,4; anomalous 2.5, 5. t = 4 -> TPR 1/2, FPR 0; t = 2 -> TPR 1, FPR 1/2:
    # J = 1/2 and F1 = 2/3 at both; the higher threshold (fewer alarms) wins.
    normal, anomalous = [1.0, 2.0, 3.0, 4.0], [2.5, 5.0]
    assert youden_threshold(normal, anomalous).value == 4.0
    assert f1_threshold(normal, anomalous).value == 4.0
    # FP + FN is 1 at t = 0.4 and at t = 0.3 (table above): 0.4 wins
    assert cost_threshold(NORMAL, ANOMALOUS).value == 0.4


def test_a_better_f1_or_j_is_not_taken_for_a_tie_however_close():
    """F1 and J are compared exactly (equal fractions are equal floats; J is an integer
    over a common denominator): a relative 1e-12 merged points that differ only at
    millions of images. One normal and one anomaly at 5, the rest far apart: t = 0 flags
    both, t = 5 neither; t = 0 is better by 1/((2M + 1)(2M - 1)) in F1 and by
    1/(N·M) in J, and it won only by a tolerance in the higher one's favour."""
    m = 710_000
    normal, anomalous = np.zeros(10), np.full(m, 10.0)
    normal[0] = anomalous[0] = 5.0
    assert 2 * m / (2 * m + 1) - 2 * (m - 1) / (2 * m - 1) < 1e-12
    assert f1_threshold(normal, anomalous).value == 0.0
    n, m = 2_000_001, 2_000_000  # J = 1 - 1/N at t = 0, (M - 1)/M at t = 5
    normal, anomalous = np.zeros(n), np.full(m, 10.0)
    normal[0] = anomalous[0] = 5.0
    assert youden_threshold(normal, anomalous).value == 0.0


@pytest.mark.parametrize(
    ("cost_fp", "cost_fn", "expected"),
    [(1.0, 1.0, 0.4), (1.0, 5.0, 0.3), (10.0, 1.0, 0.4), (0.0, 1.0, 0.3), (1.0, 0.0, 0.6),
     (1e308, 1e308, 0.4), (1e300, 5e300, 0.3),  # huge costs: the sums must not overflow
     (1e13, 1.0, 0.4), (1.0, 1e13, 0.3),  # far-apart costs: one image still counts
     (1e-13, 1e-13, 0.4), (1e-300, 5e-300, 0.3),  # tiny costs: not all tied
     (1e3, 1e-9, 0.4), (1e-9, 1e3, 0.3)],  # a ratio of 1e12: one image still counts,
)
def test_cost_threshold_hand_computed(cost_fp, cost_fn, expected):
    threshold = cost_threshold(NORMAL, ANOMALOUS, cost_fp=cost_fp, cost_fn=cost_fn)
    assert threshold.value == expected
    assert (threshold.cost_fp, threshold.cost_fn) == (cost_fp, cost_fn)


def test_a_cost_too_small_to_divide_still_counts():
    """1e-300 / 1e300 underflows to 0: the misses were then free, and of the thresholds
    without a false alarm the one flagging nothing won (4), not the one catching 4 (3)."""
    assert cost_threshold([0.0, 3.0], [1.0, 2.0, 4.0], 1e300, 1e-300).value == 3.0
    assert cost_threshold([0.0, 3.0], [1.0, 2.0, 4.0], 1.0, 0.0).value == 4.0  # truly free


def test_flag_everything_uses_the_float_just_below_the_smallest_score():
    # normal 5; anomalous 1, 2, 3: F1 is best (6/7) when all four images are flagged
    threshold = f1_threshold([5.0], [1.0, 2.0, 3.0])
    assert threshold.value == np.nextafter(1.0, -np.inf)
    assert (threshold.fpr, threshold.recall) == (1.0, 1.0)


def test_flag_everything_is_left_out_when_the_smallest_score_is_the_lowest_float():
    # no finite t has -1.8e308 > t, so "flag all four" (cost 2) cannot be a threshold; of
    # the others, t = 2 (flags 3, misses the lowest anomaly: cost 10) is the cheapest, not
    # t = 1 (11) or t = -1.8e308 (12); it was refused as "Threshold.value must be finite"
    lowest = -np.finfo(np.float64).max
    threshold = cost_threshold([1.0, 2.0], [lowest, 3.0], cost_fp=1.0, cost_fn=10.0)
    assert threshold.value == 2.0
    assert (threshold.fpr, threshold.recall) == (0.0, 0.5)
    assert f1_threshold([0.0] * 9, [lowest]).value == 0.0  # every other F1 is 0


def test_flag_nothing_uses_the_largest_score():
    # false alarms are very expensive and the anomalies are below the normal score
    threshold = cost_threshold([5.0], [1.0, 2.0], cost_fp=100.0, cost_fn=1.0)
    assert threshold.value == 5.0
    assert (threshold.fpr, threshold.recall, threshold.precision) == (0.0, 0.0, 1.0)


def test_ties_between_normal_and_anomalous_scores():
    # t = 2 flags {3}: F1 2/3; t = 1 flags {2, 2, 2, 3}: F1 2/3; the higher wins
    threshold = f1_threshold([1.0, 2.0, 2.0], [2.0, 3.0])
    assert threshold.value == 2.0
    assert (threshold.fpr, threshold.recall, threshold.precision) == (0.0, 0.5, 1.0)


labelled_sets = st.tuples(
    st.lists(st.integers(0, 12), min_size=1, max_size=25),
    st.lists(st.integers(0, 12), min_size=1, max_size=25),
)


@PROPERTY
@given(data=labelled_sets, costs=st.tuples(st.integers(0, 5), st.integers(1, 5)))
def test_labelled_thresholds_match_brute_force(data, costs):
    normal, anomalous = (np.array(x, float) / 4 for x in data)  # many ties
    cost_fp, cost_fn = map(float, costs)
    cases = [
        (f1_threshold(normal, anomalous), f1_of),
        (youden_threshold(normal, anomalous), youden_of),
        (
            cost_threshold(normal, anomalous, cost_fp, cost_fn),
            lambda fp, tp, tn, fn: -(cost_fp * fp + cost_fn * fn),
        ),
    ]
    for threshold, objective in cases:
        _, best_t = brute_best(normal, anomalous, objective)
        assert threshold.value == best_t
        point = operating_point(normal, anomalous, threshold.value)
        assert threshold.fpr == point["fpr"]
        assert threshold.recall == point["recall"]
        assert threshold.precision == point["precision"]
        assert threshold.f1 == point["f1"]


# --------------------------------------------------------------------- metrics


def test_operating_point_hand_computed():
    point = operating_point(NORMAL, ANOMALOUS, 0.35)
    assert point == pytest.approx(
        {"fpr": 0.25, "tpr": 2 / 3, "recall": 2 / 3, "precision": 2 / 3, "f1": 2 / 3}
    )
    assert operating_point(NORMAL, None, 0.2) == {"fpr": 0.5}
    assert operating_point(NORMAL, None, 0.4) == {"fpr": 0.0}  # equal to threshold: normal


def test_rate_interval_is_clopper_pearson():
    """Closed forms at the ends (0 of n: upper 1 - 0.025^(1/n)); in between, the beta
    quantiles that define the exact interval."""
    from scipy.stats import beta

    assert rate_interval(0, 10) == pytest.approx((0.0, 1 - 0.025 ** 0.1))
    assert rate_interval(10, 10) == pytest.approx((0.025 ** 0.1, 1.0))
    low, high = rate_interval(4, 300)
    assert low == pytest.approx(beta.ppf(0.025, 4, 297))
    assert high == pytest.approx(beta.ppf(0.975, 5, 296))
    assert (round(low, 4), round(high, 4)) == (0.0036, 0.0338)
    for count, total in ((-1, 5), (6, 5), (0, 0)):
        with pytest.raises(ValueError, match="a rate needs 0 <= count <= total"):
            rate_interval(count, total)


# --------------------------------------------------------------- Benjamini-Hochberg


def test_benjamini_hochberg_hand_example():
    # sorted: .001 .025 .026 .035 .3 vs k q / m = .01 .02 .03 .04 .05
    # .025 > .02 fails its own test, but k = 4 (.035 <= .04) and step-up rejects all <= .035
    p = np.array([0.3, 0.026, 0.001, 0.035, 0.025])
    np.testing.assert_array_equal(benjamini_hochberg(p, 0.05), [False, True, True, True, True])
    np.testing.assert_array_equal(benjamini_hochberg(p, 0.01), [False, False, True, False, False])
    np.testing.assert_array_equal(benjamini_hochberg(p, 0.004), [False] * 5)


def test_benjamini_hochberg_names_what_it_was_given_as_p_values():
    for bad, says in (([], r"^no p-values were given"),
                      ([0.1, float("nan")], r"^1 of 2 p-values are NaN or infinite"),
                      ([[0.1, 0.2]], r"^p-values must be a 1-D array with one per image; "
                                     r"got shape \(1, 2\)\. Flatten or select one value")):
        with pytest.raises(CalibrationError, match=says):
            benjamini_hochberg(bad, 0.05)


def test_benjamini_hochberg_ties():
    # all equal to 0.04 <= 5 * 0.05 / 5: all rejected; none at q = 0.03
    p = np.full(5, 0.04)
    assert benjamini_hochberg(p, 0.05).all()
    assert not benjamini_hochberg(p, 0.03).any()


def test_benjamini_hochberg_passes_p_values_exactly_at_the_cut():
    # 0.1 <= 0.3·1/3 and 0.2 <= 0.3·2/3 exactly, though 0.3 * 1 / 3 is 0.09999999999999999
    np.testing.assert_array_equal(benjamini_hochberg([0.1, 0.2, 0.9], 0.3),
                                  [True, True, False])
    calibration = calibrate("bpd", np.arange(1.0, 10.0), alpha=0.1)  # p = 0.1, 0.2, 1
    np.testing.assert_array_equal(calibration.decide([10.0, 9.0, 0.0], fdr=0.3),
                                  [True, True, False])


@PROPERTY
@given(
    p=st.lists(st.integers(1, 40).map(lambda i: i / 41), min_size=1, max_size=40),
    q=st.sampled_from([0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7]),
)
def test_benjamini_hochberg_matches_brute_force(p, q):
    p = np.array(p)
    np.testing.assert_array_equal(benjamini_hochberg(p, q), brute_bh(p, q))


def test_decide_with_fdr_uses_bh_on_p_values():
    calibration = calibrate("bpd", np.arange(1.0, 20.0), alpha=0.1)  # n = 19
    scores = np.array([25.0, 30.0, 10.0, 19.5])
    p = calibration.p_values(scores)  # (1 + #{cal >= s}) / 20 = 1/20, 1/20, 11/20, 1/20
    np.testing.assert_allclose(p, [0.05, 0.05, 0.55, 0.05])
    # q = 0.1: sorted .05 .05 .05 .55 vs .025 .05 .075 .1 -> k = 3; q = 0.05: none pass
    np.testing.assert_array_equal(calibration.decide(scores, fdr=0.1), benjamini_hochberg(p, 0.1))
    np.testing.assert_array_equal(calibration.decide(scores, fdr=0.1), [True, True, False, True])
    np.testing.assert_array_equal(calibration.decide(scores, fdr=0.05), [False] * 4)


# ------------------------------------------------------------------- storage


def test_calibration_json_round_trip_is_exact():
    rng = np.random.default_rng(0)
    normal, anomalous = rng.normal(3.0, 0.3, 250), rng.normal(4.0, 0.5, 30)
    for calibration in [
        calibrate("bpd", normal, alpha=0.01, anomalous_scores=anomalous),
        calibrate("complexity", normal, alpha=0.1),
        calibrate("level_1", normal, method="f1", anomalous_scores=anomalous),
        calibrate("bpd", normal, method="youden", anomalous_scores=anomalous),
        calibrate("bpd", normal, method="cost", anomalous_scores=anomalous, cost_fn=3.5),
    ]:
        text = calibration.to_json()
        loaded = Calibration.from_json(text)
        assert loaded == calibration
        assert loaded.to_json() == text
        np.testing.assert_array_equal(loaded.sorted_scores, np.sort(normal))
        probe = rng.normal(3.5, 1.0, 50)
        np.testing.assert_array_equal(loaded.p_values(probe), calibration.p_values(probe))
        np.testing.assert_array_equal(loaded.decide(probe), calibration.decide(probe))


def test_calibration_json_layout():
    calibration = calibrate("bpd", [3.0, 1.0, 2.0], alpha=0.5)
    data = json.loads(calibration.to_json(indent=2))
    assert set(data) == {
        "schema_version",
        "score_name",
        "created_at",
        "threshold",
        "calibration_scores",
    }
    assert data["schema_version"] == 1
    assert data["calibration_scores"] == [1.0, 2.0, 3.0]  # sorted
    assert data["threshold"]["method"] == "conformal"
    assert data["threshold"]["value"] == 2.0  # k = ceil(0.5 * 4) = 2
    assert Threshold.from_dict(data["threshold"]) == calibration.threshold


def test_a_calibration_records_the_digest_of_its_models_weights() -> None:
    digest = "0123456789abcdef" * 4
    calibration = calibrate("bpd", [3.0, 1.0, 2.0], alpha=0.5, model_digest=digest)
    data = json.loads(calibration.to_json())
    assert data["model_digest"] == digest
    assert Calibration.from_json(calibration.to_json()) == calibration
    del data["model_digest"]  # as stored before digests, or fitted from bare scores
    assert Calibration.from_dict(data).model_digest is None
    for bad in ("0123456789ABCDEF" * 4, digest[:-1], digest + "0", 7, ["a"]):
        with pytest.raises(CalibrationError, match=(
                rf"^model_digest must be a SHA-256 as 64 lowercase hex digits \(what "
                rf"Glow.digest returns\), or None; got {re.escape(repr(bad))}\.$")):
            Calibration.from_dict({**data, "model_digest": bad})


def test_calibration_is_frozen_and_scores_read_only():
    calibration = calibrate("bpd", [3.0, 1.0, 2.0], alpha=0.5)
    with pytest.raises(AttributeError):
        calibration.score_name = "other"  # type: ignore[misc]
    with pytest.raises(ValueError):
        calibration.sorted_scores[0] = 0.0


def valid_dict() -> dict:
    return calibrate("bpd", np.arange(1.0, 10.0), alpha=0.1).to_dict()


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d["threshold"].update(method="magic"), "unknown threshold method 'magic'"),
        (lambda d: d["calibration_scores"].__setitem__(0, None), "list of numbers"),
        (lambda d: d["threshold"].update(value=5.0), "does not match"),
        (lambda d: d["calibration_scores"].pop(), "9 normal scores but 8"),
        (lambda d: d.update(schema_version=2), "schema_version 2"),
        (lambda d: d.pop("threshold"), "missing field"),
        (lambda d: d["threshold"].update(extra=1), "unknown threshold field"),
        # a newer version's field (a score transform, say) would change the decisions
        # if ignored, as it is refused one level down
        (lambda d: d.update(score_transform="log"), r"unknown calibration field\(s\) "
                                                    r"\['score_transform'\]"),
        (lambda d: d["threshold"].update(alpha=1.5), "between 0 and 1"),
        (lambda d: d.update(created_at="yesterday"), "ISO 8601"),
        (lambda d: d.update(score_name=""), "score_name"),
    ],
)
def test_from_dict_validates(mutate, match):
    data = valid_dict()
    mutate(data)
    with pytest.raises(CalibrationError, match=match):
        Calibration.from_dict(data)


def test_from_json_rejects_non_finite_and_garbage():
    text = valid_dict()
    text["calibration_scores"][3] = float("nan")
    with pytest.raises(CalibrationError, match="NaN"):
        Calibration.from_json(json.dumps(text))
    with pytest.raises(CalibrationError, match="not valid JSON"):
        Calibration.from_json("{not json")


# ----------------------------------------------------------- stored score selections


def selected_calibration() -> Calibration:
    selection = select_score(CANDIDATES_NORMAL, CANDIDATES_ANOMALOUS)
    return calibrate("complexity", CANDIDATES_NORMAL["complexity"], alpha=0.25,
                     anomalous_scores=CANDIDATES_ANOMALOUS["complexity"],
                     score_selection=selection)


def test_score_selection_json_round_trip():
    calibration = selected_calibration()
    text = calibration.to_json(indent=2)
    data = json.loads(text)
    assert data["score_name"] == "complexity"
    assert data["score_selection"] == {
        "rule": "max AUROC on labelled anomalies", "chosen": "complexity",
        "auroc": {"bpd": 11 / 12, "complexity": 1.0, "level_1": 0.0, "level_2": 0.5},
        "n_normal": 4, "n_anomalous": 3,
    }
    assert list(data["score_selection"]["auroc"]) == list(CANDIDATES_NORMAL)  # tie-break order
    loaded = Calibration.from_json(text)
    assert loaded == calibration
    assert loaded.score_selection == calibration.score_selection
    assert list(loaded.score_selection.auroc) == list(CANDIDATES_NORMAL)  # type: ignore[union-attr]
    assert loaded.to_json(indent=2) == text


def test_calibration_json_without_score_selection_still_loads():
    # Written before score selection existed (and still written for a named score).
    legacy = """{"schema_version": 1, "score_name": "bpd",
        "created_at": "2024-05-01T12:00:00+00:00",
        "threshold": {"value": 4.0, "method": "conformal", "alpha": 0.25,
                      "n_calibration": 4, "fpr": 0.0, "n_anomalous": 0, "precision": null,
                      "recall": null, "f1": null, "cost_fp": null, "cost_fn": null},
        "calibration_scores": [1.0, 2.0, 3.0, 4.0]}"""
    calibration = Calibration.from_json(legacy)
    assert calibration.score_selection is None
    assert calibration.threshold.value == 4.0  # k = ceil(0.75 * 5) = 4
    assert "score_selection" not in calibration.to_dict()


def test_a_stored_conformal_threshold_is_checked_against_its_scores():
    # alpha = 0.05/3 with 299 scores: the float rule's rank is 295 (the p-value 5/300 is
    # <= alpha as floats), the decimal rule's (alpha read as 0.016666666666666666) 296,
    # which calibrations before the float rule stored; both load, a threshold at any
    # other rank is refused as altered
    alpha, cal = 0.05 / 3, np.arange(1.0, 300.0)
    assert math.ceil((1 - Fraction(repr(alpha))) * 300) == 296
    assert conformal_threshold(cal, alpha).value == 295.0  # cal[k - 1] is k
    stored = json.loads(calibrate("bpd", cal, alpha=alpha).to_json())
    for value in (295.0, 296.0):
        stored["threshold"]["value"] = value
        assert Calibration.from_json(json.dumps(stored)).threshold.value == value
    for value in (294.0, 297.0, 295.5):
        stored["threshold"]["value"] = value
        with pytest.raises(CalibrationError, match=f"conformal threshold {value} does not "
                                                   r"match the stored calibration scores "
                                                   r"\(expected 295.0 for alpha="):
            Calibration.from_json(json.dumps(stored))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.update(score_name="bpd"), "chose 'complexity' but the calibration is for"),
        (lambda d: d["score_selection"]["auroc"].update(bpd=1.0), "does not have the highest"),
        (lambda d: d["score_selection"].update(chosen="level_9"), "not among the candidates"),
        (lambda d: d["score_selection"]["auroc"].update(level_2=1.5), r"in \[0, 1\]"),
        (lambda d: d["score_selection"].update(n_normal=0), "n_normal"),
        (lambda d: d["score_selection"].pop("rule"), "missing field"),
        (lambda d: d["score_selection"].update(extra=1), "unknown score_selection field"),
        (lambda d: d["score_selection"].update(chosen=["bpd"]),
         "invalid score_selection in the stored calibration: unhashable"),
        (lambda d: d["calibration_scores"].__setitem__(0, 10**400), "could not convert"),
        (lambda d: d["threshold"].update(value=[1]), "invalid threshold in the stored"),
    ],
)
def test_score_selection_is_validated_on_load(mutate, match):
    data = selected_calibration().to_dict()
    mutate(data)
    with pytest.raises(CalibrationError, match=match):
        Calibration.from_dict(data)


# -------------------------------------------------------------------- errors


def test_non_finite_scores_say_how_many_failed():
    with pytest.raises(CalibrationError, match=r"2 of 5 calibration scores .* failed to score"):
        conformal_threshold([1.0, np.nan, 2.0, np.inf, 3.0], alpha=0.5)
    with pytest.raises(CalibrationError, match="1 of 2 test scores"):
        conformal_p_values([1.0, 2.0], [np.nan, 1.0])
    with pytest.raises(CalibrationError, match="1 of 3 anomalous scores"):
        f1_threshold([1.0], [2.0, -np.inf, 3.0])


@pytest.mark.parametrize(
    "call",
    [
        lambda: conformal_threshold([], 0.1),
        lambda: conformal_p_values([1.0], []),
        lambda: f1_threshold([1.0], []),
        lambda: benjamini_hochberg([], 0.1),
    ],
)
def test_empty_scores_are_refused(call):
    with pytest.raises(CalibrationError, match=r"no .* were given"):
        call()


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_alpha_outside_unit_interval(alpha):
    with pytest.raises(CalibrationError, match="alpha"):
        conformal_threshold(np.arange(100.0), alpha)


@pytest.mark.parametrize("q", [0.0, 1.0, 2.0, float("nan")])
def test_q_outside_unit_interval(q):
    with pytest.raises(CalibrationError, match="q "):
        benjamini_hochberg([0.1, 0.2], q)


def test_other_errors():
    with pytest.raises(CalibrationError, match="1-D"):
        conformal_p_values(np.ones((2, 2)), [1.0])
    with pytest.raises(CalibrationError, match=r"\[0, 1\]"):
        benjamini_hochberg([0.5, 3.0], 0.1)
    with pytest.raises(CalibrationError, match="both 0"):
        cost_threshold(NORMAL, ANOMALOUS, cost_fp=0.0, cost_fn=0.0)
    with pytest.raises(CalibrationError, match="cost_fn"):
        cost_threshold(NORMAL, ANOMALOUS, cost_fn=-1.0)
    with pytest.raises(CalibrationError, match="needs scores of labelled anomalous"):
        calibrate("bpd", NORMAL, method="f1")
    with pytest.raises(CalibrationError, match="needs a target false-positive rate"):
        calibrate("bpd", NORMAL)
    with pytest.raises(CalibrationError, match="only applies to the conformal"):
        calibrate("bpd", NORMAL, method="f1", alpha=0.1, anomalous_scores=ANOMALOUS)
    with pytest.raises(CalibrationError, match="finite"):
        operating_point(NORMAL, None, float("nan"))


def stored_calibrations() -> list[dict]:
    """One calibration of each kind as stored (conformal, f1, cost, a chosen score)."""
    rng = np.random.default_rng(0)
    normal, anomalous = rng.normal(size=40), rng.normal(2, size=20)
    selection = select_score({"bpd": normal, "knn": 2 * normal},
                             {"bpd": anomalous, "knn": 3 * anomalous})
    return [calibrate("bpd", normal, alpha=0.1).to_dict(),
            calibrate("bpd", normal, method="f1", anomalous_scores=anomalous).to_dict(),
            calibrate("bpd", normal, method="cost", anomalous_scores=anomalous, cost_fp=2,
                      cost_fn=1).to_dict(),
            calibrate("knn", normal, alpha=0.1, score_selection=selection,
                      model_digest="0123456789abcdef" * 4).to_dict()]


STORED = stored_calibrations()
@settings(max_examples=300, deadline=None)
@given(st.data())
def test_an_edited_calibration_loads_and_works_or_is_refused_clearly(data: st.DataObject) -> None:
    """A calibration.json changed by hand (a field deleted or given any JSON value, up to
    three times): it loads and then decides, or raises CalibrationError, never another
    exception (20,000 examples clean in a one-off run)."""
    stored = json.loads(json.dumps(data.draw(st.sampled_from(STORED))))
    for _ in range(data.draw(st.integers(1, 3))):
        place = data.draw(st.sampled_from(json_paths(stored)[1:]))
        parent = stored
        for key in place[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()):
            parent[place[-1]] = data.draw(JSON_VALUES)
        elif isinstance(parent, dict):
            del parent[place[-1]]
    try:
        loaded = Calibration.from_json(json.dumps(stored))
    except CalibrationError as error:
        assert str(error).strip() and "\n" not in str(error)
        return
    scores = np.array([-1.0, 0.0, 3.0])
    assert loaded.p_values(scores).shape == (3,) and loaded.decide(scores).shape == (3,)
    assert Calibration.from_json(loaded.to_json()) == loaded
