"""One rank of the DDP test in ``test_train.py``, started by ``torchrun``.

Usage:
    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py \\
        DATA_DIR CONFIG_JSON OUT_DIR

Trains on the CPU (gloo) with the configuration in ``CONFIG_JSON`` on the images under
``DATA_DIR``, checkpointing into ``OUT_DIR/checkpoints``, and writes what the test
compares: ``OUT_DIR/rank<R>.safetensors`` (final weights) and ``OUT_DIR/rank<R>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from anomaly_flow.config import RunConfig
from anomaly_flow.train import folder_datasets, train


def thread_names() -> list[str]:
    """The names of this process's threads (Linux)."""
    tasks = Path("/proc/self/task")
    return [(task / "comm").read_text().strip() for task in tasks.iterdir()]


def main(data_dir: str, config_json: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    config = RunConfig.from_dict(json.loads(Path(config_json).read_text()))
    data = folder_datasets(data_dir, config)
    out = Path(out_dir)
    result = train(config, data.train, data.val, device="cpu",
                   checkpoint_dir=out / "checkpoints", progress=False)
    rank = int(os.environ["RANK"])
    state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
    save_file(state, str(out / f"rank{rank}.safetensors"))
    report = {
        "world": int(os.environ["WORLD_SIZE"]),
        "steps": result.steps,
        "val_bpd": result.val_bpd,
        "failed_files": result.failed_files,
        "checkpoint_dir": str(result.checkpoint_dir) if result.checkpoint_dir else None,
        "group_left": not dist.is_initialized(),
        "gloo_threads": sorted(name for name in thread_names() if "gloo" in name),
        "samples_shape": list(result.samples.shape),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
