"""Tests for :mod:`anomaly_flow.folder_scores`: scoring real folders with broken files
among the images, and the one warning that names them."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from anomaly_flow.data import DataError, write_image_folder
from anomaly_flow.folder_scores import score_folder_table
from tests.conftest import corrupt_png
from tests.test_scoring import make_tiny_model, sample_images


def test_score_folder_table_reports_and_leaves_out_broken_files(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "normal"
    write_image_folder(sample_images(6), folder, "ok-")
    corrupt_png(folder / "broken.png")
    (folder / "empty.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.folder_scores"):
        scores = score_folder_table(make_tiny_model(), folder, batch_size=4)

    assert scores.n_files == 8
    assert list(scores.table.columns) == ["path", "bpd", "complexity", "coarse_complexity",
                                          "typicality", "knn", "pixel_knn", "ensemble",
                                          "level_1", "level_2", "error"]
    assert scores.values("bpd").shape == (6,) and np.isfinite(scores.values("bpd")).all()
    failed = dict(scores.failures("bpd"))
    assert sorted(Path(p).name for p in failed) == ["broken.png", "empty.png"]
    assert all(reason for reason in failed.values())
    assert len(scores.fingerprint) == 64
    # One warning for the folder, naming each failed file once, with its reason.
    [record] = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert message.startswith("2 of 8 image files in ")
    for path, reason in failed.items():
        assert message.count(Path(path).name) == 1
        assert f"{path}: {reason}" in message
    assert "more" not in message


def test_a_failed_file_name_cannot_forge_a_log_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A name with a line break is shown escaped: one line a file, no forged message."""
    folder = tmp_path / "normal"
    write_image_folder(sample_images(2), folder, "ok-")
    (folder / "x.png\nERROR anomaly_flow: all good.png").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.folder_scores"):
        score_folder_table(make_tiny_model(), folder, batch_size=4)
    [record] = caplog.records
    lines = record.getMessage().splitlines()
    assert len(lines) == 2 and not lines[1].lstrip().startswith("ERROR")
    assert lines[1].endswith("x.png\\nERROR anomaly_flow: all good.png: cannot identify image "
                             "file (not an image or unsupported format)")


def test_score_folder_table_names_ten_failed_files_and_counts_the_rest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "normal"
    write_image_folder(sample_images(2), folder, "ok-")
    for i in range(13):
        corrupt_png(folder / f"broken-{i:02d}.png")
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.folder_scores"):
        score_folder_table(make_tiny_model(), folder, batch_size=4)
    [record] = caplog.records
    message = record.getMessage()
    counts = [message.count(f"broken-{i:02d}.png") for i in range(13)]
    assert max(counts) == 1 and sum(counts) == 10
    assert message.count("... and 3 more") == 1


def test_missing_folder_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        score_folder_table(make_tiny_model(), tmp_path / "nowhere")
