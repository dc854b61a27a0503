"""The advisory lock every guarded place shares: who holds it, and what another open of
the same file gets."""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path

import pytest

from anomaly_flow import file_lock
from anomaly_flow.score_table import output_lock

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


def test_without_flock_or_locks_on_the_file_system_scoring_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Windows has no flock: nothing is held, no lock file is made. NFS without lockd
    refuses locks (ENOLCK): the run goes on, saying that nothing guards its output."""
    out = tmp_path / "scores.csv"
    monkeypatch.setattr(file_lock, "SUPPORTED", False)
    with output_lock(out):
        assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(file_lock, "SUPPORTED", True)

    def no_locks(*args: object) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(file_lock.fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.score_table"), \
            output_lock(out):
        pass
    assert (f"cannot lock {tmp_path / '.scores.csv.lock'} (No locks available), so nothing "
            f"stops a second run from writing {out} meanwhile") in caplog.text
