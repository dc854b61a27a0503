"""``anomaly-flow calibrate`` and ``anomaly-flow evaluate`` with real PNG folders, the
session's tiny trained model and a real sqlite MLflow store of this module's own (the
shared store's model must not get new versions or aliases)."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import safetensors.torch
from click.testing import CliRunner, Result

from anomaly_flow import tracking
from anomaly_flow.calibration import (
    Calibration,
    conformal_threshold,
    cost_threshold,
    f1_threshold,
    shown_precision,
    youden_threshold,
)
from anomaly_flow.calibration_checks import CalibrationError
from anomaly_flow.cli import main
from anomaly_flow.detection import detection_metrics, select_score
from anomaly_flow.evaluation import calibrate_scores, evaluate_scores
from anomaly_flow.fingerprint import fingerprint_and_digests
from anomaly_flow.folder_scoring import FolderScores, score_folder_table
from anomaly_flow.glow import REFERENCE_KEYS
from anomaly_flow.scoring import score_names
from tests.conftest import (
    ImageDirs,
    TrainedModel,
    corrupt_png,
    new_store,
    obeying_file_modes,
    stop_during,
)
from tests.test_scoring import make_tiny_model

NAME = "cal-parts"
CANDIDATE = f"models:/{NAME}@candidate"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, _trained_store: TrainedModel,
          mlflow_db_template: Path) -> Path:
    """A store of its own holding the session's trained weights as ``NAME@candidate``,
    with the record of the images they were trained on."""
    tracking.configure(_trained_store.mlruns)
    loaded = tracking.load_model(_trained_store.version_uri)
    weights = loaded.model
    lineage = {key: loaded.tags[key] for key in ("data_fingerprint", "val_bpd")}
    trained_on = tracking.training_image_digests(_trained_store.run_id)
    assert trained_on is not None
    mlruns = new_store(tmp_path_factory.mktemp("calibrate") / "mlruns", mlflow_db_template)
    tracking.configure(mlruns)
    with tracking.start_run(NAME, "train-copy") as run:
        uri = tracking.log_model(run, weights)
        run.log_text("".join(f"{d}\n" for d in sorted(trained_on)), "training_images.sha256")
    tracking.register_model(uri, NAME, alias="candidate",
                            tags={"training_run_id": run.run_id, **lineage})
    return mlruns


@pytest.fixture
def client(store: Path) -> mlflow.MlflowClient:
    tracking.configure(store)
    return mlflow.MlflowClient()


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result: Result, *expected: str) -> None:
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for text in expected:
        assert text in errors[0], errors[0]


def run_id_from(result: Result) -> str:
    lines = [line for line in result.stdout.splitlines() if line.startswith("run: ")]
    assert lines, result.stdout
    return lines[-1].removeprefix("run: ").split(";")[0]


def model_uri_from(result: Result) -> str:
    lines = [line for line in result.stdout.splitlines() if line.startswith("model: ")]
    assert len(lines) == 1, result.stdout
    return lines[0].removeprefix("model: ")


def test_calibrate_promote_then_score_with_champion(
        store: Path, client: mlflow.MlflowClient, image_dirs: ImageDirs, tmp_path: Path) -> None:
    normal = tmp_path / "held-out"
    shutil.copytree(image_dirs.calibration, normal)
    corrupt_png(normal / "zz-broken.png")
    n_good = len(image_dirs.files(image_dirs.calibration))
    aliases = client.get_registered_model(NAME).aliases  # the store is the module's

    result = run("calibrate", "--model", CANDIDATE, "--normal", normal, "--target-fpr", "0.1",
                 "--promote", "--device", "cpu", "--mlruns", store)
    assert result.exit_code == 0, result.output
    uri = model_uri_from(result)
    new_version = uri.rsplit("/", 1)[1]
    assert uri == f"models:/{NAME}/{new_version}" and new_version != "1"
    # where champion was, said and tagged: a promotion can be undone
    previous = aliases.get("champion")
    assert f"run: {run_id_from(result)}; alias 'champion' " + (
        f"set to version {new_version} (it pointed at none)" if previous is None else
        f"moved from version {previous} to {new_version} (to undo: anomaly-flow promote "
        f"models:/{NAME}/{previous})") in result.stdout
    assert client.get_model_version(NAME, new_version).tags.get("previous_champion") == (
        None if previous is None else str(previous))
    # The broken file is reported, with its reason, and left out.
    assert "1 of 41 image files in " in result.stderr
    assert "zz-broken.png: " in result.stderr

    champion = tracking.load_model(f"models:/{NAME}@champion")
    assert champion.version == new_version
    calibration = champion.calibration
    assert isinstance(calibration, Calibration)
    # it records the weights it was fitted to, those of the version it calibrated
    assert calibration.model_digest == champion.model.digest() \
        == tracking.load_model(CANDIDATE).model.digest()
    threshold = calibration.threshold
    assert (threshold.method, threshold.alpha, threshold.n_calibration) == ("conformal", 0.1,
                                                                             n_good)
    # No --score: the default for a model with a normal reference is ensemble.
    assert calibration.score_name == "ensemble"
    assert f"threshold: {threshold.value} (ensemble, conformal, target FPR 0.1)" \
        in result.stdout
    # The stored scores are this model's scores of the good files, and the threshold is
    # the conformal one for them.
    rescored = score_folder_table(champion.model, image_dirs.calibration).values("ensemble")
    np.testing.assert_allclose(calibration.sorted_scores, np.sort(rescored), rtol=1e-6)
    assert threshold.value == conformal_threshold(calibration.sorted_scores, 0.1).value

    # MLflow: the version is tagged with its calibration run, which links to training.
    version = client.get_model_version(NAME, new_version)
    calibration_run = client.get_run(version.tags["calibration_run_id"])
    assert calibration_run.info.run_id == run_id_from(result)
    candidate = client.get_model_version(NAME, "1")
    assert calibration_run.data.tags["training_run_id"] == candidate.tags["training_run_id"]
    # the model it calibrated, by version and weights: the alias given moves on
    assert {key: calibration_run.data.tags[key] for key in
            ("model_uri", "model_name", "model_version", "model_digest")} == {
        "model_uri": CANDIDATE, "model_name": NAME, "model_version": "1",
        "model_digest": calibration.model_digest}
    # what an audit of the champion asks, on the version itself: the training data and
    # how well it was learned (from the source version), the calibration images
    for key in ("data_fingerprint", "val_bpd"):
        assert version.tags[key] == candidate.tags[key], key
    assert version.tags["calibration_fingerprint"] == \
        calibration_run.data.tags["normal_fingerprint"]
    assert calibration_run.data.metrics["threshold"] == threshold.value
    assert calibration_run.data.metrics["n_failed_normal"] == 1
    artifacts = {a.path for a in client.list_artifacts(calibration_run.info.run_id)}
    assert {"calibration.json", "score_histogram.png", "failed_images.json"} <= artifacts
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == new_version

    # `score` with the champion: p-values and verdicts follow the stored threshold.
    out = tmp_path / "scores.csv"
    result = run("score", image_dirs.test_normal.parent, "--model", f"models:/{NAME}@champion",
                 "--out", out, "--device", "cpu", "--mlruns", store)
    assert result.exit_code == 0, result.output
    # which version the alias named, and what decides: a line to keep with the table
    assert (f"model: models:/{NAME}/{new_version} (models:/{NAME}@champion), ensemble > "
            f"{threshold.value:.6g} is anomalous (conformal threshold)") in result.stderr
    table = pd.read_csv(out)
    assert len(table) == 32 and table["error"].isna().all()
    scores = table["score"].to_numpy(float)
    is_anomaly = table["is_anomaly"].astype(bool).to_numpy()
    np.testing.assert_array_equal(scores, table["ensemble"].to_numpy(float))
    np.testing.assert_array_equal(is_anomaly, scores > threshold.value)
    np.testing.assert_array_equal(table["p_value"] <= 0.1, is_anomaly)
    np.testing.assert_array_equal(table["p_value"], calibration.p_values(scores))

    # evaluated on its own calibration images, the champion's FPR is the one it was fitted
    # to: said; on other normal images nothing is said
    reused = run("evaluate", "--model", f"models:/{NAME}@champion", "--normal",
                 image_dirs.calibration, "--anomalous", image_dirs.test_anomalous,
                 "--device", "cpu", "--mlruns", store)
    assert reused.exit_code == 0, reused.output
    assert f"{n_good} of the {n_good} normal images in " in reused.stderr
    assert "almost surely, its calibration images" in reused.stderr
    fresh = run("evaluate", "--model", f"models:/{NAME}@champion", "--normal",
                image_dirs.test_normal, "--anomalous", image_dirs.test_anomalous,
                "--device", "cpu", "--mlruns", store)
    assert fresh.exit_code == 0 and "calibration images" not in fresh.stderr, fresh.output

    # calibrating the champion again: told that its calibration is replaced, and how to
    # keep its score when the default differs
    again = run("calibrate", "--model", f"models:/{NAME}@champion", "--normal", normal,
                "--anomalous", image_dirs.test_anomalous, "--target-fpr", "0.2", "--score",
                "bpd", "--device", "cpu", "--mlruns", store)
    assert again.exit_code == 0, again.output
    # the anomalies only measure a conformal threshold, which normal images alone set
    assert re.search(r"; precision \S+, recall \S+, F1 \S+ on \d+ anomalies$",
                     again.stdout, re.MULTILINE), again.stdout
    assert f"models:/{NAME}@champion already carries a calibration (ensemble, conformal " \
        f"threshold {threshold.value:.6g}); the new version replaces it with one on bpd" \
        in again.stderr


def test_a_store_lost_after_the_registration_says_what_was_registered_and_not_promoted(
        store: Path, client: mlflow.MlflowClient, image_dirs: ImageDirs,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A tracking server that dies between the registration and the alias: the version is
    whole, champion did not move, and the message says both, and how to finish, where
    running the command again would leave that version unnamed. The version carries no
    previous_champion, since no promotion happened."""
    from anomaly_flow.tracking import models
    from anomaly_flow.tracking.store import TrackingError

    def server_gone(*args: object, **kwargs: object) -> None:
        raise TrackingError("the MLflow tracking server became unreachable (no connection "
                            "could be made); check MLFLOW_TRACKING_URI, then run the "
                            "command again")

    before = client.get_registered_model(NAME).aliases.get("champion")
    monkeypatch.setattr(models, "set_alias", server_gone)
    result = run("calibrate", "--model", CANDIDATE, "--normal", image_dirs.calibration,
                 "--target-fpr", "0.1", "--promote", "--device", "cpu", "--mlruns", store)
    assert_one_line_error(result, "the MLflow tracking server became unreachable")
    made = max(int(v.version) for v in client.search_model_versions(f"name='{NAME}'"))
    assert (f"; before it failed, it registered models:/{NAME}/{made}, which is whole, but "
            f"did not move alias 'champion' to it (to do so: anomaly-flow promote "
            f"models:/{NAME}/{made}); use it rather than running the command again for "
            "another version") in result.stderr
    assert client.get_registered_model(NAME).aliases.get("champion") == before
    assert "previous_champion" not in client.get_model_version(NAME, str(made)).tags

    # the pipeline script says it in the same words
    from tests.test_pipelines import load_script

    argv = ["--model", CANDIDATE, "--normal", str(image_dirs.calibration), "--target-fpr",
            "0.1", "--promote", "--device", "cpu", "--mlruns", str(store)]
    assert load_script("calibrate").main(argv) == 1
    made = max(int(v.version) for v in client.search_model_versions(f"name='{NAME}'"))
    err = capsys.readouterr().err
    assert err.startswith("error: the MLflow tracking server became unreachable"), err
    assert (f"; before it failed, it registered models:/{NAME}/{made}, which is whole, but "
            f"did not move alias 'champion' to it (to do so: anomaly-flow promote "
            f"models:/{NAME}/{made}); use it rather") in err


