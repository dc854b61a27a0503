"""anomaly-flow: image anomaly detection by exact likelihood under a Glow normalizing flow.

The library: :mod:`anomaly_flow.glow` (the model), :mod:`anomaly_flow.data`,
:mod:`anomaly_flow.train`, :mod:`anomaly_flow.scoring`, :mod:`anomaly_flow.calibration`,
:mod:`anomaly_flow.evaluation` and :mod:`anomaly_flow.tracking` (MLflow); the
``anomaly-flow`` command is :mod:`anomaly_flow.cli`.
"""

from importlib import metadata

try:
    __version__ = metadata.version("anomaly-flow")
except metadata.PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "unknown"
