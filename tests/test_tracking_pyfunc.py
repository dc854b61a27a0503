"""Tests for anomaly_flow.tracking.pyfunc: the packaged model's inputs, outputs and
refusals, on real image files and real stores."""

from __future__ import annotations

import base64
import copy
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException
from mlflow.models.utils import _enforce_schema
from mlflow.types.schema import AnyType, DataType
from PIL import Image

from anomaly_flow import tracking
from anomaly_flow.calibration import CalibrationError, calibrate
from anomaly_flow.config import GlowConfig
from anomaly_flow.data import InvalidSource
from anomaly_flow.glow import Glow, ModelFileError, preprocess
from anomaly_flow.scoring import ScoringDataset
from anomaly_flow.tracking.pyfunc import (
    GlowPyfunc,
    ModelLoadError,
    PredictError,
    input_sources,
    model_signature,
    output_columns,
    path_root,
    predict_frame,
    rows_from_columns,
)
from tests.conftest import (
    AUTO,
    ImageDirs,
    TrainedModel,
    library_scores,
)


def test_input_sources_take_the_bytes_else_the_path_and_blank_is_no_image() -> None:
    frame = pd.DataFrame({"path": ["a.png", "b.png", "", "  ", None, None],
                          "image": [b"PNG", None, None, None, b"", np.nan]})
    assert input_sources(frame) == [b"PNG", "b.png", None, None, None, None]
    # a blank path is "no image given", not the working directory
    grey_16 = GlowConfig(image_size=16, levels=2)
    dataset = ScoringDataset(input_sources(pd.DataFrame({"path": [""]})), grey_16)
    assert dataset[0].error == "no image given (empty value)"
    odd = input_sources(pd.DataFrame({"path": [3, Path("c.png"), None],
                                      "image": [None, None, bytearray(b"PNG")]}))
    assert odd[1:] == ["c.png", b"PNG"]
    dataset = ScoringDataset(odd, grey_16)
    assert dataset[0].error == "the 'path' value is an int (3), not a string; pass one file " \
        "path per row"


def test_a_path_as_a_scores_table_prints_it_is_read_back(tmp_path: Path) -> None:
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")  # Latin-1, not UTF-8
    Path(os.fsdecode(raw)).write_bytes(b"PNG")
    printed = f"{tmp_path}/caf\\xe9.png"  # the scores table's `path` of that file
    assert input_sources(pd.DataFrame({"path": [printed]})) == [os.fsdecode(raw)]


def test_pyfunc_answers_empty_input_and_refuses_bad_params_clearly() -> None:
    wrapper = tiny_wrapper()
    empty = wrapper.predict(None, pd.DataFrame({"path": []}))  # type: ignore[arg-type]
    assert len(empty) == 0 and list(empty.columns) == output_columns(wrapper.model)
    failed = wrapper.predict(None, pd.DataFrame({"path": ["missing.png"]}))  # type: ignore[arg-type]
    for answer in (empty, failed):  # the signature's doubles, rows or none, failed or not
        for name in ("bpd", "complexity", "level_1", "score", "p_value"):
            assert answer[name].dtype == np.float64, name
    for columnless, empty_too in ((pd.DataFrame(index=[0, 1]), ""),  # what MLflow leaves
                                  (pd.DataFrame(), "; an empty request, or a plain list of "
                                   "values that is no table, reads the same")):
        with pytest.raises(PredictError, match=r"the input has no 'path' or 'image' column "
                                               r"\(MLflow drops every column the model's "
                                               r"signature does not name, a misspelt one too, "
                                               r"before the model sees the input"
                                               + re.escape(empty_too) + r"\), but the model "
                                               r"needs a 'path'") as info:
            wrapper.predict(None, columnless)  # type: ignore[arg-type]
        assert isinstance(info.value, ValueError)  # for Python callers
        assert info.value.get_http_status_code() == 400  # for REST clients
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="the threshold param must be a finite score"):
            wrapper.predict(None, pd.DataFrame({"path": ["x.png"]}),  # type: ignore[arg-type]
                            params={"threshold": bad})
    with pytest.raises(ValueError, match="has columns \\['foo'\\], but the model needs"):
        wrapper.predict(None, pd.DataFrame({"foo": ["x"]}))  # type: ignore[arg-type]
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"the batch_size param must be a positive number "
                                             f"of images, not {bad}"):
            wrapper.predict(None, pd.DataFrame({"path": ["x.png"]}),  # type: ignore[arg-type]
                            params={"batch_size": bad})


