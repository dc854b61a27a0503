"""Tests for :mod:`anomaly_flow.evaluation` and :mod:`anomaly_flow.plots`: option checks
that fail before any scoring, threshold comparison against :mod:`anomaly_flow.calibration`
and detection tables against :mod:`anomaly_flow.detection`, threshold selection with the
session's tiny trained model, and the figures. Scoring real folders (with broken files) is
in ``test_folder_scoring.py``, the checks and warnings on their own in
``test_prechecks.py``, calibration runs against a real store in ``test_cli_calibrate.py``."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from anomaly_flow import plots, tracking
from anomaly_flow.calibration import (
    conformal_threshold,
    cost_threshold,
    f1_threshold,
    youden_threshold,
)
from anomaly_flow.calibration_checks import CalibrationError
from anomaly_flow.config import GlowConfig
from anomaly_flow.data import DataError, write_image_folder
from anomaly_flow.detection import detection_metrics
from anomaly_flow.evaluation import (
    calibrate_model,
    calibrate_scores,
    compare_thresholds,
    detection_table,
    evaluate_scores,
    select_threshold,
)
from anomaly_flow.folder_scoring import FolderScores, score_folder_table
from anomaly_flow.glow import Glow
from tests.conftest import ImageDirs, TrainedModel
from tests.test_scoring import make_tiny_model, sample_images

RNG = np.random.default_rng(7)
NORMAL = RNG.normal(0.0, 1.0, 60)
ANOMALOUS = RNG.normal(1.5, 1.0, 30)


def fake_scores(values: np.ndarray, errors: list[str] | None = None,
                folder: str = "normal") -> FolderScores:
    """FolderScores over given bpd values (NaN where ``errors`` names a reason)."""
    errors = errors or [""] * len(values)
    table = pd.DataFrame({
        "path": [f"/data/{folder}/{i:03d}.png" for i in range(len(values))],
        "bpd": np.where([e == "" for e in errors], values, np.nan),
        "complexity": values - 1.0,
        "coarse_complexity": values / 2 - 1.0,
        "level_1": values / 2, "level_2": values / 2,
        "error": errors,
    })
    return FolderScores(Path(f"/data/{folder}"), table, "fingerprint")


LOADED = tracking.LoadedModel(model=Glow(GlowConfig(image_size=8, levels=2, steps_per_level=1,
                                                   hidden_channels=4)),
                              calibration=None, uri="models:/fake@candidate", name="fake")


# --------------------------------------------------- options refused before any scoring


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"target_fpr": None}, "needs a target false-positive rate"),
    ({"method": "f1", "target_fpr": None}, "pass --anomalous"),
    ({"method": "youden", "target_fpr": 0.1}, "only applies to the conformal method"),
    ({"method": "median", "target_fpr": None}, "unknown method"),
    ({"score": "auto", "target_fpr": 0.1}, "pass --anomalous DIR, or name a score"),
])
def test_inconsistent_options_fail_before_loading(tmp_path: Path, kwargs: dict,
                                                  message: str) -> None:
    # The model URI does not exist: the check must come first.
    with pytest.raises(CalibrationError, match=message):
        calibrate_model("models:/does-not-exist@candidate", tmp_path, **kwargs)


def test_too_small_folder_refused_before_loading(tmp_path: Path) -> None:
    write_image_folder(sample_images(20), tmp_path / "few", "n-")
    with pytest.raises(CalibrationError) as info:
        calibrate_model("models:/does-not-exist@candidate", tmp_path / "few", target_fpr=0.01)
    assert "at least 99" in str(info.value) and "only 20" in str(info.value)


def test_an_image_labelled_both_ways_is_named_in_a_warning(
        tmp_path: Path, mlruns: Path, caplog: pytest.LogCaptureFixture) -> None:
    images = sample_images(8)
    write_image_folder(images, tmp_path / "normal", "n-")
    write_image_folder(np.concatenate([images[5:6], sample_images(3, offset=40)]),
                       tmp_path / "anomalous", "a-")
    model = make_tiny_model()
    normal = score_folder_table(model, tmp_path / "normal")
    anomalous = score_folder_table(model, tmp_path / "anomalous")
    loaded = tracking.LoadedModel(model=model, calibration=None, uri="models:/tiny@candidate")
    with caplog.at_level(logging.WARNING):
        outcome = evaluate_scores(loaded, normal, anomalous)
    [message] = [r.getMessage() for r in caplog.records if "labelled both" in r.getMessage()]
    assert message.startswith(f"1 image(s) of {tmp_path / 'anomalous'} have the same content "
                              f"as an image of {tmp_path / 'normal'} (e.g. "
                              f"{tmp_path / 'anomalous' / 'a-00000.png'} and "
                              f"{tmp_path / 'normal' / 'n-00005.png'})")
    assert outcome.metrics["n_anomalous"] == 4  # counted, not dropped: the warning says so
    # a copy of the normal folder (the same folder by path is refused before scoring):
    # every readable anomalous image labelled both ways leaves nothing to tell apart
    copy = tmp_path / "copy"
    write_image_folder(images[:3], copy, "c-")
    (copy / "broken.png").write_bytes(b"not an image")  # unreadable: carries no label
    copied = score_folder_table(model, copy)
    with pytest.raises(CalibrationError) as refused:
        evaluate_scores(loaded, normal, copied)
    assert str(refused.value) == (
        f"every readable image of {copy} (3) has the same content as an image of "
        f"{tmp_path / 'normal'} (e.g. {copy / 'c-00000.png'} and "
        f"{tmp_path / 'normal' / 'n-00000.png'}): the two folders hold the same images, so "
        "there is nothing to tell apart; pass held-out normal images as --normal and "
        "anomalous ones as --anomalous")


def test_failed_images_do_not_count_towards_the_minimum() -> None:
    # alpha = 0.1 needs 9; 12 files of which 4 failed (left out) leave 8.
    errors = [""] * 8 + ["cannot identify image file"] * 4
    with pytest.raises(CalibrationError) as info:
        calibrate_scores(LOADED, fake_scores(NORMAL[:12], errors), target_fpr=0.1)
    text = str(info.value)
    assert "at least 9" in text and "only 8 of the 12" in text and "4 left out" in text


def test_unknown_score_is_refused() -> None:
    with pytest.raises(CalibrationError,
                       match="choose one of bpd, complexity, coarse_complexity, level_1, level_2"):
        calibrate_scores(LOADED, fake_scores(NORMAL), score="level_3", target_fpr=0.1)


def test_auto_score_without_anomalies_says_what_to_do() -> None:
    with pytest.raises(CalibrationError) as info:
        calibrate_scores(LOADED, fake_scores(NORMAL), score="auto", target_fpr=0.1)
    text = str(info.value)
    assert "highest AUROC on labelled anomalies" in text
    assert "pass --anomalous DIR, or name a score (bpd, complexity" in text


# --------------------------------------------------------- thresholds and detection tables


def test_compare_thresholds_matches_the_calibration_module() -> None:
    """Each row's threshold is the calibration module's for its method (the conformal
    row's too), and its fpr, precision, recall, f1 and cost are counted here from the
    scores under ``score > threshold``."""
    normal, anomalous = fake_scores(NORMAL), fake_scores(ANOMALOUS, folder="anomalous")
    table = compare_thresholds(normal, anomalous, "bpd", target_fpr=0.05, cost_fp=1.0,
                               cost_fn=5.0)
    assert list(table.index) == ["conformal", "f1", "youden", "cost"]
    expected = {
        "conformal": conformal_threshold(NORMAL, 0.05).value,
        "f1": f1_threshold(NORMAL, ANOMALOUS).value,
        "youden": youden_threshold(NORMAL, ANOMALOUS).value,
        "cost": cost_threshold(NORMAL, ANOMALOUS, 1.0, 5.0).value,
    }
    # rows to tell apart (F1 and Youden's J pick the same cut on these scores)
    assert len(set(expected.values())) == 3
    for method, value in expected.items():
        assert table.loc[method, "threshold"] == value
        fp, tp = int(np.sum(value < NORMAL)), int(np.sum(value < ANOMALOUS))  # score > t
        fn = len(ANOMALOUS) - tp
        assert table.loc[method, "fpr"] == pytest.approx(fp / len(NORMAL), abs=1e-12)
        assert table.loc[method, "recall"] == pytest.approx(tp / len(ANOMALOUS), abs=1e-12)
        assert table.loc[method, "precision"] == pytest.approx(tp / (tp + fp), abs=1e-12)
        assert table.loc[method, "f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
        assert table.loc[method, "cost"] == fp + 5 * fn
    # No other method's threshold is cheaper than the cost threshold.
    assert table.loc["cost", "cost"] == table["cost"].min()


def test_select_threshold_compares_the_methods_on_the_models_scores_and_registers_nothing(
        trained: TrainedModel, image_dirs: ImageDirs) -> None:
    """Without ``register``: the table is :func:`compare_thresholds` on the model's default
    score over both folders, handed to ``on_compared`` as it is returned, and the store
    gets no version."""
    client = mlflow.MlflowClient()
    versions = len(client.search_model_versions(f"name = '{trained.name}'"))
    shown = []
    outcome = select_threshold(trained.version_uri, image_dirs.calibration,
                               image_dirs.test_anomalous, target_fpr=0.1, cost_fn=4.0,
                               device="cpu", mlruns=trained.mlruns, progress=False,
                               on_compared=shown.append)
    assert len(shown) == 1 and shown[0] is outcome
    model = tracking.load_model(trained.version_uri).model
    normal = score_folder_table(model, image_dirs.calibration)
    anomalous = score_folder_table(model, image_dirs.test_anomalous)
    assert (outcome.score, outcome.score_selection, outcome.registered) == ("ensemble", None,
                                                                           None)
    assert (outcome.n_normal, outcome.n_anomalous) == (len(normal.values("ensemble")),
                                                       len(anomalous.values("ensemble")))
    pd.testing.assert_frame_equal(outcome.table, compare_thresholds(
        normal, anomalous, "ensemble", target_fpr=0.1, cost_fn=4.0))
    assert list(outcome.table.index) == ["conformal", "f1", "youden", "cost"]
    assert len(client.search_model_versions(f"name = '{trained.name}'")) == versions


def test_select_threshold_registers_the_method_it_is_asked_for_on_the_score_auto_chose(
        trained: TrainedModel, image_dirs: ImageDirs, mlruns: Path) -> None:
    """``register="youden"`` with ``score="auto"``: the new version's calibration is on the
    score the comparison chose, with the comparison's Youden threshold and its evidence.
    In a store of its own (the session's store keeps one version for other tests)."""
    tracking.configure(trained.mlruns)
    weights = tracking.load_model(trained.version_uri).model
    tracking.configure(mlruns)
    with tracking.start_run("select", "train-copy") as run:
        uri = tracking.log_model(run, weights)
    tracking.register_model(uri, "select", alias="candidate")
    shown = []
    outcome = select_threshold("models:/select@candidate", image_dirs.calibration,
                               image_dirs.test_anomalous, score="auto", register="youden",
                               device="cpu", mlruns=mlruns, progress=False,
                               on_compared=shown.append)
    assert len(shown) == 1 and shown[0].registered is None
    registered = outcome.registered
    assert registered is not None and registered.model_uri == "models:/select/2"
    assert outcome.score_selection is not None
    assert outcome.score == outcome.score_selection.chosen
    calibration = tracking.load_model(registered.model_uri).calibration
    assert calibration.score_name == outcome.score
    assert calibration.threshold.method == "youden"
    assert calibration.threshold.value == outcome.table.loc["youden", "threshold"]
    assert calibration.score_selection is not None
    assert calibration.score_selection.auroc == outcome.score_selection.auroc
    assert mlflow.get_run(registered.run_id).info.run_name == "select-threshold-youden"
    assert not registered.promoted


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"register": "conformal"}, "needs a target false-positive rate"),
    ({"promote": True}, "moves champion to the version register=METHOD makes"),
    ({"register": "median"}, "unknown method 'median'"),
    ({"score": "auto", "target_fpr": 1e-300}, r"at least 1e\+300 held-out normal images"),
])
def test_select_threshold_refuses_inconsistent_options_before_loading(
        image_dirs: ImageDirs, kwargs: dict, message: str) -> None:
    # The model URI does not exist: the check must come first.
    with pytest.raises(CalibrationError, match=message):
        select_threshold("models:/does-not-exist@candidate", image_dirs.calibration,
                         image_dirs.test_anomalous, **kwargs)


