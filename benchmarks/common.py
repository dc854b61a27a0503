"""Small helpers shared by the benchmark scripts: where results go, how the machine is
described, a plain table printer, Fashion-MNIST loading, a time-boxed :func:`train`, and
the optional MLflow run.

Nothing here is part of the product; the scripts measure the library as it ships.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomaly_flow.config import RunConfig
from anomaly_flow.glow import Glow
from anomaly_flow.train import TrainEvent, train

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent

logger = logging.getLogger("benchmarks")


def setup_logging() -> None:
    """Progress and notes to stderr; tables go to stdout."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def set_threads(n: int | None) -> None:
    """``--threads``: intra-op CPU threads. On a loaded shared machine one thread gives
    steadier timings than two threads waiting on each other."""
    if n:
        torch.set_num_threads(n)


def pick_device(name: str) -> torch.device:
    """``auto`` means CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} was asked for but CUDA is not available here; "
                         "use --device cpu or auto.")
    return torch.device(name)


def device_slug(device: torch.device) -> str:
    """``cpu`` or e.g. ``cuda-nvidia-h100-80gb-hbm3``, for file names."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on (the machine may be shared: load is recorded)."""
    env: dict[str, Any] = {
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "argv": sys.argv,
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
            timeout=10).stdout.strip()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        # "float32" convolutions run in TF32 under PyTorch's default (cuDNN's flag on),
        # as in the public implementations B1 compares with: recorded, not changed
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return env


def write_results(name: str, device: torch.device, payload: dict[str, Any],
                  out: Path | None = None) -> Path:
    """Write ``benchmarks/results/<name>-<device>-<date>.json`` (or ``out``) atomically."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out or RESULTS / f"{name}-{device_slug(device)}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": name, "date": dt.datetime.now().isoformat(timespec="seconds"),
                "environment": environment(device), **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                title: str | None = None) -> None:
    """A Markdown table on stdout (floats to 4 significant digits unless pre-formatted)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    if title:
        print(f"\n{title}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(cell(v) for v in row) + " |")
    sys.stdout.flush()


def pad_images(images: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad uint8 ``(N, C, H, W)`` images symmetrically to ``size``; never resizes."""
    h = images.shape[-1]
    if size == h:
        return images
    if size < h or (size - h) % 2:
        raise SystemExit(f"cannot pad {h}x{h} images to {size}x{size} symmetrically; use "
                         f"{h} or {h} + an even number.")
    p = (size - h) // 2
    return np.pad(images, ((0, 0), (0, 0), (p, p), (p, p)))


# ------------------------------------------------------------------------ time budget


class _OutOfTime(Exception):
    """Raised from the training callback to end a time-boxed run at a checkpoint."""


@dataclass
class BudgetedRun:
    """What :func:`train_for` returns."""

    model: Glow
    steps: int
    train_seconds: float
    stopped_by_budget: bool
    step_log: list[dict[str, float]]   # one dict per step: step, epoch, t, metrics
    epoch_log: list[dict[str, float]]  # one dict per epoch


def train_for(config: RunConfig, train_set: Any, val_set: Any, device: torch.device,
              minutes: float | None, workdir: Path, *, check_every: int = 50,
              progress: bool | None = None,
              on_event: Callable[[TrainEvent], None] | None = None) -> BudgetedRun:
    """Run the library's :func:`train` for ``config.train.epochs`` epochs or until
    ``minutes`` of wall time, whichever comes first.

    :func:`train` has no time limit, so checkpoints are written every ``check_every``
    steps and, at each one, the run stops (by raising from the callback) when another
    ``check_every`` steps would overrun the budget. The model is then read back from that
    checkpoint. Wall time counts everything :func:`train` does: ActNorm init, steps,
    validation, checkpoint writes.
    """
    t0 = time.perf_counter()
    budget = math.inf if minutes is None else minutes * 60.0
    steps: list[dict[str, float]] = []
    epochs: list[dict[str, float]] = []
    last_ckpt = {"t": 0.0, "step": 0}
    config = config.replace(checkpoint_every=check_every)
    total_steps = math.ceil(len(train_set) / config.train.batch_size) * config.train.epochs

    def callback(event: TrainEvent) -> None:
        now = time.perf_counter() - t0
        if event.kind == "step":
            steps.append({"step": event.step, "epoch": event.epoch, "t": now,
                          **event.metrics})
        elif event.kind == "epoch":
            epochs.append({"step": event.step, "t": now, **event.metrics})
        if on_event is not None:
            on_event(event)
        if event.kind == "checkpoint":
            # the first interval starts at the first step's end, not at t0: the start-up
            # (ActNorm init, a compile, the first batch) would make every step look slow
            # and a short budget stop at its first check
            since = (last_ckpt if last_ckpt["step"] or not steps
                     else {"t": steps[0]["t"], "step": steps[0]["step"]})
            interval = (now - since["t"]) / max(event.step - since["step"], 1)
            last_ckpt.update(t=now, step=event.step)
            if event.step < total_steps and now + interval * check_every > budget:
                raise _OutOfTime

    ckpt = workdir / "checkpoints"
    stopped = False
    try:
        result = train(config, train_set, val_set, device=device, checkpoint_dir=ckpt,
                       callback=callback, progress=progress)
        model, n_steps = result.model, result.steps
    except _OutOfTime:
        stopped = True
        latest = sorted(p for p in ckpt.iterdir() if p.name.startswith("step-"))[-1]
        model = Glow.load(latest, device=device)
        n_steps = int(latest.name.split("-")[1])
    return BudgetedRun(model.eval(), n_steps, time.perf_counter() - t0, stopped, steps,
                       epochs)


# ------------------------------------------------------------------------------ MLflow


@contextlib.contextmanager
def mlflow_run(experiment: str, run_name: str, mlruns: Path | None,
               tags: dict[str, str] | None = None) -> Iterator[Any]:
    """A run through ``anomaly_flow.tracking``; yields None (and says why) when the
    tracking module is not usable, so a benchmark still produces its figures."""
    try:
        from anomaly_flow import tracking
        configure, start_run = tracking.configure, tracking.start_run
    except (ImportError, AttributeError) as error:
        logger.warning("MLflow logging skipped: anomaly_flow.tracking is not usable (%s); "
                       "the figures are still printed and written as JSON.", error)
        yield None
        return
    uri = configure(mlruns) if mlruns is not None else configure()
    logger.info("logging to MLflow at %s, experiment %r", uri, experiment)
    with start_run(experiment, run_name=run_name, tags=tags) as run:
        yield run


def log_curve(run: Any, step_log: Sequence[dict[str, float]],
              epoch_log: Sequence[dict[str, float]], keys: Sequence[str],
              every: int = 1) -> None:
    """Log a training curve (every ``every``-th step, plus all epochs) to ``run``."""
    if run is None:
        return
    for i, row in enumerate(step_log):
        if i % every == 0 or i == len(step_log) - 1:
            metrics = {k: float(row[k]) for k in keys if k in row and math.isfinite(row[k])}
            metrics["train_seconds"] = row["t"]
            run.log_metrics(metrics, step=int(row["step"]))
    for row in epoch_log:
        run.log_metrics({f"{k}": float(v) for k, v in row.items()
                         if k not in ("step", "t") and math.isfinite(v)},
                        step=int(row["step"]))
