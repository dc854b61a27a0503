"""The checks made before a model is calibrated or evaluated, and the warnings about the
images it is calibrated or evaluated on.

A threshold's false-positive rate, and the metrics of an evaluation, mean what they say
only on images the model never saw, each labelled one way and counted once. The mistakes
that break this raise no error of their own: a calibration folder that holds training
images, a normal and an anomalous folder that share files, a normal test folder that holds
the calibration images, or copies of one image still give numbers, and the numbers are
wrong. So each mistake is refused as soon as it can be told, while refusing costs little:
options and folders before a model is loaded (or, in ``pipelines/end_to_end.py``, before
one is trained for hours), a score the model does not give or a model with no registered
name before the folders are scored (minutes, on large ones). What shows only once the
images are read, the model's own training images above all, is left out then, with a
warning that says how many; what cannot be told for sure (images labelled both ways,
copies, normal test images that score as the calibration images did, a calibration the
new version replaces) is warned of, for the user to judge.

:mod:`anomaly_flow.evaluation` makes these checks at those points. This module fits no
threshold and logs no run, and never imports that one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from anomaly_flow import tracking
from anomaly_flow.calibration import (
    METHODS,
    conformal_need,
    min_calibration_size,
)
from anomaly_flow.calibration_checks import CalibrationError
from anomaly_flow.config import RunConfig
from anomaly_flow.data import ImageMode, display_path, try_load_image
from anomaly_flow.errors import one_line
from anomaly_flow.fingerprint import fingerprint_and_digests, is_unreadable, notable_copies
from anomaly_flow.folder_scoring import FolderScores
from anomaly_flow.folders import find_images
from anomaly_flow.glow import Glow
from anomaly_flow.score_kinds import (
    AUTO_SCORE,
    LIKELIHOOD_SCORES,
    REFERENCE_SCORES,
    SCORE_CHOICES,
    is_score_name,
)
from anomaly_flow.scoring import default_score, level_columns, score_names

logger = logging.getLogger(__name__)

__all__ = [
    "TRAINED_ON",
    "check_auto",
    "check_folder_paths",
    "check_held_out_of_calibration",
    "check_labelled_both",
    "check_method",
    "check_registered",
    "check_separate_folders",
    "leave_out_training_images",
    "n_trained_on",
    "precheck_calibration",
    "precheck_held_out",
    "precheck_score_of_training",
    "resolve_score",
    "reused_calibration_images",
    "trained_by",
    "warn_copies",
    "warn_held_out",
    "warn_replaced_calibration",
]


# -------------------------------------------------------- options, scores and the model


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


def check_auto(score: str | None, has_anomalous: bool) -> None:
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


def check_method(method: str, target_fpr: float | None, has_anomalous: bool) -> None:
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
                         target_fpr: float | None = None, rate_optional: bool = False
                         ) -> None:
    """Everything about a calibration that can be refused before a model is loaded (or
    trained): the score's name, the method's options, the normal folder's size for the
    conformal threshold (``rate_optional``: the threshold only adds a row to a comparison
    of the labelled methods, as the refusal then says), and folders that share files.

    Raises:
        CalibrationError: What :func:`~anomaly_flow.evaluation.calibrate_model` would
            refuse, said the same way.
        DataError: A folder is missing or holds no image files.
    """
    _check_score_name(score)
    check_auto(score, anomalous is not None)
    check_method(method, target_fpr, anomalous is not None)
    if method == "conformal":
        _precheck_size(Path(normal), target_fpr, rate_optional)  # type: ignore[arg-type]
    if anomalous is not None:  # lists both: a missing or empty folder fails here
        check_separate_folders(normal, anomalous)


def _precheck_size(folder: Path, target_fpr: float, rate_optional: bool = False) -> None:
    """Refuse early, before scoring, when the folder cannot hold enough images."""
    needed = min_calibration_size(target_fpr)
    n_files = len(find_images(folder))
    if n_files < needed:
        raise CalibrationError(
            f"{conformal_need(target_fpr)}; the folder {display_path(folder)} holds only "
            f"{n_files}. Add more normal images to the calibration folder or raise "
            "--target-fpr." + (" Or drop --target-fpr: here it only adds the conformal row "
                               "to the comparison of the labelled methods."
                               if rate_optional else "")
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


# ----------------------------------------------------------------- held out of training


def precheck_held_out(train: str | Path, calibration: str | Path, target_fpr: float, *,
                      test_normal: str | Path | None = None,
                      test_anomalous: str | Path | None = None,
                      mode: ImageMode | None = None, size: int | None = None) -> None:
    """Before training on ``train``: refuse a ``calibration`` folder that will not hold
    enough held-out images once its images of the training folder (same content, as
    :func:`leave_out_training_images` finds them after training) are left out, and a
    ``test_normal`` folder that would hold none, or that is more than a tenth copies of
    calibration images (a few are warned of). Warn of ``test_anomalous`` images with the
    content of a training or calibration image: normal there, anomalous in the test.

    With the model's ``mode`` and ``size``, the held-out calibration images are also
    decoded, as scoring will, until enough of them do: files that cannot be decoded are
    left out of a calibration, and found only then they would cost the whole training.

    Raises:
        CalibrationError: Too few calibration images are held out of training (and, with
            ``mode`` and ``size``, decode), or no normal test image is held out of
            training, or too few of calibration.
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
        _check_test_not_calibration(calibration, readable(calibrating), test_normal,
                                    paths, testing)
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
    """Refuse, as :func:`~anomaly_flow.evaluation.calibrate_scores` would after scoring, a
    calibration folder whose ``held_out`` images (of its ``n_files``) hold too few that
    decode for ``target_fpr``. Decodes until enough do, so a usable folder costs at most
    1/α decodes."""
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


