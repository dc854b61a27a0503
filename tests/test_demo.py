"""The main job end to end: ``anomaly-flow demo`` on the shipped sample, for real."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from anomaly_flow import tracking
from anomaly_flow.calibration import rate_interval
from anomaly_flow.cli import main
from anomaly_flow.fashion_mnist import load_sample


@pytest.mark.slow
def test_demo_trains_calibrates_scores_and_reports(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "anomalous" / "demo"  # a folder above named like a label fools nothing
    result = CliRunner().invoke(
        main, ["demo", "--out", str(out), "--preset", "tiny", "--epochs", "1",
               "--device", "cpu"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "models:/fashion-sneaker@champion" in result.output
    assert "mlflow ui --backend-store-uri sqlite:///" in result.output
    db = f"sqlite:///{out / 'mlruns' / 'mlflow.db'}"
    assert f"serve:    MLFLOW_TRACKING_URI={db} mlflow models serve -m " \
        "models:/fashion-sneaker@champion --env-manager local -p 5001" in result.output
    # the score line it prints works as printed, from another working folder
    (line,) = [x for x in result.output.splitlines() if x.startswith("score:    ")]
    words = shlex.split(line.removeprefix("score:    "))
    assert words[:2] == ["anomaly-flow", "score"] and "--mlruns" in words
    words[words.index("DIR")] = str(out / "data" / "test" / "normal")
    words[words.index("more-scores.csv")] = str(tmp_path / "more.csv")
    monkeypatch.chdir(tmp_path)
    more = CliRunner().invoke(main, words[1:])
    assert more.exit_code == 0, more.output
    assert len(pd.read_csv(tmp_path / "more.csv")) > 0
    # each stage says so without -v: no progress bar shows outside a terminal
    for stage in ("writing the sample images", "training preset 'tiny'", "calibrating at 1%",
                  "scoring", "evaluating every score type"):
        assert f"INFO anomaly_flow.demo: {stage}" in result.stderr, stage

    sample = load_sample()
    table = pd.read_csv(out / "scores.csv", keep_default_na=False, na_values=[""])
    assert len(table) == len(sample.test_images)
    assert table["error"].isna().all()
    is_anomalous = table["path"].map(
        lambda path: Path(path).relative_to(out / "data" / "test").parts[0] == "anomalous")
    assert is_anomalous.sum() == sample.test_is_anomaly.sum()
    # Calibrated on the default score, ensemble; every verdict follows its threshold.
    np.testing.assert_array_equal(table["score"], table["ensemble"])
    assert table["is_anomaly"].notna().all()
    assert (table["p_value"] > 0).all()

    page = (out / "report.html").read_text()
    for heading in ("Summary", "Every score", "Most anomalous test images"):
        assert heading in page
    for name in ("bpd", "complexity", "coarse_complexity", "typicality", "knn", "pixel_knn",
                 "ensemble", "level_1"):
        assert f"<td class='l'>{name}</td>" in page, name
    # the test false-positive rate with its count and chance interval, from the table
    normals = table[~is_anomalous]
    flagged = int(normals["is_anomaly"].astype(bool).sum())
    low, high = rate_interval(flagged, len(normals))
    assert (f"{flagged / len(normals):.4f} ({flagged} of {len(normals)}; 95% interval "
            f"{low:.4f} to {high:.4f})") in page
    assert "data:image/png;base64," in page  # self-contained: figures inlined
    assert "src='http" not in page and 'src="http' not in page
    assert len(list((out / "heatmaps").rglob("*.png"))) == len(table)
    assert "in their standard deviations (bright = unlike a normal image)" in page
    # both galleries say how to read the heatmaps' colours, on the scale the PNGs record
    with Image.open(next((out / "heatmaps").rglob("*.png"))) as heatmap:
        assert heatmap.text["anomaly-flow:scale"] == \
            "inferno 0..5 normal standard deviations (fixed)"
    assert page.count("to yellow at 5 normal standard deviations or more") == 2
    assert (out / "mlruns" / "mlflow.db").is_file()

    # train, calibrate and evaluate runs, the last with every score's AUROC on the test set
    tracking.configure(out / "mlruns")
    runs = mlflow.search_runs(experiment_names=["fashion-sneaker"], output_format="list")
    by_name = {run.info.run_name: run for run in runs}
    assert {"calibrate", "evaluate"} <= set(by_name) and len(runs) == 3
    evaluated = by_name["evaluate"].data.metrics
    assert evaluated["n_normal"] + evaluated["n_anomalous"] == len(table)
    assert evaluated["n_anomalous"] == sample.test_is_anomaly.sum()
    assert f"AUROC {evaluated['ensemble_auroc']:.4f} (ensemble score)" in result.output
    # every score's row, each figure to 4 decimals (the FPR column was 4 significant digits)
    row = (f"<td class='l'>ensemble</td><td>{evaluated['ensemble_auroc']:.4f}</td>"
           f"<td>{evaluated['ensemble_aupr']:.4f}</td>"
           f"<td>{evaluated['ensemble_fpr_at_95_tpr']:.4f}</td>")
    assert row in page, row
    assert re.search(r"INFO anomaly_flow.train: epoch 1 of 1: train ", result.stderr)
    assert by_name["evaluate"].info.run_id in page


@pytest.mark.parametrize(("score", "n_bits", "top"), [
    ("ensemble", 8, "5 normal standard deviations"), ("typicality", 5, "5 normal standard "
     "deviations"), ("bpd", 8, "8 bits/dim"), ("complexity", 5, "5 bits/dim")])
def test_the_reports_heatmap_caption_gives_the_fixed_colour_scale(
        score: str, n_bits: int, top: str) -> None:
    """The scale the heatmaps are drawn on (what each PNG records as anomaly-flow:scale:
    typicality maps 0..5 standard deviations, bits/dim maps 0..n_bits), and the overlay."""
    from anomaly_flow.demo import _heatmap_caption

    caption = _heatmap_caption(score, n_bits=n_bits, image_size=16)
    assert ("inferno's, on one fixed scale for every image, so heatmaps compare: black at 0, "
            f"through purple and orange, to yellow at {top} or more") in caption
    assert f"more opaque where the value is higher (20% at 0 to 80% at {top.split()[0]})" \
        in caption
    assert "drawn over the image as the model saw it (16×16)" in caption


def test_the_reports_note_on_the_runs_escapes_the_stores_folder() -> None:
    from anomaly_flow.demo import _runs_note

    note = _runs_note("sqlite:////tmp/a <b>&c/mlruns/mlflow.db", "0123abc", "4567def")
    assert "<b>" not in note and "&c" not in note
    assert ("<code>mlflow ui --backend-store-uri &#x27;sqlite:////tmp/a &lt;b&gt;&amp;c/"
            "mlruns/mlflow.db&#x27;</code>") in note
    assert "<code>0123abc</code>" in note and "<code>4567def</code>" in note


def test_the_reports_cards_find_the_heatmaps_scoring_named_apart(tmp_path: Path) -> None:
    """``b.jpg`` and ``b.png`` share a plain heatmap name, so scoring draws them as
    ``b.jpg.png`` and ``b.png.png``: each card shows its own file's heatmap, not none."""
    from anomaly_flow.demo import _gallery
    from anomaly_flow.folder_scoring import score_folder
    from anomaly_flow.heatmap import recorded_heatmaps
    from tests.test_scoring import make_tiny_model

    root = tmp_path / "test"
    (root / "shoe").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("b.jpg", "b.png"):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / "shoe" / name)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "shoe" / "plain.png")
    heat = tmp_path / "heatmaps"
    score_folder(make_tiny_model(), None, root, tmp_path / "s.csv", heatmaps=heat)
    assert sorted(p.name for p in (heat / "shoe").iterdir()) == [
        "b.jpg.png", "b.png.png", "plain.png"]
    table = pd.read_csv(tmp_path / "s.csv", keep_default_na=False, na_values=[""])
    cards = _gallery(table, root, heat, recorded_heatmaps(heat))
    for card, path in zip(cards, table["path"], strict=True):
        mine = {"b.jpg": "b.jpg.png", "b.png": "b.png.png"}.get(Path(path).name, "plain.png")
        with Image.open(heat / "shoe" / mine) as drawn:
            np.testing.assert_array_equal(card.heatmap, np.asarray(drawn.convert("RGB")))
        assert (card.title, card.note) == ("shoe", Path(path).name)
    (heat / "shoe" / "plain.png").unlink()  # a file scoring drew no heatmap of: no picture
    assert [c.heatmap is None for c in _gallery(table, root, heat, recorded_heatmaps(heat))] == [
        Path(p).name == "plain.png" for p in table["path"]]


