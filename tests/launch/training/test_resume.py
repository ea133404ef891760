"""Resuming on another mesh, pruning, damaged checkpoints: runs through the real launcher on CPU ranks.

* N steps on mesh A, then the rest on mesh B, give the losses of the whole run on mesh B (float32
  rounding): for a change of domain x tensor, of the data degree at the same global batch (and of
  ZeRO stage and process count on the way), of the sample degree, and with FP8 delayed scaling
  (its amax histories resume on the other mesh); a change of the global batch is refused with
  one message.
* Pruning goes by step number and completion: never the checkpoint ``latest`` names or a newer one.
* A damaged newest checkpoint (a truncated file, no ``COMPLETE`` marker) is passed over with a
  warning naming the file; ``--resume-from`` picks one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from launch.training.checkpoint_format import load_consolidated
from tests.launch.training.test_train import STEPS, finish, launch, losses, run_values, start_launch


def relative_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == STEPS, (a, b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


# (processes, overrides, --stop-after) of each leg; the reference runs the last leg's layout throughout
CHAINS = {
    "domain-x-tensor": [
        (2, dict(mesh={"domain": [1, 2]}, deepspeed="configs/deepspeed/zero1.json"), 3),
        (2, dict(mesh={"tensor": 2}, deepspeed="configs/deepspeed/zero1.json"), None),
    ],
    # global batch 2 throughout, as a user would: 2 processes (data 2 x micro 1, ZeRO-2), then 1
    # (micro 2, ZeRO-0), then 4 (data 2 x domain 1x2 x micro 1, ZeRO-1)
    "data-degree": [
        (2, dict(training={"micro_batch": 1}, deepspeed="configs/deepspeed/zero2.json"), 2),
        (1, dict(), 2),
        (4, dict(mesh={"data": 2, "domain": [1, 2]}, training={"micro_batch": 1},
                 deepspeed="configs/deepspeed/zero1.json"), None),
    ],
    # FP8 delayed scaling: the amax histories go into the checkpoint and onto the other mesh (without
    # them the fourth step would cast with the operands' own amax, and its loss would differ); the
    # two data replicas of the first leg see different samples and keep one history, the largest
    "fp8-delayed": [
        (2, dict(model={"preset": "tiny", "overrides": {"hidden": 16, "fp8": "delayed", "fp8_history": 4}},
                 training={"micro_batch": 1}), 3),
        (2, dict(model={"preset": "tiny", "overrides": {"hidden": 16, "fp8": "delayed", "fp8_history": 4}},
                 mesh={"tensor": 2}), None),
    ],
    # two members from input noise: both on one rank, or one on each of two sample ranks
    "sample": [
        (2, dict(mesh={"sample": 2}, training={"samples": 2, "input_noise": 0.1}), 3),
        (1, dict(training={"samples": 2, "input_noise": 0.1}), None),
    ],
}


def leg_values(store: Path, run_dir: Path, overrides: dict) -> dict:
    return run_values(store, run_dir, checkpoint={"dir": str(run_dir), "every": 3, "keep": 2}, **overrides)


@pytest.mark.parametrize("chain", list(CHAINS))
def test_a_run_continued_on_another_mesh_equals_the_whole_run_there(store, tmp_path, chain):
    legs = CHAINS[chain]
    *_, (processes, last, _) = legs
    # the reference runs while the legs do (it shares nothing with them but the store)
    reference_run = start_launch(processes, leg_values(store, tmp_path / "reference", last))
    run_dir = tmp_path / "continued"
    try:
        for n, overrides, stop in legs:
            launch(n, leg_values(store, run_dir, overrides), *(["--stop-after", str(stop)] if stop else []),
                   avoid_ports={reference_run.port})
    except BaseException:
        finish(reference_run, check=False)  # no run left behind; the leg's failure is the one reported
        raise
    finish(reference_run)
    continued, reference = losses(run_dir), losses(tmp_path / "reference")
    assert relative_difference(continued, reference) < 1e-5, (continued, reference)
    # the step counter went on: checkpoints keep their numbers, the oldest pruned (keep 2)
    folders = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert folders[-1] == f"step_{STEPS:08d}" and len(folders) == 2, folders
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    assert load_consolidated(run_dir / "model.pt").metadata["step"] == STEPS
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps  # no row twice


def test_a_change_of_the_global_batch_is_refused_with_one_message(store, tmp_path):
    launch(1, run_values(store, tmp_path), "--stop-after", "3")
    result = launch(1, run_values(store, tmp_path, training={"micro_batch": 1}), check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert re.search(r"global batch of 2 times per step .* this run has 1 .* set training\.micro_batch", output), \
        output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000003"  # nothing was overwritten


@pytest.fixture(scope="module")
def finished_run(serial_run) -> Path:
    """Six steps on one process with checkpoints at steps 3 and 6 (conftest.py: the session's serial run)."""
    return serial_run


def copy_of(run: Path, destination: Path) -> Path:
    shutil.copytree(run / "checkpoints", destination / "checkpoints")
    shutil.copy(run / "metrics.jsonl", destination / "metrics.jsonl")
    return destination


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["truncated", "no-marker"])
def test_a_damaged_newest_checkpoint_is_passed_over_with_a_warning(store, finished_run, tmp_path, damage):
    run_dir = copy_of(finished_run, tmp_path)
    newest = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    if damage == "truncated":
        truncate(newest / "optimizer" / "model_rank_0.pt")
        reason = (rf"checkpoint file {re.escape(str(newest / 'optimizer' / 'model_rank_0.pt'))} \(optimizer state "
                  rf"of model rank 0 of 1\) cannot be read .*truncated or damaged")
    else:
        (newest / "COMPLETE").unlink()
        reason = "no COMPLETE marker: the run that wrote it stopped while saving"
    result = launch(1, run_values(store, run_dir))
    assert re.search(rf"warning: skipped checkpoint {re.escape(str(newest))}: {reason}", result.stderr), \
        result.stderr[-3000:]
    assert losses(run_dir) == losses(finished_run)  # resumed from step 3: steps 4-6 again, bitwise
    assert (newest / "COMPLETE").exists() and (run_dir / "checkpoints" / "latest").read_text() == newest.name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))  # rows 4-6 once


def test_resume_from_names_the_checkpoint(store, finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    launch(1, run_values(store, run_dir), "--resume-from", str(run_dir / "checkpoints" / "step_00000003"))
    assert losses(run_dir) == losses(finished_run)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))


def test_resume_from_a_damaged_checkpoint_names_the_file_once(store, finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    damaged = run_dir / "checkpoints" / "step_00000003" / "shards" / "model_rank_0.pt"
    truncate(damaged)
    result = launch(1, run_values(store, run_dir), "--resume-from", str(damaged.parent.parent), check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output[-3000:]
    assert output.count(f"checkpoint file {damaged} (weights of model rank 0 of 1) cannot be read") == 1, output[-3000:]
