"""Notice the launcher dying: a rank whose launcher is gone stops like one sent SIGTERM.

DeepSpeed's single-node runner (the ``deepspeed`` command) forwards no signal: SIGTERM to it
alone ends it and leaves ``deepspeed.launcher.launch`` and the ranks running as orphans, and a
launcher killed with -9 forwards nothing either. Each rank therefore watches its launcher
processes - its parent and, while that is a launcher too, the parent's parent (``deepspeed`` ->
``deepspeed.launcher.launch`` -> rank; ``torchrun`` -> rank) - and calls back when one of them
is gone, so the trainer writes its stop checkpoint and exits. A rank started by hand (no launcher
above it) watches nothing.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

LAUNCHER_MODULES = ("deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run",
                    "torch.distributed.launch")
LAUNCHER_COMMANDS = ("deepspeed", "torchrun")


def command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def process_status(pid: int) -> tuple[str, int, int] | None:
    """``(state, parent pid, start time)`` of a process from ``/proc/<pid>/stat``; None when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def is_launcher(arguments: list[str]) -> bool:
    """A ``deepspeed`` / ``torchrun`` command (run directly or by ``python``) or one of their
    modules run with ``python [-u] -m``."""
    if not arguments:
        return False
    if Path(arguments[0]).name in LAUNCHER_COMMANDS:
        return True
    if not Path(arguments[0]).name.startswith("python"):
        return False
    position = 1
    while position < len(arguments) and arguments[position].startswith("-"):  # the interpreter's options
        if arguments[position] == "-m":
            return position + 1 < len(arguments) and arguments[position + 1] in LAUNCHER_MODULES
        position += 1
    return position < len(arguments) and Path(arguments[position]).name in LAUNCHER_COMMANDS


def launcher_processes(pid: int | None = None) -> list[tuple[int, int, str]]:
    """``(pid, start time, command)`` of the launchers above ``pid`` (default: this process), nearest first."""
    found = []
    status = process_status(os.getpid() if pid is None else pid)
    while status is not None and status[1] > 1:
        parent = status[1]
        arguments, status = command_line(parent), process_status(parent)
        if status is None or not is_launcher(arguments):
            break
        found.append((parent, status[2], " ".join(arguments[:4])))
    return found


def exited(pid: int, start_time: int) -> bool:
    """Whether the process ``pid`` that started at ``start_time`` has exited (a zombie has: its
    parent has not reaped it yet; a new process under the same pid is another one)."""
    status = process_status(pid)
    return status is None or status[0] in ("Z", "X") or status[2] != start_time


class LauncherWatch:
    """A daemon thread that calls ``on_gone(pid, command)`` once when a launcher above this
    process exits (also when this process is re-parented: its parent is gone)."""

    def __init__(self, on_gone: Callable[[int, str], None], interval: float = 1.0):
        self.launchers = launcher_processes()
        self.parent = os.getppid()
        self.on_gone, self.interval = on_gone, interval
        self._stop = threading.Event()
        self._thread = None
        if self.launchers:
            self._thread = threading.Thread(target=self._watch, name="launcher-watch", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            gone = [(pid, command) for pid, start_time, command in self.launchers if exited(pid, start_time)]
            if not gone and os.getppid() != self.parent:
                gone = [(self.parent, "the parent process")]
            if gone:
                self.on_gone(*gone[0])
                return

    def close(self) -> None:
        self._stop.set()
