"""The packaged model: a Glow with its calibration behind MLflow's pyfunc interface.

The model is logged *from code* (``model_code.py`` calls ``mlflow.models.set_model``), so
loading it executes this package's code and reads ``config.json``, ``model.safetensors``
and the optional ``calibration.json``: nothing is unpickled.

Input: a DataFrame with a ``path`` column (image files readable where the model runs, as
paths or ``file:`` URIs)
and/or an ``image`` column (encoded file bytes; base64 in JSON requests). Where a row has
both, the bytes win. Output: one row per input row, in order, with ``bpd``,
``complexity``, ``coarse_complexity``, ``typicality``, ``knn``, ``pixel_knn``, ``ensemble``
(models with a normal reference), ``level_1..level_L``, ``score``, ``p_value``, ``is_anomaly`` and
``error`` (see :func:`predict_frame`).

Params at predict time: ``threshold`` (decide ``score > threshold`` instead of the
calibrated threshold; also works on an uncalibrated model, whose score is ``bpd``) and
``batch_size``. A request without an image column, with columns of different lengths,
with a bad param or with a batch that does not fit in memory raises
:class:`PredictError` (HTTP 400 over REST). Behind MLflow's REST server a missing number
is None (``null``), not NaN (see :func:`_json_safe`).

``model_config={"device": "cpu"|"cuda"|"auto"}`` at load time (or the
``MLFLOW_PYFUNC_INFERENCE_CONFIG`` environment variable for ``mlflow models serve``)
picks the device; the default, ``auto``, is CUDA where there is one.

A model reads any file its process can: where the ones sending paths are not trusted with
that (a REST server), ``ANOMALY_FLOW_PATH_ROOT`` at load time confines ``path`` values to
one folder (see :func:`path_root`).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import reprlib
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import AnyType, ColSpec, DataType, ParamSchema, ParamSpec, Schema

from anomaly_flow.calibration import Calibration, check_fitted_to
from anomaly_flow.calibration_checks import CalibrationError
from anomaly_flow.data import InvalidSource, undisplayed_path
from anomaly_flow.glow import CONFIG_FILE, WEIGHTS_FILE, Glow, ModelFileError
from anomaly_flow.score_table import DECISION_COLUMNS
from anomaly_flow.scoring import (
    BatchOutOfMemory,
    ScoringDataset,
    apply_calibration,
    score_dataset,
    score_names,
)
from anomaly_flow.train import resolve_device

logger = logging.getLogger(__name__)

GLOW_ARTIFACT = "glow"
"""Name of the pyfunc artifact: a folder written by ``Glow.save`` (+ ``calibration.json``)."""

CALIBRATION_FILE = "calibration.json"
DEFAULT_BATCH_SIZE = 256

PATH_ROOT_VARIABLE = "ANOMALY_FLOW_PATH_ROOT"

_SCORING = threading.Lock()
"""Held by each ``predict``, so that a server's requests are scored one at a time: the
scoring they would share takes turns anyway (its precision settings are the process's,
:func:`anomaly_flow.scoring.numerics`), and requests in between each other's batches would
hold several batches in the device's memory at once, where ``batch_size`` promises one."""


class ModelLoadError(ValueError):
    """The model cannot load as its environment asks (a bad ``ANOMALY_FLOW_PATH_ROOT``)."""


