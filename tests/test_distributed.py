"""Tests for anomaly_flow.distributed in one process, without torchrun: what a process
alone answers, and torchrun's environment read when asked, not at import; and how
``anomaly_flow.errors`` words what torchrun's processes meet (a lost peer, an error every
process meets alike). Training under torchrun (two gloo processes on the CPU) is tested in
``tests/test_train.py`` (the DDP section, through ``tests/ddp_worker.py``),
``tests/test_cli_train.py`` and ``tests/test_torchrun.py``."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from anomaly_flow.distributed import (
    gathered,
    join_launch_group,
    join_process_group,
    launch_device,
    launch_rank,
    leave_launch_group,
    share_verdict,
    world_size,
)
from anomaly_flow.errors import alike_on_every_process, peer_lost, told_nearby


def test_alone_a_process_is_rank_0_of_1_and_joins_no_group(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    cpu = torch.device("cpu")
    assert launch_rank() == 0 and world_size() == 1
    assert launch_device(cpu) == cpu
    assert join_launch_group(cpu) is False
    assert join_process_group(cpu) == (0, 1, False)
    assert not dist.is_initialized()
    # rank 0's verdict is its own: nobody to send it to
    assert share_verdict("refused") == "refused" and share_verdict() is None
    assert gathered(("fingerprint", 3)) == [("fingerprint", 3)]
    leave_launch_group()  # no group: nothing to leave
    assert not dist.is_initialized()


def test_torchrun_environment_is_read_when_called(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launch_rank() == 1 and world_size() == 4


GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read "
              "error [127.0.0.1]:12971: Connection reset by peer. This is typically caused "
              "by a remote worker hanging or bugs in the application. GLHF!")
"""gloo's error (torch 2.13, a plain RuntimeError) in a rank whose peer was killed."""


def test_a_lost_peer_is_told_as_such_under_torchrun_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    told = peer_lost(RuntimeError(GLOO_RESET))
    assert told == ("another process of this torchrun stopped or lost its connection (Read "
                    "error [127.0.0.1]:12971: Connection reset by peer); its own message "
                    "(above, or in its host's log) says why: mend that, then run the same "
                    "command again (a training: with --resume, from its last checkpoint)")
    assert peer_lost(RuntimeError(GLOO_RESET), "resume from step-4").endswith(
        "says why: resume from step-4")
    backend = dist.DistBackendError("NCCL communicator was aborted on rank 0")
    assert peer_lost(backend) is not None and "(NCCL communicator was aborted" in peer_lost(
        backend)
    assert peer_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert peer_lost(ValueError(GLOO_RESET)) is None  # not what a collective raises
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert peer_lost(RuntimeError(GLOO_RESET)) is None  # alone there is no peer


def test_an_error_every_process_meets_is_left_to_local_rank_0(
        monkeypatch: pytest.MonkeyPatch) -> None:
    shared, own = alike_on_every_process(ValueError("no such folder")), ValueError("oom")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not told_nearby(shared) and not told_nearby()  # alone: everything is said
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert told_nearby(shared) and told_nearby()  # a usage error: alike by nature
    assert not told_nearby(own)  # this process's own error is said
    monkeypatch.setenv("LOCAL_RANK", "0")  # each host's first process says it
    assert not told_nearby(shared) and not told_nearby()
    monkeypatch.setenv("LOCAL_RANK", "x")  # not torchrun's: say everything
    assert not told_nearby(shared)