def test_promote_moves_champion_to_a_calibrated_version_and_back(
        store: Path, client: mlflow.MlflowClient, image_dirs: ImageDirs,
        tmp_path: Path) -> None:
    """A version calibrated without --promote is promoted by name; the line printed says
    how to undo it, and the undo works the same way. Uncalibrated versions, thresholds
    that decide nothing, and what is no registered version are refused, each in a line."""
    result = run("calibrate", "--model", CANDIDATE, "--normal", image_dirs.calibration,
                 "--target-fpr", "0.1", "--device", "cpu", "--mlruns", store)
    assert result.exit_code == 0, result.output
    made = model_uri_from(result)
    version = made.rsplit("/", 1)[1]
    def champion() -> str | None:
        found = client.get_registered_model(NAME).aliases.get("champion")
        return None if found is None else str(found)

    before = champion()
    promoted = run("promote", made, "--mlruns", store)
    assert promoted.exit_code == 0, promoted.output
    assert champion() == version
    if before is None:
        assert promoted.stdout == \
            f"alias 'champion' set to version {version} (it pointed at none)\n"
    else:
        assert promoted.stdout == (f"alias 'champion' moved from version {before} to "
                                   f"{version} (to undo: anomaly-flow promote "
                                   f"models:/{NAME}/{before})\n")
        assert client.get_model_version(NAME, version).tags["previous_champion"] == before
        undone = run("promote", f"models:/{NAME}/{before}", "--mlruns", store)
        assert undone.exit_code == 0, undone.output
        assert champion() == before
        assert client.get_model_version(NAME, before).tags["previous_champion"] == version
        run("promote", made, "--mlruns", store)
    # the run that registered it names it too
    by_run = run("promote", f"runs:/{run_id_from(result)}/model", "--mlruns", store)
    assert by_run.stdout == f"alias 'champion' already points at {made}; nothing moved\n"
    again = run("promote", f"models:/{NAME}@champion", "--mlruns", store)
    assert again.stdout == f"alias 'champion' already points at {made}; nothing moved\n"

    # a cost threshold that flags the one (normal-looking) anomaly it was given: nothing
    loaded = tracking.load_model(CANDIDATE)
    table = score_folder_table(loaded.model, image_dirs.test_normal).table
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(Path(table.loc[table["complexity"].idxmin(), "path"]), one / "x.png")
    result = run("calibrate", "--model", CANDIDATE, "--normal", image_dirs.calibration,
                 "--anomalous", one, "--method", "cost", "--score", "complexity",
                 "--cost-fp", "4", "--cost-fn", "1", "--device", "cpu", "--mlruns", store)
    assert result.exit_code == 0, result.output
    undecided = model_uri_from(result)
    for uri, expected in [
            (undecided, "not promoted: the cost threshold "),
            (f"models:/{NAME}/latest", "not promoted: the cost threshold "),  # undecided's
            (f"models:/{NAME}/1", f"models:/{NAME}/1 is not calibrated, so as champion it "
                                  "would give scores but no verdicts; calibrate it with "
                                  "--promote"),
            (f"models:/{NAME}/999", "has no version 999"),
            (str(tmp_path), "is not a registered model version, and promote moves alias "
                            "'champion' of a registered model; give models:/NAME/VERSION"),
            # promote takes no folder, so its advice names none
            (str(tmp_path / "bogus"), "is neither a model URI nor an existing folder; use "
                                      "models:/NAME@ALIAS, models:/NAME/VERSION or "
                                      "runs:/RUN_ID/model (see"),
            (__file__, "is a file, not a model; use models:/NAME@ALIAS, "
                       "models:/NAME/VERSION or runs:/RUN_ID/model (see")]:
        assert_one_line_error(run("promote", uri, "--mlruns", store), expected)
    assert "flags none of the 1 anomalous images, so as champion it would decide nothing" \
        in run("promote", undecided, "--mlruns", store).stderr
    assert champion() == version


