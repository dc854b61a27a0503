"""The names of the threshold methods, apart from the code that fits them
(:mod:`anomaly_flow.calibration`), so that help texts and option checks can name them
without loading numpy: the ``anomaly-flow`` CLI offers them as choices before it loads
anything heavy.

Example:
    >>> METHODS
    ('conformal', 'f1', 'youden', 'cost')
"""

from __future__ import annotations

from typing import Literal, get_args

Method = Literal["conformal", "f1", "youden", "cost"]
"""``conformal``: from normal images alone, at a target false-positive rate; ``f1``,
``youden``, ``cost``: from labelled anomalies."""

METHODS: tuple[str, ...] = get_args(Method)
"""Every method, ``conformal`` first."""

LABELLED_METHODS: tuple[str, ...] = tuple(m for m in METHODS if m != "conformal")
"""The methods that need labelled anomalies (``f1``, ``youden``, ``cost``)."""