def test_select_threshold_refuses_a_score_the_model_lacks_before_scoring(
        trained: TrainedModel, image_dirs: ImageDirs, monkeypatch: pytest.MonkeyPatch) -> None:
    """As calibrate_model does: minutes of scoring do not come before this refusal."""
    from anomaly_flow import evaluation

    def not_called(*args: object, **kwargs: object) -> None:
        raise AssertionError("a folder was scored")

    monkeypatch.setattr(evaluation, "score_folder_table", not_called)
    with pytest.raises(CalibrationError, match="unknown score 'level_7' for this model"):
        select_threshold(trained.version_uri, image_dirs.calibration,
                         image_dirs.test_anomalous, score="level_7", device="cpu",
                         mlruns=trained.mlruns)


def test_detection_table_has_every_score_and_matches_sklearn_metrics() -> None:
    """Each row holds the metrics of its own column: the five columns here rank the
    images differently, so a row computed from another column's values fails."""
    rng = np.random.default_rng(11)

    def scores(values: np.ndarray, folder: str) -> FolderScores:
        table = pd.DataFrame({
            "path": [f"/data/{folder}/{i:03d}.png" for i in range(len(values))],
            "bpd": values, "complexity": values + rng.normal(0, 1.0, len(values)),
            "coarse_complexity": rng.normal(0, 1.0, len(values)), "level_1": -values,
            "level_2": values + rng.normal(0, 3.0, len(values)), "error": "",
        })
        return FolderScores(Path(f"/data/{folder}"), table, "fingerprint")

    normal, anomalous = scores(NORMAL, "normal"), scores(ANOMALOUS, "anomalous")
    names = ["bpd", "complexity", "coarse_complexity", "level_1", "level_2"]
    table = detection_table(normal, anomalous, names)
    assert list(table.index) == names
    assert table["auroc"].nunique() == len(names)
    for name in names:
        reference = detection_metrics(normal.table[name].to_numpy(),
                                      anomalous.table[name].to_numpy())
        assert table.loc[name, "auroc"] == reference.auroc
        assert table.loc[name, "aupr"] == reference.aupr
        assert table.loc[name, "fpr_at_95_tpr"] == reference.fpr_at_95_tpr
        assert (table.loc[name, "n_normal"], table.loc[name, "n_anomalous"]) == (60, 30)
    # A reversed score ranks the pairs the other way round.
    assert table.loc["level_1", "auroc"] == pytest.approx(1 - table.loc["bpd", "auroc"])


