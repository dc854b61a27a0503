"""Tests for :mod:`anomaly_flow.folder_scoring`: a folder's scores in memory, with broken
files among the images and the one warning that names them; the folder run on real image
files, its table (one row per file, atomic writes, the partial table kept on a stop),
resuming it (the uninterrupted table again, or a refusal), and the heatmap folder beside
it.

The numbers in the table are :mod:`anomaly_flow.scoring`'s, tested in
``tests/test_scoring.py``, whose tiny model, messy folder and helpers these tests share.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import os
import re
import shutil
import socket
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import ExifTags, Image, ImageOps

from anomaly_flow import score_table, scoring
from anomaly_flow.calibration import CalibrationError, calibrate
from anomaly_flow.data import DataError, load_image, write_image_folder
from anomaly_flow.folder_scoring import score_folder, score_folder_table
from anomaly_flow.glow import Glow, preprocess
from anomaly_flow.heatmap import colormap_table, in_source_shape, render_heatmap
from anomaly_flow.score_table import ScoringError, read_table, write_table
from anomaly_flow.scoring import output_columns, score_names
from tests.conftest import corrupt_png, ended_process_id
from tests.test_scoring import (
    MESSY,
    N_BAD,
    N_GOOD,
    TINY,
    ULPS,
    make_tiny_model,
    read_csv,
    relative,
    sample_images,
)

# --------------------------------------------------------------------------- in memory

def test_score_folder_table_reports_and_leaves_out_broken_files(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "normal"
    write_image_folder(sample_images(6), folder, "ok-")
    corrupt_png(folder / "broken.png")
    (folder / "empty.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.folder_scoring"):
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
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.folder_scoring"):
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
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.folder_scoring"):
        score_folder_table(make_tiny_model(), folder, batch_size=4)
    [record] = caplog.records
    message = record.getMessage()
    counts = [message.count(f"broken-{i:02d}.png") for i in range(13)]
    assert max(counts) == 1 and sum(counts) == 10
    assert message.count("... and 3 more") == 1


def test_missing_folder_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        score_folder_table(make_tiny_model(), tmp_path / "nowhere")


# --------------------------------------------------------------------------- every file

def test_every_file_gets_a_row_with_scores_or_a_reason(model: Glow, messy: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    summary = score_folder(model, None, messy, out, batch_size=4)
    assert (summary.n_files, summary.n_scored, summary.n_failed) == (len(MESSY), N_GOOD, N_BAD)
    assert summary.n_anomalous is None and summary.out == out
    assert sorted(os.listdir(tmp_path)) == ["scores.csv"]  # the temp file was renamed away

    table = read_csv(out)
    assert list(table.columns) == output_columns(model)
    names = relative(table, messy)
    assert names == sorted(names, key=lambda n: os.fsencode(n.replace("\\xff", "\udcff")))
    assert set(names) == {n.replace("\udcff", "\\xff") for n in MESSY}
    for name, row in zip(names, table.itertuples(index=False), strict=True):
        expected = MESSY[name.replace("\\xff", "\udcff")]
        if expected is None:
            assert row.error == "", name
            assert np.isfinite([row.bpd, row.complexity, row.coarse_complexity, row.level_1,
                                row.level_2]).all(), name
            assert row.score == row.bpd
            assert row.bpd == pytest.approx(TINY.n_bits + row.level_1 + row.level_2, abs=1e-5)
        else:
            assert row.error == expected, name
            assert np.isnan([row.bpd, row.complexity, row.coarse_complexity, row.level_1,
                             row.level_2, row.score]).all()
        assert np.isnan(row.p_value) and np.isnan(row.is_anomaly)  # uncalibrated


def test_scoring_says_when_images_lose_their_range_in_the_conversion(
        model: Glow, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Float TIFFs in 0..1 and 12-bit data in 16-bit PNGs are scored (near) black, without
    an error: the run says so, as training does, and only of the files it scores."""
    folder = tmp_path / "camera"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):
        Image.fromarray(rng.random((16, 16), dtype=np.float32), mode="F").save(
            folder / f"unit-{i}.tiff")
        Image.fromarray(rng.integers(0, 4096, (16, 16), dtype=np.uint16)).save(
            folder / f"twelve-{i}.png")
    out = tmp_path / "scores.csv"
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.folder_scoring"):
        summary = score_folder(model, None, folder, out)
    assert (summary.n_scored, summary.n_failed) == (4, 0)
    notes = [r.getMessage() for r in caplog.records]
    assert any("2 of 2 floating-point images looked at hold values in 0..1" in n
               for n in notes), notes
    assert any("2 of 2 16- or 32-bit integer grey images looked at use only values below "
               "4096" in n
               for n in notes), notes
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.folder_scoring"):
        score_folder(model, None, folder, out, resume=True)  # nothing left to score
    assert not [r for r in caplog.records if "images looked at" in r.getMessage()]


def test_two_files_printing_as_one_name_are_refused(model: Glow, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    image = Image.fromarray(sample_images(1)[0, 0])
    image.save(os.fsdecode(bytes(folder) + b"/lat\xe9.png"), format="PNG")  # Latin-1 name
    image.save(folder / "lat\\xe9.png")  # its printed form, as a real name
    with pytest.raises(ScoringError, match=r"two files under .*images print as the same "
                                           r"name, .*lat\\xe9\.png .* rename one"):
        score_folder(model, None, folder, tmp_path / "scores.csv")
    assert not (tmp_path / "scores.csv").exists()


# --------------------------------------------------------------------------- outputs


def test_output_problems_are_found_before_scoring(model: Glow, messy: Path,
                                                  tmp_path: Path) -> None:
    (tmp_path / "file.csv").write_text("a file, not a folder")
    cases = {
        tmp_path / "scores.xlsx": "use a file name ending in .csv, .parquet",
        tmp_path / "file.csv" / "out.csv": "file.csv is not a folder",
        tmp_path / "missing" / "out.csv": "does not exist; create it",
        tmp_path / "dir.csv": "it is a folder",
    }
    (tmp_path / "dir.csv").mkdir()
    for out, message in cases.items():
        with pytest.raises(ScoringError, match=message) as info:
            score_folder(model, None, messy, out)
        assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="image folder not found"):
        score_folder(model, None, tmp_path / "nowhere", tmp_path / "out.csv")
    with pytest.raises(ScoringError, match="no calibration"):
        score_folder(model, None, messy, tmp_path / "out.csv", fdr=0.1)
    calibration = calibrate("bpd", np.linspace(3.0, 4.0, 99), alpha=0.1)
    for fdr in (0, -0.1, 1.5, "0.05"):  # 0 and -0.1 were refused as "alpha (the target
        # false-positive rate)", a name the caller never gave
        with pytest.raises(ScoringError, match=r"the false discovery rate \(fdr, --fdr\) "
                                               r"must be a number strictly between 0 and 1"):
            score_folder(model, calibration, messy, tmp_path / "out.csv", fdr=fdr)
    # a calibration of other weights (another training's): refused before any file is read
    other = dataclasses.replace(calibration, model_digest="0" * 64)
    with pytest.raises(CalibrationError, match=(
            r"^this calibration was fitted to the scores of another model \(its digest "
            rf"000000000000\.\.\., this model's {model.digest()[:12]}\.\.\.; a digest covers "
            r"the config and the weights\), so its threshold and p-values do not hold for "
            r"this one; score with the "
            r"calibration loaded with this model \(load_model\(URI\)\.calibration\), or "
            r"calibrate this model \(anomaly-flow calibrate\)$")):
        score_folder(model, other, messy, tmp_path / "out.csv")
    assert sorted(os.listdir(tmp_path)) == ["dir.csv", "file.csv"]


def test_an_output_with_a_name_of_255_bytes_is_written(model: Glow, tmp_path: Path) -> None:
    """The table's temporary file takes a cut of its name: the longest name a file system
    takes for the table itself still works, and so does resuming it."""
    folder = tmp_path / "images"
    write_image_folder(sample_images(3), folder, "x-")
    out = tmp_path / ("é" * 125 + "t.csv")  # 255 bytes in UTF-8
    assert len(os.fsencode(out.name)) == 255
    score_folder(model, None, folder, out)
    summary = score_folder(model, None, folder, out, resume=True)
    assert len(read_csv(out)) == 3 and summary.n_scored == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["images", out.name])


def test_an_output_link_is_written_through_and_a_replaced_table_is_named(
        model: Glow, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "images"
    write_image_folder(sample_images(2), folder, "x-")
    (tmp_path / "shared").mkdir()
    target, link = tmp_path / "shared" / "real.csv", tmp_path / "link.csv"
    target.write_text("path,bpd,error\n")  # an earlier table, with no rows
    link.symlink_to(target)
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, folder, link)
    assert link.is_symlink() and summary.out == target
    assert len(read_csv(link)) == 2
    assert f"replacing the earlier output {target} (resuming, --resume, would keep its rows)" \
        in caplog.text


