"""Training through the real `deepspeed` launcher on CPU ranks: the three equalities.

* mesh vs serial: a model split over domain x tensor, and data-parallel replicas under
  ZeRO 0/1/2, give the losses of one process;
* resumed vs uninterrupted: a run stopped at step k and restarted continues bitwise;
* resharded vs original: a checkpoint trained on one mesh gives the same forward outputs
  on other meshes and on one process.

Float32 (bf16 off) so that the comparisons are tight; each launch costs ~10-30 s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from launch.training.checkpoint_format import load_consolidated
from launch.training.profiling import parse_step_window
from launch.training.config import RunConfigError, load_run_config
from launch.runtime.rank_inputs import RankInputs
from parallel.sharding import load_full_state
from tests.distributed import spawn
from tests.parallel.equivalence import build_mesh, relative_error
from weathermixer.model import WeatherMixer

REPO = Path(__file__).resolve().parents[3]
STEPS = 6


def run_values(store: Path, run_dir: Path, **sections) -> dict:
    # the training period holds 6 windows of 2 lead steps: 3 steps of 2 samples per epoch, so
    # every run of STEPS steps crosses an epoch boundary
    values = {
        "model": {"preset": "tiny", "overrides": {"hidden": 16}},
        "data": {"store": str(store), "train": ["2020-01-01", "2020-01-02"], "validation": ["2020-01-11", "2020-01-12"]},
        "training": {"steps": STEPS, "micro_batch": 2, "rollout": [{"from_step": 0, "steps": 1},
                                                                  {"from_step": 3, "steps": 2}]},
        "schedule": {"warmup_steps": 2},
        "optimizer": {"lr": 3e-3, "embedding_lr": 1e-3},
        "checkpoint": {"dir": str(run_dir), "every": 3},
        "logging": {"every": 1, "validate_every": 3, "validation_samples": 2, "tensorboard": False},
        "deepspeed": "configs/deepspeed/zero0.json",
        "deepspeed_overrides": {"bf16": {"enabled": False}},
    }
    for section, changes in sections.items():
        values[section] = {**values.get(section, {}), **changes} if isinstance(changes, dict) else changes
    return values


def launch(n_processes: int, values: dict, *args: str, check: bool = True,
           avoid_ports: set[int] = frozenset()) -> subprocess.CompletedProcess:
    return finish(start_launch(n_processes, values, *args, avoid_ports=avoid_ports), check=check)


def launch_together(*jobs: tuple, check: bool = True) -> list[subprocess.CompletedProcess]:
    """Independent runs at once, each ``(n_processes, values, *args)``: one-process runs use one
    thread each (OMP_NUM_THREADS=1), so two of them share two cores instead of taking turns."""
    started = []
    for job in jobs:
        started.append(start_launch(*job, avoid_ports={s.port for s in started}))
    return [finish(s, check=check) for s in started]


class Started:
    def __init__(self, process: subprocess.Popen, command: list[str], port: int, stdout, stderr) -> None:
        self.process, self.command, self.port, self.stdout, self.stderr = process, command, port, stdout, stderr


def start_launch(n_processes: int, values: dict, *args: str, avoid_ports: set[int] = frozenset()) -> Started:
    """Start a run under the ``deepspeed`` launcher; :func:`finish` waits for it."""
    run_dir = Path(values["checkpoint"]["dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "run.yaml"
    config.write_text(yaml.safe_dump(values))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    launcher = Path(sys.executable).parent / "deepspeed"
    port = _free_port()
    while port in avoid_ports:
        port = _free_port()
    # run by this interpreter, not the script's #! line: the ranks then build and load DeepSpeed's
    # CPU op with the same include paths as the in-process tests (a venv reached through a symlink
    # otherwise alternates two paths, and each change rebuilds the op: 25-160 s on two cores)
    command = [sys.executable, str(launcher), "--num_gpus", str(n_processes), "--master_port", str(port),
               "launch/train.py", "--config", str(config), "--quiet", *args]
    stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # no pipe to fill up
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr, text=True)
    return Started(process, command, port, stdout, stderr)


def finish(started: Started, check: bool = True) -> subprocess.CompletedProcess:
    command, port = started.command, started.port
    try:
        returncode = started.process.wait(timeout=600)
    except subprocess.TimeoutExpired:
        started.process.kill()
        started.process.wait()
        raise
    outputs = []
    for stream in (started.stdout, started.stderr):
        stream.seek(0)
        outputs.append(stream.read())
        stream.close()
    result = subprocess.CompletedProcess(command, returncode, *outputs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    if result.returncode == 0:  # every rank unlinked its DeepSpeed shared-memory segment
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return result


def _free_port() -> int:
    from tests.distributed import free_port

    return free_port()


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["loss"] for r in records if "loss" in r}
    return [by_step[s] for s in sorted(by_step)]


def test_serial_run_learns_and_writes_a_complete_checkpoint(serial_run):
    curve = losses(serial_run)
    assert len(curve) == STEPS
    assert curve[-1] < curve[0], f"loss did not decrease: {curve}"
    checkpoints = serial_run / "checkpoints"
    assert (checkpoints / "latest").read_text() == f"step_{STEPS:08d}"
    assert (checkpoints / f"step_{STEPS:08d}" / "COMPLETE").exists()
    model = load_consolidated(serial_run / "model.pt")
    assert model.metadata["step"] == STEPS and model.metadata["channels"][0] == {"variable": "msl", "level": None}


def train_reading_the_longest_rollout(rank, world_size, values):
    """The trainer as it read before each sample came with its own step's rollout: every sample
    with the targets of the schedule's longest rollout."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    from launch.runtime.distributed import init_distributed
    from launch.training import loop

    first_steps = []

    def longest(training, first_step):
        first_steps.append(first_step)
        return lambda k: training.max_rollout

    loop.sample_leads = longest
    loop.Trainer(load_run_config(values=values), init_distributed("cpu"), quiet=True).train()
    return first_steps


