"""The scripts under ``pipelines/`` (calibrate, select_threshold, end_to_end), run in-process
through their ``main(argv)`` on real PNG folders and real sqlite MLflow stores."""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import mlflow
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from anomaly_flow import tracking
from anomaly_flow.calibration import cost_threshold, f1_threshold, rounded_up, youden_threshold
from anomaly_flow.fashion_mnist import load_sample
from anomaly_flow.folder_scoring import score_folder_table
from anomaly_flow.scoring import score_names
from tests.conftest import (
    ImageDirs,
    TrainedModel,
    corrupt_png,
    new_store,
    run_killed,
    stop_during,
)

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"pipelines_{name}", PIPELINES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_end_to_end_logs_a_parent_run_with_three_nested_runs(
        mlruns: Path, image_dirs: ImageDirs, capsys: pytest.CaptureFixture[str]) -> None:
    end_to_end, calibrate = load_script("end_to_end"), load_script("calibrate")
    argv = ["--name", "e2e", "--train", image_dirs.train,
            "--calibration", image_dirs.calibration, "--test-normal", image_dirs.test_normal,
            "--test-anomalous", image_dirs.test_anomalous, "--preset", "tiny", "--epochs", "1",
            "--target-fpr", "0.1", "--device", "cpu", "--mlruns", mlruns]
    assert end_to_end.main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    parent_id = out.split("parent run: ")[1].split()[0]
    assert re.search(r"at the threshold, on the test folders: false-positive rate "
                     r"\d+\.\d\d%, anomalies flagged \d+\.\d\d%", out)
    assert f"MLflow: mlflow ui --backend-store-uri sqlite:///{mlruns}/mlflow.db" in out

    client = mlflow.MlflowClient()
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in parent.data.tags
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}'")
    by_name = {child.info.run_name: child for child in children}
    assert sorted(by_name) == ["calibrate", "evaluate", "train-e2e"]
    assert all(child.info.status == "FINISHED" for child in children)
    assert parent.data.tags["train_run_id"] == by_name["train-e2e"].info.run_id
    assert parent.data.tags["calibrate_run_id"] == by_name["calibrate"].info.run_id
    assert parent.data.tags["evaluate_run_id"] == by_name["evaluate"].info.run_id
    assert by_name["calibrate"].data.tags["training_run_id"] == by_name["train-e2e"].info.run_id
    assert {"bpd_auroc", "typicality_auroc", "knn_auroc", "ensemble_auroc"} \
        <= set(by_name["evaluate"].data.metrics)
    # No --score: calibrated on the default, ensemble; its figures head the parent run.
    assert parent.data.tags["score_name"] == "ensemble"
    assert {"val_bpd", "threshold", "ensemble_auroc", "calibrated_fpr"} \
        <= set(parent.data.metrics)
    # Trained as version 1 (candidate), calibrated and promoted as version 2.
    assert str(client.get_model_version_by_alias("e2e", "candidate").version) == "1"
    champion = client.get_model_version_by_alias("e2e", "champion")
    assert str(champion.version) == "2"
    assert champion.tags["calibration_run_id"] == by_name["calibrate"].info.run_id

    # pipelines/calibrate.py on the same model: the cost method, not promoted.
    argv = ["--model", "models:/e2e@candidate", "--normal", image_dirs.calibration,
            "--anomalous", image_dirs.test_anomalous, "--method", "cost", "--cost-fn", "3",
            "--device", "cpu", "--mlruns", mlruns]
    assert calibrate.main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert "model: models:/e2e/3" in out
    assert "threshold: " in out and "(ensemble, cost)" in out
    assert "alias 'champion' moved" not in out
    loaded = tracking.load_model("models:/e2e/3")
    normal = score_folder_table(loaded.model, image_dirs.calibration).values("ensemble")
    anomalous = score_folder_table(loaded.model, image_dirs.test_anomalous).values("ensemble")
    assert loaded.calibration is not None and loaded.calibration.score_name == "ensemble"
    assert loaded.calibration.threshold.value == pytest.approx(
        cost_threshold(normal, anomalous, 1.0, 3.0).value, rel=1e-6)
    assert str(client.get_model_version_by_alias("e2e", "champion").version) == "2"


def test_calibrate_pipeline_refusal_is_one_line(
        trained: TrainedModel, image_dirs: ImageDirs, capsys: pytest.CaptureFixture[str]) -> None:
    calibrate = load_script("calibrate")
    argv = ["--model", trained.alias_uri, "--normal", image_dirs.calibration,
            "--target-fpr", "0.01", "--mlruns", trained.mlruns]
    assert calibrate.main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at least 99" in err[0]


def test_end_to_end_refuses_what_calibrate_and_evaluate_would_before_training(
        mlruns: Path, image_dirs: ImageDirs, capsys: pytest.CaptureFixture[str]) -> None:
    """A level the trained model will not have, or test folders that are one folder, used
    to be found after training, registering and promoting."""
    end_to_end = load_script("end_to_end")
    common = ["--name", "e2e-early", "--train", image_dirs.train, "--calibration",
              image_dirs.calibration, "--preset", "tiny", "--epochs", "1", "--target-fpr",
              "0.1", "--device", "cpu", "--mlruns", mlruns]
    broken = mlruns.parent / "broken"  # image names, no image: evaluate would score none
    broken.mkdir()
    (broken / "a.png").write_text("not an image")
    (broken / "b.jpg").write_bytes(b"")
    for extra, said in (
            (["--test-normal", image_dirs.test_normal, "--test-anomalous", broken],
             f"none of the 2 image file(s) in {broken} can be decoded (e.g. {broken / 'a.png'}"
             ": "),
            (["--test-normal", image_dirs.test_normal, "--test-anomalous",
              image_dirs.test_anomalous, "--score", "level_5"],
             "the model this configuration trains (2 levels, val_fraction 0.1) will not give "
             "the score 'level_5'; choose one of bpd, complexity, coarse_complexity, "
             "typicality, knn, pixel_knn, ensemble, level_1, level_2"),
            (["--test-normal", image_dirs.test_normal, "--test-anomalous",
              image_dirs.test_normal], "the normal and the anomalous folder are the same")):
        assert end_to_end.main([str(a) for a in common + extra]) == 1
        assert said in capsys.readouterr().err
    assert mlflow.MlflowClient().search_registered_models() == []
    assert not (mlruns / "checkpoints" / "e2e-early").exists()


