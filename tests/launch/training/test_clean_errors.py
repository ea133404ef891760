"""Clean errors of a training run: one message naming what is wrong, no traceback from every rank.

* a full disk while checkpointing (a small tmpfs in a user and mount namespace): one message
  naming the checkpoint, the file, the space it needs and the space free; ``latest`` stays on the
  checkpoint before; a rerun after freeing space completes;
* a store that does not exist: named once;
* shared-memory segments of CPU runs killed with -9 are removed by the next run;
* TensorBoard without its package says why it is off.
"""

from __future__ import annotations

import json
import mmap
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.distributed import free_port
from tests.launch.training.test_train import REPO, STEPS, launch, run_values


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from tests.data.store_fixtures import write_store

    path = tmp_path_factory.mktemp("errors") / "store.zarr"
    return write_store(path, n_times=48, n_lat=9, n_lon=16, levels=(500, 850), surface=("msl", "t2m"),
                       upper_air=("z", "t"), tile_grid=(1, 2))


def namespaces_work() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not namespaces_work(), reason="needs user and mount namespaces (unshare -rm) for a small tmpfs")
def test_a_full_disk_stops_the_save_with_one_message_and_a_rerun_completes(store, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    run_dir = small / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_values(store, run_dir, mesh={"domain": [1, 2]}, training={"micro_batch": 1},
                                                checkpoint={"dir": str(run_dir), "every": 3, "keep": 2})))
    launcher = Path(sys.executable).parent / "deepspeed"

    def command(output: str) -> str:
        # by this interpreter, not the launcher's #! line: test_train.start_launch says why
        words = [sys.executable, str(launcher), "--num_gpus", "2", "--master_port", str(free_port()),
                 "launch/train.py", "--config", str(config), "--quiet"]
        return f"{shlex.join(words)} > {tmp_path / output} 2>&1; echo $? > {tmp_path / output}.rc"

    # two ranks' checkpoint at step 3 fits in 200 KB, a second one beside it does not
    script = "\n".join([f"mount -t tmpfs -o size=200k tmpfs {small}", command("first.txt"),
                        f"cp -r {run_dir} {tmp_path / 'full'}", f"mount -o remount,size=64m {small}",
                        command("second.txt"), f"cp -r {run_dir} {tmp_path / 'after'}"])
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    subprocess.run(["unshare", "-rm", "bash", "-c", script], cwd=REPO, env=env, timeout=900, check=True)
    first = (tmp_path / "first.txt").read_text()
    folder = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    assert int((tmp_path / "first.txt.rc").read_text()) != 0, first[-3000:]
    assert first.count(f"launch/train.py: checkpoint {folder}: ") == 1, first[-3000:]
    assert "needs about" in first and "are free there" in first and "rerun the same command" in first, first[-3000:]
    assert "Traceback" not in first, first[-3000:]
    full = tmp_path / "full" / "checkpoints"
    assert (full / "latest").read_text() == "step_00000003" and not (full / folder.name).exists()

    second = (tmp_path / "second.txt").read_text()
    assert int((tmp_path / "second.txt.rc").read_text()) == 0, second[-3000:]
    after = tmp_path / "after"
    assert (after / "checkpoints" / "latest").read_text() == folder.name and (after / "model.pt").exists()
    records = [json.loads(line) for line in (after / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))


def test_a_store_that_does_not_exist_is_named_once_without_a_traceback(store, tmp_path):
    values = run_values(store, tmp_path, mesh={"domain": [1, 2]}, training={"micro_batch": 1})
    values["data"]["store"] = str(tmp_path / "missing.zarr")
    result = launch(2, values, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output[-3000:]
    assert output.count(f"launch/train.py: {tmp_path / 'missing.zarr'}: cannot be opened as a zarr store") == 1, \
        output[-3000:]


def test_shared_memory_of_killed_cpu_runs_is_removed_and_live_segments_stay():
    from launch.runtime.distributed import SHARED_MEMORY_PREFIX, remove_stale_shared_memory

    def segment(name: str, age: float) -> Path:
        path = Path("/dev/shm") / f"{SHARED_MEMORY_PREFIX}_{os.getuid()}_127.0.0.1_{name}_0"
        path.write_bytes(b"\0" * 4096)
        os.utime(path, (time.time() - age, time.time() - age))
        return path

    killed, starting, live = segment("killed", 3600), segment("starting", 0), segment("live", 3600)
    with open(live, "r+b") as file, mmap.mmap(file.fileno(), 4096):  # a running rank maps its segment
        removed = remove_stale_shared_memory()
    try:
        assert killed in removed and not killed.exists()
        assert starting.exists() and live.exists()
    finally:
        for path in (killed, starting, live):
            path.unlink(missing_ok=True)


def test_tensorboard_is_written_or_says_why_not(tmp_path, capsys):
    from launch.training.metrics_log import MetricsLog

    log = MetricsLog(tmp_path, tensorboard=True, enabled=True)
    log.write({"step": 1, "loss": 0.5})
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert "logging.tensorboard is on but the tensorboard package is not installed" in capsys.readouterr().err
    else:
        assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
