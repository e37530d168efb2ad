"""Arguments and model loading shared by the sub-commands."""
from __future__ import annotations

import argparse
import math
import sys

from memformer.config import INDEX_KINDS


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --adapter and the memory settings; a memory flag left out keeps the adapter's value
    (with --adapter) or MemoryConfig's default."""
    p.add_argument("--model", default=None, help="HF folder, .gguf file or cached hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None,
                   help="memory-layer weights saved by save_pretrained (with their memory config); default: "
                        "the trained adapter shipped for the backbone (the default backbone has one)")
    p.add_argument("--training-free", action="store_true",
                   help="no trained adapter: training-free memory, in every layer unless --memory-layers names some")
    p.add_argument("--window", type=int, default=None, help="local window W in tokens (default 1024)")
    p.add_argument("--layer-blocks", type=int, default=None,
                   help="memory blocks each chunk of queries reads by its layer's own choice when no question "
                        "is known (generate, perplexity; default 32 = 2,048 tokens; 0 = kNN reads)")
    p.add_argument("--top-k", type=int, default=None, help="memory keys retrieved per query head by kNN reads (default 32)")
    p.add_argument("--memory-layers", default=None,
                   help="layer indices, comma-separated, ranges as A..B, for training-free memory (default: "
                        "the adapter's; all layers when there is none)")
    p.add_argument("--knn-layers", default=None,
                   help="the memory layers that run kNN reads when no question is known, e.g. 10..29 "
                        "(default: the upper two thirds of an all-layer memory)")
    p.add_argument("--question-blocks", type=int, default=None,
                   help="memory blocks a question reads (those under the passages nearest to it; default 4)")
    p.add_argument("--answer-reads", type=int, default=None,
                   help="most checked reads a question answers from, each alone, the distinct answers one per "
                        "line (default 4; 1 = the best read only; MemoryConfig.answer_reads)")
    p.add_argument("--sentence-ranking", action=argparse.BooleanOptionalAction, default=None,
                   help="rank passages by their sentences too, for question reads and RAG (default on; "
                        "--no-sentence-ranking ranks by passage cosines alone; MemoryConfig.sentence_ranking)")
    p.add_argument("--copy-pointer", type=float, default=None,
                   help="while an answer is generated, point each head at the memory row after the one it read "
                        "at the previous token, with this weight (default 3; 0 = off; MemoryConfig.copy_pointer)")
    p.add_argument("--block-size", type=int, default=None, help="tokens per memory block (default 64)")
    p.add_argument("--sink-tokens", type=int, default=None, help="attention-sink tokens kept local (default 4)")
    p.add_argument("--overlap", type=int, default=None,
                   help="tokens before each window's new ones re-read as context (default 128)")
    p.add_argument("--memory-dtype", default=None, choices=["auto", "float32", "bfloat16", "float16", "int8"])
    p.add_argument("--index", default=None, choices=INDEX_KINDS, help="kNN backend over memory keys (default exact)")
    p.add_argument("--storage-dir", default=None, help="keep memory rows in memory-mapped files here (index exact)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def parse_layers(text: str | None, flag: str) -> list[int] | None:
    """"0,2,5..7" -> [0, 2, 5, 6, 7]; None or "" -> None. ValueError naming `flag` when malformed."""
    if not text:
        return None
    out: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            a, _, b = part.partition("..")
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise ValueError(f"{flag}: expected layer indices like 0,3,10..29, got {text!r}") from None
    if not out:
        raise ValueError(f"{flag}: {text!r} names no layer")
    return out


def memory_config_from_args(args, base=None):
    """`base` (default MemoryConfig()) with the memory flags that were given; ValueError if invalid."""
    import dataclasses
    from memformer import MemoryConfig
    given = dict(window=args.window, layer_blocks=args.layer_blocks, top_k=args.top_k, block_size=args.block_size,
                 question_blocks=args.question_blocks, answer_reads=args.answer_reads, sentence_ranking=args.sentence_ranking,
                 copy_pointer=args.copy_pointer, sink_tokens=args.sink_tokens, overlap=args.overlap,
                 memory_dtype=args.memory_dtype, index=args.index, storage_dir=args.storage_dir,
                 memory_layers=parse_layers(args.memory_layers, "--memory-layers"),
                 knn_layers=parse_layers(args.knn_layers, "--knn-layers"))
    base = base or MemoryConfig()
    changes = {k: v for k, v in given.items() if v is not None}
    return dataclasses.replace(base, **changes)                      # validates


def load_model(args):
    """MemformerForCausalLM from the --model/--adapter/memory arguments: the adapter given, else
    the one shipped for the backbone (none with --training-free or --memory-layers), with the
    memory flags given over its memory config."""
    import torch
    from memformer import MemformerForCausalLM
    from memformer.persistence import read_adapter_config
    if args.threads is not None and args.threads < 1:
        print(f"memformer: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        raise SystemExit(2)
    if args.adapter and args.training_free:
        print("memformer: --adapter and --training-free exclude each other", file=sys.stderr)
        raise SystemExit(2)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:    # bad memory settings (and a model type the adapters don't know): a message, not a trace
        # bad flags and a bad adapter folder fail before the backbone loads
        memory_config_from_args(args, read_adapter_config(args.adapter) if args.adapter else None)
        adapter = args.adapter or (None if args.training_free or args.memory_layers is not None else "auto")
        return MemformerForCausalLM.from_pretrained(args.model, adapter=adapter,
                                                    configure=lambda base: memory_config_from_args(args, base))
    except (ValueError, FileNotFoundError) as e:
        print(f"memformer: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# ---- evaluations (eval passkey / needle): trial arguments and report header
ALL_MODES = "memory,truncate,rag,full"


def add_trial_args(p: argparse.ArgumentParser, out: str, lengths: str, trials: int, needles: int) -> None:
    """--lengths --trials --needles-per-doc --modes --seed --out --resume --depth-bins --evidence."""
    p.add_argument("--lengths", default=lengths, help="comma-separated prompt lengths, e.g. 4k,16k,32000")
    p.add_argument("--trials", type=int, default=trials,
                   help="trials per task and length (needle depths spread evenly); with several needles per "
                        "document rounded up to whole documents")
    p.add_argument("--needles-per-doc", type=int, default=needles,
                   help=f"trials planted in one document, which is read once per mode and asked one trial at "
                        f"a time (default {needles}); 1 = a document per trial")
    p.add_argument("--modes", default=ALL_MODES, help=f"comma-separated, from {ALL_MODES}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out, help="folder for the table, plots and trials.jsonl")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished trials in OUT/trials.jsonl and run only the missing ones")
    p.add_argument("--depth-bins", type=int, default=5, help="depth rows of the heatmaps")
    p.add_argument("--evidence", action="store_true",
                   help="memory trials also record their evidence spans and whether the top one holds the needle")


def parse_trial_args(args, prog: str) -> tuple[list[int], list[str]] | None:
    """(lengths, modes), or None after printing what is wrong with the arguments."""
    from memformer.eval import passkey; from memformer.qa import longdoc as qa
    try:
        lengths = [passkey.parse_length(s) for s in args.lengths.split(",")]
    except ValueError as e:
        return _fail(prog, str(e))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in qa.MODES]
    if bad or not modes:
        return _fail(prog, f"unknown mode(s) {bad or modes}; choose from {', '.join(qa.MODES)}")
    if args.trials < 1 or args.depth_bins < 1 or args.needles_per_doc < 1:
        return _fail(prog, f"--trials, --needles-per-doc and --depth-bins must be >= 1, got {args.trials}, "
                           f"{args.needles_per_doc} and {args.depth_bins}")
    return lengths, modes


def _fail(prog: str, msg: str) -> None:
    print(f"{prog}: {msg}", file=sys.stderr)
    return None


def _reads(cfg) -> str:
    return (f"question reads ({cfg.question_blocks} memory blocks x {cfg.block_size} tokens under the passages "
            f"MiniLM finds nearest the question{' (ranked by their sentences too)' if cfg.sentence_ranking else ''}, "
            f"laid out contiguously before it; up to {cfg.answer_reads} checked read(s) answer)")


def describe_layers(model) -> str:
    """The memory layers for a report header: "all 30 (own reads in 10..29: 32 blocks per query chunk)",
    "[10, 11] (own reads in [10, 11]: kNN, top-32)"."""
    cfg = model.memory_config
    layers = f"all {len(model.memory_layer_ids)}" if cfg.memory_layers is None else str(cfg.memory_layers)
    knn = model.knn_layer_ids
    span = f"{knn[0]}..{knn[-1]}" if knn and knn == list(range(knn[0], knn[-1] + 1)) else str(knn)
    how = f"{cfg.layer_blocks} blocks per query chunk" if cfg.layer_blocks else f"kNN, top-{cfg.top_k}"
    return f"{layers} (own reads in {span}: {how})"


def trial_layout(trials: int, needles_per_doc: int) -> str:
    """How the trials sit in documents, for a report header: "8 needles per document, 2 documents
    per task and length (16 trials), ..." (trials rounded up to whole documents, as `plan_jobs` does)."""
    if needles_per_doc == 1:
        return f"one needle per document, {trials} documents per task and length ({trials} trials)"
    docs = math.ceil(trials / needles_per_doc)
    return (f"{needles_per_doc} needles per document, {docs} document{'s' if docs != 1 else ''} per task and "
            f"length ({docs * needles_per_doc} trials); each needle is asked on its own after one read of "
            "its document")


def report_header(title: str, model, args, seconds: float, what: str) -> str:
    """Markdown title, what the evaluation does, how its trials sit in documents, the settings and
    the exact command, above an evaluation's table."""
    cfg = model.memory_config
    layers = describe_layers(model)
    layout = trial_layout(args.trials, getattr(args, "needles_per_doc", 1))
    return (f"# {title}\n\n{what}\n\nTrials: {layout}.\n\nbackbone: {args.model or 'SmolLM2-135M-Instruct (default)'}, "
            f"window {cfg.window}, top-k {cfg.top_k}, {_reads(cfg)}, memory layers: {layers}, "
            f"sink tokens {cfg.sink_tokens}, overlap {cfg.overlap}; "
            f"seed {args.seed}; {seconds:.0f}s in this run{' (resumed)' if args.resume else ''}\n\n"
            f"Command: `memformer {' '.join(sys.argv[1:])}`\n\n")


def run_trials(prog: str, args, evaluate):
    """Load the model and run `evaluate(model, out_dir)`; returns (model, out_dir, results, seconds),
    or None after printing the evaluation's ValueError (bad lengths, a document too short)."""
    import time
    from pathlib import Path
    model = load_model(args)
    out = Path(args.out)
    t0 = time.perf_counter()
    try:
        results = evaluate(model, out)
    except ValueError as e:
        return _fail(prog, str(e))
    return model, out, results, time.perf_counter() - t0


def needle_tables(results) -> str:
    """The tables every multi-needle report ends with (when they have rows): evidence of memory
    trials and answers that named another needle's value."""
    from memformer.eval.needle import evidence_table, other_needle_table
    text = ""
    if evidence_table(results):
        text += "\n\nEvidence (memory trials):\n\n" + evidence_table(results)
    if other_needle_table(results):
        text += "\n\nWrong needle (multi-needle documents):\n\n" + other_needle_table(results)
    return text


def per_doc(args) -> str:
    """A plot title's note of how many needles shared a document."""
    return f" ({args.needles_per_doc} needles per document)" if args.needles_per_doc > 1 else ""