class PredictError(MlflowException, ValueError):
    """A request the model cannot answer (no image column, a bad param, a batch too large
    for memory). An ``MlflowException`` so that a REST client gets its message with HTTP
    400, where a plain exception would reach it as MLflow's generic "unexpected error"."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def output_columns(model: Glow) -> list[str]:
    """Columns of the prediction frame, in order."""
    return [*score_names(model), *DECISION_COLUMNS]


def model_signature(model: Glow) -> ModelSignature:
    """The explicit signature: optional ``path``/``image`` inputs, the score columns out,
    and the ``threshold`` and ``batch_size`` params.

    ``is_anomaly`` is declared a double although ``predict`` returns True, False or None
    (so a REST answer has ``true``, ``false`` or ``null``): ``mlflow.pyfunc.spark_udf``
    takes its column types from here and casts each column with numpy, which turns a
    missing boolean into False, so an unreadable file would read as "not anomalous". As
    a double, Spark gets 1.0, 0.0 or null.

    ``image`` is declared ``Any``, not ``binary``: MLflow's REST server decodes the base64
    of a binary column for the whole request before the model sees it, so one empty
    (null) or mangled cell would fail every row with HTTP 400. Declared ``Any``, bytes
    (Python, Spark) and base64 text (REST) reach :func:`input_sources`, which decodes
    each cell and turns a bad one into an error in its own row. ``path`` likewise: as a
    string column, MLflow would cast a null (or NaN, or a number) in the ``inputs`` and
    ``instances`` request formats to the text "None" ("nan", "2.5"), a file name that
    may exist in the server's folder, and would refuse a whole Python call whose column
    is not text; as ``Any``, such a cell gets its own row's error.
    """
    inputs = Schema([
        ColSpec(AnyType(), "path", required=False),
        ColSpec(AnyType(), "image", required=False),
    ])
    doubles = [*score_names(model), "score", "p_value"]
    outputs = Schema([
        *(ColSpec(DataType.double, name) for name in doubles),
        ColSpec(DataType.double, "is_anomaly", required=False),
        ColSpec(DataType.string, "error"),
    ])
    params = ParamSchema([
        ParamSpec("threshold", DataType.double, None),
        ParamSpec("batch_size", DataType.long, DEFAULT_BATCH_SIZE),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _missing(value: Any) -> bool:
    """None, NA, NaN, or an empty (or blank) string or bytes: no image given."""
    if value is None or value is pd.NA:
        return True
    if isinstance(value, str | bytes | bytearray):
        return not value.strip()
    return isinstance(value, float) and np.isnan(value)


def input_sources(frame: pd.DataFrame, root: str | None = None,
                  ) -> list[str | bytes | InvalidSource | None]:
    """One image source per row: the ``image`` bytes where given, else the ``path``
    (confined to the folder ``root`` where one is given, see :func:`path_root`); a cell
    of another type becomes an :class:`InvalidSource`, an error in its own row."""
    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    n = len(frame)
    if "path" not in frame.columns and "image" not in frame.columns:
        # MLflow drops the columns the signature does not name before predict sees them,
        # rows and all: a misnamed column ('Path') arrives as a frame without columns
        # or rows, which must not pass for an empty request
        if len(frame.columns):
            named = f"has columns {list(frame.columns)}"
        else:
            alike = ("; an empty request, or a plain list of values that is no table, reads "
                     "the same" if not n else "")
            named = ("has no 'path' or 'image' column (MLflow drops every column the "
                     "model's signature does not name, a misspelt one too, before the model "
                     f"sees the input{alike})")
        raise PredictError(f"the input {named}, but the model needs a 'path' (string) or "
                           "an 'image' (bytes) column; pass one of them, with one row per "
                           "image")
    paths = frame["path"].tolist() if "path" in frame.columns else [None] * n
    images = frame["image"].tolist() if "image" in frame.columns else [None] * n
    sources: list[str | bytes | InvalidSource | None] = []
    for path, image in zip(paths, images, strict=True):
        if not _missing(image):
            sources.append(_image_source(image))
        elif not _missing(path):
            sources.append(_path_source(path, root))
        else:
            sources.append(None)
    return sources


def rows_from_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with one row per image where MLflow packed a whole column into one cell.

    MLflow's schema enforcement turns a dict whose values are all lists of strings (the
    columnar ``{"inputs": {"path": ["a.png", "b.png"]}}`` of a REST request, or
    ``predict({"path": [...]})`` in Python) into a frame of *one* row holding the lists,
    where a list with a null in it gives a row per item: without this, a request of
    paths (or base64 images) only would be answered by one row that says "the 'path'
    value is a list", and an empty ``{"path": []}`` by one failed row. A one-row frame
    whose ``path``/``image`` cells are equally long lists of strings or nulls (the others
    empty) is unpacked into a row per item, index 0..n-1. A list is never one image, so no
    answer with a score in it changes; numpy arrays, as a Spark array column gives them,
    stay an error in their row (Spark needs one row out per row in).

    Raises:
        PredictError: The cells are lists of different lengths (one row back would have
            dropped the images of the longer one).
    """
    if not isinstance(frame, pd.DataFrame) or len(frame) != 1:
        return frame
    cells = {name: frame[name].iloc[0] for name in ("path", "image") if name in frame.columns}
    lists = {name: cell for name, cell in cells.items()
             if isinstance(cell, list)
             and all(isinstance(item, str) or item is None for item in cell)}
    if not lists:
        return frame
    if len({len(cell) for cell in lists.values()}) != 1:  # not one image per row: refused
        lengths = " and ".join(f"{len(cell)} in {name!r}" for name, cell in lists.items())
        raise PredictError(f"the input's columns hold lists of different lengths ({lengths}), "
                           "so its rows cannot be told apart; give every column one value "
                           "per image, null where an image has none")
    if any(not _missing(cell) for name, cell in cells.items() if name not in lists):
        return frame
    n = len(next(iter(lists.values())))
    return pd.DataFrame({name: lists.get(name, [None] * n) for name in cells}, dtype=object)