def test_reading_each_steps_rollout_gives_the_losses_of_reading_the_longest(store, serial_run, tmp_path):
    """The serial run reads lead 1 in steps 1-3 and lead 2 after: the same samples, the same values."""
    assert spawn(train_reading_the_longest_rollout, 1, run_values(store, tmp_path)) == [[0]]  # the leads it read
    assert losses(tmp_path) == losses(serial_run)  # bitwise


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_data_parallel_zero_stages_equal_serial(store, serial_run, tmp_path, stage):
    """Two replicas of micro-batch 1 see the serial run's two samples per step."""
    values = run_values(store, tmp_path, training={"micro_batch": 1}, deepspeed=f"configs/deepspeed/zero{stage}.json")
    launch(2, values)
    parallel, serial = losses(tmp_path), losses(serial_run)
    assert max(abs(a - b) / abs(b) for a, b in zip(parallel, serial)) < 1e-5, (parallel, serial)


@pytest.fixture(scope="module")
def compiled_run(store, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("compiled")
    launch(1, run_values(store, run_dir, training={"compile": True}))
    return run_dir


def test_compiled_run_equals_eager(serial_run, compiled_run):
    compiled, eager = losses(compiled_run), losses(serial_run)
    assert len(compiled) == len(eager) == STEPS
    assert max(abs(a - b) / abs(b) for a, b in zip(compiled, eager)) < 1e-4, (compiled, eager)


def test_autocast_run_follows_the_float32_run_in_bfloat16(store, compiled_run, tmp_path):
    """DeepSpeed's ``torch_autocast`` (the fastest one-GPU setting) reaches the compiled rollout,
    which the trainer calls past ``engine.forward``: the losses move off the compiled float32
    run's by bf16 rounding (~1e-4; float32 reassociation moves them by < 1e-6), no more."""
    values = run_values(store, tmp_path, training={"compile": True},
                        deepspeed_overrides={"bf16": {"enabled": False},
                                             "torch_autocast": {"enabled": True, "dtype": "bfloat16"}})
    launch(1, values)
    autocast, fp32 = losses(tmp_path), losses(compiled_run)
    differences = [abs(a - b) / abs(b) for a, b in zip(autocast, fp32)]
    assert len(autocast) == STEPS and 3e-5 < max(differences) < 3e-2, (differences, autocast, fp32)


def test_master_weight_run_follows_float32_and_resumes_bitwise(store, serial_run, tmp_path):
    """``optimizer.master_weights``: bf16 parameters, float32 master weights in the optimizer, two
    replicas (their bf16 gradients averaged in float32). The losses follow the float32 run's by
    bf16 rounding; a run stopped after step 2 and resumed gives the same losses bitwise (the
    master weights and moments come back in float32); the consolidated weights are the float32
    masters, not their bf16 rounding."""
    values = run_values(store, tmp_path / "straight", training={"micro_batch": 1}, optimizer={"master_weights": True},
                        deepspeed="configs/deepspeed/fp32.json", deepspeed_overrides={})
    resumed = run_values(store, tmp_path / "resumed", training={"micro_batch": 1}, optimizer={"master_weights": True},
                         deepspeed="configs/deepspeed/fp32.json", deepspeed_overrides={})
    launch_together((2, values), (2, resumed, "--stop-after", "2"))  # independent: at once
    straight, fp32 = losses(tmp_path / "straight"), losses(serial_run)
    differences = [abs(a - b) / abs(b) for a, b in zip(straight, fp32)]
    assert len(straight) == STEPS and 3e-5 < max(differences) < 3e-2, (differences, straight, fp32)
    weights = load_consolidated(tmp_path / "straight" / "model.pt").state_dict
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert any(not torch.equal(w, w.bfloat16().float()) for w in weights.values())  # not bf16 values

    launch(2, resumed)
    assert losses(tmp_path / "resumed") == straight


@pytest.fixture(scope="module")
def model_parallel_run(store, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("mesh")
    launch(4, run_values(store, run_dir, mesh={"domain": [1, 2], "tensor": 2}, data={"workers": 2, "prefetch": 3},
                         deepspeed="configs/deepspeed/zero1.json"))
    return run_dir


def test_model_parallel_mesh_equals_serial(store, serial_run, model_parallel_run):
    parallel, serial = losses(model_parallel_run), losses(serial_run)
    assert max(abs(a - b) / abs(b) for a, b in zip(parallel, serial)) < 1e-5, (parallel, serial)
    # the trained models agree (weights are not compared one by one: Adam turns the rounding
    # noise of gradients that are zero in exact arithmetic into full-size steps of weights
    # that do not affect the output, such as the token-MLP output bias)
    *_, from_parallel = forward_on_mesh(0, 1, model_parallel_run / "model.pt", store, (1, 1), 1)
    *_, from_serial = forward_on_mesh(0, 1, serial_run / "model.pt", store, (1, 1), 1)
    assert relative_error(from_parallel, from_serial) < 1e-4


def test_resumed_run_equals_uninterrupted(store, model_parallel_run, tmp_path):
    # read by reader processes (the uninterrupted run used threads): same samples, same order
    values = run_values(store, tmp_path, mesh={"domain": [1, 2], "tensor": 2}, deepspeed="configs/deepspeed/zero1.json",
                        data={"worker_kind": "process", "workers": 2, "prefetch": 4})
    first = launch(4, values, "--stop-after", "2")
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000002", first.stdout[-2000:]
    launch(4, values, "--stop-after", "1")  # at the epoch's last step, its readers ahead in the next epoch
    at_end = json.loads((tmp_path / "checkpoints" / "step_00000003" / "meta.json").read_text())["resume"]
    assert (at_end["epoch"], at_end["sampler"]["consumed"]) == (0, 6)  # the whole epoch, none of the next
    launch(4, values)
    assert losses(tmp_path) == losses(model_parallel_run)  # bitwise
    final = json.loads((tmp_path / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").read_text())["resume"]
    assert final["epoch"] == 1  # the resumed part crossed an epoch boundary (3 steps per epoch)


def forward_on_mesh(rank, world_size, checkpoint, store, domain, tensor):
    full = load_consolidated(checkpoint)
    mesh = build_mesh(domain, tensor) if world_size > 1 else None
    model = WeatherMixer(full.model_config, mesh)
    load_full_state(model, full.state_dict)
    inputs = RankInputs(str(store), model)
    state, static, forcings, _ = inputs.batch([inputs.reader.sample(5, 1)], "cpu")
    with torch.no_grad():
        out = model(state, static, forcings[:, 0])
    (lat0, lat1), (lon0, lon1) = model.layers.tile_bounds()
    return (lat0, lat1, lon0, lon1, model.out_channels.indices[model.mesh.tensor_rank].tolist(), out)


def test_resharded_checkpoint_gives_the_same_forward_outputs(store, model_parallel_run):
    checkpoint = model_parallel_run / "checkpoints" / f"step_{STEPS:08d}"  # per-rank shards, assembled on load
    [(_, _, _, _, _, serial)] = [forward_on_mesh(0, 1, checkpoint, store, (1, 1), 1)]
    for domain, tensor in [((1, 1), 4), ((2, 2), 1)]:
        for lat0, lat1, lon0, lon1, channels, out in spawn(forward_on_mesh, 4, checkpoint, store, domain, tensor):
            expected = serial[:, lat0:lat1, lon0:lon1][..., channels]
            assert relative_error(out, expected) < 1e-5, f"mesh domain {domain} tensor {tensor}"


def test_resume_on_another_mesh_loads_the_trained_weights(store, model_parallel_run, tmp_path):
    shutil.copytree(model_parallel_run / "checkpoints", tmp_path / "checkpoints")
    values = run_values(store, tmp_path, mesh={"domain": [2, 1], "tensor": 1},
                        training={"steps": STEPS + 1, "micro_batch": 2})
    # a learning rate of ~0: the one extra step leaves the loaded weights as they were
    launch(2, values, "--set", "optimizer.lr=1e-30", "--set", "optimizer.embedding_lr=1e-30")
    resumed = load_consolidated(tmp_path / "model.pt")
    assert resumed.metadata["mesh"]["domain"] == [2, 1] and resumed.metadata["step"] == STEPS + 1
    trained = load_consolidated(model_parallel_run / "model.pt").state_dict
    worst = max(relative_error(resumed.state_dict[k], trained[k]) for k in trained)
    assert worst < 1e-6, f"weights after resuming on another mesh differ from the trained ones by {worst:.2e}"


def test_mesh_that_does_not_match_the_world_size_fails_before_any_work(store, tmp_path):
    result = launch(1, run_values(store, tmp_path, mesh={"domain": [1, 1], "tensor": 2}), check=False)
    assert result.returncode != 0
    assert "world size is 1" in result.stdout + result.stderr or "world size 1" in result.stdout + result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_non_finite_loss_stops_the_run_before_any_checkpoint(store, tmp_path):
    """The losses are read and checked at settle steps only (here every 3rd step, which also
    checkpoints): an lr of 1e30 blows the weights up in step 1's update, so step 2's loss is
    non-finite; the check at step 3 names step 2 and raises before step 3's checkpoint."""
    values = run_values(store, tmp_path, optimizer={"lr": 1e30, "embedding_lr": 1e30},
                        logging={"every": 3, "validate_every": 100000, "tensorboard": False},
                        checkpoint={"dir": str(tmp_path), "every": 3})
    result = launch(1, values, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert re.search(r"launch/train.py: step 2: the training loss is (nan|-?inf); rank 0 .*: the prediction of "
                     r"channel \w+ is not finite while the inputs and targets are .*lower optimizer\.lr", output), \
        output[-3000:]
    written = [int(p.name.split("_")[1]) for p in (tmp_path / "checkpoints").glob("step_*")]
    assert not [step for step in written if step >= 2], written
    assert not (tmp_path / "model.pt").exists()


def test_profile_writes_the_timeline_and_table_of_the_window(store, tmp_path):
    launch(1, run_values(store, tmp_path, training={"steps": 3}), "--profile", "2:3")
    timeline = json.loads((tmp_path / "profile" / "rank0.json").read_text())
    names = {event.get("name") for event in timeline["traceEvents"]}
    assert any(name and name.startswith("aten::") for name in names), sorted(names)[:20]
    assert (tmp_path / "profile" / "rank0.txt").read_text().startswith("steps 2..3 (2) on rank 0")


def test_a_profile_window_past_the_last_step_is_refused(store, tmp_path, capsys):
    from launch.train import main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run_values(store, tmp_path)))
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--profile", f"{STEPS}:{STEPS + 1}"])
    assert f"the run has {STEPS} steps" in capsys.readouterr().err


@pytest.mark.parametrize("window", ["3:2", "0:1", "2", "a:b"])
def test_a_bad_profile_window_names_the_expected_form(window):
    with pytest.raises(ValueError, match="expected FIRST:LAST"):
        parse_step_window(window)


def test_config_errors_name_the_key(store, tmp_path):
    base = run_values(store, tmp_path)
    with pytest.raises(RunConfigError, match=r"optimizer\.lr"):
        load_run_config(values={**base, "optimizer": {"lr": -1}})
    with pytest.raises(RunConfigError, match=r"training\.stepz"):
        load_run_config(values={**base, "training": {**base["training"], "stepz": 3}})
    with pytest.raises(RunConfigError, match="unknown preset"):
        load_run_config(values={**base, "model": {"preset": "huge"}})
    with pytest.raises(RunConfigError, match="rollout"):
        load_run_config(values={**base, "training": {**base["training"], "rollout": [{"from_step": 5, "steps": 2}]}})
    with pytest.raises(RunConfigError, match=r"data\.workers = 3 exceeds data\.prefetch = 2"):
        load_run_config(values={**base, "data": {**base["data"], "workers": 3}})
    with pytest.raises(RunConfigError, match=r"data\.worker_kind"):
        load_run_config(values={**base, "data": {**base["data"], "worker_kind": "fiber"}})
    with pytest.raises(RunConfigError, match=r"set data\.prefetch >= training\.micro_batch \+ data\.workers = 4"):
        load_run_config(values={**base, "data": {**base["data"], "worker_kind": "process", "workers": 2, "prefetch": 3}})
    with pytest.raises(RunConfigError, match=r"optimizer\.master_weights = true .* sets bf16\.enabled, "
                                              r"zero_optimization\.stage = 1; use deepspeed: configs/deepspeed/fp32\.json"):
        load_run_config(values={**base, "optimizer": {"master_weights": True}, "deepspeed": "configs/deepspeed/zero1.json",
                                "deepspeed_overrides": {}})
    with pytest.raises(RunConfigError, match=r"training\.nonfinite_loss = 'skip' at ZeRO stage 0 .* gradient_clipping = 0"):
        load_run_config(values={**base, "training": {**base["training"], "nonfinite_loss": "skip"},
                                "deepspeed_overrides": {"bf16": {"enabled": False}, "gradient_clipping": 0}})
    with pytest.raises(RunConfigError, match="KEY=VALUE"):
        load_run_config(values=base, overrides=["optimizer.lr"])
    assert load_run_config(values=base, overrides=["optimizer.lr=3e-4"]).optimizer.lr == 3e-4
    assert load_run_config(values=base, overrides=["mesh.domain=[2,1]"]).mesh.domain == (2, 1)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "train").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_run_configs_load_and_build(path):
    run = load_run_config(path)
    model, mesh = run.model.build(), run.mesh
    assert model.n_tokens > 0 and mesh.tensor >= 1
    assert run.deepspeed_config()["train_micro_batch_size_per_gpu"] == run.training.micro_batch


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(store, tmp_path):
    """A plain one-process run (no launcher) stopped by SIGTERM checkpoints the step it finished."""
    import signal
    import time

    values = run_values(store, tmp_path, training={"steps": 100000, "micro_batch": 1},
                        logging={"every": 1, "validate_every": 100000, "tensorboard": False},
                        checkpoint={"dir": str(tmp_path), "every": 100000})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(values))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    process = subprocess.Popen([sys.executable, "launch/train.py", "--config", str(config)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    tag = (tmp_path / "checkpoints" / "latest").read_text()
    step = int(tag.split("_")[1])
    assert 3 <= step < 100000 and (tmp_path / "checkpoints" / tag / "COMPLETE").exists()
    assert f"stopped at step {step}" in output