def test_the_reports_detection_rate_per_class_leaves_failed_files_out() -> None:
    """A failed file has no verdict: the rate is over the scored ones, and a class none of
    whose files could be scored says so instead of ``nan%``."""
    from anomaly_flow.demo import _per_class

    table = pd.DataFrame({
        "path": ["/t/bag/1.png", "/t/bag/2.png", "/t/bag/3.png", "/t/coat/1.png"],
        "is_anomaly": [True, False, None, None],
        "error": ["", "", "truncated PNG", "empty file (0 bytes)"]})
    assert _per_class(table) == [
        {"class": "bag", "images": 3, "scored": 2, "detected": "50.0%"},
        {"class": "coat", "images": 1, "scored": 0, "detected": "none scored"}]


@pytest.mark.slow
def test_a_stopped_demo_ends_its_run_and_says_how_to_go_on(tmp_path: Path) -> None:
    """SIGTERM mid-training, as a scheduler stops a job: a message and SIGTERM's status,
    and the MLflow run ends KILLED instead of staying RUNNING."""
    out = tmp_path / "demo"
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    process = subprocess.Popen(
        [sys.executable, "-m", "anomaly_flow", "demo", "--out", str(out), "--preset", "tiny",
         "--epochs", "50", "--device", "cpu"], stderr=subprocess.PIPE, text=True, env=env)
    checkpoints = out / "mlruns" / "checkpoints" / "fashion-sneaker"  # made in the run
    deadline = time.monotonic() + 180
    while not checkpoints.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # until the MLflow run has started
    assert process.poll() is None, "the demo ended before it could be stopped"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert f"demo interrupted; run it again to start over (it rewrites {out})" in stderr
    assert "Traceback" not in stderr, stderr
    tracking.configure(out / "mlruns")
    (run,) = mlflow.search_runs(experiment_names=["fashion-sneaker"], output_format="list")
    assert run.info.status == "KILLED"


