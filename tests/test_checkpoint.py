"""Tests for anomaly_flow.checkpoint: checkpoints written, listed and loaded back directly,
on a tiny Glow on the CPU (resuming a training from them is tested in
``tests/test_train.py``)."""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from pathlib import Path

import pytest
import torch

import anomaly_flow.checkpoint as checkpoint_module
from anomaly_flow.checkpoint import (
    TRAINING_STATE_KEYS,
    TrainingError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from anomaly_flow.config import RunConfig
from anomaly_flow.glow import Glow
from tests.test_train import MODEL, run_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_checkpoints_atomic_pruned_and_restore_optimizer_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = run_config()
    model = Glow(MODEL)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(4, 1, 16, 16) - 0.5
    model.initialize(x)
    folder = tmp_path / "ckpt"
    for step in range(1, 5):
        optimizer.zero_grad()
        model.log_prob(x).mean().neg().backward()
        optimizer.step()
        save_checkpoint(folder, model, optimizer, config, step, {"note": step})
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step-00000003",
                                                        "step-00000004"]
    assert latest_checkpoint(folder) == folder / "step-00000004"
    umask = os.umask(0)
    os.umask(umask)
    for path in (folder / "step-00000004").iterdir():  # readable as any file the run writes
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name

    fresh = Glow(MODEL)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    meta = load_checkpoint(folder / "step-00000004", fresh, fresh_opt, config)
    assert meta["step"] == 4 and meta["note"] == 4
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    want, got = optimizer.state_dict(), fresh_opt.state_dict()
    assert want["param_groups"] == got["param_groups"]
    for pid, state in want["state"].items():
        for key, value in state.items():
            restored = got["state"][pid][key]
            assert restored.dtype == value.dtype and restored.device == value.device
            assert torch.equal(restored, value), (pid, key)

    # A pointer naming a missing folder (killed between two renames): fall back to the
    # newest complete checkpoint.
    (folder / "latest").write_text("step-00000009")
    assert latest_checkpoint(folder) == folder / "step-00000004"

    # A damaged file (a disk error, a copy cut short): one line naming the checkpoint and
    # the way out, for each of its files.
    newest = folder / "step-00000004"
    for name in ("model.safetensors", "optimizer.safetensors", "state.json",
                 "run_config.json"):
        kept = (newest / name).read_bytes()
        (newest / name).write_bytes(kept[: len(kept) // 2])
        with pytest.raises(TrainingError, match=rf"the checkpoint {re.escape(str(newest))} "
                                                r"is damaged or incomplete \(.+\); delete "
                                                "that folder to resume from the checkpoint "
                                                "before it"):
            load_checkpoint(newest, Glow(MODEL), torch.optim.Adam(
                Glow(MODEL).parameters()), config)
        (newest / name).write_bytes(kept)


def test_a_tampered_checkpoint_folder_is_a_one_line_error_or_a_fallback(
        tmp_path: Path) -> None:
    """A pointer that is not text (a UnicodeDecodeError traceback, even for a fresh
    training) or names a folder outside the checkpoint folder falls back to the newest
    complete checkpoint there; a state.json or run_config.json that is valid JSON but not
    what a checkpoint holds (a KeyError traceback; a config error naming no file) is the
    damaged-checkpoint message."""
    config = run_config()
    model = Glow(MODEL)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.initialize(torch.rand(4, 1, 16, 16) - 0.5)
    folder = tmp_path / "ckpt"
    extra = {"skipped_steps": 0, "nonfinite_run": 0, "train_bpd": 1.0, "epoch_bpd_sum": 0.0,
             "epoch_images": 0, "history": [], "failed_files": {}}
    for step in (1, 2):
        save_checkpoint(folder, model, optimizer, config, step, extra)
    newest = folder / "step-00000002"
    elsewhere = tmp_path / "other" / "step-00000001"
    save_checkpoint(elsewhere.parent, model, optimizer, config, 1, extra)
    for pointer in (b"\xff\xfe\x00", b"../other/step-00000001", str(elsewhere).encode()):
        (folder / "latest").write_bytes(pointer)
        assert latest_checkpoint(folder) == newest, pointer
    for name, damaged in (("state.json", "{}"), ("state.json", "[]"),
                          ("run_config.json", "[]"), ("run_config.json", '{"model": 3}')):
        kept = (newest / name).read_bytes()
        (newest / name).write_text(damaged)
        with pytest.raises(TrainingError, match=rf"^the checkpoint {re.escape(str(newest))} "
                                                r"is damaged or incomplete \(.+\); delete "
                                                "that folder to resume from the checkpoint "
                                                "before it") as info:
            load_checkpoint(newest, Glow(MODEL), torch.optim.Adam(
                Glow(MODEL).parameters()), config, TRAINING_STATE_KEYS)
        assert "\n" not in str(info.value)
        (newest / name).write_bytes(kept)
    load_checkpoint(newest, Glow(MODEL), torch.optim.Adam(
        Glow(MODEL).parameters()), config, TRAINING_STATE_KEYS)


def test_resuming_warns_only_of_settings_that_change_the_steps(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A changed learning rate makes the run differ from an uninterrupted one; more
    epochs, another checkpoint interval or ActNorm batch (already in the weights) do not."""
    config = run_config()
    model = Glow(MODEL)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.initialize(torch.rand(4, 1, 16, 16) - 0.5)
    path = save_checkpoint(tmp_path / "ckpt", model, optimizer, config, 1, {})

    def warned(changed: RunConfig) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="anomaly_flow.checkpoint"):
            load_checkpoint(path, Glow(MODEL), torch.optim.Adam(
                Glow(MODEL).parameters()), changed)
        return [r.getMessage() for r in caplog.records]

    assert warned(config.replace(epochs=9, checkpoint_every=7, init_batch_size=8,
                                 num_workers=1, compile=True)) == []
    assert warned(config.replace(lr=0.5, epochs=9)) == [
        "resuming with changed training settings ['lr']; the run will not match an "
        "uninterrupted one"]


def test_a_checkpoint_that_cannot_be_written_leaves_nothing_half_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while writing a checkpoint: a training error naming the checkpoint and
    the way out, no temp folder left behind, and the previous checkpoint still the
    latest, whole."""
    config = run_config()
    model = Glow(MODEL)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.initialize(torch.rand(4, 1, 16, 16) - 0.5)
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, model, optimizer, config, 1, {})
    real_save = checkpoint_module.save_tensors

    def disk_full(tensors: dict[str, torch.Tensor], path: Path) -> None:
        if path.name == "optimizer.safetensors":
            path.write_bytes(b"part")
            raise OSError(28, "No space left on device")
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_tensors", disk_full)
    with pytest.raises(TrainingError, match=r"could not write the checkpoint .*step-00000002: "
                                            r"No space left on device\. The latest complete "
                                            r"checkpoint, step-00000001, is intact; free space "
                                            r"there, then run the same command with "
                                            r"--resume"):
        save_checkpoint(folder, model, optimizer, config, 2, {})
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step-00000001"]
    # the first checkpoint, in a folder that cannot be written (a read-only disk says so
    # likewise): the renames and the pointer are inside the same net
    monkeypatch.setattr(checkpoint_module, "save_tensors", real_save)
    real_rename = Path.rename

    def read_only(self: Path, target: Path) -> Path:
        if self.name.startswith(".tmp-step-"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", read_only)
    with pytest.raises(TrainingError, match=r"Read-only file system\. No checkpoint was written "
                                            r"before it, so there is nothing to resume; make "
                                            r"that folder writable, then run the same command "
                                            r"again$"):
        save_checkpoint(tmp_path / "first", model, optimizer, config, 1, {})
    assert list((tmp_path / "first").iterdir()) == []
    assert latest_checkpoint(folder) == folder / "step-00000001"
    load_checkpoint(folder / "step-00000001", Glow(MODEL),
                                  torch.optim.Adam(Glow(MODEL).parameters()), config)
    # the pointer's place taken by a folder: the checkpoint is whole, the pointer is named
    monkeypatch.setattr(Path, "rename", real_rename)
    (folder / "latest").unlink()
    (folder / "latest").mkdir()
    with pytest.raises(TrainingError, match=rf"could not write the checkpoint .*step-00000003: "
                                            rf"Is a directory \({re.escape(str(folder))}/latest"
                                            r"\)\. The checkpoint step-00000003 itself is "
                                            r"complete and --resume finds it"):
        save_checkpoint(folder, model, optimizer, config, 3, {})
    assert latest_checkpoint(folder) == folder / "step-00000003"