def test_detection_table_names_an_unscorable_folder_and_warns_once(
        caplog: pytest.LogCaptureFixture) -> None:
    names = ["bpd", "complexity", "coarse_complexity", "level_1", "level_2"]
    broken = fake_scores(ANOMALOUS[:3], ["cannot identify image file"] * 3, "anomalous")
    with caplog.at_level(logging.WARNING), pytest.raises(
            DataError, match=r"no score type could be evaluated: no image of /data/anomalous "
                             r"could be scored"):
        detection_table(fake_scores(NORMAL), broken, names)
    assert not caplog.records  # the error says it all: no warning per score before it
    partial = fake_scores(ANOMALOUS, folder="anomalous")
    partial.table["level_2"] = np.nan
    with caplog.at_level(logging.WARNING):
        table = detection_table(fake_scores(NORMAL), partial, names)
    assert list(table.index) == names[:-1]
    assert [r.getMessage() for r in caplog.records] == [
        "score(s) level_2 have no finite values on one side; left out"]


# ----------------------------------------------------------------------------------- plots


def test_histogram_draws_both_groups_and_the_threshold(tmp_path: Path) -> None:
    fig = plots.score_histogram(NORMAL, ANOMALOUS, threshold=1.25, score_name="bpd")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "threshold 1.25" in labels
    assert any(label.startswith("normal (n=60)") for label in labels)
    assert any(label.startswith("anomalous (n=30)") for label in labels)
    assert [line.get_xdata()[0] for line in ax.lines] == [1.25]
    fig.savefig(tmp_path / "hist.png")
    assert (tmp_path / "hist.png").stat().st_size > 1000


