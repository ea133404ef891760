"""launch/demo.sh runs on what the machine has and says what it chose (the GPUs counted with a
stand-in ``nvidia-smi``; DEMO_PLAN_ONLY stops after the choice)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def plan(tmp_path: Path, gpus: int | None) -> str:
    env = {**os.environ, "DEMO_PLAN_ONLY": "1", "PATH": f"{tmp_path}:/usr/bin:/bin"}
    env.pop("DEMO_GPUS", None)
    if gpus is not None:
        listing = "".join(f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})"\n' for i in range(gpus))
        (tmp_path / "nvidia-smi").write_text(f"#!/bin/sh\n{listing}")
        (tmp_path / "nvidia-smi").chmod(0o755)
    result = subprocess.run(["bash", "launch/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("gpus, expected", [
    (None, "2 CPU processes, one longitude tile each (domain 1x2; no GPU found)"),
    (0, "2 CPU processes"),
    (1, "the one GPU, the whole grid on it (domain 1x1)"),
    (4, "2 of the 4 GPUs, one longitude tile each (domain 1x2)"),
])
def test_the_demo_uses_the_gpus_that_are_there(tmp_path, gpus, expected):
    assert f"demo: training and forecasting on {expected}" in plan(tmp_path, gpus)
