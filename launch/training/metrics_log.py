"""The run's metrics: one JSON line per record in ``<run>/metrics.jsonl`` and TensorBoard scalars (rank 0)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from launch.runtime.atomic import atomic_write_text


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tensorboard, self.enabled = tensorboard, enabled
        self._file = None
        self._writer = None
        self._purge_step: int | None = None

    def forget_after(self, step: int) -> None:
        """Drop the records of steps after ``step`` (a run resumed from that step's checkpoint logs
        them again), here and in TensorBoard."""
        if not self.enabled or not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if _keeps(line, step)]
        if len(kept) != len(lines):
            atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))
        self._purge_step = step + 1

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._open()
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, record["step"])

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                print(f"warning: logging.tensorboard is on but the tensorboard package is not installed: the metrics "
                      f"go to {self.path} only (pip install tensorboard, or set logging.tensorboard: false)",
                      file=sys.stderr, flush=True)
                return
            self._writer = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=self._purge_step)


def _keeps(line: str, step: int) -> bool:
    """A record of ``step`` or before (a torn last line of a killed run goes)."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] <= step
