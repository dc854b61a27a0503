"""The main job end to end: ``anomaly-flow demo`` on the shipped sample, for real."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from anomaly_flow.cli import main
from anomaly_flow.data import load_sample


@pytest.mark.slow
def test_demo_trains_calibrates_scores_and_reports(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        main, ["demo", "--out", str(out), "--preset", "tiny", "--epochs", "1",
               "--device", "cpu"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "models:/fashion-sneaker@champion" in result.output
    assert "mlflow ui --backend-store-uri sqlite:///" in result.output

    sample = load_sample()
    table = pd.read_csv(out / "scores.csv", keep_default_na=False, na_values=[""])
    assert len(table) == len(sample.test_images)
    assert table["error"].isna().all()
    is_anomalous = table["path"].str.contains("/anomalous/")
    assert is_anomalous.sum() == sample.test_is_anomaly.sum()
    # Calibrated on the default score, ensemble; every verdict follows its threshold.
    np.testing.assert_array_equal(table["score"], table["ensemble"])
    assert table["is_anomaly"].notna().all()
    assert (table["p_value"] > 0).all()

    page = (out / "report.html").read_text()
    for heading in ("Summary", "Every score", "Most anomalous test images"):
        assert heading in page
    for name in ("bpd", "complexity", "coarse_complexity", "typicality", "knn", "ensemble",
                 "level_1"):
        assert f"<td class='l'>{name}</td>" in page, name
    assert "data:image/png;base64," in page  # self-contained: figures inlined
    assert "src='http" not in page and 'src="http' not in page
    assert len(list((out / "heatmaps").rglob("*.png"))) == len(table)
    assert "in their standard deviations (bright = unlike a normal image)" in page
    assert (out / "mlruns" / "mlflow.db").is_file()
