"""``anomaly-flow train`` under torchrun where its processes disagree or fail: ranks that
list different images or were given different settings, a host without the checkpoint a
resume starts from, a rank that dies mid-training, errors every process meets alike said
once per host, and a torchrun killed outright. Real torchrun processes (gloo on the CPU);
two "hosts" are two torchrun agents on 127.0.0.1, each in its own working folder, so that
relative paths (the data, ``--mlruns``) name different folders as on two machines."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

from anomaly_flow import distributed
from anomaly_flow.cli import main
from tests.conftest import ImageDirs, new_store, torchrun, unused_port
from tests.test_cli_train import often_config


def two_hosts(folders: list[Path], *args: str, apart: tuple[list[str], list[str]] = ([], [])
              ) -> list[subprocess.CompletedProcess[str]]:
    """``anomaly-flow ARGS`` as one training of two processes, one per "host": torchrun
    node ranks 0 and 1, each started in its folder of ``folders``, each with its own
    further arguments of ``apart``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("WORLD_SIZE", None)
    port = str(unused_port())
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
         "1", "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port,
         "-m", "anomaly_flow", *args, *apart[node]],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node, folder in enumerate(folders)]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=400)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def assert_one_error(stderr: str, pattern: str) -> None:
    """``stderr`` has one ``Error:`` line, and ``pattern`` matches all of it."""
    said = errors(stderr)
    assert len(said) == 1, stderr[-3000:]
    assert re.fullmatch(pattern, said[0]), said[0]


def assert_every_rank_refused(results: list[subprocess.CompletedProcess[str]],
                              pattern: str) -> None:
    """Each process exited 1 with one ``Error:`` line that ``pattern`` matches all of."""
    for result in results:
        assert result.returncode == 1, result.stderr[-3000:]
        assert_one_error(result.stderr, pattern)


def hosts_with_data(root: Path, image_dirs: ImageDirs, counts: tuple[int, int]) -> list[Path]:
    """Two host folders, each with ``data/`` holding the first N training images."""
    hosts = [root / "host-a", root / "host-b"]
    for host, n in zip(hosts, counts, strict=True):
        (host / "data").mkdir(parents=True)
        for path in image_dirs.files(image_dirs.train)[:n]:
            shutil.copy(path, host / "data" / path.name)
    return hosts


@pytest.mark.slow
def test_ranks_that_list_different_images_refuse_together(image_dirs: ImageDirs,
                                                          tmp_path: Path) -> None:
    """Each rank lists the folder itself: two copies that differ (or a folder that changed
    while they read it) would split it differently and validate on images another rank
    trains on, or leave the collectives out of step (gloo aborts)."""
    hosts = hosts_with_data(tmp_path, image_dirs, (40, 41))
    results = two_hosts(hosts, "train", "data", "--name", "split", "--preset", "tiny",
                        "--device", "cpu", "--mlruns", "ml")
    assert_every_rank_refused(
        results,
        r"Error: the processes of this training see different images in data \(rank 0 "
        r"\(.+\): 40 images, fingerprint [0-9a-f]{12}; rank 1 \(.+\): 41 images, "
        r"fingerprint [0-9a-f]{12}\): the folder changed while they read it, or the "
        r"hosts' copies differ; keep it unchanged while training, the same on every "
        r"host, and train again")
    assert not (hosts[0] / "ml" / "mlflow.db").exists()  # refused before any run


@pytest.mark.slow
def test_ranks_given_different_settings_refuse_together(image_dirs: ImageDirs,
                                                        tmp_path: Path) -> None:
    """A host given another --epochs (or configuration file, or --resume) would train
    another model, or stop at another step and leave the others waiting in a collective
    until the group's timeout: every rank refuses, naming what differs, before any run."""
    hosts = hosts_with_data(tmp_path, image_dirs, (40, 40))
    results = two_hosts(hosts, "train", "data", "--name", "apart", "--preset", "tiny",
                        "--device", "cpu", "--mlruns", "ml",
                        apart=(["--epochs", "1"], ["--epochs", "2"]))
    assert_every_rank_refused(
        results,
        r"Error: the processes of this training were given different settings: "
        r"train\.epochs is 1 on rank 0 \(.+\), 2 on rank 1 \(.+\); give every process "
        r"the same command, options and configuration file, then train again")
    assert not (hosts[0] / "ml" / "mlflow.db").exists()  # refused before any run


