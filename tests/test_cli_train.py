"""Tests for ``anomaly-flow train`` through click's CliRunner, with real files and stores,
for the thin script ``pipelines/train.py``, and for the shared pieces in
``anomaly_flow.cli.common``."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import click
import mlflow
import mlflow.pyfunc
import pytest
from click.testing import CliRunner, Result

from anomaly_flow import tracking
from anomaly_flow.cli import main
from anomaly_flow.cli.common import model_option, user_errors
from anomaly_flow.config import load_config, load_preset
from anomaly_flow.data import split_train_val, write_image_folder
from anomaly_flow.fashion_mnist import SampleData
from anomaly_flow.tracking.models import check_not_foreign
from tests.conftest import (
    ImageDirs,
    corrupt_png,
    new_store,
    run_killed,
    stop_during,
    tiny_config,
    torchrun,
)
from tests.test_pipelines import load_script


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, ["train", *args])


def assert_one_line_error(result: Result, code: int, *fragments: str) -> None:
    """A usage (2) or user (1) error: no traceback, and the message is one line."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    if code == 2:  # a usage error is that one line, no usage synopsis, and says where help is
        assert result.stderr.splitlines() == errors, result.stderr
        assert errors[0].endswith(" train --help')"), errors[0]  # 'main' under CliRunner


def test_help_shows_an_example() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert "anomaly-flow train images/good --name bottle-caps --preset tiny" in result.output
    for option in ("--name", "--preset", "--config", "--epochs", "--device", "--resume",
                   "--mlruns"):
        assert option in result.output