def test_a_batch_that_does_not_fit_is_a_400_naming_the_batch_size_param(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of memory once reached a REST client as MLflow's "unexpected error" with a
    stack trace (only an MlflowException keeps its message), and a Python caller was told
    to lower --batch-size, an option the model does not have."""
    from mlflow.pyfunc import scoring_server

    def out_of_memory(self: Glow, x: torch.Tensor) -> Any:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                           "allocate 123456789 bytes. Error code 12 (Cannot allocate memory)")

    wrapper = tiny_wrapper()
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes())
    monkeypatch.setattr(Glow, "forward", out_of_memory)
    with pytest.raises(PredictError, match=(
            r"^scoring ran out of memory on cpu \(an allocation of 117\.7 MiB failed\) with "
            r"batch_size = 256 \(the batch_size param\), \d+ images a forward pass here; ")
    ) as info:
        wrapper.predict(None, pd.DataFrame({"path": [str(image)] * 2}))  # type: ignore[arg-type]
    assert info.value.get_http_status_code() == 400

    class Loaded:  # what mlflow.pyfunc.load_model wraps the pyfunc in
        def predict(self, data: Any, params: dict | None = None) -> pd.DataFrame:
            return wrapper.predict(None, data, params)  # type: ignore[arg-type]

    model = mlflow.pyfunc.PyFuncModel(model_meta=mlflow.models.Model(), model_impl=Loaded())
    with pytest.raises(MlflowException) as served:  # what `mlflow models serve` answers
        scoring_server.invocations(json.dumps({"inputs": {"path": [str(image)] * 2}}),
                                   "application/json", model, None)
    answer = json.loads(served.value.serialize_as_json())
    assert served.value.get_http_status_code() == 400
    assert "batch_size = 256 (the batch_size param)" in answer["message"]
    assert "stack_trace" not in answer


def test_predict_from_two_threads_at_once_leaves_the_process_as_it_was(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scoring sets process-wide state for its duration (warning filters while an image
    decodes; on CUDA, torch's TF32 and cuDNN flags) and restores what it saw on entry: two
    calls at once each restored the other's, which left "ignore every warning" in force
    in the process for good (and, on CUDA, TF32 on for a call still running)."""
    wrapper = tiny_wrapper()
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes())
    opened, entered, second_in = Image.open, [], threading.Event()

    def slow_open(*args: Any, **kwargs: Any) -> Image.Image:
        # the first decode waits (a while) for the other call's to begin, and ends first
        entered.append(None)
        if len(entered) == 1:
            second_in.wait(timeout=1)
        else:
            second_in.set()
            time.sleep(0.2)
        return opened(*args, **kwargs)

    monkeypatch.setattr(Image, "open", slow_open)
    before = list(warnings.filters)
    answers: list[pd.DataFrame] = []
    threads = [threading.Thread(target=lambda: answers.append(wrapper.predict(
        None, pd.DataFrame({"path": [str(image)]})))) for _ in range(2)]  # type: ignore[arg-type]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert warnings.filters == before
    assert len(answers) == 2 and answers[0]["bpd"].equals(answers[1]["bpd"])