def test_the_demo_writes_only_into_a_new_empty_or_earlier_demo_folder(tmp_path: Path) -> None:
    """A folder with someone's own files is refused before anything in it is touched."""
    theirs = tmp_path / "project"
    (theirs / "data" / "train").mkdir(parents=True)
    (theirs / "data" / "train" / "only-copy.png").write_bytes(b"their image")
    (theirs / "scores.csv").write_text("customer,amount\nalice,100\n")
    result = CliRunner().invoke(main, ["demo", "--out", str(theirs)])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [
        f"Error: {theirs} is not empty and no demo wrote it; the demo replaces its images, "
        "scores.csv, heatmaps/ and report.html, so give it a new or empty folder (--out DIR), "
        "or one an earlier demo wrote"]
    assert sorted(p.relative_to(theirs).as_posix() for p in theirs.rglob("*")) == [
        "data", "data/train", "data/train/only-copy.png", "scores.csv"]
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "file")])
    assert result.exit_code == 2 and "is a file" in result.output  # click's own check
    # a folder that cannot be made: under a file (a read-only disk says so likewise)
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "file" / "demo")])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [
        f"Error: cannot write the demo's folder {tmp_path / 'file' / 'demo'}: Not a "
        "directory; give it a writable --out DIR"]
    if not torch.cuda.is_available():  # a device the machine lacks: said before any folder
        result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "new" / "demo"),
                                           "--device", "cuda"])
        assert result.exit_code == 1 and "CUDA" in result.output, result.output
        assert not (tmp_path / "new").exists()


def test_a_second_demo_in_a_folder_a_running_one_holds_is_refused(tmp_path: Path) -> None:
    """It rewrote data/, scores.csv and heatmaps/ under the running one, which then failed
    with a traceback (a file gone from its test folder)."""
    from anomaly_flow.score_table import output_lock

    out = tmp_path / "demo"
    with output_lock(out, holder="demo"):  # the running demo
        result = CliRunner().invoke(main, ["demo", "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [
        f"Error: another demo (pid {os.getpid()} on {socket.gethostname()}) is writing {out}; "
        "wait for it to end, or give this one another folder (--out DIR)"]
    assert not out.exists() and sorted(os.listdir(tmp_path)) == []


def test_the_demo_leaves_a_model_of_its_name_it_did_not_make_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a store of the user's (a shared server), the demo would add versions to someone
    else's fashion-sneaker and move its champion alias: it stops first."""
    db = tmp_path / "shared" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    tracking.configure()
    mlflow.MlflowClient().create_registered_model("fashion-sneaker")
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--preset",
                                       "tiny", "--epochs", "1", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert f"Error: the MLflow store sqlite:///{db} already holds a registered model " \
        "'fashion-sneaker' that anomaly-flow's demo did not make" in result.output
    assert mlflow.MlflowClient().search_model_versions("name='fashion-sneaker'") == []
    assert not (tmp_path / "demo" / "data").exists()  # stopped before any work


def test_the_demo_refuses_to_run_under_torchrun(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Every process of a torchrun would run the whole demo; the first of each host says
    why none does, before anything is written."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for local_rank, said in (("1", []), ("0", [
            "Error: the demo runs in one process, not under torchrun; run anomaly-flow demo "
            "alone, and train on several processes with torchrun ... -m anomaly_flow train"])):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo")])
        assert result.exit_code == 1, result.output
        assert result.output.strip().splitlines() == said
    assert sorted(os.listdir(tmp_path)) == []

