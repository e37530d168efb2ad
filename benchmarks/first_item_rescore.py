"""Score stored answers as if each answer had stopped earlier: at its first item, or at a loop.

Greedy decoding makes an answer that stops earlier a prefix of the answer that ran on, so cutting
a stored answer where a stop would have ended it gives exactly the answer that a generation
stopping there would have given. This rescoring tells, before any rerun, what a new stop changes
in runs already made: which answers are cut, which scores move, and how many answers loop.

`--cut first-item` ends every answer with its first item (`memformer.decoding.first_item`: the
stop `ask` applies to answers to a cue and to several reads' answers):

    python benchmarks/first_item_rescore.py --modes memory \
        benchmarks/results/copy_pointer/ruler_heldout_16k benchmarks/results/copy_pointer/needle_16k \
        --out benchmarks/results/cue_first_item/rescore_memory.md

`--cut loop` cuts every answer where today's loop rule finds a loop (`memformer.decoding.cut_loop`,
which an older run's stop may not have known): an answer of several reads is cut read by read
(RULER records keep each read's answer; a needle record's answer has one read per line) and the
reads joined again (`join_answers`). An answer counts as looping when its run flagged it, when it
is cut, or when it still loops; before, as the run flagged it.

Each folder holds `trials.jsonl` of `memformer eval ruler` (scored by `string_match_all`) or of
`memformer eval needle` / `eval passkey` (scored by `needle.score_query`, one record per document
and several queries). Records answered from several reads are skipped in the memory mode: each
of their reads already answered one item.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from memformer.decoding import cut_loop, first_item, join_answers, looping
from memformer.eval import needle, ruler


def needle_kind(task: str) -> str:
    """The value kind of a needle-suite task, as `needle` draws it ("single-word" -> "word"; the
    multi-needle tasks and the pass key: number)."""
    return task.removeprefix("single-") if task.startswith("single-") else "number"


def answers_of(rec: dict) -> list[tuple[str, object, int, list[str] | None, bool]]:
    """(answer, what scores it, reads, each read's answer or None, whether it loops) per answer of
    one record: RULER records hold one answer and the run's loop flag, needle records one answer
    per query and no flag (today's loop rule on the stored answer stands in)."""
    if "answer" in rec:
        return [(rec["answer"], lambda a, e=rec["expected"]: ruler.string_match_all(a, e), rec.get("reads") or 1,
                 rec.get("read_answers"), bool(rec["looping"]) if "looping" in rec else looping(rec["answer"]))]
    kind = needle_kind(rec["task"])
    reads = rec.get("answer_reads") or [1] * len(rec["answers"])
    return [(a, lambda a, q=needle.Query("", exp, kind): needle.score_query(a, q), r, None, looping(a))
            for a, exp, r in zip(rec["answers"], rec["expected"], reads)]


def loop_cut(answer: str, reads: int, read_answers: list[str] | None) -> str:
    """`answer` cut where today's loop rule finds a loop; several reads' answers read by read."""
    if reads <= 1:
        return cut_loop(answer)[0]
    parts = read_answers if read_answers else answer.split("\n")
    return join_answers([cut_loop(p)[0] for p in parts])


def rescore(folder: Path, modes: set[str], how: str = "first-item") -> dict:
    """Per folder: answers seen, answers cut (by `first_item`, or by `cut_loop` with how="loop"),
    the score before and after, looping answers before and after, and the answers whose score
    moved."""
    out = dict(folder=str(folder), answers=0, cut=0, before=0.0, after=0.0, loops_before=0, loops_after=0, moved=[])
    for line in (folder / "trials.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("mode") not in modes or rec.get("status") != "ok":
            continue
        for answer, score, reads, read_answers, flagged in answers_of(rec):
            if how == "loop":
                cut = loop_cut(answer, reads, read_answers)
            else:
                cut = answer if rec["mode"] == "memory" and reads > 1 else first_item(answer)
            s0, s1 = score(answer), score(cut)
            out["answers"] += 1
            out["cut"] += cut != answer
            out["before"] += s0
            out["after"] += s1
            out["loops_before"] += flagged
            out["loops_after"] += flagged or (how == "loop" and cut != answer) or looping(cut)
            if s0 != s1:
                out["moved"].append(dict(id=rec["id"], answer=answer[:120], cut=cut, before=s0, after=s1))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--modes", default="memory", help="comma-separated modes to rescore")
    ap.add_argument("--cut", choices=("first-item", "loop"), default="first-item",
                    help="where a stored answer is cut: at its first item, or at a loop")
    ap.add_argument("--out", type=Path, required=True, help="markdown file written")
    args = ap.parse_args(argv)
    modes = {m.strip() for m in args.modes.split(",") if m.strip()}
    missing = [str(f) for f in args.folders if not (f / "trials.jsonl").is_file()]
    if missing:
        ap.error(f"no trials.jsonl in: {', '.join(missing)}")
    rows = [rescore(f, modes, args.cut) for f in args.folders]
    title = "ended at their first item" if args.cut == "first-item" else "cut at a loop by today's loop rule"
    lines = [f"# Stored answers {title} (modes: {', '.join(sorted(modes))})", "",
             "| run | answers | cut | score before | score after | looping before | looping after |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['folder']} | {r['answers']} | {r['cut']} | {r['before']:.2f} | {r['after']:.2f} "
                     f"| {r['loops_before']} | {r['loops_after']} |")
    moved = [m for r in rows for m in r["moved"]]
    lines += ["", f"Answers whose score moved: {len(moved)}", ""]
    lines += [f"- {m['id']}: {m['answer']!r} -> {m['cut']!r} ({m['before']:g} -> {m['after']:g})" for m in moved]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
