"""Calibrating and evaluating a registered model on folders of images, logged to MLflow.

This module orchestrates the pieces: it scores image folders with
:mod:`anomaly_flow.scoring`, fits thresholds with :mod:`anomaly_flow.calibration`,
draws figures with :mod:`anomaly_flow.plots` and logs runs and model versions through
:mod:`anomaly_flow.tracking` (the only module that talks to MLflow).

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
reported with their reasons (one warning per folder from :func:`score_folder_table`,
the outcome object, a ``failed_images.json`` artifact) and left out. A decoded image
whose score is not finite is treated the same way. So is a normal image of the model's
training folder (the same content as one the training run recorded, either split):
calibration and evaluation use held-out images only.

Example:
    >>> outcome = calibrate_model("models:/parts@candidate", Path("val/normal"),
    ...                           target_fpr=0.01, promote=True)  # doctest: +SKIP
    >>> outcome.model_uri, outcome.threshold  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
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
    CalibrationError,
    Method,
    ScoreSelection,
    calibrate,
    conformal_need,
    detection_metrics,
    min_calibration_size,
    operating_point,
    select_score,
)
from anomaly_flow.config import RunConfig
from anomaly_flow.data import (
    DataError,
    ImageMode,
    display_path,
    find_images,
    fingerprint_and_digests,
    is_unreadable,
    notable_copies,
    one_line,
    try_load_image,
)
from anomaly_flow.glow import Glow
from anomaly_flow.scoring import (
    LIKELIHOOD_SCORES,
    REFERENCE_SCORES,
    SCORE_CHOICES,
    ScoringDataset,
    default_score,
    is_score_name,
    level_columns,
    paths_frame,
    score_dataset,
    score_names,
)
from anomaly_flow.stopping import stops_deferred
from anomaly_flow.threshold_methods import LABELLED_METHODS

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO_SCORE",
    "CalibrateOutcome",
    "EvaluateOutcome",
    "FolderScores",
    "SelectThresholdOutcome",
    "calibrate_model",
    "calibrate_scores",
    "check_separate_folders",
    "compare_thresholds",
    "default_experiment",
    "detection_table",
    "evaluate_model",
    "evaluate_scores",
    "leave_out_training_images",
    "n_trained_on",
    "open_model",
    "reused_calibration_images",
    "score_folder_table",
    "select_folder_score",
    "select_threshold",
    "warn_copies",
    "warn_held_out",
    "warn_labelled_both",
]

DEFAULT_EXPERIMENT = "anomaly-flow"
"""Experiment for runs on a model that has no registered name (a local model folder)."""

AUTO_SCORE = "auto"
"""``score=AUTO_SCORE``: choose the score type by AUROC on labelled anomalies."""

_MAX_REASONS_LOGGED = 10

LABELLED_MIN_IMAGES = 30
"""Fewer usable images than this on either side: a labelled threshold (f1, youden, cost)
is fitted anyway, with a warning that its figures are rough."""


# ------------------------------------------------------------------------------- scoring


@dataclass(frozen=True, eq=False)
class FolderScores:
    """Every image file found in one folder, with its scores or the reason it failed.

    Attributes:
        folder: The folder that was searched (recursively).
        table: One row per file: ``path``, the score columns
            (:func:`~anomaly_flow.scoring.score_names`), ``error`` (empty for images
            that are used; score columns NaN for files that failed to decode).
        fingerprint: SHA-256 of the folder's files (for MLflow tags).
        digests: SHA-256 of each file's content, in row order (empty when unknown).
    """

    folder: Path
    table: pd.DataFrame
    fingerprint: str
    digests: tuple[str, ...] = ()

    @property
    def n_files(self) -> int:
        """Number of image files found."""
        return len(self.table)

    def usable(self, score: str) -> np.ndarray:
        """Boolean mask, shape (n_files,): decoded and with a finite ``score``."""
        values = self.table[score].to_numpy(dtype=np.float64)
        return (self.table["error"].to_numpy() == "") & np.isfinite(values)

    def values(self, score: str) -> np.ndarray:
        """The usable values of ``score``, shape (n,), float64, in file order."""
        return self.table[score].to_numpy(dtype=np.float64)[self.usable(score)]

    def failures(self, score: str = "bpd") -> list[tuple[str, str]]:
        """``(path, reason)`` for every file left out when using ``score``."""
        left_out = ~self.usable(score)
        rows = self.table.loc[left_out, ["path", "error"]]
        return [
            (str(path), str(error) or f"the model gave a non-finite {score} for this image")
            for path, error in rows.itertuples(index=False)
        ]


def score_folder_table(
    model: Glow,
    folder: str | Path,
    *,
    batch_size: int = 256,
    workers: int = 0,
    progress: bool | None = None,
) -> FolderScores:
    """Score every image file under ``folder`` with ``model``.

    Files that fail to decode get a row with the reason in ``error`` and NaN scores; one
    warning states how many failed and why (the first ten files with their reasons,
    then how many more). This is the only place a failing file is named in the log:
    :func:`calibrate_scores` and :func:`evaluate_scores` add only where the full list
    was stored.

    Args:
        model: A loaded Glow on its scoring device.
        folder: Folder searched recursively for image files.
        batch_size: Images per forward pass.
        workers: DataLoader worker processes decoding images.
        progress: Progress bar on stderr; None shows it only on a terminal.

    Returns:
        The folder's scores.

    Raises:
        DataError: The folder is missing, not a folder, or holds no image files.
        BatchOutOfMemory: A batch did not fit in memory (the message names the
            batch size to lower).
    """
    root = Path(folder)
    paths = find_images(root)
    config = model.config
    dataset = ScoringDataset(paths, config.mode, config.image_size, config.n_bits,
                             config.levels)
    table = score_dataset(model, dataset, batch_size=batch_size, num_workers=workers,
                          progress=progress)
    table = table.reset_index(drop=True)
    table.insert(0, "path", paths_frame(paths).to_numpy(dtype=object))
    table["error"] = table["error"].fillna("").astype(str)
    folder_digest, digests = fingerprint_and_digests(paths, root)
    scores = FolderScores(root, table, folder_digest, tuple(digests))
    failed = scores.failures("bpd")
    if failed:
        lines = [f"  {one_line(path)}: {reason}"
                 for path, reason in failed[:_MAX_REASONS_LOGGED]]
        if len(failed) > _MAX_REASONS_LOGGED:
            lines.append(f"  ... and {len(failed) - _MAX_REASONS_LOGGED} more")
        logger.warning("%d of %d image files in %s could not be scored and are left out:\n%s",
                       len(failed), len(paths), display_path(root), "\n".join(lines))
    return scores


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
        if not self.promoted:
            return ""
        if self.previous_champion is None:
            return f"alias 'champion' set to version {self.version} (it pointed at none)"
        return (f"alias 'champion' moved from version {self.previous_champion} to "
                f"{self.version}")

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


def resolve_score(score: str | None, model: Glow) -> str:
    """The score named (``None``: the model's :func:`default_score`), checked to be one
    the model gives, or ``auto``."""
    score = default_score(model) if score is None else score
    names = score_names(model)
    if score in REFERENCE_SCORES and score not in names:
        why = (f"its reference predates {score} (an older anomaly-flow trained it)"
               if model.has_reference else
               "this model has none (it was trained without a validation set, or by an "
               "older anomaly-flow)")
        raise CalibrationError(
            f"score {score!r} needs the model's normal reference, and {why}; retrain it "
            f"with train.val_fraction > 0, or choose one of {', '.join(names)}.")
    if score not in names and score != AUTO_SCORE:
        raise CalibrationError(
            f"unknown score {score!r} for this model; choose one of {', '.join(names)}, or "
            f"{AUTO_SCORE} (with labelled anomalies)."
        )
    return score


def _check_score_name(score: str | None) -> None:
    """Refuse a name no model gives before anything is counted, loaded or scored (whether
    this model gives it is checked once it is loaded, by :func:`resolve_score`)."""
    if score is not None and score != AUTO_SCORE and not is_score_name(score):
        raise CalibrationError(
            f"unknown score {score!r}; choose one of {SCORE_CHOICES}, or {AUTO_SCORE} (with "
            "labelled anomalies).")


def _check_auto(score: str | None, has_anomalous: bool) -> None:
    """``auto`` picks the score on labelled anomalies: refuse it without them."""
    if score == AUTO_SCORE and not has_anomalous:
        raise CalibrationError(
            "score 'auto' chooses the score with the highest AUROC on labelled anomalies, "
            f"and none were given; pass --anomalous DIR, or name a score ({SCORE_CHOICES})."
        )


def check_registered(loaded: tracking.LoadedModel) -> None:
    """A calibrated version is added to the model's registered name: there must be one."""
    if not loaded.name:
        raise CalibrationError(
            f"{loaded.uri} is not a registered model version, so there is no model to add "
            "the calibrated version to; pass --model models:/NAME@ALIAS, "
            "models:/NAME/VERSION or the runs:/ URI of a registered model (anomaly-flow "
            "train registers NAME@candidate)."
        )


def warn_replaced_calibration(loaded: tracking.LoadedModel, asked: str | None,
                              score: str) -> None:
    """Warn, before a calibration of ``loaded`` on ``score`` is registered, that the new
    version replaces the calibration the model already carries (``asked``: the score the
    user named, None for the default, which may differ from the earlier one's)."""
    if (earlier := loaded.calibration) is not None:
        keep = (f"; pass --score {earlier.score_name} to keep its score"
                if asked is None and earlier.score_name != score else "")
        logger.warning("%s already carries a calibration (%s, %s threshold %.6g); the new "
                       "version replaces it with one on %s%s", loaded.uri, earlier.score_name,
                       earlier.threshold.method, earlier.threshold.value,
                       "the score with the best AUROC on the anomalous folder"
                       if score == AUTO_SCORE else score, keep)


def _check_method(method: str, target_fpr: float | None, has_anomalous: bool) -> None:
    """Reject inconsistent options before any image is scored."""
    if method not in METHODS:
        raise CalibrationError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if method == "conformal" and target_fpr is None:
        raise CalibrationError(
            "the conformal method needs a target false-positive rate; pass --target-fpr "
            "(e.g. 0.01), or choose --method f1, youden or cost with an anomaly folder."
        )
    if method != "conformal" and target_fpr is not None:
        raise CalibrationError(
            f"--target-fpr only applies to the conformal method, not {method!r}; drop it, "
            "or use --method conformal."
        )
    if method != "conformal" and not has_anomalous:
        raise CalibrationError(
            f"method {method!r} chooses the threshold from labelled anomalies; pass "
            "--anomalous DIR, or use --method conformal with --target-fpr."
        )


def precheck_calibration(normal: str | Path, anomalous: str | Path | None, *,
                         score: str | None, method: str = "conformal",
                         target_fpr: float | None = None) -> None:
    """Everything about a calibration that can be refused before a model is loaded (or
    trained): the score's name, the method's options, the normal folder's size for the
    conformal threshold, and folders that share files.

    Raises:
        CalibrationError: What :func:`calibrate_model` would refuse, said the same way.
        DataError: A folder is missing or holds no image files.
    """
    _check_score_name(score)
    _check_auto(score, anomalous is not None)
    _check_method(method, target_fpr, anomalous is not None)
    if method == "conformal":
        _precheck_size(Path(normal), target_fpr)  # type: ignore[arg-type]
    if anomalous is not None:  # lists both: a missing or empty folder fails here
        check_separate_folders(normal, anomalous)


def _precheck_size(folder: Path, target_fpr: float) -> None:
    """Refuse early, before scoring, when the folder cannot hold enough images."""
    needed = min_calibration_size(target_fpr)
    n_files = len(find_images(folder))
    if n_files < needed:
        raise CalibrationError(
            f"{conformal_need(target_fpr)}; the folder {display_path(folder)} holds only "
            f"{n_files}. Add more normal images to the calibration folder or raise "
            "--target-fpr."
        )


def precheck_score_of_training(score: str | None, config: RunConfig) -> None:
    """Refuse, before training, a score the model ``config`` trains will not give: a level
    past its levels, or a reference score without a validation split to fit it on.

    Raises:
        CalibrationError: ``score`` is not among that model's scores.
    """
    if score is None or score == AUTO_SCORE:
        return
    reference = list(REFERENCE_SCORES) if config.train.val_fraction > 0 else []
    given = [*LIKELIHOOD_SCORES, *reference, *level_columns(config.model.levels)]
    if score not in given:
        raise CalibrationError(
            f"the model this configuration trains ({config.model.levels} levels, "
            f"val_fraction {config.train.val_fraction:g}) will not give the score {score!r}; "
            f"choose one of {', '.join(given)}")


def precheck_held_out(train: str | Path, calibration: str | Path, target_fpr: float, *,
                      test_normal: str | Path | None = None,
                      test_anomalous: str | Path | None = None,
                      mode: ImageMode | None = None, size: int | None = None) -> None:
    """Before training on ``train``: refuse a ``calibration`` folder that will not hold
    enough held-out images once its images of the training folder (same content, as
    :func:`leave_out_training_images` finds them after training) are left out, and a
    ``test_normal`` folder that would hold none. Warn of ``test_anomalous`` images with
    the content of a training or calibration image: normal there, anomalous in the test.

    With the model's ``mode`` and ``size``, the held-out calibration images are also
    decoded, as scoring will, until enough of them do: files that cannot be decoded are
    left out of a calibration, and found only then they would cost the whole training.

    Raises:
        CalibrationError: Too few calibration images are held out of training (and, with
            ``mode`` and ``size``, decode), or no normal test image is held out.
        DataError: A folder is missing or holds no image files.
    """
    def digests(folder: Path) -> tuple[list[Path], list[str]]:
        paths = find_images(folder)
        return paths, fingerprint_and_digests(paths, folder)[1]

    def readable(found: list[str]) -> set[str]:
        return {d for d in found if not is_unreadable(d)}

    train, calibration = Path(train), Path(calibration)
    seen = readable(digests(train)[1])
    paths, calibrating = digests(calibration)
    n_shared = sum(d in seen for d in calibrating)
    held_out = len(paths) - n_shared
    needed = min_calibration_size(target_fpr)
    if n_shared and held_out < needed:
        raise CalibrationError(
            f"{n_shared} of the {len(paths)} images in {display_path(calibration)} are also "
            f"in the training folder {display_path(train)} (same content), which leaves "
            f"{held_out} held-out images: {conformal_need(target_fpr)}; calibrate on "
            "normal images kept out of the training folder."
        )
    if mode is not None and size is not None:
        held = [path for path, d in zip(paths, calibrating, strict=True) if d not in seen]
        _precheck_decodable(calibration, held, len(paths), target_fpr, mode, size)
    if test_normal is not None:
        test_normal = Path(test_normal)
        paths, testing = digests(test_normal)
        if all(d in seen for d in testing):
            raise CalibrationError(
                f"all {len(paths)} images in {display_path(test_normal)} are also in the "
                f"training folder {display_path(train)} (same content), and evaluation "
                "needs normal test images the model never saw; pass a folder of normal "
                "images kept out of the training folder.")
    if test_anomalous is not None:
        test_anomalous = Path(test_anomalous)
        normal = seen | readable(calibrating)
        paths, testing = digests(test_anomalous)
        both = [path for path, d in zip(paths, testing, strict=True) if d in normal]
        if both:
            logger.warning(
                "%d image(s) of %s have the same content as an image of the training folder "
                "%s or the calibration folder %s (e.g. %s): normal there and anomalous in "
                "the test, they count on both sides; check the labels", len(both),
                display_path(test_anomalous), display_path(train), display_path(calibration),
                display_path(both[0]))


def _precheck_decodable(folder: Path, held_out: list[Path], n_files: int, target_fpr: float,
                        mode: ImageMode, size: int) -> None:
    """Refuse, as :func:`calibrate_scores` would after scoring, a calibration folder whose
    ``held_out`` images (of its ``n_files``) hold too few that decode for ``target_fpr``.
    Decodes until enough do, so a usable folder costs at most 1/α decodes."""
    needed = min_calibration_size(target_fpr)
    usable, failed = 0, []
    for path in held_out:
        if usable >= needed:
            return
        array, reason = try_load_image(path, mode, size)
        if array is None:
            failed.append((path, reason))
        else:
            usable += 1
    if usable >= needed:
        return
    shared = n_files - len(held_out)
    why = [f"{shared} are also in the training folder"] if shared else []
    if failed:
        path, reason = failed[0]
        why.append(f"{len(failed)} cannot be decoded, e.g. {one_line(display_path(path))}: "
                   f"{reason}")
    raise CalibrationError(
        f"{conformal_need(target_fpr)}; only {usable} of the {n_files} files in "
        f"{display_path(folder)} can be used ({'; '.join(why)}). Add or fix held-out normal "
        "images, or raise --target-fpr.")


def check_separate_folders(normal: str | Path, anomalous: str | Path) -> None:
    """Refuse a normal and an anomalous folder that share image files.

    Both are searched recursively (symlinked folders followed), so a shared file would
    be labelled both ways and every metric and labelled threshold would be wrong: the
    folders must not be one folder, lie inside each other, or reach one file (through a
    symlink, say).

    Raises:
        CalibrationError: The folders share files.
        DataError: A folder is missing or holds no image files.
    """
    _check_folder_paths(normal, anomalous)
    if shared := _shared_files(normal, anomalous):
        raise CalibrationError(
            f"{len(shared)} image file(s) are in both the anomalous folder "
            f"{display_path(anomalous)} and the normal folder {display_path(normal)} (e.g. "
            f"{display_path(shared[0][0])} is {display_path(shared[0][1])}, through a "
            "symlink), so they would count as both; pass folders that share no files")


def check_held_out_of_calibration(calibration: str | Path, test_normal: str | Path) -> None:
    """Refuse a normal test folder that shares image files with the calibration folder:
    measured on the images it was fitted to, a threshold's false-positive rate is the
    one it was fitted for, not an estimate of the rate on new images.

    Raises:
        CalibrationError: The folders are one folder, lie inside each other, or share files.
        DataError: A folder is missing or holds no image files.
    """
    if _shared_files(calibration, test_normal):  # one folder, nested, or linked
        raise CalibrationError(
            f"the normal test folder {display_path(test_normal)} shares images with the "
            f"calibration folder {display_path(calibration)}, so the false-positive rate "
            "measured at the threshold would be the one it was fitted to; test on normal "
            "images kept out of both training and calibration")


def _shared_files(first: str | Path, second: str | Path) -> list[tuple[Path, Path]]:
    """``(path under second, path under first)`` of every image file both folders reach
    (the same folder, one inside the other, or a symlink), by real path."""
    files = {os.path.realpath(path): path for path in find_images(Path(first))}
    return [(path, files[os.path.realpath(path)]) for path in find_images(Path(second))
            if os.path.realpath(path) in files]


def _check_folder_paths(normal: str | Path, anomalous: str | Path) -> None:
    """Refuse two folders that are one folder or lie inside each other."""
    a, b = Path(os.path.realpath(normal)), Path(os.path.realpath(anomalous))
    if a == b:
        raise CalibrationError(
            f"the normal and the anomalous folder are the same folder ({display_path(a)}); "
            "its images cannot be both: pass the anomalies in a folder of their own")
    for inner, outer, inner_side, outer_side in ((b, a, "anomalous", "normal"),
                                                 (a, b, "normal", "anomalous")):
        if inner.is_relative_to(outer):
            raise CalibrationError(
                f"the {inner_side} folder {display_path(inner)} is inside the {outer_side} "
                f"folder {display_path(outer)}, which is searched recursively, so its images "
                f"would count as {outer_side} too; pass two folders that do not contain "
                "each other")


def warn_labelled_both(normal: FolderScores, anomalous: FolderScores) -> None:
    """Warn about anomalous images with the same content as a normal one (by digest)."""
    if len(normal.digests) != normal.n_files or len(anomalous.digests) != anomalous.n_files:
        return
    # images only: files that could not be read (two empty files, say) carry no label
    normal_paths = {digest: path for digest, path, error in zip(
        normal.digests, normal.table["path"], normal.table["error"], strict=True)
        if error == ""}
    both = [(path, normal_paths[digest]) for digest, path, error in zip(
        anomalous.digests, anomalous.table["path"], anomalous.table["error"], strict=True)
        if error == "" and digest in normal_paths]
    if both:
        logger.warning(
            "%d image(s) of %s have the same content as an image of %s (e.g. %s and %s): "
            "they are labelled both anomalous and normal, and count on both sides; check "
            "the labels", len(both), display_path(anomalous.folder),
            display_path(normal.folder), both[0][0], both[0][1])


def warn_copies(normal: FolderScores) -> None:
    """Warn when the usable calibration images are largely copies of each other (by
    digest): the threshold counts each copy as an image of its own."""
    if len(normal.digests) != normal.n_files:
        return
    used = [digest for digest, error in zip(normal.digests, normal.table["error"], strict=True)
            if error == ""]
    copies = notable_copies(used)
    folder = display_path(normal.folder)
    if copies and copies == len(used) - 1:
        logger.warning("all %d normal images of %s have the same content: the threshold "
                       "rests on that one image; calibrate on varied held-out normal images",
                       len(used), folder)
    elif copies:
        logger.warning("%d of the %d normal images of %s repeat another's content: the "
                       "threshold counts each copy as an image, so it rests on fewer distinct "
                       "images than it says; remove the copies, unless new images repeat as "
                       "often", copies, len(used), folder)


def reused_calibration_images(values: np.ndarray, calibration_scores: np.ndarray) -> int:
    """How many of ``values`` (a normal folder's scores) equal a calibration score, when
    they are more than a tenth of them; 0 otherwise.

    Scoring is deterministic, so an image that was calibrated on scores exactly as it did
    then. But most scores (``bpd``, ``knn``, the levels, ...) are float32 numbers, which
    two different images share by chance: float32 values spread as a bpd is (sd 0.3 near
    3.5) match about 2 times in 3,000 against 3,000, 24 times in 10,000 against 10,000.
    Such stray matches are not the calibration images, and too few to move a
    false-positive rate, so a match counts only as a share.
    """
    reused = int(np.isin(values, calibration_scores).sum())
    return reused if 10 * reused > values.size else 0


def warn_held_out(normal: FolderScores, anomalous: FolderScores | None) -> None:
    """What a threshold fitted on these folders should be warned of: anomalous images with
    the content of a normal one, and normal images largely copies of each other."""
    if anomalous is not None:
        warn_labelled_both(normal, anomalous)
    warn_copies(normal)


def _failures_dict(
    normal: FolderScores, anomalous: FolderScores | None, score: str
) -> dict[str, list[tuple[str, str]]]:
    out = {"normal": normal.failures(score)}
    if anomalous is not None:
        out["anomalous"] = anomalous.failures(score)
    return out


def _log_failures(run: tracking.Run, failures: Mapping[str, Sequence[tuple[str, str]]]) -> None:
    """Store every left-out file with its reason as ``failed_images.json`` in ``run``.

    :func:`score_folder_table` already named the first ten of each folder in its
    warning; this one names no file, and is logged only when some were not shown there,
    to say where the full list is.
    """
    if any(failures.values()):
        run.log_dict(
            {kind: [{"path": p, "reason": r} for p, r in rows] for kind, rows in failures.items()},
            "failed_images.json",
        )
    if any(len(rows) > _MAX_REASONS_LOGGED for rows in failures.values()):
        counts = ", ".join(f"{len(rows)} {kind}" for kind, rows in failures.items() if rows)
        logger.warning("all image files left out (%s), with their reasons, are listed in "
                       "failed_images.json in the artifacts of run %s", counts, run.run_id)


def select_folder_score(normal: FolderScores, anomalous: FolderScores,
                        model: Glow) -> ScoreSelection:
    """:func:`~anomaly_flow.calibration.select_score` among ``model``'s scores, over the
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


TRAINED_ON = "an image of the model's training folder"
"""Start of the ``error`` of a row left out by :func:`leave_out_training_images`."""


def leave_out_training_images(loaded: tracking.LoadedModel, scores: FolderScores,
                              purpose: str) -> FolderScores:
    """``scores`` with each image of the model's training folder left out for ``purpose``.

    An image counts when its content digest is among those the model's training run
    recorded for its training folder: the training split, and the validation split too,
    since the normal reference behind ``typicality``, ``knn``, ``pixel_knn`` and
    ``ensemble`` was fitted on it (a validation image is its own nearest neighbour
    there). Left-out rows keep their scores and get the reason in ``error`` (starting
    with :data:`TRAINED_ON`), so they are listed with the other failures; a warning says
    how many. Rows that already failed keep their own reason. Where the training run
    recorded no digests (trained before they were recorded, or not by this package)
    nothing can be checked, and a warning says so; ``scores`` built by hand without
    digests are used as they are.

    Raises:
        CalibrationError: Every usable image of the folder is one of the training folder.
    """
    folder = display_path(scores.folder)
    if len(scores.digests) != scores.n_files:
        logger.info("no content digests for the images of %s, so %s cannot check that they "
                    "were held out of training", folder, purpose)
        return scores
    if tracking.configured_uri() is None:  # a model folder, and no store to look it up in
        logger.warning("there is no MLflow store to read the training run of %s from (none "
                       "at --mlruns or MLFLOW_TRACKING_URI), so %s cannot check that the "
                       "images of %s were held out of training; make sure they were, or "
                       "point --mlruns at the store the model was trained in",
                       loaded.uri, purpose, folder)
        return scores
    run_id = _training_run(loaded)
    trained_on = None if run_id is None else tracking.training_image_digests(run_id)
    if trained_on is None:
        logger.warning("%s has no record of the images it was trained on, so %s cannot check "
                       "that the images of %s were held out of training; make sure they were",
                       loaded.uri, purpose, folder)
        return scores
    usable = (scores.table["error"] == "").to_numpy()
    seen = usable & np.fromiter((d in trained_on for d in scores.digests), dtype=bool,
                                count=scores.n_files)
    if not seen.any():
        return scores
    if not (usable & ~seen).any():
        counted = (f"all {scores.n_files} images" if usable.all()
                   else f"all {int(seen.sum())} usable images (of {scores.n_files} files)")
        raise CalibrationError(
            f"{counted} in {folder} are images of the folder {loaded.uri} was trained on "
            f"(run {run_id}), and {purpose} needs held-out normal images the model never "
            "saw; pass a folder of normal images that were kept out of training."
        )
    table = scores.table.copy()
    table.loc[seen, "error"] = (f"{TRAINED_ON} (same content as one recorded by training run "
                                f"{run_id}); {purpose} uses held-out images only")
    logger.warning("%d of the %d images in %s are images of the folder %s was trained on "
                   "(same content); %s leaves them out and uses the other %d",
                   int(seen.sum()), scores.n_files, folder, loaded.uri, purpose,
                   int((usable & ~seen).sum()))
    return FolderScores(scores.folder, table, scores.fingerprint, scores.digests)


def n_trained_on(scores: FolderScores) -> int:
    """How many rows :func:`leave_out_training_images` left out."""
    return int(scores.table["error"].str.startswith(TRAINED_ON).sum())


def _training_run(loaded: tracking.LoadedModel) -> str | None:
    """The run that trained ``loaded``'s weights. A registered version names it; a local
    copy of a model folder knows only the run that logged it, which for a calibrated
    model is the calibration run, tagged with its own training run."""
    run_id = loaded.training_run_id
    if run_id is not None and "training_run_id" not in loaded.tags:
        run_id = tracking.training_run_of(run_id)
    return run_id


def _tags(loaded: tracking.LoadedModel, normal: FolderScores,
          anomalous: FolderScores | None) -> dict[str, str]:
    uri = str(loaded.uri)
    tags = {
        # a model folder by its absolute path: the run is read from anywhere
        "model_uri": display_path(Path(uri).resolve()) if Path(uri).is_dir() else uri,
        "normal_folder": display_path(normal.folder.resolve()),
        "normal_fingerprint": normal.fingerprint,
    }
    if training_run := _training_run(loaded):
        tags["training_run_id"] = training_run
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
            images it was trained on, for :func:`leave_out_training_images`).

    Returns:
        A :class:`anomaly_flow.tracking.LoadedModel`.
    """
    tracking.require_store(model_uri, mlruns)  # before configure() creates an empty one
    if logs or not tracking.is_local_model_uri(model_uri) \
            or (reads_runs and tracking.missing_default_store(mlruns) is None):
        tracking.configure(mlruns)
    loaded = tracking.load_model(model_uri, device=device)
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
            ``anomalous``): the one with the highest AUROC on the labelled images, ties
            going to the first in :func:`~anomaly_flow.scoring.score_names` order.
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
    _check_auto(score, anomalous is not None)
    _check_method(method, target_fpr, anomalous is not None)
    if anomalous is not None:
        _check_folder_paths(normal.folder, anomalous.folder)
    normal = leave_out_training_images(loaded, normal, "calibration")
    warn_held_out(normal, anomalous)
    selection = None
    if score == AUTO_SCORE:
        selection = select_folder_score(normal, anomalous,  # type: ignore[arg-type]
                                        loaded.model)
        score = selection.chosen
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
    calibration = calibrate(
        score, normal_values, method=method, alpha=target_fpr,
        anomalous_scores=anomalous_values, cost_fp=cost_fp, cost_fn=cost_fn,
        score_selection=selection,
    )
    threshold = calibration.threshold
    metrics: dict[str, float] = {
        "threshold": threshold.value,
        "fpr": threshold.fpr,
        "n_calibration": threshold.n_calibration,
        "n_anomalous": threshold.n_anomalous,
        "n_failed_normal": len(failures["normal"]),
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
    params: dict[str, Any] = {
        "model_uri": loaded.uri, "score": score, "method": method,
        "target_fpr": target_fpr, "normal_folder": display_path(normal.folder),
        "anomalous_folder": None if anomalous is None else display_path(anomalous.folder),
    }
    if method == "cost":
        params.update(cost_fp=cost_fp, cost_fn=cost_fn)
    tags = _tags(loaded, normal, anomalous)
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
                loaded, calibration, run, promote=promote
            )
            run.set_tags({"calibrated_model_uri": str(model_uri)})
        run_id = run.run_id
    logger.info("calibrated %s on %s: threshold %.6g (%s), new version %s", loaded.uri, score,
                threshold.value, method, model_uri)
    return CalibrateOutcome(
        run_id=run_id, model_uri=str(model_uri), version=version, calibration=calibration,
        metrics=metrics, failures=failures, promoted=promote, previous_champion=previous,
    )


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
        line += (f"; precision {threshold.precision:.4g}, recall {threshold.recall:.4g}, "
                 f"F1 {threshold.f1:.4g} on {threshold.n_anomalous} anomalies")
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
                         target_fpr=target_fpr)
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
    _check_folder_paths(normal.folder, anomalous.folder)
    warn_labelled_both(normal, anomalous)
    normal = leave_out_training_images(loaded, normal, "evaluation")
    names = score_names(loaded.model)
    table = detection_table(normal, anomalous, names)
    metrics: dict[str, float] = {}
    for name, row in table.iterrows():
        for column in ("auroc", "aupr", "fpr_at_95_tpr"):
            metrics[f"{name}_{column}"] = float(row[column])
    failures = _failures_dict(normal, anomalous, "bpd")
    metrics["n_normal"] = float(normal.n_files - len(failures["normal"]))
    metrics["n_anomalous"] = float(anomalous.n_files - len(failures["anomalous"]))
    metrics["n_failed_normal"] = len(failures["normal"])
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
                            tags=_tags(loaded, normal, anomalous)) as run:
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