@pytest.mark.slow
def test_a_resume_needs_the_checkpoint_on_every_host_and_may_change_the_process_count(
        image_dirs: ImageDirs, tmp_path: Path, mlflow_db_template: Path) -> None:
    """Only rank 0 writes checkpoints; every rank loads the one a resume starts from from
    its own --mlruns. A host without it is refused on every rank (its rank would otherwise
    say "train without --resume", and rank 0 die in gloo); with the folder copied there
    the resume goes on, from one process to two, warned about and tagged."""
    hosts = hosts_with_data(tmp_path, image_dirs, (48, 48))
    store = new_store(hosts[0] / "ml", mlflow_db_template)
    often_config(hosts[0], epochs=1)
    often_config(hosts[1], epochs=1)
    alone = CliRunner().invoke(main, ["train", str(hosts[0] / "data"), "--name", "moved",
                                      "--config", str(hosts[0] / "often-1.toml"),
                                      "--device", "cpu", "--mlruns", str(store)])
    assert alone.exit_code == 0, alone.output
    resume = ("train", "data", "--name", "moved", "--config", "often-1.toml", "--epochs", "2",
              "--device", "cpu", "--mlruns", "ml", "--resume")
    assert_every_rank_refused(
        two_hosts(hosts, *resume),
        r"Error: rank 0 resumes from the checkpoint step-\d{8} in .+, but rank 1 \(host "
        r".+\) finds none there: every process reads the checkpoint, and only rank 0 "
        r"writes it; on several hosts put --mlruns on a file system they all share \(or "
        r"copy that folder to the same path on each\), then run the same command again")

    shutil.copytree(hosts[0] / "ml", hosts[1] / "ml")
    first, second = two_hosts(hosts, *resume)
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-3000:]
    assert "resuming with 2 process(es) a training of 1 wrote" in first.stderr
    assert "registered models:/moved/2 with alias candidate" in first.stderr  # 1: alone
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("moved").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["processes"] == "1" and run.data.tags["resumed.processes"] == "2"


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_others_with_the_checkpoint_to_resume_from(
        image_dirs: ImageDirs, tmp_path: Path) -> None:
    """Rank 1 is killed outright in its sixth step (tests/dying_rank.py) while rank 0 waits
    in that step's all-reduce: rank 0 meets the closed connection and says so in one line,
    with the checkpoint to go on from, not gloo's traceback. torchrun looks at its workers
    every 5 s here, so that it finds rank 1 gone after rank 0 has (had it looked first, it
    would have stopped rank 0, which says that as an interruption)."""
    store, config = tmp_path / "store", often_config(tmp_path, epochs=4)
    args = ["train", str(image_dirs.train), "--name", "dies", "--config", str(config),
            "--device", "cpu", "--mlruns", str(store)]
    cmd, env = torchrun("--monitor-interval", "5",
                        str(Path(__file__).with_name("dying_rank.py")), *args)
    died = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400,
                          cwd=tmp_path)
    assert died.returncode != 0
    assert_one_error(
        died.stderr,
        r"Error: another process of this torchrun stopped or lost its connection \(.*[Cc]"
        r"onnection (reset|closed) by peer.*\); its own message \(above, or in its host's "
        r"log\) says why: mend that, then run the same command with --resume to go on from "
        rf"the last checkpoint \(step-00000004 in {re.escape(str(store))}/checkpoints/dies\)")
    assert "[rank0]:" not in died.stderr  # no traceback of rank 0's
    # what --resume goes on from (a resume under torchrun is tested above)
    assert (store / "checkpoints" / "dies" / "step-00000004" / "state.json").is_file()


def test_an_error_every_process_meets_is_said_by_one_process_per_host(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As torchrun starts the second process of a host (LOCAL_RANK 1 of 2): a folder
    without images, a missing folder and a bad option end it with their exit codes and
    nothing on stderr, which the host's first process prints; the first process prints
    them."""
    (tmp_path / "empty").mkdir()
    empty = ["train", str(tmp_path / "empty"), "--name", "x", "--preset", "tiny",
             "--device", "cpu", "--mlruns", str(tmp_path / "ml")]
    missing = ["train", str(tmp_path / "nope"), "--name", "x"]
    bogus = ["train", str(tmp_path), "--name", "x", "--bogus"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for local_rank, said in (("1", 0), ("0", 1)):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        for args, code in ((empty, 1), (missing, 2), (bogus, 2)):
            result = CliRunner().invoke(main, args)
            assert result.exit_code == code, result.output
            assert len(errors(result.stderr)) == said, result.stderr
            assert "Traceback" not in result.output


RANK = textwrap.dedent("""
    import os, sys, time
    from anomaly_flow import distributed
    from anomaly_flow.stopping import sigterm_as_interrupt
    print("imported", flush=True)
    if sys.argv[1] == "before":  # torchrun dies before the process asks to hear of it
        while os.getppid() == distributed._PARENT:
            time.sleep(0.05)
    try:
        with sigterm_as_interrupt():
            print("set up" if distributed.end_with_launcher() else "not set up", flush=True)
            time.sleep(60)
        print("slept on", flush=True)
    except KeyboardInterrupt as stop:
        print("stopped", type(stop).__name__, flush=True)
""")

LAUNCHER = textwrap.dedent("""
    import subprocess, sys
    rank = subprocess.Popen([sys.executable, "-c", *sys.argv[1:3]], start_new_session=True,
                            stdout=open(sys.argv[3], "w"), stderr=subprocess.STDOUT)
    rank.wait()
""")


def wait_for_text(path: Path, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.exists() else "") \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    return path.read_text()


@pytest.mark.parametrize("killed", ["after", "before"])
def test_a_process_of_a_torchrun_killed_outright_is_stopped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, killed: str) -> None:
    """torchrun starts each process in a session of its own (as the launcher here does):
    killed outright (SIGKILL, the OOM killer), it forwards no stop, and its processes
    trained on, orphaned. Linux now sends each SIGTERM, which ends training as Ctrl-C
    does; killed before the process asked for that, the process stops itself as it asks.
    (The echoes of that signal a launcher of several threads causes are test_stopping's.)"""
    out = tmp_path / "rank.txt"
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test", "PYTHONPATH": str(
        Path(__file__).resolve().parents[1])}
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, RANK, killed, str(out)],
                                env=env)
    assert wait_for_text(out, "set up" if killed == "after" else "imported", 60) \
        == "imported\n" + ("set up\n" if killed == "after" else "")
    launcher.kill()
    launcher.wait()
    assert wait_for_text(out, "stopped", 30) == "imported\n" + (
        "set up\n" if killed == "after" else "") + "stopped Terminated\n"
    # alone, or started by another launcher, a process sets nothing up
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert not distributed.end_with_launcher()
