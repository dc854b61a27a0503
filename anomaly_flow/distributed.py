"""Training in several processes started by ``torchrun``: this process's rank, the
process count, and joining and leaving the process group.

``torchrun`` starts one process per GPU (or several on the CPU) and tells each its place
in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, read here when a function is called, not
at import. :func:`join_launch_group` joins the group (NCCL on CUDA, gloo on the CPU)
with this rank's GPU pinned first; whoever joined it leaves it again
(:func:`leave_launch_group`), and a caller's own group is left alone. Alone, without
``torchrun``, every function answers rank 0 of 1 and joins nothing.

Rank 0 is the one that writes: the checkpoints, the MLflow run and the registered model;
the other ranks train their share and wait. A refusal only rank 0 can make (the store,
the name's lock, a resume's record) reaches the others through :func:`share_verdict`,
so they do not wait in training's first collective until the group times out.

The collectives of training itself (DistributedDataParallel, the all-reduced step
figures and validation sums) are :mod:`anomaly_flow.train`'s; this module knows
nothing of models, configurations or MLflow.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
"""Linux's prctl option: the signal this process gets when the thread that started it
ends (<linux/prctl.h>)."""

_PARENT = os.getppid()
"""This process's parent as this module is imported: torchrun's agent, under torchrun."""


def launch_rank() -> int:
    """This process's rank: the joined group's, else what torchrun set in RANK (0 alone)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes: the joined group's, else what torchrun set in WORLD_SIZE."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_launch_group(device: torch.device) -> bool:
    """Under torchrun, join its process group now, with this rank's GPU pinned first (as
    :func:`anomaly_flow.train.train` does); True when this call joined it (the caller then
    leaves it with :func:`leave_launch_group`). Alone, nothing happens."""
    if world_size() <= 1:
        return False
    return join_process_group(launch_device(device))[2]


def launch_device(device: torch.device) -> torch.device:
    """``device``, on CUDA under torchrun this rank's GPU (LOCAL_RANK), pinned as the
    current one: NCCL and ``all_gather_object`` use it, so before the group starts."""
    if device.type == "cuda" and world_size() > 1 and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device


def leave_launch_group() -> None:
    """Leave the process group :func:`join_launch_group` joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def share_verdict(error: str | None = None) -> str | None:
    """Under torchrun: rank 0 sends ``error`` (None: go on) and every rank returns what
    rank 0 sent. Rank 0 checks alone what the others cannot (the store, the name's lock,
    a resume's record); without this, a refusal there would leave the others waiting in
    the first collective of training until the group's timeout. Alone: ``error``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return error
    sent = [error]
    dist.broadcast_object_list(sent, src=0)
    return sent[0]


def gathered(value: Any) -> list[Any]:
    """Under torchrun: every rank's ``value`` (picklable), in rank order, on every rank (a
    collective: all ranks call it); for the ranks to compare what each sees before they
    train together. Alone: ``[value]``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def end_with_launcher() -> bool:
    """Under torchrun on Linux, have the kernel send this process SIGTERM when torchrun
    (its parent) dies; True when that is set up. torchrun starts each process in a
    session of its own and forwards a stop to it, so a torchrun killed outright (SIGKILL,
    the OOM killer) left its processes training on, orphaned, holding their GPUs and
    registering a model nobody waits for; SIGTERM ends training as Ctrl-C does (the run
    ended as KILLED, the checkpoint to go on from said). torchrun starts its processes
    from its main thread, which lives as long as torchrun does; one that died before this
    call (its parent is no longer the one this module was imported under) is answered
    with the same SIGTERM at once."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # a libc without prctl: nothing to set
        return False
    prctl.restype = ctypes.c_int
    prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    if prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        logger.debug("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    if os.getppid() != _PARENT:  # torchrun died before the kernel was asked to say so
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def join_process_group(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether this call joined the group) under torchrun; a process
    that torchrun started ends with it (:func:`end_with_launcher`)."""
    end_with_launcher()
    created = False
    if world_size() > 1 and not dist.is_initialized():
        # Imported before the group exists: on its first import (DDP makes it) this module
        # binds the world group as default argument of its functions, which would keep the
        # group alive past destroy_process_group, its gloo threads still running when the
        # interpreter shuts down; one of them then dropping a finished collective's tensors
        # aborts the process ("terminate called without an active exception", SIGABRT),
        # and torchrun ends the other ranks, rank 0 before it registers the model.
        import torch.distributed.nn.functional  # noqa: F401
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), created
    return 0, 1, False
