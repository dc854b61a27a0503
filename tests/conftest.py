"""Shared fixtures: real image folders, MLflow stores, and one tiny trained model.

MLflow's tracking URI is process-global. Every fixture below that hands out a store
calls :func:`anomaly_flow.tracking.configure` on it before the test runs; a test that
switches stores itself must do the same. ``MLFLOW_TRACKING_URI`` and
``MLFLOW_REGISTRY_URI`` are removed for the whole session, so tests never write to a
developer's own server.

Fixtures:
    sample: The Fashion-MNIST sample shipped with the package (``load_sample()``).
    image_dirs (session): Real PNG folders written from the sample (28x28 grey):
        ``train`` (48 normal), ``calibration`` (40 normal, disjoint from train),
        ``test_normal`` (16 normal) and ``test_anomalous`` (16 other classes). Read only.
    mlflow_db_template (session): An empty, migrated ``mlflow.db``; copying it is much
        faster than letting MLflow create a new database (seconds of migrations).
    mlruns: A fresh, empty store in ``tmp_path / "mlruns"``, configured.
    trained (session store, configured per test): a :class:`TrainedModel` - the
        ``tiny`` preset (2 epochs) trained on ``image_dirs.train`` by
        ``train_and_register`` and registered as ``tiny-parts`` version 1 with alias
        ``candidate``. Shared: do not move its aliases or add versions to it; register
        calibrated versions in a store of your own (``mlruns``), e.g. by logging
        ``load_model(trained.alias_uri).model`` there.
    tracking_env: ``os.environ`` plus the venv's ``bin`` on ``PATH`` (``mlflow models
        serve`` starts ``uvicorn`` by name), for subprocesses.
    free_port: A TCP port on 127.0.0.1 that was free a moment ago.
    one_thread: One intra-op torch thread during the test (``pytestmark =
        pytest.mark.usefixtures("one_thread")`` for a whole module).

Helpers (``from tests.conftest import ...``): ``tiny_config(epochs)``, ``new_store(folder,
template)``, ``corrupt_png(path)``, ``gray_images(n)``, ``unused_port()``,
``torchrun(*args)`` (a two-rank command and its environment), ``run_killed(code)`` (a
process that kills itself), and the ``ImageDirs`` and ``TrainedModel`` types.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import strategies as st

from anomaly_flow.config import RunConfig, load_preset
from anomaly_flow.data import write_image_folder
from anomaly_flow.fashion_mnist import SampleData, load_sample
from anomaly_flow.glow import Glow
from anomaly_flow.scoring import ScoringDataset, score_dataset

MODEL_NAME = "tiny-parts"


@pytest.fixture(autouse=True, scope="session")
def _temporary_files_of_this_session(tmp_path_factory: pytest.TempPathFactory
                                     ) -> Iterator[None]:
    """What the code under test leaves in the temporary folder goes to this session's
    pytest folder (pytest keeps the last three sessions'), not to /tmp for good: the copy
    ``mlflow.pyfunc.load_model`` downloads a model to and never removes, and what the
    processes the tests kill on purpose cannot remove. Subprocesses inherit it
    (``TMPDIR``)."""
    folder = str(tmp_path_factory.mktemp("tmp"))
    saved_env, saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = folder, folder
    yield
    tempfile.tempdir = saved
    if saved_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved_env


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_heard_in_this_session() -> Iterator[None]:
    """The tests that press Ctrl-C (SIGINT) on a command need it heard. A shell starts a
    background job (``pytest ... &`` in a script) with SIGINT ignored, which every
    process inherits, and Python then never raises KeyboardInterrupt; a handler, unlike
    an ignored signal, is reset to the default when a subprocess starts, so with
    Python's own handler here the tests' processes hear Ctrl-C as a terminal's user's
    would."""
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


# The scoring tests' folder and model (tests/test_scoring.py, test_folder_scoring.py,
# test_cli_score.py), built once in each module that asks for them.

@pytest.fixture(scope="module")
def model() -> Glow:
    """The tiny Glow of :func:`tests.test_scoring.make_tiny_model`."""
    from tests.test_scoring import make_tiny_model

    return make_tiny_model()


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good images beside every kind of bad file (:data:`tests.test_scoring.MESSY`)."""
    from tests.test_scoring import make_messy_folder

    return make_messy_folder(tmp_path_factory.mktemp("messy") / "images")


@pytest.fixture(scope="module")
def full_table(model: Glow, messy: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> pd.DataFrame:
    """An uninterrupted run over the messy folder, read back from CSV."""
    from anomaly_flow.folder_scoring import score_folder
    from tests.test_scoring import read_csv

    out = tmp_path_factory.mktemp("full") / "scores.csv"
    score_folder(model, None, messy, out, batch_size=64)
    return read_csv(out)


@pytest.fixture(autouse=True)
def _store_folder_of_the_test() -> Iterator[None]:
    """Each test starts with ``mlruns=None`` meaning ``./mlruns``, whatever folder an
    earlier test (or a module's fixture) gave ``tracking.configure``, as a command does."""
    store = sys.modules.get("anomaly_flow.tracking.store")
    with store.own_store_folder() if store is not None else contextlib.nullcontext():
        yield


@pytest.fixture(autouse=True, scope="session")
def _no_user_mlflow_store() -> Iterator[None]:
    saved = {key: os.environ.pop(key, None)
             for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    for key, value in saved.items():
        if value is not None:
            os.environ[key] = value


@pytest.fixture(scope="session")
def sample() -> SampleData:
    return load_sample()


@dataclass(frozen=True)
class ImageDirs:
    """Folders of real PNG files (see the module docstring)."""

    root: Path
    train: Path
    calibration: Path
    test_normal: Path
    test_anomalous: Path

    def files(self, folder: Path) -> list[Path]:
        """The images of one folder, sorted."""
        return sorted(folder.glob("*.png"))


@pytest.fixture(scope="session")
def image_dirs(tmp_path_factory: pytest.TempPathFactory, sample: SampleData) -> ImageDirs:
    root = tmp_path_factory.mktemp("images")
    normal = sample.test_images[~sample.test_is_anomaly]
    anomalous = sample.test_images[sample.test_is_anomaly]
    dirs = ImageDirs(root, root / "train", root / "calibration", root / "test" / "normal",
                     root / "test" / "anomalous")
    write_image_folder(sample.train[:48], dirs.train, "train-")
    write_image_folder(sample.calibration[:40], dirs.calibration, "cal-")
    write_image_folder(normal[:16], dirs.test_normal, "normal-")
    write_image_folder(anomalous[:16], dirs.test_anomalous, "anomalous-")
    return dirs


def tiny_config(epochs: int = 2) -> RunConfig:
    """The ``tiny`` preset with fewer epochs, for tests."""
    return load_preset("tiny").replace(epochs=epochs)


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import mlflow

    folder = tmp_path_factory.mktemp("mlflow-template")
    db = folder / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}",
                        registry_uri=f"sqlite:///{db}").search_experiments()
    return db


def new_store(folder: Path, template: Path) -> Path:
    """An empty store in ``folder`` (created), from the migrated template database, with
    its artifacts folder, as ``tracking.configure`` makes one."""
    (folder / "artifacts").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, folder / "mlflow.db")
    return folder