@pytest.mark.parametrize("module", ["anomaly_flow", "anomaly_flow.cli"])
def test_python_dash_m_runs_the_command_line(module: str, tmp_path: Path) -> None:
    """``python -m anomaly_flow`` and ``python -m anomaly_flow.cli`` are the command too
    (where the console script is not on PATH)."""
    done = subprocess.run([sys.executable, "-m", module, "train", "--help"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "anomaly-flow train images/good --name bottle-caps" in done.stdout


def test_the_version_is_the_installed_distributions() -> None:
    """``anomaly_flow.__version__``, ``anomaly-flow --version`` and the runs' tag read the
    same number: the installed distribution's."""
    from importlib import metadata

    import anomaly_flow
    from anomaly_flow.tracking import runs

    installed = metadata.version("anomaly-flow")
    assert anomaly_flow.__version__ == installed
    result = CliRunner().invoke(main, ["--version"], prog_name="anomaly-flow")
    assert result.exit_code == 0 and result.output == f"anomaly-flow, version {installed}\n"
    assert runs.environment_tags()["anomaly_flow_version"] == installed


def test_help_does_not_look_the_version_up(tmp_path: Path) -> None:
    """``anomaly_flow.__version__`` is looked up on first use: at the package's import,
    importlib.metadata and its search of the installed distributions cost every command,
    ``--help`` too, a fifth of its start-up."""
    probe = (
        "import runpy, sys\n"
        "before = 'importlib.metadata' in sys.modules\n"
        "sys.argv = ['anomaly-flow', '--help']\n"
        "try:\n"
        "    runpy.run_module('anomaly_flow', run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    import anomaly_flow\n"
        "    looked_up = '__version__' in vars(anomaly_flow)\n"
        "    loaded = not before and 'importlib.metadata' in sys.modules\n"
        "    print(f'exit {stop.code} looked up {looked_up} loaded {loaded}')\n"
        "    print(anomaly_flow.__version__)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    lines = done.stdout.splitlines()
    assert "exit 0 looked up False loaded False" in lines, done.stdout + done.stderr
    assert lines[-1] not in ("", "None")  # and still there when asked for


@pytest.mark.parametrize(("args", "code", "fragments"), [
    (["/no/such/folder", "--name", "x", "--mlruns", "{store}"], 2,
     ["Invalid value for 'DATA': image folder not found: /no/such/folder; check the path"]),
    (["{single}/only.png", "--name", "x", "--mlruns", "{store}"], 2,
     ["{single}/only.png is not a folder; pass the folder of images"]),
    (["{data}", "--name", "x", "--preset", "huge"], 2, ["--preset", "'huge'"]),
    (["{data}", "--name", "x", "--epochs", "0"], 2, ["--epochs", "0"]),
    (["{data}", "--name", "x", "--bogus"], 2, ["No such option '--bogus'"]),
    (["{data}"], 2, ["Missing option '--name'"]),
    (["{data}", "--name", "x", "--preset", "tiny", "--config", "c.toml"], 2,
     ["--preset or --config, not both"]),
    (["{data}", "--name", "x", "--config", "/no/such.toml"], 1,
     ["config file /no/such.toml does not exist"]),
    (["{data}", "--name", "x", "--config", "{data}"], 2, ["'{data}' is a directory"]),
    (["{empty}", "--name", "x", "--mlruns", "{store}"], 1, ["no image files found"]),
    (["{single}", "--name", "x", "--mlruns", "{store}"], 1,
     ["{single} holds a single image ({single}/only.png)", "Add more normal images"]),
    (["{broken}", "--name", "x", "--mlruns", "{store}"], 1,
     ["{broken} holds a single image file, {broken}/only.png, and it cannot be read as an "
      "image (cannot identify image file", "Add more normal images"]),
    (["{data}", "--name", "x", "--resume", "--mlruns", "{store}", "--preset", "tiny"], 1,
     ["--resume found no earlier training", "nothing of this name was trained in this "
      "store; train without --resume to start (or pass the --mlruns DIR used before)"]),
    (["{data}", "--name", "a/b", "--mlruns", "{store}", "--preset", "tiny"], 1,
     ["model name 'a/b' is invalid", "without spaces, '/', ':', '?' or '@'"]),
    (["{data}", "--name", "a b", "--mlruns", "{store}", "--preset", "tiny"], 1,
     ["model name 'a b' is invalid", "models:/NAME@candidate could not name it"]),
    (["{data}", "--name", "a@b", "--mlruns", "{store}", "--preset", "tiny"], 1,
     ["model name 'a@b' is invalid"]),
    (["{data}", "--name", "a?b", "--mlruns", "{store}", "--preset", "tiny"], 1,
     ["model name 'a?b' is invalid"]),  # models:/a?b@candidate would parse as model id 'a'
    (["{data}", "--name", "a" * 300, "--mlruns", "{store}", "--preset", "tiny"], 1,
     ["model name 'aaaaaaaaaa", "...' is invalid; use 1 to 200 characters"]),
    (["{data}", "--name", "..", "--mlruns", "{store}", "--preset", "tiny"], 1,
     ["model name '..' is invalid", "not starting with '.'", "MLflow refuses '.' and '..'"]),
    (["{data}", "--name", "x", "--mlruns", "{blocked}", "--preset", "tiny"], 1,
     ["{blocked}/checkpoints/x is a file, where the checkpoints of 'x' go; move it away"]),
    (["{data}", "--name", "x", "--mlruns", "{store}", "--config", "{no_val}"], 1,
     ["train.val_fraction is 0", "set train.val_fraction > 0"]),
    (["{data}", "--name", "x", "--resume", "--mlruns", "{unrecorded}", "--preset", "tiny"], 1,
     ["--resume found no earlier training in {unrecorded}/checkpoints/x; train with "
      "--restart instead to start afresh"]),  # a checkpoint folder without its record
])
def test_bad_input_gives_a_one_line_error(
        tmp_path: Path, image_dirs: ImageDirs, args: list[str], code: int,
        fragments: list[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "single").mkdir()
    shutil.copy(image_dirs.files(image_dirs.train)[0], tmp_path / "single" / "only.png")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "only.png").write_text("not an image")
    no_val = tmp_path / "no_val.toml"
    no_val.write_text('[model]\nimage_size = 16\nlevels = 2\nsteps_per_level = 2\n'
                      'hidden_channels = 16\n[train]\nval_fraction = 0.0\n')
    (tmp_path / "blocked" / "checkpoints").mkdir(parents=True)
    (tmp_path / "blocked" / "checkpoints" / "x").write_text("not a folder")
    (tmp_path / "unrecorded" / "checkpoints" / "x" / "step-00000002").mkdir(parents=True)
    values = {"data": str(image_dirs.train), "empty": str(tmp_path / "empty"),
              "single": str(tmp_path / "single"), "store": str(tmp_path / "store"),
              "no_val": str(no_val), "blocked": str(tmp_path / "blocked"),
              "broken": str(tmp_path / "broken"), "unrecorded": str(tmp_path / "unrecorded")}
    result = invoke(*(arg.format(**values) for arg in args))
    assert_one_line_error(result, code, *(f.format(**values) for f in fragments))
    assert not (tmp_path / "store" / "mlflow.db").exists()  # refused before any store


def test_an_image_size_too_large_for_memory_is_refused_before_the_store(
        tmp_path: Path, image_dirs: ImageDirs, monkeypatch: pytest.MonkeyPatch) -> None:
    """image_size = 100000 was the OOM killer: no message, the MLflow run left RUNNING."""
    from anomaly_flow.glow import Glow

    def no_model(*args: object) -> None:  # should the refusal go, fail here, not in the
        raise AssertionError("a model of image_size 100000 was built")  # OOM killer

    monkeypatch.setattr(Glow, "__init__", no_model)
    config = tmp_path / "huge.toml"
    config.write_text("[model]\nimage_size = 100000\nlevels = 2\n")
    result = invoke(str(image_dirs.train), "--name", "x", "--config", str(config),
                    "--mlruns", str(tmp_path / "store"))
    assert_one_line_error(result, 1, "image_size = 100000 is invalid: must be at most 1024 "
                          "for training: the memory a flow's activations take in training "
                          "grows with image_size²", "use a smaller image_size")
    assert not (tmp_path / "store" / "mlflow.db").exists()


def test_a_second_training_of_a_name_waits_its_turn(image_dirs: ImageDirs, mlruns: Path) -> None:
    """Another terminal, or a scheduler's retry, would delete the running training's
    checkpoints: while one holds the name's lock, the other is refused."""
    import fcntl

    (mlruns / "checkpoints").mkdir(parents=True)
    lock = mlruns / "checkpoints" / ".busy.lock"
    with open(lock, "w") as held:
        held.write("pid 4242 on trainer-7\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = invoke(str(image_dirs.train), "--name", "busy", "--preset", "tiny",
                        "--mlruns", str(mlruns))
        assert_one_line_error(result, 1, "another training of 'busy' is running (pid 4242 on "
                              f"trainer-7, holding {lock}); wait for it to end, or train under "
                              "another --name")
    assert not (mlruns / "checkpoints" / "busy").exists()


def test_a_file_system_without_locks_trains_with_a_warning(
        image_dirs: ImageDirs, mlruns: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """NFS without lockd, FUSE stores: flock fails with ENOLCK, and training goes on."""
    import errno
    import fcntl

    def no_locks(*args: object) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.tracking.training"):
        result = invoke(str(image_dirs.train), "--name", "nolock", "--config",
                        str(often_config(mlruns.parent, epochs=1)), "--mlruns", str(mlruns))
    assert result.exit_code == 0, result.output
    assert "(No locks available), so nothing stops a second training of 'nolock'" \
        in caplog.text


def test_a_config_without_a_model_table_says_which_model_it_gets(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from anomaly_flow.config import load_config

    config = tmp_path / "train-only.toml"
    config.write_text("[train]\nepochs = 1\n")
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.config"):
        assert load_config(config).train.epochs == 1
    assert f"{config} has no [model] table, so the model is the default one: 32×32 grey, " \
        "L=3, K=32, 512 channels, slow to train on a CPU" in caplog.text
    caplog.clear()
    # a partial [model] table, and no [train] one: each sizing default that fills in is named
    config.write_text("[model]\nimage_size = 16\nlevels = 2\n")
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.config"):
        load_config(config)
    assert caplog.messages == [
        f"{config} does not set model.in_channels = 1, model.steps_per_level = 32, "
        "model.hidden_channels = 512, train.epochs = 10, train.batch_size = 64, "
        "train.lr = 0.001, so these defaults are used; set them to choose (each preset in "
        "anomaly_flow/presets/ sets them all)"]
    caplog.clear()
    for preset in sorted((Path(__file__).parents[1] / "anomaly_flow" / "presets").glob("*.toml")):
        load_config(preset)  # a preset sets them all: nothing to say
    assert caplog.messages == []
    # a folder given as the file (pipelines/train.py --config DIR): said so, not "missing"
    from anomaly_flow.config import ConfigError

    with pytest.raises(ConfigError, match=rf"^config file {re.escape(str(tmp_path))} is a "
                                          r"folder; pass a \.toml or \.json file\.$"):
        load_config(tmp_path)


def test_a_config_past_what_python_reads_gets_one_line_not_a_traceback(tmp_path: Path) -> None:
    """A whole number past any float in a decimal field ended in OverflowError, and
    arrays nested thousands deep in RecursionError; 1e400 was already refused by name."""
    from anomaly_flow.config import ConfigError, load_config

    huge = tmp_path / "huge.toml"
    huge.write_text("[train]\ngrad_clip = 1" + "0" * 400 + "\n")
    with pytest.raises(ConfigError, match=r"^grad_clip = inf in \[train\] is invalid: must be "
                                          r"a finite number >= 0"):
        load_config(huge)
    as_json = tmp_path / "huge.json"
    as_json.write_text('{"train": {"lr": 1' + "0" * 400 + "}}")
    with pytest.raises(ConfigError, match=r"^lr = inf in \[train\] is invalid: must be a "
                                          "positive finite number"):
        load_config(as_json)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match=rf"^cannot parse {re.escape(str(deep))}: its values "
                                          "are nested too deeply for a config; copy a preset"):
        load_config(deep)


def test_a_config_that_does_not_parse_says_the_format_it_was_read_as(tmp_path: Path) -> None:
    """A YAML file given as --config was refused in TOML's words only ("Expected '=' after
    a key"), which does not tell a user that configs are TOML."""
    from anomaly_flow.config import ConfigError, load_config

    yaml = tmp_path / "glow.yaml"
    yaml.write_text("model:\n  levels: 2\n")
    with pytest.raises(ConfigError, match=rf"^cannot parse {re.escape(str(yaml))} as TOML: "
                                          r"Expected '=' .*; a config file is TOML \(or JSON, "
                                          r"named \.json\), not YAML: copy a preset from "
                                          r"anomaly_flow/presets/ and edit it$"):
        load_config(yaml)
    bare = tmp_path / "glow"
    bare.write_text("model:\n  levels: 2\n")
    with pytest.raises(ConfigError, match=r"as TOML: .*named \.json\): copy a preset"):
        load_config(bare)
    broken = tmp_path / "glow.toml"  # a TOML file with a slip: only the parser's words
    broken.write_text("[model]\nlevels = \n")
    with pytest.raises(ConfigError, match=r"as TOML: Invalid value \(at line 2, column 10\)$"):
        load_config(broken)
    upper = tmp_path / "GLOW.JSON"  # read as JSON whatever the suffix's case
    upper.write_text('{"model": {"levels": 2}')
    with pytest.raises(ConfigError, match=r"as JSON: Expecting ',' delimiter"):
        load_config(upper)
    upper.write_text('{"model": {"levels": 2}}')
    assert load_config(upper).model.levels == 2
    # a key given twice: refused, as TOML does, not the last value taken without a word
    upper.write_text('{"model": {"levels": 2, "levels": 3}}')
    with pytest.raises(ConfigError, match=r"GLOW\.JSON gives 'levels' twice in one object, "
                                          r"and only one value can hold; keep the one you"):
        load_config(upper)


def test_a_config_with_an_unknown_field_is_a_one_line_error(
        tmp_path: Path, image_dirs: ImageDirs) -> None:
    config = tmp_path / "glow.toml"
    config.write_text("[model]\nlevles = 2\n")
    result = invoke(str(image_dirs.train), "--name", "x", "--config", str(config))
    assert_one_line_error(result, 1, "unknown field(s) ['levles'] in [model]")


@pytest.mark.parametrize(("name", "text", "fragment"), [
    ("glow.toml", '[model]\nlevels = "x"\n', "levels = 'x' in [model] is invalid"),
    ("glow.toml", "[model]\nlevels = 1.5\n", "levels = 1.5 in [model] is invalid"),
    ("glow.toml", "[train]\nepochs = true\n", "epochs = true in [train] is invalid"),
    ("glow.toml", "[train]\nlr = -1.0\n", "lr = -1.0 in [train] is invalid: must be a positive"),
    ("glow.toml", "[train]\nbf16 = 1\n", "bf16 = 1 in [train] is invalid"),
    ("glow.toml", "[train]\nepochs = 1979-05-27\n",
     "epochs = 1979-05-27 in [train] is invalid: must be a whole number"),
    ("glow.toml", "model = 3\n", "[model] must be a table"),
    ("glow.json", "5", "a configuration must be a table"),
    ("glow.toml", "", "glow.toml is empty; give at least a [model] or [train] table"),
    ("glow.toml", b"\xff\xfe[model]", "glow.toml is not UTF-8 text; save it as UTF-8"),
])
def test_a_config_with_a_value_of_the_wrong_type_is_a_one_line_error(
        tmp_path: Path, image_dirs: ImageDirs, name: str, text: str | bytes,
        fragment: str) -> None:
    config = tmp_path / name
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    result = invoke(str(image_dirs.train), "--name", "x", "--config", str(config))
    assert_one_line_error(result, 1, fragment)


def test_a_folder_of_only_corrupt_files_names_one_of_them(
        tmp_path: Path, mlflow_db_template: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        corrupt_png(tmp_path / "data" / name)
    store = new_store(tmp_path / "mlruns", mlflow_db_template)
    result = invoke(str(tmp_path / "data"), "--name", "x", "--preset", "tiny", "--epochs", "1",
                    "--mlruns", str(store))
    assert_one_line_error(result, 1, "none of the 2 image(s) of the training split (the "
                          "validation split is held apart) could be decoded (e.g. ",
                          ".png: cannot identify")


def test_mlflow_chatter_stays_off_the_terminal_on_a_fresh_store(
        tmp_path: Path, sample: SampleData, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    monkeypatch.setattr(logging.getLogger("mlflow"), "level", logging.INFO)  # as at import
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    write_image_folder(sample.train[:12], tmp_path / "data", "img-")
    result = invoke(str(tmp_path / "data"), "--name", "quiet", "--preset", "tiny",
                    "--epochs", "1", "--mlruns", str(tmp_path / "fresh"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fresh" / "mlflow.db").exists()  # the tables were created just now
    for chatter in ("INFO mlflow", "Creating initial MLflow database tables",
                    "Successfully registered model", "Created version"):
        assert chatter not in result.stderr, result.stderr
    assert "registered models:/quiet/1 with alias candidate" in result.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available")
def test_asking_for_cuda_without_it_is_a_one_line_error(
        image_dirs: ImageDirs, mlruns: Path) -> None:
    result = invoke(str(image_dirs.train), "--name", "x", "--preset", "tiny", "--device",
                    "cuda", "--mlruns", str(mlruns))
    assert_one_line_error(result, 1, "CUDA is not available")
    # refused before the store or the checkpoints are touched
    assert mlflow.MlflowClient().get_experiment_by_name("x") is None
    assert not (mlruns / "checkpoints" / "x").exists()


def test_train_prints_the_run_and_model_then_resumes_into_the_same_run(
        image_dirs: ImageDirs, mlruns: Path) -> None:
    common = [str(image_dirs.train), "--name", "cli-parts", "--preset", "tiny",
              "--batch-size", "24", "--mlruns", str(mlruns)]
    first = invoke(*common, "--epochs", "1")
    assert first.exit_code == 0, first.output
    lines = dict(line.split(": ", 1) for line in first.stdout.splitlines())
    assert lines["model_uri"] == "models:/cli-parts/1"
    assert lines["candidate"] == "models:/cli-parts@candidate"
    run_id = lines["run_id"]
    client = mlflow.MlflowClient()
    assert client.get_run(run_id).data.params["train.batch_size"] == "24"
    steps_before = client.get_metric_history(run_id, "train_bpd")

    again = invoke(*common, "--epochs", "2", "--resume")
    assert again.exit_code == 0, again.output
    lines = dict(line.split(": ", 1) for line in again.stdout.splitlines())
    assert lines["run_id"] == run_id  # the same MLflow run goes on
    assert lines["model_uri"] == "models:/cli-parts/2"
    run = client.get_run(run_id)
    assert run.data.tags["resumed.train.epochs"] == "2"
    steps = [m.step for m in client.get_metric_history(run_id, "train_bpd")]
    assert max(steps) == 2 * max(m.step for m in steps_before)
    assert str(client.get_model_version_by_alias("cli-parts", "candidate").version) == "2"
    # the run logged and registered two models: its runs:/ URI names the latest, version 2
    from_run = tracking.load_model(f"runs:/{run_id}/model")
    assert (from_run.name, from_run.version) == ("cli-parts", "2")

    # finished: resuming again has nothing to do, and registers nothing
    done = invoke(*common, "--epochs", "2", "--resume")
    assert_one_line_error(done, 1, "the training of 'cli-parts' already finished", "of 4 steps",
                          "resume with a larger --epochs")
    tiny = load_preset("tiny")
    wider = mlruns.parent / "wider.json"
    wider.write_text(json.dumps(tiny.replace(epochs=3).to_dict() | {"model": {
        **tiny.model.to_dict(), "hidden_channels": 2 * tiny.model.hidden_channels}}))
    other_model = invoke(str(image_dirs.train), "--name", "cli-parts", "--config", str(wider),
                         "--batch-size", "24", "--mlruns", str(mlruns), "--resume")
    assert_one_line_error(other_model, 1, "the model configuration differs from the "
                          f"checkpoint's (model.hidden_channels is "
                          f"{2 * tiny.model.hidden_channels} but was "
                          f"{tiny.model.hidden_channels}); resume with the same preset")
    # refused before the folder is read: nothing said of its images (28x28 at size 16)
    assert other_model.stderr.splitlines()[0].startswith("Error:"), other_model.stderr
    adamax = mlruns.parent / "adamax.json"
    adamax.write_text(json.dumps(tiny.replace(epochs=3, optimizer="adamax").to_dict()))
    other_optimizer = invoke(str(image_dirs.train), "--name", "cli-parts", "--config",
                             str(adamax), "--batch-size", "24", "--mlruns", str(mlruns),
                             "--resume")
    assert_one_line_error(other_optimizer, 1, "cannot resume: train.optimizer is 'adamax' but "
                          "was 'adam' in the checkpoint's run")
    fewer = invoke(*common, "--epochs", "1", "--resume")  # 4 steps done, 2 asked for
    assert_one_line_error(fewer, 1, "the checkpoint of 'cli-parts' is at step 4, past the 2 "
                          "steps of the 1 epoch(s) asked for; to go on, resume with --epochs 3 "
                          "or more; to start again, train without --resume")  # it finished
    # another folder: named, with the checkpoint's, not taken for the same one changed
    other_folder = invoke(str(image_dirs.calibration), *common[1:], "--epochs", "3", "--resume")
    assert_one_line_error(other_folder, 1, "the checkpoint's training ran on the images of "
                          f"{image_dirs.train.resolve()}, and {image_dirs.calibration.resolve()} "
                          "holds other images, so the train/validation split would change; "
                          f"resume with {image_dirs.train.resolve()}, or train afresh with "
                          "--restart")
    # a name that maps to the same checkpoint folder does not take it over or delete it
    other = [str(image_dirs.train), "--name", "cli-parts!", "--preset", "tiny",
             "--mlruns", str(mlruns), "--epochs", "1"]
    for extra in ([], ["--resume"]):
        clash = invoke(*other, *extra)
        assert_one_line_error(clash, 1, "holds the training of model 'cli-parts', whose name "
                              "maps to the same folder as 'cli-parts!'")
    assert (mlruns / "checkpoints" / "cli-parts" / "latest").is_file()
    assert str(client.get_model_version_by_alias("cli-parts", "candidate").version) == "2"


def test_a_damaged_training_record_is_a_one_line_error_and_a_fresh_training_clears_it(
        image_dirs: ImageDirs, mlruns: Path) -> None:
    """run.json that is valid JSON but no record (a list, an object without the config)
    or not UTF-8 text: --resume ended in an AttributeError, KeyError or
    UnicodeDecodeError traceback, and a fresh training too for two of them."""
    record = mlruns / "checkpoints" / "rec" / "run.json"
    record.parent.mkdir(parents=True)
    common = [str(image_dirs.train), "--name", "rec", "--preset", "tiny", "--epochs", "1",
              "--mlruns", str(mlruns)]
    for damaged, said in ((b"[]", "a JSON object was expected, got list"),
                          (b"{}", "no 'config'"), (b"\xff", "not UTF-8 text")):
        record.write_bytes(damaged)
        result = invoke(*common, "--resume")
        assert_one_line_error(result, 1, f"{record} is damaged ({said}", "train with "
                              "--restart instead of --resume (a fresh training clears it)")
    record.write_bytes(b"[]")
    fresh = invoke(*common)
    assert fresh.exit_code == 0, fresh.output
    assert json.loads(record.read_text())["concluded"] is True


def test_a_validation_split_that_cannot_be_decoded_exits_1_before_training(
        tmp_path: Path, sample: SampleData, mlruns: Path) -> None:
    """It trained every epoch, then refused to register the model (validation bits/dim
    NaN), and called the validation file a training file."""
    config = tiny_config(epochs=1)
    _, val_idx = split_train_val(10, config.train.val_fraction, config.train.seed)
    paths = write_image_folder(sample.train[:10], tmp_path / "data", "img-")
    paths[int(val_idx[0])].write_bytes(b"")  # the only validation image cannot be decoded
    result = invoke(str(tmp_path / "data"), "--name", "nan-parts", "--preset", "tiny",
                    "--epochs", "30", "--mlruns", str(mlruns))
    assert_one_line_error(result, 1, "none of the 1 image(s) of the validation split",
                          f"{paths[int(val_idx[0])].name}: empty file (0 bytes)",
                          "replace or remove the undecodable files")
    assert "epoch 1 of" not in result.stderr and "training file" not in result.stderr
    assert f"{paths[int(val_idx[0])].name} (validation split): empty file" in result.stderr
    assert mlflow.MlflowClient().search_registered_models() == []


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the curves drew a stored inf
def test_a_diverged_training_is_not_registered(image_dirs: ImageDirs, mlruns: Path) -> None:
    config = mlruns.parent / "hot.toml"
    config.write_text('[model]\nimage_size = 16\nlevels = 2\nsteps_per_level = 2\n'
                      'hidden_channels = 16\n[train]\nepochs = 3\nbatch_size = 8\n'
                      'lr = 1.0\nwarmup_steps = 1\n')
    result = invoke(str(image_dirs.train), "--name", "hot", "--config", str(config),
                    "--mlruns", str(mlruns))
    assert_one_line_error(result, 1, "model not registered:", "steps were skipped for a "
                          "non-finite loss or gradient: training diverged; lower lr")
    client = mlflow.MlflowClient()
    assert client.search_registered_models() == []
    [run] = client.search_runs([client.get_experiment_by_name("hot").experiment_id])
    assert run.info.status == "FAILED"  # its logs kept, its status the command's
    assert run.data.tags["registered_version"] == "none"


def test_a_model_that_cannot_draw_samples_is_not_registered_and_says_why(
        image_dirs: ImageDirs, mlruns: Path) -> None:
    """lr = 1e6: the first step drives a 1x1 convolution singular, the second is skipped.
    The sample grid ended the command in a LinAlgError traceback; now it is skipped with
    a warning and a tag, and the model is logged but not registered, with the reason."""
    preset = (Path(__file__).parents[1] / "anomaly_flow" / "presets" / "tiny.toml").read_text()
    config = mlruns.parent / "lr-huge.toml"
    config.write_text(preset.replace("lr = 2e-3", "lr = 1e6"))
    result = invoke(str(image_dirs.train), "--name", "lrh", "--config", str(config),
                    "--epochs", "1", "--mlruns", str(mlruns))
    assert_one_line_error(result, 1, "model not registered: validation bits/dim is nan (not "
                          "finite) on the 5 validation image(s) that could be decoded: the "
                          "model diverged; lower lr or raise warmup_steps")
    assert "WARNING anomaly_flow.train: no sample grid: the model cannot draw samples: a 1x1 " \
        "convolution of level 2 has a singular weight" in result.stderr
    assert result.stdout.startswith("run_id: ")
    assert "model_uri" not in result.stdout  # nothing registered for a script to pick up
    assert "; the model is logged for inspection as models:/m-" in result.stderr
    client = mlflow.MlflowClient()
    assert client.search_registered_models() == []
    run = client.get_run(result.stdout.split()[1])
    assert run.info.status == "FAILED"  # as the command: no model came of it
    assert run.data.tags["registered_version"] == "none"
    assert run.data.tags["samples_skipped"].startswith("the model cannot draw samples")
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "training_curves.png" in files and "samples.png" not in files


def test_running_out_of_memory_is_a_one_line_error(
        image_dirs: ImageDirs, mlruns: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from anomaly_flow.glow import Glow
    from tests.test_train import CPU_OOM

    def forward(self: Glow, x: object) -> None:
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(Glow, "forward", forward)
    result = invoke(str(image_dirs.train), "--name", "oom", "--preset", "tiny", "--epochs",
                    "1", "--mlruns", str(mlruns))
    assert_one_line_error(result, 1, "training ran out of memory on cpu (an allocation of "
                          "2.25 GiB failed) with batch_size = 32, init_batch_size = 256, "
                          "image_size = 16 and hidden_channels = 32; lower train.batch_size "
                          "(--batch-size)")
    runs = mlflow.search_runs(experiment_names=["oom"], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]


OFTEN = ('[model]\nimage_size = 16\nlevels = 2\nsteps_per_level = 2\nhidden_channels = 16\n'
         '[train]\nepochs = {epochs}\nbatch_size = 24\ncheckpoint_every = 2\n')
"""A small model that checkpoints every 2 steps (epochs of 2 steps on image_dirs.train)."""


def often_config(folder: Path, epochs: int = 3, extra: str = "") -> Path:
    path = folder / f"often-{epochs}.toml"
    path.write_text(OFTEN.format(epochs=epochs) + extra)
    return path


def stop_training_at(monkeypatch: pytest.MonkeyPatch, step: int, error: BaseException) -> None:
    """Make the CLI's training raise ``error`` once ``step`` is done (epoch 2 at step 3,
    after epoch 1's checkpoint): Ctrl-C, or a store failing mid-run."""
    from anomaly_flow import tracking as tracking_module
    from anomaly_flow import train as train_module

    real_train = train_module.train

    def stopped(*args: object, callback: object = None, **kwargs: object) -> object:
        def stop(event: object) -> None:
            callback(event)  # type: ignore[operator]
            if event.kind == "step" and event.step == step:  # type: ignore[attr-defined]
                raise error
        return real_train(*args, callback=stop, **kwargs)

    monkeypatch.setattr(tracking_module.training, "train", stopped)


def test_ctrl_c_says_where_training_can_resume_from(
        image_dirs: ImageDirs, mlruns: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from anomaly_flow import tracking as tracking_module
    from anomaly_flow import train as train_module

    real_train = train_module.train
    config = often_config(mlruns.parent)
    common = [str(image_dirs.train), "--name", "ctrl-c", "--config", str(config),
              "--mlruns", str(mlruns)]
    stop_training_at(monkeypatch, 3, KeyboardInterrupt())
    result = invoke(*common)
    assert result.exit_code == 130, result.output
    assert f"interrupted; the last checkpoint is {mlruns / 'checkpoints' / 'ctrl-c'}" \
        "/step-" in result.stderr
    assert "(one every 2 steps, train.checkpoint_every); run the same command with --resume " \
        "to go on from it" in result.stderr
    monkeypatch.setattr(tracking_module.training, "train", real_train)
    # the same command without --resume would delete the checkpoint: refused, unless
    # --restart says so (both at once contradict)
    latest = tracking.checkpoint_dir("ctrl-c", mlruns) / "step-00000002"
    forgot = invoke(*common)
    assert_one_line_error(forgot, 1, "the last training of 'ctrl-c' stopped before its end, "
                          f"and its checkpoint {latest} (step 2) can go on: pass --resume to "
                          "continue it, or --restart to delete it and start afresh")
    assert "resized to" not in forgot.stderr  # refused before the folder is read
    both = invoke(*common, "--resume", "--restart")
    assert_one_line_error(both, 1, "resume continues the last training and restart deletes "
                          "it: pass one of them (--resume or --restart), not both")
    assert latest.is_dir()
    resumed = invoke(*common, "--resume")
    assert resumed.exit_code == 0, resumed.output
    # step 3 ran before the interruption and again after the resume: logged once
    run_id = resumed.stdout.split("run_id: ")[1].split()[0]
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "train_bpd")]
    assert sorted(steps) == list(range(1, max(steps) + 1)), steps
    assert "resumed.steps_from_before" not in mlflow.get_run(run_id).data.tags  # the same run
    # stopped again: --restart starts afresh, in a new run
    stop_training_at(monkeypatch, 3, KeyboardInterrupt())
    assert invoke(*common).exit_code == 130
    monkeypatch.setattr(tracking_module.training, "train", real_train)
    restarted = invoke(*common, "--restart")
    assert restarted.exit_code == 0, restarted.output
    assert restarted.stdout.split("run_id: ")[1].split()[0] != run_id


def test_a_resume_with_another_learning_rate_says_whose_steps_the_run_keeps(
        image_dirs: ImageDirs, mlruns: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 3 ran at the first learning rate and is logged; its replay at the second is
    another step, which MLflow cannot replace: the run says which steps are the first's."""
    common = [str(image_dirs.train), "--name", "new-lr", "--mlruns", str(mlruns)]
    stop_training_at(monkeypatch, 3, KeyboardInterrupt())
    assert invoke(*common, "--config", str(often_config(mlruns.parent))).exit_code == 130
    monkeypatch.undo()
    (mlruns.parent / "slower").mkdir()
    slower = often_config(mlruns.parent / "slower", extra="lr = 0.0005\n")
    resumed = invoke(*common, "--config", str(slower), "--resume")
    assert resumed.exit_code == 0, resumed.output
    run_id = resumed.stdout.split("run_id: ")[1].split()[0]
    tags = mlflow.get_run(run_id).data.tags
    assert tags["resumed.train.lr"] == "0.0005"
    assert tags["resumed.steps_from_before"] == (
        "3-3: their per-step metrics are the interrupted attempt's, before lr changed; this "
        "attempt resumed from the checkpoint of step 2")


def test_the_pipeline_script_trains_and_registers(
        image_dirs: ImageDirs, tmp_path: Path, mlflow_db_template: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script("train")
    store = new_store(tmp_path / "store", mlflow_db_template)
    code = script.main([str(image_dirs.train), "--name", "script-parts", "--preset", "tiny",
                        "--epochs", "1", "--device", "cpu", "--mlruns", str(store)])
    assert code == 0
    assert "model_uri: models:/script-parts/1" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(tmp_path / "missing"), "--name", "x", "--mlruns", str(store)])
    assert exit_info.value.code == 2
    assert "argument data: image folder not found" in capsys.readouterr().err


@pytest.mark.parametrize(("value", "ok"), [
    ("models:/parts@champion", True), ("models:/parts/3", True),
    ("models:/m-0123abcd", True), ("runs:/0123abcd/model", True),
    ("models:/parts@", False), ("models:/parts/three", False), ("runs:/", False),
    ("/no/such/model/folder", False),
])
def test_model_option_checks_the_form_of_a_uri(value: str, ok: bool) -> None:
    @click.command()
    @model_option
    def show(model: str) -> None:
        click.echo(model)

    result = CliRunner().invoke(show, ["--model", value])
    assert result.exit_code == (0 if ok else 2), result.output
    if ok:
        assert result.stdout.strip() == value
    else:
        assert "Traceback" not in result.output and "Error: Invalid value" in result.stderr


def test_user_errors_become_one_line_click_errors() -> None:
    from anomaly_flow.tracking import ModelNotFoundError

    @click.command()
    @user_errors
    def fail() -> None:
        raise ModelNotFoundError("no model at x;\nuse models:/NAME@ALIAS")

    @click.command()
    @user_errors
    def bug() -> None:
        raise KeyError("a bug stays a bug")

    @click.command()
    @user_errors
    def server_gone() -> None:
        from mlflow.exceptions import MlflowException

        raise MlflowException("API request to http://127.0.0.1:5077/api/2.0/mlflow/runs/"
                              "log-batch failed with exception\nConnection refused")

    result = CliRunner().invoke(fail, [])
    assert result.exit_code == 1
    assert result.stderr == "Error: no model at x; use models:/NAME@ALIAS\n"
    assert isinstance(CliRunner().invoke(bug, []).exception, KeyError)
    gone = CliRunner().invoke(server_gone, [])
    assert gone.exit_code == 1 and "Traceback" not in gone.output
    assert gone.stderr == (
        "Error: MLflow failed: API request to http://127.0.0.1:5077/api/2.0/mlflow/runs/"
        "log-batch failed with exception Connection refused; check the tracking store "
        "(MLFLOW_TRACKING_URI, or --mlruns) and run the command again (the run it was "
        "logging may be incomplete)\n")


def test_a_fresh_training_clears_a_damaged_checkpoint_record(
        image_dirs: ImageDirs, mlruns: Path) -> None:
    record = mlruns / "checkpoints" / "damaged" / "run.json"
    record.parent.mkdir(parents=True)
    record.write_text("{not json")
    result = invoke(str(image_dirs.train), "--name", "damaged", "--preset", "tiny",
                    "--epochs", "1", "--mlruns", str(mlruns))
    assert result.exit_code == 0, result.output
    assert json.loads(record.read_text())["model_name"] == "damaged"


@pytest.mark.slow
def test_train_under_torchrun_logs_and_registers_once(image_dirs: ImageDirs,
                                                      tmp_path: Path) -> None:
    """The README's several-process command (2 CPU processes, gloo): one run, one version;
    only rank 0 prints the run and the model."""
    import subprocess

    store = tmp_path / "store"
    cmd, env = torchrun("-m", "anomaly_flow", "train", str(image_dirs.train), "--name",
                        "ddp-parts", "--preset", "tiny", "--epochs", "1", "--device", "cpu",
                        "--mlruns", str(store))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("run_id:") == 1 and proc.stdout.count("candidate:") == 1
    assert proc.stderr.count("are resized to 16×16") == 1, proc.stderr  # rank 0's alone
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}",
                                 registry_uri=f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ddp-parts")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [v.version for v in client.search_model_versions("name='ddp-parts'")] == [1]
    assert len(client.get_metric_history(runs[0].info.run_id, "train_bpd")) > 0


@pytest.mark.slow
def test_a_refusal_of_rank_0_under_torchrun_ends_every_rank(image_dirs: ImageDirs,
                                                           tmp_path: Path) -> None:
    """Rank 0 alone checks the store and the resume's record: its refusal reaches the
    other ranks, which leave with it instead of waiting in training's first collective
    until torchrun kills them (SIGKILL after its 30 s grace, a ChildFailedError naming
    the wrong rank)."""
    import subprocess

    cmd, env = torchrun("-m", "anomaly_flow", "train",
                        str(image_dirs.train), "--name", "ddp-refused", "--preset", "tiny",
                        "--device", "cpu", "--resume", "--mlruns", str(tmp_path / "store"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode != 0
    assert "Error: --resume found no earlier training" in proc.stderr, proc.stderr[-4000:]
    # rank 1 leaves with rank 0's word, which only another host's first process repeats
    said = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(said) == 1 and "rank 0 did not start the training" not in proc.stderr
    assert "SIGKILL" not in proc.stderr and "Signals.SIGKILL" not in proc.stderr


def test_resuming_against_another_store_than_the_run_was_logged_to_is_refused(
        image_dirs: ImageDirs, mlruns: Path, mlflow_db_template: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Forgetting the export of MLFLOW_TRACKING_URI must not split one training over two
    stores: the checkpoints live under --mlruns, the run where it was logged."""
    from anomaly_flow import tracking as tracking_module
    from anomaly_flow import train as train_module

    config = often_config(mlruns.parent)
    common = [str(image_dirs.train), "--name", "split", "--config", str(config),
              "--mlruns", str(mlruns)]
    server = new_store(mlruns.parent / "server", mlflow_db_template)
    server_uri = f"sqlite:///{server / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_uri)
    stop_training_at(monkeypatch, 3, KeyboardInterrupt())
    assert invoke(*common).exit_code == 130
    monkeypatch.setattr(tracking_module.training, "train", train_module.train)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    result = invoke(*common, "--resume")
    assert result.exit_code == 1, result.output
    assert f"Error: the training of 'split' was logged to {server_uri} (run " in result.stderr
    assert f"resume it where it was logged (MLFLOW_TRACKING_URI={server_uri}, or that " \
        "store's --mlruns), or start afresh here with --restart instead of --resume" \
        in result.stderr
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_uri)
    resumed = invoke(*common, "--resume")
    assert resumed.exit_code == 0, resumed.output


def test_a_store_failing_mid_training_says_to_resume_not_to_start_again(
        image_dirs: ImageDirs, mlruns: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run without --resume, "the same command" deletes the checkpoints."""
    from mlflow.exceptions import MlflowException

    config = often_config(mlruns.parent)
    stop_training_at(monkeypatch, 3, MlflowException(
        "API request to http://127.0.0.1:5077/api/2.0/mlflow/runs/log-batch failed: "
        "Connection refused"))
    result = invoke(str(image_dirs.train), "--name", "gone", "--config", str(config),
                    "--mlruns", str(mlruns))
    assert result.exit_code == 1, result.output
    assert "Error: MLflow failed: API request to http://127.0.0.1:5077" in result.stderr
    assert f"training stopped; the last checkpoint is {mlruns / 'checkpoints' / 'gone'}/step-" \
        in result.stderr
    assert "run the same command with --resume to go on from it (or with --restart to " \
        "delete it and start afresh)" in result.stderr
    assert "Traceback" not in result.stderr


def test_metrics_queued_when_the_store_fails_are_logged_by_the_resume(
        image_dirs: ImageDirs, mlruns: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store goes away at step 3, while the run's buffer holds metrics no flush has
    sent (the timer is set beyond the test): training stops before its next checkpoint,
    and the resumed run ends with every step's and every epoch's metrics, once each."""
    from mlflow.exceptions import MlflowException

    from anomaly_flow import tracking as tracking_module
    from anomaly_flow import train as train_module
    from anomaly_flow.tracking import runs as runs_module

    real_train, real_log_batch = train_module.train, mlflow.MlflowClient.log_batch
    gone = {"now": False}

    def dying(*args: object, callback: object = None, **kwargs: object) -> object:
        def watch(event: object) -> None:
            gone["now"] = gone["now"] or event.step == 3  # type: ignore[attr-defined]
            callback(event)  # type: ignore[operator]
        return real_train(*args, callback=watch, **kwargs)

    def log_batch(self: mlflow.MlflowClient, *args: object, **kwargs: object) -> None:
        if gone["now"]:
            raise MlflowException("API request to http://127.0.0.1:5077/api/2.0/mlflow/"
                                  "runs/log-batch failed: Connection refused")
        real_log_batch(self, *args, **kwargs)

    monkeypatch.setattr(runs_module.Run.__init__, "__defaults__", (3600.0,))
    monkeypatch.setattr(tracking_module.training, "train", dying)
    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", log_batch)
    common = [str(image_dirs.train), "--name", "queued", "--config",
              str(often_config(mlruns.parent)), "--mlruns", str(mlruns)]
    failed = invoke(*common)
    assert failed.exit_code == 1, failed.output
    assert f"the last checkpoint is {mlruns / 'checkpoints' / 'queued'}/step-00000002 " \
        in failed.stderr, failed.stderr  # not step 4: the flush before it failed
    monkeypatch.setattr(tracking_module.training, "train", real_train)
    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", real_log_batch)
    resumed = invoke(*common, "--resume")
    assert resumed.exit_code == 0, resumed.output
    client = mlflow.MlflowClient()
    run_id = dict(line.split(": ", 1) for line in resumed.stdout.splitlines())["run_id"]
    for key, steps in [("train_bpd", [1, 2, 3, 4, 5, 6]), ("val_bpd", [2, 4, 6])]:
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == steps, key


def test_a_store_failing_after_the_last_step_resumes_to_finish_logging(
        image_dirs: ImageDirs, mlruns: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last checkpoint is the finished model: --resume logs and registers it."""
    from mlflow.exceptions import MlflowException

    from anomaly_flow import tracking as tracking_module

    def refused(*args: object, **kwargs: object) -> str:
        raise MlflowException("API request to http://127.0.0.1:5077/api/2.0/mlflow/"
                              "model-versions/create failed: Connection refused")

    common = [str(image_dirs.train), "--name", "late", "--config",
              str(often_config(mlruns.parent, epochs=1)), "--mlruns", str(mlruns)]
    real_register = tracking_module.training.register_model
    monkeypatch.setattr(tracking_module.training, "register_model", refused)
    failed = invoke(*common)
    assert failed.exit_code == 1, failed.output
    assert "run the same command with --resume to go on from it" in failed.stderr
    failed_again = invoke(*common, "--resume")  # the store still refuses: a second attempt
    assert failed_again.exit_code == 1, failed_again.output
    monkeypatch.setattr(tracking_module.training, "register_model", real_register)
    resumed = invoke(*common, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "candidate: models:/late@candidate" in resumed.stdout
    run_id = dict(line.split(": ", 1) for line in resumed.stdout.splitlines())["run_id"]
    for key in ("final_val_bpd", "final_train_bpd", "steps", "train_bpd"):
        steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)  # none logged twice
    run = mlflow.get_run(run_id)
    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         output_format="list")
    assert [model.source_run_id for model in logged] == [run_id]  # the model logged once
    version = mlflow.MlflowClient().get_model_version("late", "1")
    assert version.source.endswith(logged[0].model_id), version.source  # that one registered
    again = invoke(*common, "--resume")  # now concluded: nothing left to resume
    assert_one_line_error(again, 1, "the training of 'late' already finished")


def test_sigterm_ends_training_as_ctrl_c_does(image_dirs: ImageDirs, mlruns: Path) -> None:
    """As a scheduler (Slurm, Kubernetes, timeout) stops a job: SIGTERM to its group."""
    config = often_config(mlruns.parent, epochs=500, extra="num_workers = 1\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "anomaly_flow", "train", str(image_dirs.train), "--name",
         "stopped", "--config", str(config), "--mlruns", str(mlruns), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"})  # SIGABRT shows where it hangs
    latest = mlruns / "checkpoints" / "stopped" / "latest"
    deadline = time.monotonic() + 180
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, "training ended before it could be stopped"
    os.killpg(process.pid, signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        pytest.fail(f"training did not stop on SIGTERM:\n{process.communicate()[1]}")
    assert process.returncode == 143, stderr  # 128 + SIGTERM, as a shell reports it
    assert f"interrupted; the last checkpoint is {latest.parent}/step-" in stderr
    assert "Traceback" not in stderr, stderr
    (run,) = mlflow.search_runs(experiment_names=["stopped"], output_format="list")
    assert run.info.status == "KILLED"


def test_the_pipeline_script_says_where_to_resume_on_ctrl_c(
        image_dirs: ImageDirs, tmp_path: Path, mlflow_db_template: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from anomaly_flow import tracking as tracking_module

    def ctrl_c(*args: object, **kwargs: object) -> object:
        raise KeyboardInterrupt

    script = load_script("train")
    store = new_store(tmp_path / "store", mlflow_db_template)
    monkeypatch.setattr(tracking_module.training, "train", ctrl_c)
    code = script.main([str(image_dirs.train), "--name", "script-stop", "--preset", "tiny",
                        "--device", "cpu", "--mlruns", str(store)])
    assert code == 130
    assert "interrupted; no checkpoint was written yet" in capsys.readouterr().err


def test_ctrl_c_before_training_starts_exits_130_not_aborted(
        image_dirs: ImageDirs, mlruns: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the command still loads (its config, here), click's own answer would be
    'Aborted!' and status 1."""
    from anomaly_flow.cli import train as train_command

    def ctrl_c(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_command, "load_preset", ctrl_c)
    result = invoke(str(image_dirs.train), "--name", "early", "--preset", "tiny",
                    "--mlruns", str(mlruns))
    assert result.exit_code == 130, result.output
    assert result.stderr.strip() == "interrupted"


def test_a_refused_resume_leaves_the_stopped_run_as_it_was(
        image_dirs: ImageDirs, mlruns: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped at step 1, before the first checkpoint (step 2): --resume has nothing to go
    on from, and says so before reopening the run (which it marked FAILED and resumed)."""
    common = [str(image_dirs.train), "--name", "early-stop", "--config",
              str(often_config(mlruns.parent)), "--mlruns", str(mlruns)]
    stop_training_at(monkeypatch, 1, KeyboardInterrupt())
    stopped = invoke(*common)
    assert stopped.exit_code == 130, stopped.output
    monkeypatch.undo()
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("early-stop").experiment_id])
    again = invoke(*common, "--resume")
    assert_one_line_error(again, 1, "resume was asked for but there is no checkpoint in",
                          "stopped before its first, one every 2 steps")
    # from another folder too: no checkpoint, not "the images changed since the checkpoint"
    elsewhere = invoke(str(image_dirs.calibration), *common[1:], "--resume")
    assert_one_line_error(elsewhere, 1, "resume was asked for but there is no checkpoint in",
                          "stopped before its first, one every 2 steps")
    after = client.get_run(run.info.run_id)
    assert after.info.status == run.info.status == "KILLED"
    assert after.data.tags == run.data.tags


def test_a_stop_during_registration_waits_for_the_record_and_says_the_training_finished(
        image_dirs: ImageDirs, mlruns: Path, monkeypatch: pytest.MonkeyPatch,
        signal_handlers_restored: None) -> None:
    """SIGTERM as the model is registered: the version, its tags and the finished record
    are all written first, the command says the training had finished (it used to ask for
    a --resume, which registered the same model a second time), and a --resume is
    refused with nothing added."""
    from anomaly_flow.tracking import training as training_module

    common = [str(image_dirs.train), "--name", "late-stop", "--preset", "tiny", "--epochs",
              "1", "--mlruns", str(mlruns)]
    with monkeypatch.context() as patch:
        stop_during(patch, training_module, "register_model")
        stopped = invoke(*common)
    assert stopped.exit_code == 143, stopped.output
    assert "interrupted after the training had finished (registered models:/late-stop/1 " \
        "with alias candidate" in stopped.stderr
    client = mlflow.MlflowClient()
    (version,) = client.search_model_versions("name = 'late-stop'")
    assert client.get_run(version.run_id).data.tags["registered_version"] == "1"
    # the run of a registered, recorded model ended FINISHED (it ended KILLED, as if
    # its training had been cut short)
    assert client.get_run(version.run_id).info.status == "FINISHED"
    again = invoke(*common, "--resume")
    assert_one_line_error(again, 1, "the training of 'late-stop' already finished")
    assert len(client.search_model_versions("name = 'late-stop'")) == 1
    # a new training stopped before it replaced that record is not said to have finished
    with monkeypatch.context() as patch:
        stop_during(patch, training_module, "folder_datasets")
        early = invoke(*common)
    assert early.exit_code == 143, early.output
    assert "after the training had finished" not in early.stderr
    assert "no checkpoint was written yet" in early.stderr or "--resume" in early.stderr


def test_a_fresh_training_ends_the_run_a_killed_training_left_running(
        image_dirs: ImageDirs, mlruns: Path) -> None:
    """A training killed outright (SIGKILL, the OOM killer) leaves its MLflow run RUNNING;
    the next training of that name starts afresh and deletes the checkpoints it could
    have resumed from, and left it RUNNING forever."""
    killed = f"""
import os, signal
from anomaly_flow import tracking
from anomaly_flow.tracking import training
from tests.conftest import tiny_config
def die(self, event):
    if event.kind == "checkpoint":
        os.kill(os.getpid(), signal.SIGKILL)
training._MetricLogger.__call__ = die
config = tiny_config(epochs=1).replace(checkpoint_every=1)
tracking.train_and_register({str(image_dirs.train)!r}, "killed", config, device="cpu",
                            mlruns={str(mlruns)!r}, progress=False)
"""
    run_killed(killed)
    record = json.loads((mlruns / "checkpoints" / "killed" / "run.json").read_text())
    client = mlflow.MlflowClient()
    assert client.get_run(record["run_id"]).info.status == "RUNNING"
    result = invoke(str(image_dirs.train), "--name", "killed", "--preset", "tiny",
                    "--epochs", "1", "--mlruns", str(mlruns), "--restart")
    assert result.exit_code == 0, result.output
    assert client.get_run(record["run_id"]).info.status == "KILLED"
    assert "marked KILLED" in result.stderr


@pytest.mark.parametrize("name", ["glow.toml", "glow.json"])
def test_a_config_saved_with_a_byte_order_mark_is_read(tmp_path: Path, name: str) -> None:
    """A UTF-8 file with a BOM (Notepad's "UTF-8 with BOM") was refused as "cannot parse
    ... Invalid statement (at line 1, column 1)", on a first line that looks right."""
    text = ('{"train": {"epochs": 3}}' if name.endswith(".json")
            else "[train]\nepochs = 3\n")
    config = tmp_path / name
    config.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_config(config).train.epochs == 3


def test_a_resume_after_a_kill_between_registration_and_record_registers_once(
        image_dirs: ImageDirs, mlruns: Path) -> None:
    """A training killed outright (SIGKILL, the OOM killer) just after it registered its
    model, before its record says so: the --resume that finishes the logging registered
    the same model again, as version 2."""
    killed = f"""
import os, signal
from anomaly_flow import tracking
from anomaly_flow.tracking import training
from tests.conftest import tiny_config
real = training.register_model
def register_then_die(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
training.register_model = register_then_die
tracking.train_and_register({str(image_dirs.train)!r}, "reg-killed", tiny_config(epochs=1),
                            device="cpu", mlruns={str(mlruns)!r}, progress=False)
"""
    run_killed(killed)
    client = mlflow.MlflowClient()
    (first,) = client.search_model_versions("name = 'reg-killed'")
    result = invoke(str(image_dirs.train), "--name", "reg-killed", "--preset", "tiny",
                    "--epochs", "1", "--mlruns", str(mlruns), "--resume")
    assert result.exit_code == 0, result.output
    assert "model_uri: models:/reg-killed/1" in result.stdout
    (version,) = client.search_model_versions("name = 'reg-killed'")
    assert str(version.version) == str(first.version) == "1"
    assert str(client.get_model_version_by_alias("reg-killed", "candidate").version) == "1"
    run = client.get_run(version.run_id)
    assert (run.info.status, run.data.tags["registered_version"]) == ("FINISHED", "1")


def test_model_files_the_store_cannot_write_are_a_one_line_error_that_says_to_resume(
        image_dirs: ImageDirs, mlruns: Path) -> None:
    """MLflow's local artifact store lets an OSError through as it is (a full disk: "No
    space left on device"): the training ended in a traceback, without the checkpoint to
    resume from. Here a file stands where the experiment's models folder goes."""
    blocker = mlruns / "artifacts" / "blocked" / "models"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way")
    common = [str(image_dirs.train), "--name", "blocked", "--preset", "tiny", "--epochs",
              "1", "--mlruns", str(mlruns)]
    result = invoke(*common)
    assert_one_line_error(result, 1, "Error: MLflow failed: cannot write the run's files: ",
                          str(blocker))
    assert "run the same command with --resume to go on from it" in result.stderr
    blocker.unlink()
    resumed = invoke(*common, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "candidate: models:/blocked@candidate" in resumed.stdout


@pytest.mark.slow
def test_a_store_database_that_cannot_grow_is_a_one_line_error(
        image_dirs: ImageDirs, tmp_path: Path, mlflow_db_template: Path) -> None:
    """sqlite refuses a write mid-run (a full disk; here a limit on file sizes, which it
    reports as a disk I/O error): MLflow logged the error, its traceback and its SQL
    statement on stderr before raising it, and the message repeated the statement."""
    store = new_store(tmp_path / "mlruns", mlflow_db_template)
    with contextlib.closing(sqlite3.connect(store / "mlflow.db")) as db:
        db.execute("VACUUM")  # no free pages: the run's first rows make it grow
    limit = (store / "mlflow.db").stat().st_size  # a checkpoint is smaller

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails, not the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    done = subprocess.run(
        [sys.executable, "-m", "anomaly_flow", "train", str(image_dirs.train), "--name",
         "full", "--preset", "tiny", "--epochs", "3", "--batch-size", "2", "--mlruns", str(store),
         "--device", "cpu"], capture_output=True, text=True, preexec_fn=limited, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "[SQL:" not in done.stderr, done.stderr
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert error.startswith("Error: MLflow failed: (sqlite3.OperationalError) disk I/O error; "
                            "check the tracking store"), error


class _Echo(mlflow.pyfunc.PythonModel):
    """Another tool's model: what anomaly-flow did not register."""

    def predict(self, context: object, model_input: list[str]) -> list[str]:
        return model_input


def test_a_registered_model_anomaly_flow_did_not_make_is_not_trained_into(
        image_dirs: ImageDirs, mlruns: Path) -> None:
    """A shared store holds another team's model under the name: training added a Glow as
    its next version and moved its alias candidate there, without a word."""
    client = mlflow.MlflowClient()
    mlflow.set_experiment("their-experiment")
    with mlflow.start_run():
        logged = mlflow.pyfunc.log_model(name="model", python_model=_Echo())
    theirs = mlflow.register_model(logged.model_uri, "bottles").version
    client.set_registered_model_alias("bottles", "candidate", theirs)
    result = invoke(str(image_dirs.train), "--name", "bottles", "--preset", "tiny",
                    "--epochs", "1", "--mlruns", str(mlruns))
    assert_one_line_error(result, 1, "already holds a registered model 'bottles' that "
                          "anomaly-flow did not register (1 version(s)",
                          "train under another --name")
    assert [str(v.version) for v in client.search_model_versions("name = 'bottles'")] \
        == [str(theirs)]
    assert str(client.get_model_version_by_alias("bottles", "candidate").version) \
        == str(theirs)
    assert not (mlruns / "checkpoints" / "bottles").exists()
    # a registered model without versions (made beforehand, to set its description or
    # permissions) has no alias to move: it is trained into, as the README says
    client.create_registered_model("empty-bottles", description="made by the admins")
    check_not_foreign("empty-bottles")


def test_a_store_that_cannot_end_the_stopped_run_leaves_the_stop_reported(
        image_dirs: ImageDirs, mlruns: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C, then the store fails to mark the run KILLED (a full disk fails that write as
    it failed the checkpoint before): the store's error replaced the stop, exit 1 and
    "MLflow failed" instead of 130 and where to resume from."""
    from mlflow.exceptions import MlflowException

    def refused(self: mlflow.MlflowClient, *args: object, **kwargs: object) -> None:
        raise MlflowException("(sqlite3.OperationalError) database or disk is full [SQL: "
                              "UPDATE runs SET status=?, end_time=? WHERE runs.run_uuid = ?]")

    stop_training_at(monkeypatch, 3, KeyboardInterrupt())
    monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", refused)
    result = invoke(str(image_dirs.train), "--name", "unended", "--config",
                    str(often_config(mlruns.parent)), "--mlruns", str(mlruns))
    assert result.exit_code == 130, result.output
    assert "Error:" not in result.stderr and "Traceback" not in result.output
    assert "could not be marked KILLED: MLflow failed: (sqlite3.OperationalError) database " \
        "or disk is full; check the tracking store" in result.stderr
    assert f"interrupted; the last checkpoint is {mlruns / 'checkpoints' / 'unended'}/step-" \
        in result.stderr


def test_a_training_record_the_disk_refuses_is_a_one_line_error_and_resumable(
        image_dirs: ImageDirs, mlruns: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up as the training record (run.json) is rewritten after the last
    step: the command ended in an OSError traceback, and the record was left empty, so the
    --resume meant to finish the logging was refused as damaged; the training was lost."""
    common = [str(image_dirs.train), "--name", "full-record", "--config",
              str(often_config(mlruns.parent, epochs=1)), "--mlruns", str(mlruns)]
    real_write = Path.write_text

    def disk_full(self: Path, data: str, *args: object, **kwargs: object) -> int:
        if "run.json" in self.name and "logged_model_uri" in data:
            real_write(self, "")  # opened for writing: emptied, then nothing fits
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data, *args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", disk_full)
        failed = invoke(*common)
    assert_one_line_error(failed, 1, "could not write the training record ",
                          "No space left on device; free space there")
    resumed = invoke(*common, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "candidate: models:/full-record@candidate" in resumed.stdout


def test_a_checkpoint_folder_on_a_full_disk_is_a_one_line_error(
        image_dirs: ImageDirs, tmp_path: Path, mlflow_db_template: Path) -> None:
    """The first write of a training in a store that exists, the holder's line in its
    lock file, met a full disk (here a limit on file sizes): an OSError traceback, raised
    twice (again as the file closed, flushing the same line)."""

    def no_room() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails, not the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))

    mlruns = new_store(tmp_path / "mlruns", mlflow_db_template)  # opened, not written
    done = subprocess.run(
        [sys.executable, "-m", "anomaly_flow", "train", str(image_dirs.train), "--name",
         "no-room", "--preset", "tiny", "--mlruns", str(mlruns), "--device", "cpu"],
        capture_output=True, text=True, preexec_fn=no_room, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert error == (f"Error: cannot write in the checkpoint folder {mlruns / 'checkpoints'} "
                     "(File too large); free space there, or train with another --mlruns "
                     "DIR (checkpoints go under it)")
