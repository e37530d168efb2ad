"""What an evaluation writes: the resumable trial log, Markdown tables and PNG plots.

Every `memformer eval` run streams one JSON record per finished trial to `trials.jsonl` (so an
interrupted CPU run loses at most the trial in flight) and its settings to `run.json`; a rerun
with `resume=True` keeps the finished records and skips their trials, after checking that the
settings that decide a trial's outcome (seed, backbone, memory config, ...) are unchanged.

A trial record is a dict with at least: `id` (unique per trial and mode), `task`, `length`,
`depth` (0..1), `mode`, `status` ("ok", or "n/a" when the mode cannot run at that length, e.g.
"full" beyond the native context) and `score` (0..1, None when n/a). A trial of a multi-needle
document (`memformer.eval.needle`) also has `needle` (its index in the document), `needles` (the
document's trials), `key` and `other_needles` (the trials whose values its answer gave); its
`index` is the document's number.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from memformer.fileio import atomic_write_text, read_json

NA = "n/a (does not fit)"
MODE_ORDER = ("memory", "truncate", "rag", "full")


class TrialLog:
    """`out_dir/trials.jsonl` + `out_dir/run.json`; `record_id in log` says a trial is finished.

    settings: JSON-able dict that must match on resume. resume=False starts a fresh log."""

    def __init__(self, out_dir, settings: dict, resume: bool = False):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path, run = self.dir / "trials.jsonl", self.dir / "run.json"
        self.settings = json.loads(json.dumps(settings))          # tuples -> lists, as read back
        self.done: dict[str, dict] = {}
        if resume and self.path.exists():
            self._check_settings(run)
            self.done = read_records(self.path)
        # rewrite what is kept: drops a line cut off by an interrupted write
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.done.values()))
        atomic_write_text(run, json.dumps(self.settings, indent=2, sort_keys=True) + "\n")
        self._fh = open(self.path, "a")

    def _check_settings(self, run: Path) -> None:
        if not run.is_file():
            raise ValueError(f"--resume: {run} is missing, so the finished trials in {self.path} cannot be "
                             "checked against this run's settings; use another --out or drop --resume")
        old, new = _flatten(read_json(run)), _flatten(self.settings)
        # a setting one side lacks counts as None: a field added to MemoryConfig later, say
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            diff = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
            raise ValueError(f"--resume: {self.dir} holds trials of a run with other settings ({diff}); "
                             "use another --out or drop --resume")

    def __contains__(self, record_id: str) -> bool:
        return record_id in self.done

    def get(self, record_id: str) -> dict:
        return self.done[record_id]

    def append(self, record: dict) -> None:
        """Write one finished trial now (flushed), and remember it."""
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        self.done[record["id"]] = record

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "TrialLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}, so a changed setting is named exactly."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def read_records(path: Path) -> dict[str, dict]:
    """Records by id; a line that does not parse (cut off by an interruption) is dropped."""
    out = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "id" in r:
            out[r["id"]] = r
    return out


# ---------------------------------------------------------------------- tables
def length_label(n: int) -> str:
    """4096 -> '4k', 1000 -> '1000'."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def ordered_modes(records) -> list[str]:
    modes = {r["mode"] for r in records}
    return [m for m in MODE_ORDER if m in modes] + sorted(modes - set(MODE_ORDER))


def accuracy_cell(records) -> str:
    """'75% (3/4)' — mean score over the trials that ran; NA when none could run; '' for none."""
    if not records:
        return ""
    ran = [r for r in records if r["status"] == "ok"]
    if not ran:
        return NA
    total = sum(r["score"] for r in ran)
    return f"{100 * total / len(ran):.0f}% ({total:g}/{len(ran)})"


