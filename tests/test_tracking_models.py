"""Tests for anomaly_flow.tracking.models: logging, registering, promoting and loading
models from every kind of URI, on real sqlite stores."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from anomaly_flow import tracking
from anomaly_flow.calibration import calibrate
from anomaly_flow.config import GlowConfig
from anomaly_flow.glow import Glow, ModelFileError
from anomaly_flow.tracking import ModelNotFoundError
from tests.conftest import (
    AUTO,
    ImageDirs,
    TrainedModel,
    library_scores,
    stop_during,
)


def test_a_model_name_is_claimed_once_and_kept_from_other_owners(mlruns: Path) -> None:
    tracking.claim_model_name("claimed-parts", "demo")  # new: created with the tag
    tracking.claim_model_name("claimed-parts", "demo")  # ours already
    client = mlflow.MlflowClient()
    assert client.get_registered_model("claimed-parts").tags == {"anomaly_flow.owner": "demo"}
    with pytest.raises(tracking.TrackingError, match="already holds a registered model "
                                                     "'claimed-parts' that anomaly-flow's "
                                                     "pipeline did not make"):
        tracking.claim_model_name("claimed-parts", "pipeline")
    client.create_registered_model("made-by-hand")
    with pytest.raises(tracking.TrackingError, match="'made-by-hand'"):
        tracking.claim_model_name("made-by-hand", "demo")
    tracking.claim_model_name("made-by-hand", "demo", check=False)  # a store of its own
    assert client.get_registered_model("made-by-hand").tags == {"anomaly_flow.owner": "demo"}
    assert tracking.ui_command("http://127.0.0.1:5000") \
        == "open http://127.0.0.1:5000 in a browser (the tracking server's UI)"
    assert tracking.ui_command(f"sqlite:///{mlruns}/mlflow.db") \
        == f"mlflow ui --backend-store-uri sqlite:///{mlruns}/mlflow.db"
    # a folder name a shell would split or act on is quoted: the line can be pasted
    assert tracking.ui_command("sqlite:////data/my runs & co/mlflow.db") \
        == "mlflow ui --backend-store-uri 'sqlite:////data/my runs & co/mlflow.db'"


def test_model_loads_the_same_from_every_kind_of_uri(trained: TrainedModel,
                                                     tmp_path: Path) -> None:
    by_alias = tracking.load_model(trained.alias_uri)
    assert (by_alias.name, by_alias.version, by_alias.run_id) == (
        trained.name, trained.version, trained.run_id)
    assert by_alias.calibration is None
    mlflow_folder = mlflow.artifacts.download_artifacts(trained.alias_uri,
                                                        dst_path=str(tmp_path / "mlflow"))
    plain_folder = by_alias.model.save(tmp_path / "plain")
    others = {
        trained.version_uri: tracking.load_model(trained.version_uri),
        trained.run_uri: tracking.load_model(trained.run_uri),
        "mlflow folder": tracking.load_model(mlflow_folder),
        "plain folder": tracking.load_model(str(plain_folder)),
    }
    assert others[trained.run_uri].run_id == trained.run_id
    assert others["mlflow folder"].run_id == trained.run_id
    reference = by_alias.model.state_dict()
    assert by_alias.model.training_shapes == ((28, 28, 48),)
    for where, loaded in others.items():
        assert loaded.model.training_shapes == ((28, 28, 48),), where
        state = loaded.model.state_dict()
        assert state.keys() == reference.keys(), where
        assert all(torch.equal(state[k], reference[k]) for k in reference), where


@pytest.mark.parametrize(("uri", "message"), [
    ("models:/no-such-model@candidate", "no registered model 'no-such-model'"),
    ("models:/Tiny-Parts@candidate", "no registered model 'Tiny-Parts' in sqlite:///.* "
                                     r"\(did you mean 'tiny-parts'\?\); train one"),
    ("models:/tiny-parts@champion", "has no alias 'champion'"),
    ("models:/tiny-parts/99", "has no version 99"),
    ("models:/tiny-parts/99999999999999999999", "has no version 99999999999999999999"),
    ("models:/tiny-parts", "names a model but not which of its versions; use "
                           "models:/tiny-parts@candidate, models:/tiny-parts@champion or "
                           "models:/tiny-parts/VERSION"),
    ("runs:/0123456789abcdef0123456789abcdef/model", "no model at runs:/"),
    ("/no/such/folder", "that path does not exist"),
    (__file__, f"{__file__} is a file, not a model folder"),
    # other storage: its client library missing (as here), else what its store said
    ("s3://no-bucket/model", r"cannot read s3://no-bucket/model: MLflow needs the Python "
                             r"package '\w+' for that storage, and it is not installed; "
                             r"install it \(boto3 for s3://|no model at s3://no-bucket"),
    # a web address: what MLflow reads there and what to do (not its parser's Python error,
    # "not enough values to unpack")
    ("http://127.0.0.1:9/model", r"^cannot load a model from the web address "
                                 r"http://127\.0\.0\.1:9/model: MLflow reads such an "
                                 r"address only as a model folder on an MLflow artifact "
                                 r"server; download the model folder and give its local path"),
    ("https://x/y", r"^cannot load a model from the web address https://x/y: MLflow"),
])
def test_missing_models_give_one_line_errors(trained: TrainedModel, uri: str,
                                             message: str) -> None:
    with pytest.raises(ModelNotFoundError, match=message) as info:
        tracking.load_model(uri)
    assert "\n" not in str(info.value)


def test_a_damaged_registry_is_not_called_a_missing_model(
        trained: TrainedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store whose registry tables are broken: MLflow's error, not "train one first"."""
    import sqlite3

    from mlflow.exceptions import MlflowException

    shutil.copy(trained.mlruns / "mlflow.db", tmp_path / "mlflow.db")
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute("DROP TABLE registered_model_aliases")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.configure()
    with pytest.raises(MlflowException) as info:
        tracking.load_model(f"models:/{trained.name}@candidate")
    assert not isinstance(info.value, ModelNotFoundError)
    assert "registered_model_aliases" in str(info.value)