@pytest.fixture
def mlruns(tmp_path: Path, mlflow_db_template: Path) -> Path:
    from anomaly_flow import tracking

    folder = new_store(tmp_path / "mlruns", mlflow_db_template)
    tracking.configure(folder)
    return folder


@dataclass(frozen=True)
class TrainedModel:
    """The session's tiny trained model and the store that holds it."""

    name: str
    mlruns: Path
    tracking_uri: str
    run_id: str
    version: str
    val_bpd: float
    config: RunConfig
    data: Path

    @property
    def alias_uri(self) -> str:
        return f"models:/{self.name}@candidate"

    @property
    def version_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def run_uri(self) -> str:
        return f"runs:/{self.run_id}/model"


@pytest.fixture(scope="session")
def _trained_store(tmp_path_factory: pytest.TempPathFactory, image_dirs: ImageDirs,
                   mlflow_db_template: Path) -> TrainedModel:
    from anomaly_flow import tracking

    mlruns = new_store(tmp_path_factory.mktemp("trained") / "mlruns", mlflow_db_template)
    config = tiny_config()
    outcome = tracking.train_and_register(image_dirs.train, MODEL_NAME, config, device="cpu",
                                          mlruns=mlruns, progress=False)
    assert outcome.version == "1", outcome.message
    return TrainedModel(MODEL_NAME, mlruns, tracking.default_tracking_uri(mlruns),
                        outcome.run_id, outcome.version, outcome.val_bpd, config,
                        image_dirs.train)


@pytest.fixture
def trained(_trained_store: TrainedModel) -> TrainedModel:
    from anomaly_flow import tracking

    tracking.configure(_trained_store.mlruns)
    return _trained_store


