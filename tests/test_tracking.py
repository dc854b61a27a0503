"""Tests for anomaly_flow.tracking.training, and for the whole package with real parts:
``mlflow models serve`` and ``mlflow server`` processes, and Spark in local mode."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from anomaly_flow import tracking
from anomaly_flow.data import split_train_val, write_image_folder
from anomaly_flow.fashion_mnist import SampleData
from anomaly_flow.train import TrainingError
from tests.conftest import (
    AUTO,
    ImageDirs,
    TrainedModel,
    library_scores,
    new_store,
    tiny_config,
)


def test_training_run_has_params_metrics_artifacts_tags_and_candidate(
        trained: TrainedModel, tmp_path: Path) -> None:
    client = mlflow.MlflowClient()
    run = client.get_run(trained.run_id)
    params = run.data.params
    assert params["model.levels"] == str(trained.config.model.levels)
    assert params["train.epochs"] == "2" and params["train.lr"] == str(trained.config.train.lr)
    assert params["data.n_images"] == "48"
    # MLflow records the packaged model's load-time setting as a param (README: "MLflow")
    assert params["device"] == "auto"
    steps = client.get_metric_history(trained.run_id, "train_bpd")
    assert len(steps) >= 4 and [m.step for m in steps] == sorted(m.step for m in steps)
    assert len(client.get_metric_history(trained.run_id, "val_bpd")) == 2  # per epoch
    for key in ("images_per_sec", "skipped_steps", "lr", "images_per_sec_epoch"):
        assert key in run.data.metrics
    assert np.isclose(run.data.metrics["val_bpd"], trained.val_bpd)
    files = {f.path for f in client.list_artifacts(trained.run_id)}
    assert {"config.json", "samples.png", "training_curves.png"} <= files
    config = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=trained.run_id, artifact_path="config.json", dst_path=str(tmp_path))
        ).read_text())
    assert config == trained.config.to_dict()
    tags = run.data.tags
    assert len(tags["data_fingerprint"]) == 64
    assert (tags["device"], tags["precision"]) == ("cpu", "float32")
    assert tags["data_folder"] == str(trained.data.resolve())
    assert tags["data_shapes"] == "28×28 (all 48 looked at)"  # the sample's Fashion-MNIST
    commit = tracking.git_commit()
    assert tags.get("git_commit") == commit  # present whenever the tests run in a checkout
    version = client.get_model_version_by_alias(trained.name, "candidate")
    assert str(version.version) == trained.version and version.run_id == trained.run_id
    assert version.tags["training_run_id"] == trained.run_id
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == trained.name
    checkpoints = tracking.checkpoint_dir(trained.name, trained.mlruns)
    assert (checkpoints / "latest").is_file() and (checkpoints / "run.json").is_file()


def test_scoring_says_when_images_come_in_a_size_the_trained_model_never_saw(
        trained: TrainedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The registered model knows its training images were 28×28: a folder of 64×48
    photos is scored, with a warning that their size alone can make them look
    anomalous; a folder of 28×28 images gets none."""
    from anomaly_flow.folder_scoring import score_folder

    loaded = tracking.load_model(trained.alias_uri)
    photos, alike = tmp_path / "photos", tmp_path / "alike"
    rng = np.random.default_rng(0)
    for folder, shape in ((photos, (48, 64)), (alike, (28, 28))):
        folder.mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
                folder / f"{i}.png")
    caplog.set_level(logging.WARNING, logger="anomaly_flow")
    score_folder(loaded.model, None, photos, tmp_path / "photos.csv")
    said = [r.getMessage() for r in caplog.records if "none of the model's training" in
            r.getMessage()]
    assert said == [f"{photos}: all images looked at are of a size none of the model's "
                    "training images looked at had (e.g. 64×48; the training images were "
                    "28×28): brought to 16×16 (model.image_size) from another size than "
                    "they were, their detail (and proportions, where the aspect ratio "
                    "differs) is unlike every training image's, which alone can make them "
                    "score as anomalous; score images from the same source and size as the "
                    "training images, or train a model on images like these"]
    assert len(pd.read_csv(tmp_path / "photos.csv")) == 4  # scored all the same
    caplog.clear()
    score_folder(loaded.model, None, alike, tmp_path / "alike.csv")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # resumed, the notes speak of the files the run scores, not of the folder
    shutil.copy(photos / "0.png", alike / "photo.png")
    score_folder(loaded.model, None, alike, tmp_path / "alike.csv", resume=True)
    said = [r.getMessage() for r in caplog.records if "none of the model's training" in
            r.getMessage()]
    assert said and said[0].startswith(f"{alike} (the 1 file not scored before): all images "
                                       "looked at are of a size none")


