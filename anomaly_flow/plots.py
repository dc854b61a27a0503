"""Figures for calibration and evaluation: score histograms, ROC and precision-recall curves.

Every function returns a :class:`matplotlib.figure.Figure` built without ``pyplot``, so
nothing registers in a global figure list and no GUI backend is touched: saving goes
through the Agg renderer. The caller logs or saves the figure (``fig.savefig(path)``).

Scores follow the package convention: higher means more anomalous, and a threshold ``t``
flags ``score > t``. Anomalies are the positive class in ROC and PR curves.

Example:
    >>> fig = score_histogram([1.0, 1.2, 1.1], [2.0, 2.5], threshold=1.5)
    >>> fig.savefig("hist.png")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from numpy.typing import ArrayLike

from anomaly_flow.detection import labelled_scores

__all__ = ["pr_curves", "roc_curves", "score_histogram", "score_histograms"]

NORMAL_COLOR = "tab:blue"
ANOMALOUS_COLOR = "tab:red"
THRESHOLD_COLOR = "black"

LabelledScores = tuple[ArrayLike, ArrayLike]
"""(normal scores (N,), anomalous scores (M,)) for one score type."""


def _finite(values: ArrayLike | None) -> np.ndarray:
    if values is None:
        return np.empty(0)
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


OUTLIER_SPANS = 3.0
"""How far past the normal scores (and the threshold), in their own spans, a histogram's
axis reaches; higher scores are piled into its last bar."""


def _axis_window(normal: np.ndarray, threshold: float | None, low: float, high: float
                 ) -> tuple[float, float]:
    """The x range of a histogram: all of ``low..high``, unless scores far above the normal
    ones (anomalies scoring thousands where normal images score a few units) would squeeze
    every normal image and the threshold into a tenth of it (five bars of fifty or
    fewer); then the normal scores and the threshold, plus :data:`OUTLIER_SPANS` of their
    span above them."""
    core = normal if threshold is None else np.append(normal, threshold)
    if core.size < 2:
        return low, high
    core_low, core_high = float(core.min()), float(core.max())
    span = core_high - core_low
    if span <= 0 or span >= (high - low) / 10:
        return low, high
    return low, min(high, core_high + OUTLIER_SPANS * span)


def _draw_histogram(
    ax: Axes,
    normal: np.ndarray,
    anomalous: np.ndarray,
    threshold: float | None,
    score_name: str,
    bins: int,
) -> None:
    """Draw overlaid density histograms on ``ax`` with shared bin edges."""
    both = np.concatenate([normal, anomalous])
    if both.size == 0:
        ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes)
    else:
        low, high = float(both.min()), float(both.max())
        if threshold is not None:
            low, high = min(low, threshold), max(high, threshold)
        low, high = _axis_window(normal, threshold, low, high)
        scale = max(1.0, abs(low), abs(high))
        if high - low <= 1e-9 * scale:  # (nearly) all equal: give the single bar some width
            middle = low + (high - low) / 2
            low, high = middle - 0.5 * scale, middle + 0.5 * scale
        edges = np.linspace(low, high, bins + 1)
        for values, color, name in ((normal, NORMAL_COLOR, "normal"),
                                    (anomalous, ANOMALOUS_COLOR, "anomalous")):
            if not values.size:
                continue
            beyond = int(np.count_nonzero(values > high))
            label = f"{name} (n={values.size}"
            if beyond:  # piled into the last bar, so every image still counts
                label += f"; {beyond} > {high:.3g} in last bar"
            ax.hist(np.minimum(values, high), bins=edges, density=True, alpha=0.55,
                    color=color, label=label + ")")
    if threshold is not None:
        ax.axvline(threshold, color=THRESHOLD_COLOR, linestyle="--", linewidth=1.5,
                   label=f"threshold {threshold:.4g}")
    ax.set_xlabel(f"{score_name} (higher = more anomalous)")
    ax.set_ylabel("density")
    ax.set_title(score_name)
    if ax.get_legend_handles_labels()[0]:
        # asked for by name: matplotlib warns of the default's cost when a busy machine
        # takes over a second to place it (a few dozen bars here)
        ax.legend(fontsize="small", loc="best")


def score_histogram(
    normal_scores: ArrayLike,
    anomalous_scores: ArrayLike | None = None,
    *,
    threshold: float | None = None,
    score_name: str = "score",
    bins: int = 50,
    title: str | None = None,
) -> Figure:
    """Histogram of normal scores, and anomalous ones if given, with the threshold drawn.

    Args:
        normal_scores: Scores of normal images, shape (N,); non-finite values are left out.
        anomalous_scores: Scores of anomalous images, shape (M,), or None.
        threshold: Decision threshold drawn as a dashed vertical line, or None.
        score_name: Axis label, e.g. ``"bpd"``.
        bins: Number of shared histogram bins.
        title: Figure title; defaults to the score name.

    Returns:
        The figure (one axes).
    """
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    _draw_histogram(ax, _finite(normal_scores), _finite(anomalous_scores), threshold,
                    score_name, bins)
    if title is not None:
        ax.set_title(title)
    return fig


def score_histograms(
    scores: Mapping[str, tuple[ArrayLike, ArrayLike | None]],
    *,
    thresholds: Mapping[str, float] | None = None,
    bins: int = 50,
    columns: int = 3,
) -> Figure:
    """One histogram panel per score type (normal vs anomalous), in a grid.

    Args:
        scores: ``{score_name: (normal (N,), anomalous (M,) or None)}``, in panel order.
        thresholds: Optional ``{score_name: threshold}`` to draw on matching panels.
        bins: Number of bins per panel.
        columns: Panels per row.

    Returns:
        The figure.
    """
    if not scores:
        raise ValueError("score_histograms needs at least one score type to plot")
    thresholds = thresholds or {}
    n = len(scores)
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    fig = Figure(figsize=(4.2 * columns, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (name, (normal, anomalous)) in zip(axes, scores.items(), strict=False):
        _draw_histogram(ax, _finite(normal), _finite(anomalous), thresholds.get(name), name,
                        bins)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig


def _curve_figure(
    curves: Mapping[str, LabelledScores],
    operating_points: Mapping[str, tuple[float, float]] | None,
    curve: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, str]],
    *,
    step: bool,
    title: str,
    xlabel: str,
    ylabel: str,
) -> tuple[Figure, Axes, float]:
    """One axes with ``curve(y_true, y_score) -> (x, y, legend figure)`` per score type,
    operating points dotted in the line's colour. Also returns the share of anomalies."""
    fig = Figure(figsize=(5.2, 5.0), layout="constrained")
    ax = fig.add_subplot()
    prevalence = float("nan")
    for name, (normal, anomalous) in curves.items():
        normal, anomalous = _finite(normal), _finite(anomalous)
        if normal.size == 0 or anomalous.size == 0:
            raise ValueError(
                "ROC and precision-recall curves need both normal and anomalous scores; "
                f"got {normal.size} normal and {anomalous.size} anomalous"
            )
        y_true, y_score = labelled_scores(normal, anomalous)
        x, y, figure = curve(y_true, y_score)
        label = f"{name} ({figure})"
        if step:
            draw = ax.step(x, y, where="post", linewidth=1.5, label=label)
        else:
            draw = ax.plot(x, y, linewidth=1.5, label=label)
        if operating_points and name in operating_points:
            ox, oy = operating_points[name]
            ax.plot([ox], [oy], "o", color=draw[0].get_color(), markersize=7)
        prevalence = float(y_true.mean())
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig, ax, prevalence