@pytest.fixture
def tracking_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test: fair to the other tests on a 2-core machine, and
    the same reduction order in every run of a comparison."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unused_port() -> int:
    """A TCP port on 127.0.0.1 that no one listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def free_port() -> int:
    return unused_port()



def torchrun(*args: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment that start ``args`` as two CPU ranks under torchrun:
    one thread a rank, the rendezvous on an unused port of 127.0.0.1, the caller's
    tracking URI and world size dropped."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(unused_port()), *args]
    return cmd, env


def run_killed(code: str) -> None:
    """Run the Python ``code`` from the repository root in a process that kills itself
    outright (SIGKILL, as the OOM killer would), and check that it did. The temporary
    folders it cannot remove (MLflow's, for the artifacts it was logging) stay in the
    session's folder (``_temporary_files_of_this_session``)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr


def corrupt_png(path: Path) -> Path:
    """Write a file named like a PNG that is not an image (parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a PNG\n")
    return path


def ended_process_id() -> int:
    """The id of a process that has run and ended (reaped): what a killed run's temp
    names carry."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def gray_images(n: int, seed: int = 0, size: int = 28) -> np.ndarray:
    """``n`` random blocky grey images ``(n, 1, size, size)`` uint8 (no sample needed)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, size // 4, size // 4)).astype(np.uint8)
    return base.repeat(4, axis=2).repeat(4, axis=3)


def obeying_file_modes(command: list[str]) -> list[str]:
    """``command`` run so that file modes bind it: as root (who reads and writes past
    them), through ``setpriv`` without the two capabilities that allow that; the test is
    skipped where setpriv (util-linux) is missing."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, and setpriv (util-linux) is missing to drop root's "
                    "power over file modes")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", *command]


JSON_VALUES = st.recursive(  # what a hand-edited JSON or TOML file can hold
    st.none() | st.booleans() | st.integers(-10**20, 10**20)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                   max_size=3),
    max_leaves=5)


def json_paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON value (a list's first item only)."""
    places = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            places += json_paths(item, (*prefix, key))
    elif isinstance(value, list) and value:
        places += json_paths(value[0], (*prefix, 0))
    return places


FILE_EDITS = st.lists(st.tuples(st.sampled_from(["set", "insert", "cut", "truncate"]),
                                st.floats(0, 1), st.binary(min_size=1, max_size=8)),
                      min_size=1, max_size=4)
"""Damage to a file, as :func:`damaged` applies it: a few bytes overwritten, inserted or
cut at a relative position, or the rest cut off."""


def damaged(content: bytes, edits: list[tuple[str, float, bytes]]) -> bytes:
    """``content`` with ``edits`` (:data:`FILE_EDITS`) applied in order."""
    data = bytearray(content)
    for action, where, piece in edits:
        at = int(where * len(data))
        if action == "set":
            data[at:at + len(piece)] = piece
        elif action == "insert":
            data[at:at] = piece
        elif action == "cut":
            del data[at:at + len(piece)]
        else:
            del data[at:]
    return bytes(data)


def stop_during(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> None:
    """Make ``owner.name`` meet a SIGTERM as it begins, as a scheduler's stop landing
    inside the call would: the handler it would find must be the stop handler (else the
    signal would kill the process), which raises the stop, or keeps it until a store write
    is done (then the call itself, the real one, goes on)."""
    from anomaly_flow import stopping

    real = getattr(owner, name)

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        assert signal.getsignal(signal.SIGTERM) is stopping._interrupt, \
            "no stop handler here: a SIGTERM would kill the process"
        stopping._interrupt(signal.SIGTERM, None)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)


@pytest.fixture
def signal_handlers_restored() -> Iterator[None]:
    """A command run in-process keeps its stop handlers once stopped (for its process's
    exit): the test's own come back after it."""
    from anomaly_flow import stopping

    handlers = {number: signal.getsignal(number)
                for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    stopping._STOPPED_AT.clear()
    for number, handler in handlers.items():
        signal.signal(number, handler)


# The pyfunc runs on CUDA when there is one ("auto"); references load the same way, so
# that exact comparisons hold on a GPU machine too.
AUTO = "auto"


def library_scores(model: Glow, sources: list) -> pd.DataFrame:
    """What the library itself says for these files: the reference for every path."""
    cfg = model.config
    return score_dataset(model, ScoringDataset(sources, cfg))