_DATA_URI = re.compile(r"data:[^,]*;base64,", re.IGNORECASE)
"""The head of a ``data:`` URI (``data:image/png;base64,...``), what a browser's
``FileReader.readAsDataURL`` and ``<canvas>.toDataURL`` give."""

_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=\s]+")
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")
"""How the image files anomaly-flow reads begin: bytes that are base64 *text* of one
(``base64.b64encode(data)`` without ``.decode()``) are taken as what they encode."""


def _image_source(value: Any) -> bytes | InvalidSource:
    """An ``image`` cell: the encoded file's bytes, or text holding them in base64 (what a
    REST request carries for a binary column; a ``data:`` URI's head is dropped), or bytes
    holding base64 text of an image file."""
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        if _BASE64_TEXT.fullmatch(data):  # never an image file's own bytes
            try:
                decoded = base64.b64decode(b"".join(data.split()), validate=True)
            except ValueError:
                return data
            if decoded.startswith(_IMAGE_MAGIC):
                return decoded
        return data
    if isinstance(value, str):
        text = "".join(value.split())
        if head := _DATA_URI.match(text):
            text = text[head.end():]
        try:
            # line breaks allowed, as `base64` and encodebytes write them
            return base64.b64decode(text, validate=True)
        except ValueError:  # binascii.Error
            return InvalidSource("the 'image' value is text but not base64; pass the image "
                                 "file's bytes (or its path in the 'path' column)")
    return InvalidSource(f"the 'image' value is {_described(value)}, not bytes; pass one "
                         "image file's bytes per row")


_FILE_URI = re.compile(r"file:(?://(?:localhost)?(?=/)|(?=/(?!/)))", re.IGNORECASE)
"""``file:/x``, ``file:///x`` and ``file://localhost/x`` (RFC 8089), as Spark's
``binaryFile`` source and ``input_file_name()`` give local files; not ``file://HOST/x``,
another host's file, which the URI message below answers."""

_OTHER_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")

_PATH_REPR = reprlib.Repr()
_PATH_REPR.maxstring = 240  # a path in a row's error whole, as a rule (the row has no name)


def _path_source(value: Any, root: str | None = None) -> str | InvalidSource:
    """A ``path`` cell: a string (or path object) naming one file, or a ``file:`` URI of
    one; a name that is not UTF-8 as a scores table prints it (``\\xff`` escapes) is
    taken back. With ``root`` (a real path), see :func:`_confined`."""
    if isinstance(value, str | os.PathLike):
        text = str(value)
        readings = _readings(text)
        if root is not None:
            return _confined(text, readings, root)
        chosen = next((reading for reading in readings if os.path.lexists(reading)),
                      readings[-1])
        if len(readings) == 1 and _OTHER_URI.match(text) and not os.path.lexists(text):
            return _uri_refused(text)
        return undisplayed_path(chosen)
    if isinstance(value, bytes | bytearray | memoryview):
        return InvalidSource(
            f"the 'path' value is {_described(value)}, not a string; to score an image's "
            "bytes, pass them in the 'image' column (spark_udf names unnamed columns in "
            "the signature's order, path first: call it with "
            "struct(col(...).alias('image')))")
    return InvalidSource(f"the 'path' value is {_described(value)}, not a string; pass one "
                         "file path per row")


def _uri_refused(text: str) -> InvalidSource:
    return InvalidSource(
        f"the 'path' value is a URI ({reprlib.repr(text)}); the model reads local files "
        "only: copy the files where it runs, or pass their bytes in the 'image' column "
        "(Spark's binaryFile source has them as 'content')")


def _readings(text: str) -> list[str]:
    """What a ``path`` value may name, in the order tried (the first that exists wins,
    else the last): as given, and for a ``file:`` URI its path, then that path
    ``%``-decoded (Spark writes a space in a name as ``%20``)."""
    if local := _FILE_URI.match(text):
        return [text, text[local.end():], urllib.parse.unquote(text[local.end():])]
    return [text]