def accuracy_table(records, tasks=None) -> str:
    """Markdown: a row per (task, length), a column per mode; cells from `accuracy_cell`."""
    tasks = tasks or list(dict.fromkeys(r["task"] for r in records))
    modes = ordered_modes(records)
    lines = ["| task | length | " + " | ".join(modes) + " |", "|---" * (len(modes) + 2) + "|"]
    for task in tasks:
        for L in sorted({r["length"] for r in records if r["task"] == task}):
            cells = [accuracy_cell([r for r in records if r["task"] == task and r["length"] == L
                                    and r["mode"] == m]) for m in modes]
            lines.append(f"| {task} | {length_label(L)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def depth_table(records, bins: int = 5, label: str = "all tasks") -> str:
    """Markdown: a row per (length, depth bin) of the target needle, a column per mode; the
    records (of every task given) pooled; cells from `accuracy_cell`."""
    modes = ordered_modes(records)
    lines = ["| task | length | depth | " + " | ".join(modes) + " |", "|---" * (len(modes) + 3) + "|"]
    for L in sorted({r["length"] for r in records}):
        for b in range(bins):
            at = [r for r in records if r["length"] == L and depth_bin(r["depth"], bins) == b]
            if at:
                cells = [accuracy_cell([r for r in at if r["mode"] == m]) for m in modes]
                lines.append(f"| {label} | {length_label(L)} | {b / bins:.1f}-{(b + 1) / bins:.1f} | "
                             + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def depth_bin(depth: float, bins: int) -> int:
    return min(int(depth * bins), bins - 1)


def plot_depth_heatmaps(records, path, bins: int = 5, title: str = "accuracy") -> Path:
    """Accuracy heatmaps, depth (rows, binned) x length (columns): a row of panels per task,
    a column per mode. Grey cells: the mode could not run (n/a) or no trial fell there."""
    import numpy as np
    plt = _pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in records))
    modes = ordered_modes(records)
    lengths = sorted({r["length"] for r in records})
    fig, axes = plt.subplots(len(tasks), len(modes), squeeze=False, layout="constrained",
                             figsize=(2 + (1.2 + 0.8 * len(lengths)) * len(modes), 1 + 2.2 * len(tasks)))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="lightgrey")
    im = None
    for row, task in enumerate(tasks):
        for col, mode in enumerate(modes):
            ax = axes[row][col]
            acc, label = np.full((bins, len(lengths)), np.nan), np.full((bins, len(lengths)), "", dtype=object)
            for j, L in enumerate(lengths):
                for b in range(bins):
                    rs = [r for r in records if r["task"] == task and r["mode"] == mode and r["length"] == L
                          and depth_bin(r["depth"], bins) == b]
                    ran = [r["score"] for r in rs if r["status"] == "ok"]
                    if ran:
                        acc[b, j] = sum(ran) / len(ran)
                        label[b, j] = f"{acc[b, j]:.0%}"
                    elif rs:
                        label[b, j] = "n/a"
            im = ax.imshow(np.ma.masked_invalid(acc), vmin=0, vmax=1, cmap=cmap, aspect="auto")
            for (b, j), text in np.ndenumerate(label):
                ax.text(j, b, text, ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(lengths)), [length_label(L) for L in lengths])
            ax.set_yticks(range(bins), [f"{b / bins:.1f}-{(b + 1) / bins:.1f}" for b in range(bins)] if col == 0
                          else [])
            ax.set_title(f"{task}: {mode}", fontsize=9)
            if row == len(tasks) - 1:
                ax.set_xlabel("length (tokens)")
            if col == 0:
                ax.set_ylabel("needle depth")
    fig.suptitle(title)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=min(1.0, 0.3 + 0.15 * len(tasks)))
    return _save(fig, plt, path)


def plot_accuracy_vs_length(records, path, title: str = "accuracy vs length") -> Path:
    """A panel per task: mean score per mode (a line each) against length; n/a points left out."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in records))
    modes = ordered_modes(records)
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    for ax, task in zip(axes.ravel(), tasks):
        lengths = sorted({r["length"] for r in records if r["task"] == task})
        for mode in modes:
            xs, ys = [], []
            for L in lengths:
                ran = [r["score"] for r in records if r["task"] == task and r["mode"] == mode
                       and r["length"] == L and r["status"] == "ok"]
                if ran:
                    xs.append(L)
                    ys.append(sum(ran) / len(ran))
            if xs:
                ax.plot(xs, ys, marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [length_label(L) for L in lengths])
        ax.minorticks_off()
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes.ravel()[len(tasks):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, plt, path)


def plot_ppl_vs_position(curves: dict, path, title: str = "perplexity vs position") -> Path:
    """curves: {document: {mode: (bin start positions, perplexities)}}; a panel per document."""
    plt = _pyplot()
    docs = list(curves)
    fig, axes = plt.subplots(1, len(docs), squeeze=False, figsize=(5 * len(docs), 3.6), layout="constrained")
    for ax, doc in zip(axes[0], docs):
        for mode in [m for m in MODE_ORDER if m in curves[doc]] + sorted(set(curves[doc]) - set(MODE_ORDER)):
            xs, ys = curves[doc][mode]
            ax.plot(xs, ys, marker=".", label=mode)
        ax.set_title(doc)
        ax.set_xlabel("position in the document (tokens)")
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _save(fig, plt, path)


def _save(fig, plt, path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
