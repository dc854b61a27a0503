"""Tests for anomaly_flow.fingerprint, on real image files written to disk."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from anomaly_flow.fingerprint import fingerprint
from anomaly_flow.folders import find_images
from tests.test_data import rgb_pattern, save


def test_fingerprint_follows_content_and_names_only(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    for i in range(3):
        save(rgb_pattern(10 + i, 10), a / f"{i}.png")
    (a / "dangling.png").symlink_to("nowhere.png")
    paths = find_images(a)
    digest = fingerprint(paths, a)
    assert len(digest) == 64 and digest == fingerprint(paths[::-1], a)
    shutil.copytree(a, b, symlinks=True)
    assert fingerprint(find_images(b), b) == digest  # copied elsewhere: same data
    os.utime(a / "0.png", (0, 0))
    assert fingerprint(paths, a) == digest  # touched: same data
    (a / "0.png").write_bytes((a / "0.png").read_bytes()[:-1] + b"\1")
    assert fingerprint(paths, a) != digest
    (b / "1.png").rename(b / "renamed.png")
    assert fingerprint(find_images(b), b) != digest
    assert fingerprint(paths[:-1], a) != fingerprint(paths, a)