def _confined(text: str, readings: list[str], root: str) -> str | InvalidSource:
    """The file a ``path`` value names under ``root`` (:func:`path_root`), as
    :func:`_path_source` reads one without a root but looked up under ``root`` alone: a
    relative path is taken under it, and the value's :func:`_readings` are tried in
    order (each with its ``\\xff`` escapes taken back where that file exists), the first
    that exists winning.
    A reading that leads out of ``root`` (an absolute path elsewhere, ``..``, a link)
    refuses the value, quoted as given, whether or not any file exists there; so does a
    value no file name can be (a NUL, a lone surrogate)."""
    inside = ""
    try:
        for reading in readings:
            inside = os.path.realpath(undisplayed_path(os.path.join(root, reading)))
            if os.path.commonpath([root, inside]) != root:
                return InvalidSource(
                    f"the 'path' value {_PATH_REPR.repr(text)} is outside the one folder "
                    f"this model reads ({PATH_ROOT_VARIABLE}); pass a path under it, "
                    "relative to it or whole, or the file's bytes in the 'image' column")
            if os.path.lexists(inside):
                return inside
    except ValueError:  # a NUL or a lone surrogate; on Windows, another drive
        return InvalidSource(f"the 'path' value {_PATH_REPR.repr(text)} is not a file name "
                             "this model can read (it holds a NUL character, a lone "
                             "surrogate, or another drive's name)")
    if len(readings) == 1 and _OTHER_URI.match(text):
        return _uri_refused(text)
    return inside


def _described(value: Any) -> str:
    kind = type(value).__name__
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} ({reprlib.repr(value)})"


def predict_frame(model: Glow, calibration: Calibration | None, frame: pd.DataFrame, *,
                  threshold: float | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                  root: str | None = None) -> pd.DataFrame:
    """Score the images a frame names; what the pyfunc's ``predict`` returns.

    Args:
        model: The Glow, in eval mode, on its device.
        calibration: Turns scores into p-values and verdicts; ``None`` leaves
            ``p_value`` NaN and ``is_anomaly`` None (``score`` is then ``bpd``).
        frame: ``path`` and/or ``image`` columns, one image per row.
        threshold: Overrides the calibrated threshold: ``is_anomaly = score > threshold``.
        batch_size: Images per forward pass.
        root: The one folder ``path`` values may name files in (:func:`path_root`).

    Returns:
        One row per input row, columns :func:`output_columns`, with the frame's index;
        a row whose image cannot be read has NaN scores, ``is_anomaly`` None and the
        reason in ``error``.

    Raises:
        CalibrationError: ``calibration`` was fitted to another model
            (:attr:`~anomaly_flow.calibration.Calibration.model_digest`).
    """
    if calibration is not None:
        check_fitted_to(calibration, model.digest(), advice=(
            "predict with the calibration loaded with this model (load_model(URI)"
            ".calibration), or calibrate this model (anomaly-flow calibrate)"))
    return _predict_frame(model, calibration, frame, threshold=threshold,
                          batch_size=batch_size, root=root)


def _predict_frame(model: Glow, calibration: Calibration | None, frame: pd.DataFrame, *,
                   threshold: float | None, batch_size: int,
                   root: str | None) -> pd.DataFrame:
    """:func:`predict_frame` without its check of the pair, which the pyfunc made once,
    when it loaded them (it is not repeated for each request)."""
    cfg = model.config
    dataset = ScoringDataset(input_sources(frame, root), cfg)
    scores = score_dataset(model, dataset, batch_size=batch_size, progress=False)
    out = apply_calibration(scores, calibration)
    verdict = out["is_anomaly"].astype(object).where(out["is_anomaly"].notna(), None)
    if threshold is not None:
        values = out["score"].to_numpy(dtype=float)
        verdict = pd.Series([bool(v > threshold) if np.isfinite(v) else None for v in values],
                            index=out.index, dtype=object)
    out["is_anomaly"] = verdict
    result = out[output_columns(model)].reset_index(drop=True)
    if isinstance(frame, pd.DataFrame):  # row i answers the frame's row i, label and all
        result.index = frame.index
    return result


def load_calibration(folder: Path, model: Glow) -> Calibration | None:
    """The ``calibration.json`` beside the saved Glow ``model`` (loaded from ``folder``),
    or None when uncalibrated.

    Raises:
        ModelFileError: The file is there but is not a calibration (damaged, cut short,
            edited by hand), calibrates a score ``model`` does not produce, or was fitted
            to other weights than ``model``'s (found here, the model refuses to load;
            found by scoring, every request of a served model failed, and a REST client
            was told its input was at fault); the message names the file.
    """
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return None
    advice = ("copy or download the model again, or calibrate the uncalibrated version "
              "again (anomaly-flow calibrate)")
    try:
        calibration = Calibration.from_json(path.read_text())
    except (CalibrationError, UnicodeDecodeError) as exc:
        raise ModelFileError(
            f"{path} is not a calibration anomaly-flow can read ({str(exc).rstrip('.')}); "
            f"{advice}") from None
    produced = score_names(model)
    if calibration.score_name not in produced:
        raise ModelFileError(
            f"{path} calibrates score {calibration.score_name!r}, which this model does not "
            f"produce (its scores: {', '.join(produced)}); {advice}")
    fitted, digest = calibration.model_digest, model.digest()
    if fitted is not None and fitted != digest:
        raise ModelFileError(
            f"{path} was fitted to another model than the {CONFIG_FILE} and "
            f"{WEIGHTS_FILE} beside it (its digest {fitted[:12]}..., theirs "
            f"{digest[:12]}...): they were replaced after calibration, so its threshold and "
            "p-values do not hold for them; put back the files it was calibrated with, or "
            "delete it to score uncalibrated and calibrate a registered version of this "
            "model (anomaly-flow calibrate --model models:/NAME/VERSION)")
    return calibration


