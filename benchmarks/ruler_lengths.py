"""RULER across lengths: merge the runs of `memformer eval ruler` made one length at a time into one
table and one plot (accuracy per task against length, memory beside RAG).

Each run folder holds `run.json` (its settings) and `trials.jsonl` (one record per task, length,
sample and mode). A record's loop flag is recounted by today's loop rule
(`memformer.decoding.looping` on its stored answer, or the run's own flag), so runs made under
an older rule count loops alike. The runs must share the backbone, haystack, seed and memory settings, so the
merged table compares one configuration; a folder that differs is refused.

    python benchmarks/ruler_lengths.py benchmarks/results/ruler_heldout_16k/seed_27182 \
        benchmarks/results/ruler_heldout_32k/seed_27182 benchmarks/results/ruler_heldout_64k/seed_27182 \
        benchmarks/results/ruler_heldout_128k/seed_27182 --out benchmarks/results/ruler_heldout_lengths

writes OUT/ruler_lengths.md and OUT/ruler_lengths.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from memformer.decoding import looping
from memformer.eval import plots, ruler

SHARED = ("backbone", "haystack", "seed", "memory_config")   # settings the merged runs must share


def load_runs(folders: list[Path]) -> tuple[list[dict], dict]:
    """(records of all folders, the shared settings). Raises ValueError when a folder lacks its
    files, when two folders differ in a SHARED setting, or when two hold the same record."""
    records, shared, seen = [], None, {}
    for folder in folders:
        run, trials = folder / "run.json", folder / "trials.jsonl"
        if not run.is_file() or not trials.is_file():
            raise ValueError(f"{folder}: expected run.json and trials.jsonl from `memformer eval ruler`")
        settings = json.loads(run.read_text())
        if settings.get("eval") != "ruler":
            raise ValueError(f"{folder}: run.json is from `eval {settings.get('eval')}`, not `eval ruler`")
        these = {k: settings.get(k) for k in SHARED}
        if shared is None:
            shared = these
        elif these != shared:
            differ = [k for k in SHARED if these[k] != shared[k]]
            raise ValueError(f"{folder}: differs from {folders[0]} in {', '.join(differ)}")
        for rid, rec in plots.read_records(trials).items():
            if rid in seen:
                raise ValueError(f"{folder}: record {rid} is also in {seen[rid]}")
            seen[rid] = folder
            if rec.get("answer") is not None:          # today's rule on the stored answer, or the run's flag
                rec["looping"] = bool(rec.get("looping")) or looping(rec["answer"])
            records.append(rec)
    if not records:
        raise ValueError("no trials in the given folders")
    return records, shared


def samples_line(records) -> str:
    """Samples per task at each length, e.g. '16k: 10, 32k: 10, 64k: 5' (of the first mode)."""
    mode = plots.ordered_modes(records)[0]
    parts = []
    for L in sorted({r["length"] for r in records}):
        per_task = {}
        for r in records:
            if r["length"] == L and r["mode"] == mode:
                per_task[r["task"]] = per_task.get(r["task"], 0) + 1
        parts.append(f"{plots.length_label(L)}: {min(per_task.values())}")
    return ", ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="`memformer eval ruler` output folders")
    p.add_argument("--out", type=Path, required=True, help="folder for ruler_lengths.md and ruler_lengths.png")
    args = p.parse_args(argv)
    try:
        records, shared = load_runs(args.folders)
    except ValueError as e:
        print(f"ruler_lengths: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = list(dict.fromkeys(r["task"] for r in records))
    sources = "\n".join(f"- `{f}`" for f in args.folders)
    text = (f"# RULER across lengths\n\nHaystack {shared['haystack']!r}, seed {shared['seed']}; "
            f"samples per task: {samples_line(records)}.\n\nRuns merged:\n\n{sources}\n\n"
            + plots.accuracy_table(records, tasks=tasks) + "\n\nMean over tasks (looping: the run's own flag, or today's "
            "loop rule on the stored answer):\n\n" + ruler.mean_table(records) + "\n")
    (args.out / "ruler_lengths.md").write_text(text)
    plots.plot_accuracy_vs_length(records, args.out / "ruler_lengths.png",
                                  title=f"RULER per task and length ({shared['haystack']}, seed {shared['seed']})")
    print(text)
    print(f"written: {args.out / 'ruler_lengths.md'}, {args.out / 'ruler_lengths.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
