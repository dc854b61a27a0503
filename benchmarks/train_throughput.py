"""B1: training throughput of the library's own training step.

Protocol (../shared/BENCHMARKS.md, B1): the reference architecture (the ``fashion-mnist``
preset: L=3, K=32, width 512, affine coupling, LU 1x1 convolutions, 32x32x1 input =
Fashion-MNIST zero-padded by 2, batch 256, Adam); count full optimiser steps (forward,
backward, clipping, update) after warm-up; report images/s, peak memory and model
TFLOP/s, with FLOPs per image from ``torch.utils.flop_counter.FlopCounterMode`` on one
forward+backward.

What is timed (``--loop``):

* ``train`` (default): :func:`anomaly_flow.train.train` itself, unmodified, with a callback
  that timestamps every ``step`` event. The interval between two events is everything the
  product does per step: fetching and collating the batch from the DataLoader, drawing
  the dequantisation noise, the host-to-device copy, forward, backward, gradient
  clipping, the finiteness check (one host sync) and ``optimizer.step()``.
* ``step``: the same per-step code (``preprocess``, ``_step_noise``,
  ``anomaly_flow.train._forward_backward``, ``optimizer.step()``) in a bare loop over a
  pre-stacked batch tensor (images in order; ``train()`` shuffles them), without
  DataLoader, callback or progress bar. Needed for ``--compile-mode`` other than
  ``default`` and for ``--channels-last`` (experiments the library does not offer); the
  gap between the two loops is the cost of the training loop around the step.

``--compile`` sets ``TrainConfig.compile`` (``train()`` compiles its model after the
ActNorm initialisation); in the ``step`` loop the bare loop compiles with
``--compile-mode``. Warm-up steps must cover the compilation (the first step).

``--bf16`` sets ``TrainConfig.bf16`` (the coupling networks under bf16 autocast; CUDA only,
the library trains in float32 elsewhere). ``--profile`` runs ``train()`` under
``torch.profiler`` instead of timing it and writes the top operators by self time to
``benchmarks/results/profile-<device>-<date>.txt`` (plus a summary by operator family
in the JSON).

Examples:
    # the B1 figure, on a GPU
    python benchmarks/train_throughput.py
    python benchmarks/train_throughput.py --bf16 --compile
    # CPU: a small architecture and batch
    nice -n 10 python benchmarks/train_throughput.py --tiny --steps 30 --warmup 5
    nice -n 10 python benchmarks/train_throughput.py --tiny --profile
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import math
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from anomaly_flow import train as train_module
from anomaly_flow.config import GlowConfig, RunConfig, load_preset
from anomaly_flow.data import ArrayDataset
from anomaly_flow.fashion_mnist import load_fashion_mnist
from anomaly_flow.glow import Glow, bits_per_dim, log_prob_from_output, preprocess
from anomaly_flow.train import TrainEvent, evaluate_bpd, learning_rate, train

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (
    RESULTS,
    device_slug,
    pad_images,
    pick_device,
    print_table,
    set_threads,
    setup_logging,
    write_results,
)

logger = logging.getLogger("benchmarks.train_throughput")

TINY_MODEL = GlowConfig(in_channels=1, image_size=32, levels=3, steps_per_level=4,
                        hidden_channels=64)
"""``--tiny``: the reference layout (32x32x1, L=3, affine, LU) at K=4, width 64."""
TINY_BATCH = 32


def build_config(args: argparse.Namespace, device: torch.device) -> RunConfig:
    """The ``fashion-mnist`` preset (or its ``--tiny`` shrink) set up for a timing run."""
    preset = load_preset("fashion-mnist")
    model = TINY_MODEL if args.tiny else preset.model
    batch = args.batch_size or (TINY_BATCH if args.tiny else preset.train.batch_size)
    workers = args.workers if args.workers is not None else (
        preset.train.num_workers if device.type == "cuda" else 0)
    train_cfg = dataclasses.replace(
        preset.train, epochs=1, batch_size=batch, bf16=args.bf16, num_workers=workers,
        compile=args.compile,
        checkpoint_every=10**9, init_batch_size=min(batch, preset.train.init_batch_size))
    return RunConfig(model, train_cfg)


def training_images(config: RunConfig, n: int) -> np.ndarray:
    """``n`` Fashion-MNIST training images padded (not resized) to the model's size,
    repeated in order when more than 60,000 are needed."""
    images, _ = load_fashion_mnist("train")
    images = pad_images(images, config.model.image_size)
    reps = math.ceil(n / len(images))
    return np.concatenate([images] * reps)[:n] if reps > 1 else images[:n]


def flops_per_image(config: GlowConfig, device: torch.device, batch: int = 4) -> float:
    """Model FLOPs of one forward+backward per image, as FlopCounterMode counts them
    (convolutions and matrix products; elementwise work is not counted)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Glow(config).to(device)
        images = torch.randint(0, 256, (batch, config.in_channels, config.image_size,
                                        config.image_size), dtype=torch.uint8, device=device)
        noise = torch.rand(images.shape, device=device)
    x = preprocess(images, config.n_bits, noise)
    model.initialize(x)
    counter = FlopCounterMode(display=False)
    with counter:
        bits_per_dim(log_prob_from_output(model(x)), config).mean().backward()
    return counter.get_total_flops() / batch


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "torch.cuda.max_memory_allocated"
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "ru_maxrss (whole process, data included)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_train_loop(config: RunConfig, images: np.ndarray, device: torch.device,
                    warmup: int) -> tuple[list[float], float, Glow]:
    """Run ``train()`` for one epoch over ``images``; return the step-end timestamps, the
    last training bits/dim and the trained model.

    With fused Adam, ``train()`` reports step s one step late, after it has queued step
    s+1's forward and backward: the sync at the window's first event then also waits for
    those, so the window holds one step fewer than it has intervals (see
    :func:`steps_in_window`).
    """
    stamps: list[float] = []
    last = {"bpd": math.nan}

    def callback(event: TrainEvent) -> None:
        if event.kind == "step":
            if event.step in (warmup, len(images) // config.train.batch_size):
                _sync(device)  # the window's ends include all queued device work
            stamps.append(time.perf_counter())
            last["bpd"] = event.metrics["train_bpd"]

    result = train(config, ArrayDataset(images), None, device=device, callback=callback,
                   progress=False)
    return stamps, last["bpd"], result.model


def steps_in_window(intervals: int, loop: str, config: RunConfig) -> int:
    """Whole steps between the window's first and last timestamps (see
    :func:`time_train_loop`): one fewer than the intervals when ``train()`` reports late."""
    late = loop == "train" and config.train.optimizer == "adam"  # fused: deferred figures
    return intervals - 1 if late else intervals


def time_step_loop(config: RunConfig, images: np.ndarray, device: torch.device,
                   warmup: int, compile_mode: str | None,
                   channels_last: bool) -> tuple[list[float], float, Glow]:
    """The per-step code of ``train()`` in a bare loop (see the module docstring), with
    what ``train()`` sets around it on CUDA: the batches in pinned memory (``train()``'s
    loader pins them; a copy from pageable memory first waits for the device's queued
    work, a host sync per step that ``train()`` does not have) and cuDNN's autotuning."""
    with train_module._convolutions_autotuned(device):
        return _step_loop(config, images, device, warmup, compile_mode, channels_last)


def _step_loop(config: RunConfig, images: np.ndarray, device: torch.device, warmup: int,
               compile_mode: str | None, channels_last: bool) -> tuple[list[float], float,
                                                                       Glow]:
    t, m = config.train, config.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        model = Glow(m)
    model.to(device)
    optimizer = train_module._make_optimizer(model, config)
    batches = torch.from_numpy(images).view(-1, t.batch_size, *images.shape[1:])
    if device.type == "cuda":
        batches = batches.pin_memory()
    shape = tuple(batches.shape[1:])
    init = batches[0][: t.init_batch_size].to(device)
    model.initialize(preprocess(init, m.n_bits, train_module._step_noise(
        t.seed, -1, tuple(init.shape), device)))
    model.set_coupling_autocast(torch.bfloat16 if t.bf16 and device.type == "cuda" else None)
    model.train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model.to(memory_format=fmt)
    net: torch.nn.Module = (torch.compile(model, mode=compile_mode) if compile_mode
                            else model)
    max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
    deferred = train_module._skips_on_device(optimizer)
    stamps, pending = [], None
    for step, batch in enumerate(batches):
        noise = train_module._step_noise(t.seed, step, shape, device)
        x = preprocess(batch.to(device, non_blocking=True), m.n_bits,
                       noise).contiguous(memory_format=fmt)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(t, step)
        figures = train_module._forward_backward(net, model, optimizer, x, 1, max_norm)
        launched = train_module._LaunchedStep(step + 1, learning_rate(t, step), figures)
        if pending is not None:  # as train(): the previous step's figures, one step late
            pending.read()
        if deferred:
            optimizer.found_inf = launched.skip
            optimizer.step()
        elif not launched.skips():
            optimizer.step()
        pending = launched
        if step in (warmup - 1, len(batches) - 1):
            _sync(device)
        stamps.append(time.perf_counter())
    model.set_coupling_autocast(None)
    bpd = pending.read()[0] if pending is not None else math.nan
    return stamps, bpd, model.to(memory_format=torch.contiguous_format).eval()


def profile_train(config: RunConfig, images: np.ndarray, device: torch.device,
                  warmup: int, active: int, out: Path) -> dict[str, Any]:
    """``train()`` under torch.profiler for ``active`` steps after ``warmup``; writes the
    operator table to ``out`` and returns self time by operator family."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    prof = profile(activities=activities, schedule=schedule(wait=0, warmup=warmup,
                                                            active=active, repeat=1))

    def callback(event: TrainEvent) -> None:
        if event.kind == "step":
            prof.step()

    with prof:
        train(config, ArrayDataset(images), None, device=device, callback=callback,
              progress=False)
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = events.table(sort_by=key, row_limit=40, max_name_column_width=60)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"train() under torch.profiler, {active} steps after {warmup} warm-up, "
                   f"{device}, config {config.to_dict()}\n\n{table}\n")
    calls = sum(e.count for e in events if e.key.startswith("aten::"))
    # Time by operator family over the outermost ops (no double counting of nested calls):
    # inclusive CPU time on the CPU, the time of the kernels they launched on CUDA.
    families: dict[str, float] = {}
    for e in prof.events():
        if _is_compute(e):
            spent = e.device_time_total if device.type == "cuda" else e.cpu_time_total
            families[_family(e.name)] = families.get(_family(e.name), 0.0) + spent
    total = sum(families.values()) or 1.0
    return {
        "table": str(out),
        "aten_calls_per_step": calls / active,
        "compute_ops_per_step": {k: v / active for k, v in
                                 _compute_ops(prof.events()).items()},
        "compute_time_ms_per_step": total / 1000 / active,
        "time_kind": "CUDA kernel time" if device.type == "cuda" else "CPU time",
        "share_by_family": {k: round(v / total, 4) for k, v in
                            sorted(families.items(), key=lambda kv: -kv[1])},
    }


_NO_KERNEL = {
    "aten::view", "aten::as_strided", "aten::slice", "aten::expand", "aten::unsqueeze",
    "aten::squeeze", "aten::reshape", "aten::_unsafe_view", "aten::empty",
    "aten::empty_strided", "aten::empty_like", "aten::t", "aten::transpose", "aten::permute",
    "aten::select", "aten::detach", "aten::alias", "aten::resolve_conj", "aten::resolve_neg",
    "aten::split", "aten::chunk", "aten::narrow", "aten::to", "aten::lift_fresh",
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::numpy_T",
    "aten::result_type", "aten::_reshape_alias", "aten::contiguous", "aten::diagonal",
}


def _does_work(e: Any) -> bool:
    return e.name.startswith("aten::") and e.name not in _NO_KERNEL


def _is_compute(e: Any) -> bool:
    """An outermost aten operator (none above it) that is not a view or an allocation:
    what Python and autograd asked for. Each is one or more kernels on a GPU; its
    inclusive time covers the operators below it, so nothing is counted twice."""
    if not _does_work(e):
        return False
    parent = e.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def _compute_ops(events: Any) -> dict[str, int]:
    """Outermost aten operators that do work (see :func:`_is_compute`), by phase: on a GPU
    each is at least one kernel launch in eager mode, so their count per step is a floor
    on the launches a step needs. Operators under no ``phase:`` marker, optimizer step or
    autograd engine land in one bucket: in ``train()``, which has no markers, that is the
    forward pass with the data, noise, loss and clipping around it."""
    phases: dict[str, int] = {}
    for e in events:
        if not _is_compute(e):
            continue
        phase, parent = "forward and the rest (data, noise, loss, clipping)", e.cpu_parent
        while parent is not None:
            if parent.name.startswith(("Optimizer.", "phase:")):
                phase = parent.name.removeprefix("phase:")
                break
            if parent.name.startswith("autograd::engine"):
                phase = "backward"
                break
            parent = parent.cpu_parent
        phases[phase] = phases.get(phase, 0) + 1
    return phases


def count_model_ops(config: RunConfig, device: torch.device, batch: int = 2) -> dict[str, Any]:
    """Compute ops of one forward, backward, gradient clipping and Adam step of the model,
    counted apart (batch 2: the count does not depend on the batch), with the optimizer and
    clipping in their multi-tensor (``foreach``) form, the default on CUDA."""
    from torch.profiler import profile, record_function

    m = config.model
    model = Glow(m).to(device)
    x = preprocess(torch.randint(0, 256, (batch, m.in_channels, m.image_size, m.image_size),
                                 dtype=torch.uint8, device=device), m.n_bits,
                   torch.rand(batch, m.in_channels, m.image_size, m.image_size, device=device))
    model.initialize(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    with profile() as prof:
        with record_function("phase:forward"):
            loss = bits_per_dim(log_prob_from_output(model(x)), m).mean()
        with record_function("phase:backward"):
            loss.backward()
        with record_function("phase:clip (foreach)"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0, foreach=True)
        with record_function("phase:adam (foreach)"):
            optimizer.step()
    ops = _compute_ops(prof.events())
    flow_steps = m.levels * m.steps_per_level
    return {"ops": ops, "flow_steps": flow_steps, "parameters": len(list(model.parameters())),
            "per_flow_step": {k: round(ops.get(k, 0) / flow_steps, 1)
                              for k in ("forward", "backward")}}


def _family(op: str) -> str:
    name = op.removeprefix("aten::")
    if "conv" in name:
        return "convolution (fwd+bwd)"
    if name in ("mm", "addmm", "bmm", "matmul", "linalg_lu", "diag_embed", "diag"):
        return "matmul / LU weight"
    if name.startswith("_foreach") or name in ("_fused_adam_", "lerp_", "addcdiv_", "addcmul_"):
        return "optimizer (Adam, clipping)"
    if name in ("sum", "mean", "norm", "linalg_vector_norm", "stack", "cat", "copy_", "clone",
                "contiguous", "fill_", "zero_", "zeros", "empty", "empty_like", "new_zeros",
                "_to_copy", "to", "expand", "index", "slice", "as_strided", "view", "reshape",
                "permute", "_unsafe_view", "narrow", "split", "chunk", "unsqueeze", "select"):
        return "data movement / reductions"
    return "elementwise (actnorm, sigmoid, exp, relu, ...)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="small architecture (L=3, K=4, width 64) and batch 32, for a CPU")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps (default 50; 30 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default 10; 5 with --tiny)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--bf16", action="store_true", help="TrainConfig.bf16 (CUDA only)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model: TrainConfig.compile in --loop "
                        "train, --compile-mode in --loop step")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode: default, reduce-overhead (CUDA graphs), "
                        "max-autotune, max-autotune-no-cudagraphs (other than default: "
                        "implies --loop step)")
    parser.add_argument("--loop", choices=("train", "step"), default="train")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers in --loop train (default: the preset's 8 "
                        "on CUDA, 0 on the CPU)")
    parser.add_argument("--channels-last", action="store_true",
                        help="(--loop step) model and input in channels-last layout, an "
                        "experiment not in the library")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    parser.add_argument("--eval-images", type=int, default=0,
                        help="after the run, deterministic bits/dim of this many Fashion-MNIST "
                        "test images (padded like the training images): compares precision "
                        "and compile settings after the same number of steps")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--profile", action="store_true",
                        help="profile train() instead of timing it")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args()
    setup_logging()
    set_threads(args.threads)

    device = pick_device(args.device)
    config = build_config(args, device)
    steps = args.steps or (30 if args.tiny else 50)
    warmup = args.warmup if args.warmup is not None else (5 if args.tiny else 10)
    custom_compile = args.compile and args.compile_mode != "default"
    loop = "step" if custom_compile or args.channels_last else args.loop
    batch = config.train.batch_size
    images = training_images(config, (warmup + steps) * batch)
    bf16_active = args.bf16 and device.type == "cuda"
    if args.bf16 and not bf16_active:
        logger.warning("--bf16 is CUDA-only in the library; this run is float32")
    logger.info("B1 on %s: %s, batch %d, %d warm-up + %d timed steps, loop=%s%s",
                device, config.model, batch, warmup, steps, loop,
                ", compiled" if args.compile else "")

    payload: dict[str, Any] = {"config": config.to_dict(), "tiny": args.tiny, "loop": loop,
                               "compile": args.compile_mode if args.compile else None,
                               "bf16": bf16_active,
                               "channels_last": args.channels_last,
                               "warmup_steps": warmup, "timed_steps": steps}
    if args.profile:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = RESULTS / f"profile-{'tiny-' if args.tiny else ''}{device_slug(device)}-{stamp}.txt"
        summary = profile_train(config, images, device, warmup, steps, out)
        summary["model_ops"] = count_model_ops(config, device)
        payload["profile"] = summary
        print_table(["operator family", f"share of {summary['time_kind']}"],
                    [(k, f"{100 * v:.1f} %") for k, v in summary["share_by_family"].items()],
                    title=f"profile of train(), per step: "
                          f"{sum(summary['compute_ops_per_step'].values()):.0f} compute ops "
                          f"{summary['compute_ops_per_step']} "
                          f"({summary['aten_calls_per_step']:.0f} aten calls, nested), "
                          f"{summary['compute_time_ms_per_step']:.1f} ms "
                          f"{summary['time_kind']} in them; "
                          f"table in {out}\nmodel alone, one step: "
                          f"{summary['model_ops']}")
        path = write_results("train_throughput-profile", device, payload, args.out)
        print(f"\nwrote {path}")
        return

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if loop == "train":
        stamps, last_bpd, model = time_train_loop(config, images, device, warmup)
    else:
        stamps, last_bpd, model = time_step_loop(config, images, device, warmup,
                                          args.compile_mode if args.compile else None,
                                          args.channels_last)
    memory, memory_kind = peak_memory_gib(device)
    window = stamps[warmup - 1 :] if warmup > 0 else stamps
    durations = [b - a for a, b in itertools.pairwise(window)]
    elapsed = window[-1] - window[0]
    n_steps = steps_in_window(len(durations), loop, config)
    images_per_sec = n_steps * batch / elapsed
    if n_steps < len(durations):  # reported late: the last interval is only the last update
        durations = durations[:-1]
    flops = math.nan if args.no_flops else flops_per_image(config.model, device)
    tflops = flops * images_per_sec / 1e12
    eval_bpd = math.nan
    if args.eval_images:
        test, _ = load_fashion_mnist("test")
        test = pad_images(test[: args.eval_images], config.model.image_size)
        eval_bpd = evaluate_bpd(model, ArrayDataset(test), 500, device)
    payload.update({
        "images_per_sec": images_per_sec,
        "step_ms_mean": 1000 * elapsed / n_steps,
        "step_ms_median": 1000 * statistics.median(durations),
        "step_ms_min": 1000 * min(durations),
        "step_ms": [round(1000 * d, 3) for d in durations],
        "flops_per_image": flops,
        "tflops_per_sec": tflops,
        "peak_memory_gib": memory,
        "peak_memory_kind": memory_kind,
        "last_train_bpd": last_bpd,
        "eval_images": args.eval_images,
        "eval_bpd_after_run": eval_bpd,
    })
    name = "tiny (L=3, K=4, width 64)" if args.tiny else "reference (L=3, K=32, width 512)"
    print_table(
        ["model", "device", "loop", "batch", "images/s", "step ms (median)",
         "GFLOP/image", "TFLOP/s", "peak memory GiB", "bpd after run"],
        [(name, device_slug(device), loop + (" +compile" if args.compile else "")
          + (" +channels-last" if args.channels_last else "")
          + (" +bf16" if bf16_active else ""), batch, f"{images_per_sec:.1f}",
          f"{payload['step_ms_median']:.1f}", f"{flops / 1e9:.3f}", f"{tflops:.4f}",
          f"{memory:.2f}", f"{eval_bpd:.4f}")],
        title=f"B1 training throughput ({steps} steps after {warmup} warm-up)")
    path = write_results("train_throughput" + ("-tiny" if args.tiny else ""), device,
                         payload, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
