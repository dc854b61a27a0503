"""How a long command stops when asked to: SIGTERM and SIGHUP handled as Ctrl-C is.

A service manager, a batch scheduler (Slurm, Kubernetes) or ``timeout`` stops a job with
SIGTERM, often sent to its whole process group; a terminal that closes (an SSH session
dropped) sends SIGHUP. Python's default for both is to die on the spot: no partial table,
no message, an MLflow run left RUNNING. Here each becomes the ``KeyboardInterrupt`` Ctrl-C
raises (as :class:`Terminated` or :class:`HungUp`, its subclasses), so scoring keeps its
rows, training ends its run as KILLED, and both say how to go on with ``--resume``. A
SIGHUP that is ignored (a command started under ``nohup``) stays ignored.

- :func:`sigterm_as_interrupt`: around a command's work in the main process;
  :func:`interrupt_exit_code` then gives the status a shell expects for the stop. Within
  it a stop repeated during the first one's clean-up is held (:data:`REPEAT_GRACE_S`),
  and one raised where Python swallows it is kept for the next step, unprinted.
- :func:`loader_worker_options`: DataLoader arguments whose workers leave a group's stop
  to the main process (:func:`init_loader_worker`); :func:`usable_cores` bounds how many.
- :func:`remove_leftovers`: the temp files and folders of a run that was killed outright
  (SIGKILL, the OOM killer, a power cut), which no handler could clean up.

This module imports neither torch nor mlflow.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any, NoReturn, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Terminated(KeyboardInterrupt):
    """The ``KeyboardInterrupt`` that SIGTERM raises inside :func:`sigterm_as_interrupt`:
    handled everywhere as Ctrl-C is, told apart only for the exit status."""

    signum: int = signal.SIGTERM


_HANGUP = getattr(signal, "SIGHUP", None)
"""SIGHUP where the platform has it (not on Windows)."""


class HungUp(Terminated):
    """The ``KeyboardInterrupt`` that SIGHUP (the terminal closed) raises inside
    :func:`sigterm_as_interrupt`; a :class:`Terminated` with its own exit status."""

    signum = _HANGUP or signal.SIGTERM


_PENDING: list[type[KeyboardInterrupt]] = []
"""The stop a signal asked for, until it reaches :func:`sigterm_as_interrupt`: Python
ignores an exception raised inside an at-fork callback (logging's lock release after a
DataLoader forks its workers is one) or a weakref callback, so a signal landing there
would be lost."""


REPEAT_GRACE_S = 10.0
"""How long after a stop a repeated one (Ctrl-C pressed twice, a scheduler's SIGTERM
after the user's Ctrl-C) is held rather than raised: a second exception would land in
the middle of the first one's clean-up (scoring writing the rows it has, a DataLoader
shutting its workers down) and lose what it was keeping. Past it, a stop raises again,
for a clean-up that hangs."""

_STOPPED_AT: list[float] = []
"""When the current block's first stop came (``time.monotonic()``), while one has."""

_STOPPED_BY: list[int] = []
"""The signal of the current block's first stop, while one has."""

ECHO_S = 1.0
"""A SIGTERM this soon after a first one is its echo, held without a word: one stop can
reach a process several times (the signal a process torchrun started asks for at
torchrun's death comes each time the kernel hands it on from one of torchrun's dying
threads to the next, within a millisecond: :mod:`anomaly_flow.distributed`)."""

_HELD_MESSAGE = (b"\nstill stopping: keeping what is done so far (a stop more than "
                 + str(int(REPEAT_GRACE_S)).encode() + b" s after the first ends it at once)\n")


_DEFERRING = [0]
"""How many :func:`stops_deferred` blocks the main thread is in."""

_DEFERRED: list[type[KeyboardInterrupt]] = []
"""The stop a :func:`stops_deferred` block kept, to raise as it ends."""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    if _STOPPED_AT and time.monotonic() - _STOPPED_AT[0] < REPEAT_GRACE_S:
        if not (signum == signal.SIGTERM == _STOPPED_BY[0]
                and time.monotonic() - _STOPPED_AT[0] < ECHO_S):
            os.write(2, _HELD_MESSAGE)  # async-signal-safe, unlike logging
        return
    first = not _STOPPED_AT
    stop = {signal.SIGTERM: Terminated, _HANGUP: HungUp}.get(signum, KeyboardInterrupt)
    _STOPPED_BY[:] = [signum]  # first: a repeat landing between the two finds it set
    _STOPPED_AT[:] = [time.monotonic()]
    _PENDING[:] = [stop]
    if first and _DEFERRING[0]:
        _DEFERRED[:] = [stop]
        return  # raised when the write under way is done (a stop past the grace is not)
    raise stop


