"""Free-form questions vs sentence-completion cues through `model.ask`, trained default vs training-free.

Twelve facts are planted at spread depths in `--tokens` tokens of Python's docs; the document is
memorized once per model, then each fact is asked twice: as a free-form question (chat template,
the model writes the whole answer) and as a cue (the sentence to complete). Correct = the answer
contains the fact's value. Models (`--models`): `auto`, the default `from_pretrained()` (the shipped
trained adapter); `none`, `from_pretrained(adapter=None)` (training-free memory in every layer);
or an adapter folder.

    .venv/bin/python benchmarks/question_forms.py --tokens 16k --threads 2
    .venv/bin/python benchmarks/question_forms.py --models auto,run/adapter --out benchmarks/results/question_forms_run

Results: benchmarks/results/question_forms/question_forms.md and .json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from memformer import MemformerForCausalLM
from memformer.eval.passkey import parse_length
from memformer.qa.demo import PlantedFact, demo_document

# (sentence planted, question, value, cue)
FACTS = [
    ("The secret code of the blue vault is 73914.", "What is the secret code of the blue vault?", "73914",
     "The secret code of the blue vault is"),
    ("The name of the lighthouse keeper's cat is Marmalade.", "What is the name of the lighthouse keeper's cat?",
     "Marmalade", "The name of the lighthouse keeper's cat is"),
    ("The meeting with the archivist is in room 4417.", "In which room is the meeting with the archivist?", "4417",
     "The meeting with the archivist is in room"),
    ("The captain's favourite fruit is the quince.", "What is the captain's favourite fruit?", "quince",
     "The captain's favourite fruit is the"),
    ("The password of the old server is falcon-2291.", "What is the password of the old server?", "2291",
     "The password of the old server is falcon-"),
    ("The treasure is buried under the oak tree behind the mill.", "Where is the treasure buried?", "oak",
     "The treasure is buried under the"),
    ("The librarian's daughter is called Ingrid.", "What is the librarian's daughter called?", "Ingrid",
     "The librarian's daughter is called"),
    ("The train to Lisbon leaves from platform 37.", "From which platform does the train to Lisbon leave?", "37",
     "The train to Lisbon leaves from platform"),
    ("The chemist keeps the spare key in a green teapot.", "Where does the chemist keep the spare key?", "teapot",
     "The chemist keeps the spare key in a green"),
    ("The winning lottery number last week was 58203.", "What was the winning lottery number last week?", "58203",
     "The winning lottery number last week was"),
    ("The ship that sank in the storm was named Albatross.", "What was the name of the ship that sank in the storm?",
     "Albatross", "The ship that sank in the storm was named"),
    ("The baker's secret ingredient is cardamom.", "What is the baker's secret ingredient?", "cardamom",
     "The baker's secret ingredient is"),
]


def run(model, text: str, max_new_tokens: int) -> tuple[list[dict], float]:
    """Memorize `text` once, ask every fact as a question and as a cue: a record per fact."""
    t0 = time.perf_counter()
    model.reset_memory()
    model.memorize(text, show_progress=False)
    read_s = time.perf_counter() - t0
    rows = []
    for sentence, question, value, cue in FACTS:
        q = model.ask(question, max_new_tokens=max_new_tokens)
        c = model.ask(question, cue=cue, max_new_tokens=max_new_tokens)
        rows.append(dict(value=value, question=question, question_answer=q, question_ok=value.lower() in q.lower(),
                         cue=cue, cue_answer=c, cue_ok=value.lower() in c.lower()))
        print(f"  {value:10} question {'ok ' if rows[-1]['question_ok'] else 'NO '} cue "
              f"{'ok ' if rows[-1]['cue_ok'] else 'NO '} | {' '.join(q.split())[:70]}", flush=True)
    return rows, read_s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="16k")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--models", default="auto,none", help="comma-separated: auto, none or adapter folders")
    ap.add_argument("--out", default="benchmarks/results/question_forms")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    names = {"auto": "trained default", "none": "training-free, all layers"}
    for spec in args.models.split(","):
        name, adapter = names.get(spec, f"adapter {spec}"), None if spec == "none" else spec
        model = MemformerForCausalLM.from_pretrained(adapter=adapter)
        n = parse_length(args.tokens)
        depths = [0.04 + 0.92 * i / (len(FACTS) - 1) for i in range(len(FACTS))]
        text = demo_document(model.tokenizer, n, [PlantedFact(d, s, q, v, c)
                                                  for d, (s, q, v, c) in zip(depths, FACTS)])
        print(f"{name}: memory layers {model.memory_layer_ids[0]}..{model.memory_layer_ids[-1]} "
              f"({len(model.memory_layer_ids)})", flush=True)
        rows, read_s = run(model, text, args.max_new_tokens)
        results[name] = dict(memory_layers=list(model.memory_layer_ids), read_s=round(read_s, 1), rows=rows)
        del model
    (out / "question_forms.json").write_text(json.dumps(dict(tokens=args.tokens, results=results), indent=2))
    cmd = " ".join(["benchmarks/question_forms.py", *sys.argv[1:]] if argv is None else
                   ["benchmarks/question_forms.py", *argv])
    lines = ["# Free-form questions vs cues through `model.ask`", "",
             f"Command: `.venv/bin/python {cmd}`; {len(FACTS)} facts planted at depths 0.04-0.96 in "
             f"{args.tokens} tokens of Python's docs, memorized once per model; greedy, "
             f"{args.max_new_tokens} new tokens at most; correct = the answer contains the value.", "",
             "| model | memory layers | free-form question (chat template) | cue (sentence to complete) |",
             "|---|---|---:|---:|"]
    for name, r in results.items():
        k = len(r["rows"])
        nq, nc = sum(x["question_ok"] for x in r["rows"]), sum(x["cue_ok"] for x in r["rows"])
        lines.append(f"| {name} | {len(r['memory_layers'])} | {nq}/{k} | {nc}/{k} |")
    (out / "question_forms.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