@pytest.mark.parametrize("resume", [False, True], ids=["replace", "resume"])
def test_a_table_saved_under_the_other_format_s_name_is_named_as_such(
        model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path,
        resume: bool) -> None:
    """A Parquet table renamed .csv (or a CSV one renamed .parquet) is neither called
    "not a scores table" nor read as damaged text: the message says what it is, and it
    is left as it was."""
    fake_csv, fake_parquet = tmp_path / "fake.csv", tmp_path / "fake.parquet"
    write_table(full_table, tmp_path / "real.parquet")
    (tmp_path / "real.parquet").rename(fake_csv)
    write_table(full_table, tmp_path / "real.csv")
    (tmp_path / "real.csv").rename(fake_parquet)
    before = fake_csv.read_bytes(), fake_parquet.read_bytes()
    with pytest.raises(ScoringError) as refused:
        score_folder(model, None, messy, fake_csv, resume=resume)
    assert str(refused.value) == (f"{fake_csv} is a Parquet file, not CSV as its name says; "
                                  "name the output .parquet (or move that file away)")
    with pytest.raises(ScoringError) as refused:
        score_folder(model, None, messy, fake_parquet, resume=resume)
    assert str(refused.value) == (f"{fake_parquet} is a CSV file, not Parquet as its name "
                                  "says; name the output .csv (or move that file away)")
    assert (fake_csv.read_bytes(), fake_parquet.read_bytes()) == before


def test_partial_table_is_flushed_during_the_run(model: Glow, messy: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "scores.csv"
    sizes: list[int] = []
    real_write = score_table.write_table

    def spy(table: pd.DataFrame, path: Path) -> None:
        sizes.append(len(table))
        real_write(table, path)

    monkeypatch.setattr(score_table, "write_table", spy)
    score_folder(model, None, messy, out, batch_size=5, flush_every_s=0)
    assert sizes == [5, 10, 15, len(MESSY), len(MESSY)]  # after each batch, then the final


REAL_LAUNCH = scoring._launch


def before_launch(monkeypatch: pytest.MonkeyPatch, number: int,
                  action: Callable[[], object]) -> None:
    """Run ``action`` just before the ``number``-th batch goes to the model (a call of
    ``scoring._launch``), as something outside the run would at that moment; a second
    call replaces the first's hook."""
    launches = 0
    real_launch = REAL_LAUNCH

    def launch(*args: object, **kwargs: object) -> object:
        nonlocal launches
        launches += 1
        if launches == number:
            action()
        return real_launch(*args, **kwargs)

    monkeypatch.setattr(scoring, "_launch", launch)


def test_rows_the_output_folder_refuses_are_kept_elsewhere(
        model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The output's folder is gone when the table is written (a full disk alike): the
    scored rows go to the temporary-files folder, and the error says where."""
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "scores.csv"
    spare_folder = tmp_path / "spare"
    spare_folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spare_folder))
    lost: list[int] = []

    def lose_the_folder() -> None:
        lost.append(time.time_ns())
        shutil.rmtree(out.parent)

    before_launch(monkeypatch, 2, lose_the_folder)
    with pytest.raises(score_table.OutputWriteError) as info:
        score_folder(model, None, messy, out, batch_size=5, flush_every_s=float("inf"))
    (spare,) = spare_folder.iterdir()
    assert str(info.value).startswith(f"cannot write the output {out}: No such file")
    assert f"its {len(MESSY)} rows are kept in {spare}: once there is room, move that " \
        f"file to {out} and run again with resume" in str(info.value)
    pd.testing.assert_frame_equal(read_csv(spare), full_table, check_exact=True)
    # dated as the table would be: the run's start, for a --resume after moving it back
    assert spare.stat().st_mtime_ns < lost[0]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))  # no place at all
    before_launch(monkeypatch, 2, lose_the_folder)
    out.parent.mkdir()
    with pytest.raises(score_table.OutputWriteError, match=f"; {len(MESSY)} rows are lost"):
        score_folder(model, None, messy, out, batch_size=5, flush_every_s=float("inf"))


# --------------------------------------------------------------------------- stops and resuming


def stop_at_launch(monkeypatch: pytest.MonkeyPatch, n: int,
                   stop: type[BaseException]) -> Callable[..., Any]:
    """Make scoring's ``n``-th batch launch raise ``stop`` (Ctrl-C, an error no one
    expected); returns the real launch, to put back."""
    launches = 0
    real_launch = scoring._launch

    def launch_then_stop(*args: object, **kwargs: object) -> object:
        nonlocal launches
        launches += 1
        if launches == n:
            raise stop
        return real_launch(*args, **kwargs)

    monkeypatch.setattr(scoring, "_launch", launch_then_stop)
    return real_launch


@pytest.mark.parametrize("stop", [KeyboardInterrupt, MemoryError])
def test_an_interrupted_run_writes_what_it_has(model: Glow, messy: Path,
                                               full_table: pd.DataFrame, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture,
                                               stop: type[BaseException]) -> None:
    """Ctrl-C (or SIGTERM, through the CLI), or an error no one expected (out of memory
    on the device), mid-run: the rows scored so far are kept for --resume."""
    real_launch = stop_at_launch(monkeypatch, 4, stop)
    out = tmp_path / "scores.csv"
    with pytest.raises(stop), caplog.at_level(logging.WARNING):
        score_folder(model, None, messy, out, batch_size=3, flush_every_s=float("inf"))
    said = "interrupted" if stop is KeyboardInterrupt else "stopped by an error"
    # after Ctrl-C the command's own line says what to do next; after an error, this one
    advice = "" if stop is KeyboardInterrupt else "; once the error is dealt with, run again"
    assert f"{said}: 6 of {len(MESSY)} files are in {out}{advice}" in caplog.text
    assert ("run again" in caplog.text) == (stop is not KeyboardInterrupt)
    partial = read_csv(out)
    assert len(partial) == 6  # batches 1 and 2 finished; batch 3 was still on the device
    assert partial["path"].tolist() == full_table["path"].head(6).tolist()
    monkeypatch.setattr(scoring, "_launch", real_launch)
    summary = score_folder(model, None, messy, out, batch_size=5, resume=True)
    assert summary.n_resumed == 6
    pd.testing.assert_frame_equal(read_csv(out), full_table, check_exact=True)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_resume_after_a_killed_run_gives_the_uninterrupted_table(
    model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path, suffix: str
) -> None:
    out = tmp_path / f"scores{suffix}"
    k = 7
    # the killed run's heatmaps (a kept file without one is scored again to draw it)
    score_folder(model, None, messy, tmp_path / "whole.csv", heatmaps=tmp_path / "heat")
    partial = full_table.head(k).copy()  # what a run killed after k files leaves
    partial["is_anomaly"] = partial["is_anomaly"].astype("boolean")
    assert partial.loc[0, "error"] == ""
    partial.loc[0, "bpd"] = np.nan  # neither a score nor a reason: to be scored again
    write_table(partial, out)
    # and, killed outright, its unfinished copies of the table and a heatmap
    ended, alive = ended_process_id(), os.getpid()
    (tmp_path / "heat" / "sub").mkdir(parents=True, exist_ok=True)
    leftovers = [tmp_path / f".{out.name}.{ended}.0badf00d.tmp",
                 tmp_path / "heat" / "sub" / f".hm.{ended}.12345678.tmp"]
    running = tmp_path / f".{out.name}.{alive}.0badf00d.tmp"  # a live writer's: kept
    for path in [*leftovers, running]:
        path.write_bytes(b"cut short")
    summary = score_folder(model, None, messy, out, batch_size=4, resume=True,
                           heatmaps=tmp_path / "heat")
    assert not any(path.exists() for path in leftovers) and running.exists()
    assert summary.n_resumed == k - 1 and summary.n_files == len(MESSY)
    # only the missing files were scored: heatmaps drawn for those alone
    n_good_missing = int((full_table["error"].iloc[k:] == "").sum()) + 1
    assert summary.n_heatmaps == n_good_missing
    resumed = read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert not resumed["path"].duplicated().any()
    pd.testing.assert_frame_equal(
        resumed.astype({"is_anomaly": float, "path": str, "error": str}),
        full_table.astype({"is_anomaly": float, "path": str, "error": str}),
        check_exact=True,
    )
    # resuming a finished table scores nothing and changes nothing
    again = score_folder(model, None, messy, out, resume=True)
    assert again.n_resumed == len(MESSY)


def test_running_out_of_memory_on_a_resumed_run_says_to_resume_again(
        model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first batch of a resumed run does not fit: nothing new is written, but the
    output still holds the rows kept from before, and the advice says so."""
    calls = []
    forward = Glow.forward

    def out_of_memory(self: Glow, x: torch.Tensor) -> Any:
        calls.append(len(x))
        if len(calls) == 1:  # the resume's check rescores a few kept files first: they fit
            return forward(self, x)
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                           "allocate 123456789 bytes. Error code 12 (Cannot allocate memory)")

    out = tmp_path / "scores.csv"
    write_table(full_table.head(10), out)
    monkeypatch.setattr(Glow, "forward", out_of_memory)
    with pytest.raises(ScoringError, match=(
            r"^scoring ran out of memory on cpu \(an allocation of 117\.7 MiB failed\) with "
            rf"batch_size = 256 \(--batch-size\), \d+ images a forward pass here; lower it, "
            rf"e\.g\. to \d+; 10 of {len(full_table)} files are in {re.escape(str(out))}: run "
            r"again with resume \(--resume\) to score the rest$")):
        score_folder(model, None, messy, out, resume=True)
    pd.testing.assert_frame_equal(read_csv(out), full_table.head(10), check_exact=True)
    # the check of the kept rows, which rescores a few of them first, does not fit either
    calls.append(0)
    with pytest.raises(ScoringError, match=(
            rf"^checking that {re.escape(str(out))} was scored by this model ran out of "
            r"memory on cpu \(an allocation of 117\.7 MiB failed\) on 4 of its files; free "
            r"memory, or score on a device with more$")):
        score_folder(model, None, messy, out, resume=True)


