"""``anomaly-flow`` as one rank of a torchrun training whose rank 1 dies, for
``tests/test_torchrun.py``.

Usage:
    python -m torch.distributed.run --nproc_per_node 2 tests/dying_rank.py train ARGS...

Rank 1 ends itself outright (``os._exit``, as the OOM killer would end it) in its sixth
training step (the second of an epoch, so that rank 0 has no checkpoint, validation or
epoch's logging to do before it), a second after the step begins: by then rank 0 waits in
that step's all-reduce, so it meets the closed connection at once, however busy the machine,
and well before torchrun's next look at its workers (which would stop it as an
interruption). Every rank otherwise runs ``anomaly-flow`` with the arguments given.
"""

from __future__ import annotations

import os
import sys
import time

from anomaly_flow import train as train_module
from anomaly_flow.cli import run

DEATH_STEP = 6
DEATH_DELAY_S = 1.0

_real_step = train_module._forward_backward
_steps = 0


def _dying_step(*args: object, **kwargs: object) -> object:
    global _steps
    _steps += 1
    if os.environ.get("RANK") == "1" and _steps == DEATH_STEP:
        time.sleep(DEATH_DELAY_S)
        os._exit(9)
    return _real_step(*args, **kwargs)


if __name__ == "__main__":
    train_module._forward_backward = _dying_step
    sys.argv = ["anomaly-flow", *sys.argv[1:]]
    run()
