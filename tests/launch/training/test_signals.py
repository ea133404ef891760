"""Signals, a dead launcher and a frozen rank, on two CPU ranks under the real launchers.

* SIGTERM to the ``deepspeed`` command alone (it forwards nothing and exits), SIGTERM and SIGINT
  to the whole process group, SIGKILL of the launcher: the ranks write the stop checkpoint and
  exit; none is left running.
* Under ``torchrun`` (it forwards the signal and waits for the ranks): the job's exit status comes
  after the checkpoint is complete.
* A frozen rank (SIGSTOP) ends the job after ``training.collective_timeout_seconds`` with a
  message naming the step and the time-out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.distributed import free_port
from tests.launch.training.test_train import REPO, run_values

LONG = 100000  # steps: the runs end by signal


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from tests.data.store_fixtures import write_store

    path = tmp_path_factory.mktemp("signals") / "store.zarr"
    return write_store(path, n_times=48, n_lat=9, n_lon=16, levels=(500, 850), surface=("msl", "t2m"),
                       upper_air=("z", "t"), tile_grid=(1, 2))


def start(launcher: str, store: Path, run_dir: Path, **training) -> subprocess.Popen:
    """Two ranks (domain 1x2) in a session of their own, so that a signal to its process group
    reaches the launcher's processes and the ranks only."""
    values = run_values(store, run_dir, mesh={"domain": [1, 2]},
                        training={"steps": LONG, "micro_batch": 1, **training},
                        logging={"every": 1, "validate_every": LONG, "tensorboard": False},
                        checkpoint={"dir": str(run_dir), "every": LONG})
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "run.yaml"
    config.write_text(yaml.safe_dump(values))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    tool = Path(sys.executable).parent / launcher
    port = str(free_port())
    # by this interpreter (test_train.start_launch says why); the launcher's command line is the one
    # its #! line gives: python, the script, its arguments
    command = ([sys.executable, str(tool), "--num_gpus", "2", "--master_port", port] if launcher == "deepspeed"
               else [sys.executable, str(tool), "--nproc_per_node", "2", "--master_port", port])
    output = open(run_dir / "output.txt", "w")
    return subprocess.Popen([*command, "launch/train.py", "--config", str(config)], cwd=REPO, env=env,
                            stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def ranks_of(process: subprocess.Popen) -> list[psutil.Process]:
    """The processes that run ``launch/train.py`` as their script (not the launchers that carry it
    as an argument; their environment may hold LOCAL_RANK from the test process itself)."""
    return [p for p in psutil.Process(process.pid).children(recursive=True) if _script(p).endswith("launch/train.py")]


def _environ(process: psutil.Process) -> dict:
    try:
        return process.environ()
    except psutil.Error:
        return {}


def _script(process: psutil.Process) -> str:
    """The first argument after the interpreter and its options: the script a Python process runs."""
    try:
        arguments = process.cmdline()[1:]
    except psutil.Error:
        return ""
    return next((a for a in arguments if not a.startswith("-")), "")


def wait_for_steps(process: subprocess.Popen, run_dir: Path, steps: int) -> list[psutil.Process]:
    """Until ``steps`` steps are logged; the rank processes."""
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert process.poll() is None and time.monotonic() < deadline, (run_dir / "output.txt").read_text()[-3000:]
        time.sleep(0.2)
    ranks = ranks_of(process)
    assert len(ranks) == 2, [p.cmdline() for p in psutil.Process(process.pid).children(recursive=True)]
    return ranks


def stop_checkpoint(run_dir: Path) -> int:
    """The step of the checkpoint the stop wrote (complete, and named by ``latest``)."""
    output = (run_dir / "output.txt").read_text()
    latest = run_dir / "checkpoints" / "latest"
    assert latest.exists(), output[-3000:]
    step = int(latest.read_text().split("_")[1])
    assert 3 <= step < LONG and (run_dir / "checkpoints" / latest.read_text() / "COMPLETE").exists(), output[-3000:]
    assert f"stopped at step {step}" in output, output[-3000:]
    return step


def cleanup(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@pytest.mark.parametrize("how", ["sigterm-launcher-alone", "sigterm-process-group", "sigint-process-group",
                                 "sigkill-launcher"])
def test_deepspeed_launcher_signals_end_with_the_stop_checkpoint(store, tmp_path, how):
    process = start("deepspeed", store, tmp_path)
    try:
        ranks = wait_for_steps(process, tmp_path, 3)
        if how == "sigterm-launcher-alone":
            process.send_signal(signal.SIGTERM)
        elif how == "sigkill-launcher":
            process.kill()
        else:
            os.killpg(process.pid, signal.SIGTERM if how.startswith("sigterm") else signal.SIGINT)
        _, alive = psutil.wait_procs(ranks, timeout=120)
        assert not alive, f"ranks still running: {alive}\n{(tmp_path / 'output.txt').read_text()[-3000:]}"
        stop_checkpoint(tmp_path)
        assert all(rank.returncode == 0 for rank in ranks) if ranks[0].returncode is not None else True
    finally:
        cleanup(process)


@pytest.mark.parametrize("how", ["sigterm-launcher-alone", "sigterm-process-group"])
def test_torchrun_exits_after_the_stop_checkpoint_is_complete(store, tmp_path, how):
    process = start("torchrun", store, tmp_path)
    try:
        wait_for_steps(process, tmp_path, 3)
        if how == "sigterm-launcher-alone":
            process.send_signal(signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)
        stop_checkpoint(tmp_path)  # already there when the launcher's exit status came
    finally:
        cleanup(process)


def test_a_frozen_rank_ends_the_job_after_the_collective_timeout(store, tmp_path):
    process = start("deepspeed", store, tmp_path, collective_timeout_seconds=10)
    try:
        ranks = wait_for_steps(process, tmp_path, 3)
        frozen = next(r for r in ranks if "--local_rank=1" in r.cmdline() or _environ(r).get("LOCAL_RANK") == "1")
        frozen.suspend()
        started = time.monotonic()
        returncode = process.wait(timeout=180)
        output = (tmp_path / "output.txt").read_text()
        assert returncode != 0, output[-3000:]
        assert "rank 0: step" in output and "training.collective_timeout_seconds = 10 s" in output, output[-3000:]
        assert time.monotonic() - started < 120
    finally:
        for rank in ranks_of(process) if process.poll() is None else []:
            rank.resume()
        cleanup(process)


@pytest.mark.parametrize("arguments, launcher", [
    (["/venv/bin/python", "/venv/bin/deepspeed", "--num_gpus", "2", "launch/train.py"], True),
    (["/venv/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30="], True),
    (["/venv/bin/python", "/venv/bin/torchrun", "--nproc_per_node", "2", "launch/train.py"], True),
    (["torchrun", "--nproc_per_node", "2", "launch/train.py"], True),
    (["timeout", "60", "/venv/bin/torchrun", "--nproc_per_node", "2"], False),
    (["/bin/bash", "-c", "deepspeed launch/train.py"], False),
    (["/venv/bin/python", "launch/train.py", "--config", "deepspeed"], False),
])
def test_launcher_command_lines_are_recognised(arguments, launcher):
    from launch.runtime.launcher_watch import is_launcher

    assert is_launcher(arguments) == launcher
