"""`memformer qa`: answer questions about long documents from memory, with evidence (baselines with --compare)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from memformer.cli.common import add_model_args, load_model as _load_model
from memformer.qa.memory_cache import DEFAULT_DIR as DEFAULT_CACHE_DIR, DEFAULT_LIMIT as DEFAULT_CACHE_LIMIT


def register(sub) -> None:
    p = sub.add_parser("qa", help="answer questions about long documents from memory",
                       description="Memorize documents once (cached on disk), answer questions from memory, "
                                   "show the passages memory attended to; --compare also answers with truncation and RAG.")
    add_model_args(p)
    src = p.add_argument_group("documents")
    src.add_argument("--doc", action="append", default=[], help="document file (repeatable)")
    src.add_argument("--memory", default=None, help="a memory saved with --save-memory (instead of --doc)")
    src.add_argument("--corpus", default=None,
                     help="a corpus memory built by `memformer memory build`, attached read-only: memory answers "
                          "also search it (alone: questions are answered from the corpus only, mode memory)")
    src.add_argument("--save-memory", default=None, help="also save the memory and its documents here")
    src.add_argument("--demo", action="store_true", help="Python's docs with planted facts")
    src.add_argument("--demo-tokens", type=int, default=16384)
    src.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    src.add_argument("--no-cache", action="store_true")
    src.add_argument("--cache-limit", default=f"{DEFAULT_CACHE_LIMIT // 2**30}GB",
                     help="size the cached memories may take (e.g. 20GB, 500MB, none); the least recently "
                          "used ones are removed past it")
    p.add_argument("--question", "-q", action="append", default=[], help="question (repeatable)")
    p.add_argument("--questions", default=None,
                   help='JSONL file, one {"question": ..., "answer": optional expected, "cue": optional} per line; '
                        "with no questions at all and a terminal on stdin, questions are read interactively")
    p.add_argument("--compare", action="store_true",
                   help="also answer with the baselines: the truncated document (last window only) and RAG "
                        "(retrieved passages in the same token budget), memory off")
    p.add_argument("--full", action="store_true",
                   help="also answer with the whole document in context (when it fits the native context)")
    p.add_argument("--embedder", default=None,
                   help="sentence-transformers model folder for question reads and RAG (default all-MiniLM-L6-v2)")
    p.add_argument("--rag-chunk-tokens", type=int, default=128)
    p.add_argument("--evidence", type=int, default=3, help="evidence spans shown per answer (0 = none)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_qa)


def _fail(msg: str) -> int:
    print(f"memformer qa: {msg}", file=sys.stderr)
    return 2


def _check_args(args) -> str | None:
    sources = sum([bool(args.doc), args.memory is not None, args.demo])
    if sources == 0 and args.corpus is None:
        return "give --doc FILE, --memory DIR, --corpus MEM or --demo"
    if sources == 0 and (args.compare or args.full):
        return "--compare and --full need documents (--doc, --memory or --demo); a corpus memory alone answers from memory"
    if sources == 0 and args.save_memory:
        return "--save-memory needs documents (--doc or --demo); a corpus memory is saved already"
    if sources > 1:
        return "give only one of --doc, --memory and --demo"
    if args.evidence < 0 or args.max_new_tokens < 1 or args.demo_tokens < 1 or args.rag_chunk_tokens < 1:
        return "--evidence must be >= 0; --max-new-tokens, --demo-tokens and --rag-chunk-tokens >= 1"
    from memformer.qa.memory_cache import parse_size
    try:
        parse_size(args.cache_limit)
    except ValueError as e:
        return f"--cache-limit: {e}"
    return None


def read_questions(path) -> list[tuple[str, str | None, str | None]]:
    """(question, cue, expected answer) from a JSONL file; ValueError naming the bad line."""
    from memformer.fileio import jsonl_objects
    out = []
    try:
        for n, row in jsonl_objects(path):
            if not isinstance(row.get("question"), str) or not row["question"].strip():
                raise ValueError(f'{path}:{n}: each line needs a non-empty "question" string')
            cue, expected = row.get("cue"), row.get("answer")
            out.append((row["question"], None if cue is None else str(cue), None if expected is None else str(expected)))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read questions from {path}: {e}") from None
    if not out:
        raise ValueError(f"{path}: no questions")
    return out


def interactive(qa, modes, args, read=None) -> int:
    """Ask questions one by one against the memory built once; an empty line or EOF ends."""
    read = read or input
    asked = 0
    while True:
        try:
            question = read("question> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not question or question in ("exit", "quit"):
            break
        row = _answer_row(qa, question, None, None, modes, args)
        if args.json:
            print(json.dumps(row))
        else:
            _print_row(row, modes)
        asked += 1
    return asked


def _modes(args) -> list[str]:
    return ["memory"] + (["truncate", "rag"] if args.compare else []) + (["full"] if args.full else [])


def cmd_qa(args) -> int:
    from memformer.qa import demo, longdoc as qa_mod
    from memformer.qa.documents import read_document
    error = _check_args(args)
    if error is not None:
        return _fail(error)
    modes = _modes(args)
    questions = [(q, None, None) for q in args.question]
    if args.questions:
        try:
            questions += read_questions(args.questions)
        except ValueError as e:
            return _fail(str(e))
    given = None
    if args.doc and args.memory is None and not args.demo:
        try:                               # bad documents are refused before the model loads
            given = [qa_mod.Document(d, read_document(d)) for d in args.doc]
        except (ValueError, FileNotFoundError) as e:
            return _fail(str(e))
    model = _load_model(args)
    if args.embedder:
        from memformer.passages import load_embedder
        model.questions.use_embedder(load_embedder(args.embedder))
    if args.corpus is not None:
        try:
            docs = model.attach_corpus(args.corpus)
        except (ValueError, FileNotFoundError) as e:       # not a corpus memory, another model's, corrupt
            return _fail(str(e))
        print(f"corpus: {len(docs)} document(s), {docs[-1].end if docs else 0} tokens, attached read-only "
              f"from {args.corpus}")
        if not (args.doc or args.memory or args.demo):
            from memformer.qa.corpus_qa import CorpusQA
            return _answer_all(CorpusQA(model), questions, ["memory"], args)
    opts = dict(rag_chunk_tokens=args.rag_chunk_tokens, rag_overlap=min(32, args.rag_chunk_tokens // 4))
    t0 = time.perf_counter()
    try:
        if args.memory is not None:
            qa = qa_mod.LongDocQA.load(model, args.memory, **opts)
        else:
            if args.demo:
                docs = [qa_mod.Document("python-docs (demo)", demo.demo_document(model.tokenizer, args.demo_tokens))]
                questions = [(f.question, f.cue, f.answer) for f in demo.DEMO_FACTS]
                print(f"demo document: Python's documentation topics, {args.demo_tokens} tokens, "
                      f"{len(demo.DEMO_FACTS)} facts planted at depths {[f.depth for f in demo.DEMO_FACTS]}; "
                      f"each question is asked as a sentence to complete")
            else:
                docs = given
            # the demo document is rebuilt in seconds; caching its memory would only fill the disk
            cache = None if (args.no_cache or args.demo) else args.cache_dir
            qa = qa_mod.LongDocQA(model, **opts).read(docs, cache_dir=cache, cache_limit=args.cache_limit)
        if args.save_memory:
            qa.save(args.save_memory)
    except (ValueError, FileNotFoundError) as e:   # bad/missing documents, a memory of another model, ...
        return _fail(str(e))
    print(f"memory: {model.memory_size()} tokens x {len(model.memory_layer_ids)} layers "
          f"({'loaded from cache' if qa.from_cache else 'built'} in {time.perf_counter() - t0:.1f}s) from "
          f"{len(qa.corpus.documents)} document(s); local window: the question"
          + (f"; modes: {', '.join(modes)}" if questions else ""))
    return _answer_all(qa, questions, modes, args)


def _answer_all(qa, questions, modes, args) -> int:
    """Answer `questions` in `modes` and print them (interactively when there are none and stdin
    is a terminal). qa: a LongDocQA, or a CorpusQA (corpus memory alone, mode memory)."""
    if not questions and sys.stdin.isatty():
        interactive(qa, modes, args)
        return 0
    rows = [_answer_row(qa, q, cue, expected, modes, args) for q, cue, expected in questions]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            _print_row(row, modes)
    return 0


def _answer_row(qa, question, cue, expected, modes, args) -> dict:
    from memformer.qa.longdoc import DoesNotFit
    answers, unfit = {}, {}
    for m in modes:
        try:
            answers[m] = qa.answer(question, cue=cue, mode=m, max_new_tokens=args.max_new_tokens, evidence=args.evidence)
        except DoesNotFit as e:                            # "full" beyond the native context
            unfit[m] = str(e)
    row = {"question": question}
    if cue:
        row["asked_as"] = cue
    if expected is not None:
        row["expected"] = expected
    row.update({m: a.text for m, a in answers.items()})
    row.update({m: None for m in unfit})
    if unfit:
        row["not_run"] = unfit
    if expected is not None:
        row["correct"] = {m: expected in a.text for m, a in answers.items()}
    row["evidence"] = {m: [s.to_dict() for s in a.evidence] for m, a in answers.items() if a.evidence}
    if answers["memory"].corpus_evidence:
        row["corpus_evidence"] = answers["memory"].corpus_evidence
    row["memory_share"] = answers["memory"].memory_share
    row["seconds"] = {m: round(a.seconds, 2) for m, a in answers.items()}
    return row


def _print_row(row: dict, modes) -> None:
    print(f"\nQ: {row['question']}" + (f"\n   asked as:  {row['asked_as']} ..." if "asked_as" in row else ""))
    if "expected" in row:
        print(f"   expected:  {row['expected']}")
    for mode in modes:
        if row[mode] is None:
            print(f"   {mode + ':':10} n/a: {row['not_run'][mode]}")
            continue
        a = " ".join(row[mode].split())
        mark = f"   [{'ok' if row['correct'][mode] else 'miss'}]" if "correct" in row else ""
        print(f"   {mode + ':':10} {a[:160]}{mark}")
    for mode, spans in row["evidence"].items():
        what = "passages memory attended to" if mode == "memory" else "passages retrieved"
        print(f"   evidence ({mode}, {what}):")
        for s in spans:
            text = " ".join(s["text"].split())
            score = f"{s['score']:.0%}" if mode == "memory" else f"cos {s['score']:.2f}"
            print(f"     {s['document']} chars {s['start']}-{s['end']} ({score}): {text[:150]}")
    if row.get("corpus_evidence"):
        print("   evidence (memory, corpus documents attended to):")
        for e in row["corpus_evidence"]:
            print(f"     {e['doc']} ({e['share']:.0%} of the corpus attention, peak at token {e['position']}): "
                  f"{e['snippet'][:150]}")