def test_a_model_whose_files_were_moved_away_is_named_so(trained: TrainedModel) -> None:
    artifacts = trained.mlruns / "artifacts"
    away = trained.mlruns / "artifacts.away"
    artifacts.rename(away)
    try:
        with pytest.raises(ModelNotFoundError, match=r"models:/tiny-parts@candidate is known "
                                                     r"to sqlite:///.*, but none of its files "
                                                     r"came from the artifact store \(MLflow "
                                                     r"looked in .*/artifacts/.*\): .* was "
                                                     r"moved or deleted \(MLflow records absolute "
                                                     r"paths, so a moved or copied store"):
            tracking.load_model(trained.alias_uri)
    finally:
        away.rename(artifacts)


def test_a_store_moved_whole_still_loads_its_models(
        trained: TrainedModel, caplog: pytest.LogCaptureFixture) -> None:
    """Moved with its database to another --mlruns (a bigger disk), the store records
    the absolute paths of where it was made: its models read from the same place below
    its own artifacts folder, with a warning, not "train and register it again"; so is the
    record of its training images, which calibrate and evaluate leave out."""
    trained_on = tracking.training_image_digests(trained.run_id)
    assert trained_on  # what calibrate and evaluate leave out of their folders
    moved = trained.mlruns.parent / "elsewhere" / "mlruns"
    moved.parent.mkdir()
    trained.mlruns.rename(moved)
    try:
        tracking.configure(moved)
        loaded = tracking.load_model(trained.alias_uri)
        assert (loaded.name, loaded.version) == (trained.name, trained.version)
        assert f"which is gone; reading them from {moved / 'artifacts'}/" in caplog.text
        by_run = tracking.load_model(trained.run_uri)  # MLflow 3 keeps it apart from the run
        assert (by_run.name, by_run.version) == (trained.name, trained.version)
        assert tracking.training_image_digests(trained.run_id) == trained_on
    finally:
        moved.rename(trained.mlruns)
        moved.parent.rmdir()
        tracking.configure(trained.mlruns)
    reference = tracking.load_model(trained.alias_uri).model.state_dict()
    assert all(torch.equal(value, reference[key])
               for key, value in loaded.model.state_dict().items())