def with_broken_files(source: Path, target: Path, names: list[str]) -> Path:
    """A copy of ``source`` plus files that are not images: garbage, empty, truncated."""
    shutil.copytree(source, target)
    real = next(iter(sorted(source.glob("*.png")))).read_bytes()
    for i, name in enumerate(names):
        kind = i % 3
        if kind == 0:
            corrupt_png(target / name)
        elif kind == 1:
            (target / name).write_bytes(b"")
        else:
            (target / name).write_bytes(real[: len(real) // 2])
    return target


def test_calibrate_reports_each_unreadable_file_once(store: Path, image_dirs: ImageDirs,
                                                    tmp_path: Path) -> None:
    broken_normal = ["zz-garbage-normal.png", "zz-empty-normal.png", "zz-truncated-normal.png"]
    broken_anomalous = ["zz-garbage-anomaly.png", "zz-empty-anomaly.png"]
    normal = with_broken_files(image_dirs.calibration, tmp_path / "normal", broken_normal)
    anomalous = with_broken_files(image_dirs.test_anomalous, tmp_path / "anomalous",
                                  broken_anomalous)
    result = run("calibrate", "--model", CANDIDATE, "--normal", normal, "--anomalous",
                 anomalous, "--target-fpr", "0.1", "--device", "cpu", "--mlruns", store)
    assert result.exit_code == 0, result.output
    for name in broken_normal + broken_anomalous:
        assert result.output.count(name) == 1, result.output
    assert result.stderr.count("3 of 43 image files in ") == 1, result.stderr
    assert result.stderr.count("2 of 18 image files in ") == 1, result.stderr
    assert "failed_images.json" not in result.output  # every file was named already


def test_evaluate_names_ten_unreadable_files_once_and_points_to_the_rest(
        store: Path, client: mlflow.MlflowClient, image_dirs: ImageDirs, tmp_path: Path) -> None:
    broken = [f"zz-broken-{i:02d}.png" for i in range(12)]
    anomalous = with_broken_files(image_dirs.test_anomalous, tmp_path / "anomalous", broken)
    result = run("evaluate", "--model", CANDIDATE, "--normal", image_dirs.test_normal,
                 "--anomalous", anomalous, "--device", "cpu", "--mlruns", store)
    assert result.exit_code == 0, result.output
    counts = [result.output.count(name) for name in broken]
    assert max(counts) == 1 and sum(counts) == 10, result.output
    assert result.output.count("... and 2 more") == 1, result.output
    assert result.output.count("failed_images.json") == 1, result.output
    assert "12 anomalous" in result.stderr
    # The artifact holds all twelve, with their reasons.
    run_id = run_id_from(result)
    stored = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="failed_images.json", dst_path=str(tmp_path / "dl")))
        .read_text())
    assert sorted(Path(row["path"]).name for row in stored["anomalous"]) == broken
    assert stored["normal"] == [] and all(row["reason"] for row in stored["anomalous"])


def test_refusal_when_too_few_normal_images(store: Path, image_dirs: ImageDirs) -> None:
    n = len(image_dirs.files(image_dirs.calibration))
    result = run("calibrate", "--model", CANDIDATE, "--normal", image_dirs.calibration,
                 "--target-fpr", "0.01", "--device", "cpu", "--mlruns", store)
    assert result.exit_code == 1
    assert_one_line_error(result, "at least 99 held-out normal images", f"only {n}")


def test_calibration_images_that_are_copies_of_one_are_named(
        store: Path, image_dirs: ImageDirs, tmp_path: Path) -> None:
    """Twenty copies of one image calibrated without a word: the threshold, stated on
    n = 20, rests on a single image."""
    one = image_dirs.files(image_dirs.calibration)[0]
    same = tmp_path / "same"
    same.mkdir()
    for i in range(20):
        shutil.copy(one, same / f"copy-{i:02d}{one.suffix}")
    result = run("calibrate", "--model", CANDIDATE, "--normal", same, "--target-fpr", "0.1",
                 "--device", "cpu", "--mlruns", store)
    assert result.exit_code == 0, result.output
    assert f"all 20 normal images of {same} have the same content" in result.stderr
    varied = run("calibrate", "--model", CANDIDATE, "--normal", image_dirs.calibration,
                 "--target-fpr", "0.1", "--device", "cpu", "--mlruns", store)
    assert varied.exit_code == 0 and "content" not in varied.stderr, varied.output


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "f1"], "--method f1 needs labelled anomalies"),
    ([], "--method conformal needs --target-fpr"),
    (["--target-fpr", "1.5"], "must be between 0 and 1"),
    (["--method", "youden", "--anomalous", ".", "--target-fpr", "0.1"],
     "--target-fpr only applies to --method conformal, not youden: youden picks its"),
    (["--target-fpr", "0.1", "--cost-fn", "3"], "only apply to --method cost"),
    (["--target-fpr", "0.1", "--score", "auto"], "pass --anomalous DIR, or name a score"),
    (["--method", "cost", "--anomalous", ".", "--cost-fn", "inf"],
     "Invalid value for '--cost-fn': inf is not a finite number"),
    (["--method", "cost", "--anomalous", ".", "--cost-fp", "nan"],
     "Invalid value for '--cost-fp': nan is not a finite number"),
    (["--method", "cost", "--anomalous", ".", "--cost-fp", "0", "--cost-fn", "0"],
     "--cost-fp and --cost-fn are both 0"),  # refused before any folder is scored
    (["--target-fpr", "0.1", "--anomalous", "/no/such/folder"],  # which of two folders
     "Invalid value for '--anomalous': image folder not found: /no/such/folder; check the "
     "path"),
    (["--target-fpr", "0.1", "--anomalous", __file__],
     f"Invalid value for '--anomalous': {__file__} is not a folder; pass the folder of "
     "images"),
])
def test_usage_errors(store: Path, image_dirs: ImageDirs, args: list[str],
                      message: str) -> None:
    result = run("calibrate", "--model", CANDIDATE, "--normal", image_dirs.calibration,
                 "--mlruns", store, *args)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output


def test_unknown_score_names_the_choices(store: Path, image_dirs: ImageDirs) -> None:
    result = run("calibrate", "--model", CANDIDATE, "--normal", image_dirs.calibration,
                 "--target-fpr", "0.1", "--score", "level_9", "--device", "cpu",
                 "--mlruns", store)
    assert_one_line_error(result, "unknown score 'level_9'",
                          "bpd, complexity, coarse_complexity, typicality, knn, pixel_knn, "
                          "ensemble, level_1, level_2")
    assert result.exit_code == 1  # a name scores have, but not this model's


def test_a_score_no_model_gives_is_named_before_the_image_count(
        store: Path, image_dirs: ImageDirs) -> None:
    # both wrong (a misspelt score, too few images for 1 %): the name comes first, so the
    # user does not fix the folder only to meet the next refusal
    result = run("calibrate", "--model", CANDIDATE, "--normal", image_dirs.calibration,
                 "--target-fpr", "0.01", "--score", "ensmble", "--device", "cpu",
                 "--mlruns", store)
    assert_one_line_error(result, "unknown score 'ensmble'", "level_1 ... level_L, or auto")
    assert result.exit_code == 2  # a usage error: no model gives that name
    assert "held-out normal images" not in result.output


def test_coarse_complexity_calibrates_and_then_drives_score(
        store: Path, client: mlflow.MlflowClient, image_dirs: ImageDirs, tmp_path: Path) -> None:
    result = run("calibrate", "--model", CANDIDATE, "--normal", image_dirs.calibration,
                 "--score", "coarse_complexity", "--target-fpr", "0.1", "--device", "cpu",
                 "--mlruns", store)
    assert result.exit_code == 0, result.output
    assert "(coarse_complexity, conformal, target FPR 0.1)" in result.stdout
    loaded = tracking.load_model(model_uri_from(result))
    calibration = loaded.calibration
    assert calibration is not None and calibration.score_name == "coarse_complexity"
    normal = score_folder_table(loaded.model, image_dirs.calibration).values("coarse_complexity")
    assert normal.shape == (40,)
    assert calibration.threshold.value == pytest.approx(
        conformal_threshold(normal, 0.1).value, rel=1e-6)
    assert client.get_model_version(NAME, str(loaded.version)).tags["score_name"] == \
        "coarse_complexity"

    out = tmp_path / "scores.parquet"
    result = run("score", image_dirs.test_anomalous, "--model", model_uri_from(result),
                 "--out", out, "--device", "cpu", "--mlruns", store)
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out)
    np.testing.assert_array_equal(table["score"], table["coarse_complexity"])
    np.testing.assert_array_equal(table["is_anomaly"].to_numpy(dtype=bool),
                                  table["score"].to_numpy() > calibration.threshold.value)


