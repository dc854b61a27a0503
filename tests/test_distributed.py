"""Tests for anomaly_flow.distributed in one process, without torchrun: what a process
alone answers, and torchrun's environment read when asked, not at import. Training under
torchrun (two gloo processes on the CPU) is tested in ``tests/test_train.py`` (the DDP
section, through ``tests/ddp_worker.py``) and ``tests/test_cli_train.py``."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from anomaly_flow.distributed import (
    join_launch_group,
    join_process_group,
    launch_device,
    launch_rank,
    leave_launch_group,
    share_verdict,
    world_size,
)


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
    leave_launch_group()  # no group: nothing to leave
    assert not dist.is_initialized()


def test_torchrun_environment_is_read_when_called(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launch_rank() == 1 and world_size() == 4
