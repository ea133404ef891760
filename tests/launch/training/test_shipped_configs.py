"""Every run config the project ships loads and validates (a typo in a demo config fails here, not in a user's run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.training.config import load_run_config

CONFIGS = sorted((Path(__file__).resolve().parents[3] / "configs" / "train").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_shipped_config_loads(path):
    run = load_run_config(str(path), [])
    assert run.training.steps > 0 and run.model.build() is not None


def test_the_ensemble_demo_trains_members_on_the_sample_axis():
    run = load_run_config(str(CONFIGS[0].with_name("demo-ensemble.yaml")), [])
    assert run.training.loss == "crps" and run.mesh.sample == 2 and run.training.samples % run.mesh.sample == 0
    assert run.training.input_noise > 0 and run.training.input_noise_scale == "tendency"