def test_a_threshold_that_flags_no_labelled_anomaly_is_warned_of(
        store: Path, image_dirs: ImageDirs, tmp_path: Path) -> None:
    """One labelled anomaly that looks normal, and a false alarm costlier than a miss: the
    cost threshold flags nothing. Registered (without --promote), it is warned of, and its
    precision, 0/0, is said to be no figure rather than printed as 1."""
    loaded = tracking.load_model(CANDIDATE)
    table = score_folder_table(loaded.model, image_dirs.test_normal).table
    most_normal = Path(table.loc[table["complexity"].idxmin(), "path"])
    anomalous = tmp_path / "one"
    anomalous.mkdir()
    shutil.copy(most_normal, anomalous / "looks-normal.png")
    result = run("calibrate", "--model", CANDIDATE, "--normal", image_dirs.calibration,
                 "--anomalous", anomalous, "--method", "cost", "--score", "complexity",
                 "--cost-fp", "4", "--cost-fn", "1", "--device", "cpu", "--mlruns", store)
    assert result.exit_code == 0, result.output
    assert "flags none of the 1 anomalous images (recall 0): the version it registers calls " \
        "every image like them normal" in result.stderr
    assert ("; precision n/a (nothing flagged), recall 0, F1 0 on 1 anomaly (the images that "
            "chose the threshold, so optimistic: measure on others with evaluate)\n"
            ) in result.stdout
    # evaluate, on the same images, says it in the same words
    result = run("evaluate", "--model", model_uri_from(result), "--normal",
                 image_dirs.calibration, "--anomalous", anomalous, "--device", "cpu",
                 "--mlruns", store)
    assert result.exit_code == 0, result.output
    assert re.search(r"^at the stored threshold \S+ \(complexity, cost\): FPR 0, recall 0, "
                     r"precision n/a \(nothing flagged\)$", result.stdout, re.MULTILINE), \
        result.stdout
    assert shown_precision(1.0, 0.0, 0.0) == "n/a (nothing flagged)"
    assert shown_precision(1.0, 0.5, 0.0) == "1" and shown_precision(0.0, 0.0, 0.1) == "0"


@pytest.mark.parametrize("method", ["f1", "youden", "cost"])
def test_labelled_methods_store_the_calibration_modules_threshold(
        store: Path, client: mlflow.MlflowClient, image_dirs: ImageDirs, method: str) -> None:
    costs = ["--cost-fp", "1", "--cost-fn", "4"] if method == "cost" else []
    result = run("calibrate", "--model", CANDIDATE, "--normal", image_dirs.calibration,
                 "--anomalous", image_dirs.test_anomalous, "--method", method,
                 "--score", "complexity", *costs, "--device", "cpu", "--mlruns", store)
    assert result.exit_code == 0, result.output
    loaded = tracking.load_model(model_uri_from(result))
    calibration = loaded.calibration
    assert calibration is not None and calibration.score_name == "complexity"

    model = loaded.model
    normal = score_folder_table(model, image_dirs.calibration).values("complexity")
    anomalous = score_folder_table(model, image_dirs.test_anomalous).values("complexity")
    expected = {"f1": lambda: f1_threshold(normal, anomalous),
                "youden": lambda: youden_threshold(normal, anomalous),
                "cost": lambda: cost_threshold(normal, anomalous, 1.0, 4.0)}[method]()
    assert calibration.threshold.method == method
    assert calibration.threshold.value == pytest.approx(expected.value, rel=1e-6)
    assert calibration.threshold.f1 == expected.f1
    assert calibration.threshold.n_anomalous == len(anomalous) == 16
    assert f"the {method} threshold is fitted on 40 normal and 16 anomalous images; with " \
        "fewer than 30 on a side its precision, recall and false-positive rate are rough " \
        "estimates" in result.stderr

    metrics = client.get_run(run_id_from(result)).data.metrics
    for key in ("fpr", "precision", "recall", "f1"):  # at the stored threshold
        assert metrics[key] == pytest.approx(getattr(expected, key), abs=1e-12), key
    reference = detection_metrics(normal, anomalous)
    for key in ("auroc", "aupr", "fpr_at_95_tpr"):
        assert metrics[key] == pytest.approx(getattr(reference, key), abs=1e-12), key
    artifacts = {a.path for a in client.list_artifacts(run_id_from(result))}
    assert {"calibration.json", "score_histogram.png", "roc_curve.png", "pr_curve.png"} \
        <= artifacts
    assert "champion" not in client.get_model_version(NAME, str(loaded.version)).aliases


def test_evaluate_prints_and_logs_every_score(store: Path, client: mlflow.MlflowClient,
                                              image_dirs: ImageDirs) -> None:
    result = run("evaluate", "--model", CANDIDATE, "--normal", image_dirs.test_normal,
                 "--anomalous", image_dirs.test_anomalous, "--device", "cpu", "--mlruns", store)
    assert result.exit_code == 0, result.output
    model = tracking.load_model(CANDIDATE).model
    names = score_names(model)
    # trained with a validation set: it has a normal reference
    assert {"typicality", "knn", "ensemble"} <= set(names)
    table_rows = [line.split()[0] for line in result.stdout.splitlines()[2:]]
    assert table_rows[: len(names)] == names

    normal = score_folder_table(model, image_dirs.test_normal)
    anomalous = score_folder_table(model, image_dirs.test_anomalous)
    logged = client.get_run(run_id_from(result))
    for name in names:
        reference = detection_metrics(normal.values(name), anomalous.values(name))
        assert logged.data.metrics[f"{name}_auroc"] == pytest.approx(reference.auroc)
        assert logged.data.metrics[f"{name}_aupr"] == pytest.approx(reference.aupr)
        assert logged.data.metrics[f"{name}_fpr_at_95_tpr"] == \
            pytest.approx(reference.fpr_at_95_tpr)
        line = next(row for row in result.stdout.splitlines() if row.startswith(f"{name} "))
        assert f"{reference.auroc:.4f}" in line
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"roc_curves.png", "pr_curves.png", "score_histograms.png",
            "detection_metrics.json"} <= artifacts
    assert logged.data.tags["training_run_id"] == \
        client.get_model_version(NAME, "1").tags["training_run_id"]


def test_a_model_folder_cannot_get_a_calibrated_version(store: Path, image_dirs: ImageDirs,
                                                         tmp_path: Path) -> None:
    folder = make_tiny_model().save(tmp_path / "model")
    result = run("calibrate", "--model", folder, "--normal", image_dirs.calibration,
                 "--target-fpr", "0.1", "--device", "cpu", "--mlruns", store)
    assert result.exit_code == 1
    assert_one_line_error(result, "is not a registered model version", "models:/NAME@ALIAS")


def test_a_run_uri_calibrates_the_version_that_run_registered(
        store: Path, client: mlflow.MlflowClient, image_dirs: ImageDirs) -> None:
    first = client.get_model_version(NAME, "1")
    result = run("calibrate", "--model", f"runs:/{first.run_id}/model", "--normal",
                 image_dirs.calibration, "--target-fpr", "0.1", "--device", "cpu",
                 "--mlruns", store)
    assert result.exit_code == 0, result.output
    new = client.get_model_version(NAME, model_uri_from(result).rsplit("/", 1)[1])
    assert new.tags["source_version"] == "1"
    assert new.tags["training_run_id"] == first.tags["training_run_id"]
    # a run that registered nothing has no model to add a version to
    with tracking.start_run(NAME, "unregistered") as logged:
        tracking.log_model(logged, make_tiny_model())
    result = run("calibrate", "--model", f"runs:/{logged.run_id}/model", "--normal",
                 image_dirs.calibration, "--target-fpr", "0.1", "--device", "cpu",
                 "--mlruns", store)
    assert_one_line_error(result, "is not a registered model version",
                          "the runs:/ URI of a registered model")


# ---------------------------------------------------------------------------- --score auto


def hand_scores(folder: str, columns: dict[str, np.ndarray]) -> FolderScores:
    """FolderScores over given score columns (every file decoded)."""
    n = len(next(iter(columns.values())))
    table = pd.DataFrame({"path": [f"/data/{folder}/{i:03d}.png" for i in range(n)],
                          **columns, "error": [""] * n})
    return FolderScores(Path(f"/data/{folder}"), table, "fingerprint")