def test_a_column_mlflow_packed_into_one_cell_is_a_row_per_image(tmp_path: Path) -> None:
    """MLflow turns ``{"inputs": {"path": ["a.png", "b.png"]}}`` (REST) and
    ``predict({"path": [...]})`` into one row holding the list, unless the list has a
    null in it; both must be answered with a row per image."""
    wrapper = tiny_wrapper()
    files = [tmp_path / "a.png", tmp_path / "b.png"]
    for value, file in enumerate(files):
        file.write_bytes(png_bytes(value))
    paths = [str(f) for f in files]
    schema = model_signature(wrapper.model).inputs
    packed = _enforce_schema({"path": paths}, schema)
    assert len(packed) == 1  # what MLflow gives the model
    with_null = _enforce_schema({"path": [*paths, None]}, schema)
    by_list = wrapper.predict(None, packed)  # type: ignore[arg-type]
    by_rows = wrapper.predict(None, with_null)  # type: ignore[arg-type]
    assert (by_list["error"] == "").all() and len(by_list) == 2
    assert by_list["bpd"].tolist() == by_rows["bpd"].tolist()[:2]
    images = [base64.b64encode(f.read_bytes()).decode() for f in files]
    by_bytes = wrapper.predict(None, _enforce_schema({"image": images}, schema))  # type: ignore[arg-type]
    assert by_bytes["bpd"].tolist() == by_list["bpd"].tolist()
    both = rows_from_columns(pd.DataFrame({"path": [paths], "image": [None]}))
    assert both["path"].tolist() == paths and both["image"].tolist() == [None, None]
    empty = wrapper.predict(None, _enforce_schema({"path": []}, schema))  # type: ignore[arg-type]
    assert len(empty) == 0
    # not what MLflow packs: left as it is, an error in its one row
    for cell in ([1, 2], np.array(paths)):
        unchanged = pd.DataFrame({"path": [cell]})
        assert rows_from_columns(unchanged) is unchanged
    uneven = pd.DataFrame({"path": [paths], "image": [images[:1]]})
    with pytest.raises(PredictError, match=r"^the input's columns hold lists of different "
                                           r"lengths \(2 in 'path' and 1 in 'image'\), so"):
        rows_from_columns(uneven)  # one row back would drop a path without a word
    with pytest.raises(PredictError, match=r"\(3 in 'path' and 2 in 'image'\)"):
        rows_from_columns(pd.DataFrame({"path": [[*paths, paths[0]]], "image": [[None, "x"]]}))
    # the advice followed: one value per image, null where it has none
    followed = rows_from_columns(pd.DataFrame({"path": [[paths[0], None]],
                                               "image": [[None, images[1]]]}))
    assert followed["path"].tolist() == [paths[0], None]
    assert followed["image"].tolist() == [None, images[1]]


def test_a_file_uri_is_its_file_and_other_uris_and_bytes_say_what_to_do(
        tmp_path: Path) -> None:
    """Spark's binaryFile source gives ``file:/...`` paths; bytes in the path column are
    what ``spark_udf(...)("content")`` sends (it names unnamed columns path first)."""
    folder = tmp_path / "my parts"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"PNG")
    local = str(folder / "a.png")
    uris = [f"file:{local}", f"file://{local}", f"file://localhost{local}",
            f"file:{local.replace(' ', '%20')}"]
    assert input_sources(pd.DataFrame({"path": uris})) == [local] * 4
    assert input_sources(pd.DataFrame({"path": [f"FILE://{local}"]})) == [local]
    # another host's file is not this one's /HOST/...: the URI message answers it
    (other_host,) = input_sources(pd.DataFrame({"path": [f"file://fileserver{local}"]}))
    assert isinstance(other_host, InvalidSource)
    assert "the model reads local files only" in other_host.reason
    remote, raw = input_sources(pd.DataFrame({"path": ["s3://bucket/a.png", b"\x89PNG"]}))
    assert isinstance(remote, InvalidSource) and isinstance(raw, InvalidSource)
    assert "is a URI ('s3://bucket/a.png'); the model reads local files only" in remote.reason
    assert "pass them in the 'image' column" in raw.reason
    assert "struct(col(...).alias('image'))" in raw.reason


def test_base64_as_bytes_and_data_uris_are_the_image_they_encode() -> None:
    """``base64.b64encode(data)`` gives bytes, not text; a browser's ``readAsDataURL`` gives
    ``data:image/png;base64,...``: both were "not an image" / "not base64"."""
    png = png_bytes()
    text = base64.b64encode(png).decode()
    sources = input_sources(pd.DataFrame({"image": [
        text.encode(), base64.encodebytes(png), f"data:image/png;base64,{text}",
        "DATA:image/png;base64," + text, b"PNG", base64.b64encode(b"hello")]}))
    assert sources == [png, png, png, png, b"PNG", base64.b64encode(b"hello")]
    grey_8 = GlowConfig(image_size=8, levels=2, steps_per_level=1, hidden_channels=4)
    assert ScoringDataset(sources, grey_8)[0].ok