@pytest.mark.parametrize("scores", [
    [3.0, 3.0, 3.0],
    [1.0, 1.0 + 2.0**-52, 1.0],  # one ulp apart: 50 bins would not be increasing edges
    [4.5e6, 4.5e6 * (1 + 1e-15)],
])
def test_histogram_of_scores_equal_or_one_ulp_apart_draws_one_visible_bar(
        tmp_path: Path, scores: list[float]) -> None:
    fig = plots.score_histogram(np.array(scores), threshold=scores[0], score_name="bpd")
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    assert low < min(scores) and max(scores) < high
    assert high - low >= 1.0  # wide enough to see
    assert sum(patch.get_height() > 0 for patch in ax.patches) >= 1
    fig.savefig(tmp_path / "hist.png")


def test_roc_and_pr_curves_label_every_score_with_its_area(tmp_path: Path) -> None:
    curves = {"bpd": (NORMAL, ANOMALOUS), "complexity": (NORMAL, -ANOMALOUS)}
    auroc = detection_metrics(NORMAL, ANOMALOUS).auroc
    roc = plots.roc_curves(curves, operating_points={"bpd": (0.1, 0.5)})
    labels = roc.axes[0].get_legend_handles_labels()[1]
    assert labels[0] == f"bpd (AUROC {auroc:.3f})"
    assert labels[1].startswith("complexity (AUROC")
    pr = plots.pr_curves(curves)
    aupr = detection_metrics(NORMAL, ANOMALOUS).aupr
    assert pr.axes[0].get_legend_handles_labels()[1][0] == f"bpd (AP {aupr:.3f})"
    roc.savefig(tmp_path / "roc.png")
    pr.savefig(tmp_path / "pr.png")