class GlowPyfunc(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper. ``model_config={"device": "cpu"|"cuda"|"auto"}`` picks where
    it runs (default: CUDA when available)."""

    model: Glow
    calibration: Calibration | None
    root: str | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        folder = Path(context.artifacts[GLOW_ARTIFACT])
        device = (context.model_config or {}).get("device")
        # unset or null: auto; named as a load's model_config, or MLFLOW_PYFUNC_INFERENCE_CONFIG
        # for `mlflow models serve`, not as a command's --device
        given_by = ("MLFLOW_PYFUNC_INFERENCE_CONFIG's"
                    if device is not None and device == _environment_device()
                    else "the model_config")
        self.model = Glow.load(folder, resolve_device(
            "auto" if device is None else device, option=f'{given_by} "device"'))
        self.calibration = load_calibration(folder, self.model)
        self.root = path_root()

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        params = params or {}
        threshold = params.get("threshold")
        given = params.get("batch_size")
        batch_size = DEFAULT_BATCH_SIZE if given is None else int(given)
        if threshold is not None and not np.isfinite(float(threshold)):
            raise PredictError(f"the threshold param must be a finite score, not "
                               f"{threshold!r}; leave it out to decide by the calibrated "
                               "threshold")
        if batch_size < 1:
            raise PredictError(f"the batch_size param must be a positive number of "
                               f"images, not {given!r}; leave it out for "
                               f"{DEFAULT_BATCH_SIZE}")
        try:
            with _SCORING:
                frame = _predict_frame(self.model, self.calibration,
                                      rows_from_columns(model_input),
                                      threshold=None if threshold is None else float(threshold),
                                      batch_size=batch_size, root=self.root)
        except BatchOutOfMemory as exc:  # as any other exception, REST would lose the advice
            raise PredictError(exc.advice(option="the batch_size param")) from None
        return _json_safe(frame) if _serving() else frame


def _environment_device() -> Any:
    """The ``device`` that ``MLFLOW_PYFUNC_INFERENCE_CONFIG`` sets (what ``mlflow models
    serve`` is given), or None: to name it in advice where the device came from there
    (a load's own ``model_config`` wins over it)."""
    try:
        config = json.loads(os.environ.get("MLFLOW_PYFUNC_INFERENCE_CONFIG") or "{}")
    except ValueError:
        return None
    return config.get("device") if isinstance(config, dict) else None


def path_root() -> str | None:
    """The folder ``ANOMALY_FLOW_PATH_ROOT`` names (its real path), or None where it is
    unset or empty. Read when a model loads: a served model then reads files under it
    only, takes a relative ``path`` under it (not under the server's working folder),
    and answers a path outside it with the same error whether that file exists or not.

    Raises:
        ModelLoadError: It names no folder.
    """
    given = os.environ.get(PATH_ROOT_VARIABLE, "")
    if not given.strip():
        return None
    root = os.path.realpath(given)
    if not os.path.isdir(root):
        raise ModelLoadError(f"{PATH_ROOT_VARIABLE} is {given!r}, which is not a folder; set "
                             "it to the folder whose images the model may read, or unset it "
                             "to let the model read any file its process can")
    return root


def _serving() -> bool:
    """Whether MLflow's REST server (or ``mlflow models predict``) runs this process: the
    flag it sets for its own use, read from the environment rather than imported, so
    that an MLflow without it leaves NaN in answers instead of failing to load models."""
    return os.environ.get("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "").strip().lower() in (
        "true", "1")


def _json_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with None for its NaNs, for a REST answer (``mlflow models serve``, and
    ``mlflow models predict``, which set MLflow's serving flag): MLflow writes a NaN as the
    bare ``NaN`` that strict JSON parsers (a browser's ``JSON.parse``, Go, Java) refuse,
    and None as ``null``. In Python and Spark the columns stay float64 with NaN."""
    safe = frame.astype(object)
    return safe.where(frame.notna(), None)