def test_a_path_root_confines_a_served_model_to_one_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A served model read any file its process could, and its row errors told a client
    which paths exist ("file not found" / "not a regular file"): with
    ANOMALY_FLOW_PATH_ROOT it reads under one folder, and everything outside gets one
    answer."""
    root = tmp_path / "served"
    (root / "parts").mkdir(parents=True)
    (root / "parts" / "a.png").write_bytes(png_bytes(7))
    (root / "parts" / "b\udcff.png").write_bytes(png_bytes(7))  # a name not UTF-8
    (tmp_path / "secret.png").write_bytes(png_bytes(9))
    (tmp_path / "xA.png").write_bytes(png_bytes(9))  # file:...x%41.png, decoded
    (root / "parts" / "leak.png").symlink_to(tmp_path / "secret.png")
    folder = tiny_wrapper().model.save(tmp_path / "glow")
    context = mlflow.pyfunc.PythonModelContext(artifacts={"glow": str(folder)},
                                               model_config={"device": "cpu"})
    unconfined = GlowPyfunc()
    unconfined.load_context(context)
    monkeypatch.setenv("ANOMALY_FLOW_PATH_ROOT", str(root / "parts" / ".."))
    confined = GlowPyfunc()
    confined.load_context(context)
    assert confined.root == str(root)
    inside = ["parts/a.png", str(root / "parts" / "a.png"), f"file://{root}/parts/a.png",
              "parts/../parts/a.png", f"file:{root}/parts/%61.png", "parts/b\\xff.png"]
    # whether a file is there or not, outside is one answer: secret.png and xA.png exist
    outside = [str(tmp_path / "secret.png"), str(tmp_path / "nothing.png"), "../secret.png",
               "parts/leak.png", "/", f"file://{tmp_path}/x%41.png",
               f"file://{tmp_path}/y%41.png"]
    answer = confined.predict(None, pd.DataFrame({"path": inside + outside}))  # type: ignore[arg-type]
    expected = unconfined.predict(None, pd.DataFrame(  # type: ignore[arg-type]
        {"path": [str(root / "parts" / "a.png")]}))["bpd"].item()
    n = len(inside)
    assert answer["bpd"].tolist()[:n] == [expected] * n
    assert answer["error"].tolist()[:n] == [""] * n
    for name, error in zip(outside, answer["error"].tolist()[n:], strict=True):
        assert error == (f"the 'path' value {name!r} is outside the one folder this model "
                         "reads (ANOMALY_FLOW_PATH_ROOT); pass a path under it, relative to "
                         "it or whole, or the file's bytes in the 'image' column")
    assert answer["bpd"].iloc[n:].isna().all()
    # no file name can be these: an error in their rows, the others still answered
    odd = confined.predict(None, pd.DataFrame(  # type: ignore[arg-type]
        {"path": ["a\x00b.png", "a\ud800.png", "parts/a.png", "http://host/a.png"]},
        dtype=object))
    assert odd["error"].tolist()[:2] == [
        f"the 'path' value {name!r} is not a file name this model can read (it holds a NUL "
        "character, a lone surrogate, or another drive's name)"
        for name in ("a\x00b.png", "a\ud800.png")]
    assert odd["bpd"].iloc[2] == expected
    assert odd["error"].iloc[3].startswith("the 'path' value is a URI ('http://host/a.png')")
    missing = confined.predict(None, pd.DataFrame({"path": ["parts/b.png"]}))  # type: ignore[arg-type]
    assert "not found" in missing["error"].item()  # inside, a file's absence is still said
    assert np.isfinite(confined.predict(None, pd.DataFrame(  # type: ignore[arg-type]
        {"image": [png_bytes(9)]}))["bpd"].item())  # bytes are no file: not confined
    (tmp_path / "a-file").write_text("")
    for bad in (str(tmp_path / "a-file"), str(tmp_path / "nowhere")):
        monkeypatch.setenv("ANOMALY_FLOW_PATH_ROOT", bad)
        with pytest.raises(ModelLoadError, match=(
                f"^ANOMALY_FLOW_PATH_ROOT is '{re.escape(bad)}', which is not a folder; set it "
                "to the folder whose images the model may read, or unset it")):
            GlowPyfunc().load_context(context)
    monkeypatch.setenv("ANOMALY_FLOW_PATH_ROOT", " ")
    assert path_root() is None


def test_a_calibration_of_a_score_the_model_lacks_is_refused_at_load(tmp_path: Path) -> None:
    """Refused by every predict, it reached REST clients as "verify that the serialized
    input Dataframe is compatible with the model" with a stack trace."""
    folder = tiny_wrapper().model.save(tmp_path / "glow")
    calibration = calibrate("level_3", np.linspace(0, 1, 40), alpha=0.1)
    (folder / "calibration.json").write_text(calibration.to_json())
    context = mlflow.pyfunc.PythonModelContext(artifacts={"glow": str(folder)},
                                               model_config={"device": "cpu"})
    with pytest.raises(ModelFileError, match=r"calibration\.json calibrates score 'level_3', "
                                             r"which this model does not produce \(its "
                                             r"scores: bpd, .*level_2\); copy or download"):
        GlowPyfunc().load_context(context)
    # the library's loader (score, calibrate, evaluate) refuses it alike, not per batch
    with pytest.raises(ModelFileError, match=r"calibrates score 'level_3', which this model "
                                             r"does not produce"):
        tracking.load_model(str(folder))


