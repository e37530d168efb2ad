"""`memformer memory build --docs DIR --out MEM` and `memformer memory info MEM`: corpus memories."""
from __future__ import annotations

import json
import sys
import time

from memformer.cli.common import add_model_args, load_model


def register(sub) -> None:
    p = sub.add_parser("memory", help="build / inspect corpus memories")
    msub = p.add_subparsers(dest="memory_command", required=True)
    b = msub.add_parser("build", help="read a directory of documents into a memory once (resumable)")
    add_model_args(b)
    b.add_argument("--docs", required=True, help="directory of documents (.txt .md .rst .html .pdf), read recursively")
    b.add_argument("--out", required=True, help="memory directory to write (an existing one is resumed)")
    b.add_argument("--save-every", type=int, default=10, help="save progress after N documents at least (and once the memory has grown by a quarter)")
    b.set_defaults(func=cmd_build)
    i = msub.add_parser("info", help="what a memory directory holds")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)


def cmd_build(args) -> int:
    from memformer import MemoryFileError, corpus
    try:
        corpus.find_documents(args.docs)
    except (FileNotFoundError, ValueError) as e:
        print(f"memformer memory build: {e}", file=sys.stderr)
        return 2
    model = load_model(args)
    t0 = time.perf_counter()
    try:
        docs = corpus.build_corpus(model, args.docs, args.out, save_every=args.save_every)
    except (ValueError, MemoryFileError) as e:       # unreadable document, memory from another model
        print(f"memformer memory build: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(docs)} documents, {model.state.seen[0]} tokens read, {model.memory_size()} in memory "
          f"x {len(model.memory_layer_ids)} layers ({time.perf_counter() - t0:.1f}s this run)")
    return 0


def cmd_info(args) -> int:
    from memformer import MemoryFileError, corpus
    try:
        info = corpus.corpus_info(args.path)
    except (FileNotFoundError, MemoryFileError) as e:
        print(f"memformer memory info: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:18} {v}")
    return 0
