"""Tests for anomaly_flow.score_table: the scores table on disk, written and read back
without a model (tables that a folder run writes and resumes from are tested in
``tests/test_folder_scoring.py``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anomaly_flow.score_table import ScoringError, read_table, write_table
from tests.conftest import FILE_EDITS, damaged


def test_csv_reads_back_as_pandas_own_csv(tmp_path: Path) -> None:
    # the table's CSV (Arrow's writer) reads back to what pandas' writer gives: floats
    # to the last bit, empty and missing cells, booleans, quotes, commas, line breaks
    rng = np.random.default_rng(0)
    values = rng.standard_normal(300) * 10.0 ** rng.integers(-15, 15, 300)
    values[::7] = np.nan
    table = pd.DataFrame({
        "path": pd.array([f"/data/{i},é \\xff.png" if i % 10 == 0 else f"/data/{i}.png"
                          for i in range(300)], dtype="string"),
        "bpd": values,
        "p_value": np.where(np.arange(300) % 3 == 0, np.nan, rng.random(300)),
        "is_anomaly": pd.array([True, False, None] * 100, dtype="boolean"),
        "error": pd.array(["" if i % 4 else 'cannot decode "x",\nline two' for i in range(300)],
                          dtype="string"),
        # whole numbers only (every image above all calibration scores): still floats
        "whole": np.arange(300) % 3 - 1.0,
        "all_missing": np.full(300, np.nan),
    })
    write_table(table, tmp_path / "ours.csv")
    table.to_csv(tmp_path / "pandas.csv", index=False)
    options = {"keep_default_na": False,
               "na_values": {name: [""] for name in ("bpd", "p_value", "whole", "all_missing")}}
    ours = pd.read_csv(tmp_path / "ours.csv", **options)
    pd.testing.assert_frame_equal(ours, pd.read_csv(tmp_path / "pandas.csv", **options))
    np.testing.assert_array_equal(ours["bpd"].to_numpy(), values)  # bit for bit
    assert ours["is_anomaly"].tolist()[:3] == ["True", "False", ""]
    assert ours["whole"].dtype == ours["all_missing"].dtype == np.float64


def scores_table_bytes(fmt: str) -> bytes:
    """A small scores table as score_folder writes it: scored rows, a failed row with a
    reason holding a comma and quotes, and a path with a line end in its name."""
    names = ["bpd", "complexity", "level_1", "level_2"]
    table = pd.DataFrame({
        "path": ["/data/a.png", "/data/b, \"odd\".png", "/data/c\nd.png", "/data/e.png"],
        "bpd": [3.25, np.nan, 4.5, 2.0], "complexity": [0.5, np.nan, -1.25, 0.0],
        "level_1": [1.0, np.nan, 2.0, 0.5], "level_2": [0.125, np.nan, 0.25, 0.5],
        "score": [3.25, np.nan, 4.5, 2.0], "p_value": np.nan, "is_anomaly": None,
        "error": ["", "truncated image file", "", ""]})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"scores.{fmt}"
        write_table(table[["path", *names, "score", "p_value", "is_anomaly", "error"]], path)
        return path.read_bytes()


TABLES = {fmt: scores_table_bytes(fmt) for fmt in ("csv", "parquet")}


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(sorted(TABLES)), edits=FILE_EDITS)
def test_a_damaged_earlier_output_is_resumed_from_or_refused_clearly(
        tmp_path: Path, fmt: str, edits: list[tuple[str, float, bytes]]) -> None:
    """Whatever a crash, a copy or an editor did to the table, resuming reads what it can
    (rows that are whole and consistent, at most one per path) or refuses with a
    ScoringError that says what to do; never another exception."""
    out = tmp_path / f"damaged.{fmt}"
    out.write_bytes(damaged(TABLES[fmt], edits))
    names = ["bpd", "complexity", "level_1", "level_2"]
    try:
        kept = read_table(out, names)
    except ScoringError as exc:
        assert "\n" not in str(exc) and str(exc).strip()
        return
    assert list(kept.columns) == [*names, "error"] and kept.index.is_unique
    assert kept.index.notna().all()
    scored = kept["error"] == ""
    assert np.isfinite(kept.loc[scored, names].to_numpy()).all()
    assert not np.isfinite(kept.loc[~scored, names].to_numpy()).any()