@pytest.mark.parametrize(("damage", "said"), [
    ("model.safetensors", r"is damaged or incomplete"),
    ("config.json", r"is not a model configuration anomaly-flow can read"),
])
@pytest.mark.parametrize("uri_kind", ["alias_uri", "run_uri"])
def test_a_damaged_stored_model_names_the_store_file_not_a_temporary_copy(
        trained: TrainedModel, damage: str, said: str, uri_kind: str) -> None:
    """The files are downloaded to a temporary folder, gone when the user reads the
    message: the message names the file in the store's artifacts."""
    originals = {path: path.read_bytes()
                 for path in (trained.mlruns / "artifacts").rglob(damage)}
    assert originals
    try:
        for path, data in originals.items():
            path.write_bytes(data[: len(data) // 2])
        with pytest.raises(ModelFileError, match=said) as info:
            tracking.load_model(getattr(trained, uri_kind))
    finally:
        for path, data in originals.items():
            path.write_bytes(data)
    named = Path(str(info.value).split(" ", 1)[0])
    assert named in originals, str(info.value)


def test_a_damaged_calibration_file_is_named(trained: TrainedModel, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    tracking.load_model(trained.alias_uri).model.save(folder)
    for damaged, said in (("{", "is not valid JSON"), ("[]", "must be a JSON object"),
                          ('{"schema_version": 1}', "")):
        (folder / "calibration.json").write_text(damaged)
        with pytest.raises(ModelFileError, match=rf"^{re.escape(str(folder))}/calibration.json "
                                                 rf"is not a calibration anomaly-flow can read "
                                                 rf"\(.*{said}.*\); copy or download the model "
                                                 "again, or calibrate"):
            tracking.load_model(str(folder))
    (folder / "calibration.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ModelFileError, match=r"calibration\.json is not a calibration"):
        tracking.load_model(str(folder))


def test_a_folder_without_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="holds no model"):
        tracking.load_model(str(tmp_path))


def test_calibrated_version_is_registered_linked_and_promoted(
        trained: TrainedModel, image_dirs: ImageDirs, mlruns: Path) -> None:
    tracking.configure(trained.mlruns)  # the `mlruns` fixture configured the empty store
    source_weights = tracking.load_model(trained.alias_uri, device="cpu").model
    # A store of our own, so the shared one keeps a single uncalibrated version.
    tracking.configure(mlruns)
    with tracking.start_run("calibrated-parts", "train") as run:
        uri = tracking.log_model(run, source_weights, None)
        assert tracking.register_model(uri, "calibrated-parts", alias="candidate",
                                       tags={"training_run_id": run.run_id}) == "1"
        training_run = run.run_id
    source = tracking.load_model("models:/calibrated-parts@candidate", device=AUTO)
    cal_paths = [str(p) for p in image_dirs.files(image_dirs.calibration)]
    cal_scores = library_scores(source.model, cal_paths)["bpd"].to_numpy()
    calibration = calibrate("bpd", cal_scores, alpha=0.1)

    with tracking.start_run("calibrated-parts", "calibrate") as run:
        registered = tracking.register_calibrated_version(source, calibration, run, promote=True)
        calibration_run = run.run_id
    assert registered == ("models:/calibrated-parts/2", "2", None)  # no champion before
    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias("calibrated-parts", "champion")
    assert str(mv.version) == "2"
    assert mv.tags["calibration_run_id"] == calibration_run
    assert mv.tags["training_run_id"] == training_run
    # what chose the threshold, readable in the registry
    assert (mv.tags["threshold_method"], mv.tags["target_fpr"]) == ("conformal", "0.1")
    assert "previous_champion" not in mv.tags and "cost_fp" not in mv.tags
    assert str(client.get_model_version_by_alias("calibrated-parts", "candidate").version) == "1"
    # promoted again: the version champion left is returned and tagged, to undo a promotion
    with tracking.start_run("calibrated-parts", "calibrate") as run:
        again = tracking.register_calibrated_version(
            source, calibrate("bpd", cal_scores, alpha=0.2), run, promote=True)
    assert again == ("models:/calibrated-parts/3", "3", "2")
    assert client.get_model_version("calibrated-parts", "3").tags["previous_champion"] == "2"
    client.set_registered_model_alias("calibrated-parts", "champion", "2")

    champion = tracking.load_model("models:/calibrated-parts@champion")
    # the calibration, now recording the weights it was fitted to
    assert champion.calibration == dataclasses.replace(
        calibration, model_digest=source.model.digest())
    test_paths = [str(p) for p in image_dirs.files(image_dirs.test_anomalous)]
    out = mlflow.pyfunc.load_model("models:/calibrated-parts@champion").predict(
        pd.DataFrame({"path": test_paths}))
    scores = library_scores(source.model, test_paths)["bpd"].to_numpy()
    np.testing.assert_array_equal(out["p_value"].to_numpy(), calibration.p_values(scores))
    assert out["is_anomaly"].tolist() == calibration.decide(scores).tolist()

    # models:/NAME/latest is the highest version, in any case, as MLflow reads it
    for latest in ("latest", "LATEST"):
        assert tracking.load_model(f"models:/calibrated-parts/{latest}").version == "3"
    client.create_registered_model("empty-parts")
    with pytest.raises(ModelNotFoundError, match="'empty-parts' has no versions yet, so "
                                                 "models:/empty-parts/latest names none"):
        tracking.load_model("models:/empty-parts/latest")

    # the run URI of a registered model is that version; of an unregistered one, none
    from_run = tracking.load_model(f"runs:/{training_run}/model")
    assert (from_run.name, from_run.version) == ("calibrated-parts", "1")
    with tracking.start_run("calibrated-parts", "unregistered") as run:
        tracking.log_model(run, source_weights, None)
        unregistered = tracking.load_model(f"runs:/{run.run_id}/model")
        assert unregistered.name is None and unregistered.version is None
        with pytest.raises(ModelNotFoundError, match="not a registered model version"):
            tracking.register_calibrated_version(unregistered, calibration, run, promote=False)


def test_registration_prints_nothing_and_links_the_logged_model(
        mlruns: Path, capfd: pytest.CaptureFixture[str]) -> None:
    model = Glow(GlowConfig(image_size=8, levels=1, n_bits=5))
    with tracking.start_run("quiet-parts", "train") as run:
        first_uri = tracking.log_model(run, model)
        second_uri = tracking.log_model(run, model, artifact_path="again")
    capfd.readouterr()
    assert tracking.register_model(first_uri, "quiet-parts", alias="candidate",
                                   tags={"val_bpd": 1.5}) == "1"  # a new registered model
    assert tracking.register_model(second_uri, "quiet-parts") == "2"  # an existing one
    assert tracking.register_model(f"runs:/{run.run_id}/again", "other-parts") == "1"
    err = capfd.readouterr().err
    for chatter in ("Successfully registered", "already exists", "Created version",
                    "registering model based on"):
        assert chatter not in err, err

    client = mlflow.MlflowClient()
    first, second = (uri.removeprefix("models:/") for uri in (first_uri, second_uri))
    expected = {("quiet-parts", "1"): first_uri, ("quiet-parts", "2"): second_uri,
                ("other-parts", "1"): second_uri}
    for (name, version), source in expected.items():
        mv = client.get_model_version(name, version)
        assert (mv.source, mv.run_id, mv.status) == (source, run.run_id, "READY")
    assert client.get_model_version("quiet-parts", "1").tags == {"val_bpd": "1.5"}
    assert json.loads(client.get_logged_model(first).tags["mlflow.modelVersions"]) == [
        {"name": "quiet-parts", "version": 1}]
    assert json.loads(client.get_logged_model(second).tags["mlflow.modelVersions"]) == [
        {"name": "quiet-parts", "version": 2}, {"name": "other-parts", "version": 1}]
    for uri, version in (("models:/quiet-parts@candidate", "1"), ("models:/quiet-parts/2", "2")):
        loaded = tracking.load_model(uri)
        assert (loaded.version, loaded.run_id) == (version, run.run_id)
        assert mlflow.pyfunc.load_model(uri).metadata.run_id == run.run_id


def test_a_stop_during_a_run_start_model_logging_or_registration_finishes_it_first(
        mlruns: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop landing inside one of these writes is raised once it is done, so the store
    is never left with a run that stays RUNNING, a half-written model, or a version without
    the alias it was registered for."""
    from anomaly_flow.stopping import Terminated, sigterm_as_interrupt

    client = mlflow.MlflowClient()
    model = Glow(GlowConfig(image_size=8, levels=1, n_bits=5))
    with monkeypatch.context() as patch:
        stop_during(patch, mlflow, "start_run")
        with pytest.raises(Terminated), sigterm_as_interrupt(), \
                tracking.start_run("stopped-parts", "started"):
            pytest.fail("the stop should be raised before the block runs")
    assert mlflow.active_run() is None
    (started,) = client.search_runs([client.get_experiment_by_name("stopped-parts")
                                     .experiment_id])
    assert started.info.status == "KILLED"
    # a nested run stopped as it starts is ended; its parent goes on
    with tracking.start_run("stopped-parts", "parent") as parent:
        with monkeypatch.context() as patch:
            stop_during(patch, mlflow, "start_run")
            with pytest.raises(Terminated), sigterm_as_interrupt(), \
                    tracking.start_run("stopped-parts", "child", nested=True):
                pytest.fail("the stop should be raised before the block runs")
        assert mlflow.active_run().info.run_id == parent.run_id
    (child,) = client.search_runs([parent.experiment_id], "attributes.run_name = 'child'")
    assert (child.info.status, client.get_run(parent.run_id).info.status) \
        == ("KILLED", "FINISHED")

    with pytest.raises(Terminated), sigterm_as_interrupt(), \
            tracking.start_run("stopped-parts", "logged") as run:
        with monkeypatch.context() as patch:
            stop_during(patch, mlflow.pyfunc, "log_model")
            tracking.log_model(run, model)  # raises once the model is logged
        pytest.fail("the stop should be raised as the model is logged")
    assert client.get_run(run.run_id).info.status == "KILLED"
    logged = mlflow.pyfunc.load_model(f"runs:/{run.run_id}/model")  # whole and loadable
    assert logged.metadata.run_id == run.run_id
    logged_uri = f"runs:/{run.run_id}/model"

    with monkeypatch.context() as patch:
        stop_during(patch, mlflow, "register_model")
        with pytest.raises(Terminated), sigterm_as_interrupt():
            tracking.register_model(logged_uri, "stopped-parts", alias="candidate")
    assert str(client.get_model_version_by_alias("stopped-parts", "candidate").version) == "1"


def test_a_finished_training_is_reused_only_as_it_was(trained: TrainedModel,
                                                      image_dirs: ImageDirs) -> None:
    """What end_to_end --resume goes on from after a stop past the training: the version
    that training registered, on the same images with the same settings, and only while
    the registry still holds it as that training's."""
    reused = tracking.finished_training(trained.data, trained.name, trained.config,
                                        trained.mlruns)
    assert reused is not None
    assert (reused.run_id, reused.version) == (trained.run_id, trained.version)
    assert reused.model_uri == f"models:/{trained.name}/{trained.version}"
    longer = trained.config.replace(epochs=trained.config.train.epochs + 1)
    assert tracking.finished_training(trained.data, trained.name, longer,
                                      trained.mlruns) is None
    assert tracking.finished_training(image_dirs.calibration, trained.name, trained.config,
                                      trained.mlruns) is None
    record = tracking.checkpoint_dir(trained.name, trained.mlruns) / "run.json"
    kept = record.read_text()
    try:  # a version the registry no longer has (deleted), or another training's
        for version in ("999", str(int(trained.version) + 1)):
            record.write_text(json.dumps({**json.loads(kept), "version": version}))
            assert tracking.finished_training(trained.data, trained.name, trained.config,
                                              trained.mlruns) is None
    finally:
        record.write_text(kept)