def test_a_model_deleted_while_it_is_calibrated_is_not_made_anew(
        store: Path, client: mlflow.MlflowClient) -> None:
    """MLflow creates a missing name on registration: the calibrated version would be
    version 1 of a new model, its source_version naming a version that is gone."""
    weights = tracking.load_model(CANDIDATE).model
    with tracking.start_run("gone-parts", "train-copy") as run:
        uri = tracking.log_model(run, weights)
    tracking.register_model(uri, "gone-parts", alias="candidate")
    loaded = tracking.load_model("models:/gone-parts@candidate")
    client.delete_registered_model("gone-parts")  # by someone else, while it is scored
    values = dict.fromkeys(score_names(loaded.model), np.linspace(5.0, 6.0, 30))
    with pytest.raises(tracking.ModelNotFoundError,
                       match="the registered model 'gone-parts' was deleted while version 1 "
                             "was being calibrated, so no version was added"):
        calibrate_scores(loaded, hand_scores("normal", values), None, score="bpd",
                         target_fpr=0.1, promote=True)
    assert "gone-parts" not in {m.name for m in client.search_registered_models()}
    (calibration_run,) = [r for r in client.search_runs(
        [client.get_experiment_by_name("gone-parts").experiment_id])
        if r.info.run_id != run.run_id]
    assert calibration_run.info.status == "FAILED"
    # the name kept, the version deleted: a new version would name a source that is gone
    tracking.register_model(uri, "gone-version", alias="candidate")
    tracking.register_model(uri, "gone-version")
    loaded = tracking.load_model("models:/gone-version@candidate")
    client.delete_model_version("gone-version", "1")
    with pytest.raises(tracking.ModelNotFoundError,
                       match="version 1 of the registered model 'gone-version' was deleted "
                             "while it was being calibrated, so no version was added"):
        calibrate_scores(loaded, hand_scores("normal", values), None, score="bpd",
                         target_fpr=0.1, promote=True)
    assert [str(v.version) for v in client.search_model_versions("name = 'gone-version'")] == ["2"]