def test_end_to_end_refuses_score_auto_before_training(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    end_to_end = load_script("end_to_end")
    with pytest.raises(SystemExit) as exit_info:
        end_to_end.parse_args(["--name", "e2e", "--sample", str(tmp_path), "--score", "auto"])
    assert exit_info.value.code == 2
    assert "--score auto needs labelled anomalies" in capsys.readouterr().err


@pytest.mark.parametrize(("script", "argv", "message"), [
    ("train", ["", "--name", "x"], "the path is empty"),
    ("calibrate", ["--model", "models:/x@candidate", "--normal", ""], "the path is empty"),
    ("select_threshold", ["--model", "models:/x@candidate", "--normal", "{here}",
                          "--anomalous", ""], "the path is empty"),
    ("end_to_end", ["--name", "x", "--sample", ""], "the path is empty"),
    ("train", ["{missing}", "--name", "x"], "argument data: image folder not found"),
    ("calibrate", ["--model", "models:/x@candidate", "--normal", "{here}", "--anomalous",
                   "{missing}"], "argument --anomalous: image folder not found"),
    ("select_threshold", ["--model", "models:/x@candidate", "--normal", "{file}",
                          "--anomalous", "{here}"], "argument --normal: {file} is not a folder"),
    ("end_to_end", ["--name", "x", "--train", "{here}", "--calibration", "{here}",
                    "--test-normal", "{missing}", "--test-anomalous", "{here}"],
     "argument --test-normal: image folder not found: {missing}; check the path"),
])
def test_a_folder_argument_that_is_empty_missing_or_a_file_names_its_option(
        script: str, argv: list[str], message: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """An empty path is refused, not taken for the current folder; a missing folder or a
    file is refused before any work, by the option that gave it (a pipeline takes up to
    four folders)."""
    (tmp_path / "notes.txt").write_text("not a folder")
    names = {"here": tmp_path, "missing": tmp_path / "absent", "file": tmp_path / "notes.txt"}
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).parse_args([arg.format(**names) for arg in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # one line, no usage synopsis before it, and where help is
    assert err.count("\n") == 1 and err.startswith("error: argument "), err
    assert message.format(**names) in err
    assert err.endswith(" --help')\n"), err  # the script's name, as it was run


def test_end_to_end_refuses_a_wrong_preset_before_writing_the_sample(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    end_to_end = load_script("end_to_end")
    not_toml = tmp_path / "notes.txt"
    not_toml.write_text("just words\n")
    for preset, message in [("tinyy", "--preset 'tinyy' is neither a preset (tiny, small, "
                                      "fashion-mnist) nor an existing TOML/JSON config file"),
                            (str(not_toml), f"cannot parse {not_toml}"),
                            (str(tmp_path), "is neither a preset")]:
        argv = ["--name", "e2e", "--sample", str(tmp_path / "sample"), "--preset", preset]
        assert end_to_end.main(argv) == 1
        assert message in capsys.readouterr().err
    # --config, as train takes it: a file, or an option error
    argv = ["--name", "e2e", "--sample", str(tmp_path / "sample"), "--config", str(not_toml)]
    assert end_to_end.main(argv) == 1
    assert f"cannot parse {not_toml}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        end_to_end.main([*argv[:-1], str(tmp_path / "absent.toml")])
    assert exit_info.value.code == 2
    assert f"--config {tmp_path / 'absent.toml'} is not a file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one or the other
        end_to_end.main([*argv, "--preset", "tiny"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "sample").exists()


@pytest.fixture
def placeholder_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The folders that option-parsing tests name (``--normal n``), as empty folders in
    the working folder: a folder option is refused as it is parsed when it is missing."""
    for name in ("n", "a", "b", "c", "d", "x", "data"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)


@pytest.mark.usefixtures("placeholder_folders")
def test_two_zero_costs_are_refused_before_scoring(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_script("select_threshold").parse_args(
            ["--model", "models:/x@candidate", "--normal", "n", "--anomalous", "a",
             "--cost-fp", "0", "--cost-fn", "0"])
    assert exit_info.value.code == 2
    assert "--cost-fp and --cost-fn are both 0" in capsys.readouterr().err


@pytest.mark.usefixtures("placeholder_folders")
def test_select_threshold_register_conformal_needs_a_target_fpr_as_a_usage_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_script("select_threshold").parse_args(
            ["--model", "models:/x@candidate", "--normal", "n", "--anomalous", "a",
             "--register", "conformal"])
    assert exit_info.value.code == 2
    assert "--register conformal needs --target-fpr, e.g. --target-fpr 0.01" \
        in capsys.readouterr().err


def test_select_threshold_refuses_to_register_an_unregistered_model_before_scoring(
        trained: TrainedModel, image_dirs: ImageDirs, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A model folder has no registered name to add a version to: said before both
    folders are scored and the comparison printed, not after."""
    folder = tmp_path / "model"
    tracking.load_model(trained.version_uri).model.save(folder)
    argv = ["--model", folder, "--normal", image_dirs.calibration, "--anomalous",
            image_dirs.test_anomalous, "--register", "f1", "--device", "cpu", "--mlruns",
            trained.mlruns]
    assert load_script("select_threshold").main([str(a) for a in argv]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # no table: nothing was scored
    assert "is not a registered model version" in captured.err


@pytest.mark.parametrize("script", ["calibrate", "select_threshold"])
def test_pipeline_with_an_unknown_model_is_one_line(
        script: str, trained: TrainedModel, image_dirs: ImageDirs,
        capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "models:/no-such-model@champion", "--normal", image_dirs.calibration,
            "--anomalous", image_dirs.test_anomalous, "--target-fpr", "0.1",
            "--mlruns", trained.mlruns]
    assert load_script(script).main([str(a) for a in argv]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "no registered model 'no-such-model'" in err[0]


def test_select_threshold_compares_the_labelled_methods(
        trained: TrainedModel, image_dirs: ImageDirs,
        capsys: pytest.CaptureFixture[str]) -> None:
    select = load_script("select_threshold")
    argv = ["--model", trained.version_uri, "--normal", image_dirs.calibration,
            "--anomalous", image_dirs.test_anomalous, "--cost-fn", "4", "--target-fpr", "0.1",
            "--device", "cpu", "--mlruns", trained.mlruns]
    assert select.main([str(a) for a in argv]) == 0  # nothing registered: read-only
    out = capsys.readouterr().out
    methods = {"conformal", "f1", "youden", "cost"}
    rows = {tokens[0]: tokens for line in out.splitlines()
            if (tokens := line.split()) and tokens[0] in methods}
    assert set(rows) == methods, out

    model = tracking.load_model(trained.version_uri).model
    # No --score: the model's default, ensemble.
    normal = score_folder_table(model, image_dirs.calibration).values("ensemble")
    anomalous = score_folder_table(model, image_dirs.test_anomalous).values("ensemble")
    assert "score ensemble:" in out
    expected = {"f1": f1_threshold(normal, anomalous),
                "youden": youden_threshold(normal, anomalous),
                "cost": cost_threshold(normal, anomalous, 1.0, 4.0)}
    for method, threshold in expected.items():
        assert float(rows[method][1]) == pytest.approx(threshold.value, abs=1e-4)
    assert len(mlflow.MlflowClient().search_model_versions(f"name = '{trained.name}'")) == 1


def test_select_threshold_on_a_model_folder_reads_the_store_it_is_given_and_makes_none(
        trained: TrainedModel, image_dirs: ImageDirs, tmp_path: Path) -> None:
    """A model folder, nothing registered: the training run's record of its images is read
    from the --mlruns store (so training images in the normal folder are left out, as
    calibrate and evaluate leave them out), and no store appears in the working folder,
    neither MLflow's own ./mlflow.db nor ./mlruns. Without a store there is nothing to
    read, and a warning says what goes unchecked."""
    folder = Path(mlflow.artifacts.download_artifacts(trained.version_uri,
                                                      dst_path=str(tmp_path / "model")))
    normal = tmp_path / "normal"
    shutil.copytree(image_dirs.calibration, normal)
    for image in image_dirs.files(image_dirs.train)[:5]:
        shutil.copy(image, normal)
    work = tmp_path / "work"
    work.mkdir()
    script = PIPELINES / "select_threshold.py"
    for store, expected in (
            (trained.mlruns, f"5 of the 45 images in {normal} are images of the folder "
                             f"{folder} was trained on"),
            (tmp_path / "no-store", f"there is no MLflow store to read the training run of "
                                    f"{folder} from")):
        done = subprocess.run(
            [sys.executable, str(script), "--model", str(folder), "--normal", str(normal),
             "--anomalous", str(image_dirs.test_anomalous), "--device", "cpu", "--mlruns",
             str(store)], capture_output=True, text=True, timeout=300, cwd=work,
            env={**os.environ, "PYTHONPATH": str(PIPELINES.parent)})
        assert done.returncode == 0, done.stderr
        assert expected in " ".join(done.stderr.split()), done.stderr
        assert list(work.iterdir()) == []
    assert not (tmp_path / "no-store").exists()


def test_select_threshold_without_registering_names_copied_normal_images(
        trained: TrainedModel, image_dirs: ImageDirs, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The comparison alone warns as calibrate does: twenty copies of one normal image
    give thresholds that rest on that one image."""
    one = image_dirs.files(image_dirs.calibration)[0]
    same = tmp_path / "same"
    same.mkdir()
    for i in range(20):
        shutil.copy(one, same / f"copy-{i:02d}{one.suffix}")
    argv = ["--model", trained.version_uri, "--normal", same, "--anomalous",
            image_dirs.test_anomalous, "--device", "cpu", "--mlruns", trained.mlruns]
    with caplog.at_level(logging.WARNING):
        assert load_script("select_threshold").main([str(a) for a in argv]) == 0
    assert f"all 20 normal images of {same} have the same content" in caplog.text


def test_select_threshold_auto_score_registers_the_chosen_score(
        trained: TrainedModel, image_dirs: ImageDirs,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``--score auto`` prints every candidate's AUROC, compares the methods on the
    winner, and the registered version's calibration records that winner."""
    select = load_script("select_threshold")
    argv = ["--model", trained.version_uri, "--normal", image_dirs.calibration,
            "--anomalous", image_dirs.test_anomalous, "--score", "auto",
            "--register", "f1", "--device", "cpu", "--mlruns", trained.mlruns]
    assert select.main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out

    model = tracking.load_model(trained.version_uri).model
    normal = score_folder_table(model, image_dirs.calibration)
    anomalous = score_folder_table(model, image_dirs.test_anomalous)
    names = score_names(model)
    auroc = {name: roc_auc_score(
        np.r_[np.zeros(len(normal.values(name))), np.ones(len(anomalous.values(name)))],
        np.r_[normal.values(name), anomalous.values(name)]) for name in names}
    best = max(names, key=lambda name: (auroc[name], -names.index(name)))
    assert f"chosen: {best}" in out and f"score {best}:" in out, out

    registered = out.split("registered ", 1)[1].split()[0]
    calibration = tracking.load_model(registered).calibration
    assert calibration.score_name == best
    assert calibration.score_selection is not None
    assert calibration.score_selection.auroc == pytest.approx(auroc)
    assert calibration.threshold.value == pytest.approx(
        f1_threshold(normal.values(best), anomalous.values(best)).value)


@pytest.mark.parametrize("script", ["train", "calibrate", "select_threshold", "end_to_end"])
def test_help_explains_every_option_and_shows_its_default(
        script: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = text[text.index("options:"):]
    # every option line carries help text: a flag alone on its line is followed by an
    # indented line of help, any other line has both
    lines = options.splitlines()[1:]
    for i, line in enumerate(lines):
        if line.startswith("  -"):
            flag_only = len(line.split("  ")) <= 2 and not line.strip().startswith("-h")
            assert not flag_only or lines[i + 1].startswith(" " * 10), line
    assert "(default: auto)" in text  # --device
    if script in ("calibrate", "select_threshold"):
        words = " ".join(text.split())  # argparse wraps lines anywhere
        assert "(default: 256)" in words and "(default: 0)" in words  # batch size, workers


def help_examples(script: str, capsys: pytest.CaptureFixture[str]) -> list[list[str]]:
    """The commands after ``Example`` in the script's ``--help``, each split as a shell
    would (lines ending in a backslash joined)."""
    with pytest.raises(SystemExit):
        load_script(script).parse_args(["--help"])
    text = capsys.readouterr().out
    assert "\nExample" in text, text
    section = text[text.index("\nExample"):].replace("\\\n", " ")
    return [shlex.split(line) for line in section.splitlines()
            if line.strip().startswith("python ")]


@pytest.mark.parametrize("script", ["train", "calibrate", "select_threshold", "end_to_end"])
def test_help_ends_with_examples_the_script_accepts(
        script: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """--help showed the docstring's first paragraph only: the examples never reached it.
    (Their image folders are made first: a missing one is refused as it is parsed.)"""
    examples = help_examples(script, capsys)
    assert examples
    monkeypatch.chdir(tmp_path)
    folder_options = {"--normal", "--anomalous", "--train", "--calibration", "--test-normal",
                      "--test-anomalous"}
    for argv in examples:
        assert argv[:2] == ["python", f"pipelines/{script}.py"], argv
        args = argv[2:]
        folders = [value for option, value in itertools.pairwise(args)
                   if option in folder_options]
        if script == "train":
            folders.append(args[0])
        for folder in folders:
            Path(folder).mkdir(parents=True, exist_ok=True)
        load_script(script).parse_args(args)  # an option error exits


def test_the_train_examples_run_as_written(
        image_dirs: ImageDirs, tmp_path: Path, mlflow_db_template: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The second example resumed the first's training with another configuration, which
    a resume refuses; now it trains the same model longer."""
    train = load_script("train")
    first, second = help_examples("train", capsys)[:2]
    shutil.copytree(image_dirs.train, tmp_path / "data" / "good")
    new_store(tmp_path / "mlruns", mlflow_db_template)  # ./mlruns, already migrated
    monkeypatch.chdir(tmp_path)  # as written: data/good, and the store in ./mlruns
    try:
        assert train.main(first[2:]) == 0
        assert train.main(second[2:]) == 0, capsys.readouterr().err
        assert "model_uri: models:/parts/2" in capsys.readouterr().out
    finally:
        tracking.configure(tmp_path / "mlruns")  # the process-global URI stays on tmp_path


@pytest.mark.parametrize("script", ["train", "calibrate", "select_threshold", "end_to_end"])
def test_help_and_option_errors_come_before_torch_mlflow_or_sklearn_load(
        script: str, tmp_path: Path) -> None:
    """Seconds of imports stand between a mistyped option and its answer otherwise."""
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{str(PIPELINES / (script + '.py'))!r}, *sys.argv[1:]]\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    loaded = {'torch', 'mlflow', 'sklearn'} & set(sys.modules)\n"
        "    print(f'exit {stop.code} loaded {sorted(loaded)}')\n"
    )
    for argv, code in ((["--help"], 0), (["--no-such-option"], 2)):
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)
        assert f"exit {code} loaded []" in done.stdout, done.stdout + done.stderr


def test_end_to_end_refuses_what_calibrating_would_before_training(
        image_dirs: ImageDirs, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    end_to_end = load_script("end_to_end")
    store = tmp_path / "store"
    folders = ["--train", image_dirs.train, "--calibration", image_dirs.calibration,
               "--test-normal", image_dirs.test_normal, "--test-anomalous",
               image_dirs.test_anomalous, "--mlruns", store, "--name", "e2e-early"]
    for extra, expected in [(["--score", "foo"], "unknown score 'foo'"),
                            (["--target-fpr", "0.01"], "needs at least 99 held-out normal")]:
        assert end_to_end.main([str(a) for a in [*folders, *extra]]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    # calibrating on the training folder is refused after training: here, before it
    folders[3] = image_dirs.train
    assert end_to_end.main([str(a) for a in [*folders, "--target-fpr", "0.1"]]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    n = len(list(image_dirs.train.iterdir()))
    assert len(err) == 1 and f"{n} of the {n} images in {image_dirs.train} are also in the " \
        f"training folder {image_dirs.train} (same content), which leaves 0 held-out " \
        "images" in err[0], err
    # so is evaluating on normal test images that are all training images
    folders[3] = image_dirs.calibration
    trained_copy = shutil.copytree(image_dirs.train, tmp_path / "test-normal")
    folders[5] = trained_copy
    assert end_to_end.main([str(a) for a in [*folders, "--target-fpr", "0.1"]]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"all {n} images in {trained_copy} are also in the training " \
        f"folder {image_dirs.train} (same content), and evaluation needs normal test " \
        "images the model never saw" in err[0], err
    # anomalous test images that are normal images of the calibration folder: a warning
    folders[5] = image_dirs.test_normal
    mixed = shutil.copytree(image_dirs.test_anomalous, tmp_path / "test-anomalous")
    shutil.copy(image_dirs.files(image_dirs.calibration)[0], mixed / "relabelled.png")
    folders[7] = mixed
    argv = [*folders[:-1], "a b", "--target-fpr", "0.1"]  # a name refused next: no training
    with caplog.at_level(logging.WARNING):
        assert end_to_end.main([str(a) for a in argv]) == 1
    assert "model name 'a b' is invalid" in capsys.readouterr().err
    err = " ".join(caplog.text.split())
    assert f"1 image(s) of {mixed} have the same content as an image of the training " \
        f"folder {image_dirs.train} or the calibration folder {image_dirs.calibration} " \
        f"(e.g. {mixed / 'relabelled.png'}): normal there and anomalous in the test" in err
    assert not store.exists()  # nothing trained, logged or registered


def test_end_to_end_counts_only_decodable_calibration_images_before_training(
        image_dirs: ImageDirs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Ten calibration files for a rate of 0.1 (nine needed), two of them not images: the
    training ran, then calibrating refused the eight that decode."""
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for path in image_dirs.files(image_dirs.calibration)[:8]:
        shutil.copy(path, calibration)
    corrupt_png(calibration / "broken-1.png")
    corrupt_png(calibration / "broken-2.png")
    store = tmp_path / "store"
    argv = ["--name", "e2e-undecodable", "--train", image_dirs.train, "--calibration",
            calibration, "--test-normal", image_dirs.test_normal, "--test-anomalous",
            image_dirs.test_anomalous, "--preset", "tiny", "--epochs", "1", "--target-fpr",
            "0.1", "--device", "cpu", "--mlruns", store]
    assert load_script("end_to_end").main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "needs at least 9 held-out normal images for a false-positive rate of 0.1; only 8 " \
        f"of the 10 files in {calibration} can be used (2 cannot be decoded, e.g. " \
        f"{calibration / 'broken-1.png'}: " in err[0], err
    assert not store.exists()  # nothing trained, logged or registered


def test_end_to_end_refuses_a_sample_folder_with_other_contents_and_a_limit_below_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    end_to_end = load_script("end_to_end")
    (tmp_path / "notes.txt").write_text("mine")
    argv = ["--name", "e", "--sample", str(tmp_path), "--mlruns", str(tmp_path / "store")]
    assert end_to_end.main(argv) == 1
    assert "is not empty, and the sample goes into a new or empty folder" \
        in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    for limit in ("0", "-5"):
        with pytest.raises(SystemExit) as exit_info:
            end_to_end.parse_args([*argv, "--limit", limit])
        assert exit_info.value.code == 2
        assert f"argument --limit: {limit} is below 1" in capsys.readouterr().err
    # a calibration folder too small for --target-fpr: said before the sample is written,
    # naming the --limit that would do (the sample's own folder then says "add images")
    with pytest.raises(SystemExit) as exit_info:
        end_to_end.parse_args([*argv, "--limit", "10", "--target-fpr", "0.01"])
    assert exit_info.value.code == 2
    assert ("--limit 10 leaves at most 10 calibration images, and --target-fpr 0.01 needs "
            "at least 99; give --limit 99 or more, or a --target-fpr of at least 0.09091 "
            ) in capsys.readouterr().err  # 1/11 rounded up: typed back, it is accepted
    assert end_to_end.parse_args([*argv, "--limit", "10", "--target-fpr", "0.09091"])
    # more than the shipped sample holds: no --limit would do
    with pytest.raises(SystemExit):
        end_to_end.parse_args([*argv, "--limit", "700", "--target-fpr", "0.001"])
    shipped = len(load_sample().calibration)
    assert (f"needs at least 999; the sample holds {shipped}, so give a --target-fpr of at "
            f"least {rounded_up(1 / (shipped + 1)):g} ") in capsys.readouterr().err
    assert end_to_end.parse_args([*argv, "--limit", "9", "--target-fpr", "0.1"]).limit == 9


def test_select_threshold_refuses_a_conformal_row_it_cannot_fill_before_scoring(
        image_dirs: ImageDirs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The folder is too small for --target-fpr: said before any model is loaded (this
    one does not exist) or any image is scored."""
    argv = ["--model", "models:/never-trained@candidate", "--normal", image_dirs.calibration,
            "--anomalous", image_dirs.test_anomalous, "--target-fpr", "1e-300",
            "--mlruns", tmp_path / "store"]
    assert load_script("select_threshold").main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs at least 1e+300 held-out normal images for a " \
        "false-positive rate of 1e-300" in err[0], err
    assert err[0].endswith("raise --target-fpr. Or drop --target-fpr: here it only adds "
                           "the conformal row to the comparison of the labelled methods.")
    # registering that row: the rate is needed, so dropping it is no advice
    assert load_script("select_threshold").main(
        [*map(str, argv), "--register", "conformal"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("raise --target-fpr."), err


def test_select_threshold_refuses_an_unknown_score_in_one_line(
        trained: TrainedModel, image_dirs: ImageDirs,
        capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", trained.version_uri, "--normal", image_dirs.calibration,
            "--anomalous", image_dirs.test_anomalous, "--mlruns", trained.mlruns]
    select = load_script("select_threshold")
    for score in ("foo", "level_7"):
        assert select.main([str(a) for a in [*argv, "--score", score]]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert f"error: unknown score {score!r}" in err[-1], err


@pytest.mark.parametrize(("script", "argv", "expected"), [
    ("calibrate", ["--target-fpr", "0.1", "--cost-fp", "5"],
     "--cost-fp and --cost-fn only apply to the cost method"),
    ("calibrate", ["--method", "cost", "--cost-fn", "inf"],
     "argument --cost-fn: inf is not a finite number >= 0"),
    ("select_threshold", ["--anomalous", "x", "--cost-fp", "nan"],
     "argument --cost-fp: nan is not a finite number >= 0"),
    ("select_threshold", ["--anomalous", "x", "--cost-fp", "-1"],
     "argument --cost-fp: -1 is not a finite number >= 0"),
    ("calibrate", ["--target-fpr", "0.1", "--batch-size", "0"], "0 is below 1"),
    ("calibrate", ["--target-fpr", "0.1", "--workers", "-1"], "-1 is below 0"),
    ("select_threshold", ["--anomalous", "x", "--promote"],
     "--promote moves champion to the version --register makes"),
    ("select_threshold", ["--anomalous", "x", "--target-fpr", "1.5"],
     "argument --target-fpr: 1.5 is not a rate strictly between 0 and 1 (e.g. 0.01"),
    ("calibrate", ["--target-fpr", "nan"],
     "argument --target-fpr: nan is not a rate strictly between 0 and 1"),
    ("calibrate", ["--target-fpr", "1%"], "argument --target-fpr: '1%' is not a number"),
])
@pytest.mark.usefixtures("placeholder_folders")
def test_pipeline_options_that_would_be_ignored_or_fail_late_are_refused(
        script: str, argv: list[str], expected: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).parse_args(["--model", "models:/m@candidate", "--normal", "n",
                                        *argv])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.mark.usefixtures("placeholder_folders")
def test_end_to_end_refuses_limit_without_sample(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_script("end_to_end").parse_args(
            ["--name", "e", "--train", "a", "--calibration", "b", "--test-normal", "c",
             "--test-anomalous", "d", "--limit", "5"])
    assert "--limit caps the folders --sample writes" in capsys.readouterr().err


@pytest.mark.parametrize(("script", "argv"), [
    ("train", ["data", "--name", "n", "--epochs", "0"]),
    ("train", ["data", "--name", "n", "--batch-size", "-1"]),
    ("end_to_end", ["--name", "e", "--train", "a", "--calibration", "b", "--test-normal", "c",
                    "--test-anomalous", "d", "--epochs", "-1"]),
])
@pytest.mark.usefixtures("placeholder_folders")
def test_a_count_below_one_is_an_option_error(
        script: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """As the command line refuses it (exit 2, naming the option), not later as a config
    field the user never typed (exit 1)."""
    with pytest.raises(SystemExit) as stop:
        load_script(script).parse_args(argv)
    assert stop.value.code == 2
    option = argv[-2]
    assert f"argument {option}: {argv[-1]} is below 1" in capsys.readouterr().err


def test_a_stop_in_a_pipeline_returns_the_signals_status(
        trained: TrainedModel, image_dirs: ImageDirs, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, signal_handlers_restored: None) -> None:
    """SIGTERM is a stop in the calibration pipelines as in pipelines/train.py: a line,
    status 143, no traceback."""
    from anomaly_flow import evaluation

    stop_during(monkeypatch, evaluation, "score_folder_table")
    argv = ["--model", trained.alias_uri, "--normal", str(image_dirs.calibration),
            "--target-fpr", "0.1", "--device", "cpu", "--mlruns", str(trained.mlruns)]
    assert load_script("calibrate").main(argv) == 143
    assert capsys.readouterr().err.strip().endswith(
        "interrupted (before it started an MLflow run); run the same command again")


@pytest.mark.parametrize(("extra", "said"), [
    (["--name", ""], "model name '' is invalid"),
    (["--name", "a/b"], "model name 'a/b' is invalid"),
    (["--name", "e2e", "--device", "cuda:99"], "CUDA"),
    (["--name", "e2e", "--test-normal-is-calibration"],
     "shares images with the calibration folder"),
    (["--name", "e2e", "--test-anomalous-is-calibration"],
     "the normal and the anomalous folder are the same folder"),
    (["--name", "e2e", "--test-normal-copies-calibration"],
     "40 of the 40 images in the normal test folder"),
])
def test_end_to_end_refuses_before_its_parent_run(
        mlruns: Path, image_dirs: ImageDirs, capsys: pytest.CaptureFixture[str],
        extra: list[str], said: str) -> None:
    """A name, a device or test folders the stages would refuse leave no experiment and no
    FAILED parent run behind (an experiment named 'a/b' stayed in the store)."""
    folders = {"--train": image_dirs.train, "--calibration": image_dirs.calibration,
               "--test-normal": image_dirs.test_normal,
               "--test-anomalous": image_dirs.test_anomalous}
    if "--test-normal-is-calibration" in extra:
        extra, folders["--test-normal"] = extra[:2], image_dirs.calibration
    if "--test-anomalous-is-calibration" in extra:
        extra, folders["--test-anomalous"] = extra[:2], image_dirs.calibration
    if "--test-normal-copies-calibration" in extra:  # a copy, not the folder: by content
        copy = mlruns.parent / "copy"
        shutil.copytree(image_dirs.calibration, copy)
        extra, folders["--test-normal"] = extra[:2], copy
    argv = [*extra, *(str(part) for pair in folders.items() for part in pair),
            "--preset", "tiny", "--epochs", "1", "--target-fpr", "0.1", "--mlruns", str(mlruns)]
    if "--device" not in extra:
        argv += ["--device", "cpu"]
    assert load_script("end_to_end").main(argv) == 1
    assert said in capsys.readouterr().err
    assert [e.name for e in mlflow.MlflowClient().search_experiments()] == ["Default"]


def test_a_stop_before_training_in_the_train_pipeline_is_a_line(
        image_dirs: ImageDirs, mlruns: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, signal_handlers_restored: None) -> None:
    """Ctrl-C or SIGTERM while the script loads torch and mlflow, or reads its config, was
    a traceback (pipelines/train.py alone had no stop handling there)."""
    train = load_script("train")
    stop_during(monkeypatch, train, "load_preset")
    argv = [str(image_dirs.train), "--name", "stopped", "--preset", "tiny", "--mlruns",
            str(mlruns)]
    assert train.main(argv) == 143
    assert capsys.readouterr().err.strip().endswith(
        "interrupted (before it started an MLflow run); run the same command again")


def test_a_stopped_end_to_end_training_goes_on_with_resume(
        image_dirs: ImageDirs, mlruns: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop during the training says where --resume goes on from (run again without it,
    the pipeline deleted the checkpoint, and it had no --resume); with --resume the same
    training run finishes, then calibration and evaluation run. A stop after the training
    (in calibration) goes on with --resume from the registered model, training nothing."""
    from tests.test_cli_train import stop_training_at

    argv = often_checkpointed("e2e-stop", image_dirs, mlruns)
    end_to_end = load_script("end_to_end")
    with monkeypatch.context() as patch:
        stop_training_at(patch, 3, KeyboardInterrupt())
        assert end_to_end.main(argv) == 130
    said = capsys.readouterr().err
    assert "interrupted; the last checkpoint is " in said
    assert "run the same command with --resume to go on from it" in said
    client = mlflow.MlflowClient()
    [stopped] = client.search_runs([client.get_experiment_by_name("e2e-stop").experiment_id],
                                   filter_string="tags.command = 'train'")
    assert stopped.info.status == "KILLED"
    experiment = client.get_experiment_by_name("e2e-stop").experiment_id
    parents = len(client.search_runs([experiment], "tags.pipeline = 'end_to_end'"))
    # run again without --resume: refused before a new parent run, the checkpoint kept
    assert end_to_end.main(argv) == 1
    assert "the last training of 'e2e-stop' stopped before its end" in \
        capsys.readouterr().err
    assert len(client.search_runs([experiment], "tags.pipeline = 'end_to_end'")) == parents

    def stop(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # the training finishes, its calibration stops
        patch.setattr("anomaly_flow.evaluation.calibrate_model", stop)
        assert end_to_end.main([*argv, "--resume"]) == 130
    assert ("the training had finished: the same command with --resume calibrates and "
            "evaluates its model without training again") in capsys.readouterr().err
    [finished] = client.search_runs([experiment], filter_string="tags.command = 'train'")
    assert finished.info.run_id == stopped.info.run_id  # the same training, gone on
    assert finished.info.status == "FINISHED"
    # --resume again: no training left, so none runs; its model is calibrated, evaluated
    assert end_to_end.main([*argv, "--resume"]) == 0, capsys.readouterr().err
    [trained] = client.search_runs([experiment], filter_string="tags.command = 'train'")
    assert trained.info.run_id == stopped.info.run_id
    assert str(client.get_model_version_by_alias("e2e-stop", "candidate").version) == "1"
    champion = client.get_model_version_by_alias("e2e-stop", "champion")
    assert champion.tags["training_run_id"] == stopped.info.run_id
    [last] = client.search_runs([experiment], "tags.pipeline = 'end_to_end'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    assert last.info.status == "FINISHED"
    assert last.data.tags["train_resumed_finished"] == "models:/e2e-stop/1"


def test_a_real_ctrl_c_during_the_end_to_end_training_gives_one_instruction(
        image_dirs: ImageDirs, mlruns: Path) -> None:
    """A signal leaves its stop pending for the end of the stop handling, which raised it
    again after the pipeline had said where --resume goes on from: a second line then
    said "run the same command again", which would delete the checkpoint."""
    argv = often_checkpointed("e2e-sigint", image_dirs, mlruns)
    script = f"""
import os, signal, sys
from anomaly_flow.tracking import training
from tests.test_pipelines import load_script
log = training._MetricLogger.__call__
def stop_at_checkpoint(self, event):
    log(self, event)
    if event.kind == "checkpoint":
        os.kill(os.getpid(), signal.SIGINT)
training._MetricLogger.__call__ = stop_at_checkpoint
sys.exit(load_script("end_to_end").main({argv!r}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, timeout=300)
    assert done.returncode == 130, done.stderr
    assert "run the same command with --resume to go on from it" in done.stderr
    assert "run the same command again" not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("again", ["--resume", "--restart"])
def test_a_killed_end_to_end_run_is_ended_by_the_next_run_of_its_name(
        image_dirs: ImageDirs, mlruns: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture, again: str) -> None:
    """Killed outright (SIGKILL, the OOM killer) during its training, the pipeline left
    its parent run RUNNING as well as the training run. The next run of the name, under
    a new parent, marks the abandoned parent KILLED instead of leaving it running
    forever: ``--resume`` goes on with the same training run; ``--restart`` ends the
    abandoned training run KILLED too and trains a new one."""
    argv = often_checkpointed("e2e-killed", image_dirs, mlruns)
    end_to_end_killed(argv)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("e2e-killed").experiment_id
    [abandoned] = client.search_runs([experiment], "tags.pipeline = 'end_to_end'")
    [training_run] = client.search_runs([experiment], "tags.command = 'train'")
    assert abandoned.info.status == training_run.info.status == "RUNNING"

    with caplog.at_level(logging.WARNING, logger="anomaly_flow.tracking"):
        assert end_to_end_main([*argv, again]) == 0, capsys.readouterr().err
    parents = {run.info.run_id: run for run in
               client.search_runs([experiment], "tags.pipeline = 'end_to_end'")}
    assert len(parents) == 2
    assert parents[abandoned.info.run_id].info.status == "KILLED"
    # ended as the new parent run started: its process is gone (the training's own check,
    # for a run another host left, then finds it ended)
    assert parents[abandoned.info.run_id].data.tags["ended_by"] == \
        "a later run found its process gone (killed, or cut off from the store)"
    [new] = [run for key, run in parents.items() if key != abandoned.info.run_id]
    assert new.info.status == "FINISHED"
    trainings = {run.info.run_id: run.info.status
                 for run in client.search_runs([experiment], "tags.command = 'train'")}
    if again == "--resume":  # the same training, gone on
        assert trainings == {training_run.info.run_id: "FINISHED"}
    else:
        assert trainings.pop(training_run.info.run_id) == "KILLED"
        assert list(trainings.values()) == ["FINISHED"]
    assert f"the run {abandoned.info.run_id} (end-to-end) was left RUNNING by a process " \
        "that ended without closing it (killed, or cut off from the store); marked KILLED\n" \
        in caplog.text
    # the training run is said to be reopened by a resume, as --resume then does
    assert f"the run {training_run.info.run_id} (train-e2e-killed) was left RUNNING by a " \
        "process that ended without closing it (killed, or cut off from the store); marked " \
        "KILLED (a --resume of its training, from a checkpoint it wrote, reopens it)" \
        in caplog.text


def test_a_resumed_end_to_end_run_killed_again_is_ended_too(
        image_dirs: ImageDirs, mlruns: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Killed, resumed under a new parent and killed again: the training run keeps its
    first parent's tag (MLflow does not move a reopened run), so the parent to end is the
    one the run record names, the second; the next run of the name ends it."""
    argv = often_checkpointed("e2e-twice", image_dirs, mlruns)
    end_to_end_killed(argv)
    end_to_end_killed([*argv, "--resume"])
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("e2e-twice").experiment_id
    parents = client.search_runs([experiment], "tags.pipeline = 'end_to_end'",
                                 order_by=["attribute.start_time ASC"])
    assert [run.info.status for run in parents] == ["KILLED", "RUNNING"]
    second = parents[1].info.run_id

    assert end_to_end_main([*argv, "--resume"]) == 0, capsys.readouterr().err
    ended = client.get_run(second)
    assert ended.info.status == "KILLED"
    assert ended.data.tags["ended_by"] == \
        "a later run found its process gone (killed, or cut off from the store)"
    [training_run] = client.search_runs([experiment], "tags.command = 'train'")
    assert training_run.info.status == "FINISHED"


def often_checkpointed(name: str, image_dirs: ImageDirs, mlruns: Path) -> list[str]:
    """end_to_end's arguments for a model ``name`` trained with a checkpoint every step."""
    from tests.test_cli_train import often_config

    return ["--name", name, "--train", str(image_dirs.train), "--calibration",
            str(image_dirs.calibration), "--test-normal", str(image_dirs.test_normal),
            "--test-anomalous", str(image_dirs.test_anomalous), "--config",
            str(often_config(mlruns.parent)), "--target-fpr", "0.1", "--device", "cpu",
            "--mlruns", str(mlruns)]


def end_to_end_killed(argv: list[str]) -> None:
    """Run the end-to-end pipeline in a process killed outright (SIGKILL) at its
    training's first checkpoint."""
    killed = f"""
import os, signal
from anomaly_flow.tracking import training
from tests.test_pipelines import load_script
def die(self, event):
    if event.kind == "checkpoint":
        os.kill(os.getpid(), signal.SIGKILL)
training._MetricLogger.__call__ = die
load_script("end_to_end").main({argv!r})
"""
    run_killed(killed)


def end_to_end_main(argv: list[str]) -> int:
    return load_script("end_to_end").main(argv)
