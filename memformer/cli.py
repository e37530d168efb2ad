"""The `memformer` command: `memformer qa ...`, `memformer eval passkey ...`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF folder, .gguf file or cached hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="memory-layer weights saved by save_pretrained")
    p.add_argument("--window", type=int, default=1024, help="local window W in tokens")
    p.add_argument("--top-k", type=int, default=32, help="memory keys retrieved per query head")
    p.add_argument("--memory-layers", default=None, help="comma-separated layer indices (default: all)")
    p.add_argument("--position-mode", default="window", choices=["first", "fixed", "window"])
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--memory-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _load_model(args):
    import torch
    from memformer import MemformerForCausalLM, MemoryConfig
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = None if not args.memory_layers else [int(x) for x in args.memory_layers.split(",")]
    cfg = MemoryConfig(window=args.window, top_k=args.top_k, memory_layers=layers, position_mode=args.position_mode,
                       sink_tokens=args.sink_tokens, memory_dtype=args.memory_dtype)
    return MemformerForCausalLM.from_pretrained(args.model, None if args.adapter else cfg, adapter=args.adapter)


def cmd_qa(args) -> int:
    from memformer import qa
    model = _load_model(args)
    if args.demo:
        text = qa.demo_document(model.tokenizer, args.demo_tokens)
        docs = [text]
        questions = [(f.question, f.cue, f.answer) for f in qa.DEMO_FACTS]
        print(f"demo document: Python's documentation topics, {args.demo_tokens} tokens, "
              f"{len(qa.DEMO_FACTS)} facts planted at depths {[f.depth for f in qa.DEMO_FACTS]}; each "
              f"question is asked as a sentence to complete after the document's last window")
    else:
        if not args.doc:
            print("memformer qa: give --doc FILE (or --demo)", file=sys.stderr)
            return 2
        try:
            docs = [qa.read_document(d) for d in args.doc]
        except qa.DocumentError as e:
            print(f"memformer qa: {e}", file=sys.stderr)
            return 2
        questions = [(q, None, None) for q in args.question]
    t0 = time.perf_counter()
    # the demo document is rebuilt in seconds; caching its memory would only fill the disk
    use_cache = not (args.no_cache or args.demo)
    tail, cached = qa.memorize_documents(model, docs, cache_dir=args.cache_dir if use_cache else None)
    n = model.memory_size()
    print(f"memory: {n} tokens x {len(model.memory_layer_ids)} layers "
          f"({'loaded from cache' if cached else 'built'} in {time.perf_counter() - t0:.1f}s); "
          f"local window: the last {len(tail)} tokens + the question")
    results = []
    for q, cue, expected in questions:
        row = {"question": q, "memory": qa.answer(model, tail, q, cue, max_new_tokens=args.max_new_tokens)}
        if cue:
            row["asked_as"] = cue
        if args.compare:
            row["truncate"] = qa.answer(model, tail, q, cue, use_memory=False, max_new_tokens=args.max_new_tokens)
        if expected is not None:
            row["expected"] = expected
        results.append(row)
        if not args.json:
            print(f"\nQ: {q}" + (f"\n   asked as:  {cue} ..." if cue else ""))
            if expected is not None:
                print(f"   expected:  {expected}")
            for mode in ("memory", "truncate") if args.compare else ("memory",):
                a = " ".join(row[mode].split())
                mark = f"   [{'ok' if expected in row[mode] else 'miss'}]" if expected else ""
                print(f"   {mode + ':':10} {a[:160]}{mark}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memformer", description="long-term kNN memory for frozen LMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("qa", help="answer questions about long documents from memory")
    _add_model_args(p)
    p.add_argument("--doc", action="append", default=[], help="document file (repeatable)")
    p.add_argument("--question", "-q", action="append", default=[], help="question (repeatable)")
    p.add_argument("--demo", action="store_true", help="Python's docs with planted facts")
    p.add_argument("--demo-tokens", type=int, default=16384)
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                   help="also answer from the truncated document (last window only)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "memformer" / "memories"))
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_qa)

    ev = sub.add_parser("eval", help="evaluations").add_subparsers(dest="eval", required=True)
    p = ev.add_parser("passkey", help="passkey retrieval, memory vs truncation")
    _add_model_args(p)
    p.add_argument("--lengths", default="4k,8k,16k")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--modes", default="memory,truncate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/passkey")
    p.set_defaults(func=cmd_eval_passkey)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
