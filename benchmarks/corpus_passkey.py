"""Corpus memory end to end: a passkey planted in one of N documents, answered from the corpus.

    .venv/bin/python benchmarks/corpus_passkey.py --docs 50 --trials 3 --out benchmarks/results/corpus

Per trial: N documents of about --doc-tokens tokens (--haystack filler: the passkey
test's filler text; pydocs: slices of Python's documentation) are written to a folder, the passkey sentence is planted at a random depth of one random document,
`build_corpus` reads the folder into a corpus memory (as `memformer memory build` does), a
fresh model attaches it read-only, and the passkey question is answered from the corpus alone
with two prompts in the local window: "task+question" (the passkey task line, then the question) and
"filler+question" (20 filler sentences, then the question: the tail of the passkey test's own
prompt, i.e. what its final window holds).. A trial is correct when the first number generated
is the key; the evidence is correct when the document with the most attention mass is the one
holding the passkey. Writes corpus_passkey.md and trials.jsonl under --out.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memformer import MemformerForCausalLM, MemoryConfig, corpus  # noqa: E402
from memformer.eval import passkey  # noqa: E402
from memformer.qa.demo import python_docs_text  # noqa: E402


PROMPTS = {"task+question": passkey.TASK + " " + passkey.QUESTION,
           "filler+question": " ".join([passkey.FILLER] * 20) + " " + passkey.QUESTION}


def write_documents(folder: Path, tokenizer, n: int, doc_tokens: int, planted: int, key: int, rng,
                    haystack: str = "filler") -> None:
    """n documents of ~doc_tokens tokens; document `planted` holds the passkey sentence.

    haystack "filler": the passkey test's own filler ("The grass is green. ..."), so only the
    needle differs between documents; "pydocs": consecutive slices of Python's documentation."""
    if haystack == "pydocs":
        ids = tokenizer(python_docs_text(), add_special_tokens=False)["input_ids"]
        if len(ids) < n * doc_tokens:
            raise ValueError(f"Python's docs hold {len(ids)} tokens, fewer than {n} x {doc_tokens}")
        texts = [tokenizer.decode(ids[i * doc_tokens:(i + 1) * doc_tokens]) for i in range(n)]
    else:
        per = len(tokenizer(" " + passkey.FILLER, add_special_tokens=False)["input_ids"])
        texts = [" ".join([passkey.FILLER] * max(1, doc_tokens // per)) for _ in range(n)]
    for i, text in enumerate(texts):
        if i == planted:
            cut = text.find(". ", int(rng.uniform(0.2, 0.8) * len(text)))
            cut = len(text) // 2 if cut < 0 else cut + 2
            text = text[:cut] + passkey.NEEDLE.format(key=key) + " " + text[cut:]
        (folder / f"doc_{i:03d}.txt").write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=50)
    ap.add_argument("--doc-tokens", type=int, default=400)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--haystack", choices=["filler", "pydocs"], default="filler")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-dtype", default="auto")
    ap.add_argument("--out", default="benchmarks/results/corpus")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    cfg = MemoryConfig(memory_dtype=args.memory_dtype)
    model = MemformerForCausalLM.from_pretrained(None, cfg)
    tok = model.tokenizer
    rows = []
    with open(out / "trials.jsonl", "w") as log:
        for trial in range(args.trials):
            planted, key = rng.randrange(args.docs), rng.randint(10000, 99999)
            with tempfile.TemporaryDirectory() as tmp:
                docs, mem = Path(tmp) / "docs", Path(tmp) / "mem"
                docs.mkdir()
                write_documents(docs, tok, args.docs, args.doc_tokens, planted, key, rng, args.haystack)
                t0 = time.perf_counter()
                table = corpus.build_corpus(model, docs, mem, show_progress=False)
                build_s = time.perf_counter() - t0
                reader = model                       # the corpus alone: no memory of its own
                reader.reset_memory()
                reader.attach_corpus(mem)
                for prompt_name, prompt in PROMPTS.items():
                    x = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
                    y = reader.generate(x, max_new_tokens=8, do_sample=False, record=True)
                    answer = tok.decode(y[0, x.shape[1]:], skip_special_tokens=True).strip()
                    evidence = reader.corpus_evidence(top=3)
                    row = {"trial": trial, "prompt": prompt_name, "documents": len(table), "tokens": table[-1].end,
                           "planted": f"doc_{planted:03d}.txt", "key": key, "answer": answer,
                           "correct": passkey.first_number(answer) == key,
                           "evidence_top": evidence[0]["doc"] if evidence else None,
                           "evidence_share": evidence[0]["share"] if evidence else 0.0,
                           "evidence_correct": bool(evidence) and evidence[0]["doc"] == f"doc_{planted:03d}.txt",
                           "evidence_snippet": evidence[0]["snippet"] if evidence else "", "build_s": round(build_s, 1)}
                    rows.append(row)
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    print(row, flush=True)
                reader.detach_corpus()
    haystack_note = {"filler": "the passkey test's filler text", "pydocs": "slices of Python's documentation"}
    score = {p: (sum(r["correct"] for r in rows if r["prompt"] == p), sum(r["evidence_correct"] for r in rows
                 if r["prompt"] == p), sum(r["prompt"] == p for r in rows)) for p in PROMPTS}
    md = [f"# Corpus memory: passkey planted in one of {args.docs} documents\n",
          f"Command: `python benchmarks/corpus_passkey.py {' '.join(sys.argv[1:])}`\n",
          f"Default backbone (SmolLM2-135M-Instruct), MemoryConfig defaults (memory dtype {args.memory_dtype}); "
          f"documents of ~{args.doc_tokens} tokens ({haystack_note[args.haystack]}); the passkey task line and "
          f"question are answered from the "
          f"attached corpus alone.\n",
          "| prompt in the local window | answer correct | top evidence document = planted document |",
          "|---|---:|---:|",
          *[f"| {p} | {c}/{n} | {e}/{n} |" for p, (c, e, n) in score.items()], "",
          "| trial | prompt | tokens | planted in | key | answer | top evidence (share) | build (s) |",
          "|---:|---|---:|---|---:|---|---|---:|"]
    for r in rows:
        md.append(f"| {r['trial']} | {r['prompt']} | {r['tokens']} | {r['planted']} | {r['key']} | {r['answer'][:20]!r} "
                  f"{'ok' if r['correct'] else 'miss'} | {r['evidence_top']} ({r['evidence_share']:.2f}) "
                  f"{'ok' if r['evidence_correct'] else 'miss'} | {r['build_s']} |")
    (out / "corpus_passkey.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
