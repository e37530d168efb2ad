"""Do evidence spans point at the passage an answer came from?

One document (Python's documentation topics) with eight facts planted at depths 0.05–0.75, all
in memory, so every fact can only reach the answer through memory. The document is memorized
once; each fact is asked as a sentence to complete (a cue) with `model.ask` (question reads).
For each answer the recorded reads are ranked two ways:

* lift   — mass the answer's queries paid a token beyond what the prompt's own queries paid it
           (`RetrievalMass.lift`); with question reads every query reads the same blocks, so
           `answer_evidence` (what `LongDocQA.answer` ships) falls back to the answer's mass
           when no token drew more;
* answer — the raw mass of the answer's queries (`RetrievalMass.answer`).

A hit = the planted sentence overlaps the top-1 (or one of the top-3) spans. RAG is scored the
same way on its retrieved passages.

    .venv/bin/python benchmarks/qa_evidence.py --tokens 12288

Results: benchmarks/results/qa_evidence.md and qa_evidence.jsonl.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time
from pathlib import Path

import torch

from memformer import MemformerForCausalLM, MemoryConfig
from memformer.qa.evidence import retrieval_mass, spans_from_mass
from memformer.qa.demo import PlantedFact, demo_document
from memformer.qa.longdoc import Document, prepare

FACTS = [
    ("The secret code of the blue vault is 73914.", "73914", "The secret code of the blue vault is"),
    ("The name of the lighthouse keeper's cat is Marmalade.", "Marmalade", "The name of the lighthouse keeper's cat is"),
    ("The ferry to Saltmarsh Island leaves from pier 7.", "7", "The ferry to Saltmarsh Island leaves from pier"),
    ("The winning lottery number last spring was 58026.", "58026", "The winning lottery number last spring was"),
    ("The captain's parrot is called Biscuit.", "Biscuit", "The captain's parrot is called"),
    ("Doctor Alvarez keeps her spare keys in the green teapot.", "teapot", "Doctor Alvarez keeps her spare keys in the green"),
    ("The password for the old observatory is copper kettle.", "copper", "The password for the old observatory is"),
    ("The archivist's meeting is in room 21.", "21", "The archivist's meeting is in room"),
]


def hits(spans, start: int, end: int) -> tuple[bool, bool]:
    """(top-1 overlaps [start, end), one of the top-3 does)."""
    over = [s.start < end and start < s.end for s in spans[:3]]
    return bool(over[:1] and over[0]), any(over)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=12288)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    model = MemformerForCausalLM.from_pretrained(None, MemoryConfig(window=args.window))
    tok = model.tokenizer
    depths = [0.05 + 0.1 * i for i in range(len(FACTS))]
    planted = [PlantedFact(d, s, "", a, c) for d, (s, a, c) in zip(depths, FACTS)]
    text = demo_document(tok, args.tokens, planted)
    t0 = time.perf_counter()
    ctx = prepare(model, [Document("python-docs", text)], "memory")      # memorized whole: question reads
    build_s = time.perf_counter() - t0
    rag = ctx.rag() if importlib.util.find_spec("sentence_transformers") else None
    rows = []
    for f in planted:
        start = text.index(f.sentence)
        end = start + len(f.sentence)
        ans = model.ask(cue=f.cue, max_new_tokens=8, record=True)
        mass = retrieval_mass(model, len(ctx.corpus))
        model.clear_recorded_reads()
        row = {"fact": f.sentence, "depth": round(f.depth, 2), "answer": ans, "correct": f.answer in ans,
               "memory_share": round(mass.memory_share, 4)}
        for name, m in (("lift", mass.lift), ("answer", mass.answer)):
            row[f"{name}_top1"], row[f"{name}_top3"] = hits(spans_from_mass(ctx.corpus, m, top=3), start, end)
        if rag is not None:
            got = ctx.answer(cue=f.cue, mode="rag", max_new_tokens=8)
            row["rag_answer"], row["rag_correct"] = got.text, f.answer in got.text
            row["rag_top1"], row["rag_top3"] = hits(got.evidence, start, end)
        rows.append(row)
        print(json.dumps(row))
    write(rows, Path(args.out), args, build_s, len(ctx.corpus))


def write(rows, out: Path, args, build_s: float, tokens: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "qa_evidence.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    n = len(rows)
    count = lambda key, subset=rows: f"{sum(r[key] for r in subset)}/{len(subset)}"
    right = [r for r in rows if r["correct"]]
    lines = ["# Evidence spans: do they point at the planted fact?\n",
             f"`benchmarks/qa_evidence.py --tokens {args.tokens} --window {args.window}` — SmolLM2-135M-Instruct, "
             f"training-free, memory in all layers; {tokens} tokens of Python's docs, {n} facts at depths "
             f"0.05–0.75 (all in memory), memory built in {build_s:.0f}s on {platform.machine()} "
             f"({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the end: "
             f"a wall-clock time, not a speed measurement).\n",
             "| ranking | answers right | top-1 span = fact | top-3 has fact | top-1, right answers only |",
             "|---|---|---|---|---|"]
    for name in ("lift", "answer"):
        lines.append(f"| memory, {name} | {count('correct')} | "
                     f"{count(name + '_top1')} | {count(name + '_top3')} | {count(name + '_top1', right)} |")
    if rows and "rag_top1" in rows[0]:
        lines.append(f"| RAG (MiniLM passages) | {count('rag_correct')} | {count('rag_top1')} | {count('rag_top3')} | |")
    lines += ["", "| depth | fact | memory answer | lift top-1 | answer top-1 |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['depth']} | {r['fact']} | {' '.join(r['answer'].split())[:40]} "
                     f"{'(ok)' if r['correct'] else '(miss)'} | {r['lift_top1']} | {r['answer_top1']} |")
    (out / "qa_evidence.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
