"""`train.profile_from_step`: torch.profiler over a few steps of a real run, per rank.

Writes OUT/profile/rank{R}_steps{A}-{B}.json (a Chrome / Perfetto trace) and .txt (the ops with the most
device time, or CPU time without a GPU), each written to a temporary name and then renamed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch


class StepProfiler:
    """Profiles steps first+1 .. first+n (steps counted from 1); inactive when `first` is None."""

    def __init__(self, out_dir: Path, rank: int, first: Optional[int], n: int, device: torch.device) -> None:
        self.dir, self.rank, self.first, self.n, self.device = Path(out_dir) / "profile", rank, first, n, device
        self.prof = None
        self.started_at = None

    def before_step(self, done: int) -> None:
        """Call before running step done+1."""
        if self.first is None or self.prof is not None or done != self.first:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.prof = profile(activities=activities)
        self.prof.__enter__()
        self.started_at = done

    def after_step(self, done: int) -> Optional[list[Path]]:
        """Call after step `done` finished; returns the files written when the window closes."""
        if self.prof is not None and done >= self.started_at + self.n:
            return self.finish(done)
        return None

    def finish(self, done: int) -> Optional[list[Path]]:
        """Stop profiling (also on an early exit) and write the trace and the table of steps profiled so far."""
        if self.prof is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        if done <= self.started_at:
            return None  # nothing ran inside the window
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = self.dir / f"rank{self.rank}_steps{self.started_at + 1}-{done}"
        trace, table = stem.with_suffix(".json"), stem.with_suffix(".txt")
        prof.export_chrome_trace(str(trace) + ".tmp")
        os.replace(str(trace) + ".tmp", trace)
        events = prof.key_averages()
        text = None
        keys = ("self_device_time_total", "self_cuda_time_total") if self.device.type == "cuda" else ()
        for key in keys + ("self_cpu_time_total",):
            try:
                text = events.table(sort_by=key, row_limit=40, max_name_column_width=90)
                break
            except Exception:  # the key's name differs across torch versions
                continue
        tmp = Path(str(table) + ".tmp")
        tmp.write_text((text or "") + "\n")
        os.replace(tmp, table)
        return [trace, table]
