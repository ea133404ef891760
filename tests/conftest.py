"""Test-wide environment: DeepSpeed on CPU ranks, its compiled ops cached inside the repo."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session", autouse=True)
def release_deepspeed_shared_memory():
    """DeepSpeed's CPU collectives leave a ~66 MB /dev/shm segment per rank; the launch scripts
    unlink theirs, the in-process workers of the tests do not: remove what this session made."""
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*"))
    yield
    for path in set(shm.glob("deepspeed_allreduce_buffer_*")) - before:
        path.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def fresh_dynamo_caches():
    """Each test compiles from dynamo's clean state: code objects that earlier tests compiled (the
    model's forward, for other models) would count toward dynamo's recompile limit, and a
    ``fullgraph`` test would pass or fail by the order the tests run in."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
