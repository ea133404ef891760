"""Run a function on N gloo ranks in fresh processes and collect what each returns.

    results = spawn(worker, 4, arg1, arg2)   # worker(rank, world_size, arg1, arg2) on every rank

The worker must be importable (a module-level function of a test module). A failure on
any rank re-raises here with that rank's traceback.

The ranks are forked from a forkserver that has imported torch and the model's packages
once per test session (not from the test process, whose state they must not inherit):
each spawn otherwise paid ~1-1.5 s of imports per rank, 4-5 s for four ranks on two cores.
"""

from __future__ import annotations

import os
import socket
import traceback

import multiprocessing

# imported once in the forkserver, inherited by every rank it forks; nothing here starts threads
PRELOAD = ["torch", "torch.distributed", "numpy", "weathermixer.model", "parallel.mesh", "parallel.sharding"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, queue):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        dist.barrier()
        queue.put((rank, "ok", result))
    except BaseException:  # report everything, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def spawn(fn, world_size: int, *args, timeout: float = 600):
    context = _context()
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=_entry, args=(rank, world_size, port, fn, args, queue))
                 for rank in range(world_size)]
    for p in processes:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break  # the other ranks may now hang in a collective
    finally:
        for p in processes:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