def test_images_with_a_non_finite_score_are_named_and_left_out_of_every_figure(
        store: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Scoring leaves out an image whose bits/dim is not finite; a table made otherwise
    (by hand, as here) may hold a decoded image with a non-finite value in one score:
    evaluation leaves it out of every score's figures and counts, calibration out of its
    score's, and each names it in a warning, as it does a file that failed to decode."""
    loaded = tracking.load_model(CANDIDATE)
    columns = score_names(loaded.model)
    normal = hand_scores("normal", dict.fromkeys(columns, np.linspace(5.0, 6.0, 40)))
    normal.table.loc[3, "ensemble"] = np.inf
    normal.table.loc[7, "complexity"] = np.nan
    anomalous = hand_scores("anomalous", dict.fromkeys(columns, np.linspace(5.5, 7.0, 12)))
    anomalous.table.loc[0, "knn"] = -np.inf
    with caplog.at_level(logging.WARNING):
        evaluated = evaluate_scores(loaded, normal, anomalous)
    said = [r.getMessage() for r in caplog.records if "non-finite score" in r.getMessage()]
    assert said == [
        "2 of 40 image files in /data/normal have a non-finite score and are left out:\n"
        "  /data/normal/003.png: the model gave a non-finite ensemble for this image\n"
        "  /data/normal/007.png: the model gave a non-finite complexity for this image",
        "1 of 12 image files in /data/anomalous have a non-finite score and are left out:\n"
        "  /data/anomalous/000.png: the model gave a non-finite knn for this image"]
    assert (evaluated.table["n_normal"] == 38).all()
    assert (evaluated.table["n_anomalous"] == 11).all()
    assert {key: evaluated.metrics[key] for key in (
        "n_normal", "n_failed_normal", "n_anomalous", "n_failed_anomalous")} == {
        "n_normal": 38, "n_failed_normal": 2, "n_anomalous": 11, "n_failed_anomalous": 1}
    assert [path for path, _ in evaluated.failures["normal"]] == [
        "/data/normal/003.png", "/data/normal/007.png"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        calibrated = calibrate_scores(loaded, normal, None, score="ensemble", target_fpr=0.1)
    said = [r.getMessage() for r in caplog.records if "non-finite score" in r.getMessage()]
    assert said == [
        "1 of 40 image files in /data/normal have a non-finite score and are left out:\n"
        "  /data/normal/003.png: the model gave a non-finite ensemble for this image"]
    assert calibrated.calibration.threshold.n_calibration == 39
    assert calibrated.failures["normal"] == [
        ("/data/normal/003.png", "the model gave a non-finite ensemble for this image")]


@pytest.mark.parametrize(("best", "runner_up"), [("complexity", "coarse_complexity"),
                                                 ("coarse_complexity", "complexity")])
def test_calibrate_scores_auto_picks_the_best_separating_score_and_logs_the_evidence(
        store: Path, client: mlflow.MlflowClient, best: str, runner_up: str,
        tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    base_normal, base_anomalous = rng.normal(0.0, 1.0, 30), rng.normal(0.0, 1.0, 12)
    loaded = tracking.load_model(CANDIDATE)
    columns = score_names(loaded.model)
    assert columns == ["bpd", "complexity", "coarse_complexity", "typicality", "knn",
                       "pixel_knn", "ensemble", "level_1", "level_2"]
    normal = hand_scores("normal", dict.fromkeys(columns, base_normal))
    anomalous = hand_scores("anomalous", {
        "bpd": base_anomalous + 0.5,        # a little separated
        best: base_anomalous + 4.0,         # well separated: the right choice
        runner_up: base_anomalous + 2.0,    # separated, less well
        "typicality": base_anomalous + 0.25,
        "knn": base_anomalous + 0.75,
        "pixel_knn": base_anomalous + 0.6,
        "ensemble": base_anomalous + 1.5,
        "level_1": base_anomalous - 4.0,    # reversed
        "level_2": base_anomalous + 1.0})
    # One normal image with a non-finite level_2 is left out for every candidate.
    normal.table.loc[0, "level_2"] = np.nan
    outcome = calibrate_scores(loaded, normal, anomalous, score="auto", target_fpr=0.1)

    calibration = outcome.calibration
    selection = calibration.score_selection
    assert selection is not None and calibration.score_name == selection.chosen == best
    # every score was a candidate, the model's default first (it wins a tie), then the
    # others in column order
    assert list(selection.auroc) == ["ensemble", *(c for c in columns if c != "ensemble")]
    reference = select_score({c: normal.table[c].to_numpy()[1:] for c in columns},
                             {c: anomalous.table[c].to_numpy() for c in columns})
    assert selection == reference
    assert (selection.n_normal, selection.n_anomalous) == (29, 12)
    assert selection.auroc[best] > selection.auroc[runner_up] > selection.auroc["bpd"] \
        > selection.auroc["level_1"]
    # The threshold is fitted on the chosen score, on all its usable normal images.
    assert calibration.threshold.value == conformal_threshold(normal.values(best), 0.1).value
    assert calibration.threshold.n_calibration == 30

    logged = client.get_run(outcome.run_id).data
    assert logged.params["score"] == best and logged.params["score_selection"] == "auto"
    assert logged.tags["score_name"] == best
    assert logged.tags["score_selection"] == "max AUROC on labelled anomalies"
    for name, value in selection.auroc.items():
        assert logged.metrics[f"selection_{name}_auroc"] == pytest.approx(value)
    stored = Calibration.from_json(Path(mlflow.artifacts.download_artifacts(
        run_id=outcome.run_id, artifact_path="calibration.json",
        dst_path=str(tmp_path))).read_text())
    assert stored.score_selection == selection


def test_calibrate_scores_auto_warns_when_no_score_beats_chance(
        store: Path, caplog: pytest.LogCaptureFixture) -> None:
    loaded = tracking.load_model(CANDIDATE)
    columns = score_names(loaded.model)
    rng = np.random.default_rng(5)
    base = rng.normal(0.0, 1.0, 30)
    normal = hand_scores("normal", dict.fromkeys(columns, base))
    # every score ranks the anomalies below the normal images: folders swapped, say
    anomalous = hand_scores("anomalous", dict.fromkeys(columns, base.min() - 1.0 - np.arange(12.0)))
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.evaluation"):
        outcome = calibrate_scores(loaded, normal, anomalous, score="auto", target_fpr=0.1)
    assert outcome.calibration.score_name == "ensemble"  # the tie: the model's default
    warned = [r.getMessage() for r in caplog.records if "better than chance" in r.getMessage()]
    assert len(warned) == 1
    assert "best AUROC 0.0000, ensemble" in warned[0]
    assert "labelled the right way round" in warned[0]


@pytest.mark.parametrize("method", ["f1", "conformal"])
def test_calibrate_scores_warns_when_the_named_score_does_not_beat_chance(
        store: Path, caplog: pytest.LogCaptureFixture, method: str) -> None:
    """Named, not chosen: a score that ranks the anomalies below the normal images is
    still said, and a labelled threshold that flags every normal image too (f1 reaches
    recall 1 only by calling everything anomalous here)."""
    loaded = tracking.load_model(CANDIDATE)
    columns = score_names(loaded.model)
    base = np.random.default_rng(8).normal(0.0, 1.0, 30)
    normal = hand_scores("normal", dict.fromkeys(columns, base))
    anomalous = hand_scores("anomalous", dict.fromkeys(columns, base.min() - 1 - np.arange(40.0)))
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.evaluation"):
        outcome = calibrate_scores(loaded, normal, anomalous, score="complexity", method=method,
                                   target_fpr=0.1 if method == "conformal" else None)
    messages = [r.getMessage() for r in caplog.records]
    chance = [m for m in messages if "better than chance" in m]
    assert chance == ["the complexity score does not separate the 40 anomalous images from "
                      "the 30 normal ones better than chance (AUROC 0.0000): check that the "
                      "folders are labelled the right way round, or pick another score "
                      "(evaluate compares them, --score auto chooses)"]
    every = [m for m in messages if "flags every normal image" in m]
    if method == "f1":
        assert outcome.calibration.threshold.fpr == 1.0
        assert len(every) == 1 and every[0].startswith(
            f"the f1 threshold {outcome.calibration.threshold.value!r} flags every normal "
            "image (false-positive rate 1 on these 30)"), every
    else:
        assert every == []
    # such a threshold is not made champion: refused before anything is logged
    client = mlflow.MlflowClient()
    versions = len(client.search_model_versions(f"name = '{loaded.name}'"))
    champion = client.get_registered_model(loaded.name).aliases.get("champion")
    what = ("flags every one of the 30 normal images" if method == "f1"
            else "flags none of the 40 anomalous images")
    with pytest.raises(CalibrationError) as refused:
        calibrate_scores(loaded, normal, anomalous, score="complexity", method=method,
                         target_fpr=0.1 if method == "conformal" else None, promote=True)
    assert str(refused.value) == (
        f"not promoted: the {method} threshold "
        f"{outcome.calibration.threshold.value:.6g} on complexity {what}, so as champion it "
        "would decide nothing; calibrate again with another --method or --score (evaluate "
        "compares the scores) or other images, or without --promote to register it anyway")
    assert len(client.search_model_versions(f"name = '{loaded.name}'")) == versions
    assert client.get_registered_model(loaded.name).aliases.get("champion") == champion


def test_calibrate_scores_auto_gives_a_tie_of_perfect_scores_to_the_default(
        store: Path) -> None:
    """Anomalies every score separates (AUROC 1 for all) chose bpd, the first column and
    the weakest score at large; the tie now goes to the model's default score."""
    loaded = tracking.load_model(CANDIDATE)
    columns = score_names(loaded.model)
    base = np.random.default_rng(7).normal(0.0, 1.0, 30)
    normal = hand_scores("normal", dict.fromkeys(columns, base))
    anomalous = hand_scores("anomalous", dict.fromkeys(columns, base.max() + 1 + np.arange(12.0)))
    outcome = calibrate_scores(loaded, normal, anomalous, score="auto", target_fpr=0.1)
    selection = outcome.calibration.score_selection
    assert selection is not None and set(selection.auroc.values()) == {1.0}
    assert outcome.calibration.score_name == "ensemble"


def test_calibrate_scores_auto_says_nothing_of_chance_when_a_score_separates(
        store: Path, caplog: pytest.LogCaptureFixture) -> None:
    loaded = tracking.load_model(CANDIDATE)
    columns = score_names(loaded.model)
    base = np.random.default_rng(6).normal(0.0, 1.0, 30)
    normal = hand_scores("normal", dict.fromkeys(columns, base))
    anomalous = hand_scores("anomalous", {**dict.fromkeys(columns, base[:12]),
                                          "knn": base[:12] + 3.0})
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.evaluation"):
        outcome = calibrate_scores(loaded, normal, anomalous, score="auto", target_fpr=0.1)
    assert outcome.calibration.score_name == "knn"
    assert not [r for r in caplog.records if "better than chance" in r.getMessage()]


NO_REFERENCE = r"and this model has none.*val_fraction > 0"
OLDER_REFERENCE = r"and its reference predates {score}.*typicality"
BEFORE_PIXELS = ("reference_images",)


@pytest.mark.parametrize(("score", "dropped", "why"), [
    ("typicality", REFERENCE_KEYS, NO_REFERENCE),
    ("knn", REFERENCE_KEYS, NO_REFERENCE),
    ("pixel_knn", REFERENCE_KEYS, NO_REFERENCE),
    ("ensemble", REFERENCE_KEYS, NO_REFERENCE),
    # a model whose reference predates knn (mean and std only) is told so by name
    ("knn", ("reference_maps", "reference_scale", "reference_images"), OLDER_REFERENCE),
    ("ensemble", ("reference_maps", "reference_scale", "reference_images"), OLDER_REFERENCE),
    # and one whose reference predates pixel_knn (no images, a two-row scale)
    ("pixel_knn", BEFORE_PIXELS, OLDER_REFERENCE),
])
def test_reference_scores_need_the_normal_reference(store: Path, score: str,
                                                    dropped: tuple[str, ...], why: str) -> None:
    loaded = tracking.load_model(CANDIDATE)
    state = {k: v for k, v in loaded.model.state_dict().items() if k not in dropped}
    if dropped == BEFORE_PIXELS:
        state["reference_scale"] = state["reference_scale"][:2].clone()
    loaded.model.load_state_dict(state)
    assert score not in score_names(loaded.model)
    assert ("typicality" in score_names(loaded.model)) == (why == OLDER_REFERENCE)
    why = why.format(score=score)
    values = {"bpd": np.linspace(5.0, 6.0, 20)}
    with pytest.raises(CalibrationError,
                       match=rf"score '{score}' needs the model.s normal reference, {why}"):
        calibrate_scores(loaded, hand_scores("normal", values), None, score=score,
                         target_fpr=0.1)


def test_calibrate_score_auto_end_to_end_then_score_uses_the_chosen_score(
        store: Path, client: mlflow.MlflowClient, image_dirs: ImageDirs, tmp_path: Path) -> None:
    result = run("calibrate", "--model", CANDIDATE, "--normal", image_dirs.calibration,
                 "--anomalous", image_dirs.test_anomalous, "--score", "auto",
                 "--target-fpr", "0.1", "--device", "cpu", "--mlruns", store)
    assert result.exit_code == 0, result.output
    loaded = tracking.load_model(model_uri_from(result))
    calibration = loaded.calibration
    assert calibration is not None and calibration.score_selection is not None
    chosen = calibration.score_name
    names = score_names(loaded.model)
    assert chosen == calibration.score_selection.chosen in names

    # The evidence is this model's AUROCs on the same folders, and the choice follows.
    normal = score_folder_table(loaded.model, image_dirs.calibration)
    anomalous = score_folder_table(loaded.model, image_dirs.test_anomalous)
    candidates = ["ensemble", *(n for n in names if n != "ensemble")]  # the default first
    reference = select_score({n: normal.values(n) for n in candidates},
                             {n: anomalous.values(n) for n in candidates})
    assert chosen == reference.chosen
    assert list(calibration.score_selection.auroc) == candidates  # reference scores included
    assert calibration.score_selection.auroc == pytest.approx(reference.auroc)
    assert f"coarse_complexity {reference.auroc['coarse_complexity']:.4f}" in result.stdout
    assert (calibration.score_selection.n_normal,
            calibration.score_selection.n_anomalous) == (40, 16)
    assert f"threshold: {calibration.threshold.value} ({chosen}, conformal, target FPR 0.1)" \
        in result.stdout
    assert "auto" not in result.stdout.replace("AUROC", "")
    assert f"score: {chosen} (max AUROC on labelled anomalies: ensemble " in result.stdout
    assert calibration.threshold.value == conformal_threshold(
        calibration.sorted_scores, 0.1).value
    np.testing.assert_allclose(calibration.sorted_scores, np.sort(normal.values(chosen)),
                               rtol=1e-6)
    # calibrated again with auto: the warning names what replaces the calibration
    again = run("calibrate", "--model", model_uri_from(result), "--normal",
                image_dirs.calibration, "--anomalous", image_dirs.test_anomalous, "--score",
                "auto", "--target-fpr", "0.1", "--device", "cpu", "--mlruns", store)
    assert again.exit_code == 0, again.output
    assert f"already carries a calibration ({chosen}, conformal threshold " \
        f"{calibration.threshold.value:.6g}); the new version replaces it with one on the " \
        "score with the best AUROC on the anomalous folder" in again.stderr
    version = client.get_model_version(NAME, str(loaded.version))
    assert version.tags["score_name"] == chosen

    # `score` with that version: the score column is the chosen score.
    out = tmp_path / "scores.csv"
    result = run("score", image_dirs.test_normal, "--model", model_uri_from(result),
                 "--out", out, "--device", "cpu", "--mlruns", store)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    scores = table["score"].to_numpy(float)
    np.testing.assert_array_equal(scores, table[chosen].to_numpy(float))
    np.testing.assert_array_equal(table["is_anomaly"].astype(bool).to_numpy(),
                                  scores > calibration.threshold.value)


def test_cli_method_choices_are_the_library_methods() -> None:
    """One tuple: the CLI reads it from a module without numpy (importing the calibration
    module would slow `--help`), which the calibration module reads it from too."""
    from anomaly_flow.calibration import METHODS
    from anomaly_flow.cli import calibrate as cli_calibrate

    assert cli_calibrate.METHODS is METHODS
    method = next(p for p in cli_calibrate.calibrate.params if p.name == "method")
    assert tuple(method.type.choices) == METHODS


def candidate_trained_on(client: mlflow.MlflowClient) -> frozenset[str]:
    """The training record of the candidate's training run."""
    version = client.get_model_version_by_alias(NAME, "candidate")
    trained_on = tracking.training_image_digests(version.tags["training_run_id"])
    assert trained_on is not None
    return trained_on


def test_calibration_leaves_out_the_images_the_model_was_trained_on(
        store: Path, client: mlflow.MlflowClient, image_dirs: ImageDirs,
        tmp_path: Path) -> None:
    # held-out images plus renamed copies of five images of the training folder: the
    # copies are left out by content, with their reason, and the threshold uses the 40
    # held-out ones
    train_files = image_dirs.files(image_dirs.train)
    # both splits are recorded: the validation split was fitted by the normal reference
    assert candidate_trained_on(client) == set(
        fingerprint_and_digests(train_files, image_dirs.train)[1])
    normal = tmp_path / "normal"
    shutil.copytree(image_dirs.calibration, normal)
    for i, path in enumerate(train_files[:5]):
        shutil.copy(path, normal / f"looks-new-{i}.png")
    corrupt_png(normal / "zz-broken.png")  # counted apart: neither used nor trained on
    result = run("calibrate", "--model", CANDIDATE, "--normal", normal, "--target-fpr", "0.1",
                 "--device", "cpu", "--mlruns", store)
    assert result.exit_code == 0, result.output
    assert "5 of the 45 usable images (of 46 files) in " in result.stderr
    assert "calibration leaves them out and uses the other 40" in result.stderr
    assert "the folder models:/cal-parts@candidate was trained on" in result.stderr
    calibration = tracking.load_model(model_uri_from(result)).calibration
    assert calibration is not None and calibration.threshold.n_calibration == 40
    run_id = run_id_from(result)
    metrics = client.get_run(run_id).data.metrics
    # left out, not failed: every one of them was read and scored
    assert (metrics["n_trained_on_normal"], metrics["n_failed_normal"]) == (5, 1)
    listed = json.loads(Path(client.download_artifacts(run_id, "failed_images.json",
                                                       str(tmp_path))).read_text())["normal"]
    assert sorted(Path(row["path"]).name for row in listed) == \
        [*(f"looks-new-{i}.png" for i in range(5)), "zz-broken.png"]
    assert all("training folder" in row["reason"] for row in listed[:5])


def test_calibrating_on_the_training_folder_is_refused(
        store: Path, image_dirs: ImageDirs, tmp_path: Path) -> None:
    result = run("calibrate", "--model", CANDIDATE, "--normal", image_dirs.train,
                 "--target-fpr", "0.5", "--device", "cpu", "--mlruns", store)
    assert_one_line_error(result, "all 48 images in ", "was trained on",
                          "pass a folder of normal images that were kept out of training")
    # a file that cannot be decoded keeps its own reason; every usable image is trained on
    mixed = tmp_path / "mixed"
    shutil.copytree(image_dirs.train, mixed)
    corrupt_png(mixed / "zz-broken.png")
    result = run("calibrate", "--model", CANDIDATE, "--normal", mixed,
                 "--target-fpr", "0.5", "--device", "cpu", "--mlruns", store)
    assert_one_line_error(result, "all 48 usable images (of 49 files) in ")


def test_evaluation_leaves_out_the_images_the_model_was_trained_on(
        store: Path, client: mlflow.MlflowClient, image_dirs: ImageDirs,
        tmp_path: Path) -> None:
    normal = tmp_path / "normal"
    shutil.copytree(image_dirs.test_normal, normal)
    for i, path in enumerate(image_dirs.files(image_dirs.train)[:3]):
        shutil.copy(path, normal / f"looks-new-{i}.png")
    result = run("evaluate", "--model", CANDIDATE, "--normal", normal,
                 "--anomalous", image_dirs.test_anomalous, "--device", "cpu", "--mlruns", store)
    assert result.exit_code == 0, result.output
    assert "evaluation leaves them out" in result.stderr
    metrics = client.get_run(run_id_from(result)).data.metrics
    assert metrics["n_trained_on_normal"] == 3
    assert metrics["n_normal"] == len(image_dirs.files(image_dirs.test_normal))


def test_a_local_copy_of_a_calibrated_version_still_knows_its_training_images(
        store: Path, image_dirs: ImageDirs, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy's MLmodel names the calibration run, which names the training run."""
    calibrated = run("calibrate", "--model", CANDIDATE, "--normal", image_dirs.calibration,
                     "--target-fpr", "0.1", "--device", "cpu", "--mlruns", store)
    assert calibrated.exit_code == 0, calibrated.output
    tracking.configure(store)
    local = Path(mlflow.artifacts.download_artifacts(model_uri_from(calibrated),
                                                     dst_path=str(tmp_path / "copy")))
    result = run("evaluate", "--model", local, "--normal", image_dirs.train, "--anomalous",
                 image_dirs.test_anomalous, "--device", "cpu", "--mlruns", store)
    assert_one_line_error(result, "all 48 images in ", "was trained on")
    # its evaluation run links the training run (not the calibration run that logged the
    # copy) and the folder by its absolute path
    monkeypatch.chdir(tmp_path)
    result = run("evaluate", "--model", local.relative_to(tmp_path), "--normal",
                 image_dirs.test_normal, "--anomalous", image_dirs.test_anomalous,
                 "--device", "cpu", "--mlruns", store)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "mlruns").exists()  # the store given, not one here
    tags = mlflow.MlflowClient().get_run(run_id_from(result)).data.tags
    version = mlflow.MlflowClient().get_model_version(NAME, "1")
    assert tags["training_run_id"] == version.tags["training_run_id"]
    assert tags["model_uri"] == str(local)
    assert tags["model_digest"] == tracking.load_model(local).model.digest()
    assert "model_version" not in tags  # a folder: no version of the registry
    # a copy whose weights were changed after calibration is refused before a store is
    # made where the command runs (no --mlruns: ./mlruns)
    edited = tmp_path / "edited"
    shutil.copytree(local, edited)
    (weights,) = edited.rglob("model.safetensors")
    tensors = safetensors.torch.load_file(weights)
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1e-3
    safetensors.torch.save_file(tensors, weights)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = run("evaluate", "--model", edited, "--normal", image_dirs.test_normal,
                 "--anomalous", image_dirs.test_anomalous, "--device", "cpu")
    assert_one_line_error(result, "was fitted to another model")
    assert list(work.iterdir()) == []
    # the calibrated version's own evaluation names the threshold's score and method
    threshold = tracking.load_model(model_uri_from(calibrated)).calibration.threshold.value
    result = run("evaluate", "--model", model_uri_from(calibrated), "--normal",
                 image_dirs.test_normal, "--anomalous", image_dirs.test_anomalous,
                 "--device", "cpu", "--mlruns", store)
    assert result.exit_code == 0, result.output
    assert f"at the stored threshold {threshold!r} (ensemble, conformal): FPR " \
        in result.stdout
    tags = mlflow.MlflowClient().get_run(run_id_from(result)).data.tags
    assert (tags["model_name"], tags["model_version"]) == (
        NAME, model_uri_from(calibrated).rsplit("/", 1)[1])


@pytest.mark.parametrize(("method", "advice"), [
    ("conformal", "fix them or leave out --anomalous."),
    ("f1", "fix them (the f1 method chooses its threshold from them)."),
])
def test_an_unscorable_anomalous_folder_gets_advice_for_the_method(
        store: Path, method: str, advice: str) -> None:
    loaded = tracking.load_model(CANDIDATE)
    names = score_names(loaded.model)
    normal = hand_scores("normal", {n: np.linspace(5.0, 6.0, 40) for n in names})
    anomalous = hand_scores("anomalous", {n: np.full(3, np.nan) for n in names})
    anomalous.table["error"] = "cannot identify image file"
    with pytest.raises(CalibrationError, match=r"none of the 3 images in /data/anomalous "
                                               r"could be scored; " + re.escape(advice)):
        calibrate_scores(loaded, normal, anomalous, score="bpd", method=method,
                         target_fpr=0.1 if method == "conformal" else None)


@pytest.mark.parametrize("named_by", ["--mlruns", "MLFLOW_TRACKING_URI"])
def test_a_read_only_store_is_refused_before_any_folder_is_scored(
        store: Path, image_dirs: ImageDirs, tmp_path: Path, named_by: str) -> None:
    """The real command in a process that obeys file modes (as root: setpriv drops the
    override): one line before scoring, not MLflow's pages of SQL after it; the advice
    fits the way the store was named (--mlruns cannot help while the variable is set)."""
    import os
    import subprocess
    import sys

    copy = tmp_path / "mlruns"
    shutil.copytree(store, copy)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "anomaly_flow", "calibrate", "--model", CANDIDATE,
               "--normal", str(image_dirs.calibration), "--target-fpr", "0.1",
               "--device", "cpu"]
    if named_by == "--mlruns":
        command += ["--mlruns", str(copy)]
        advice = "pass a writable --mlruns DIR"
    else:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{copy / 'mlflow.db'}"
        advice = ("point MLFLOW_TRACKING_URI at a writable store (or unset it and pass a "
                  "writable --mlruns DIR)")
    command = obeying_file_modes(command)
    (copy / "mlflow.db").chmod(0o444)
    copy.chmod(0o555)
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                env=env, cwd=tmp_path)
    finally:
        copy.chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"Error: the MLflow store sqlite:///{copy / 'mlflow.db'} cannot be written "
        f"({copy / 'mlflow.db'} is read-only); this command logs a run and registers a "
        f"model there: {advice} (a copy of the store, to keep its models), or fix the "
        "permissions"]