def test_curves_need_both_classes_and_grids_hide_unused_panels() -> None:
    with pytest.raises(ValueError, match="both normal and anomalous"):
        plots.roc_curves({"bpd": (NORMAL, [])})
    fig = plots.score_histograms({"bpd": (NORMAL, ANOMALOUS), "level_1": (NORMAL, None)},
                                 thresholds={"bpd": 0.5}, columns=3)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["bpd", "level_1"]


def test_histogram_piles_far_anomalies_into_the_last_bar_so_normals_stay_readable(
        tmp_path: Path) -> None:
    # anomalies scoring thousands where normal images score a few units (a wrong-colour
    # part under a colour model): one axis for all would squeeze every normal into one bar
    anomalous = np.concatenate([ANOMALOUS, [2500.0, 9000.0]])
    fig = plots.score_histogram(NORMAL, anomalous, threshold=1.25, score_name="bpd")
    ax = fig.axes[0]
    high = ax.get_xlim()[1]
    assert high < 100  # the normal scores' own scale, not the outliers'
    labels = ax.get_legend_handles_labels()[1]
    assert any(label.startswith("anomalous (n=32; 2 > ") and label.endswith("in last bar)")
               for label in labels)
    normal_bars = [patch for patch in ax.patches
                   if patch.get_facecolor()[:3] == ax.patches[0].get_facecolor()[:3]]
    assert sum(patch.get_height() > 0 for patch in normal_bars) > 5  # spread, not one bar
    fig.savefig(tmp_path / "hist.png")


def test_histogram_keeps_the_whole_axis_for_anomalies_that_are_merely_well_apart() -> None:
    """Normal scores in a tight cluster and anomalies well above it, as a good model
    gives them: the normals fill more than a tenth of the axis, so nothing is piled."""
    rng = np.random.default_rng(0)
    normal = rng.normal(1.05, 0.02, 300)
    anomalous = rng.uniform(1.4, 2.0, 40)
    fig = plots.score_histogram(normal, anomalous, threshold=1.1, score_name="bpd")
    ax = fig.axes[0]
    assert ax.get_xlim()[1] >= anomalous.max()
    assert not any("last bar" in label for label in ax.get_legend_handles_labels()[1])
