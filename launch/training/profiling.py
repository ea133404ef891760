"""Profile a window of training steps: ``launch/train.py --profile FIRST:LAST``.

Every rank records steps FIRST..LAST (inclusive, the run's step numbers) with
``torch.profiler`` and writes, under ``<checkpoint.dir>/profile/``, the timeline as a Chrome
trace (``rank<r>.json``: open it in Perfetto or chrome://tracing) and a table of the operators
and kernels by self time (``rank<r>.txt``). The device is synchronised at the window's two ends
only, so the steps inside run as they do unprofiled (bar the profiler's own overhead).
"""

from __future__ import annotations

from pathlib import Path


def parse_step_window(text: str) -> tuple[int, int]:
    """``"FIRST:LAST"`` -> ``(FIRST, LAST)``, 1 <= FIRST <= LAST; a clear error otherwise."""
    first, sep, last = text.partition(":")
    try:
        window = (int(first), int(last))
    except ValueError:
        window = None
    if not sep or window is None or not 1 <= window[0] <= window[1]:
        raise ValueError(f"--profile {text!r}: expected FIRST:LAST, two step numbers with 1 <= FIRST <= LAST "
                         f"(e.g. 20:22)")
    return window


class StepProfiler:
    """Starts before step ``first`` and stops after step ``last`` on this rank (see the module)."""

    def __init__(self, first: int, last: int, out_dir: Path, rank: int, device):
        self.first, self.last, self.out_dir, self.rank, self.device = first, last, Path(out_dir), rank, device
        self._profile = None

    def step_begins(self, step: int) -> None:
        if step == self.first and self._profile is None:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._synchronize()
            self._profile = profile(activities=activities)
            self._profile.start()

    def step_ends(self, step: int) -> tuple[Path, Path] | None:
        """After step ``last``: stop and write; the (timeline, table) paths, else None."""
        if step == self.last and self._profile is not None:
            self._synchronize()
            self._profile.stop()
            self.out_dir.mkdir(parents=True, exist_ok=True)
            trace, table = self.out_dir / f"rank{self.rank}.json", self.out_dir / f"rank{self.rank}.txt"
            self._profile.export_chrome_trace(str(trace))
            sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            steps = self.last - self.first + 1
            table.write_text(f"steps {self.first}..{self.last} ({steps}) on rank {self.rank}, sorted by {sort_by}\n"
                             + self._profile.key_averages().table(sort_by=sort_by, row_limit=60,
                                                                  max_name_column_width=100))
            self._profile = None
            return trace, table
        return None

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