@pytest.mark.parametrize("replaced", ["weights", "config"])
def test_a_model_put_in_place_of_the_calibrated_one_is_refused_at_load(
        replaced: str, tmp_path: Path) -> None:
    """A calibration's threshold and p-values hold for the model it was fitted to; other
    weights saved into the folder (Glow.save, a copied file), or a config that scores
    otherwise (n_bits), leave it stale, and a model with it would answer with confident,
    wrong verdicts."""
    wrapper = tiny_wrapper()
    folder = wrapper.model.save(tmp_path / "glow")
    calibration = calibrate("bpd", np.linspace(0, 1, 40), alpha=0.1,
                            model_digest=wrapper.model.digest())
    (folder / "calibration.json").write_text(calibration.to_json())
    assert tracking.load_model(str(folder)).calibration == calibration
    assert wrapper.model.digest() == Glow.load(folder).digest()
    if replaced == "weights":
        other = tiny_wrapper().model
        with torch.no_grad():
            next(other.parameters()).add_(1e-3)
        other.save(folder)
    else:
        (folder / "config.json").write_text(
            dataclasses.replace(wrapper.model.config, n_bits=5).to_json())
        other = Glow.load(folder)
    context = mlflow.pyfunc.PythonModelContext(artifacts={"glow": str(folder)},
                                               model_config={"device": "cpu"})
    said = (rf"^{re.escape(str(folder))}/calibration\.json was fitted to another model than "
            rf"the config\.json and model\.safetensors beside it \(its digest "
            rf"{calibration.model_digest[:12]}\.\.\., theirs {other.digest()[:12]}\.\.\.\): "
            r"they were replaced after calibration, .*; put back the files it was calibrated "
            r"with, or delete it to score uncalibrated and calibrate a registered version")
    for load in (lambda: tracking.load_model(str(folder)),
                 lambda: GlowPyfunc().load_context(context)):
        with pytest.raises(ModelFileError, match=said):
            load()


def test_predict_frame_refuses_another_models_calibration(tmp_path: Path) -> None:
    model = tiny_wrapper().model
    frame = pd.DataFrame({"image": [png_bytes()]})
    calibration = calibrate("bpd", np.linspace(0, 1, 40), alpha=0.1,
                            model_digest=model.digest())
    assert predict_frame(model, calibration, frame)["error"].tolist() == [""]
    with pytest.raises(CalibrationError, match=(
            r"^this calibration was fitted to the scores of another model \(its digest "
            r"000000000000\.\.\., this model's .*; predict with the calibration loaded with "
            r"this model \(load_model\(URI\)\.calibration\), or calibrate this model")):
        predict_frame(model, dataclasses.replace(calibration, model_digest="0" * 64), frame)


def test_log_model_records_the_model_and_refuses_another_models_calibration(
        mlruns: Path) -> None:
    model, other = tiny_wrapper().model, tiny_wrapper().model
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    bare = calibrate("bpd", np.linspace(0, 1, 40), alpha=0.1)
    with tracking.start_run("digests", "log") as run:
        logged = tracking.log_model(run, model, bare, artifact_path="a")
        stored = tracking.load_model(logged).calibration
        assert stored is not None and stored.model_digest == model.digest()
        assert stored == dataclasses.replace(bare, model_digest=model.digest())
        with pytest.raises(CalibrationError, match=(
                r"^this calibration was fitted to the scores of another model \(its digest "
                rf"{model.digest()[:12]}\.\.\., this model's {other.digest()[:12]}\.\.\.; a "
                r"digest covers the config and the weights\), so its threshold and p-values "
                "do not hold for this one; log it with the model it was fitted to, or "
                "calibrate")):
            tracking.log_model(run, other, stored, artifact_path="b")
        # a model converted to float64 (as Glow.check_input advises for float64 images)
        # is the same model: logged with its calibration, it loads as saved, in float32
        doubled = copy.deepcopy(model).double()
        uri = tracking.log_model(run, doubled, bare, artifact_path="c")
        assert tracking.load_model(uri).calibration == stored


