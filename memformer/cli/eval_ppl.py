"""`memformer eval ppl`: perplexity of long real documents by position, with and without memory."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from memformer.cli.common import add_model_args, describe_layers, load_model as _load_model


def register(ev) -> None:
    from memformer.eval.ppl import DOCUMENTS, MODES
    p = ev.add_parser("ppl", help="perplexity by position in long documents, memory vs truncation")
    add_model_args(p)
    p.add_argument("--docs", default=",".join(DOCUMENTS), help=f"comma-separated, from {','.join(DOCUMENTS)} or document files")
    p.add_argument("--tokens", default="16k", help="tokens read from each document segment, e.g. 16k")
    p.add_argument("--segments", type=int, default=1, help="segments per document, spread evenly through it")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {','.join(MODES)}")
    p.add_argument("--bin", type=int, default=1024, help="tokens per position bin of the table and plot")
    p.add_argument("--out", default="runs/ppl")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished segments in OUT/trials.jsonl and run only the missing ones")
    p.set_defaults(func=cmd_eval_ppl)


def cmd_eval_ppl(args) -> int:
    from memformer.eval import passkey, ppl
    prog = "memformer eval ppl"
    docs = [d.strip() for d in args.docs.split(",") if d.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    try:
        tokens = passkey.parse_length(args.tokens)
        bad = ppl.check_documents(docs) + [m for m in modes if m not in ppl.MODES]
        if bad or not docs or not modes:
            raise ValueError(f"unknown document(s)/mode(s) {bad or docs + modes}; documents: "
                             f"{', '.join(ppl.DOCUMENTS)} or a file; modes: {', '.join(ppl.MODES)}")
        if args.bin < 1 or args.segments < 1:
            raise ValueError(f"--bin and --segments must be >= 1, got {args.bin} and {args.segments}")
    except ValueError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    model = _load_model(args)
    out = Path(args.out)
    t0 = time.perf_counter()
    try:
        results = ppl.evaluate(model, docs, tokens, args.segments, modes, out_dir=out,
                               resume=args.resume)
    except ValueError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    cfg = model.memory_config
    header = (f"# Perplexity by position\n\nEach document segment ({tokens} tokens) is read in the model's ingest "
              f"windows; memory: each window reads the memory of all earlier ones, then is written; truncate: "
              f"the same windows, the frozen backbone alone (no memory, no LoRA). "
              f"Perplexity per {args.bin}-token bin of position.\n\n"
              f"backbone: {args.model or 'SmolLM2-135M-Instruct (default)'}, window {cfg.window}, "
              f"memory layers: {describe_layers(model)}, sink tokens {cfg.sink_tokens}, "
              f"overlap {cfg.overlap}; {args.segments} segment(s) per document; {time.perf_counter() - t0:.0f}s "
              f"in this run{' (resumed)' if args.resume else ''}\n\nCommand: `memformer {' '.join(sys.argv[1:])}`\n\n")
    md, png = ppl.write_report(results, out, args.bin, cfg.window, header)
    print(md.read_text())
    print(f"written: {md}, {png}, {out / 'trials.jsonl'}")
    return 0
