"""``python -m anomaly_flow.cli``: the ``anomaly-flow`` command, as ``python -m anomaly_flow``."""

from anomaly_flow.cli import run

run()
