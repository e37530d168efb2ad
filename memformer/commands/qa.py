"""`memformer qa`: answer questions about long documents from memory."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from memformer.commands.common import add_model_args, load_model as _load_model


def register(sub) -> None:
    p = sub.add_parser("qa", help="answer questions about long documents from memory")
    add_model_args(p)
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
