"""anomaly-flow: image anomaly detection by exact likelihood under a Glow normalizing flow.

The library, by concept; a module imports only from its own group or the groups above:

* the model: :mod:`~anomaly_flow.config` (frozen, validated configurations),
  :mod:`~anomaly_flow.layers` (each bijection with its inverse and log-determinant),
  :mod:`~anomaly_flow.glow` (the multi-scale flow, exact bits/dim and its parts);
* images: :mod:`~anomaly_flow.data` (decoding files, datasets),
  :mod:`~anomaly_flow.folders` (finding the image files below a folder),
  :mod:`~anomaly_flow.survey` (what converting a folder's images drops),
  :mod:`~anomaly_flow.fingerprint` (content digests of folders),
  :mod:`~anomaly_flow.fashion_mnist` (IDX files and the shipped sample);
* calibration, plain functions over arrays: :mod:`~anomaly_flow.calibration_checks` (the
  score and stored-record checks and the CalibrationError they raise),
  :mod:`~anomaly_flow.detection` (AUROC on labelled images, choosing a score type),
  :mod:`~anomaly_flow.calibration` (p-values and thresholds);
* scoring: :mod:`~anomaly_flow.scoring` (batches and datasets),
  :mod:`~anomaly_flow.complexity`, :mod:`~anomaly_flow.heatmap`,
  :mod:`~anomaly_flow.score_table` (the output file),
  :mod:`~anomaly_flow.folder_scoring` (every file of a folder answered);
* training: :mod:`~anomaly_flow.train` (the loop), :mod:`~anomaly_flow.checkpoint`,
  :mod:`~anomaly_flow.distributed` (torchrun);
* :mod:`~anomaly_flow.plots`, then :mod:`~anomaly_flow.tracking`, the only package that
  imports MLflow;
* the workflows over them: :mod:`~anomaly_flow.prechecks`,
  :mod:`~anomaly_flow.evaluation` (calibrating and evaluating a registered model),
  :mod:`~anomaly_flow.report`, :mod:`~anomaly_flow.demo`, and
  :mod:`~anomaly_flow.pipeline_options` for the MLflow-logged scripts in ``pipelines/``;
* :mod:`~anomaly_flow.cli`, the ``anomaly-flow`` command, the only one that imports click.

``anomaly_flow.__version__`` is the installed distribution's version (``unknown`` for a
source tree on ``PYTHONPATH``), looked up when first asked for.
"""


def __getattr__(name: str) -> str:
    # Looked up on first use, not at import: importlib.metadata and its search of the
    # installed distributions would cost every import of the package, `anomaly-flow
    # --help` included (a fifth of its start-up), for a number few commands print.
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import metadata

    try:
        version = metadata.version("anomaly-flow")
    except metadata.PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        version = "unknown"
    globals()["__version__"] = version
    return version
