"""What the prompt's early reads buy a continuation: the loss of the tokens after a prompt when
only the prompt's last chunks read memory (`generate(prompt_reads=N)`), against every chunk
reading and memory off.

Each of `--segments` pieces of `--tokens` tokens of a document is read as `generate` reads a
fresh prompt: all but the last window memorized, then one forward over [sink ‖ last window]. The
window's last `--continuation` tokens stand for what would be generated; they read memory in
every setting. Their mean negative log-likelihood is recorded per setting:

* all: every chunk of the prompt reads (as `forward` reads; `prompt_reads=None`);
* N (a number): only the prompt's last N chunks of `block_size` queries read;
* off: no memory read anywhere.

With `--copy`, the window ends with a passage of the memorized part instead (from the middle of
it): `--cue` of its tokens close the prompt and the continuation is the passage's next tokens, so
the continuation needs memory (the text it continues is only there).

For the development split (Python's documentation topics, the default `--document`) to choose N;
report on held-out text (`--document stdlib-heldout` or a file):

    .venv/bin/python benchmarks/prompt_reads.py --tokens 16k --segments 4 --settings all,8,4,2,1,off \
        --threads 2 --out benchmarks/results/prompt_reads_dev

Writes trials.jsonl (one line per segment and setting; resumable) and prompt_reads.md.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@torch.no_grad()
def continuation_nll(model, ids: list[int], settings: list[str], continuation: int,
                     copy_cue: int | None = None) -> dict[str, float]:
    """Mean NLL of the last `continuation` tokens of `ids` per setting (see the module docstring);
    copy_cue: the window ends with `copy_cue` + `continuation` tokens from the middle of the
    memorized part instead."""
    from memformer.blocks import prompt_read_start
    from memformer.memory_layer import memory_pass
    local = model.local_window
    model.reset_memory()
    model.memorize(torch.tensor([ids[:-local]]), show_progress=False)
    window = ids[-local:]
    if copy_cue is not None:
        n = copy_cue + continuation
        a = (len(ids) - local) // 2
        window = window[:-n] + ids[a:a + n]
    x = model.state.with_sink(torch.tensor([window]), model.memory_config.sink_tokens)   # [1, S + local]
    P = x.shape[1] - continuation                       # prompt positions, sink included
    targets = x[0, P:]                                   # [continuation]
    out = {}
    for s in settings:
        if s == "off":
            ctx = model.memory_disabled()
        else:
            r = prompt_read_start(P, model.memory_config.block_size, None if s == "all" else int(s))
            ctx = memory_pass(model.runtime, model.memory_modules, read_from=r)
        with ctx:
            logits = model(x).logits[0, P - 1:-1].float()                      # [continuation, V]
        out[s] = float(torch.nn.functional.cross_entropy(logits, targets))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--document", default="pydocs", help="a `memformer eval ppl` document name or a file")
    ap.add_argument("--tokens", default="16k")
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--settings", default="all,8,4,2,1,off")
    ap.add_argument("--continuation", type=int, default=64)
    ap.add_argument("--copy", action="store_true", help="continue a passage of the memorized part")
    ap.add_argument("--cue", type=int, default=16, help="with --copy: the passage's tokens that close the prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    settings = args.settings.split(",")
    bad = [s for s in settings if s not in ("all", "off") and not (s.isdigit() and int(s) >= 1)]
    if bad:
        ap.error(f"--settings: 'all', 'off' or chunk counts >= 1, got {bad}")

    from tqdm.auto import tqdm
    from memformer import MemformerForCausalLM
    from memformer.eval.passkey import parse_length
    from memformer.eval.ppl import segment_ids

    torch.set_num_threads(args.threads)
    model = MemformerForCausalLM.from_pretrained()
    tokens = parse_length(args.tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "trials.jsonl"
    kind = lambda r: (r["document"], r["tokens"], r.get("copy_cue"))                  # one table row group
    done = {(*kind(r), r["segment"]) for r in map(json.loads, log.read_text().splitlines())} if log.exists() else set()
    with open(log, "a") as f:
        for seg in tqdm(range(args.segments), desc="segments", unit="segment"):
            if (args.document, tokens, args.cue if args.copy else None, seg) in done:
                continue
            t0 = time.perf_counter()
            try:
                ids = segment_ids(model.tokenizer, args.document, tokens, seg, args.segments)
            except ValueError as e:                         # the document's end holds too few tokens
                tqdm.write(f"skipped: {e}")
                continue
            nll = continuation_nll(model, ids, settings, args.continuation, args.cue if args.copy else None)
            rec = dict(document=args.document, tokens=tokens, segment=seg, continuation=args.continuation,
                       copy_cue=args.cue if args.copy else None,
                       block_size=model.memory_config.block_size, nll=nll, seconds=round(time.perf_counter() - t0, 1))
            f.write(json.dumps(rec) + "\n")
            f.flush()
    records = [r for r in map(json.loads, log.read_text().splitlines())]
    rows = ["| document | tokens | continuation | segments | setting | mean NLL | perplexity | vs all |",
            "|---|---:|---|---:|---|---:|---:|---:|"]
    for key in sorted({kind(r) for r in records}, key=str):
        doc, n, cue = key
        group = [r for r in records if kind(r) == key]
        what = "the document's own" if cue is None else f"a memorized passage after {cue} of its tokens"
        names = [s for s in group[0]["nll"]]
        for s in names:
            vals = [r["nll"][s] for r in group if s in r["nll"]]
            base = [r["nll"]["all"] for r in group if "all" in r["nll"]]
            mean = sum(vals) / len(vals)
            diff = f"{mean - sum(base) / len(base):+.4f}" if base else ""
            rows.append(f"| {doc} | {n:,} | {what} | {len(vals)} | {s} | {mean:.4f} | {math.exp(mean):.3f} | {diff} |")
    cmd = " ".join(["benchmarks/prompt_reads.py", *sys.argv[1:]])
    (out / "prompt_reads.md").write_text(
        "# Loss of a continuation when only the prompt's last chunks read memory\n\n"
        f"Command: `.venv/bin/python {cmd}`. Setting: the prompt's chunks that read (all, N last, or "
        "off: memory off); the loss is over the window's last tokens, which read in every setting.\n\n"
        + "\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