def test_a_file_changed_while_the_run_goes_on_is_read_again_on_resume(
        model: Glow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its row holds the old content's score, written after the change: the table's
    time is that of the run's start, so --resume sees the file as newer."""
    folder, out = tmp_path / "images", tmp_path / "scores.csv"
    write_image_folder(sample_images(12), folder, "x-")
    def change_a_read_file() -> None:
        write_image_folder(sample_images(1, offset=50), folder, "x-00001-new")
        os.replace(folder / "x-00001-new00000.png", folder / "x-00001.png")

    before_launch(monkeypatch, 3, change_a_read_file)  # x-00001 was read in the first batch
    stale = read_csv(score_folder(model, None, folder, out, batch_size=3).out)
    monkeypatch.setattr(scoring, "_launch", REAL_LAUNCH)
    summary = score_folder(model, None, folder, out, batch_size=3, resume=True)
    assert summary.n_resumed == 11  # all but the changed file
    fresh = score_folder(model, None, folder, tmp_path / "fresh.csv", batch_size=3)
    pd.testing.assert_frame_equal(read_csv(out), read_csv(fresh.out), check_exact=True)
    assert not stale.equals(read_csv(out))


def test_resume_scores_again_the_files_changed_since_the_table(
        model: Glow, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder, out = tmp_path / "images", tmp_path / "s.csv"
    write_image_folder(sample_images(8), folder, "x-")
    score_folder(model, None, folder, out)
    # a file replaced by another image (not one of the rows a resume scores again first)
    replacement = sample_images(1, offset=20)
    Image.fromarray(replacement[0, 0]).save(folder / "x-00002.png")
    fresh = score_folder(model, None, folder, tmp_path / "fresh.csv")
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, folder, out, resume=True)
    assert summary.n_resumed == 7
    assert re.search(r"1 file\(s\) changed since .*s\.csv was written \(e\.g\. .*x-00002\.png\)"
                     r"; scoring them again", caplog.text)
    assert read_csv(out)["bpd"].equals(read_csv(tmp_path / "fresh.csv")["bpd"])
    assert fresh.n_files == 8


def test_a_kept_file_unreadable_now_is_scored_again(model: Glow, tmp_path: Path) -> None:
    folder, out = tmp_path / "images", tmp_path / "scores.csv"
    write_image_folder(sample_images(3), folder, "x-")
    first = score_folder(model, None, folder, out)
    (folder / "x-00000.png").write_bytes(b"overwritten")  # changed since: read again
    write_image_folder(sample_images(1, offset=3), folder, "y-")
    summary = score_folder(model, None, folder, out, resume=True)
    assert (first.n_files, summary.n_resumed, summary.n_files) == (3, 2, 4)
    assert summary.n_failed == 1


def test_resume_scores_again_a_row_with_both_scores_and_an_error(
        model: Glow, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder, out = tmp_path / "images", tmp_path / "s.csv"
    write_image_folder(sample_images(3), folder, "x-")
    score_folder(model, None, folder, out)
    table = read_csv(out)
    clean = table.copy()
    table.loc[1, "error"] = "a note added by hand"
    write_table(table, out)
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, folder, out, resume=True)
    assert "1 row(s) with both scores and an error" in caplog.text
    assert summary.n_resumed == 2 and summary.n_failed == 0
    assert read_csv(out)["bpd"].equals(clean["bpd"])


def test_resume_scores_again_a_last_row_cut_short(model: Glow, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A table cut mid-row (a copy or an edit, not our writes, which are atomic): the rows
    before the cut stand, the cut one is scored again, wherever in the row the cut fell
    (in a number, which would read as another number, or in a quoted path holding a line
    end, which the CSV parser would refuse)."""
    folder, out = tmp_path / "images", tmp_path / "s.csv"
    write_image_folder(sample_images(3), folder, "x-")
    Image.fromarray(sample_images(1, offset=3)[0, 0]).save(folder / 'z "odd"\nname.png')
    score_folder(model, None, folder, out)
    whole = out.read_bytes()
    last = whole.rindex(b"\n", 0, whole.index(b'z ""odd""')) + 1  # the last row's start
    assert whole[last:].startswith(b'"') and whole.count(b"\n", last) == 2  # it sorts last
    in_the_path = last + whole[last:].index(b"\n") + 1  # past the line end in the name
    in_a_number = whole.rindex(b".", 0, len(whole) - 3) + 3  # two digits of a decimal
    for cut in (in_the_path, in_a_number, len(whole) - 1):
        out.write_bytes(whole[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            summary = score_folder(model, None, folder, out, resume=True)
        assert f"ends in a row cut short ({cut - last} bytes after its last complete line)" \
            in caplog.text
        assert (summary.n_resumed, summary.n_files) == (3, 4)
        assert out.read_bytes() == whole


@pytest.mark.parametrize(("suffix", "dropped", "named"), [
    (".csv", ["coarse_complexity"], "coarse_complexity column"),
    (".parquet", ["coarse_complexity"], "coarse_complexity column"),
    (".csv", ["typicality"], "typicality column"),
    (".parquet", ["coarse_complexity", "typicality"], "coarse_complexity or typicality columns"),
    (".csv", ["knn"], "knn column"),
    (".parquet", ["knn", "ensemble"], "knn or ensemble columns"),
    (".csv", ["pixel_knn"], "pixel_knn column"),
])
def test_resume_from_a_table_without_a_later_score_rescores_its_files(
        model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path, suffix: str,
        dropped: list[str], named: str, caplog: pytest.LogCaptureFixture) -> None:
    """A table written before a later score (:data:`LATER_SCORES`) existed: resuming
    scores its files again to fill the columns, keeps its failed rows, and finishes the
    whole table."""
    out = tmp_path / f"scores{suffix}"
    k = 7
    older = full_table.head(k).drop(columns=dropped)
    older["is_anomaly"] = older["is_anomaly"].astype("boolean")
    n_failed = int((older["error"] != "").sum())
    assert 0 < n_failed < k
    write_table(older, out)
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.score_table"):
        summary = score_folder(model, None, messy, out, batch_size=4, resume=True,
                               heatmaps=tmp_path / "heat")
    assert summary.n_resumed == n_failed and summary.n_files == len(MESSY)
    assert summary.n_heatmaps == N_GOOD  # every file with scores was scored by this run
    [message] = [r.getMessage() for r in caplog.records if "has no" in r.getMessage()]
    assert f"has no {named} (it was written by an older anomaly-flow, or by a model without " \
           f"that score); scoring its {k - n_failed} scored file(s) again" in message
    resumed = read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert list(resumed.columns) == output_columns(model)
    pd.testing.assert_frame_equal(
        resumed.astype({"is_anomaly": float, "path": str, "error": str}),
        full_table.astype({"is_anomaly": float, "path": str, "error": str}),
        check_exact=True,
    )


def test_two_runs_cannot_write_one_output_at_once(model: Glow, messy: Path,
                                                 tmp_path: Path) -> None:
    """Two runs given the same output each replaced the other's table, and one's rows were
    lost while both said they wrote them: the second is refused while the first holds the
    output's lock, which goes with the run. A lock file a killed run left holds nothing."""
    from anomaly_flow.score_table import output_lock

    out = tmp_path / "scores.csv"
    lock = tmp_path / ".scores.csv.lock"
    with output_lock(out):  # another run, busy
        assert lock.read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
        with pytest.raises(ScoringError, match=rf"another scoring run \(pid {os.getpid()} on "
                                               r".*\) is writing .*scores\.csv; wait for it "
                                               r"to end, or choose another output path"):
            score_folder(model, None, messy, out)
        assert not out.exists()
    assert not lock.exists()
    lock.write_text("pid 1 on elsewhere")  # what a killed run leaves: a file, no lock
    summary = score_folder(model, None, messy, out)
    assert summary.n_files == len(MESSY) and not lock.exists()
    # two runs with their own tables and one heatmap folder: one's heatmaps were lost
    heat = tmp_path / "heat"
    with output_lock(heat):
        assert (tmp_path / ".heat.lock").is_file()
        with pytest.raises(ScoringError, match=rf"^another scoring run \(pid {os.getpid()} on "
                                               r".*\) is writing .*heat; wait for it to end, "
                                               r"or choose another heatmap folder "
                                               r"\(--heatmaps\)$"):
            score_folder(model, None, messy, tmp_path / "other.csv", heatmaps=heat)
        assert not heat.exists() and not (tmp_path / "other.csv").exists()
    score_folder(model, None, messy, tmp_path / "other.csv", heatmaps=heat)
    assert not (tmp_path / ".heat.lock").exists() and not (tmp_path / ".other.csv.lock").exists()
    # the same folder by a symlink, or in a folder not made yet, takes the same lock
    (tmp_path / "link").symlink_to(heat)
    for given, held in ((tmp_path / "link", heat), (tmp_path / "new" / "hm", None)):
        with output_lock(held or given), pytest.raises(
                ScoringError, match=r"is writing .*; wait for it to end, or choose another "
                                    r"heatmap folder"):
            score_folder(model, None, messy, tmp_path / "third.csv", heatmaps=given)
    assert not (tmp_path / "third.csv").exists()


def test_a_heatmap_folder_and_a_table_of_long_like_names_lock_apart(
        model: Glow, tmp_path: Path) -> None:
    """Lock names are cut short to fit a file name; two cut alike each keep their own."""
    folder = tmp_path / "images"
    write_image_folder(sample_images(2), folder, "x-")
    out, heat = tmp_path / ("A" * 230 + "-scores.csv"), tmp_path / ("A" * 230 + "-heat.csv")
    summary = score_folder(model, None, folder, out, heatmaps=heat)
    assert summary.n_heatmaps == 2
    assert sorted(os.listdir(tmp_path)) == sorted(["images", out.name, heat.name])


def test_a_heatmap_folder_that_is_the_output_is_refused(model: Glow, tmp_path: Path) -> None:
    out = tmp_path / "same.csv"
    with pytest.raises(ScoringError, match=rf"^the heatmap folder and the output are one "
                                           rf"path, {re.escape(str(out))}; give the heatmaps "
                                           r"a folder of their own \(--heatmaps DIR\)$"):
        score_folder(model, None, tmp_path, out, heatmaps=tmp_path / "same.csv")
    assert os.listdir(tmp_path) == []


def test_resume_refuses_an_output_it_cannot_use(model: Glow, messy: Path, full_table: pd.DataFrame,
                                                tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(ScoringError, match=r"cannot read the earlier output .*garbage\.parquet"):
        score_folder(model, None, messy, garbage, resume=True)
    cut = tmp_path / "cut.parquet"  # a table cut short: unreadable, so not replaced either
    full_table.to_parquet(cut)
    cut.write_bytes(cut.read_bytes()[:300])
    with pytest.raises(ScoringError, match=r"cut\.parquet exists and is not a scores table "
                                           r"\(it cannot be read as Parquet: .*magic bytes.*\); "
                                           r"only an earlier output is replaced"):
        score_folder(model, None, messy, cut)
    assert cut.stat().st_size == 300
    other = tmp_path / "other.csv"
    full_table[["path", "bpd"]].to_csv(other, index=False)
    with pytest.raises(ScoringError, match=r"lacks column\(s\) \['complexity'"):
        score_folder(model, None, messy, other, resume=True)
    unrelated = tmp_path / "unrelated.csv"
    unrelated.write_text("name,price\nwidget,3\n")
    with pytest.raises(ScoringError, match=r"unrelated\.csv is not a scores table \(no path "
                                           r"or bpd column; its columns are \['name', "
                                           r"'price'\]\); choose another output path, "
                                           r"or move that file away"):
        score_folder(model, None, messy, unrelated, resume=True)
    with pytest.raises(ScoringError, match="is not a scores table"):  # not replaced either
        score_folder(model, None, messy, unrelated)
    deeper = tmp_path / "deeper.csv"
    full_table.assign(level_3=1.0).to_csv(deeper, index=False)
    with pytest.raises(ScoringError,
                       match=r"score column\(s\) \[.level_3.\] this model does not give"):
        score_folder(model, None, messy, deeper, resume=True)
    # a column the user added (a label, a note) would be dropped by the rewrite
    noted = tmp_path / "noted.csv"
    full_table.assign(note="checked").to_csv(noted, index=False)
    before = noted.read_bytes()
    with pytest.raises(ScoringError, match=r"noted\.csv has column\(s\) \['note'\] that "
                                           r"scoring does not write, so resuming would drop"):
        score_folder(model, None, messy, noted, resume=True)
    assert noted.read_bytes() == before
    indexed = tmp_path / "indexed.csv"  # pandas' index written back: nothing of the user's
    full_table.to_csv(indexed)
    assert len(read_table(indexed, score_names(model))) == len(full_table)
    # a column added without a header is named "Unnamed: N" too, but holds values; an
    # empty one (a trailing separator) holds nothing to lose
    unnamed = tmp_path / "unnamed.csv"
    full_table.assign(**{"": "checked"}).to_csv(unnamed, index=False)
    with pytest.raises(ScoringError, match=r"has column\(s\) \['Unnamed: \d+'\] that scoring"):
        read_table(unnamed, score_names(model))
    full_table.assign(**{"": None}).to_csv(unnamed, index=False)
    assert len(read_table(unnamed, score_names(model))) == len(full_table)
    with pytest.raises(ScoringError, match="lacks column"):
        read_table(other, score_names(model))
    # damaged text: Parquet stores strings unchecked, and pandas reads them lazily, so
    # the bad byte would surface later, in a traceback, as the rows are matched to files
    import pyarrow as pa
    import pyarrow.parquet as pq

    not_utf8 = tmp_path / "not-utf8.parquet"
    arrow = pa.Table.from_pandas(full_table, preserve_index=False)
    paths = pa.array([p.encode("utf-8", "surrogateescape") + b"\x80"
                      for p in full_table["path"]], pa.binary()).view(pa.string())
    pq.write_table(arrow.set_column(0, "path", paths), not_utf8)
    with pytest.raises(ScoringError, match=r"cannot read the earlier output .*not-utf8\.parquet"):
        score_folder(model, None, messy, not_utf8, resume=True)


def test_resume_refuses_a_table_another_model_or_folder_made(
    model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path,
    caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "scores.csv"
    write_table(full_table.head(10), out)
    other = make_tiny_model()
    with torch.no_grad():  # a fine-tuned model: the same architecture, other weights
        other.levels[0].steps[0].actnorm.log_scale.add_(0.01)
    with pytest.raises(ScoringError, match=r"scores\.csv was scored by another model or "
                       r"precision, or its files changed since: .* has bpd .* there and .* "
                       r"now; resume only with the model and --precision"):
        score_folder(other, None, messy, out, resume=True)
    changed = full_table.head(10).copy()
    changed.loc[9, "bpd"] += 1e-3  # a file rewritten since it was scored
    write_table(changed, out)
    with pytest.raises(ScoringError, match="or its files changed since"):
        score_folder(model, None, messy, out, resume=True)
    assert read_csv(out)["bpd"].equals(changed["bpd"])  # a refusal writes nothing

    # a table of another folder: resuming would throw away every row
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(sample_images(1)[0, 0]).save(elsewhere / "a.png")
    write_table(full_table.head(10), out)
    with pytest.raises(ScoringError, match=r"none of the 10 rows of .*scores\.csv is a file "
                       r"under .*elsewhere \(its first row is .*messy.*/a_good\.png\), so "
                       r"resuming would drop them all"):
        score_folder(model, None, elsewhere, out, resume=True)
    # some rows of files gone: dropped, with a warning
    table = full_table.head(10).copy()
    table.loc[10] = table.loc[9].copy()
    table.loc[10, "path"] = str(messy / "gone.png")
    write_table(table, out)
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, messy, out, resume=True)
    assert summary.n_resumed == 10
    assert "dropping 1 row(s) of" in caplog.text and "no longer under" in caplog.text
    pd.testing.assert_frame_equal(read_csv(out), full_table, check_exact=True)
    # a row of a file with a hidden name (a table from before they were left out): it is
    # there, so not called gone
    table.loc[10, "path"] = str(messy / "._a_good.png")
    write_table(table, out)
    caplog.clear()
    (messy / "._a_good.png").write_bytes(b"\x00\x05\x16\x07")  # in the module's folder:
    try:  # taken away whatever happens
        with caplog.at_level(logging.WARNING):
            score_folder(model, None, messy, out, resume=True)
    finally:
        (messy / "._a_good.png").unlink()
    assert "no longer under" not in caplog.text
    assert "dropping 1 row(s) of" in caplog.text and "whose files have hidden names " \
        "(starting with '.'), which the folder search now leaves out" in caplog.text
    pd.testing.assert_frame_equal(read_csv(out), full_table, check_exact=True)


def test_resume_from_a_subfolder_keeps_the_tables_other_rows(model: Glow,
                                                             tmp_path: Path) -> None:
    folder, out = tmp_path / "images", tmp_path / "s.csv"
    write_image_folder(sample_images(2), folder / "a", "x-")
    write_image_folder(sample_images(2, offset=2), folder / "b", "y-")
    score_folder(model, None, folder, out)
    table = out.read_bytes()
    with pytest.raises(ScoringError, match=r"2 row\(s\) of .*s\.csv are files outside .*a that "
                                           r"still exist \(e\.g\. .*y-00000\.png\), so "
                                           "resuming would drop them; resume with the folder"):
        score_folder(model, None, folder / "a", out, resume=True)
    assert out.read_bytes() == table
    (folder / "b" / "y-00000.png").unlink()  # a file gone: its row goes, with a warning
    summary = score_folder(model, None, folder, out, resume=True)
    assert (summary.n_resumed, summary.n_files) == (3, 3)


def test_a_table_resumes_only_in_the_precision_that_scored_it(
        messy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # a table resumes only in the precision that scored it: bf16 numbers come within the
    # loose tolerance of float32's, so they are told apart by float32's own numbers (a
    # model whose coupling networks, zero at the start, give something for bf16 to round)
    rounded = make_tiny_model()
    with torch.no_grad():
        for parameter in rounded.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator()
                                              .manual_seed(parameter.numel())))
    exact, half = tmp_path / "exact.csv", tmp_path / "half.csv"
    score_folder(rounded, None, messy, exact)
    score_folder(rounded, None, messy, half, precision="bf16")
    exact_rows, half_rows = read_csv(exact), read_csv(half)
    ok = exact_rows["error"] == ""
    gap = np.abs(half_rows["bpd"][ok] / exact_rows["bpd"][ok] - 1)
    assert 1e-5 < gap.max() < 1e-3, gap.max()  # within the loose tolerance, not the tight
    resumed = tmp_path / "resumed.csv"
    write_table(exact_rows.head(10), resumed)
    with pytest.raises(ScoringError, match=r"resumed\.csv was scored in float32 \(its bpd "
                                           r"is float32's to 1e-5\), and this run is bf16: "
                                           r"the table would mix the two; resume with "
                                           r"--precision float32"):
        score_folder(rounded, None, messy, resumed, resume=True, precision="bf16")
    write_table(half_rows.head(10), resumed)  # bf16's rows, resumed in bf16
    score_folder(rounded, None, messy, resumed, resume=True, precision="bf16")
    pd.testing.assert_frame_equal(read_csv(resumed), half_rows)
    write_table(exact_rows.head(10), resumed)  # tf32 on a CPU is float32: the same numbers
    caplog.clear()
    scoring._SAID_ONCE.clear()
    with caplog.at_level(logging.WARNING):
        score_folder(rounded, None, messy, resumed, resume=True, precision="tf32")
        score_folder(rounded, None, messy, tmp_path / "again.csv", precision="tf32")
    pd.testing.assert_frame_equal(read_csv(resumed), exact_rows)
    assert caplog.text.count("precision tf32 changes nothing on CPU (TF32 is CUDA's): the "
                             "scores are float32's") == 1  # once a process, not a batch


# --------------------------------------------------------------------------- heatmaps


def upright(path: Path) -> tuple[int, int]:
    """The file's ``(width, height)`` after its EXIF orientation, as PIL decodes it."""
    with Image.open(path) as img:
        img.load()
        return ImageOps.exif_transpose(img).size


def test_heatmaps_for_every_scored_image(model: Glow, messy: Path, full_table: pd.DataFrame,
                                         tmp_path: Path) -> None:
    heat = tmp_path / "heat"
    summary = score_folder(model, None, messy, tmp_path / "s.csv", batch_size=4, heatmaps=heat)
    assert summary.n_heatmaps == N_GOOD and summary.heatmaps == heat
    heatmap_of = {n: str(Path(n).with_suffix(".png")) for n, r in MESSY.items() if r is None}
    heatmap_of.update({"sub/dup.png": "sub/dup.png.png", "sub/dup.jpg": "sub/dup.jpg.png"})
    assert len(list(heat.rglob("*.png"))) == N_GOOD
    bpd = dict(zip(relative(full_table, messy), full_table["bpd"], strict=True))
    for name, heatmap in heatmap_of.items():
        width, height = upright(messy / name)
        # 16 px, upsampled × 16 to 256, in the file's shape (its longer side 256)
        shape = ((256, round(256 * height / width)) if width >= height
                 else (round(256 * width / height), 256))
        with Image.open(heat / heatmap) as img:
            assert img.mode == "RGB" and img.size == shape, name
            # the map's mean is the image's bpd (float32 map, averaged in float64)
            stored = float(img.text["anomaly-flow:bpd"])
            assert stored == pytest.approx(bpd[name.replace("\udcff", "\\xff")], abs=1e-5)
            assert img.text["anomaly-flow:scale"] == "inferno 0..8 bits/dim (fixed)"


@pytest.mark.parametrize("score", ["typicality", "knn", "pixel_knn", "ensemble"])
def test_heatmaps_of_a_reference_calibration_show_the_typicality_terms(
        model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path, score: str) -> None:
    """Calibrated on typicality, knn, pixel_knn or ensemble: each heatmap draws the typicality terms
    |m - mu| / (sigma + floor), whose mean is the image's typicality, on the fixed 0..5
    standard-deviation scale."""
    scored = full_table[full_table["error"] == ""]
    cal = calibrate(score, scored[score].to_numpy(), alpha=0.25)
    heat = tmp_path / "heat"
    summary = score_folder(model, cal, messy, tmp_path / "s.csv", batch_size=4, heatmaps=heat)
    assert summary.n_heatmaps == N_GOOD
    typicality = dict(zip(relative(full_table, messy), full_table["typicality"], strict=True))
    for name, reason in MESSY.items():
        if reason is not None or name.startswith("sub/dup"):
            continue
        with Image.open(heat / Path(name).with_suffix(".png")) as img:
            assert "anomaly-flow:bpd" not in img.text
            stored = float(img.text["anomaly-flow:typicality"])
            assert stored == pytest.approx(typicality[name.replace("\udcff", "\\xff")],
                                           rel=1e-5)
            assert img.text["anomaly-flow:scale"] == \
                "inferno 0..5 normal standard deviations (fixed)"
            drawn = np.asarray(img.convert("RGB"))
        if score != "typicality":
            continue
        # the map itself, pixel by pixel: |m - mu| / (sigma + 0.1) of the image's per-pixel
        # bits/dim from the model's own breakdown, drawn as render_heatmap draws
        image = load_image(messy / name, TINY.mode, TINY.image_size)
        with torch.no_grad():
            pixel_bpd = model.breakdown(preprocess(torch.from_numpy(image)[None], 8)).pixel_bpd
        terms = ((pixel_bpd[0] - model.reference_mean) / (model.reference_std + 0.1)).abs()
        expected = in_source_shape(render_heatmap(image, terms.numpy(), vmin=0.0, vmax=5.0,
                                                  table=colormap_table("inferno")),
                                   TINY.image_size, upright(messy / name),
                                   "stretch")
        assert drawn.shape == expected.shape
        differ = np.abs(drawn.astype(int) - expected).max(axis=-1)
        assert differ.max() <= 8 and (differ == 0).mean() > 0.95  # float32 rounding only


def test_heatmap_kind_overrides_the_deciding_scores_map(
        model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path) -> None:
    scored = full_table[full_table["error"] == ""]
    cal = calibrate("ensemble", scored["ensemble"].to_numpy(), alpha=0.25)
    values = {"bpd": dict(zip(relative(full_table, messy), full_table["bpd"], strict=True)),
              "typicality": dict(zip(relative(full_table, messy), full_table["typicality"],
                                     strict=True))}
    name = next(n for n, reason in MESSY.items() if reason is None and n.isascii()
                and not n.startswith("sub/dup"))
    # per-pixel bits/dim although ensemble decides; typicality terms although uncalibrated
    for calibration, kind in ((cal, "bpd"), (None, "typicality")):
        heat = tmp_path / f"heat-{kind}"
        score_folder(model, calibration, messy, tmp_path / f"{kind}.csv", batch_size=4,
                     heatmaps=heat, heatmap_kind=kind)  # type: ignore[arg-type]
        with Image.open(heat / Path(name).with_suffix(".png")) as img:
            assert float(img.text[f"anomaly-flow:{kind}"]) == pytest.approx(
                values[kind][name], rel=1e-5)
    # a model without a normal reference has no typicality map: refused before scoring
    bare = Glow(model.config)
    bare.load_state_dict({k: v for k, v in model.state_dict().items()
                          if not k.startswith("reference_")})
    out = tmp_path / "never.csv"
    with pytest.raises(ScoringError, match=r"typicality heatmaps need the model's normal "
                                           r"reference.*--heatmap-kind bpd"):
        score_folder(bare.eval(), None, messy, out, heatmaps=tmp_path / "never",
                     heatmap_kind="typicality")
    assert not out.exists() and not (tmp_path / "never").exists()


def test_a_resumed_run_does_not_overwrite_an_earlier_heatmap(
        model: Glow, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder, heat, out = tmp_path / "images", tmp_path / "heat", tmp_path / "scores.csv"
    folder.mkdir()
    first, second = sample_images(2)
    Image.fromarray(first[0]).save(folder / "x.png")
    score_folder(model, None, folder, out, heatmaps=heat)
    before = (heat / "x.png").read_bytes()
    Image.fromarray(second[0]).save(folder / "x.bmp")  # added later, same stem
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, folder, out, heatmaps=heat, resume=True)
    assert summary.n_resumed == 1 and summary.n_heatmaps == 1
    assert f"1 kept file(s) keep the heatmap an earlier run wrote, under another name than " \
        f"a run over the folder as it is now would give (e.g. x.png's heatmap is " \
        f"{heat / 'x.png'}); run without --resume" in caplog.text
    assert "have no heatmap" not in caplog.text  # x.png has one, under its old name
    assert (heat / "x.png").read_bytes() == before
    assert (heat / "x.bmp.png").is_file()


def test_files_named_to_the_length_limit_get_their_heatmaps(model: Glow,
                                                             tmp_path: Path) -> None:
    """Two files of one 251-byte stem (.png and .jpg) had heatmap names of 259 bytes: none
    could be written, and the advice to resume could never mend it."""
    folder, heat, out = tmp_path / "images", tmp_path / "heat", tmp_path / "scores.csv"
    folder.mkdir()
    first, second = sample_images(2)
    stem = "b" * 251
    Image.fromarray(first[0]).save(folder / f"{stem}.png")
    Image.fromarray(second[0]).save(folder / f"{stem}.jpg")
    summary = score_folder(model, None, folder, out, heatmaps=heat)
    assert (summary.n_heatmaps, summary.heatmap_failures) == (2, (0, None))
    from anomaly_flow.heatmap import recorded_heatmaps
    drawn = recorded_heatmaps(heat)  # each names its file in full
    assert sorted(drawn) == [f"{stem}.jpg", f"{stem}.png"]
    assert all(len(name.name) < 255 for name, _ in drawn.values())
    before = {path: path.read_bytes() for path in heat.iterdir()}
    summary = score_folder(model, None, folder, out, heatmaps=heat, resume=True)
    assert (summary.n_resumed, summary.n_heatmaps) == (2, 0)
    assert {path: path.read_bytes() for path in heat.iterdir()} == before


def test_a_resumed_run_never_draws_over_a_kept_files_heatmap(
        model: Glow, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Each heatmap records its source, so a resumed run knows whose it is: a new b.png,
    whose name is now b.png.png, does not take the heatmap of the kept file b.png.png."""
    folder, heat, out = tmp_path / "images", tmp_path / "heat", tmp_path / "scores.csv"
    folder.mkdir()
    images = sample_images(3)
    Image.fromarray(images[0, 0]).save(folder / "b.jpg", quality=95)
    Image.fromarray(images[1, 0]).save(folder / "b.png.png")
    score_folder(model, None, folder, out, heatmaps=heat)
    assert sorted(p.name for p in heat.iterdir()) == ["b.png", "b.png.png"]
    before = {name: (heat / name).read_bytes() for name in ("b.png", "b.png.png")}
    Image.fromarray(images[2, 0]).save(folder / "b.png")  # added later
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, folder, out, heatmaps=heat, resume=True)
    assert summary.n_resumed == 2 and summary.n_heatmaps == 1
    assert {name: (heat / name).read_bytes() for name in before} == before
    with Image.open(heat / "b.png~2.png") as drawn:
        assert drawn.info["anomaly-flow:source"] == "b.png"
    assert "2 kept file(s) keep the heatmap an earlier run wrote" in caplog.text
    assert "have no heatmap" not in caplog.text
    # a file scored again (changed since the table) draws over its own heatmap, wherever
    # it lies, leaving no stale copy
    Image.fromarray(images[0, 0]).save(folder / "b.png.png")
    os.utime(folder / "b.png.png", (time.time() + 5, time.time() + 5))
    summary = score_folder(model, None, folder, out, heatmaps=heat, resume=True)
    assert summary.n_heatmaps == 1
    assert sorted(p.name for p in heat.iterdir()) == ["b.png", "b.png.png", "b.png~2.png"]
    assert (heat / "b.png.png").read_bytes() != before["b.png.png"]


def test_a_file_that_fails_now_loses_its_old_heatmap(model: Glow, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    folder, heat, out = tmp_path / "images", tmp_path / "heat", tmp_path / "s.csv"
    write_image_folder(sample_images(2), folder, "x-")
    score_folder(model, None, folder, out, heatmaps=heat)
    (folder / "x-00000.png").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, folder, out, heatmaps=heat)
    assert summary.n_failed == 1 and not (heat / "x-00000.png").exists()
    assert (heat / "x-00001.png").is_file()
    assert "removed 1 heatmap(s) an earlier run drew of files that cannot be scored now" \
        in caplog.text


def test_resume_with_heatmaps_draws_those_the_kept_files_lack(
        model: Glow, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A kept file without a heatmap (an earlier run without --heatmaps, or whose
    heatmaps met a full disk) is scored again to draw it; the heatmaps there stay as they
    were, and the table is the uninterrupted run's."""
    folder, heat, out = tmp_path / "images", tmp_path / "heat", tmp_path / "s.csv"
    write_image_folder(sample_images(3), folder, "x-")
    score_folder(model, None, folder, out)  # no heatmaps
    write_image_folder(sample_images(1, offset=3), folder, "y-")
    with caplog.at_level(logging.INFO):
        summary = score_folder(model, None, folder, out, heatmaps=heat, resume=True)
    assert summary.n_heatmaps == 4
    assert re.search(r"3 file\(s\) kept from .*s\.csv have no heatmap under .*heat, or one "
                     r"another model drew \(e\.g\. x-00000\.png\); scoring them again to draw "
                     "them", caplog.text)
    whole = tmp_path / "whole.csv"
    score_folder(model, None, folder, whole, heatmaps=tmp_path / "whole-heat")
    pd.testing.assert_frame_equal(read_csv(out), read_csv(whole), check_exact=True)
    assert sorted(p.name for p in heat.iterdir()) == [
        "x-00000.png", "x-00001.png", "x-00002.png", "y-00000.png"]

    (heat / "x-00001.png").unlink()  # as if its write had met a full disk
    kept = {p.name: p.stat().st_mtime_ns for p in heat.iterdir()}
    caplog.clear()
    with caplog.at_level(logging.INFO):
        summary = score_folder(model, None, folder, out, heatmaps=heat, resume=True)
    assert summary.n_heatmaps == 1
    assert "1 file(s) kept from" in caplog.text
    assert (heat / "x-00001.png").read_bytes() == (tmp_path / "whole-heat" /
                                                    "x-00001.png").read_bytes()
    assert {name: (heat / name).stat().st_mtime_ns for name in kept} == kept


def test_resume_draws_again_the_heatmaps_another_model_drew_meanwhile(
        model: Glow, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An interrupted run of one model, then a run of another into the same heatmap
    folder, then the first resumed: the kept files' heatmaps are the other model's, and
    are drawn again, so that table and heatmaps are what an uninterrupted run gives."""
    folder, heat, out = tmp_path / "images", tmp_path / "heat", tmp_path / "s.csv"
    write_image_folder(sample_images(4), folder, "x-")
    whole = tmp_path / "whole.csv"
    score_folder(model, None, folder, whole, heatmaps=tmp_path / "whole-heat")
    write_table(read_csv(whole).head(2), out)  # as a run stopped after 2 files left it
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).mul_(1.5)
    score_folder(other, None, folder, tmp_path / "other.csv", heatmaps=heat)
    assert (heat / "x-00000.png").read_bytes() != (tmp_path / "whole-heat" /
                                                    "x-00000.png").read_bytes()
    with caplog.at_level(logging.INFO):
        summary = score_folder(model, None, folder, out, heatmaps=heat, resume=True)
    assert summary.n_heatmaps == 4
    assert "2 file(s) kept from" in caplog.text and "or one another model drew" in caplog.text
    pd.testing.assert_frame_equal(read_csv(out), read_csv(whole), check_exact=True)
    for path in (tmp_path / "whole-heat").iterdir():
        assert (heat / path.name).read_bytes() == path.read_bytes(), path.name
    pd.testing.assert_frame_equal(read_csv(out), read_csv(whole), check_exact=True)


def test_a_redraw_stopped_half_way_keeps_every_row(
        model: Glow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept rows scored again to draw their heatmaps stay in the table until their new
    rows come: a stop half way left the table with the rows scored so far alone."""
    folder, heat, out = tmp_path / "images", tmp_path / "heat", tmp_path / "s.csv"
    write_image_folder(sample_images(12), folder, "x-")
    score_folder(model, None, folder, out)  # no heatmaps
    whole = read_csv(out)
    real_launch = stop_at_launch(monkeypatch, 3, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        score_folder(model, None, folder, out, heatmaps=heat, resume=True, batch_size=4,
                     flush_every_s=0.0)
    pd.testing.assert_frame_equal(read_csv(out), whole, check_exact=True)
    assert len(list(heat.iterdir())) < 12  # stopped before the last was drawn
    monkeypatch.setattr(scoring, "_launch", real_launch)
    summary = score_folder(model, None, folder, out, heatmaps=heat, resume=True)
    assert summary.n_files == 12 and len(list(heat.iterdir())) == 12
    pd.testing.assert_frame_equal(read_csv(out), whole, check_exact=True)


def test_resume_warns_when_its_heatmaps_would_mix_two_scales(
        model: Glow, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder, heat, out = tmp_path / "images", tmp_path / "heat", tmp_path / "s.csv"
    write_image_folder(sample_images(3), folder, "x-")
    score_folder(model, None, folder, out, heatmaps=heat, heatmap_kind="typicality")
    write_image_folder(sample_images(1, offset=3), folder, "y-")
    with caplog.at_level(logging.WARNING):
        score_folder(model, None, folder, out, heatmaps=heat, heatmap_kind="bpd", resume=True)
    assert re.search(r"the kept heatmaps under .*heat draw typicality, and this run draws "
                     r"bpd: the folder would mix colour scales; resume with --heatmap-kind "
                     r"typicality", caplog.text)
    caplog.clear()
    write_image_folder(sample_images(1, offset=4), folder, "z-")
    with caplog.at_level(logging.WARNING):  # now both kinds are there, whichever is drawn
        score_folder(model, None, folder, out, heatmaps=heat, heatmap_kind="bpd",
                     resume=True)
    assert "draw typicality, and this run draws bpd" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # nothing left to score: nothing redrawn either
        summary = score_folder(model, None, folder, out, heatmaps=heat,
                               heatmap_kind="typicality", resume=True)
    assert summary.n_heatmaps == 0
    assert re.search(r"the kept heatmaps under .*heat draw bpd, not typicality, and no file "
                     r"is left to score, so none is drawn again; run without --resume to "
                     r"draw them all as typicality", caplog.text)
    caplog.clear()
    write_image_folder(sample_images(1, offset=5), folder, "w-")
    (out.parent / "same.csv").write_bytes(out.read_bytes())
    shutil.rmtree(heat)
    score_folder(model, None, folder, out.parent / "same.csv", heatmaps=heat,
                 heatmap_kind="bpd")
    write_image_folder(sample_images(1, offset=6), folder, "v-")
    with caplog.at_level(logging.WARNING):  # the same kind again: nothing to say
        score_folder(model, None, folder, out.parent / "same.csv", heatmaps=heat,
                     heatmap_kind="bpd", resume=True)
    assert "mix colour scales" not in caplog.text


# --------------------------------------------------------------------------- what a run may touch


def test_heatmaps_refuse_a_folder_overlapping_the_scored_one(model: Glow,
                                                             tmp_path: Path) -> None:
    folder = tmp_path / "images"
    write_image_folder(sample_images(2), folder, "x-")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for heat, where in [(folder, "is the scored folder"),
                        (folder / "heat", "is inside the scored folder"),
                        (tmp_path, "contains the scored folder")]:
        with pytest.raises(ScoringError, match=f"the heatmap folder .* {where} .*images: its "
                                               "heatmaps would overwrite or mix with the "
                                               "images .* choose a heatmap folder outside"):
            score_folder(model, None, folder, tmp_path / "s.csv", heatmaps=heat)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not (folder / "heat").exists() and not (tmp_path / "s.csv").exists()


def test_heatmaps_refuse_a_folder_the_scored_one_links_to(model: Glow, tmp_path: Path) -> None:
    """A symlinked folder inside the scored folder that leads to the heatmap folder (or to
    a folder around it) would have the next run score the heatmaps as images."""
    folder = tmp_path / "images"
    write_image_folder(sample_images(2), folder, "x-")
    for heat, target in [(tmp_path / "heat", tmp_path / "heat"),
                         (tmp_path / "around" / "heat", tmp_path / "around"),
                         (tmp_path / "maps", tmp_path / "maps" / "sub")]:  # a folder in it
        link = folder / "link"
        target.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target, target_is_directory=True)
        said = (f"the heatmap folder {heat} is reached from the scored folder {folder} "
                f"through a symlinked folder inside it (to {target}), so the next run would "
                "score the heatmaps as images")
        with pytest.raises(ScoringError, match=re.escape(said)):
            score_folder(model, None, folder, tmp_path / "s.csv", heatmaps=heat)
        assert not (tmp_path / "s.csv").exists() and not list(heat.rglob("*.png"))
        link.unlink()
    summary = score_folder(model, None, folder, tmp_path / "s.csv", heatmaps=tmp_path / "heat")
    assert summary.n_heatmaps == 2


def test_a_heatmap_never_replaces_a_file_it_did_not_write(model: Glow, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    folder, heat = tmp_path / "images", tmp_path / "heat"
    write_image_folder(sample_images(2), folder, "x-")
    heat.mkdir()
    (heat / "x-00000.png").write_bytes(b"the user's own file")
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, folder, tmp_path / "s.csv", heatmaps=heat)
    assert (heat / "x-00000.png").read_bytes() == b"the user's own file"
    assert "x-00000.png: it exists and is not a heatmap; it is left as it is" in caplog.text
    assert summary.n_heatmaps == 1
    # its own heatmaps it does replace
    before = (heat / "x-00001.png").stat().st_mtime_ns
    summary = score_folder(model, None, folder, tmp_path / "s.csv", heatmaps=heat)
    assert summary.n_heatmaps == 1 and (heat / "x-00001.png").stat().st_mtime_ns >= before


@pytest.mark.timeout(120, method="thread")  # the bug it guards against hangs
def test_a_pipe_named_like_a_heatmap_does_not_hang_the_run(model: Glow, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    """Telling a heatmap from a user's file, or finding earlier heatmaps on resuming,
    never opens a pipe (which would block the writer thread and the run for good)."""
    folder, heat = tmp_path / "images", tmp_path / "heat"
    write_image_folder(sample_images(2), folder, "x-")
    heat.mkdir()
    os.mkfifo(heat / "x-00000.png")
    out = tmp_path / "s.csv"
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, folder, out, heatmaps=heat)
        summary = score_folder(model, None, folder, out, heatmaps=heat, resume=True)
    assert "x-00000.png: it exists and is not a heatmap; it is left as it is" in caplog.text
    assert summary.n_files == 2 and (heat / "x-00001.png").is_file()


def test_a_heatmap_is_written_whole_or_not_at_all(model: Glow, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Each heatmap goes to a temporary file first: a write that fails before the rename
    leaves neither a cut PNG under the heatmap's name nor the temporary file."""
    from anomaly_flow import heatmap as heatmap_module

    folder, heat = tmp_path / "images", tmp_path / "heat"
    write_image_folder(sample_images(2), folder, "x-")

    real_replace = os.replace

    def refused(source: Path, target: Path) -> None:
        if Path(target).parent != heat:  # the table's own rename
            return real_replace(source, target)
        assert Path(source).stat().st_size > 0 and Path(source).parent == heat
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(heatmap_module.os, "replace", refused)  # os itself: one module
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, folder, tmp_path / "s.csv", heatmaps=heat)
    assert summary.n_heatmaps == 0 and list(heat.iterdir()) == []
    assert caplog.text.count("No space left on device") == 2


def test_a_heatmap_of_a_file_with_a_long_name_is_written(model: Glow, tmp_path: Path) -> None:
    """Its temporary file's name is short: a name near the 255-byte limit still fits."""
    folder, heat = tmp_path / "images", tmp_path / "heat"
    write_image_folder(sample_images(1), folder, "a" * 240)
    summary = score_folder(model, None, folder, tmp_path / "s.csv", heatmaps=heat)
    assert summary.n_heatmaps == 1 and (heat / f"{'a' * 240}00000.png").is_file()


@pytest.mark.parametrize("resize", ["crop", "pad"])
def test_every_reader_converts_images_as_the_models_resize_says(
        tmp_path: Path, resize: str, caplog: pytest.LogCaptureFixture) -> None:
    """``model.resize`` reaches training's split and its notes, folder scoring (in memory,
    to a table, resumed) and the pyfunc alike: the same file becomes the same input
    everywhere, here 32×16 images made 16×16 by a crop (the centred square, as it is) or
    a pad (fitted as 16×8, on black bars)."""
    from anomaly_flow.config import RunConfig, TrainConfig
    from anomaly_flow.tracking.pyfunc import predict_frame
    from anomaly_flow.train import folder_datasets

    rng = np.random.default_rng(0)
    folder = tmp_path / "wide"
    folder.mkdir()
    pixels = rng.integers(64, 256, (6, 16, 32), dtype=np.uint8)  # (N, H, W): wide
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{i}.png")
    config = dataclasses.replace(TINY, resize=resize)
    with caplog.at_level(logging.WARNING):
        data = folder_datasets(folder, RunConfig(config, TrainConfig(val_fraction=0.5)))
    # the pad shrinks each image by half; the crop takes a square of the model's size
    assert ("are larger than 16×16 (e.g. 32×16) and are resized" in caplog.text) == \
        (resize == "pad")
    items = [*data.train, *data.val]
    assert sorted(item.index for item in items) == list(range(6))
    for item in items:
        image = item.image.numpy()[0]
        if resize == "crop":
            np.testing.assert_array_equal(image, pixels[item.index][:, 8:24])
        else:
            assert (image[:4] == 0).all() and (image[12:] == 0).all() and image[4:12].min() > 0

    torch.manual_seed(0)
    model = Glow(config)
    inputs = torch.stack([item.image for item in sorted(items, key=lambda item: item.index)])
    model.initialize(preprocess(inputs, config.n_bits))
    model.eval()
    with torch.no_grad():
        expected = model.bpd(preprocess(inputs, config.n_bits)).double().numpy()
    table = score_folder_table(model, folder, batch_size=4).table.set_index("path")
    paths = [str(folder / f"{i}.png") for i in range(6)]
    np.testing.assert_allclose(table.loc[paths, "bpd"], expected, rtol=0, atol=ULPS)
    served = predict_frame(model, None, pd.DataFrame({"path": paths}))
    np.testing.assert_allclose(served["bpd"], expected, rtol=0, atol=ULPS)
    out = tmp_path / "scores.csv"
    score_folder(model, None, folder, out, batch_size=4)
    full = read_csv(out)
    np.testing.assert_allclose(full.set_index("path").loc[paths, "bpd"], expected, rtol=0,
                               atol=ULPS)
    write_table(full.head(3), out)  # a run killed half way; the resumed run checks the
    summary = score_folder(model, None, folder, out, resume=True)  # kept rows' files again
    assert summary.n_resumed == 3
    pd.testing.assert_frame_equal(read_csv(out), full, check_exact=True)


@pytest.mark.parametrize(("resize", "shape"), [("stretch", (256, 128)), ("pad", (256, 128)),
                                               ("crop", (256, 256))])
def test_heatmaps_take_the_shape_of_their_file(tmp_path: Path, resize: str,
                                              shape: tuple[int, int]) -> None:
    """A 32×16 file seen as 16×16: its heatmap is drawn over that square view, then put
    back in the file's shape (stretched back, or without the pad's black bars; a crop's
    square is the file's centred square as it is), so what glows lies where it lies in
    the file. The pad's bars are cut exactly: the heatmap equals the square one's rows
    4 to 12 of 16."""
    from anomaly_flow.heatmap import VIEW_KEY

    rng = np.random.default_rng(0)
    folder = tmp_path / "wide"
    folder.mkdir()
    Image.fromarray(rng.integers(64, 256, (16, 32), dtype=np.uint8)).save(folder / "w.png")
    torch.manual_seed(0)
    model = Glow(dataclasses.replace(TINY, resize=resize))
    square = load_image(folder / "w.png", "L", 16, resize)[0]
    model.initialize(preprocess(torch.from_numpy(square)[None, None].repeat(4, 1, 1, 1),
                                TINY.n_bits))
    model.eval()
    score_folder(model, None, folder, tmp_path / "s.csv", heatmaps=tmp_path / "heat")
    with Image.open(tmp_path / "heat" / "w.png") as drawn:
        assert drawn.size == shape
        assert drawn.info[VIEW_KEY] == f"16x16 model view ({resize}) of a 32x16 file, " + (
            "its centred 16x16 square" if resize == "crop" else "in its shape")
        pixels = np.asarray(drawn.convert("RGB"))
    if resize == "pad":  # the square heatmap, bars cut: rows 4..12 of 16, 16 pixels each
        with torch.no_grad():
            breakdown = model.breakdown(preprocess(torch.from_numpy(square)[None, None],
                                                   TINY.n_bits))
        assert breakdown.pixel_bpd is not None
        whole = render_heatmap(square[None], breakdown.pixel_bpd[0].numpy(), vmin=0.0,
                               vmax=float(TINY.n_bits))
        np.testing.assert_array_equal(pixels, whole[64:192])


def test_a_heatmap_folder_shared_by_two_scored_folders_keeps_each_ones_heatmaps(
        model: Glow, tmp_path: Path) -> None:
    """Two folders whose files share names (``x00000.png``) given one heatmap folder: the
    second run replaced the first's heatmaps without a word (and a resumed run would have
    kept them as its own). Each heatmap records its scored folder; the second run is
    refused before scoring, the first folder's heatmaps untouched, and a run of the first
    folder again draws over its own."""
    from anomaly_flow.heatmap import FOLDER_KEY, recorded_heatmaps

    rng = np.random.default_rng(0)
    first, second = tmp_path / "line-a", tmp_path / "line-b"
    for folder in (first, second):
        write_image_folder(rng.integers(0, 256, (3, 1, 16, 16), dtype=np.uint8), folder, "x")
    heat = tmp_path / "heat"
    score_folder(model, None, first, tmp_path / "a.csv", heatmaps=heat)
    drawn = {p.name: p.read_bytes() for p in heat.glob("*.png")}
    assert len(drawn) == 3
    with Image.open(heat / "x00000.png") as img:
        assert img.text[FOLDER_KEY] == os.path.realpath(first)
    with pytest.raises(ScoringError, match=r"the heatmap folder .*heat holds heatmaps of "
                                           r"another scored folder's files under 3 of the "
                                           r"names this run would draw \(e\.g\. x0000\d\.png, "
                                           r"of a file in .*line-a\); give each scored folder "
                                           r"its own heatmap folder"):
        score_folder(model, None, second, tmp_path / "b.csv", heatmaps=heat)
    assert not (tmp_path / "b.csv").exists()
    assert {p.name: p.read_bytes() for p in heat.glob("*.png")} == drawn
    assert set(recorded_heatmaps(heat, os.path.realpath(second))) == set()  # none is its
    assert len(recorded_heatmaps(heat, os.path.realpath(first))) == 3
    score_folder(model, None, second, tmp_path / "b.csv", heatmaps=heat / "line-b")
    summary = score_folder(model, None, first, tmp_path / "a.csv", heatmaps=heat)
    assert summary.n_heatmaps == 3
    (tmp_path / "link").symlink_to(first)  # the same folder by another path is the same
    summary = score_folder(model, None, tmp_path / "link", tmp_path / "a.csv", heatmaps=heat)
    assert summary.n_heatmaps == 3


def test_a_heatmap_another_folders_run_drew_meanwhile_is_not_replaced(
        tmp_path: Path) -> None:
    """Two runs at once over two folders, one heatmap folder: both pass the check before
    scoring, so the writer checks each file it would replace, and leaves another scored
    folder's heatmap as it is (a failure of this heatmap, counted)."""
    from anomaly_flow.heatmap import HeatmapWriter

    image = np.full((1, 1, 8, 8), 100, np.uint8)
    maps = torch.ones(1, 8, 8)
    with HeatmapWriter(tmp_path, [Path("x.png")], vmin=0, vmax=8, sources=["x.png"],
                       scored_folder="/data/a") as writer:
        writer([0], torch.from_numpy(image), maps, np.array([[8, 8]]))
    assert writer.n_written == 1
    theirs = (tmp_path / "x.png").read_bytes()
    with HeatmapWriter(tmp_path, [Path("x.png")], vmin=0, vmax=8, sources=["x.png"],
                       scored_folder="/data/b") as writer:
        writer([0], torch.from_numpy(image), maps, np.array([[8, 8]]))
    assert (writer.n_written, writer.n_failed) == (0, 1)
    assert writer.first_failure == (f"{tmp_path / 'x.png'}: it is the heatmap of a file in "
                                    "another scored folder (/data/a); it is left as it is")
    assert (tmp_path / "x.png").read_bytes() == theirs


def test_files_of_several_frames_are_scored_by_their_first_and_said(
        model: Glow, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A multi-page TIFF or an animated GIF has one row, its first frame's: the frames
    after it are not images the run read, and the run says how many files had them."""
    folder = tmp_path / "frames"
    folder.mkdir()
    pages = [Image.fromarray(np.full((16, 16), v, np.uint8)) for v in (10, 200, 90)]
    pages[0].save(folder / "a.tiff", save_all=True, append_images=pages[1:])
    pages[0].save(folder / "b.gif", save_all=True, append_images=pages[1:2])
    pages[0].save(folder / "c.png")
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, folder, tmp_path / "s.csv")
    assert summary.n_scored == 3
    table = read_csv(tmp_path / "s.csv")
    np.testing.assert_array_equal(table["bpd"], table["bpd"].iloc[2])  # frame 1 each
    said = [r.getMessage() for r in caplog.records if "several frames" in r.getMessage()]
    assert said == [f"2 scored file(s) hold several frames or pages (an animated GIF, PNG "
                    f"or WebP, a multi-page TIFF), and only the first of each was scored "
                    f"(e.g. {folder / 'a.tiff'}); to score the others, save each frame as "
                    "an image file of its own"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # calibrate and evaluate say it too
        score_folder_table(model, folder)
    assert [r.getMessage() for r in caplog.records if "several frames" in r.getMessage()] \
        == said


def png_with_late_exif(path: Path, pixels: np.ndarray, orientation: int) -> None:
    """A PNG whose eXIf chunk (with this EXIF orientation) comes after the image data, as
    the PNG specification allows: Pillow finds it only when it decodes the pixels."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    data = buffer.getvalue()
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    body = b"eXIf" + exif.tobytes()
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    end = data.rindex(b"IEND") - 4
    path.write_bytes(data[:end] + chunk + data[end:])


@pytest.mark.parametrize("resize", ["stretch", "pad"])
def test_a_heatmap_takes_the_shape_of_its_decoded_file(tmp_path: Path, resize: str) -> None:
    """A 32×16 PNG whose EXIF orientation (a quarter turn) sits after its pixel data is
    scored upright, 16×32, so its heatmap is 128×256: the shape comes from decoding, not
    from the file's header, which does not tell the turn."""
    folder = tmp_path / "turned"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(64, 256, (16, 32), dtype=np.uint8)
    png_with_late_exif(folder / "t.png", pixels, orientation=6)
    with Image.open(folder / "t.png") as img:
        assert img.size == (32, 16) and "exif" not in img.info  # the header says 32×16
    assert upright(folder / "t.png") == (16, 32)
    torch.manual_seed(0)
    model = Glow(dataclasses.replace(TINY, resize=resize))
    square = load_image(folder / "t.png", "L", 16, resize)
    model.initialize(preprocess(torch.from_numpy(square)[None].repeat(4, 1, 1, 1),
                                TINY.n_bits))
    model.eval()
    score_folder(model, None, folder, tmp_path / "s.csv", heatmaps=tmp_path / "heat")
    with Image.open(tmp_path / "heat" / "t.png") as drawn:
        assert drawn.size == (128, 256)
        assert "of a 16x32 file" in drawn.info["anomaly-flow:view"]


def test_scoring_a_folder_in_memory_warns_of_what_the_conversion_drops(
        model: Glow, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Calibration and evaluation score folders through ``score_folder_table``: a folder
    that mixes shapes there is warned of as ``score`` warns of it (it was silent, while
    its threshold moved with the mix)."""
    for i, shape in enumerate([(16, 32)] * 3 + [(32, 16)]):
        Image.fromarray(np.full(shape, 128, np.uint8)).save(tmp_path / f"{i}.png")
    with caplog.at_level(logging.WARNING):
        score_folder_table(model, tmp_path)
    assert f"{tmp_path}: the images looked at differ in aspect ratio (e.g. 32×16 and 16×32)" \
        in caplog.text
