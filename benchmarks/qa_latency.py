"""How long one answer takes once the document is read, per QA mode, side by side.

One needle document (`memformer.eval.needle`, single-number) of `--tokens` tokens is read once per
mode; then the same cue is answered `--repeats` times in each mode and the median time kept.
Memory with question reads holds only the question in its window (the whole document is
memorized), memory with kNN reads keeps the document's tail local (about a window of tokens
beside the question), truncate the tail, rag its passages. Question reads run as by default
(sink_prefix "auto": answered with and without the sink before the blocks, the surer answer
kept) and with one read. Reading time (memorize, embedding)
is reported apart.

    .venv/bin/python benchmarks/qa_latency.py --tokens 16k --repeats 3

Results: benchmarks/results/qa_latency.md and qa_latency.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from memformer import MemformerForCausalLM, qa
from memformer.eval.needle import make_sample, score_query
from memformer.eval.passkey import parse_length

# (mode, memory_reads, sink_prefix): question reads as by default ("auto": two generations, the
# surer kept) and with one read (no sink before the blocks)
CASES = (("memory", "question", "auto"), ("memory", "question", False), ("memory", "knn", False),
         ("truncate", None, False), ("rag", None, False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="16k")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = MemformerForCausalLM.from_pretrained()
    sample = make_sample(model.tokenizer, "single-number", parse_length(args.tokens), 0.5,
                         random.Random(args.seed))
    query = sample.queries[0]
    rows = []
    for mode, reads, sink in CASES:
        t0 = time.perf_counter()
        opts = {"memory_reads": reads, "sink_prefix": sink} if reads else {}
        ctx = qa.prepare(model, [sample.text], mode, show_progress=False, **opts)
        read_s = time.perf_counter() - t0
        times, ans = [], None
        for _ in range(args.repeats):
            ans = ctx.answer(cue=query.cue, max_new_tokens=sample.max_new_tokens, evidence=0)
            times.append(ans.seconds)
        label = {"auto": ", with and without the sink", False: ", one read"}[sink] if reads == "question" else ""
        rows.append(dict(mode=mode if reads is None else f"memory ({reads} reads{label})", read_s=round(read_s, 2),
                         answer_s=round(statistics.median(times), 3), prompt_tokens=ans.prompt_tokens,
                         correct=score_query(ans.text, query) == 1.0, answer=ans.text[:40]))
        print(rows[-1], flush=True)
        model.reset_memory()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(tokens=sample.tokens, repeats=args.repeats, threads=torch.get_num_threads(),
                cpu=platform.processor() or platform.machine(), torch=torch.__version__)
    (out / "qa_latency.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = [f"# Answer time per QA mode ({sample.tokens} tokens, single-number needle at depth 0.5)", "",
             f"Command: `.venv/bin/python benchmarks/qa_latency.py --tokens {args.tokens} --repeats "
             f"{args.repeats}{f' --threads {args.threads}' if args.threads else ''}`; {meta['threads']} torch "
             f"thread(s), {meta['cpu']}, torch {meta['torch']}; median of {args.repeats} answers "
             f"(greedy, {sample.max_new_tokens} new tokens at most), after the document was read once.", "",
             "| mode | prompt tokens | answer (s) | read once (s) | correct |", "|---|---:|---:|---:|---|"]
    lines += [f"| {r['mode']} | {r['prompt_tokens']} | {r['answer_s']:.2f} | {r['read_s']:.1f} | "
              f"{'yes' if r['correct'] else 'no'} |" for r in rows]
    (out / "qa_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
