"""`memformer eval needle`: RULER-style needles in Python's documentation, the modes side by side."""
from __future__ import annotations

import sys

from memformer.cli.common import (add_model_args, add_trial_args, needle_tables, parse_trial_args, per_doc,
                                  report_header, run_trials)


def register(ev) -> None:
    from memformer.eval.needle import TASKS
    p = ev.add_parser("needle", help="RULER-style needle variants on a real-text haystack (and passkey)")
    add_model_args(p)
    add_trial_args(p, "runs/needle", "4k,8k,16k", 5, needles=8)
    p.add_argument("--variants", default="all,passkey",
                   help=f"comma-separated, from {','.join(TASKS)}; all = every needle variant")
    p.set_defaults(func=cmd_eval_needle)


def cmd_eval_needle(args) -> int:
    from memformer.eval import plots as evalplots, needle
    prog = "memformer eval needle"
    parsed = parse_trial_args(args, prog)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    variants = list(dict.fromkeys(w for v in names for w in (needle.VARIANTS if v == "all" else [v])))
    bad = [v for v in variants if v not in needle.TASKS]
    if parsed is None or bad or not variants:
        if bad or not variants:
            print(f"{prog}: unknown variant(s) {bad or variants}; choose from {', '.join(needle.TASKS)} or all",
                  file=sys.stderr)
        return 2
    lengths, modes = parsed
    ran = run_trials(prog, args, lambda model, out: needle.evaluate(
        model, variants, lengths, args.trials, modes=modes, seed=args.seed, out_dir=out, resume=args.resume,
        evidence=args.evidence, needles_per_doc=args.needles_per_doc))
    if ran is None:
        return 2
    model, out, results, seconds = ran
    what = ("Haystack: Python's documentation topics (standard-library source appended for long lengths) "
            "from a seeded offset (passkey: its own grass/sky filler); needles on their own lines; each "
            "question is a sentence to complete; with several needles per document, keys and values are "
            "distinct across the document and a trial is one key's needle(s) (multikey: with its 3 "
            "distractors; multivalue: its 4 values; multiquery: 4 keys, each asked); "
            "score = the first value(s) of the right kind in the answer are the expected ones "
            "(multivalue / multiquery: the fraction found). Cells: mean score (sum/trials).")
    header = report_header("Needle in a haystack (RULER-style)", model, args, seconds, what)
    table = evalplots.accuracy_table(results, tasks=variants) + "\n\n" + _mean_table(results)
    table += "\n\nBy depth of the target needle:\n\n" + evalplots.depth_table(results, args.depth_bins)
    table += needle_tables(results)
    (out / "needle.md").write_text(header + table + "\n")
    evalplots.plot_depth_heatmaps(results, out / "needle_heatmap.png", bins=args.depth_bins,
                                  title="needle accuracy by depth and length" + per_doc(args))
    evalplots.plot_accuracy_vs_length(results, out / "needle_accuracy.png", title="needle accuracy vs length")
    print(header + table)
    print(f"\nwritten: {out / 'needle.md'}, {out / 'needle_heatmap.png'}, {out / 'needle_accuracy.png'}, "
          f"{out / 'trials.jsonl'}")
    return 0


def _mean_table(results) -> str:
    """All tasks pooled: a row per length."""
    from memformer.eval import plots as evalplots
    pooled = [dict(r, task="all tasks") for r in results]
    return evalplots.accuracy_table(pooled)
