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

A folder given as FOLDER:MODES contributes only those modes' records (comma-separated), e.g. a
memory-only rerun beside the RAG records of the earlier run of the same samples:

    python benchmarks/ruler_lengths.py runs/memory_rerun_32k benchmarks/results/ruler_heldout_32k/seed_27182:rag \
        --out OUT

A folder that contributes no memory records may differ from the others in the settings only
`ask` reads (`ASK_ONLY`): RAG and truncation do not use them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from memformer.decoding import looping
from memformer.eval import plots, ruler

SHARED = ("backbone", "haystack", "seed", "memory_config")   # settings the merged runs must share
ASK_ONLY = ("answer_reads", "copy_pointer")   # memory_config fields that only the memory mode (`ask`) reads


def parse_folder(arg: str) -> tuple[Path, set[str] | None]:
    """(folder, the modes taken from it, None for all) from FOLDER or FOLDER:MODES."""
    if ":" not in arg or Path(arg).exists():          # a folder whose own name holds ":" is a folder
        return Path(arg), None
    folder, _, modes = arg.rpartition(":")
    taken = {m.strip() for m in modes.split(",") if m.strip()}
    if not taken:
        raise ValueError(f"{arg}: no mode after ':'")
    return Path(folder), taken


def load_runs(folders: list[Path], modes: list[set[str] | None] | None = None) -> tuple[list[dict], dict]:
    """(records of all folders, the shared settings of the first). modes[i]: the modes taken from
    folders[i] (None: all). Raises ValueError when a folder lacks its files, when a folder
    differs from the first in a SHARED setting (where either takes no memory records, the
    `ASK_ONLY` fields are not compared), or when two hold the same record."""
    modes = modes or [None] * len(folders)
    records, seen = [], {}
    first = first_settings = first_memory = None

    def settings_of(folder):
        run, trials = folder / "run.json", folder / "trials.jsonl"
        if not run.is_file() or not trials.is_file():
            raise ValueError(f"{folder}: expected run.json and trials.jsonl from `memformer eval ruler`")
        settings = json.loads(run.read_text())
        if settings.get("eval") != "ruler":
            raise ValueError(f"{folder}: run.json is from `eval {settings.get('eval')}`, not `eval ruler`")
        return {k: settings.get(k) for k in SHARED}

    def without_ask_only(these):
        cfg = these["memory_config"]
        return {**these, "memory_config": {k: v for k, v in cfg.items() if k not in ASK_ONLY}} if isinstance(cfg, dict) else these

    for folder, taken in zip(folders, modes):
        these = settings_of(folder)
        memory = taken is None or "memory" in taken
        if first is None:
            first, first_settings, first_memory = folder, these, memory
        else:
            mine, theirs = these, first_settings
            if not (memory and first_memory):
                mine, theirs = without_ask_only(mine), without_ask_only(theirs)
            if mine != theirs:
                differ = [k for k in SHARED if mine[k] != theirs[k]]
                raise ValueError(f"{folder}: differs from {first} in {', '.join(differ)}")
        found = plots.read_records(folder / "trials.jsonl")
        if taken is not None and not any(rec.get("mode") in taken for rec in found.values()):
            have = sorted({str(rec.get("mode")) for rec in found.values()})
            raise ValueError(f"{folder}: no records of mode(s) {', '.join(sorted(taken))}; it holds {', '.join(have)}")
        for rid, rec in found.items():
            if taken is not None and rec.get("mode") not in taken:
                continue
            if rid in seen:
                raise ValueError(f"{folder}: record {rid} is also in {seen[rid]}")
            seen[rid] = folder
            if rec.get("answer") is not None:          # today's rule on the stored answer, or the run's flag
                rec["looping"] = bool(rec.get("looping")) or looping(rec["answer"])
            records.append(rec)
    if not records:
        raise ValueError("no trials in the given folders")
    return records, first_settings


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
    p.add_argument("folders", nargs="+", help="`memformer eval ruler` output folders, each FOLDER or "
                   "FOLDER:MODES (only those modes' records, e.g. results/run_32k:rag)")
    p.add_argument("--out", type=Path, required=True, help="folder for ruler_lengths.md and ruler_lengths.png")
    args = p.parse_args(argv)
    try:
        parsed = [parse_folder(f) for f in args.folders]
        records, shared = load_runs([f for f, _ in parsed], [m for _, m in parsed])
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