@pytest.mark.parametrize("command", ["calibrate", "train"])
def test_an_experiment_folder_that_cannot_be_written_is_refused_before_the_work(
        store: Path, image_dirs: ImageDirs, tmp_path: Path, command: str) -> None:
    """MLflow keeps an experiment's artifacts folder as the absolute path it had when made:
    in a store made by another user, or copied from one, it can be a folder this user
    cannot write. Said in one line before scoring or training, not as a PermissionError
    traceback after it."""
    import os
    import sqlite3
    import subprocess
    import sys

    copy = tmp_path / "mlruns"
    shutil.copytree(store, copy)
    theirs = tmp_path / "their-artifacts" / NAME
    theirs.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(copy / "mlflow.db")) as db, db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE name = ?",
                   (str(theirs), NAME))
    args = (["calibrate", "--model", CANDIDATE, "--normal", str(image_dirs.calibration),
             "--target-fpr", "0.1"] if command == "calibrate" else
            ["train", str(image_dirs.train), "--name", NAME, "--preset", "tiny"])
    argv = obeying_file_modes([sys.executable, "-m", "anomaly_flow", *args, "--device", "cpu",
                               "--mlruns", str(copy)])
    theirs.chmod(0o555)
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    finally:
        theirs.chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: the artifacts of MLflow experiment '{NAME}' go to {theirs}, and {theirs} "
        "cannot be written; this command logs a run and registers a model there: fix the "
        f"permissions of {theirs}, or log to another store (--mlruns DIR, or "
        "MLFLOW_TRACKING_URI)")
    assert list(theirs.iterdir()) == []


