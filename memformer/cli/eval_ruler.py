"""`memformer eval ruler`: RULER's synthetic retrieval tasks, memory, RAG and truncation side by side."""
from __future__ import annotations

import sys

from memformer.cli.common import add_model_args, report_header, run_trials
from memformer.qa.memory_cache import DEFAULT_LIMIT as DEFAULT_CACHE_LIMIT

MODES = "memory,rag,truncate"


def register(ev) -> None:
    from memformer.eval.ruler import DEFAULT_TASKS, TASKS
    p = ev.add_parser("ruler", help="RULER's needle and variable-tracking tasks (its templates and scoring)")
    add_model_args(p)
    p.add_argument("--tasks", default="default",
                   help=f"comma-separated, from {','.join(TASKS)}; default = {','.join(DEFAULT_TASKS)}")
    p.add_argument("--lengths", default="16k,32k", help="comma-separated sample lengths in tokens, e.g. 16k,32k,64k,128k")
    p.add_argument("--samples", type=int, default=10, help="samples per task and length")
    p.add_argument("--haystack", default=None,
                   help="text file for the essay tasks (default: Python's documentation topics)")
    p.add_argument("--modes", default=MODES, help="comma-separated, from memory,truncate,rag,full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/ruler", help="folder for the tables, plot and trials.jsonl")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished samples in OUT/trials.jsonl and run only the missing ones")
    p.add_argument("--cache-dir", default=None,
                   help="keep each document's memory here and reuse it (runs that differ only in read settings); "
                        "about 9.4 KB per token with the shipped adapter, 1.2 GB per 64k document")
    p.add_argument("--cache-limit", default=f"{DEFAULT_CACHE_LIMIT // 2**30}GB",
                   help="size the cached memories may take (e.g. 20GB, none); the least recently used are removed")
    p.set_defaults(func=cmd_eval_ruler)


def cmd_eval_ruler(args) -> int:
    from memformer.eval import passkey, plots as evalplots, ruler
    prog = "memformer eval ruler"
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    tasks = list(dict.fromkeys(w for t in names for w in (ruler.DEFAULT_TASKS if t == "default" else [t])))
    bad = [t for t in tasks if t not in ruler.TASKS]
    try:
        lengths = [passkey.parse_length(s) for s in args.lengths.split(",")]
    except ValueError as e:
        bad_len = str(e)
    else:
        bad_len = None
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    from memformer.qa.memory_cache import parse_size
    try:
        parse_size(args.cache_limit)
    except ValueError as e:
        print(f"{prog}: --cache-limit: {e}", file=sys.stderr)
        return 2
    if bad or not tasks or bad_len or args.samples < 1:
        msg = (f"unknown task(s) {bad or tasks}; choose from {', '.join(ruler.TASKS)} or default" if bad or not tasks
               else bad_len or f"--samples must be >= 1, got {args.samples}")
        print(f"{prog}: {msg}", file=sys.stderr)
        return 2
    if args.haystack is not None:          # an unreadable haystack fails before the model loads
        from memformer.qa.documents import DocumentError
        try:
            ruler.essay_words(ruler.haystack_text(args.haystack)[1])
        except (DocumentError, ValueError) as e:
            print(f"{prog}: --haystack: {e}", file=sys.stderr)
            return 2
    args.trials, args.needles_per_doc = args.samples, 1        # for the report header
    ran = run_trials(prog, args, lambda model, out: ruler.evaluate(
        model, tasks, lengths, args.samples, modes=modes, seed=args.seed, haystack=args.haystack, out_dir=out,
        resume=args.resume, cache_dir=args.cache_dir, cache_limit=args.cache_limit))
    if ran is None:
        return 2
    model, out, results, seconds = ran
    hay = ruler.haystack_text(args.haystack)[0]
    what = (f"RULER's templates: the instruction line and the context form the document, the question and its "
            f"answer prefix the cue every mode completes. Haystacks: noise (niah_single_1, vt) and the essay "
            f"text {hay!r} (the other needle tasks). Score: string_match_all (the fraction of the expected "
            f"strings in the answer). Looping: answers with a unit of 1-16 characters repeated 8+ times, of 17-200 "
            f"characters 3+ times, a line 3+ times in a row, a word group of 3-16 characters 4+ times running, "
            f"or a count (6+ whole numbers in a row, each one more than the one before).")
    header = report_header("RULER", model, args, seconds, what)
    table = evalplots.accuracy_table(results, tasks=tasks) + "\n\nMean over tasks:\n\n" + ruler.mean_table(results)
    loops = ruler.looping_examples(results)
    if loops:
        table += "\n\nLooping answers (first 5):\n\n" + loops
    (out / "ruler.md").write_text(header + table + "\n")
    evalplots.plot_accuracy_vs_length(results, out / "ruler_accuracy.png", title=f"RULER ({hay} essay haystack)")
    print(header + table)
    print(f"\nwritten: {out / 'ruler.md'}, {out / 'ruler_accuracy.png'}, {out / 'trials.jsonl'}")
    return 0