# scikit-learn takes a second or more to import: imported where a curve is drawn, so the
# commands that import this module and draw none (score) start without it.


def _roc(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(y_true, y_score)
    return fpr, tpr, f"AUROC {roc_auc_score(y_true, y_score):.3f}"


def _pr(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    precision, recall, _ = precision_recall_curve(y_true, y_score)
    return recall, precision, f"AP {average_precision_score(y_true, y_score):.3f}"


def roc_curves(
    curves: Mapping[str, LabelledScores],
    *,
    operating_points: Mapping[str, tuple[float, float]] | None = None,
    title: str = "ROC (anomalies positive)",
) -> Figure:
    """ROC curves of one or more score types on one axes, AUROC in the legend.

    Args:
        curves: ``{score_name: (normal (N,), anomalous (M,))}``.
        operating_points: Optional ``{score_name: (fpr, tpr)}`` marked with a dot, e.g.
            the calibrated threshold.
        title: Axes title.

    Returns:
        The figure.
    """
    fig, ax, _ = _curve_figure(curves, operating_points, _roc, step=False, title=title,
                               xlabel="false-positive rate", ylabel="true-positive rate")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.legend(fontsize="small", loc="lower right")
    return fig


def pr_curves(
    curves: Mapping[str, LabelledScores],
    *,
    operating_points: Mapping[str, tuple[float, float]] | None = None,
    title: str = "Precision-recall (anomalies positive)",
) -> Figure:
    """Precision-recall curves of one or more score types, average precision (AUPR) in
    the legend.

    Args:
        curves: ``{score_name: (normal (N,), anomalous (M,))}``.
        operating_points: Optional ``{score_name: (recall, precision)}`` marked with a dot.
        title: Axes title.

    Returns:
        The figure.
    """
    fig, ax, prevalence = _curve_figure(curves, operating_points, _pr, step=True,
                                        title=title, xlabel="recall", ylabel="precision")
    if curves:
        ax.axhline(prevalence, color="grey", linestyle=":", linewidth=1,
                   label=f"chance ({prevalence:.2f})")
    ax.legend(fontsize="small", loc="lower left")
    return fig
