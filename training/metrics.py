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
import io
import time
from pathlib import Path

from memformer.fileio import atomic_write_text

FIELDS = ["step", "name", "value", "time"]


def _complete(row: dict) -> bool:
    """A CSV row with every field, its step an integer and its value a number."""
    try:
        int(row["step"]), float(row["value"]), float(row["time"])
    except (KeyError, TypeError, ValueError):
        return False
    return bool(row["name"]) and None not in row


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
        """Drop rows logged after `step` (they belong to the part of a run being redone) and any
        row cut short by a killed process; the file is replaced atomically."""
        if not self.enabled or not self.path.exists():
            return
        with open(self.path, newline="", encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text and not text.endswith("\n"):         # a row cut short by a kill
            text = text[:text.rfind("\n") + 1]
        rows = [r for r in csv.DictReader(io.StringIO(text)) if _complete(r) and int(r["step"]) <= step]
        out = io.StringIO()
        w = csv.DictWriter(out, FIELDS)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.path, out.getvalue())

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


def plot_metrics(csv_path, png_path, smooth: int = 20):
    """A PNG of a run: training loss (raw and a `smooth`-step moving mean) and the held-out loss
    with / without memory at every evaluation, plus passkey accuracy when it was measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    m = read_metrics(csv_path)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if "train/loss" in m:
        steps, loss = zip(*m["train/loss"])
        ax.plot(steps, loss, color="0.8", lw=0.8, label="train loss")
        k = max(1, min(smooth, len(loss)))
        mean = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
        ax.plot(steps, mean, color="C0", label=f"train loss ({k}-step mean)")
    for name, style in (("eval/loss_memory", "o-C1"), ("eval/loss_no_memory", "s--C2")):
        if name in m:
            s, v = zip(*m[name])
            ax.plot(s, v, style[:-2], color=style[-2:], label=f"held-out {name.split('_', 1)[1].replace('_', ' ')}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=8)
    passkey = sorted(n for n in m if n.startswith("eval/passkey_"))
    for n in passkey:
        s, v = zip(*m[n])
        ax2.plot(s, v, "o-", label=n.split("/", 1)[1])
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_xlabel("step")
    ax2.set_ylabel("passkey accuracy")
    if passkey:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)
