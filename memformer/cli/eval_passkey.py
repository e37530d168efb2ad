"""`memformer eval passkey`: passkey retrieval at several lengths, the modes side by side."""
from __future__ import annotations

from memformer.cli.common import (add_model_args, add_trial_args, needle_tables, parse_trial_args, per_doc,
                                  report_header, run_trials)


def register(ev) -> None:
    p = ev.add_parser("passkey", help="passkey retrieval, the modes side by side")
    add_model_args(p)
    add_trial_args(p, "runs/passkey", "4k,8k,16k", 10, needles=10)
    p.set_defaults(func=cmd_eval_passkey)


def cmd_eval_passkey(args) -> int:
    from memformer.eval import needle, plots as evalplots
    prog = "memformer eval passkey"
    parsed = parse_trial_args(args, prog)
    if parsed is None:
        return 2
    lengths, modes = parsed
    ran = run_trials(prog, args, lambda model, out: needle.evaluate(     # task "passkey" of the needle runner
        model, ["passkey"], lengths, args.trials, modes=modes, seed=args.seed, out_dir=out, resume=args.resume,
        name="passkey", evidence=args.evidence, needles_per_doc=args.needles_per_doc))
    if ran is None:
        return 2
    model, out, results, seconds = ran
    header = report_header("Passkey retrieval", model, args, seconds,
                           "LongLLaMA passkey prompt; the question is a sentence to complete; correct = the "
                           "first number generated is the key. With several needles per document each pass "
                           "key has its owner's name (\"The pass key of Alice is K.\"), keys and names "
                           "distinct, and the question names the owner.")
    table = evalplots.accuracy_table(results)
    table += "\n\nBy depth of the needle:\n\n" + evalplots.depth_table(results, args.depth_bins, "passkey")
    table += needle_tables(results)
    (out / "passkey.md").write_text(header + table + "\n")
    evalplots.plot_depth_heatmaps(results, out / "passkey_heatmap.png", bins=args.depth_bins,
                                  title="passkey accuracy" + per_doc(args))
    evalplots.plot_accuracy_vs_length(results, out / "passkey_accuracy.png", title="passkey accuracy vs length")
    print(header + table)
    print(f"\nwritten: {out / 'passkey.md'}, {out / 'passkey_heatmap.png'}, {out / 'passkey_accuracy.png'}, "
          f"{out / 'trials.jsonl'}")
    return 0
