"""Values with points inside them (an address, a version, a decimal) copied from memory by `model.ask`.

Each fact set plants its facts at spread depths in `--tokens` tokens of a haystack: Python's docs
(the development set, `--facts dev`), or a text file (`--haystack FILE`, e.g. the held-out Debian
handbook with `--facts heldout`, facts that no design choice looked at). The document is memorized
once; each fact is asked as a cue (the sentence to complete) and as a free-form question. Correct =
the answer states the whole value (`holds_value`: "10.8.0.254.", not "10.8.0.1." or "10.8.0.254.1"). The shipped default runs beside
the same model with the copy pointer off (`copy_pointer=0`), side by side on one memory.

    .venv/bin/python benchmarks/dotted_values.py --facts dev --out benchmarks/results/pointer_item_end/dev
    .venv/bin/python benchmarks/dotted_values.py --facts heldout --haystack runs/haystacks/debian-handbook.txt \
        --out benchmarks/results/pointer_item_end/heldout

Results: OUT/dotted_values.md and OUT/dotted_values.json; `--rescore` scores the stored answers again.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from memformer import MemformerForCausalLM
from memformer.eval.passkey import parse_length
from memformer.qa.demo import PlantedFact, demo_document

# (sentence planted, question, value, cue); depths are spread evenly
FACT_SETS = {
    "dev": [
        ("The address of the backup server is 172.31.48.209.", "What is the address of the backup server?",
         "172.31.48.209", "The address of the backup server is"),
        ("The release that fixed the memory leak is version 4.12.7.", "Which version fixed the memory leak?",
         "4.12.7", "The release that fixed the memory leak is version"),
        ("The measured drag coefficient was 0.3417 at full speed.", "What was the measured drag coefficient?",
         "0.3417", "The measured drag coefficient was"),
        ("The gateway of the lab network is 10.8.0.254.", "What is the gateway of the lab network?",
         "10.8.0.254", "The gateway of the lab network is"),
        ("Our archive mirror runs release 2.9.31 of the software.", "Which release does the archive mirror run?",
         "2.9.31", "Our archive mirror runs release"),
        ("The tolerance of the bearing is 0.075 millimetres.", "What is the tolerance of the bearing?",
         "0.075", "The tolerance of the bearing is"),
        ("The printer in the east wing answers at 192.168.7.41.", "At which address does the east wing printer answer?",
         "192.168.7.41", "The printer in the east wing answers at"),
        ("The firmware on the old router is 1.0.17.", "Which firmware runs on the old router?",
         "1.0.17", "The firmware on the old router is"),
    ],
    "heldout": [
        ("The monitoring host listens on 10.44.3.19.", "On which address does the monitoring host listen?",
         "10.44.3.19", "The monitoring host listens on"),
        ("The kernel we pinned for the cluster is 5.10.178.", "Which kernel was pinned for the cluster?",
         "5.10.178", "The kernel we pinned for the cluster is"),
        ("The average load of the mail relay was 2.817 last week.", "What was the average load of the mail relay?",
         "2.817", "The average load of the mail relay was"),
        ("The name server of the branch office is 172.20.9.2.", "What is the name server of the branch office?",
         "172.20.9.2", "The name server of the branch office is"),
        ("The library shipped with the installer is version 3.4.22.", "Which version of the library ships with the installer?",
         "3.4.22", "The library shipped with the installer is version"),
        ("The error rate of the new disks is 0.0062 per year.", "What is the error rate of the new disks?",
         "0.0062", "The error rate of the new disks is"),
        ("The build farm's proxy sits at 10.1.250.7.", "Where does the build farm's proxy sit?",
         "10.1.250.7", "The build farm's proxy sits at"),
        ("The oldest supported client is release 0.9.14.", "What is the oldest supported client?",
         "0.9.14", "The oldest supported client is release"),
    ],
}


def haystack_document(tokenizer, max_tokens: int, facts: list[PlantedFact], path: str | None) -> str:
    """Python's docs (path None) or the first `max_tokens` tokens of the text at `path`, with
    `facts` planted between paragraphs near their depths."""
    text = None if path is None else Path(path).read_text(encoding="utf-8")
    return demo_document(tokenizer, max_tokens, facts, text)


def holds_value(answer: str, value: str) -> bool:
    """The answer states `value` whole: not inside a longer number ("10.8.0.2541", "10.8.0.254.1",
    "110.8.0.254" do not state 10.8.0.254; "10.8.0.254." does)."""
    return re.search(r"(?<![\d.])" + re.escape(value) + r"(?!\.?\d)", answer) is not None


def run(model, facts: list[PlantedFact], max_new_tokens: int) -> dict[str, list[dict]]:
    """Each fact as a cue and as a question, with the default copy pointer and with it off:
    {setting: [record per fact]}."""
    shipped = model.memory_config.copy_pointer
    out = {}
    try:
        for name, beta in (("default", shipped), ("pointer off", 0.0)):
            model.memory_config.copy_pointer = beta          # read by each question read (`reading_blocks`)
            rows = []
            for f in facts:
                cue = model.ask(cue=f.cue, max_new_tokens=max_new_tokens)
                question = model.ask(f.question, max_new_tokens=max_new_tokens)
                rows.append(dict(value=f.answer, cue_answer=cue, cue_ok=holds_value(cue, f.answer),
                                 question_answer=question, question_ok=holds_value(question, f.answer)))
                print(f"  {name:11} {f.answer:14} cue {cue!r:40} question {question!r}", flush=True)
            out[name] = rows
    finally:
        model.memory_config.copy_pointer = shipped
    return out


def report(results: dict[str, list[dict]], args, seconds: float) -> str:
    lines = ["# Values with points inside them, copied from memory", "",
             f"Facts: `{args.facts}` ({len(next(iter(results.values())))}), haystack: "
             f"{Path(args.haystack).name if args.haystack else 'Python docs'}, {args.tokens} tokens; "
             f"{seconds:.0f} s.", "",
             "| setting | cue: whole value | question: whole value |", "|---|---:|---:|"]
    for name, rows in results.items():
        lines.append(f"| {name} | {sum(r['cue_ok'] for r in rows)}/{len(rows)} | "
                     f"{sum(r['question_ok'] for r in rows)}/{len(rows)} |")
    lines += ["", "| value | setting | cue answer | question answer |", "|---|---|---|---|"]
    for name, rows in results.items():
        for r in rows:
            cell = lambda s: repr(s).replace("|", "\\|")
            lines.append(f"| {r['value']} | {name} | {cell(r['cue_answer'])} | {cell(r['question_answer'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--facts", choices=sorted(FACT_SETS), default="dev")
    ap.add_argument("--haystack", default=None, help="a text file (default: Python's docs)")
    ap.add_argument("--tokens", default="16k")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/pointer_item_end/dev")
    ap.add_argument("--rescore", action="store_true",
                    help="score the answers stored in OUT/dotted_values.json again (no model run)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.rescore:
        if not (out / "dotted_values.json").is_file():
            ap.error(f"--rescore: {out / 'dotted_values.json'} does not exist (run the benchmark into --out first)")
        stored = json.loads((out / "dotted_values.json").read_text())
        for rows in stored["results"].values():
            for r in rows:
                r["cue_ok"], r["question_ok"] = holds_value(r["cue_answer"], r["value"]), holds_value(r["question_answer"], r["value"])
        (out / "dotted_values.json").write_text(json.dumps(stored, indent=1))
        text = report(stored["results"], argparse.Namespace(**stored["settings"]), stored.get("seconds", 0.0))
        (out / "dotted_values.md").write_text(text)
        print(text)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    model = MemformerForCausalLM.from_pretrained()
    n = len(FACT_SETS[args.facts])
    facts = [PlantedFact((k + 0.5) / n, *fact) for k, fact in enumerate(FACT_SETS[args.facts])]
    text = haystack_document(model.tokenizer, parse_length(args.tokens), facts, args.haystack)
    start = time.time()
    model.memorize(text, show_progress=True)
    results = run(model, facts, args.max_new_tokens)
    seconds = time.time() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / "dotted_values.json").write_text(json.dumps(dict(settings=vars(args), seconds=seconds, results=results), indent=1))
    (out / "dotted_values.md").write_text(report(results, args, seconds))
    print((out / "dotted_values.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