@pytest.mark.parametrize("during", ["score_folder_table", "roc_curves"])
def test_a_stop_during_calibrate_or_evaluate_exits_as_the_signal(
        store: Path, image_dirs: ImageDirs, monkeypatch: pytest.MonkeyPatch,
        signal_handlers_restored: None, during: str) -> None:
    """SIGTERM (a scheduler's stop) is a stop there as in train and score: a run started
    ends KILLED, a store write under way is finished first, and the command says so (which
    run, or that none had started: the folders are scored before the run) and exits 143,
    not killed outright or with a traceback."""
    from anomaly_flow import evaluation

    stop_during(monkeypatch, evaluation if during == "score_folder_table" else evaluation.plots,
                during)
    client = mlflow.MlflowClient()
    for command, args in (("calibrate", ["--target-fpr", "0.1"]),
                          ("evaluate", ["--anomalous", image_dirs.test_anomalous])):
        if command == "calibrate" and during == "roc_curves":
            args = [*args, "--anomalous", image_dirs.test_anomalous]  # curves need labels
        result = run(command, "--model", CANDIDATE, "--normal", image_dirs.calibration,
                     *args, "--device", "cpu", "--mlruns", store)
        assert result.exit_code == 143, result.output
        assert "Traceback" not in result.output
        said = re.search(rf"{command} interrupted \((.*)\); run the same command again",
                         result.stderr)
        assert said is not None, result.stderr
        if during == "score_folder_table":
            assert said.group(1) == "before it started an MLflow run"
        else:
            killed = re.fullmatch(r"its MLflow run (\w+) ends KILLED", said.group(1))
            assert killed is not None, said.group(1)
            stopped = client.get_run(killed.group(1))
            assert stopped.info.status == "KILLED" and stopped.info.run_name == command


def test_a_stop_during_the_registration_of_a_calibration_says_the_version_is_whole(
        store: Path, client: mlflow.MlflowClient, image_dirs: ImageDirs,
        monkeypatch: pytest.MonkeyPatch, signal_handlers_restored: None) -> None:
    """SIGTERM as calibrate --promote registers: the version, its alias and the run's link
    to it are written first, and the command names the version instead of asking for a
    run that would register and promote another."""
    from anomaly_flow.tracking import models

    before = len(client.search_model_versions(f"name = '{NAME}'"))
    previous = client.get_registered_model(NAME).aliases.get("champion")
    stop_during(monkeypatch, models, "register_model")
    result = run("calibrate", "--model", CANDIDATE, "--normal", image_dirs.calibration,
                 "--target-fpr", "0.1", "--promote", "--device", "cpu", "--mlruns", store)
    assert result.exit_code == 143, result.output
    # the alias it moved is said too: the stop leaves a promoted version
    moved = "" if previous is None else re.escape(
        f" from {previous} (to undo: anomaly-flow promote models:/{NAME}/{previous})")
    said = re.search(r"calibrate interrupted \(its MLflow run (\w+) ends KILLED, after it "
                     rf"registered models:/{NAME}/(\d+), which is whole, and moved alias "
                     rf"'champion' of '{NAME}' to version \2{moved}\); use it, or run the "
                     "same command again for a new version", result.stderr)
    assert said is not None, result.stderr
    run_id, version = said.groups()
    assert int(version) == before + 1
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == version
    assert client.get_run(run_id).data.tags["calibrated_model_uri"] == \
        f"models:/{NAME}/{version}"