@contextlib.contextmanager
def stops_deferred() -> Iterator[None]:
    """Within the block, a first stop is kept, not raised, and raised as the block ends:
    for a write that a stop must not cut half-way, such as a tracking store's
    transaction (cut, it can leave an sqlite store locked, and ending the run as KILLED
    then fails). A stop repeated past :data:`REPEAT_GRACE_S` still raises at once."""
    _DEFERRING[0] += 1
    try:
        yield
    except BaseException:
        _DEFERRED.clear()  # the write's own error goes on; the stop waits for the next step
        raise
    finally:
        _DEFERRING[0] -= 1
    if not _DEFERRING[0] and _DEFERRED:
        _PENDING.clear()
        raise _DEFERRED.pop()


def _quiet_swallowed_stops(hook: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``hook`` (``sys.unraisablehook``), except for a stop of ours raised where Python
    cannot raise it on (an at-fork callback such as logging's, run at every DataLoader
    start; a weakref or garbage-collection callback): it would print "Exception ignored"
    with a traceback. The stop stays in :data:`_PENDING` for the next step."""

    def unraisablehook(unraisable: Any) -> None:
        if _PENDING and isinstance(unraisable.exc_value, KeyboardInterrupt):
            return
        hook(unraisable)

    return unraisablehook


def raise_if_stopped() -> None:
    """Raise the stop a signal asked for whose exception was swallowed (see
    :data:`_PENDING`); long loops call it once per step or batch."""
    if _PENDING:
        _DEFERRED.clear()
        raise _PENDING.pop()


def stop_reported() -> None:
    """The caller caught the stop and reported it itself: nothing is left pending for
    :func:`raise_if_stopped`, so the end of :func:`sigterm_as_interrupt` does not raise it
    again (and a second, different line is not printed after the caller's)."""
    _PENDING.clear()


def interrupt_exit_code(stop: KeyboardInterrupt) -> int:
    """The exit status of a command ended by ``stop``: 128 + the signal's number, as a
    shell reports a process the signal killed (130 for Ctrl-C, 143 for SIGTERM, 129 for
    SIGHUP), so that a scheduler or a script sees which stop it was."""
    return 128 + (stop.signum if isinstance(stop, Terminated) else signal.SIGINT)


@contextlib.contextmanager
def sigterm_as_interrupt(*, hold_after_stop: bool = False) -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) in
    the main thread, SIGHUP :class:`HungUp` (unless it is ignored, as under ``nohup``), and
    Ctrl-C its ``KeyboardInterrupt`` as before; each is also kept
    for :func:`raise_if_stopped`, should the exception be swallowed (and then not printed
    as Python's "Exception ignored" traceback: :func:`_quiet_swallowed_stops`). A stop repeated
    within :data:`REPEAT_GRACE_S` of the first is held (a line on stderr says so).

    The previous handlers come back after the block, except with ``hold_after_stop``
    once a stop has come: for a command whose process then ends, a repeated stop still
    held while it reports and exits (else it would print a traceback from the
    interpreter's shutdown, or kill the process by the signal).
    """
    previous = signal.signal(signal.SIGTERM, _interrupt)
    ours_int = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if ours_int:  # a handler someone else installed stays theirs
        signal.signal(signal.SIGINT, _interrupt)
    # SIGHUP's default kills; SIG_IGN (nohup) or someone else's handler stays
    ours_hup = _HANGUP is not None and signal.getsignal(_HANGUP) == signal.SIG_DFL
    if ours_hup:
        signal.signal(_HANGUP, _interrupt)
    _PENDING.clear()
    _STOPPED_AT.clear()
    _DEFERRED.clear()
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_swallowed_stops(previous_hook)
    try:
        yield
        raise_if_stopped()  # a stop that came after the block's last step
    except KeyboardInterrupt as stop:
        _PENDING.clear()  # it arrived: nothing is left pending
        # the frames it came through hold what they were using (a DataLoader's workers):
        # let go of it now, while the process is whole, not in the interpreter's
        # shutdown, after multiprocessing has killed the workers (whose deaths a live
        # DataLoader then reports with a traceback)
        traceback.clear_frames(stop.__traceback__)
        raise
    finally:
        sys.unraisablehook = previous_hook
        if hold_after_stop and _STOPPED_AT:
            atexit.register(_hold_stops_at_exit)
        else:
            _STOPPED_AT.clear()
            signal.signal(signal.SIGTERM, previous)
            if ours_int:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            if ours_hup:
                signal.signal(_HANGUP, signal.SIG_DFL)


def exit_when_done(code: int | None) -> NoReturn:
    """``sys.exit(code)`` for a program's entry point. Where ``code`` says success, stops
    are ignored from here on: the work is done (outputs written, runs ended), and a Ctrl-C
    or SIGTERM in the second or so the interpreter's shutdown takes (MLflow's and torch's
    clean-up) would report a finished job as stopped (130, 143, or killed by the signal)."""
    if not code and threading.current_thread() is threading.main_thread():
        _ignore_stops()
    sys.exit(code)


def run_as_program(main: Callable[[], int | None]) -> NoReturn:
    """A script's entry point: ``main()`` with stderr that cannot end it
    (:func:`keep_going_without_stderr`), its status the process's (:func:`exit_when_done`)."""
    keep_going_without_stderr()
    exit_when_done(main())


def _ignore_stops() -> None:
    """Ignore Ctrl-C, SIGTERM and SIGHUP from here on."""
    for signum in (signal.SIGINT, signal.SIGTERM, _HANGUP):
        if signum is not None:
            signal.signal(signum, signal.SIG_IGN)


def _hold_stops_at_exit() -> None:
    """At the exit of a process a stop ended, still within the grace: ignore further
    stops. The interpreter's shutdown puts back the default handler of every signal that
    has a Python one, and a repeated Ctrl-C would then kill the process by the signal
    instead of letting it exit with the status :func:`interrupt_exit_code` gave."""
    if _STOPPED_AT and time.monotonic() - _STOPPED_AT[0] < REPEAT_GRACE_S:
        _ignore_stops()


class _DroppingStream:
    """A text stream (stderr) whose failed writes are dropped, with every later one: see
    :func:`keep_going_without_stderr`. Everything else is the stream's own."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.failed = False

    def write(self, text: str) -> int:
        if not self.failed:
            try:
                return int(self._stream.write(text))
            except OSError:  # a closed pipe, a full disk, a terminal gone
                self.failed = True
        return len(text)

    def flush(self) -> None:
        if not self.failed:
            try:
                self._stream.flush()
            except OSError:
                self.failed = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def keep_going_without_stderr() -> None:
    """From here on, a message the process cannot write to stderr is dropped instead of
    ending it: a command's work (a scores table, a registered model) matters more than its
    progress bar and log lines, and stderr fails where the work need not (a log file on a
    full disk, a pipe to a reader that quit, the terminal of a dropped SSH session, whose
    SIGHUP the command is still reporting). For a program's entry point, before logging
    and progress bars take hold of ``sys.stderr``."""
    if sys.stderr is not None and not isinstance(sys.stderr, _DroppingStream):
        sys.stderr = _DroppingStream(sys.stderr)


def process_running(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one of another user's too)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to someone else
        return True
    return True


def remove_leftovers(folder: os.PathLike[str] | str, pattern: re.Pattern[str]) -> int:
    """Delete the entries of ``folder`` (not below it) whose names match ``pattern`` in
    full and whose group ``pid`` names a process no longer running: the temp files and
    folders a killed run was writing when it died. A process still running keeps its
    own, so two runs side by side never take each other's. Returns how many went; an
    entry that cannot be removed stays, as does a folder that cannot be listed.

    The write-then-rename temp names of this package carry the writer's process id for
    this reason: without it, nothing tells a dead run's half-written file from a live
    run's, and a run killed over and over would fill the folder.
    """
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if found is None or process_running(int(found["pid"])):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue
        removed += 1
    return removed


def usable_cores() -> int:
    """The CPU cores this process may run on (``taskset``, a container's CPU set), which
    bound how many decoding workers are worth starting."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_count(asked: int, n_batches: int) -> int:
    """The decoding workers to start when ``asked`` for ``n_batches`` batches: at most one
    a batch (more would have nothing to decode) and one a usable core, with a warning
    where the cores cut the number (1,000 workers would start 1,000 processes)."""
    count = min(asked, n_batches)
    if count > (cores := usable_cores()):
        logger.warning("%d decoding workers asked for, but this process may use %d CPU "
                       "cores; using %d", asked, cores, cores)
        count = cores
    return count


def loader_worker_options(num_workers: int) -> dict[str, Any]:
    """``DataLoader`` keyword arguments for ``num_workers`` workers that obey SIGTERM from
    this process only. That needs workers forked from it (under spawn or forkserver a
    worker has a thread of its own before any init function runs, and another parent)
    and ``signal.sigwaitinfo``; where either is missing, the workers keep SIGTERM's
    default and die with a group stop."""
    if num_workers == 0:
        return {}
    if _forked_workers():
        return {"multiprocessing_context": "fork",
                "worker_init_fn": functools.partial(init_loader_worker, main_pid=os.getpid())}
    return {"worker_init_fn": init_loader_worker}


def _forked_workers() -> bool:
    """Whether loader workers are forked and wait for SIGTERM (see loader_worker_options)."""
    return "fork" in multiprocessing.get_all_start_methods() and hasattr(signal, "sigwaitinfo")


def worker_batches(loader: Iterable[T]) -> Iterator[T]:
    """``iter(loader)``, its workers forked with SIGTERM blocked. A worker takes SIGTERM
    from its main process only once :func:`init_loader_worker` has run; before, PyTorch's
    own handler has it die of a stop sent to the whole group (a scheduler's), and the main
    process reports "DataLoader worker ... is killed by signal" instead of stopping. Born
    with SIGTERM blocked, the worker leaves it pending until its init decides."""
    workers = getattr(loader, "num_workers", 0)
    if not workers or threading.current_thread() is not threading.main_thread():
        return iter(loader)
    # Blocking SIGTERM here does not keep Python's handler out: another thread (torch's
    # pool, a heatmap writer) can take the signal, and the handler then raises in the
    # main thread, inside DataLoader's iterator setup, whose __del__ prints a traceback
    # (no attribute '_workers_status'); Ctrl-C is not blocked at all. A stop that lands
    # while the workers start is raised once the iterator is whole.
    with stops_deferred():
        if not _forked_workers():
            return iter(loader)
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            return iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def init_loader_worker(worker_id: int, main_pid: int | None = None) -> None:
    """In a DataLoader worker: obey SIGTERM from the main process only. A stop sent to the
    whole process group then ends the run through the main process alone, which stops in
    order and shuts its workers down, instead of finding them killed; the main process's
    own SIGTERM (DataLoader shutdown, multiprocessing's clean-up at exit) still ends the
    worker at once, as it expects.

    The worker hands each batch over through multiprocessing's resource sharer, a thread
    that serves the batch's shared-memory handle when the main process connects for it. A
    main process stopped (SIGTERM or Ctrl-C) while connecting leaves that thread a broken
    handshake, which it would print as a traceback; that is the stop, not an error."""
    sys.excepthook = _quiet_abandoned_handshakes(sys.excepthook)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler
    if _HANGUP is not None:  # a closed terminal stops the main process, which ends these
        signal.signal(_HANGUP, signal.SIG_IGN)
    if main_pid is None:  # see loader_worker_options
        return
    # blocked in this thread before any other starts (a forked worker has no other), so
    # in all of them; one thread waits for it and looks at who sent it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_obey_sigterm_from, args=(main_pid,), daemon=True,
                     name="sigterm-from-main").start()


def _obey_sigterm_from(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass  # a stop for the whole group: the main process ends the run
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # in this thread
    signal.raise_signal(signal.SIGTERM)  # to this thread: the worker ends at once


def _quiet_abandoned_handshakes(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook``, except for a connection error that ends the resource sharer's loop: the
    one receiver of a loader worker's handles, the main process, went away mid-transfer
    (had it not, its own side of the transfer would raise and be reported there)."""
    from multiprocessing.resource_sharer import _ResourceSharer

    def excepthook(kind: type[BaseException], error: BaseException, trace: Any) -> None:
        if (issubclass(kind, EOFError | ConnectionError) and trace is not None
                and trace.tb_frame.f_code is _ResourceSharer._serve.__code__):
            return
        hook(kind, error, trace)

    return excepthook
