"""anomaly-flow: image anomaly detection by exact likelihood under a Glow normalizing flow.

The library: :mod:`anomaly_flow.glow` (the model), :mod:`anomaly_flow.data`,
:mod:`anomaly_flow.train`, :mod:`anomaly_flow.scoring`, :mod:`anomaly_flow.folder_scoring`,
:mod:`anomaly_flow.calibration`, :mod:`anomaly_flow.evaluation` and
:mod:`anomaly_flow.tracking` (MLflow); the ``anomaly-flow`` command is
:mod:`anomaly_flow.cli`.

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
