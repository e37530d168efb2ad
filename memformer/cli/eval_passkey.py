"""`memformer eval passkey`: passkey retrieval at several lengths, the modes side by side.

Also the pieces the other trial-based evaluations share: their common arguments, their
validation and the header of their Markdown report.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from memformer.cli.common import (add_model_args, add_trial_args, load_model as _load_model,
                                       parse_trial_args, report_header)

def register(ev) -> None:
    p = ev.add_parser("passkey", help="passkey retrieval, the modes side by side")
    add_model_args(p)
    add_trial_args(p, "benchmarks/results/passkey", "4k,8k,16k", 10, needles=10)
    p.set_defaults(func=cmd_eval_passkey)


def cmd_eval_passkey(args) -> int:
    from memformer.eval import plots as evalplots, passkey
    parsed = parse_trial_args(args, "memformer eval passkey")
    if parsed is None:
        return 2
    lengths, modes = parsed
    model = _load_model(args)
    out = Path(args.out)
    t0 = time.perf_counter()
    try:
        results = passkey.evaluate(model, lengths, args.trials, modes=modes, seed=args.seed, out_dir=out,
                                   resume=args.resume, evidence=args.evidence,
                                   needles_per_doc=args.needles_per_doc)
    except ValueError as e:
        print(f"memformer eval passkey: {e}", file=sys.stderr)
        return 2
    header = report_header("Passkey retrieval", model, args, time.perf_counter() - t0,
                           "LongLLaMA passkey prompt; the question is a sentence to complete; correct = the "
                           "first number generated is the key. With several needles per document each pass "
                           "key has its owner's name (\"The pass key of Alice is K.\"), keys and names "
                           "distinct, and the question names the owner.")
    from memformer.eval.needle import evidence_table, other_needle_table
    table = passkey.summary_table(results)
    table += "\n\nBy depth of the needle:\n\n" + evalplots.depth_table(results, args.depth_bins, "passkey")
    if evidence_table(results):
        table += "\n\nEvidence (memory trials):\n\n" + evidence_table(results)
    if other_needle_table(results):
        table += "\n\nWrong needle (multi-needle documents):\n\n" + other_needle_table(results)
    (out / "passkey.md").write_text(header + table + "\n")
    per_doc = f" ({args.needles_per_doc} needles per document)" if args.needles_per_doc > 1 else ""
    passkey.plot_heatmap(results, out / "passkey_heatmap.png", bins=args.depth_bins, title="passkey accuracy" + per_doc)
    evalplots.plot_accuracy_vs_length(results, out / "passkey_accuracy.png", title="passkey accuracy vs length")
    print(header + table)
    print(f"\nwritten: {out / 'passkey.md'}, {out / 'passkey_heatmap.png'}, {out / 'passkey_accuracy.png'}, "
          f"{out / 'trials.jsonl'}")
    return 0
