"""`memformer memory build|info|convert`: corpus memories.

    memformer memory build --docs DIR --out URI [--ray [ADDRESS]]   # a Lance store (docs/scale.md)
    memformer memory build --docs DIR --out MEM --format dir        # a memory directory (older readers)
    memformer memory info MEM_OR_URI
    memformer memory convert MEM URI                                # directory -> Lance store, one way
    memformer memory cache [--trim SIZE | --clear] [--cache-dir DIR]  # the QA cache (`memformer qa`)
"""
from __future__ import annotations

import functools
import json
import sys
import time

from memformer.cli.common import add_model_args, load_model


def register(sub) -> None:
    p = sub.add_parser("memory", help="build / inspect / convert corpus memories")
    msub = p.add_subparsers(dest="memory_command", required=True)
    b = msub.add_parser("build", help="read a directory of documents into a corpus memory (resumable; "
                                      "documents added later are appended)")
    add_model_args(b)
    b.add_argument("--docs", required=True, help="directory of documents (.txt .md .rst .html .pdf), read recursively")
    b.add_argument("--out", required=True, help="Lance store to write or extend: a folder or an object-storage URI "
                                                "(s3://, gs://, az://); with --format dir, a memory directory")
    b.add_argument("--format", choices=["lance", "dir"], default="lance",
                   help="lance (default): a Lance store (needs memformer[scale]), int8 rows unless --memory-dtype says "
                        "otherwise; dir: a memory directory")
    b.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="shard the documents over a Ray cluster: without ADDRESS a local one on this machine, "
                        "else the running cluster at ADDRESS (host:port, ray://host:port or auto)")
    b.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per GPU, else per CPU)")
    b.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard of work (default 32768)")
    b.add_argument("--save-every", type=int, default=10, help="--format dir: save progress after N documents at "
                                                              "least (and once the memory has grown by a quarter)")
    b.set_defaults(func=cmd_build)
    i = msub.add_parser("info", help="what a corpus memory (directory or Lance store) holds")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    c = msub.add_parser("convert", help="write a corpus memory directory as a Lance store (one way)")
    c.add_argument("old", help="corpus memory directory (memformer memory build --format dir)")
    c.add_argument("new", help="Lance store to create: a folder or an object-storage URI")
    c.add_argument("--block-size", type=int, default=64, help="tokens per memory block of the reading model (default 64)")
    c.set_defaults(func=cmd_convert)
    from memformer.qa.memory_cache import DEFAULT_DIR
    k = msub.add_parser("cache", help="list the memories `memformer qa` cached, or remove them")
    k.add_argument("--cache-dir", default=str(DEFAULT_DIR))
    what = k.add_mutually_exclusive_group()
    what.add_argument("--trim", default=None, metavar="SIZE",
                      help="remove the least recently used memories until the cache holds at most SIZE (e.g. 5GB)")
    what.add_argument("--clear", action="store_true", help="remove every cached memory")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_cache)


def _fail(what: str, e: BaseException) -> int:
    print(f"memformer memory {what}: {e}", file=sys.stderr)
    return 2


def cmd_build(args) -> int:
    from memformer import MemoryFileError, corpus
    from memformer.fileio import WriteError
    try:
        corpus.find_documents(args.docs)
    except (FileNotFoundError, ValueError) as e:
        return _fail("build", e)
    if args.save_every < 1 or (args.shard_tokens is not None and args.shard_tokens < 1):
        return _fail("build", ValueError(f"save_every and shard_tokens must be integers >= 1, got "
                                         f"{args.save_every}, {args.shard_tokens}"))
    if args.ray is not None and args.format == "dir":
        return _fail("build", ValueError("--ray builds a Lance store; leave out --format dir"))
    if args.format == "lance":
        from memformer import corpus_build
        # a corpus is the memory that outgrows RAM and disks: a store's rows are int8 unless asked
        # otherwise (3.67x smaller than float32; attaching reads a store of any dtype)
        args.memory_dtype = args.memory_dtype or "int8"
        if args.ray not in (None, "local"):
            try:                                      # before the model is loaded
                corpus_build.check_reachable(args.ray)
            except ConnectionError as e:
                return _fail("build", e)
    model = load_model(args)
    t0 = time.perf_counter()
    try:
        if args.format == "dir":
            docs = corpus.build_corpus(model, args.docs, args.out, save_every=args.save_every)
            print(f"{args.out}: {len(docs)} documents, {model.state.seen[0]} tokens read, {model.memory_size()} in "
                  f"memory x {len(model.memory_layer_ids)} layers ({time.perf_counter() - t0:.1f}s this run)")
            return 0
        kw = {} if args.shard_tokens is None else {"shard_tokens": args.shard_tokens}
        manifest = corpus_build.build_store(model, args.docs, args.out, ray_address=args.ray, workers=args.workers,
                                            model_factory=functools.partial(load_model, args), **kw)
    except (ValueError, MemoryFileError, WriteError, ConnectionError, ImportError) as e:
        return _fail("build", e)            # unreadable document, another model's memory, unwritable URI
    print(f"{args.out}: {manifest['documents']} documents, {manifest['tokens']} tokens, {manifest['block_rows']} "
          f"block rows x {len(model.memory_layer_ids)} layers ({time.perf_counter() - t0:.1f}s this run)")
    return 0


def cmd_info(args) -> int:
    from memformer import MemoryFileError, corpus
    try:
        info = corpus.corpus_info(args.path)
    except (FileNotFoundError, MemoryFileError, ImportError) as e:
        return _fail("info", e)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:18} {v}")
    return 0


def cmd_convert(args) -> int:
    from memformer import MemoryFileError, corpus_build
    from memformer.fileio import WriteError
    t0 = time.perf_counter()
    try:
        manifest = corpus_build.convert_directory(args.old, args.new, block_size=args.block_size)
    except (FileNotFoundError, ValueError, MemoryFileError, WriteError, ImportError) as e:
        return _fail("convert", e)
    print(f"{args.new}: {manifest['documents']} documents, {manifest['tokens']} tokens, {manifest['block_rows']} "
          f"block rows ({time.perf_counter() - t0:.1f}s)")
    return 0


def cmd_cache(args) -> int:
    """List the QA cache's memories, least recently used first; or trim / clear it."""
    from pathlib import Path
    from memformer.qa import memory_cache as mc
    folder = Path(args.cache_dir).expanduser()
    if args.trim is not None or args.clear:
        try:
            limit = 0 if args.clear else mc.parse_size(args.trim)
        except ValueError as e:
            return _fail("cache", f"--trim: {e}")
        if limit is None:
            return _fail("cache", "--trim needs a size (e.g. 5GB)")
        before = mc.entries(folder)
        removed = mc.trim(folder, limit)
        freed = sum(e.nbytes for e in before if e.path in removed)
        print(f"removed {len(removed)} of {len(before)} cached memories ({freed / 2**20:.0f} MB) from {folder}")
        return 0
    rows = [mc.describe(e) for e in mc.entries(folder)]
    if args.json:
        print(json.dumps({"cache_dir": str(folder), "entries": rows}, indent=2))
        return 0
    total = sum(r["bytes"] for r in rows)
    print(f"{folder}: {len(rows)} cached memories, {total / 2**20:.0f} MB (least recently used first)")
    for r in rows:
        docs = "?" if r["documents"] is None else ", ".join(r["documents"])
        tokens = "?" if r["tokens"] is None else f"{r['tokens']:,}"
        print(f"  {r['key']}  {r['bytes'] / 2**20:8.1f} MB  {r['last_used']}  {tokens} tokens  {docs[:80]}")
    return 0
