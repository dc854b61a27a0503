"""Tests for ``anomaly-flow score``, with real files, a real model folder and, for the
unreadable file, the real command in a process without root's right to read anything."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner, Result

from anomaly_flow.calibration import Calibration, calibrate
from anomaly_flow.cli import main
from anomaly_flow.data import ArrayDataset, display_path, write_image_folder
from anomaly_flow.score_table import write_table
from anomaly_flow.scoring import score_images
from tests.conftest import TrainedModel, corrupt_png, obeying_file_modes
from tests.test_folders import DEEP, deep_folder, remove_tree, too_long_a_path
from tests.test_scoring import (
    MESSY,
    N_BAD,
    N_GOOD,
    TINY,
    blank_png,
    make_tiny_model,
    read_csv,
    sample_images,
)

CALIBRATION_FILE = "calibration.json"  # beside config.json, as tracking.load_model reads it


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain ``Glow.save`` folder with a conformal calibration (α = 0.6) beside it: at
    0.2 its threshold lay above every image of the messy folder, so no test saw a file
    flagged (8 of its 11 scorable images are at 0.6)."""
    model = make_tiny_model()
    folder = model.save(tmp_path_factory.mktemp("model") / "tiny")
    normal = ArrayDataset(sample_images(24, offset=200), TINY.mode, TINY.image_size).images
    scores = score_images(model, normal).bpd.numpy()
    (folder / CALIBRATION_FILE).write_text(calibrate("bpd", scores, alpha=0.6).to_json())
    return folder


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result: Result, expected: str) -> None:
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert expected in errors[0], errors[0]