# ------------------------------------------------------------- folders that share files


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
    check_folder_paths(normal, anomalous)
    if shared := _shared_files(normal, anomalous):
        raise CalibrationError(
            f"{len(shared)} image file(s) are in both the anomalous folder "
            f"{display_path(anomalous)} and the normal folder {display_path(normal)} (e.g. "
            f"{display_path(shared[0][0])} is {display_path(shared[0][1])}, through a "
            "symlink), so they would count as both; pass folders that share no files")


def check_held_out_of_calibration(calibration: str | Path, test_normal: str | Path) -> None:
    """Refuse a normal test folder that shares image files with the calibration folder:
    measured on the images it was fitted to, a threshold's false-positive rate is the
    one it was fitted for, not an estimate of the rate on new images. (Copies by content
    are :func:`precheck_held_out`'s, which reads both folders' digests anyway.)

    Raises:
        CalibrationError: The folders are one folder, lie inside each other, or share files.
        DataError: A folder is missing or holds no image files.
    """
    if _shared_files(calibration, test_normal):  # one folder, nested, or linked
        raise CalibrationError(
            f"the normal test folder {display_path(test_normal)} shares images with the "
            f"calibration folder {display_path(calibration)}, {_TEST_ADVICE}")


_TEST_ADVICE = ("so the false-positive rate measured at the threshold would be the one it "
                "was fitted to; test on normal images kept out of both training and "
                "calibration")