@pytest.mark.parametrize("device", ["meta", "mps", "xpu"])
def test_a_device_the_model_cannot_score_on_is_refused_at_load(device: str,
                                                               tmp_path: Path) -> None:
    """torch knows these devices, so they once passed: ``meta`` loaded a model without
    weights that failed every request ("Cannot copy out of meta tensor"), ``mps`` and
    ``xpu`` failed in torch's words."""
    folder = tiny_wrapper().model.save(tmp_path / "glow")
    context = mlflow.pyfunc.PythonModelContext(artifacts={"glow": str(folder)},
                                               model_config={"device": device})
    with pytest.raises(Exception,
                       match=f"unknown device '{device}'; use auto, cpu, cuda or cuda:N"):
        GlowPyfunc().load_context(context)


def tiny_wrapper() -> GlowPyfunc:
    """The pyfunc over an 8×8 Glow, its ActNorms initialised on random images (scoring
    refuses a model never initialised), uncalibrated."""
    wrapper = GlowPyfunc()
    wrapper.model = Glow(GlowConfig(image_size=8, levels=2, steps_per_level=1,
                                    hidden_channels=4)).eval()
    noise = torch.Generator().manual_seed(0)
    wrapper.model.initialize(preprocess(
        torch.randint(0, 256, (4, 1, 8, 8), generator=noise, dtype=torch.uint8), 8))
    wrapper.calibration = None
    return wrapper


def png_bytes(value: int = 7) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), value).save(buffer, "PNG")
    return buffer.getvalue()


CELLS = st.one_of(st.none(), st.just(png_bytes()), st.binary(max_size=20), st.text(max_size=10),
                  st.integers(-5, 10**20), st.floats(), st.booleans(),
                  st.lists(st.integers(0, 255), max_size=4), st.just("/no/such/file.png"),
                  st.just("a\x00b.png"), st.just("a\ud800.png"), st.just(""))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_pyfunc_answers_every_row_of_any_table(data: st.DataObject) -> None:
    """Any mix of columns and cell values (what a REST client or a Spark table can send):
    one row out per row in, in the same order and index, scores or a reason in each; a
    table without a usable column is a PredictError (HTTP 400), never another exception.
    A path with a NUL character or a lone surrogate in it once raised out of the whole
    batch."""
    wrapper = tiny_wrapper()
    columns = data.draw(st.lists(st.sampled_from(["path", "image", "other", "Path"]),
                                 max_size=3, unique=True))
    n = data.draw(st.integers(0, 4))
    index = data.draw(st.sampled_from([None, list(range(10, 10 + n))]))
    cells = {c: [data.draw(CELLS) for _ in range(n)] for c in columns}
    try:
        frame = pd.DataFrame(cells, index=index if n else None)
    except UnicodeEncodeError:  # pandas' Arrow strings hold no lone surrogate; objects do
        frame = pd.DataFrame(cells, index=index if n else None, dtype=object)
    params = data.draw(st.sampled_from([None, {"threshold": 1.0}, {"batch_size": 1}]))
    try:
        out = wrapper.predict(None, frame, params=params)  # type: ignore[arg-type]
    except PredictError as error:
        assert str(error).strip()
        return
    assert list(out.columns) == output_columns(wrapper.model)
    # (a one-row frame of lists of strings is what MLflow makes of a columnar request)
    assert list(out.index) == list(rows_from_columns(frame).index)
    failed = out["error"] != ""
    assert out.loc[~failed, "bpd"].notna().all() and out.loc[failed, "bpd"].isna().all()


