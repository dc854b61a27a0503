"""The advisory lock every guarded place shares: who holds it, and what another open of
the same file gets."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from anomaly_flow import file_lock

pytestmark = pytest.mark.skipif(not file_lock.SUPPORTED, reason="no flock on this platform")


def test_a_second_open_of_a_held_lock_is_refused_and_told_who_holds_it(tmp_path: Path) -> None:
    path = tmp_path / ".out.lock"
    with open(path, "a+") as first, open(path, "a+") as second:
        assert file_lock.lock(first)
        file_lock.claim(first)
        assert not file_lock.lock(second)
        assert file_lock.holder(second) == f"pid {os.getpid()} on {socket.gethostname()}"
        file_lock.unlock(first)
        assert file_lock.lock(second, wait=True)


def test_a_claim_replaces_the_last_holder_and_an_empty_file_names_nobody(
        tmp_path: Path) -> None:
    path = tmp_path / ".out.lock"
    path.write_text("pid 1 on a-much-longer-host-name-than-this-one\n")
    with open(path, "a+") as handle:
        file_lock.claim(handle)
    assert path.read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
    path.write_text("")
    with open(path) as handle:
        assert file_lock.holder(handle) == "another process"
