"""Everything MLflow: the store, runs, the packaged model, the registry, training runs.

This package is the only place that imports ``mlflow``; the model, training and scoring
code report through plain return values and callbacks.

- :mod:`.store`: the tracking URI (:func:`default_tracking_uri`, :func:`configure`) and
  experiments (:func:`ensure_experiment`).
- :mod:`.runs`: the :class:`Run` handle (:func:`start_run`), and what a stopped or
  failed command says of the runs and versions it made (:func:`stop_advice`).
- :mod:`.pyfunc` and ``model_code.py``: the pyfunc model logged from code.
- :mod:`.models`: :func:`log_model`, :func:`register_model`, :func:`set_alias`,
  :func:`claim_model_name`,
  :func:`register_calibrated_version`, :func:`load_model` (:class:`LoadedModel`).
- :mod:`.training`: :func:`train_and_register` (:class:`TrainOutcome`).

Example:
    >>> from anomaly_flow.config import load_preset
    >>> from anomaly_flow.tracking import load_model, train_and_register
    >>> outcome = train_and_register("parts/", "parts", load_preset("tiny"))  # doctest: +SKIP
    >>> loaded = load_model("models:/parts@candidate")  # doctest: +SKIP
"""

from anomaly_flow.tracking.models import (
    CANDIDATE,
    CHAMPION,
    LoadedModel,
    ModelNotFoundError,
    claim_model_name,
    is_local_model_uri,
    load_model,
    log_model,
    promote_version,
    register_calibrated_version,
    register_model,
    require_store,
    set_alias,
    undo_command,
)
from anomaly_flow.tracking.pyfunc import model_signature, output_columns, predict_frame
from anomaly_flow.tracking.runs import (
    Run,
    failure_advice,
    flatten,
    git_commit,
    start_run,
    stop_advice,
    stop_mark,
)
from anomaly_flow.tracking.store import (
    TrackingError,
    check_store_folder,
    configure,
    configured_uri,
    default_tracking_uri,
    ensure_configured,
    ensure_experiment,
    missing_default_store,
    mlruns_dir,
    redacted,
    require_writable_store,
    ui_command,
    uses_default_store,
)
from anomaly_flow.tracking.training import (
    TrainOutcome,
    checkpoint_dir,
    finished_training,
    interrupted_message,
    precheck_checkpoints,
    precheck_training,
    train_and_register,
    training_concluded,
    training_image_digests,
    training_run_of,
)

__all__ = [
    "CANDIDATE",
    "CHAMPION",
    "LoadedModel",
    "ModelNotFoundError",
    "Run",
    "TrackingError",
    "TrainOutcome",
    "check_store_folder",
    "checkpoint_dir",
    "claim_model_name",
    "configure",
    "configured_uri",
    "default_tracking_uri",
    "ensure_configured",
    "ensure_experiment",
    "failure_advice",
    "finished_training",
    "flatten",
    "git_commit",
    "interrupted_message",
    "is_local_model_uri",
    "load_model",
    "log_model",
    "missing_default_store",
    "mlruns_dir",
    "model_signature",
    "output_columns",
    "precheck_checkpoints",
    "precheck_training",
    "predict_frame",
    "promote_version",
    "redacted",
    "register_calibrated_version",
    "register_model",
    "require_store",
    "require_writable_store",
    "set_alias",
    "start_run",
    "stop_advice",
    "stop_mark",
    "train_and_register",
    "training_concluded",
    "training_image_digests",
    "training_run_of",
    "ui_command",
    "undo_command",
    "uses_default_store",
]