def test_pyfunc_predicts_the_library_bpd_from_paths_and_bytes(
        trained: TrainedModel, image_dirs: ImageDirs, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = tracking.load_model(trained.alias_uri, device=AUTO)
    files = image_dirs.files(image_dirs.test_normal)[:6] + image_dirs.files(
        image_dirs.test_anomalous)[:6]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    paths = [str(p) for p in files]
    expected = library_scores(loaded.model, paths)

    pyfunc = mlflow.pyfunc.load_model(trained.alias_uri)
    by_path = pyfunc.predict(pd.DataFrame({"path": [*paths, str(broken)]}))
    by_bytes = pyfunc.predict(pd.DataFrame({"image": [p.read_bytes() for p in files]}))

    columns = ["bpd", "complexity", "coarse_complexity", "typicality", "knn", "pixel_knn",
               "ensemble", "level_1", "level_2", "score", "p_value", "is_anomaly", "error"]
    assert list(by_path.columns) == columns
    np.testing.assert_array_equal(by_path["bpd"].to_numpy()[:-1], expected["bpd"].to_numpy())
    np.testing.assert_array_equal(by_bytes["bpd"].to_numpy(), expected["bpd"].to_numpy())
    for name in ("complexity", "coarse_complexity", "typicality", "knn", "pixel_knn",
                 "ensemble"):
        assert by_path[name].dtype == by_bytes[name].dtype == np.float64, name
        np.testing.assert_array_equal(by_path[name].to_numpy()[:-1], expected[name].to_numpy())
        np.testing.assert_array_equal(by_bytes[name].to_numpy(), expected[name].to_numpy())
    assert np.isnan(by_path["coarse_complexity"].iloc[-1])
    signature = {spec.name: spec.type for spec in pyfunc.metadata.get_output_schema().inputs}
    assert list(signature) == columns
    assert signature["coarse_complexity"] == DataType.double
    assert signature["is_anomaly"] == DataType.double  # so Spark keeps nulls (see pyfunc)
    inputs = {spec.name: spec.type for spec in pyfunc.metadata.get_input_schema().inputs}
    assert inputs == {"path": AnyType(), "image": AnyType()}  # see model_signature
    # a device given at load time reaches the model (a bad one is refused by name)
    assert pyfunc.model_config == {"device": "auto"}
    on_cpu = mlflow.pyfunc.load_model(trained.alias_uri, model_config={"device": "cpu"})
    assert on_cpu.model_config == {"device": "cpu"}
    assert on_cpu.predict(pd.DataFrame({"path": paths[:2]}))["bpd"].tolist() == \
        expected["bpd"].tolist()[:2]
    with pytest.raises(Exception, match="unknown device 'tpu'; use auto, cpu, cuda or cuda:N"):
        mlflow.pyfunc.load_model(trained.alias_uri, model_config={"device": "tpu"})
    # null is the default, auto; a missing CUDA is said in the words the device was set in
    assert mlflow.pyfunc.load_model(trained.alias_uri, model_config={"device": None}).predict(
        pd.DataFrame({"path": paths[:1]}))["bpd"].tolist() == expected["bpd"].tolist()[:1]
    if not torch.cuda.is_available():
        with pytest.raises(Exception, match='the model_config "device" cuda was asked for but '
                                            'CUDA is not available on this machine; use the '
                                            'model_config "device" cpu or auto'):
            mlflow.pyfunc.load_model(trained.alias_uri, model_config={"device": "cuda"})
        # `mlflow models serve` takes it from the environment: the advice names that
        monkeypatch.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", '{"device": "cuda"}')
        with pytest.raises(Exception, match="MLFLOW_PYFUNC_INFERENCE_CONFIG's \"device\" "
                                            "cuda was asked for but CUDA is not available"):
            mlflow.pyfunc.load_model(trained.alias_uri)
        # a load's own model_config wins over the environment: the advice names it
        monkeypatch.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", '{"device": "cpu"}')
        with pytest.raises(Exception, match='the model_config "device" cuda was asked for'):
            mlflow.pyfunc.load_model(trained.alias_uri, model_config={"device": "cuda"})
        monkeypatch.delenv("MLFLOW_PYFUNC_INFERENCE_CONFIG")
    assert by_path["score"].equals(by_path["bpd"])  # uncalibrated: score is bpd
    assert by_path["p_value"].isna().all() and by_path["is_anomaly"].isna().all()
    assert (by_path["error"][:-1] == "").all()
    assert np.isnan(by_path["bpd"].iloc[-1]) and by_path["error"].iloc[-1]

    # a misnamed column reaches the model as no column at all: refused, not 0 rows
    with pytest.raises(ValueError, match="but the model needs a 'path'"):
        pyfunc.predict(pd.DataFrame({"Path": paths}))
    assert len(pyfunc.predict(pd.DataFrame({"path": pd.Series([], dtype=str)}))) == 0

    threshold = float(np.median(expected["bpd"]))
    decided = pyfunc.predict(pd.DataFrame({"path": paths}), params={"threshold": threshold})
    assert decided["is_anomaly"].tolist() == (expected["bpd"] > threshold).tolist()

    # a cell that cannot name an image is an error in its own row, not a failed request
    png = files[0].read_bytes()
    mixed = pyfunc.predict(pd.DataFrame({"image": [png, base64.b64encode(png).decode(),
                                                   base64.encodebytes(png).decode(),
                                                   paths[1]]}))
    assert mixed["bpd"].tolist()[:3] == [expected["bpd"].iloc[0]] * 3  # line breaks allowed
    assert mixed["error"].tolist() == ["", "", "", "the 'image' value is text but not base64; "
                                       "pass the image file's bytes (or its path in the "
                                       "'path' column)"]
    # a path column that is not all text (a missing value makes pandas' column float):
    # each cell answered in its row, where MLflow used to refuse the whole call
    odd = pyfunc.predict(pd.DataFrame({"path": [np.nan, 1.5, None, paths[0]]}, dtype=object))
    assert odd["error"].tolist() == [
        "no image given (empty value)", "the 'path' value is a float (1.5), not a string; "
        "pass one file path per row", "no image given (empty value)", ""]
    assert odd["bpd"].iloc[3] == expected["bpd"].iloc[0]
    assert pyfunc.predict(pd.DataFrame({"path": [np.nan]}))["error"].tolist() == [
        "no image given (empty value)"]
    # MLflow makes a dict of strings one row of a list: answered a row per path
    listed = pyfunc.predict({"path": paths[:2]})
    assert listed["bpd"].tolist() == expected["bpd"].tolist()[:2]
    assert listed["error"].tolist() == ["", ""]
    # a list in one row of a real table is no path: an error in its row
    nested = pyfunc.predict(pd.DataFrame({"path": [paths[:2], paths[2]]}))
    assert nested["error"].iloc[0].startswith("the 'path' value is a list (['")
    assert nested["error"].iloc[0].endswith("not a string; pass one file path per row")
    assert nested["error"].iloc[1] == ""
    # the answer keeps the request's index, so it lines up with (and joins onto) it
    frame = pd.DataFrame({"path": paths[:3]}, index=[10, 5, 7])
    joined = frame.join(pyfunc.predict(frame))
    assert joined["bpd"].tolist() == expected["bpd"].tolist()[:3]


_NO_UNPICKLING = """
import sys
sys.modules["_pickle"] = None  # pickle falls back to its Python unpickler, patched below
import pickle


def refuse(*args, **kwargs):
    raise RuntimeError("something was unpickled while loading the model")


pickle._Unpickler.load = refuse
import json

import mlflow
import pandas as pd

from anomaly_flow import tracking

uri, paths = sys.argv[1], sys.argv[2:]
tracking.configure(None)
loaded = tracking.load_model(uri)
frame = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"path": paths}))
print(json.dumps({"config": loaded.model.config.to_dict(), "bpd": frame["bpd"].tolist()}))
"""


def test_loading_a_model_never_unpickles(trained: TrainedModel, image_dirs: ImageDirs,
                                         tracking_env: dict[str, str]) -> None:
    # a fresh process where any unpickling raises loads the registered model with the
    # library and as a pyfunc, and scores: the same numbers as here
    paths = [str(p) for p in image_dirs.files(image_dirs.test_normal)[:4]]
    env = {**tracking_env, "MLFLOW_TRACKING_URI": trained.tracking_uri}
    done = subprocess.run([sys.executable, "-c", _NO_UNPICKLING, trained.alias_uri, *paths],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    loaded = tracking.load_model(trained.alias_uri)
    assert result["config"] == loaded.model.config.to_dict()
    assert result["bpd"] == library_scores(loaded.model, paths)["bpd"].tolist()
    # and the unpickler really is refused in such a process
    probe = subprocess.run(
        [sys.executable, "-c", _NO_UNPICKLING.split("import json")[0]
         + "pickle.loads(pickle.dumps(1))"], capture_output=True, text=True, check=False)
    assert probe.returncode != 0 and "something was unpickled" in probe.stderr
