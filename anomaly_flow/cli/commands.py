"""Imports every command module so that each registers itself on the ``main`` group."""

# One line per command module, added as commands land.
from anomaly_flow.cli import (
    calibrate,  # noqa: F401
    demo,  # noqa: F401
    score,  # noqa: F401
    train,  # noqa: F401
)
