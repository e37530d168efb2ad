"""A cue's answer with and without its first token under the copy pointer, side by side.

`ask` answers a cue by continuing the check's prompt cache, which keeps each read's copy-pointer
shares at the cue's token before the last; the cue's last token, the answer's first step, is
pointed from them (`memformer.blocks.seeded_pointers`). This benchmark asks every query of
needle-suite documents (`memformer eval needle`'s multi-needle layout, 8 needles per document)
twice over the same memory: as shipped, and with `seeded_pointers` giving no pointers, so the first
answer token is generated as before the seed existed. Scores are the needle suite's
(`needle.score_query`).

    python benchmarks/cue_pointer_ab.py --variants single-word --length 128k --seed 0 \
        --cache-dir runs/ruler_cache --out benchmarks/results/cue_pointer/ab_128k_seed0
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import memformer.model as modeling
from memformer import MemformerForCausalLM
from memformer.eval.needle import TASKS, Job, build_sample, score_query
from memformer.qa.longdoc import LongDocQA


def ask_both(model, cue: str, max_new_tokens: int) -> tuple[str, str]:
    """(answer without the cue's seeded pointer, answer as shipped) over the current memory."""
    shipped = modeling.seeded_pointers
    modeling.seeded_pointers = lambda *args, **kwargs: {}
    try:
        without = model.ask(cue=cue, max_new_tokens=max_new_tokens)
    finally:
        modeling.seeded_pointers = shipped
    return without, model.ask(cue=cue, max_new_tokens=max_new_tokens)


def report(records: list[dict], command: str, seconds: float) -> str:
    lines = ["# A cue's first answer token with and without the copy pointer", "",
             f"Command: `{command}` ({seconds:.0f} s)", "",
             "| variant | length | seed | queries | without | with (shipped) | answers changed |",
             "|---|---|---:|---:|---:|---:|---:|"]
    keys = sorted({(r["variant"], r["length"], r["seed"]) for r in records}, key=str)
    for v, L, seed in keys:
        rs = [r for r in records if (r["variant"], r["length"], r["seed"]) == (v, L, seed)]
        lines.append(f"| {v} | {L // 1024}k | {seed} | {len(rs)} | {sum(r['score_without'] for r in rs):g} "
                     f"| {sum(r['score_with'] for r in rs):g} | {sum(r['without'] != r['with_seed'] for r in rs)} |")
    changed = [r for r in records if r["without"] != r["with_seed"]]
    if changed:
        lines += ["", "Answers that changed:", "", "| variant | expected | without | with |", "|---|---|---|---|"]
        for r in changed:
            clip = lambda t: repr(t[:48]).replace("|", "\\|")
            lines.append(f"| {r['variant']} | {', '.join(r['expected'])} | {clip(r['without'])} | {clip(r['with_seed'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="single-word,single-number,multikey",
                    help=f"comma-separated, of {', '.join(TASKS)}")
    ap.add_argument("--length", default="32k")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=None, help="memorized documents kept between runs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in TASKS]
    if bad or not variants:
        ap.error(f"unknown variant(s) {bad or variants}; choose from {', '.join(TASKS)}")
    length = int(args.length.rstrip("k")) * 1024
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = MemformerForCausalLM.from_pretrained()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    with open(out / "answers.jsonl", "w") as f:
        for v in variants:
            sample = build_sample(model.tokenizer, Job(v, length, 0, None, 8, 1), args.seed)
            LongDocQA(model, "memory").read([sample.text], cache_dir=args.cache_dir, show_progress=False)
            for q in sample.queries:
                without, with_seed = ask_both(model, q.cue, sample.max_new_tokens)
                rec = dict(variant=v, length=length, seed=args.seed, cue=q.cue, expected=q.expected,
                           without=without, with_seed=with_seed, score_without=score_query(without, q),
                           score_with=score_query(with_seed, q))
                f.write(json.dumps(rec) + "\n")
                records.append(rec)
                print(f"{v} {q.expected}: {without[:40]!r} -> {with_seed[:40]!r}", flush=True)
    command = ("python benchmarks/cue_pointer_ab.py " + f"--variants {args.variants} --length {args.length} "
               f"--seed {args.seed} --threads {args.threads}"
               + (f" --cache-dir {args.cache_dir}" if args.cache_dir else "") + f" --out {args.out}")
    (out / "ab.md").write_text(report(records, command, time.perf_counter() - t0))
    print(report(records, command, time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
