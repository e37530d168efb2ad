"""Metrics of a run: one CSV (step, name, value, seconds since start), TensorBoard when installed.

The CSV is long-format so training and evaluation metrics of any set share one file:
    step,name,value,time
    1,train/loss,4.21,12.3
    100,eval/loss_memory,3.97,1210.0
On resume, rows after the checkpoint's step are dropped, so the file of an interrupted and
resumed run equals the file of an uninterrupted one (up to the time column).
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

FIELDS = ["step", "name", "value", "time"]


class MetricsLogger:
    def __init__(self, out_dir, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(out_dir) / "metrics.csv"
        self.enabled = enabled
        self.t0 = time.time()
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(FIELDS)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:       # tensorboard is optional
                self.tb = None

    def log(self, step: int, metrics: dict, prefix: str) -> None:
        if not self.enabled:
            return
        now = round(time.time() - self.t0, 2)
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            for k, v in metrics.items():
                w.writerow([step, f"{prefix}/{k}", repr(float(v)), now])
                if self.tb is not None:
                    self.tb.add_scalar(f"{prefix}/{k}", float(v), step)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (they belong to the part of a run being redone)."""
        if not self.enabled or not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            w.writeheader()
            w.writerows(rows)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv -> {name: [(step, value), ...]} in file order."""
    out: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            out.setdefault(r["name"], []).append((int(r["step"]), float(r["value"])))
    return out