def test_the_readmes_python_api_runs(trained: TrainedModel, image_dirs: ImageDirs,
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python example, as written, with this test's store, model and folder
    in place of its made-up names."""
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    code = re.search(r"## Python API\n+```python\n(.*?)```", readme, re.DOTALL)
    assert code is not None
    source = code.group(1)
    for made_up, real in (("path/to/mlruns", str(trained.mlruns)),
                          ("models:/bottles@champion", trained.alias_uri),
                          ("incoming/", str(image_dirs.test_normal))):
        assert made_up in source
        source = source.replace(made_up, real)
    monkeypatch.chdir(tmp_path)
    names: dict[str, Any] = {}
    exec(compile(source, "README.md", "exec"), names)
    n_images = len(image_dirs.files(image_dirs.test_normal))
    assert names["summary"].n_scored == n_images
    assert len(pd.read_csv(tmp_path / "scores.csv")) == n_images
    parts = names["parts"]
    torch.testing.assert_close(parts.bpd, 8 + parts.level_bits.sum(dim=1))

    # the next example: every column of images in memory, as `score` wrote them above
    after = readme[code.end():]
    every = re.search(r"```python\n(.*?)```", after, re.DOTALL)
    assert every is not None and "paths_or_png_bytes" in every.group(1)
    files = image_dirs.files(image_dirs.test_normal)
    names["paths_or_png_bytes"] = [path.read_bytes() for path in files]
    exec(compile(every.group(1), "README.md", "exec"), names)
    written = pd.read_csv(tmp_path / "scores.csv")
    assert written["path"].tolist() == [str(path) for path in files]
    columns = [c for c in written.columns if c not in ("path", "error")]
    in_memory = names["table"][columns].astype({"is_anomaly": float})  # NA as CSV reads it
    pd.testing.assert_frame_equal(in_memory.reset_index(drop=True), written[columns],
                                  check_exact=True, check_dtype=False)


def test_non_finite_validation_bpd_is_never_registered(
        tmp_path: Path, sample: SampleData, mlruns: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An honest way to get a NaN validation bits/dim: the only validation image decodes
    when training starts (a validation split that never does is refused before it) and is
    damaged on disk while the model trains. A broken training file rides along to check
    reporting."""
    from anomaly_flow import train as train_module

    config = tiny_config(epochs=1)
    n = 12
    train_idx, val_idx = split_train_val(n, config.train.val_fraction, config.train.seed)
    assert len(val_idx) == 1
    folder = tmp_path / "data"
    paths = write_image_folder(sample.train[:n], folder, "img-")
    paths[int(train_idx[0])].write_bytes(b"not an image")
    checked = train_module._check_validation_decodes

    def then_damaged(*args: Any) -> None:
        checked(*args)
        paths[int(val_idx[0])].write_bytes(b"not an image")

    monkeypatch.setattr(train_module, "_check_validation_decodes", then_damaged)
    outcome = tracking.train_and_register(folder, "never", config, device="cpu",
                                          mlruns=mlruns, progress=False)
    assert outcome.version is None
    assert "not registered" in outcome.message and "not finite" in outcome.message
    # both broken files, the validation one included, are reported
    assert "2 file(s) of the data folder could not be decoded" in outcome.message
    client = mlflow.MlflowClient()
    assert client.search_registered_models(filter_string="name = 'never'") == []
    run = client.get_run(outcome.run_id)
    assert "not finite" in run.data.tags["not_registered_reason"]
    assert run.info.status == "FAILED"
    assert run.data.tags["failed_files"] == "2"
    failed = Path(mlflow.artifacts.download_artifacts(run_id=outcome.run_id,
                                                      artifact_path="failed_files.txt",
                                                      dst_path=str(tmp_path)))
    assert paths[int(train_idx[0])].name in failed.read_text()
    assert paths[int(val_idx[0])].name in failed.read_text()
    assert outcome.model_uri.startswith("models:/m-")  # logged for inspection, not registered


def test_a_validation_split_that_never_decodes_is_refused_before_training(
        tmp_path: Path, sample: SampleData, mlruns: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Its bits/dim would be NaN after every epoch, and the model refused registration
    only at the end: hours of GPU time for nothing."""
    config = tiny_config(epochs=50)
    n = 30
    _, val_idx = split_train_val(n, config.train.val_fraction, config.train.seed)
    folder = tmp_path / "data"
    paths = write_image_folder(sample.train[:n], folder, "img-")
    for index in val_idx:
        paths[int(index)].write_bytes(b"not an image")
    with caplog.at_level(logging.INFO, logger="anomaly_flow.train"), \
            pytest.raises(TrainingError, match=(
                rf"^none of the {len(val_idx)} image\(s\) of the validation split \(the share "
                r"of the folder held out for validation bits/dim and the normal reference\) "
                r"could be decoded \(e\.g\. .*img-\d+\.png: cannot identify image file.*\), "
                r"so the model could not be validated or registered; replace or remove the "
                r"undecodable files")):
        tracking.train_and_register(folder, "never-valid", config, device="cpu",
                                    mlruns=mlruns, progress=False)
    assert not [r for r in caplog.records if "epoch 1 of 50" in r.getMessage()]  # none run
    # each is reported once, in the split it is in
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == len(val_idx)
    assert all("(validation split): cannot identify image file" in m for m in skipped)
    assert mlflow.MlflowClient().search_registered_models("name = 'never-valid'") == []


# ------------------------------------------------------------------- real processes


@contextlib.contextmanager
def process(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Run ``command`` in its own process group; kill the whole group afterwards."""
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with (contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
              urllib.request.urlopen(url, timeout=2) as response):
            if response.status == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def strict_json(text: str | bytes) -> Any:
    """JSON as a strict parser reads it: a bare NaN or Infinity is an error."""
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: a bare {constant}")
    return json.loads(text, parse_constant=refuse)


def post_json(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return strict_json(response.read())


def post_refused(url: str, payload: dict) -> tuple[int, str]:
    """The HTTP status and message of a request the server refuses."""
    with pytest.raises(urllib.error.HTTPError) as info:
        post_json(url, payload)
    return info.value.code, strict_json(info.value.read())["message"]


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_same_scores(
        trained: TrainedModel, image_dirs: ImageDirs, tracking_env: dict[str, str],
        free_port: int, tmp_path: Path) -> None:
    files = image_dirs.files(image_dirs.test_normal)[:4] + image_dirs.files(
        image_dirs.test_anomalous)[:4]
    paths = [str(p) for p in files]
    expected = library_scores(tracking.load_model(trained.alias_uri, device=AUTO).model, paths)
    # the server reads under the images' folder only, relative paths taken from there
    root = Path(os.path.commonpath(files)).resolve()
    env = {**tracking_env, "MLFLOW_TRACKING_URI": trained.tracking_uri,
           "ANOMALY_FLOW_PATH_ROOT": str(root)}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", trained.alias_uri,
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(free_port), "-w", "1"]
    log = tmp_path / "serve.log"
    with process(command, env, log) as proc:
        base = f"http://127.0.0.1:{free_port}"
        wait_for(f"{base}/ping", proc, log)
        by_path = post_json(f"{base}/invocations", {
            "dataframe_split": {"columns": ["path"], "data": [[p] for p in paths]},
            "params": {"threshold": 100.0}})
        by_bytes = post_json(f"{base}/invocations", {"dataframe_split": {
            "columns": ["image"],
            "data": [[base64.b64encode(f.read_bytes()).decode()] for f in files]}})
        # one file per request, as a live service sends them: the same bits
        alone = [post_json(f"{base}/invocations", {
            "dataframe_split": {"columns": ["path"], "data": [[p]]}})["predictions"][0]["bpd"]
            for p in paths[:3]]
        # a cell that names no image is an error in its row, not a refused request
        png = base64.b64encode(files[0].read_bytes()).decode()
        mixed = post_json(f"{base}/invocations", {"dataframe_split": {
            "columns": ["image", "path"],
            "data": [[png, None], [None, paths[1]], ["!!", None], [None, None], ["", ""]]}})
        # the other request formats: a null path is no image, not a file named "None"
        other_formats = [post_json(f"{base}/invocations", payload)["predictions"]
                         for payload in ({"inputs": {"path": [None, paths[0]]}},
                                         {"instances": [{"path": None}, {"path": paths[0]}]})]
        # columns of strings only, which MLflow packs into one row of lists: a row each
        columnar = [post_json(f"{base}/invocations", payload)["predictions"]
                    for payload in ({"inputs": {"path": paths[:3]}},
                                    {"instances": {"path": paths[:3]}})]
        empty = post_refused(f"{base}/invocations", {"dataframe_records": []})
        misnamed = post_refused(f"{base}/invocations", {
            "dataframe_split": {"columns": ["Path"], "data": [[p] for p in paths]}})
        bad_param = post_refused(f"{base}/invocations", {
            "dataframe_split": {"columns": ["path"], "data": [[paths[0]]]},
            "params": {"batch_size": 0}})
        confined = post_json(f"{base}/invocations", {"dataframe_split": {
            "columns": ["path"], "data": [[os.path.relpath(paths[0], root)], [str(log)]]}})
        uneven = post_refused(f"{base}/invocations",
                              {"inputs": {"path": paths[:2], "image": [png]}})
    rows = by_path["predictions"]
    assert confined["predictions"][0]["bpd"] == expected["bpd"].iloc[0]
    assert confined["predictions"][1]["error"] == (
        f"the 'path' value {str(log)!r} is outside the one folder this model reads "
        "(ANOMALY_FLOW_PATH_ROOT); pass a path under it, relative to it or whole, or the "
        "file's bytes in the 'image' column")
    assert uneven[0] == 400
    assert "columns hold lists of different lengths (2 in 'path' and 1 in 'image')" in uneven[1]
    assert [row["bpd"] for row in rows] == expected["bpd"].tolist()
    assert [row["p_value"] for row in rows] == [None] * len(paths)  # null, not NaN
    mixed_rows = mixed["predictions"]
    assert [row["bpd"] for row in mixed_rows[:2]] == expected["bpd"].tolist()[:2]
    assert [row["bpd"] for row in mixed_rows[2:]] == [None] * 3
    assert [row["is_anomaly"] for row in mixed_rows] == [None] * 5
    assert [row["error"] for row in mixed_rows] == [
        "", "", "the 'image' value is text but not base64; pass the image file's bytes (or "
        "its path in the 'path' column)", "no image given (empty value)",
        "no image given (empty value)"]
    for status, message in (empty, misnamed):
        assert status == 400
        assert "the input has no 'path' or 'image' column" in message
        assert "but the model needs a 'path' (string) or an 'image' (bytes) column" in message
    assert "an empty request, or a plain list of values that is no table, reads the same" \
        in empty[1]
    assert bad_param[0] == 400
    assert "the batch_size param must be a positive number of images, not 0" in bad_param[1]
    assert alone == expected["bpd"].tolist()[:3]
    for answer in columnar:
        assert [row["bpd"] for row in answer] == expected["bpd"].tolist()[:3]
    for answer in other_formats:
        assert [row["error"] for row in answer] == ["no image given (empty value)", ""]
        assert answer[1]["bpd"] == expected["bpd"].iloc[0]
    assert [row["is_anomaly"] for row in rows] == [False] * len(paths)
    assert [row["bpd"] for row in by_bytes["predictions"]] == expected["bpd"].tolist()
    assert all(row["error"] == "" for row in rows)


@pytest.mark.slow
def test_training_logs_and_registers_on_a_real_mlflow_server(
        image_dirs: ImageDirs, tracking_env: dict[str, str], free_port: int, tmp_path: Path,
        mlflow_db_template: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    server_store = new_store(tmp_path / "server", mlflow_db_template)
    command = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{server_store / 'mlflow.db'}",
               "--artifacts-destination", str(server_store / "artifacts"),
               "-h", "127.0.0.1", "-p", str(free_port), "--workers", "1"]
    log = tmp_path / "server.log"
    with process(command, tracking_env, log) as proc:
        url = f"http://127.0.0.1:{free_port}"
        wait_for(f"{url}/health", proc, log)
        # credentials in the URI (this server ignores them): never shown anywhere
        with_password = f"http://alice:s3cret@127.0.0.1:{free_port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", with_password)
        outcome = tracking.train_and_register(image_dirs.train, "served", tiny_config(1),
                                              device="cpu", mlruns=tmp_path / "local",
                                              progress=False)
        # MLflow's link to the run goes to stderr: stdout is a command's data
        captured = capsys.readouterr()
        assert "View run" not in captured.out and "View run" in captured.err
        assert "alice:***@" in captured.err and "s3cret" not in captured.out + captured.err
        assert "s3cret" not in (tmp_path / "local" / "checkpoints" / "served" /
                                "run.json").read_text()
        assert mlflow.get_tracking_uri() == with_password
        client = mlflow.MlflowClient(tracking_uri=url, registry_uri=url)
        run = client.get_run(outcome.run_id)
        assert run.data.params["model.levels"] == "2" and "val_bpd" in run.data.metrics
        assert str(client.get_model_version_by_alias("served", "candidate").version) == "1"
        loaded = tracking.load_model("models:/served@candidate")
        assert loaded.run_id == outcome.run_id
    # the server holds the files (proxied: clients on other hosts reach them through it)
    assert list((server_store / "artifacts").rglob("model.safetensors"))
    assert not (tmp_path / "local" / "mlflow.db").exists()  # nothing went to a local store
    assert (tmp_path / "local" / "checkpoints" / "served" / "latest").is_file()


@pytest.mark.slow
@pytest.mark.filterwarnings(  # pyspark 4's note on pandas 3; the scores are checked below
    "ignore:PySpark does not yet fully support pandas:FutureWarning")
def test_spark_udf_scores_a_table_of_paths_with_the_registered_model(
        trained: TrainedModel, image_dirs: ImageDirs, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    pyspark_sql = pytest.importorskip("pyspark.sql")
    java_home = os.environ.get("JAVA_HOME")
    if shutil.which("java") is None and not (java_home and Path(java_home, "bin", "java")
                                             .is_file()):
        pytest.skip("Spark needs a Java runtime (17 or later), which this machine lacks: "
                    "install one (e.g. apt-get install openjdk-17-jre-headless) or set "
                    "JAVA_HOME to run this test")
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    monkeypatch.setenv("PYSPARK_DRIVER_PYTHON", sys.executable)
    files = image_dirs.files(image_dirs.test_normal) + image_dirs.files(
        image_dirs.test_anomalous)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    paths = [str(p) for p in files] + [str(not_an_image)]
    expected = library_scores(tracking.load_model(trained.alias_uri, device=AUTO).model, paths)
    spark = (pyspark_sql.SparkSession.builder.master("local[1]").appName("anomaly-flow-test")
             .config("spark.ui.enabled", "false").config("spark.driver.memory", "1g")
             .config("spark.sql.shuffle.partitions", "1")
             .config("spark.local.dir", str(tmp_path / "spark"))
             .getOrCreate())
    try:
        udf = mlflow.pyfunc.spark_udf(spark, trained.alias_uri, env_manager="local")
        table = spark.createDataFrame([(p,) for p in paths], ["path"])
        scored = table.withColumn("scores", udf("path")).select(
            "path", "scores.bpd", "scores.score", "scores.is_anomaly", "scores.error"
        ).toPandas()
        # a decision threshold passed as a param: 1.0 or 0.0, null where the row failed
        decide = mlflow.pyfunc.spark_udf(spark, trained.alias_uri, env_manager="local",
                                         params={"threshold": 100.0})
        decided = table.withColumn("scores", decide("path")).selectExpr(
            "scores.is_anomaly", "isnull(scores.is_anomaly) AS missing").toPandas()
        # a binary column of file bytes, with a null where the path is to be read
        with_bytes = spark.createDataFrame(
            [(p, None if i % 2 else Path(p).read_bytes()) for i, p in enumerate(paths)],
            "path string, image binary")
        by_bytes = with_bytes.withColumn("scores", udf("path", "image")).select(
            "scores.bpd", "scores.error").toPandas()
        # Spark's own file source: file: URIs in path, the bytes in content
        from pyspark.sql.functions import col, struct
        source = spark.read.format("binaryFile").load(str(image_dirs.test_normal))
        binary = source.select(
            "path", udf("path").alias("by_path"),
            udf(struct(col("content").alias("image"))).alias("by_content"),
        ).selectExpr("path", "by_path.bpd AS by_path", "by_path.error AS path_error",
                     "by_content.bpd AS by_content").toPandas()
    finally:
        spark.stop()
    assert scored["path"].tolist() == paths
    np.testing.assert_array_equal(scored["bpd"].to_numpy(), expected["bpd"].to_numpy())
    assert scored["is_anomaly"].isna().all()  # uncalibrated
    assert (scored["error"].iloc[:-1] == "").all()
    assert np.isnan(scored["bpd"].iloc[-1]) and scored["error"].iloc[-1] == \
        expected["error"].iloc[-1] != ""
    assert decided["is_anomaly"].iloc[:-1].tolist() == [0.0] * len(files)
    assert decided["missing"].tolist() == [False] * len(files) + [True]  # null, not NaN
    np.testing.assert_array_equal(by_bytes["bpd"].to_numpy(), expected["bpd"].to_numpy())
    assert by_bytes["error"].tolist() == expected["error"].tolist()
    normal = image_dirs.files(image_dirs.test_normal)
    binary = binary.sort_values("path", ignore_index=True)
    assert binary["path"].tolist() == [f"file:{p}" for p in normal]
    assert (binary["path_error"] == "").all()
    np.testing.assert_array_equal(binary["by_path"].to_numpy(),
                                  expected["bpd"].to_numpy()[:len(normal)])
    np.testing.assert_array_equal(binary["by_content"].to_numpy(), binary["by_path"].to_numpy())


def test_the_checks_before_a_training_reads_its_folder(tmp_path: Path) -> None:
    """What ``precheck_checkpoints`` says of a name's checkpoint folder before the
    training folder is read: a stopped training is kept from a plain start, but not
    named as resumable when another process is training the name (it is that one's), when
    its record is another name's, or when there is no record to resume from."""
    import fcntl

    from anomaly_flow.checkpoint import TrainingError

    config = tiny_config()
    folder = tracking.checkpoint_dir("parts", tmp_path)
    (folder / "step-00000004").mkdir(parents=True)
    (folder / "step-00000004" / "state.json").write_text("{}")

    def says(name: str = "parts", **flags: bool) -> str:
        with pytest.raises(TrainingError) as refused:
            tracking.precheck_checkpoints(name, config, tmp_path, **flags)
        return str(refused.value)

    assert says(resume=True, restart=True) == (
        "resume continues the last training and restart deletes it: pass one of them "
        "(--resume or --restart), not both")
    latest = folder / "step-00000004"
    assert says() == (f"the checkpoint folder of 'parts' holds a checkpoint ({latest}) and "
                      "no training record (run.json), so whether that training finished is "
                      "unknown; pass --restart to delete it and start afresh")
    (folder / "run.json").write_text("[]")
    assert says().startswith(f"the checkpoint folder of 'parts' holds a checkpoint ({latest}) "
                             f"and a damaged training record ({folder / 'run.json'}), so")
    record = {"model_name": "parts", "config": config.to_dict()}  # an older record
    (folder / "run.json").write_text(json.dumps(record))
    tracking.precheck_checkpoints("parts", config, tmp_path)  # finished, as it had no word
    (folder / "run.json").write_text(json.dumps({**record, "concluded": False}))
    assert says().startswith("the last training of 'parts' stopped before its end, and its "
                             f"checkpoint {folder / 'step-00000004'} (step 4) can go on")
    tracking.precheck_checkpoints("parts", config, tmp_path, restart=True)
    assert says("parts!").startswith(  # the same folder: not its training to resume
        f"the checkpoint folder {folder} holds the training of model 'parts'")
    with open(folder.parent / ".parts.lock", "w") as lock:
        lock.write("pid 4321 on elsewhere\n")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # flock locks belong to the open file: another open of it is another holder
        for flags in ({}, {"resume": True}, {"restart": True}):
            assert says(**flags) == (
                "another training of 'parts' is running (pid 4321 on elsewhere, holding "
                f"{folder.parent / '.parts.lock'}); wait for it to end, or train under "
                "another --name")
    tracking.precheck_checkpoints("parts", config, tmp_path, restart=True)  # released
