"""Shared by the launch tests: the store they train on and the six-step one-process run of it.

test_train, test_numerics and test_resume each wrote this store and launched this same run
(the same values on the same store) for themselves; the run's folder is only read (test_resume
copies its checkpoints before damaging them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.data.store_fixtures import write_store


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train") / "store.zarr"
    return write_store(path, n_times=48, n_lat=9, n_lon=16, levels=(500, 850), surface=("msl", "t2m"),
                       upper_air=("z", "t"), tile_grid=(1, 2))


@pytest.fixture(scope="session")
def serial_run(store, tmp_path_factory) -> Path:
    """Six steps on one process with checkpoints at steps 3 and 6."""
    from tests.launch.training.test_train import launch, run_values

    run_dir = tmp_path_factory.mktemp("serial")
    launch(1, run_values(store, run_dir))
    return run_dir
