"""What a run reports: rank 0's progress line and printed results, metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Optional


class Progress:
    """Rank 0's output. `update` draws the live progress line (carriage return on a terminal, one line per
    log_every otherwise) only when `live`; `print` (validation results, the summary, notes) always prints on
    rank 0, so `--train.progress false` silences the bar and nothing else."""

    def __init__(self, main: bool, live: bool = True, stream=None) -> None:
        self.main, self.live = main, live and main
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._open = False

    def update(self, text: str, force_line: bool = False) -> None:
        if not self.live:
            if force_line and self.main:  # a skipped step is news even without the bar
                self.print(text)
            return
        if self.tty and not force_line:
            self.stream.write("\r\033[K" + text)
            self._open = True
        else:
            self.end()
            self.stream.write(text + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False

    def print(self, text: str) -> None:
        if self.main:
            self.end()
            print(text, file=self.stream, flush=True)


def fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class MetricsLog:
    """metrics.jsonl (rank 0) plus TensorBoard when installed; on resume, drops records past the checkpoint."""

    def __init__(self, out_dir: Path, enabled: bool, resume_step: Optional[int], tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            keep = []
            if resume_step is not None:
                for line in self.path.read_text().splitlines():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a torn last line from a kill -9
                    if rec.get("step", 0) <= resume_step:
                        keep.append(line)
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(k + "\n" for k in keep))
            os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
