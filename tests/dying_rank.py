"""``anomaly-flow`` as one rank of a torchrun training whose rank 1 dies, for
``tests/test_torchrun.py``.

Usage:
    python -m torch.distributed.run --nproc_per_node 2 tests/dying_rank.py train ARGS...

Rank 1 ends itself outright (``os._exit``, as the OOM killer would end it) as its fifth
training step begins; every rank otherwise runs ``anomaly-flow`` with the arguments given.
"""

from __future__ import annotations

import os
import sys

from anomaly_flow import train as train_module
from anomaly_flow.cli import run

DEATH_STEP = 5

_real_step = train_module._forward_backward
_steps = 0


def _dying_step(*args: object, **kwargs: object) -> object:
    global _steps
    _steps += 1
    if os.environ.get("RANK") == "1" and _steps == DEATH_STEP:
        os._exit(9)
    return _real_step(*args, **kwargs)


if __name__ == "__main__":
    train_module._forward_backward = _dying_step
    sys.argv = ["anomaly-flow", *sys.argv[1:]]
    run()
