"""Tests for :mod:`anomaly_flow.prechecks`: folders that share files, refused before a
model is opened, and the share of normal images that counts as calibration images.
The checks as the commands and pipelines meet them are tested in ``test_evaluation.py``,
``test_cli_calibrate.py`` and ``test_pipelines.py``."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from anomaly_flow.calibration_checks import CalibrationError
from anomaly_flow.data import write_image_folder
from anomaly_flow.evaluation import calibrate_model, evaluate_model
from anomaly_flow.prechecks import (
    check_held_out_of_calibration,
    check_separate_folders,
    precheck_held_out,
    reused_calibration_images,
)
from tests.test_scoring import sample_images

# ------------------------------------------------------------- folders that share files


def test_normal_and_anomalous_folders_must_not_contain_each_other(tmp_path: Path) -> None:
    test = tmp_path / "test"
    write_image_folder(sample_images(12), test / "normal", "n-")
    write_image_folder(sample_images(4, offset=12), test / "anomalous", "a-")
    (tmp_path / "link").symlink_to(test)
    for normal, anomalous, message in [
        (test, test / "anomalous", r"the anomalous folder .*test/anomalous is inside the "
                                   r"normal folder .*test, which is searched recursively, so "
                                   r"its images would count as normal too"),
        (test / "normal", test, "the normal folder .* is inside the anomalous folder"),
        (test, tmp_path / "link", r"are the same folder \(.*test\); its images cannot be "
                                  r"both"),
    ]:
        # refused before the model is opened (the URI does not exist)
        with pytest.raises(CalibrationError, match=message):
            calibrate_model("models:/does-not-exist@candidate", normal, anomalous=anomalous,
                            method="f1")
        with pytest.raises(CalibrationError, match=message):
            evaluate_model("models:/does-not-exist@candidate", normal, anomalous)
    check_separate_folders(test / "normal", test / "anomalous")  # siblings are fine
    (test / "normal" / "more").symlink_to(test / "anomalous")  # reaches the anomalies too
    with pytest.raises(CalibrationError, match=r"4 image file\(s\) are in both the anomalous "
                       r"folder .*anomalous and the normal folder .*normal \(e\.g\. "
                       r".*anomalous/a-00000\.png is .*normal/more/a-00000\.png"):
        evaluate_model("models:/does-not-exist@candidate", test / "normal", test / "anomalous")


# ---------------------------------------------------------------------- the images used


def test_only_a_share_of_normal_images_scoring_as_calibration_images_is_reuse() -> None:
    """Two float32 scores of different images are equal by chance (about 24 times in
    10,000 against 10,000 spread as a bpd is): such stray matches warned that the normal
    images were "almost surely" the calibration images. The calibration folder itself,
    or one holding it, still counts."""
    rng = np.random.default_rng(0)
    calibration = np.sort(rng.normal(3.5, 0.3, 10_000).astype(np.float32).astype(np.float64))
    fresh = rng.normal(3.5, 0.3, 10_000).astype(np.float32).astype(np.float64)
    assert np.isin(fresh, calibration).sum() > 5  # the chance matches are there
    assert reused_calibration_images(fresh, calibration) == 0
    assert reused_calibration_images(calibration[::-1], calibration) == 10_000
    holding = np.concatenate([calibration[:2_000], fresh[:8_000]])
    assert reused_calibration_images(holding, calibration) >= 2_000


def test_a_normal_test_folder_of_calibration_copies_is_refused_a_few_are_said(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Copies by content, not by path: more than a tenth of the test folder refuses (its
    false-positive rate would be the one the threshold was fitted to), fewer (a data
    set's stray duplicates) are warned of."""
    write_image_folder(sample_images(20), tmp_path / "cal", "c-")
    write_image_folder(sample_images(19, offset=100), tmp_path / "test", "t-")
    write_image_folder(sample_images(10, offset=200), tmp_path / "train", "x-")
    shutil.copy(tmp_path / "cal" / "c-00003.png", tmp_path / "test" / "copy.png")

    def check() -> None:  # before a pipeline trains, with the training-folder checks
        check_held_out_of_calibration(tmp_path / "cal", tmp_path / "test")  # no shared file
        precheck_held_out(tmp_path / "train", tmp_path / "cal", 0.1,
                          test_normal=tmp_path / "test")

    with caplog.at_level(logging.WARNING, logger="anomaly_flow.prechecks"):
        check()
    assert caplog.messages == [
        f"1 of the 20 images in the normal test folder {tmp_path / 'test'} have the same "
        f"content as images of the calibration folder {tmp_path / 'cal'} (e.g. "
        f"{tmp_path / 'test' / 'copy.png'}); they count in the test's false-positive rate "
        "as new images"]
    for i in range(4, 6):
        shutil.copy(tmp_path / "cal" / f"c-{i:05d}.png", tmp_path / "test" / f"copy{i}.png")
    with pytest.raises(CalibrationError, match=r"^3 of the 22 images in the normal test "
                                               r"folder .* calibration folder"):
        check()