def _check_test_not_calibration(calibration: Path, fitted: set[str], test_normal: Path,
                                paths: list[Path], testing: list[str]) -> None:
    """Refuse a normal test folder (``paths``, their digests ``testing``) more than a
    tenth of whose images are copies of calibration images (readable digests ``fitted``),
    as :func:`check_held_out_of_calibration` refuses shared files; fewer copies (a data
    set's stray duplicates) are warned of."""
    copies = [path for path, digest in zip(paths, testing, strict=True) if digest in fitted]
    if 10 * len(copies) > len(paths):
        raise CalibrationError(
            f"{len(copies)} of the {len(paths)} images in the normal test folder "
            f"{display_path(test_normal)} have the same content as images of the "
            f"calibration folder {display_path(calibration)} (e.g. "
            f"{display_path(copies[0])}), {_TEST_ADVICE}")
    if copies:
        logger.warning("%d of the %d images in the normal test folder %s have the same "
                       "content as images of the calibration folder %s (e.g. %s); they "
                       "count in the test's false-positive rate as new images", len(copies),
                       len(paths), display_path(test_normal), display_path(calibration),
                       display_path(copies[0]))


def _shared_files(first: str | Path, second: str | Path) -> list[tuple[Path, Path]]:
    """``(path under second, path under first)`` of every image file both folders reach
    (the same folder, one inside the other, or a symlink), by real path."""
    files = {os.path.realpath(path): path for path in find_images(Path(first))}
    return [(path, files[os.path.realpath(path)]) for path in find_images(Path(second))
            if os.path.realpath(path) in files]


def check_folder_paths(normal: str | Path, anomalous: str | Path) -> None:
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


# ---------------------------------------------------------------------- the images used


def check_labelled_both(normal: FolderScores, anomalous: FolderScores) -> None:
    """Warn about anomalous images with the same content as a normal one (by digest), and
    refuse a pair where every readable anomalous image is such a copy: a copy of the
    normal folder, which the refusal of the same folder by path does not catch.

    Raises:
        CalibrationError: Every readable anomalous image has a normal image's content.
    """
    if len(normal.digests) != normal.n_files or len(anomalous.digests) != anomalous.n_files:
        return
    # images only: files that could not be read (two empty files, say) carry no label
    normal_paths = {digest: path for digest, path, error in zip(
        normal.digests, normal.table["path"], normal.table["error"], strict=True)
        if error == ""}
    both = [(path, normal_paths[digest]) for digest, path, error in zip(
        anomalous.digests, anomalous.table["path"], anomalous.table["error"], strict=True)
        if error == "" and digest in normal_paths]
    if both and len(both) == int((anomalous.table["error"] == "").sum()):
        raise CalibrationError(
            f"every readable image of {display_path(anomalous.folder)} ({len(both)}) has the "
            f"same content as an image of {display_path(normal.folder)} (e.g. {both[0][0]} "
            f"and {both[0][1]}): the two folders hold the same images, so there is nothing "
            "to tell apart; pass held-out normal images as --normal and anomalous ones as "
            "--anomalous")
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
    the content of a normal one (refused when all are: :func:`check_labelled_both`), and
    normal images largely copies of each other."""
    if anomalous is not None:
        check_labelled_both(normal, anomalous)
    warn_copies(normal)


# ---------------------------------------------------------- the model's training images


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
    run_id = trained_by(loaded)
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
    counted = (f"{scores.n_files} images" if usable.all() else
               f"{int(usable.sum())} usable images (of {scores.n_files} files)")
    logger.warning("%d of the %s in %s are images of the folder %s was trained on (same "
                   "content); %s leaves them out and uses the other %d", int(seen.sum()),
                   counted, folder, loaded.uri, purpose, int((usable & ~seen).sum()))
    return FolderScores(scores.folder, table, scores.fingerprint, scores.digests)


def n_trained_on(scores: FolderScores) -> int:
    """How many rows :func:`leave_out_training_images` left out."""
    return int(scores.table["error"].str.startswith(TRAINED_ON).sum())


def trained_by(loaded: tracking.LoadedModel) -> str | None:
    """The run that trained ``loaded``'s weights. A registered version names it; a local
    copy of a model folder knows only the run that logged it, which for a calibrated
    model is the calibration run, tagged with its own training run."""
    run_id = loaded.training_run_id
    if run_id is not None and "training_run_id" not in loaded.tags:
        run_id = tracking.training_run_of(run_id)
    return run_id
