"""`memformer eval passkey`: passkey retrieval at several lengths, the modes side by side.

Also the pieces the other trial-based evaluations share: their common arguments, their
validation and the header of their Markdown report.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from memformer.commands.common import add_model_args, load_model as _load_model

ALL_MODES = "memory,truncate,rag,full"


def add_trial_args(p: argparse.ArgumentParser, out: str, lengths: str, trials: int) -> None:
    """--lengths --trials --modes --seed --out --resume."""
    p.add_argument("--lengths", default=lengths, help="comma-separated prompt lengths, e.g. 4k,16k,32000")
    p.add_argument("--trials", type=int, default=trials, help="trials per length (needle depths spread evenly)")
    p.add_argument("--modes", default=ALL_MODES, help=f"comma-separated, from {ALL_MODES}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out, help="folder for the table, plots and trials.jsonl")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished trials in OUT/trials.jsonl and run only the missing ones")
    p.add_argument("--depth-bins", type=int, default=5, help="depth rows of the heatmaps")


def parse_trial_args(args, prog: str) -> tuple[list[int], list[str]] | None:
    """(lengths, modes), or None after printing what is wrong with the arguments."""
    from memformer import passkey, qa
    try:
        lengths = [passkey.parse_length(s) for s in args.lengths.split(",")]
    except ValueError as e:
        return _fail(prog, str(e))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in qa.MODES]
    if bad or not modes:
        return _fail(prog, f"unknown mode(s) {bad or modes}; choose from {', '.join(qa.MODES)}")
    if args.trials < 1 or args.depth_bins < 1:
        return _fail(prog, f"--trials and --depth-bins must be >= 1, got {args.trials} and {args.depth_bins}")
    return lengths, modes


def _fail(prog: str, msg: str) -> None:
    print(f"{prog}: {msg}", file=sys.stderr)
    return None


def report_header(title: str, model, args, seconds: float, what: str) -> str:
    """Markdown title, settings and the exact command, above an evaluation's table."""
    cfg = model.memory_config
    layers = f"all {len(model.memory_layer_ids)}" if cfg.memory_layers is None else cfg.memory_layers
    return (f"# {title}\n\n{what}\n\nbackbone: {args.model or 'SmolLM2-135M-Instruct (default)'}, "
            f"window {cfg.window}, top-k {cfg.top_k}, memory layers: {layers}, sink tokens {cfg.sink_tokens}, "
            f"overlap {cfg.overlap}, position mode {cfg.position_mode}; {args.trials} trials per length, "
            f"seed {args.seed}; {seconds:.0f}s in this run{' (resumed)' if args.resume else ''}\n\n"
            f"Command: `memformer {' '.join(sys.argv[1:])}`\n\n")


def register(ev) -> None:
    p = ev.add_parser("passkey", help="passkey retrieval, the modes side by side")
    add_model_args(p)
    add_trial_args(p, "benchmarks/results/passkey", "4k,8k,16k", 10)
    p.set_defaults(func=cmd_eval_passkey)


def cmd_eval_passkey(args) -> int:
    from memformer import evalplots, passkey
    parsed = parse_trial_args(args, "memformer eval passkey")
    if parsed is None:
        return 2
    lengths, modes = parsed
    model = _load_model(args)
    out = Path(args.out)
    t0 = time.perf_counter()
    try:
        results = passkey.evaluate(model, lengths, args.trials, modes=modes, seed=args.seed, out_dir=out,
                                   resume=args.resume)
    except ValueError as e:
        print(f"memformer eval passkey: {e}", file=sys.stderr)
        return 2
    header = report_header("Passkey retrieval", model, args, time.perf_counter() - t0,
                           "LongLLaMA passkey prompt; the question is a sentence to complete; correct = the "
                           "first number generated is the key.")
    table = passkey.summary_table(results)
    (out / "passkey.md").write_text(header + table + "\n")
    passkey.plot_heatmap(results, out / "passkey_heatmap.png", bins=args.depth_bins)
    evalplots.plot_accuracy_vs_length(results, out / "passkey_accuracy.png", title="passkey accuracy vs length")
    print(header + table)
    print(f"\nwritten: {out / 'passkey.md'}, {out / 'passkey_heatmap.png'}, {out / 'passkey_accuracy.png'}, "
          f"{out / 'trials.jsonl'}")
    return 0
