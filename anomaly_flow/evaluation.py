"""Calibrating and evaluating a registered model on folders of images, logged to MLflow.

This module orchestrates the pieces: it scores image folders with
:mod:`anomaly_flow.folder_scoring` (over :mod:`anomaly_flow.scoring`), checks the options,
folders and model and warns of the images used with :mod:`anomaly_flow.prechecks`, fits
thresholds with :mod:`anomaly_flow.calibration`, measures AUROC and chooses a score type
with :mod:`anomaly_flow.detection`, draws figures with :mod:`anomaly_flow.plots` and logs
runs and model versions through :mod:`anomaly_flow.tracking` (the only module that talks
to MLflow).

* :func:`calibrate_model` — held-out normal images (and optionally labelled anomalies)
  in; a new model version carrying the calibration out, with a logged run (metrics,
  score histogram with the threshold, ROC and PR curves when labels exist, the
  calibration JSON), tagged with the training run. ``promote=True`` moves ``champion``.
  ``score="auto"`` chooses the score type with the highest AUROC on the labelled
  anomalies and records that evidence in the calibration and the run.
* :func:`select_threshold` — held-out normal images and labelled anomalies in; the
  thresholds F1, Youden's J and cost pick (and the conformal one at a target rate), side
  by side with their error rates on these images; ``register=METHOD`` then calibrates
  as :func:`calibrate_model` does, with that method's threshold.
* :func:`evaluate_model` — normal and anomalous folders in; AUROC, AUPR and FPR at
  95 % TPR for every score type, ROC/PR curves and histograms, logged as a run.

Images that fail to decode are never used: each folder's failures are counted,
reported with their reasons (one warning per folder from
:func:`~anomaly_flow.folder_scoring.score_folder_table`, the outcome object, a
``failed_images.json`` artifact) and left out. A decoded image whose score is not finite
is treated the same way. So is a normal image of the model's training folder (the same
content as one the training run recorded, either split:
:func:`~anomaly_flow.prechecks.leave_out_training_images`): calibration and evaluation
use held-out images only.

Example:
    >>> outcome = calibrate_model("models:/parts@candidate", Path("val/normal"),
    ...                           target_fpr=0.01, promote=True)  # doctest: +SKIP
    >>> outcome.model_uri, outcome.threshold  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from anomaly_flow import plots, tracking
from anomaly_flow.calibration import (
    METHODS,
    Calibration,
    Method,
    Threshold,
    calibrate,
    conformal_need,
    min_calibration_size,
    operating_point,
    shown_precision,
)
from anomaly_flow.calibration_checks import CalibrationError
from anomaly_flow.data import DataError, display_path
from anomaly_flow.detection import ScoreSelection, detection_metrics, select_score
from anomaly_flow.folder_scoring import MAX_REASONS_LOGGED, FolderScores, score_folder_table
from anomaly_flow.glow import Glow
from anomaly_flow.prechecks import (
    check_auto,
    check_folder_paths,
    check_labelled_both,
    check_method,
    check_registered,
    check_separate_folders,
    leave_out_training_images,
    n_trained_on,
    precheck_calibration,
    resolve_score,
    reused_calibration_images,
    trained_by,
    warn_held_out,
    warn_replaced_calibration,
)
from anomaly_flow.score_kinds import AUTO_SCORE
from anomaly_flow.scoring import default_score, score_names
from anomaly_flow.stopping import stops_deferred
from anomaly_flow.threshold_methods import LABELLED_METHODS

logger = logging.getLogger(__name__)

__all__ = [
    "CalibrateOutcome",
    "EvaluateOutcome",
    "SelectThresholdOutcome",
    "calibrate_model",
    "calibrate_scores",
    "compare_thresholds",
    "default_experiment",
    "detection_table",
    "evaluate_model",
    "evaluate_scores",
    "open_model",
    "select_folder_score",
    "select_threshold",
]

DEFAULT_EXPERIMENT = "anomaly-flow"
"""Experiment for runs on a model that has no registered name (a local model folder)."""

LABELLED_MIN_IMAGES = 30
"""Fewer usable images than this on either side: a labelled threshold (f1, youden, cost)
is fitted anyway, with a warning that its figures are rough."""


# ------------------------------------------------------------------------------ outcomes


@dataclass(frozen=True)
class CalibrateOutcome:
    """What :func:`calibrate_model` did.

    Attributes:
        run_id: The MLflow run that logged the calibration.
        model_uri: URI of the new model version carrying the calibration
            (``models:/NAME/VERSION``).
        version: The new model version.
        calibration: The fitted calibration (also stored with the version).
        metrics: The metrics logged on the run.
        failures: ``{"normal": [(path, reason)], "anomalous": [...]}``: files left out.
        promoted: Whether alias ``champion`` now points at the new version.
        previous_champion: The version ``champion`` pointed at before (None where it
            was not moved, or pointed at none).
    """

    run_id: str
    model_uri: str
    version: str | int | None
    calibration: Calibration
    metrics: dict[str, float]
    failures: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    promoted: bool = False
    previous_champion: str | None = None

    @property
    def promotion(self) -> str:
        """How alias ``champion`` moved, for a summary line; empty where it did not."""
        return promotion_line(self.model_uri, self.previous_champion) if self.promoted else ""

    @property
    def threshold(self) -> float:
        """The decision threshold: ``score > threshold`` is an anomaly."""
        return self.calibration.threshold.value


@dataclass(frozen=True)
class EvaluateOutcome:
    """What :func:`evaluate_model` measured.

    Attributes:
        run_id: The MLflow run that logged the evaluation.
        table: One row per score type (index ``score``), columns ``auroc``, ``aupr``,
            ``fpr_at_95_tpr``, ``n_normal``, ``n_anomalous``.
        metrics: The metrics logged on the run (``<score>_auroc`` etc., and
            ``calibrated_*`` at the model's stored threshold when it has one).
        failures: ``{"normal": [(path, reason)], "anomalous": [...]}``: files left out.
        stored_threshold: The score and method of the model's calibration (``ensemble,
            conformal``) when the ``calibrated_*`` metrics measure its threshold.
    """

    run_id: str
    table: pd.DataFrame
    metrics: dict[str, float]
    failures: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    stored_threshold: str | None = None


@dataclass(frozen=True)
class SelectThresholdOutcome:
    """What :func:`select_threshold` compared, and registered when asked.

    Attributes:
        table: One row per method (index ``method``: ``conformal`` first when a target
            false-positive rate was given, then ``f1``, ``youden``, ``cost``), columns
            ``threshold``, ``fpr``, ``precision``, ``recall``, ``f1``, ``cost``, as
            :func:`compare_thresholds` gives them.
        score: The score the thresholds apply to (the one chosen, for ``auto``).
        score_selection: For ``score="auto"``, every candidate's AUROC and the rule
            that chose; None when the score was named (or the default).
        n_normal: Normal images the thresholds were measured on (usable, and not of
            the model's training folder).
        n_anomalous: Anomalous images they were measured on.
        registered: The calibration registered with ``register=METHOD``; None without.
    """

    table: pd.DataFrame
    score: str
    score_selection: ScoreSelection | None
    n_normal: int
    n_anomalous: int
    registered: CalibrateOutcome | None = None


# ----------------------------------------------------------------------------- helpers


def default_experiment(loaded: tracking.LoadedModel) -> str:
    """The experiment of a loaded model: its registered name, else ``anomaly-flow``."""
    return loaded.name or DEFAULT_EXPERIMENT


def _failures_dict(
    normal: FolderScores, anomalous: FolderScores | None, score: str
) -> dict[str, list[tuple[str, str]]]:
    out = {"normal": normal.failures(score)}
    if anomalous is not None:
        out["anomalous"] = anomalous.failures(score)
    return out


def _log_failures(run: tracking.Run, failures: Mapping[str, Sequence[tuple[str, str]]]) -> None:
    """Store every left-out file with its reason as ``failed_images.json`` in ``run``.

    :func:`~anomaly_flow.folder_scoring.score_folder_table` already named the first ten of
    each folder in its warning; this one names no file, and is logged only when some were
    not shown there, to say where the full list is.
    """
    if any(failures.values()):
        run.log_dict(
            {kind: [{"path": p, "reason": r} for p, r in rows] for kind, rows in failures.items()},
            "failed_images.json",
        )
    if any(len(rows) > MAX_REASONS_LOGGED for rows in failures.values()):
        counts = ", ".join(f"{len(rows)} {kind}" for kind, rows in failures.items() if rows)
        logger.warning("all image files left out (%s), with their reasons, are listed in "
                       "failed_images.json in the artifacts of run %s", counts, run.run_id)


def select_folder_score(normal: FolderScores, anomalous: FolderScores,
                        model: Glow) -> ScoreSelection:
    """:func:`~anomaly_flow.detection.select_score` among ``model``'s scores, over the
    images usable for every candidate, so that all AUROCs are measured on the same images.
    A tie (labelled anomalies every score separates: AUROC 1 for all) goes to the model's
    default score, not to ``bpd``, the first in column order and the weakest at large."""
    preferred = default_score(model)
    names = [preferred, *(name for name in score_names(model) if name != preferred)]
    common: dict[str, dict[str, np.ndarray]] = {}
    for side, scores in (("normal", normal), ("anomalous", anomalous)):
        usable = np.logical_and.reduce([scores.usable(name) for name in names])
        if not usable.any():
            raise CalibrationError(
                f"none of the {scores.n_files} {side} images in {display_path(scores.folder)} "
                "could be scored, so no score can be chosen; see the warnings for the reasons."
            )
        common[side] = {name: scores.table[name].to_numpy(dtype=np.float64)[usable]
                        for name in names}
    return select_score(common["normal"], common["anomalous"])


def _tags(loaded: tracking.LoadedModel, normal: FolderScores,
          anomalous: FolderScores | None, digest: str) -> dict[str, str]:
    """The run's tags: the model it measured (by the URI given, and, as an alias moves on,
    by its registered version and its weights' digest) and the folders."""
    uri = str(loaded.uri)
    tags = {
        # a model folder by its absolute path: the run is read from anywhere
        "model_uri": display_path(Path(uri).resolve()) if Path(uri).is_dir() else uri,
        "model_digest": digest,
        "normal_folder": display_path(normal.folder.resolve()),
        "normal_fingerprint": normal.fingerprint,
    }
    if loaded.name is not None and loaded.version is not None:
        tags.update(model_name=loaded.name, model_version=str(loaded.version))
    if training_run := trained_by(loaded):
        tags["training_run_id"] = training_run
    if commit := tracking.git_commit():  # the code that scored and chose, as training's
        tags["git_commit"] = commit
    if anomalous is not None:
        tags["anomalous_folder"] = display_path(anomalous.folder.resolve())
        tags["anomalous_fingerprint"] = anomalous.fingerprint
    return tags


def open_model(model_uri: str, device: str = "auto", mlruns: Path | None = None, *,
               logs: bool = True, registers: bool = True,
               reads_runs: bool = True) -> tracking.LoadedModel:
    """Configure the MLflow store and load a model (weights and calibration) by URI.

    Args:
        model_uri: ``models:/NAME@alias``, ``models:/NAME/VERSION``, a run URI or a folder.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        mlruns: Root of the local MLflow store, unless ``MLFLOW_TRACKING_URI`` is set.
        logs: The caller will log to the store. When False and ``model_uri`` is a local
            folder, no store is created (in the working directory, say), and an existing
            one is opened only for ``reads_runs``.
        registers: The caller will also register a model version (said when the store
            is read-only).
        reads_runs: The caller reads the records of the run that trained the model (the
            images it was trained on, for
            :func:`~anomaly_flow.prechecks.leave_out_training_images`).

    Returns:
        A :class:`anomaly_flow.tracking.LoadedModel`.
    """
    tracking.require_store(model_uri, mlruns)  # before configure() creates an empty one
    local = tracking.is_local_model_uri(model_uri)
    if not local:
        tracking.configure(mlruns)
    # a folder is read first: one refused (a calibration fitted to other weights, no
    # model there) leaves no store behind in the working folder
    loaded = tracking.load_model(model_uri, device=device)
    if local and (logs or (reads_runs and tracking.missing_default_store(mlruns) is None)):
        tracking.configure(mlruns)
    if logs:  # before the folders are scored
        tracking.require_writable_store(
            "logs a run and registers a model" if registers else "logs a run",
            experiment=default_experiment(loaded))
    return loaded


# --------------------------------------------------------------------------- calibration


def calibrate_scores(
    loaded: tracking.LoadedModel,
    normal: FolderScores,
    anomalous: FolderScores | None = None,
    *,
    score: str | None = None,
    target_fpr: float | None = None,
    method: Method = "conformal",
    cost_fp: float = 1.0,
    cost_fn: float = 1.0,
    promote: bool = False,
    nested: bool = False,
    run_name: str = "calibrate",
) -> CalibrateOutcome:
    """Fit a calibration on already-scored folders, log it and register a new version.

    Args:
        loaded: A :class:`anomaly_flow.tracking.LoadedModel`.
        normal: Scores of held-out normal images (never training images).
        anomalous: Scores of labelled anomalies, or None.
        score: Score type the threshold applies to (``bpd``, ``complexity``,
            ``coarse_complexity``, ``typicality``, ``knn``, ``pixel_knn``, ``ensemble``,
            ``level_i``);
            None (default) for :func:`~anomaly_flow.scoring.default_score` (``ensemble``
            when the model has a normal reference, else ``bpd``); or ``"auto"`` (needs
            ``anomalous``): the one with the highest AUROC on the labelled images, a tie
            going to the model's default score, then to the first in
            :func:`~anomaly_flow.scoring.score_names` order
            (:func:`select_folder_score`).
            The choice and its AUROCs are stored in ``calibration.score_selection`` and
            logged (params ``score``/``score_selection``, metrics
            ``selection_<score>_auroc``, tags). The selection and the reported AUROC use
            the same labelled images, so that AUROC is optimistic. A conformal threshold
            is still computed from the normal images alone, though strictly, choosing
            the score on those same images makes its false-positive guarantee
            approximate; for the exact guarantee, choose on other data (``evaluate``)
            and name the score.
        target_fpr: Target false-positive rate α, for ``method="conformal"``.
        method: ``conformal``, ``f1``, ``youden`` or ``cost``.
        cost_fp: Cost of a false positive (``cost`` method).
        cost_fn: Cost of a false negative (``cost`` method).
        promote: Move alias ``champion`` to the new version.
        nested: Log as a child of the active run.
        run_name: Name of the run.

    Returns:
        The outcome: run, new model URI and version, calibration, metrics, failures.

    Raises:
        CalibrationError: Bad options, or too few usable normal images for α (the
            message says how many are needed).
    """
    check_registered(loaded)
    score = resolve_score(score, loaded.model)
    check_auto(score, anomalous is not None)
    check_method(method, target_fpr, anomalous is not None)
    if anomalous is not None:
        check_folder_paths(normal.folder, anomalous.folder)
    normal = leave_out_training_images(loaded, normal, "calibration")
    warn_held_out(normal, anomalous)
    selection = None
    if score == AUTO_SCORE:
        selection = select_folder_score(normal, anomalous,  # type: ignore[arg-type]
                                        loaded.model)
        score = selection.chosen
    normal = normal.finite_in([score])
    anomalous = None if anomalous is None else anomalous.finite_in([score])
    if selection is not None:
        logger.info("chose score %s: %s (AUROC %s on %d normal, %d anomalous images)", score,
                    selection.rule,
                    ", ".join(f"{name} {value:.4f}" for name, value in selection.auroc.items()),
                    selection.n_normal, selection.n_anomalous)
        if selection.auroc[score] <= 0.5:
            logger.warning(
                "no score separates the %d anomalous images from the %d normal ones better "
                "than chance (best AUROC %.4f, %s); the threshold keeps the false-positive "
                "rate but will flag anomalies no more often than normal images: check that "
                "the folders are labelled the right way round and that the model was trained "
                "on images like the normal ones", selection.n_anomalous, selection.n_normal,
                selection.auroc[score], score)
    normal_values = normal.values(score)
    anomalous_values = None if anomalous is None else anomalous.values(score)
    failures = _failures_dict(normal, anomalous, score)
    if normal_values.size == 0:
        raise CalibrationError(
            f"none of the {normal.n_files} images in {display_path(normal.folder)} could be "
            "scored, so there is nothing to calibrate on; see the warnings for the reasons."
        )
    if anomalous is not None and anomalous_values is not None and anomalous_values.size == 0:
        raise CalibrationError(
            f"none of the {anomalous.n_files} images in {display_path(anomalous.folder)} "
            "could be scored; fix them"
            + (" or leave out --anomalous." if method == "conformal" else
               f" (the {method} method chooses its threshold from them).")
        )
    if method == "conformal" and failures["normal"]:
        needed = min_calibration_size(target_fpr)  # type: ignore[arg-type]
        if normal_values.size < needed:
            raise CalibrationError(
                f"{conformal_need(target_fpr)}; only {normal_values.size} of the "  # type: ignore[arg-type]
                f"{normal.n_files} files in {display_path(normal.folder)} can be used "
                f"({len(failures['normal'])} left out; the warnings say why). Add or fix "
                "held-out normal images, or raise --target-fpr."
            )
    if method != "conformal" and anomalous_values is not None and min(
            normal_values.size, anomalous_values.size) < LABELLED_MIN_IMAGES:
        logger.warning(
            "the %s threshold is fitted on %d normal and %d anomalous images; with fewer "
            "than %d on a side its precision, recall and false-positive rate are rough "
            "estimates (one image moves them by several points); add labelled images",
            method, normal_values.size, anomalous_values.size, LABELLED_MIN_IMAGES)
    digest = loaded.model.digest()
    calibration = calibrate(
        score, normal_values, method=method, alpha=target_fpr,
        anomalous_scores=anomalous_values, cost_fp=cost_fp, cost_fn=cost_fn,
        score_selection=selection, model_digest=digest,
    )
    threshold = calibration.threshold
    metrics: dict[str, float] = {
        "threshold": threshold.value,
        "fpr": threshold.fpr,
        "n_calibration": threshold.n_calibration,
        "n_anomalous": threshold.n_anomalous,
        # failed: could not be scored; trained on: left out though scored (two counts,
        # both listed in failed_images.json)
        "n_failed_normal": len(failures["normal"]) - n_trained_on(normal),
        "n_trained_on_normal": n_trained_on(normal),
    }
    if anomalous_values is not None:
        detection = detection_metrics(normal_values, anomalous_values)
        metrics.update(
            precision=threshold.precision, recall=threshold.recall, f1=threshold.f1,
            auroc=detection.auroc, aupr=detection.aupr,
            fpr_at_95_tpr=detection.fpr_at_95_tpr,
            n_failed_anomalous=len(failures["anomalous"]),
        )
        if selection is None and detection.auroc <= 0.5:  # auto warned of its own choice
            logger.warning(
                "the %s score does not separate the %d anomalous images from the %d normal "
                "ones better than chance (AUROC %.4f): check that the folders are labelled "
                "the right way round, or pick another score (evaluate compares them, "
                "--score auto chooses)", score, anomalous_values.size, normal_values.size,
                detection.auroc)
        if method != "conformal" and threshold.fpr == 1.0:
            logger.warning(
                "the %s threshold %r flags every normal image (false-positive rate 1 on "
                "these %d): the version it registers calls every image anomalous; a "
                "conformal threshold (--method conformal --target-fpr A) keeps a stated rate",
                method, threshold.value, normal_values.size)
        if method != "conformal" and threshold.recall == 0.0:
            logger.warning(
                "the %s threshold %r flags none of the %d anomalous images (recall 0): the "
                "version it registers calls every image like them normal; with so few "
                "anomalies, or costs that make a miss no dearer than a false alarm, try "
                "--method f1 or youden, a higher --cost-fn, or more anomalous images",
                method, threshold.value, anomalous_values.size)
    if promote:
        _check_promotable(threshold, score, method, normal_values.size,
                          None if anomalous_values is None else anomalous_values.size)
    params: dict[str, Any] = {
        "model_uri": loaded.uri, "score": score, "method": method,
        "target_fpr": target_fpr, "normal_folder": display_path(normal.folder),
        "anomalous_folder": None if anomalous is None else display_path(anomalous.folder),
    }
    if method == "cost":
        params.update(cost_fp=cost_fp, cost_fn=cost_fn)
    tags = _tags(loaded, normal, anomalous, digest)
    curves = {} if anomalous_values is None else {score: (normal_values, anomalous_values)}
    if selection is not None:
        params["score_selection"] = AUTO_SCORE
        metrics.update({f"selection_{name}_auroc": value
                        for name, value in selection.auroc.items()})
        tags.update(score_name=score, score_selection=selection.rule)
        # Every candidate's curve, so the evidence for the choice is in the figures too.
        curves = {name: (normal.values(name), anomalous.values(name))  # type: ignore[union-attr]
                  for name in selection.auroc}

    with tracking.start_run(default_experiment(loaded), run_name, nested=nested,
                            tags=tags) as run:
        run.log_params({k: v for k, v in params.items() if v is not None})
        run.log_metrics(metrics)
        run.log_text(calibration.to_json(indent=2), "calibration.json")
        run.log_figure(
            plots.score_histogram(normal_values, anomalous_values, threshold=threshold.value,
                                  score_name=score,
                                  title=f"{score}: threshold {threshold.value:.4g} ({method})"),
            "score_histogram.png",
        )
        if curves:
            run.log_figure(
                plots.roc_curves(curves, operating_points={score: (threshold.fpr,
                                                                   threshold.recall)}),
                "roc_curve.png",
            )
            run.log_figure(
                plots.pr_curves(curves, operating_points={score: (threshold.recall,
                                                                  threshold.precision)}),
                "pr_curve.png",
            )
        _log_failures(run, failures)
        with stops_deferred():  # the version and the run's link to it, as one step
            model_uri, version, previous = tracking.register_calibrated_version(
                loaded, calibration, run, promote=promote,
                calibration_fingerprint=normal.fingerprint,
            )
            run.set_tags({"calibrated_model_uri": str(model_uri)})
        run_id = run.run_id
    logger.info("calibrated %s on %s: threshold %.6g (%s), new version %s", loaded.uri, score,
                threshold.value, method, model_uri)
    return CalibrateOutcome(
        run_id=run_id, model_uri=str(model_uri), version=version, calibration=calibration,
        metrics=metrics, failures=failures, promoted=promote, previous_champion=previous,
    )


def _check_promotable(threshold: Threshold, score: str, method: str, n_normal: int,
                      n_anomalous: int | None, *, of: str = "",
                      otherwise: str = ", or without --promote to register it anyway"
                      ) -> None:
    """Refuse to make ``champion`` of a threshold that decides nothing on the images that
    set it: one that flags every normal image, or none of the labelled anomalies. The
    warnings before it say why such a threshold comes about; registered without
    promotion it can still be looked at. ``of`` names the version (`` of models:/...``)
    and ``otherwise`` ends the advice.

    Raises:
        CalibrationError: The threshold flags every normal image or no anomalous one.
    """
    if threshold.fpr == 1.0:
        what = f"flags every one of the {n_normal} normal images"
    elif n_anomalous and threshold.recall == 0.0:
        what = f"flags none of the {n_anomalous} anomalous images"
    else:
        return
    raise CalibrationError(
        f"not promoted: the {method} threshold {threshold.value:.6g}{of} on {score} {what}, "
        "so as champion it would decide nothing; calibrate again with another --method "
        f"or --score (evaluate compares the scores) or other images{otherwise}")


@dataclass(frozen=True)
class PromoteOutcome:
    """What :func:`promote_model` did.

    Attributes:
        model_uri: The version now ``champion``, ``models:/NAME/VERSION``.
        previous: The version ``champion`` left (None where it pointed at none).
        already: ``champion`` pointed at that version already; nothing moved.
    """

    model_uri: str
    previous: str | None
    already: bool = False

    @property
    def line(self) -> str:
        """How alias ``champion`` moved, with the command that undoes it."""
        if self.already:
            return f"alias 'champion' already points at {self.model_uri}; nothing moved"
        return promotion_line(self.model_uri, self.previous)


def promotion_line(model_uri: str, previous: str | None) -> str:
    """How alias ``champion`` moved to ``model_uri`` (``models:/NAME/VERSION``) from
    ``previous``, with the command that undoes it."""
    name, _, version = model_uri.removeprefix("models:/").rpartition("/")
    if previous is None:
        return f"alias 'champion' set to version {version} (it pointed at none)"
    return (f"alias 'champion' moved from version {previous} to {version} (to undo: "
            f"{tracking.undo_command(name, previous)})")


def promote_model(model_uri: str, mlruns: Path | None = None) -> PromoteOutcome:
    """Point alias ``champion`` at a calibrated registered version: to roll back to the
    one before (``previous_champion``), or to promote a version calibrated without
    ``--promote``. The version must carry a calibration that decides something on the
    images that set it (as ``calibrate --promote`` checks); it is tagged
    ``previous_champion`` with the version the alias leaves.

    Args:
        model_uri: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` for the version the
            alias names now, or ``runs:/RUN/model`` of a run whose model was registered.
        mlruns: Root of the local MLflow store, unless ``MLFLOW_TRACKING_URI`` is set.

    Raises:
        CalibrationError: Not a registered version, an uncalibrated one, or one whose
            threshold decides nothing.
        ModelNotFoundError: No such model, version or alias.
        TrackingError: The store cannot be written.
    """
    unregistered = CalibrationError(
        f"{model_uri} is not a registered model version, and promote moves alias "
        "'champion' of a registered model; give models:/NAME/VERSION")
    if tracking.is_local_model_uri(str(model_uri)):  # a folder: no store to move it in
        raise unregistered
    loaded = open_model(model_uri, "cpu", mlruns, logs=False, reads_runs=False)
    if loaded.name is None or loaded.version is None:  # a logged model's models:/m-... id
        raise unregistered
    tracking.require_writable_store("moves a model's alias")
    version_uri = f"models:/{loaded.name}/{loaded.version}"
    calibration = loaded.calibration
    if calibration is None:
        raise CalibrationError(
            f"{version_uri} is not calibrated, so as champion it would give scores but no "
            f"verdicts; calibrate it with --promote (anomaly-flow calibrate --model "
            f"{version_uri} --normal DIR --target-fpr 0.01 --promote)")
    threshold = calibration.threshold
    _check_promotable(threshold, calibration.score_name, threshold.method,
                      threshold.n_calibration, threshold.n_anomalous, of=f" of {version_uri}",
                      otherwise="")
    moved, previous = tracking.promote_version(loaded.name, loaded.version)
    return PromoteOutcome(version_uri, previous if moved else None, already=not moved)


def calibration_summary(outcome: CalibrateOutcome) -> list[str]:
    """What a calibration chose, as the lines a command prints: the new model, the score
    (with the AUROCs behind an automatic choice), the threshold, and how it does on the
    images that set it."""
    calibration = outcome.calibration
    threshold = calibration.threshold
    lines = [f"model: {outcome.model_uri}"]
    selection = calibration.score_selection
    if selection is not None:
        aurocs = ", ".join(f"{name} {value:.4f}" for name, value in selection.auroc.items())
        lines.append(f"score: {calibration.score_name} ({selection.rule}: {aurocs}; on "
                     f"{selection.n_normal} normal and {selection.n_anomalous} anomalous "
                     "images, the same that chose it, so optimistic)")
    lines.append(f"threshold: {threshold.value} ({calibration.score_name}, {threshold.method}"
                 + (f", target FPR {threshold.alpha:.10g}" if threshold.alpha is not None
                    else "") + ")")
    line = f"calibration FPR: {threshold.fpr:.4g} on {threshold.n_calibration} normal images"
    if threshold.n_anomalous:
        precision = shown_precision(threshold.precision, threshold.recall, threshold.fpr)
        line += (f"; precision {precision}, recall {threshold.recall:.4g}, "
                 f"F1 {threshold.f1:.4g} on {threshold.n_anomalous} "
                 f"{'anomaly' if threshold.n_anomalous == 1 else 'anomalies'}")
        if threshold.method != "conformal":  # a conformal threshold saw no anomaly
            line += (" (the images that chose the threshold, so optimistic: measure on "
                     "others with evaluate)")
    lines.append(line)
    return lines


def _open_and_score(
    model_uri: str,
    normal: Path,
    anomalous: Path | None,
    *,
    score: str | None,
    registers: bool,
    device: str,
    mlruns: Path | None,
    batch_size: int,
    workers: int,
    progress: bool | None,
) -> tuple[tracking.LoadedModel, str, FolderScores, FolderScores | None]:
    """The steps between the prechecks and the thresholds, shared by
    :func:`calibrate_model` and :func:`select_threshold`: load the model, refuse a score
    it does not give and, for a calibration it ``registers``, a model with no registered
    name, all before the folders are scored (minutes, on large ones); then score them.

    Returns:
        The loaded model, the score resolved (``auto`` stays ``auto``), and the scores of
        the normal and the anomalous folder (None without one).
    """
    loaded = open_model(model_uri, device, mlruns, logs=registers)
    if registers:
        check_registered(loaded)
    resolved = resolve_score(score, loaded.model)
    if registers:
        warn_replaced_calibration(loaded, score, resolved)
    options = {"batch_size": batch_size, "workers": workers, "progress": progress}
    normal_scores = score_folder_table(loaded.model, normal, **options)
    anomalous_scores = (None if anomalous is None
                        else score_folder_table(loaded.model, anomalous, **options))
    return loaded, resolved, normal_scores, anomalous_scores


def calibrate_model(
    model_uri: str,
    normal: str | Path,
    anomalous: str | Path | None = None,
    *,
    score: str | None = None,
    target_fpr: float | None = None,
    method: Method = "conformal",
    cost_fp: float = 1.0,
    cost_fn: float = 1.0,
    promote: bool = False,
    device: str = "auto",
    batch_size: int = 256,
    workers: int = 0,
    mlruns: Path | None = None,
    nested: bool = False,
    progress: bool | None = None,
) -> CalibrateOutcome:
    """Score held-out folders with a model, fit a threshold, log it, register a version.

    The new version carries the calibration, so ``anomaly-flow score`` and the pyfunc
    return p-values and verdicts; it is tagged with this calibration run, and the run
    with the model's training run (``training_run_id``).

    Args:
        model_uri: ``models:/NAME@alias``, ``models:/NAME/VERSION``, a run URI or a
            local model folder.
        normal: Folder of held-out normal images (never training images).
        anomalous: Folder of labelled anomalies, or None.
        score: Score type the threshold applies to (``bpd``, ``complexity``,
            ``coarse_complexity``, ``typicality``, ``knn``, ``pixel_knn``, ``ensemble``,
            ``level_i``);
            None (default) for :func:`~anomaly_flow.scoring.default_score`; or ``"auto"``
            (needs ``anomalous``): the one with the highest AUROC on the labelled images,
            recorded with its evidence in the calibration. The selection and the reported
            AUROC use the same labelled images (optimistic); a conformal threshold is still
            computed from the normal images only (see :func:`calibrate_scores`).
        target_fpr: Target false-positive rate α (``conformal``).
        method: ``conformal``, ``f1``, ``youden`` or ``cost``.
        cost_fp: Cost of a false positive (``cost``).
        cost_fn: Cost of a false negative (``cost``).
        promote: Move alias ``champion`` to the new version.
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: Images per forward pass.
        workers: DataLoader workers decoding images.
        mlruns: Root of the local MLflow store (default: ``./mlruns``), unless
            ``MLFLOW_TRACKING_URI`` is set.
        nested: Log as a child of the active run.
        progress: Progress bars on stderr; None shows them only on a terminal.

    Returns:
        The outcome (new model URI, threshold, run, failures).

    Raises:
        CalibrationError: Inconsistent options or too few normal images for α.
        DataError: A folder is missing or holds no image files.
    """
    normal, anomalous_path = Path(normal), None if anomalous is None else Path(anomalous)
    precheck_calibration(normal, anomalous_path, score=score, method=method,
                         target_fpr=target_fpr)
    loaded, score, normal_scores, anomalous_scores = _open_and_score(
        model_uri, normal, anomalous_path, score=score, registers=True, device=device,
        mlruns=mlruns, batch_size=batch_size, workers=workers, progress=progress)
    return calibrate_scores(
        loaded, normal_scores, anomalous_scores, score=score, target_fpr=target_fpr,
        method=method, cost_fp=cost_fp, cost_fn=cost_fn, promote=promote, nested=nested,
    )


def compare_thresholds(
    normal: FolderScores,
    anomalous: FolderScores,
    score: str = "bpd",
    *,
    methods: Sequence[str] = LABELLED_METHODS,
    target_fpr: float | None = None,
    cost_fp: float = 1.0,
    cost_fn: float = 1.0,
) -> pd.DataFrame:
    """Thresholds chosen by several methods on the same labelled scores, side by side.

    Args:
        normal: Scores of held-out normal images.
        anomalous: Scores of labelled anomalies.
        score: Score type.
        methods: Labelled methods to compare (``f1``, ``youden``, ``cost``).
        target_fpr: Also add a ``conformal`` row at this α when given.
        cost_fp: Cost of a false positive (``cost``).
        cost_fn: Cost of a false negative (``cost``).

    Returns:
        One row per method (index ``method``): ``threshold``, ``fpr``, ``precision``,
        ``recall``, ``f1``, and ``cost = cost_fp·FP + cost_fn·FN`` on these data.
    """
    normal_values, anomalous_values = normal.values(score), anomalous.values(score)
    chosen: list[tuple[str, float | None]] = [(m, None) for m in methods]
    if target_fpr is not None:
        chosen.insert(0, ("conformal", target_fpr))
    rows = []
    for method, alpha in chosen:
        threshold = calibrate(score, normal_values, method=method, alpha=alpha,  # type: ignore[arg-type]
                              anomalous_scores=anomalous_values, cost_fp=cost_fp,
                              cost_fn=cost_fn).threshold
        fp = round(threshold.fpr * normal_values.size)
        fn = round((1 - threshold.recall) * anomalous_values.size)  # type: ignore[operator]
        rows.append({"method": method, "threshold": threshold.value, "fpr": threshold.fpr,
                     "precision": threshold.precision, "recall": threshold.recall,
                     "f1": threshold.f1, "cost": cost_fp * fp + cost_fn * fn})
    return pd.DataFrame(rows).set_index("method")


def select_threshold(
    model_uri: str,
    normal: str | Path,
    anomalous: str | Path,
    *,
    score: str | None = None,
    target_fpr: float | None = None,
    cost_fp: float = 1.0,
    cost_fn: float = 1.0,
    register: Method | None = None,
    promote: bool = False,
    device: str = "auto",
    batch_size: int = 256,
    workers: int = 0,
    mlruns: Path | None = None,
    progress: bool | None = None,
    on_compared: Callable[[SelectThresholdOutcome], None] | None = None,
) -> SelectThresholdOutcome:
    """Compare the thresholds F1, Youden's J and cost pick on labelled folders; optionally
    register a calibrated version with one of them.

    Both folders are scored once; normal images of the model's training folder are left
    out, as :func:`calibrate_model` leaves them out. Without ``register`` nothing is
    logged, so a read-only store serves. With ``register=METHOD`` the same scores are
    calibrated by :func:`calibrate_scores` (a run named ``select-threshold-METHOD`` and
    a new model version carrying that method's threshold), after the same checks
    :func:`calibrate_model` makes, made before any folder is scored.

    Args:
        model_uri: ``models:/NAME@alias``, ``models:/NAME/VERSION``, a run URI or, without
            ``register``, a local model folder.
        normal: Folder of held-out normal images (never training images).
        anomalous: Folder of labelled anomalies.
        score: Score type the thresholds apply to, as for :func:`calibrate_model`: a
            name, None for the model's default, or ``"auto"``: the one with the highest
            AUROC on these labelled images (so that AUROC is optimistic).
        target_fpr: Also a ``conformal`` row at this false-positive rate α; needed for
            ``register="conformal"``.
        cost_fp: Cost of a false positive (the ``cost`` row, and ``register="cost"``).
        cost_fn: Cost of a false negative.
        register: ``f1``, ``youden``, ``cost`` or ``conformal``: register a new model
            version with that method's threshold; None (default) registers nothing.
        promote: With ``register``: move alias ``champion`` to the new version.
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: Images per forward pass.
        workers: DataLoader workers decoding images.
        mlruns: Root of the local MLflow store (default: ``./mlruns``), unless
            ``MLFLOW_TRACKING_URI`` is set.
        progress: Progress bars on stderr; None shows them only on a terminal.
        on_compared: Called with the comparison (``registered`` None) as soon as it is
            made, before anything is registered: a caller shows it even when the
            registration then fails or is stopped.

    Returns:
        The comparison table, the score it is on (with the evidence for an ``auto``
        choice), the image counts, and the calibration registered, if any.

    Raises:
        CalibrationError: Inconsistent options, a score the model does not give, a model
            with no registered name to add a version to (with ``register``), too few
            normal images for the conformal row, or a normal folder of training images
            only.
        DataError: A folder is missing or holds no image files.
    """
    if register is not None and register not in METHODS:
        raise CalibrationError(f"unknown method {register!r} to register; choose one of "
                               f"{', '.join(METHODS)}.")
    if register == "conformal" and target_fpr is None:
        raise CalibrationError("registering the conformal threshold needs a target "
                               "false-positive rate; pass --target-fpr (e.g. 0.01).")
    if promote and register is None:
        raise CalibrationError("promote=True moves champion to the version register=METHOD "
                               "makes; pass register, or drop promote.")
    normal, anomalous = Path(normal), Path(anomalous)
    # the labelled methods' checks, and with a target rate the conformal row's size
    precheck_calibration(normal, anomalous, score=score,
                         method="f1" if target_fpr is None else "conformal",
                         target_fpr=target_fpr, rate_optional=register != "conformal")
    loaded, chosen, normal_scores, anomalous_scores = _open_and_score(
        model_uri, normal, anomalous, score=score, registers=register is not None,
        device=device, mlruns=mlruns, batch_size=batch_size, workers=workers,
        progress=progress)
    assert anomalous_scores is not None  # an anomalous folder was given
    normal_scores = leave_out_training_images(loaded, normal_scores, "threshold selection")
    if register is None:  # calibrate_scores warns when registering
        warn_held_out(normal_scores, anomalous_scores)
    selection = None
    if chosen == AUTO_SCORE:
        selection = select_folder_score(normal_scores, anomalous_scores, loaded.model)
        chosen = selection.chosen
    normal_scores = normal_scores.finite_in([chosen])
    anomalous_scores = anomalous_scores.finite_in([chosen])
    table = compare_thresholds(normal_scores, anomalous_scores, chosen, target_fpr=target_fpr,
                               cost_fp=cost_fp, cost_fn=cost_fn)
    outcome = SelectThresholdOutcome(
        table=table, score=chosen, score_selection=selection,
        n_normal=normal_scores.values(chosen).size,
        n_anomalous=anomalous_scores.values(chosen).size)
    if on_compared is not None:
        on_compared(outcome)
    if register is None:
        return outcome
    registered = calibrate_scores(
        loaded, normal_scores, anomalous_scores, score=score, method=register,
        target_fpr=target_fpr if register == "conformal" else None, cost_fp=cost_fp,
        cost_fn=cost_fn, promote=promote, run_name=f"select-threshold-{register}")
    return replace(outcome, registered=registered)


# ---------------------------------------------------------------------------- evaluation


def detection_table(normal: FolderScores, anomalous: FolderScores,
                    scores: Sequence[str]) -> pd.DataFrame:
    """AUROC, AUPR and FPR at 95 % TPR for each score type, one row each.

    Score types with no usable value on either side are left out with a warning.
    """
    rows, empty = [], []
    for name in scores:
        normal_values, anomalous_values = normal.values(name), anomalous.values(name)
        if normal_values.size == 0 or anomalous_values.size == 0:
            empty.append(name)
            continue
        rows.append({"score": name, **detection_metrics(normal_values,
                                                        anomalous_values).to_dict()})
    if not rows:
        sides = [scores.folder for scores in (normal, anomalous)
                 if not scores.usable("bpd").any()]
        where = " and ".join(display_path(folder) for folder in sides) or "one side"
        raise DataError(f"no score type could be evaluated: no image of {where} could be "
                        "scored; see the warnings above for the reasons.")
    if empty:
        logger.warning("score(s) %s have no finite values on one side; left out",
                       ", ".join(empty))
    return pd.DataFrame(rows).set_index("score")


def evaluate_scores(
    loaded: tracking.LoadedModel,
    normal: FolderScores,
    anomalous: FolderScores,
    *,
    nested: bool = False,
) -> EvaluateOutcome:
    """Measure how well every score type separates two scored folders; log a run.

    Args:
        loaded: A :class:`anomaly_flow.tracking.LoadedModel`.
        normal: Scores of normal test images.
        anomalous: Scores of anomalous test images.
        nested: Log as a child of the active run.

    Returns:
        The per-score table, metrics logged and failures.

    Raises:
        DataError: No score type could be evaluated (nothing scored on one side).
        CalibrationError: Every usable normal image is one of the model's training folder.
    """
    check_folder_paths(normal.folder, anomalous.folder)
    normal = leave_out_training_images(loaded, normal, "evaluation")
    check_labelled_both(normal, anomalous)
    names = score_names(loaded.model)
    normal, anomalous = normal.finite_in(names), anomalous.finite_in(names)
    table = detection_table(normal, anomalous, names)
    metrics: dict[str, float] = {}
    for name, row in table.iterrows():
        for column in ("auroc", "aupr", "fpr_at_95_tpr"):
            metrics[f"{name}_{column}"] = float(row[column])
    failures = _failures_dict(normal, anomalous, "bpd")
    metrics["n_normal"] = float(normal.n_files - len(failures["normal"]))
    metrics["n_anomalous"] = float(anomalous.n_files - len(failures["anomalous"]))
    metrics["n_failed_normal"] = len(failures["normal"]) - n_trained_on(normal)
    metrics["n_trained_on_normal"] = n_trained_on(normal)
    metrics["n_failed_anomalous"] = len(failures["anomalous"])

    calibration = loaded.calibration
    thresholds: dict[str, float] = {}
    roc_points: dict[str, tuple[float, float]] = {}
    pr_points: dict[str, tuple[float, float]] = {}
    if calibration is not None and calibration.score_name in table.index:
        name, value = calibration.score_name, calibration.threshold.value
        normal_values = normal.values(name)
        reused = reused_calibration_images(normal_values, calibration.sorted_scores)
        if reused:
            logger.warning(
                "%d of the %d normal images in %s score exactly as images %s was calibrated "
                "on (%s): they are, almost surely, its calibration images, and the "
                "false-positive rate at its threshold measured on them is the one it was "
                "fitted to; evaluate on normal images kept out of training and calibration",
                reused, normal_values.size, display_path(normal.folder), loaded.uri, name)
        point = operating_point(normal_values, anomalous.values(name), value)
        metrics.update({f"calibrated_{key}": val for key, val in point.items()})
        metrics["calibrated_threshold"] = value
        thresholds[name] = value
        roc_points[name] = (point["fpr"], point["tpr"])
        pr_points[name] = (point["recall"], point["precision"])

    curves = {name: (normal.values(name), anomalous.values(name)) for name in table.index}
    with tracking.start_run(default_experiment(loaded), "evaluate", nested=nested,
                            tags=_tags(loaded, normal, anomalous,
                                       loaded.model.digest())) as run:
        run.log_params({"model_uri": loaded.uri,
                        "normal_folder": display_path(normal.folder),
                        "anomalous_folder": display_path(anomalous.folder)})
        run.log_metrics(metrics)
        run.log_dict({"scores": {name: {k: float(v) for k, v in row.items()}
                                 for name, row in table.iterrows()}},
                     "detection_metrics.json")
        run.log_figure(plots.roc_curves(curves, operating_points=roc_points), "roc_curves.png")
        run.log_figure(plots.pr_curves(curves, operating_points=pr_points), "pr_curves.png")
        run.log_figure(plots.score_histograms(curves, thresholds=thresholds),
                       "score_histograms.png")
        _log_failures(run, failures)
        run_id = run.run_id
    stored = (f"{calibration.score_name}, {calibration.threshold.method}"
              if thresholds and calibration is not None else None)
    return EvaluateOutcome(run_id=run_id, table=table, metrics=metrics, failures=failures,
                           stored_threshold=stored)


def evaluate_model(
    model_uri: str,
    normal: str | Path,
    anomalous: str | Path,
    *,
    device: str = "auto",
    batch_size: int = 256,
    workers: int = 0,
    mlruns: Path | None = None,
    nested: bool = False,
    progress: bool | None = None,
) -> EvaluateOutcome:
    """AUROC, AUPR and FPR at 95 % TPR of every score type on labelled folders, logged.

    Args:
        model_uri: ``models:/NAME@alias``, ``models:/NAME/VERSION``, a run URI or a
            local model folder.
        normal: Folder of normal test images.
        anomalous: Folder of anomalous test images.
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: Images per forward pass.
        workers: DataLoader workers decoding images.
        mlruns: Root of the local MLflow store, unless ``MLFLOW_TRACKING_URI`` is set.
        nested: Log as a child of the active run.
        progress: Progress bars on stderr; None shows them only on a terminal.

    Returns:
        The per-score table (also logged), metrics and failures.

    Raises:
        DataError: A folder is missing or holds no image files, or nothing scored.
        CalibrationError: Every usable normal image is one of the model's training folder.
    """
    normal, anomalous = Path(normal), Path(anomalous)
    check_separate_folders(normal, anomalous)  # lists both: a missing folder fails here
    loaded = open_model(model_uri, device, mlruns, registers=False)
    options = {"batch_size": batch_size, "workers": workers, "progress": progress}
    return evaluate_scores(
        loaded,
        score_folder_table(loaded.model, normal, **options),
        score_folder_table(loaded.model, anomalous, **options),
        nested=nested,
    )
