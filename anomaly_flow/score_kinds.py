"""The names of the scores, apart from the code that computes them (:mod:`anomaly_flow.scoring`),
so that help texts and option checks can name them without loading torch."""

from __future__ import annotations

import re

REFERENCE_SCORES = ("typicality", "knn", "pixel_knn", "ensemble")
"""Scores built on the model's normal reference (:meth:`~anomaly_flow.glow.Glow.set_reference`)."""

LIKELIHOOD_SCORES = ("bpd", "complexity", "coarse_complexity")
"""Scores every model gives (besides its per-level columns ``level_1..level_L``)."""

SCORE_CHOICES = ", ".join([*LIKELIHOOD_SCORES, *REFERENCE_SCORES, "level_1 ... level_L"])
"""Every score name, for messages."""

AUTO_SCORE = "auto"
"""``score=AUTO_SCORE``: choose the score type by AUROC on labelled anomalies."""


def is_score_name(name: str) -> bool:
    """Whether ``name`` is a score some model gives (``level_l`` for any level ``l``)."""
    return (name in (*LIKELIHOOD_SCORES, *REFERENCE_SCORES)
            or re.fullmatch(r"level_[1-9][0-9]*", name) is not None)
