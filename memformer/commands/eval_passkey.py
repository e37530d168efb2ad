"""`memformer eval passkey`: passkey retrieval at several lengths, memory vs truncation."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from memformer.commands.common import add_model_args, load_model as _load_model


def register(ev) -> None:
    p = ev.add_parser("passkey", help="passkey retrieval, memory vs truncation")
    add_model_args(p)
    p.add_argument("--lengths", default="4k,8k,16k")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--modes", default="memory,truncate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/passkey")
    p.set_defaults(func=cmd_eval_passkey)


def cmd_eval_passkey(args) -> int:
    from memformer import passkey
    model = _load_model(args)
    lengths = [passkey.parse_length(s) for s in args.lengths.split(",")]
    out = Path(args.out)
    t0 = time.perf_counter()
    results = passkey.evaluate(model, lengths, args.trials, modes=args.modes.split(","), seed=args.seed, out_dir=out)
    table = passkey.summary_table(results)
    cfg = model.memory_config
    header = (f"# Passkey retrieval\n\nbackbone: {args.model or 'SmolLM2-135M-Instruct (default)'}, "
              f"window {cfg.window}, top-k {cfg.top_k}, memory layers: "
              f"{'all ' + str(len(model.memory_layer_ids)) if cfg.memory_layers is None else cfg.memory_layers}, "
              f"sink tokens {cfg.sink_tokens}, overlap {cfg.overlap}, position mode {cfg.position_mode}, "
              f"{args.trials} trials per length, seed {args.seed}, {time.perf_counter() - t0:.0f}s in all\n\n"
              f"Command: `memformer {' '.join(sys.argv[1:])}`\n\n")
    (out / "passkey.md").write_text(header + table + "\n")
    passkey.plot_heatmap(results, out / "passkey_heatmap.png")
    print(header + table)
    print(f"\nwritten: {out / 'passkey.md'}, {out / 'passkey_heatmap.png'}, {out / 'trials.jsonl'}")
    return 0