def test_help_shows_an_example() -> None:
    result = run("score", "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.output
    assert "anomaly-flow score incoming/ --model models:/bottle-caps@champion" in result.output
    assert "--resume" in result.output and "--heatmaps" in result.output


def test_score_a_messy_folder_then_resume(messy: Path, model_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # scoring with a model folder makes no MLflow store here
    out = tmp_path / "scores.csv"
    heat = tmp_path / "heat"
    result = run("score", messy, "--model", model_dir, "--out", out, "--workers", "0",
                 "--batch-size", "5", "--heatmaps", heat)
    assert result.exit_code == 0, result.output
    table = read_csv(out)
    assert len(table) == len(MESSY)
    scored = table["error"] == ""
    assert int(scored.sum()) == N_GOOD
    cal = Calibration.from_json((model_dir / CALIBRATION_FILE).read_text())
    values = table.loc[scored, "score"].to_numpy()
    # the score column is the calibrated score's, and the threshold splits this folder
    np.testing.assert_array_equal(values, table.loc[scored, cal.score_name].to_numpy())
    np.testing.assert_array_equal(table.loc[scored, "p_value"], cal.p_values(values))
    verdict = table.loc[scored, "is_anomaly"].to_numpy() == 1.0
    np.testing.assert_array_equal(verdict, values > cal.threshold.value)
    assert 0 < verdict.sum() < N_GOOD, values
    assert table.loc[~scored, ["p_value", "is_anomaly"]].isna().all().all()
    k = int(verdict.sum())
    assert f"{N_GOOD} scored, {N_BAD} failed, {k} anomalous" in result.stderr
    assert f"{N_BAD} file(s) could not be scored:" in result.stderr
    assert f"wrote {len(MESSY)} rows to {out}" in result.stderr
    assert f"wrote {N_GOOD} heatmaps under {heat}" in result.stderr
    assert result.stdout == ""
    assert len(list(heat.rglob("*.png"))) == N_GOOD

    # a run killed after 8 files, then --resume: the same table, no duplicates
    partial = tmp_path / "partial.csv"
    write_table(table.head(8), partial)
    resumed = run("score", messy, "--model", model_dir, "--out", partial, "--workers", "1",
                  "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert f"{N_GOOD} scored, {N_BAD} failed, {k} anomalous in the whole table (8 rows kept " \
        f"from before, {len(MESSY) - 8} files read now)" in resumed.stderr
    assert f"wrote {len(MESSY)} rows to {partial}" in resumed.stderr
    again = read_csv(partial)
    assert not again["path"].duplicated().any()
    pd.testing.assert_frame_equal(again, table, check_exact=True)
    # and --resume of the finished table reads nothing and says so
    done = run("score", messy, "--model", model_dir, "--out", partial, "--workers", "0",
               "--resume")
    assert done.exit_code == 0, done.output
    assert f"in the whole table (all {len(MESSY)} rows kept from before; no file was new)" \
        in done.stderr
    pd.testing.assert_frame_equal(read_csv(partial), table, check_exact=True)

    # a table from before coarse_complexity existed: its scored files are scored again
    older = tmp_path / "older.csv"
    table.head(8).drop(columns="coarse_complexity").to_csv(older, index=False)
    n_kept = int((table.head(8)["error"] != "").sum())
    resumed = run("score", messy, "--model", model_dir, "--out", older, "--workers", "0",
                  "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "has no coarse_complexity column (it was written by an older anomaly-flow, or by " \
           f"a model without that score); scoring its {8 - n_kept} scored file(s) again" \
        in resumed.stderr
    assert f"({n_kept} rows kept from before, {len(MESSY) - n_kept} files read now)" \
        in resumed.stderr
    pd.testing.assert_frame_equal(read_csv(older), table, check_exact=True)

    # --compile: the same table to float32 rounding (the sums run in another order)
    compiled = tmp_path / "compiled.csv"
    result = run("score", messy, "--model", model_dir, "--out", compiled, "--workers", "0",
                 "--batch-size", "4", "--compile")
    assert result.exit_code == 0, result.output
    assert "could not compile" not in result.stderr
    pd.testing.assert_frame_equal(read_csv(compiled), table, check_exact=False, rtol=1e-5,
                                  atol=1e-5)
    # a table started with --compile resumes without it: its last digits are within
    # the resume check's tolerance
    write_table(read_csv(compiled).head(8), compiled)
    resumed = run("score", messy, "--model", model_dir, "--out", compiled, "--workers", "0",
                  "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "8 rows kept from before" in resumed.stderr
    assert not (tmp_path / "mlruns").exists()


def test_the_summary_counts_one_of_a_thing_in_the_singular(model_dir: Path,
                                                           tmp_path: Path) -> None:
    folder, out, heat = tmp_path / "images", tmp_path / "s.csv", tmp_path / "heat"
    write_image_folder(sample_images(2), folder, "x-")
    (folder / "x-00001.png").rename(tmp_path / "later.png")
    result = run("score", folder, "--model", model_dir, "--out", out, "--heatmaps", heat)
    assert result.exit_code == 0, result.output
    assert f"wrote 1 row to {out}" in result.stderr
    assert f"wrote 1 heatmap under {heat}" in result.stderr
    (tmp_path / "later.png").rename(folder / "x-00001.png")
    result = run("score", folder, "--model", model_dir, "--out", out, "--heatmaps", heat,
                 "--resume")
    assert result.exit_code == 0, result.output
    assert "(1 row kept from before, 1 file read now)" in result.stderr
    assert f"wrote 2 rows to {out}" in result.stderr


def test_strict_fails_when_a_file_failed_but_writes_the_table(messy: Path, model_dir: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "scores.parquet"
    result = run("score", messy, "--model", model_dir, "--out", out, "--workers", "0",
                 "--strict", "--fdr", "0.1")
    assert_one_line_error(result, f"{N_BAD} file(s) could not be scored (--strict)")
    assert result.exit_code == 1
    assert f"{N_GOOD} scored, {N_BAD} failed" in result.stderr
    assert "anomalous (Benjamini-Hochberg at FDR 0.1)" in result.stderr
    # the first line says the same of what decides: not the calibrated threshold
    assert result.stderr.startswith(
        f"model: {model_dir}, Benjamini-Hochberg over the bpd p-values at false discovery "
        "rate 0.1 decides (not the calibrated threshold)\n"), result.stderr
    assert len(pd.read_parquet(out)) == len(MESSY)


def test_a_file_without_read_permission(messy: Path, model_dir: Path, tmp_path: Path) -> None:
    """The real command, in a process that obeys file modes (root's override dropped)."""
    out = tmp_path / "scores.csv"
    command = [sys.executable, "-m", "anomaly_flow", "score", str(messy), "--model",
               str(model_dir), "--out", str(out), "--workers", "2", "--strict"]
    command = obeying_file_modes(command)
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, result.stderr  # --strict: one file more failed
    table = read_csv(out)
    secret = table[table["path"].str.endswith("/secret.png")]
    assert secret["error"].tolist() == ["permission denied"]
    assert np.isnan(secret["bpd"].to_numpy()).all()
    n_failed = N_BAD + (os.geteuid() == 0)  # as root, secret.png counts as good in MESSY
    assert f"{len(MESSY) - n_failed} scored, {n_failed} failed" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: {n_failed} file(s) could not be scored (--strict); the error column of "
        f"{out} says why for each")


CAPPED_ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "2",
              "MALLOC_ARENA_MAX": "2"}
"""Two compute threads and two malloc arenas: the address space a run maps then varies
little between machines (1.3 GB was enough to score the tiny model's images, 3.8 GB not
enough to convert 88 M 16-bit pixels; measured)."""

MEMORY_CAP = 2_250_000_000

needs_cpu_torch = pytest.mark.skipif(
    torch.version.cuda is not None,
    reason="a CUDA build of torch maps more address space than the cap on import")


def run_capped(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python args`` in a process that may map at most :data:`MEMORY_CAP` bytes
    (``ulimit -v``, a batch system's limit), set by the child itself before it becomes
    the command (no ``preexec_fn``, which a parent with threads must not use)."""
    cap = ("import os, resource, sys; "
           "resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]),) * 2); "
           "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")
    return subprocess.run([sys.executable, "-c", cap, str(MEMORY_CAP), *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd, env=CAPPED_ENV)


@needs_cpu_torch
def test_capped_memory_scores_what_fits_and_names_what_does_not(model_dir: Path,
                                                                 tmp_path: Path) -> None:
    """Under a cap on the address space, reading a file takes what it holds, not the
    most an image file may hold (717 MB); an image whose decoding needs more than is left
    gets an error row, not a traceback."""
    folder = tmp_path / "images"
    write_image_folder(sample_images(4), folder, "n-")
    # 88 M 16-bit pixels, within the pixel limit: converting them to 8 bits takes 1.6 GB
    (folder / "wide.png").write_bytes(blank_png(9400, 9400, depth=16))
    out = tmp_path / "scores.csv"
    result = run_capped(["-m", "anomaly_flow", "score", str(folder), "--model",
                         str(model_dir), "--out", str(out), "--workers", "0", "--device",
                         "cpu"], tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
    table = read_csv(out)
    assert (table["error"] == "").sum() == 4, table
    wide = table[table["path"].str.endswith("/wide.png")]
    assert wide["error"].tolist() == ["out of memory while decoding"]
    assert "4 scored, 1 failed" in result.stderr


@pytest.fixture
def wide_model(tmp_path: Path) -> Path:
    """A model folder whose forward pass over 100 images of 128x128 through couplings
    512 wide needs 4 GB or more: over :data:`MEMORY_CAP`."""
    from anomaly_flow.config import GlowConfig
    from anomaly_flow.glow import Glow, preprocess

    config = GlowConfig(image_size=128, levels=2, steps_per_level=1, hidden_channels=512)
    torch.manual_seed(0)
    model = Glow(config)
    model.initialize(preprocess(
        ArrayDataset(sample_images(4), config.mode, config.image_size).images, config.n_bits))
    return model.eval().save(tmp_path / "wide-model")


@needs_cpu_torch
def test_a_batch_too_large_for_memory_is_a_one_line_error_and_keeps_the_rows(
        tmp_path: Path, wide_model: Path) -> None:
    """A batch that needs more memory than the process may have ends the run with one
    line naming the batch size and what to do, not torch's traceback; the rows done
    before it (two batches of files that are not images) are in the table, for
    --resume."""
    images = tmp_path / "images"
    for i in range(200):  # sorted first: two batches with no image to run the model on
        corrupt_png(images / f"a-{i:03d}.png")
    write_image_folder(sample_images(100), images, "b-")
    out = tmp_path / "scores.csv"
    result = run_capped(["-m", "anomaly_flow", "score", str(images), "--model",
                         str(wide_model), "--out", str(out), "--workers", "0",
                         "--batch-size", "100", "--device", "cpu"], tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"Error: scoring ran out of memory on cpu \(an allocation of [\d.]+ [MG]iB "
        r"failed\) with batch_size = 100 \(--batch-size\); lower it, e.g. to 25; "
        rf"100 of 300 files are in {re.escape(str(out))}: run again with resume "
        r"\(--resume\) to score the rest", last), last
    table = read_csv(out)
    assert len(table) == 100 and table["path"].str.contains("/a-").all()


@needs_cpu_torch
def test_a_batch_too_large_for_memory_in_calibrate_or_evaluate_is_one_line(
        tmp_path: Path, wide_model: Path) -> None:
    """The folders calibrate, evaluate and select_threshold score meet the same
    refusal (score_folder_table), not torch's traceback."""
    images = tmp_path / "images"
    write_image_folder(sample_images(100), images, "b-")
    probe = ("import sys\n"
             "from anomaly_flow.folder_scoring import score_folder_table\n"
             "from anomaly_flow.glow import Glow\n"
             "from anomaly_flow.score_table import ScoringError\n"
             "try:\n"
             "    score_folder_table(Glow.load(sys.argv[1]), sys.argv[2], batch_size=100)\n"
             "except ScoringError as error:\n"
             "    print(error)\n")
    result = run_capped(["-c", probe, str(wide_model), str(images)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        r"scoring ran out of memory on cpu \(an allocation of [\d.]+ [MG]iB failed\) with "
        r"batch_size = 100 \(--batch-size\); lower it, e.g. to 25\n", result.stdout), \
        result.stdout


@pytest.mark.parametrize(("threads", "compiled", "n_todo", "expected"), [
    (2, False, 300, "with batch_size = 100 (--batch-size); lower it, e.g. to 25"),
    (2, False, 10, "with batch_size = 100 (--batch-size), 10 images a forward pass here; "
                   "lower it, e.g. to 2"),
    (2, True, 10, "with batch_size = 100 (--batch-size); lower it, e.g. to 25"),
    (1, False, 10, "with batch_size = 100 (--batch-size), 16 images a forward pass here; "
                   "even the smallest batch (16 image(s), padded so that every batch size "
                   "gives the same sums) does not fit: free memory, or score on a device "
                   "with more"),
    (2, False, 1, "with batch_size = 100 (--batch-size), 2 images a forward pass here; even "
                  "the smallest batch (2 image(s)"),
])
def test_the_out_of_memory_advice_counts_the_padding(
        threads: int, compiled: bool, n_todo: int, expected: str) -> None:
    """A batch shorter than the smallest one is padded (and a compiled flow pads every
    batch to --batch-size): the advice names the batch that ran, and does not ask for a
    batch size below the padding, which would change nothing."""
    from anomaly_flow.scoring import BatchOutOfMemory

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        said = str(BatchOutOfMemory("out of memory on cpu", 100, n_todo, torch.device("cpu"),
                                    compiled))
    finally:
        torch.set_num_threads(before)
    assert said.startswith(f"scoring ran out of memory on cpu {expected}"), said


def test_a_folder_copied_from_a_mac_passes_strict(model_dir: Path, tmp_path: Path) -> None:
    """The ``._x.png`` files macOS leaves beside each copied file, and its and Jupyter's
    hidden folders, get no row (they are not images), so --strict does not fail on them;
    a warning says they were left out."""
    folder = tmp_path / "images"
    write_image_folder(sample_images(2), folder, "n-")
    for image in list(folder.iterdir()):
        (folder / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00")
    write_image_folder(sample_images(1), folder / ".ipynb_checkpoints", "n-")
    out = tmp_path / "scores.csv"
    result = run("score", folder, "--model", model_dir, "--out", out, "--workers", "0",
                 "--strict")
    assert result.exit_code == 0, result.output
    assert len(read_csv(out)) == 2
    assert (f"left out 2 hidden image files and 1 hidden folder holding images under "
            f"{folder} (names starting with '.', e.g. ._n-00000.png, ._n-00001.png)"
            ) in result.stderr


def test_a_folder_tree_a_thousand_folders_deep_is_scored_with_heatmaps(
        model_dir: Path, tmp_path: Path) -> None:
    """Searching the tree, writing heatmaps under the same nesting and finding them again
    on --resume go a level at a time: Python 3.11's os.walk, pathlib's mkdir(parents=True)
    and rglob recurse once a level, and raised RecursionError past about 980."""
    folder, out, maps = tmp_path / "images", tmp_path / "scores.csv", tmp_path / "maps"
    write_image_folder(sample_images(1), folder, "top-")
    with deep_folder(folder) as bottom:
        write_image_folder(sample_images(1, offset=1), bottom, "bottom-")
        try:
            for again in ([], ["--resume"]):
                result = run("score", folder, "--model", model_dir, "--out", out,
                             "--workers", "0", "--heatmaps", maps, *again)
                assert result.exit_code == 0, result.output[-2000:]
            assert "all 2 rows kept from before" in result.stderr
            table = read_csv(out)
            assert len(table) == 2 and (table["error"] == "").all()
            assert (maps / ("d/" * DEEP + "bottom-00000.png")).is_file()
        finally:
            if maps.exists():
                remove_tree(maps)


def test_a_folder_whose_path_is_too_long_says_to_shorten_it(model_dir: Path,
                                                           tmp_path: Path) -> None:
    folder, out = tmp_path / "images", tmp_path / "scores.csv"
    write_image_folder(sample_images(1), folder, "n-")
    with too_long_a_path(folder) as unlistable:
        result = run("score", folder, "--model", model_dir, "--out", out, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert (f"1 folder(s) could not be listed, so the images inside have no row (the first, "
            f"{unlistable}: File name too long); shorten the names of the folders on their "
            "path, or move them nearer the top of the tree and run again with --resume to "
            "score them") in result.stderr


def test_resume_with_an_output_that_is_not_there_warns(model_dir: Path,
                                                      tmp_path: Path) -> None:
    """A mistyped --out with --resume would score the whole folder again: say so."""
    folder, out = tmp_path / "images", tmp_path / "scroes.csv"
    write_image_folder(sample_images(2), folder, "n-")
    result = run("score", folder, "--model", model_dir, "--out", out, "--workers", "0",
                 "--resume")
    assert result.exit_code == 0, result.output
    assert (f"WARNING anomaly_flow.folder_scoring: resuming, but the output {out} was not found, "
            "so every file is scored; if the earlier table is elsewhere, stop and resume "
            "with its path") in result.stderr
    assert len(read_csv(out)) == 2


def test_strict_fails_when_a_folder_could_not_be_listed(model_dir: Path,
                                                      tmp_path: Path) -> None:
    """Images in a folder that cannot be listed have no row: the summary says so and
    --strict fails, as for a file that could not be read (the real command, in a process
    that obeys file modes)."""
    folder = tmp_path / "images"
    write_image_folder(sample_images(3), folder, "n-")
    locked = folder / "locked"
    write_image_folder(sample_images(2, offset=3), locked, "m-")
    locked.chmod(0o000)
    out = tmp_path / "scores.csv"
    command = [sys.executable, "-m", "anomaly_flow", "score", str(folder), "--model",
               str(model_dir), "--out", str(out), "--workers", "0", "--strict"]
    command = obeying_file_modes(command)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                cwd=tmp_path,
                                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    finally:
        locked.chmod(0o755)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, result.stderr
    assert len(read_csv(out)) == 3  # the table of what could be listed is written
    assert "3 scored, 0 failed" in result.stderr
    assert (f"1 folder(s) could not be listed, so the images inside have no row (the "
            f"first, {locked}: Permission denied)") in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: 1 folder(s) under {folder} could not be listed (--strict); their images "
        "were not scored")


@pytest.mark.parametrize(("mode", "name"), [  # files reachable, not listable; neither
    (0o311, "sub"), (0o000, "sub"), (0o000, os.fsdecode(b"caf\xe9"))])  # not UTF-8 too
def test_resume_keeps_the_rows_of_a_folder_it_cannot_list_now(model_dir: Path, tmp_path: Path,
                                                             mode: int, name: str) -> None:
    """A folder scored earlier that cannot be listed now: its files may well be there, so
    resuming refuses rather than drop their rows as gone, and the table is kept as it was
    (the real command, in a process that obeys file modes)."""
    folder, out = tmp_path / "images", tmp_path / "scores.csv"
    write_image_folder(sample_images(2), folder, "n-")
    locked = folder / name
    write_image_folder(sample_images(3, offset=2), locked, "m-")
    command = [sys.executable, "-m", "anomaly_flow", "score", str(folder), "--model",
               str(model_dir), "--out", str(out), "--workers", "0"]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    assert subprocess.run(command, capture_output=True, timeout=120, env=env).returncode == 0
    table = out.read_bytes()
    locked.chmod(mode)
    try:
        result = subprocess.run(obeying_file_modes([*command, "--resume"]), capture_output=True,
                                text=True, timeout=120, cwd=tmp_path, env=env)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: 3 row(s) of {out} are files in folders under {folder} that could not be "
        f"listed this time (e.g. {display_path(locked / 'm-00000.png')} in "
        f"{display_path(locked)}: Permission denied), so "
        "resuming would drop rows of files that may still be there; make them readable (or "
        "put back what was moved away), then resume, or write to another --out")
    assert "no longer under" not in result.stderr
    assert out.read_bytes() == table  # a refusal writes nothing


def test_resume_keeps_the_rows_of_a_folder_now_taken_for_an_mlflow_store(
        model_dir: Path, tmp_path: Path) -> None:
    """A subfolder that has since become an MLflow store is left out of the search, but
    the files in it are there: resuming refuses rather than call them gone, and resumes
    once the folder is a plain one again."""
    folder, out = tmp_path / "images", tmp_path / "scores.csv"
    write_image_folder(sample_images(2), folder, "n-")
    sub = folder / "sub"
    write_image_folder(sample_images(3, offset=2), sub, "m-")
    command = ["score", folder, "--model", model_dir, "--out", out]
    assert run(*command).exit_code == 0
    table = out.read_bytes()
    (sub / "mlflow.db").write_bytes(b"")
    (sub / "artifacts").mkdir()
    result = run(*command, "--resume")
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: 3 row(s) of {out} are files in {sub}, which the folder search now leaves "
        f"out as an MLflow store (e.g. {sub / 'm-00000.png'}), so resuming would drop them; "
        "move them out of it, or write to another --out")
    assert out.read_bytes() == table
    (sub / "mlflow.db").unlink()
    result = run(*command, "--resume")
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == table  # every row kept, none scored again
    # a file that is a folder now is not one the search left out: its row goes, as gone
    (folder / "n-00000.png").unlink()
    (folder / "n-00000.png").mkdir()
    result = run(*command, "--resume")
    assert result.exit_code == 0, result.output
    assert "dropping 1 row(s) of" in result.stderr and "no longer under" in result.stderr
    assert len(read_csv(out)) == 4


def test_user_errors_are_one_line(messy: Path, model_dir: Path, mlruns: Path,
                                  tmp_path: Path) -> None:
    (tmp_path / "file.csv").write_text("a file, not a folder")
    (tmp_path / "ledger.csv").write_text("customer,amount\nalice,100\n")
    good = ("--model", model_dir, "--out", tmp_path / "out.csv")
    cases = [
        (("score", tmp_path / "nowhere", *good), "image folder not found"),
        (("score", messy, "--model", tmp_path / "no-model", "--out", tmp_path / "o.csv"),
         "is neither a model URI nor an existing folder"),
        (("score", messy, "--model", tmp_path / "file.csv", "--out", tmp_path / "o.csv"),
         "file.csv' is a file, not a model folder"),
        (("score", messy, "--model", "models:/nope@champion", "--out", tmp_path / "o.csv",
          "--mlruns", mlruns), "no registered model 'nope'"),
        (("score", messy, "--model", "models:/nope@champion", "--out", tmp_path / "o.csv",
          "--mlruns", tmp_path / "absent"), "there is no MLflow store at"),
        (("score", messy, "--model", model_dir, "--out", tmp_path / "file.csv" / "out.csv"),
         "file.csv is not a folder"),
        (("score", messy, "--model", model_dir, "--out", tmp_path / f"{'a' * 252}.csv"),
         "is 256 bytes long, and the file system there takes 255 at most; choose a "
         "shorter name"),
        (("score", messy, "--model", model_dir, "--out", tmp_path / "ledger.csv"),
         "ledger.csv exists and is not a scores table (it lacks a path, bpd or error "
         "column); only an earlier output is replaced"),
        (("score", messy, "--model", model_dir, "--out", tmp_path / "out.txt"),
         "use a file name ending in .csv, .parquet"),
        (("score", messy, "--model", model_dir, "--out", tmp_path / "r.csv", "--heatmaps",
          tmp_path / "file.csv" / "heat"), "cannot write heatmaps to"),
        (("score", messy, *good, "--heatmap-kind", "bpd"), "add --heatmaps DIR"),
        (("score", messy, *good, "--heatmaps", tmp_path / "h", "--heatmap-kind", "pink"),
         "'pink' is not one of 'auto', 'bpd', 'typicality'"),
    ]
    cases.append((("score", messy, *good, "--device", "tpu"),
                  "'tpu' is not a device; use auto, cpu, cuda or cuda:N (N a GPU's index"))
    if not torch.cuda.is_available():
        cases.append((("score", messy, *good, "--device", "cuda"), "CUDA is not available"))
        cases.append((("score", messy, *good, "--device", "cuda:1"),
                      "--device cuda:1 was asked for but CUDA is not available"))
    for args, expected in cases:
        assert_one_line_error(run(*args), expected)
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "o.csv").exists()
    assert (tmp_path / "ledger.csv").read_text() == "customer,amount\nalice,100\n"
    assert not (tmp_path / "absent").exists()  # reading a missing store does not create it


@pytest.mark.parametrize("args", [
    ["score", "", "--model", "models:/x@champion", "--out", "o.csv"],
    ["score", "d", "--model", "models:/x@champion", "--out", "o.csv", "--heatmaps", ""],
    ["calibrate", "--model", "models:/x@candidate", "--normal", "", "--target-fpr", "0.1"],
    ["evaluate", "--model", "models:/x@candidate", "--normal", "n", "--anomalous", ""],
    ["train", "", "--name", "x"],
    ["demo", "--out", ""],
])
def test_an_empty_path_is_refused_not_taken_for_the_current_folder(
        args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for folder in ("d", "n"):  # the other folders named: a missing one is refused first
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path)
    result = run(*args)  # as `--out "$UNSET"` gives it: the working folder is not meant
    assert result.exit_code == 2, result.output
    assert "the path is empty; give a file or folder ('.' for the current folder)" \
        in result.output


def test_a_rate_that_is_not_a_number_is_refused_before_scoring(messy: Path, model_dir: Path,
                                                               tmp_path: Path) -> None:
    result = run("score", messy, "--model", model_dir, "--out", tmp_path / "o.csv",
                 "--fdr", "nan")  # FloatRange's bounds let nan through
    assert result.exit_code == 2 and "Invalid value for '--fdr': nan is not a finite " \
        "number" in result.output
    assert not (tmp_path / "o.csv").exists()


def test_a_registry_uri_without_a_store_creates_nothing(messy: Path, tmp_path: Path,
                                                        tracking_env: dict[str, str]) -> None:
    """A fresh process in a folder with no ``mlruns/``: one line, and no empty store."""
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "anomaly_flow", "score", str(messy), "--model",
         "models:/parts@champion", "--out", "scores.csv"],
        cwd=empty, env=tracking_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"Error: cannot load models:/parts@champion: there is no MLflow store at "
        f"{empty / 'mlruns' / 'mlflow.db'} (nothing was trained or logged there); train a "
        "model first (anomaly-flow train DATA --name NAME), or point --mlruns / "
        "MLFLOW_TRACKING_URI at the store that holds it"]
    assert sorted(os.listdir(empty)) == []
    # a sqlite MLFLOW_TRACKING_URI naming a file that is not there: the same, no new file
    typo = empty / "nodir" / "x.db"
    result = subprocess.run(
        [sys.executable, "-m", "anomaly_flow", "score", str(messy), "--model",
         "models:/parts@champion", "--out", "scores.csv"],
        cwd=empty, env={**tracking_env, "MLFLOW_TRACKING_URI": f"sqlite:///{typo}"},
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert f"there is no MLflow store at {typo}" in result.stderr
    assert sorted(os.listdir(empty)) == []


def test_a_file_name_cannot_forge_a_line_of_the_listing(model_dir: Path,
                                                        tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "evil\nError: fake.png").write_bytes(b"not an image")
    result = run("score", folder, "--model", model_dir, "--out", tmp_path / "s.csv",
                 "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "evil\\nError: fake.png: " in result.stderr
    assert not any(line.startswith("Error:") for line in result.stderr.splitlines())


def scoring_in_its_own_group(model_dir: Path, tmp_path: Path
                             ) -> tuple[subprocess.Popen, Path]:
    """``score`` of the 600 shipped images in a process group of its own, with two
    decoding workers, one image a batch (slow enough to stop), once both workers run and
    the first images are scored (their heatmaps written: a fixed sleep was too short on
    a loaded machine); and its output path."""
    import time

    from anomaly_flow.data import write_image_folder

    folder, out, maps = tmp_path / "images", tmp_path / "s.csv", tmp_path / "maps"
    write_image_folder(sample_images(600), folder, "x-")
    process = subprocess.Popen(
        [sys.executable, "-m", "anomaly_flow", "score", str(folder), "--model", str(model_dir),
         "--out", str(out), "--workers", "2", "--batch-size", "1", "--heatmaps", str(maps)],
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None and (
            len(children.read_text().split()) < 2 or len(list(maps.rglob("*.png"))) < 3):
        time.sleep(0.1)  # until both decoding workers run and a few images are scored
    assert process.poll() is None, "scoring ended before it could be stopped"
    return process, out


def test_sigterm_to_the_process_group_stops_workers_without_a_traceback(
        model_dir: Path, tmp_path: Path) -> None:
    """As a service manager stops a job: SIGTERM to every process of its group."""
    import signal

    process, _ = scoring_in_its_own_group(model_dir, tmp_path)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr  # 128 + SIGTERM, as a shell reports it
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert "run the same command with --resume" in stderr


def test_ctrl_c_pressed_again_while_stopping_keeps_the_rows(model_dir: Path,
                                                           tmp_path: Path) -> None:
    """A second Ctrl-C (and a third...) while the first one's clean-up writes the table
    is held: the rows scored are kept, no traceback, the status is still Ctrl-C's."""
    import signal
    import time

    process, out = scoring_in_its_own_group(model_dir, tmp_path)
    for _ in range(20):  # as a terminal sends Ctrl-C: to the whole group, here 20 times
        try:
            os.killpg(process.pid, signal.SIGINT)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr  # not killed by the signal (-2)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert "run the same command with --resume" in stderr
    table = pd.read_csv(out, keep_default_na=False)
    assert 0 < len(table) < 600 and (table["error"] == "").all()


def test_a_stop_before_any_row_says_to_run_again(model_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing was written, so there is nothing to --resume from: say so."""
    from anomaly_flow import folder_scoring

    def stopped(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    folder, out = tmp_path / "images", tmp_path / "s.csv"
    from anomaly_flow.data import write_image_folder

    write_image_folder(sample_images(3), folder, "x-")
    monkeypatch.setattr(folder_scoring, "score_folder", stopped)
    result = run("score", folder, "--model", model_dir, "--out", out)
    assert result.exit_code == 130
    # the model it loaded, then the stop
    said = result.stderr.strip().splitlines()
    assert len(said) == 2 and said[0].startswith(f"model: {model_dir}, bpd > "), said
    assert said[1] == (f"interrupted before any row was written to {out}; run the same "
                       "command again")


def test_an_unreadable_earlier_output_is_not_called_a_foreign_file(tmp_path: Path) -> None:
    """Whose table it is cannot be told: the refusal says it cannot be read."""
    out = tmp_path / "scores.csv"
    out.write_text("path,bpd,error\n")
    out.chmod(0o000)
    check = ("import sys; from pathlib import Path; from anomaly_flow.score_table import "
             "check_writable\ntry:\n    check_writable(Path(sys.argv[1]))\n"
             "except ValueError as error:\n    print(error)")
    command = [sys.executable, "-c", check, str(out)]
    command = obeying_file_modes(command)
    result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == (
        f"cannot read {out} to check that it is an earlier scores table (Permission "
        "denied); choose another output path or fix its permissions"), result.stderr


def test_heatmaps_that_cannot_be_written_are_counted_and_fail_strict(
        model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every heatmap failing (a full disk; here names taken by other files): a few listed,
    the rest counted, the summary says how many and why, and --strict fails."""
    import logging

    from anomaly_flow.data import write_image_folder
    from anomaly_flow.heatmap import FAILURES_LOGGED

    folder, heat, out = tmp_path / "images", tmp_path / "heat", tmp_path / "s.csv"
    write_image_folder(sample_images(8), folder, "x-")
    heat.mkdir()
    for image in folder.iterdir():
        (heat / image.name).write_text("a file of the user's, not a heatmap")
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.heatmap"):
        result = run("score", folder, "--model", model_dir, "--out", out, "--heatmaps", heat,
                     "--strict", "--workers", "0")
    assert result.exit_code == 1, result.output
    listed = [r for r in caplog.records if r.getMessage().startswith("cannot write heatmap")]
    assert len(listed) == FAILURES_LOGGED < 8
    assert listed[-1].getMessage().endswith("; further failures are counted, not listed")
    assert re.search(rf"wrote 0 heatmaps under {re.escape(str(heat))}; 8 could not be written "
                     r"\(the first, .*x-0000\d\.png: it exists and is not a heatmap; it is "
                     r"left as it is\); make room or fix the folder, then run the same "
                     r"command with --resume to draw them", result.stderr), result.stderr
    assert_one_line_error(result, "8 heatmaps could not be written (--strict)")
    table = read_csv(out)
    assert len(table) == 8  # the table is written all the same
    assert all(p.read_text().startswith("a file of the user's") for p in heat.iterdir())

    for taken in heat.iterdir():  # the folder fixed, as the summary says
        taken.unlink()
    result = run("score", folder, "--model", model_dir, "--out", out, "--heatmaps", heat,
                 "--strict", "--workers", "0", "--resume")
    assert result.exit_code == 0, result.output
    assert f"wrote 8 heatmaps under {heat}\n" in result.stderr
    pd.testing.assert_frame_equal(read_csv(out), table, check_exact=True)


def test_a_missing_folder_and_a_bad_out_are_named_before_any_model_loads(tmp_path: Path) -> None:
    """Both are the user's slips that need no model to find: said at once, not after the
    seconds a model takes to load (or instead of a model error)."""
    missing_model = ("--model", "models:/nope@champion", "--mlruns", tmp_path / "absent")
    result = run("score", tmp_path / "nowhere", *missing_model, "--out", tmp_path / "o.csv")
    assert_one_line_error(result, "image folder not found")
    result = run("score", tmp_path, *missing_model, "--out", tmp_path / "o.txt")
    assert result.exit_code == 2  # a value the option cannot take: a usage error
    assert_one_line_error(result, "Invalid value for --out: cannot tell the output format")
    result = run("score", tmp_path, *missing_model, "--out", tmp_path / ".csv")
    assert result.exit_code == 2  # named as hidden: said so, not "use a name ending in .csv"
    assert_one_line_error(result, f"Invalid value for --out: {tmp_path / '.csv'} is a hidden "
                          "file name without an extension, so its output format is unknown: "
                          "give the table a name, such as scores.csv")


def test_a_temporary_folder_without_room_is_named_not_taken_for_a_missing_model(
        trained: TrainedModel, tmp_path: Path) -> None:
    """MLflow copies a registered model's files into a temporary folder before they are
    read; a full /tmp (here a limit on file sizes, which fails the copy of the weights)
    read as "no model at models:/...", pointing the user at the wrong place."""
    import resource
    import signal

    weights = next(trained.mlruns.rglob("model.safetensors")).stat().st_size
    temporary = tmp_path / "tmp"
    temporary.mkdir()

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails, not the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (weights // 2, resource.RLIM_INFINITY))

    done = subprocess.run(
        [sys.executable, "-m", "anomaly_flow", "score", str(trained.data), "--model",
         trained.alias_uri, "--mlruns", str(trained.mlruns), "--out",
         str(tmp_path / "scores.csv")], capture_output=True, text=True, preexec_fn=limited,
        timeout=300, env={**os.environ, "TMPDIR": str(temporary)})
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert error == (f"Error: cannot load {trained.alias_uri}: its files are in the store, but "
                     f"copying them into the temporary folder {temporary} failed (File too "
                     "large); check that folder, or point TMPDIR at another one"), error
