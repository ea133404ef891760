"""Process-group start-up and shutdown, the one place every entry point and benchmark uses.

Under a launcher (``deepspeed``, ``torchrun``) the rendezvous comes from the environment; a plain
``python`` process becomes a world of one on a free local port. The backend follows the device:
NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


class DeviceError(ValueError):
    """A device was asked for that this machine does not have."""


class CollectiveTimeout(RuntimeError):
    """A collective waited longer than its timeout for the other ranks (names where and how long)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(device: str) -> torch.device:
    """``auto`` (a GPU where there is one), ``cpu`` or ``cuda``: this process's device."""
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device = {device!r} but no CUDA device is available; use 'auto' or 'cpu'")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(device: str = "auto", *, deepspeed: bool = True, timeout_seconds: float | None = None
                     ) -> torch.device:
    """Start torch.distributed for this process and return its device.

    ``deepspeed``: through ``deepspeed.init_distributed`` (training: the engine needs DeepSpeed's
    communication layer); otherwise torch's own (inference needs no DeepSpeed). ``timeout_seconds``:
    the longest any collective waits, in the world and in every group made later (the mesh's,
    DeepSpeed's); torch's default is 30 minutes."""
    if "RANK" not in os.environ:  # a plain `python ...`: one process, no launcher
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    resolved = resolve_device(device)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if deepspeed and resolved.type == "cpu" and os.environ.get("LOCAL_RANK", "0") == "0":
        remove_stale_shared_memory()  # of earlier runs killed with -9
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    timeout = None if timeout_seconds is None else timedelta(seconds=timeout_seconds)
    if timeout is not None:
        set_default_timeout(timeout)
    if deepspeed:
        os.environ.setdefault("DS_ACCELERATOR", resolved.type)
        import deepspeed as ds  # after DS_ACCELERATOR: it picks its accelerator on import

        ds.init_distributed(dist_backend=backend, verbose=False, **({} if timeout is None else {"timeout": timeout}))
    elif not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    return resolved


def set_default_timeout(timeout: timedelta) -> None:
    """The timeout of process groups made without one (``new_group``, ``init_device_mesh``).

    torch gives them its 30-minute default rather than the world's timeout, and takes the
    default from these module globals at each ``new_group`` call."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def is_timeout(error: BaseException) -> bool:
    """Whether a collective's exception says that it timed out (gloo: "Timed out waiting";
    NCCL's watchdog: "collective operation timeout")."""
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


def shutdown_distributed(barrier: bool = True) -> None:
    """End the process group and release DeepSpeed's CPU shared memory. ``barrier``: first wait
    for every rank (a rank leaving early aborts the others at exit); not after an error that
    not every rank may have met (the barrier would wait for a rank that never comes)."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    release_shared_memory()


SHARED_MEMORY_PREFIX = "deepspeed_allreduce_buffer"


def remove_stale_shared_memory(min_age_seconds: float = 60.0) -> list[Path]:
    """Unlink this user's DeepSpeed CPU all-reduce segments (see :func:`release_shared_memory`)
    that no process maps and that are older than ``min_age_seconds``: those of runs killed with
    -9, which never unlink theirs (a starting run maps its own within seconds). The removed paths."""
    segments = list(Path("/dev/shm").glob(f"{SHARED_MEMORY_PREFIX}_{os.getuid()}_*"))
    if not segments:
        return []
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # gone, or another user's
            continue
        mapped.update(line.split(maxsplit=5)[-1] for line in text.splitlines() if SHARED_MEMORY_PREFIX in line)
    removed, now = [], time.time()
    for segment in segments:
        try:
            stale = now - segment.stat().st_mtime > min_age_seconds
        except FileNotFoundError:
            continue
        if stale and str(segment) not in mapped:
            segment.unlink(missing_ok=True)
            removed.append(segment)
    return removed


def release_shared_memory() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce segment from ``/dev/shm``.

    On CPU, DeepSpeed's shared-memory collectives give every rank a ~66 MB POSIX shared-memory
    segment (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``) and never unlink it.
    Call it after the last collective (the ranks mapped each other's segments at start-up;
    unlinking removes the name only). Nothing to do on GPUs.
    """
    name = "_".join([SHARED_MEMORY_PREFIX, str(os.getuid()), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), os.environ.get("RANK", "")])
    (Path("/dev/shm") / name).unlink(missing_ok=True)
