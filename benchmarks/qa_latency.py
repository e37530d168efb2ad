"""How long one answer takes once the document is read, per read path and baseline, side by side.

One needle document (`memformer.eval.needle`, `--needle`: single-number by default; multivalue
asks for one key's 4 values, which `ask` answers from several reads) of `--tokens` tokens is read
once per case; then the same cue is answered `--repeats` times and the median time kept:

* memory (question reads): `memformer qa`'s memory mode, i.e. `model.ask` — the whole document
  memorized, only the cue in the window, every memory layer reading the question's blocks;
* generate: the continuation read — all but the last window memorized, then `model.generate`
  over [last window ‖ cue]; the prompt's last `--prompt-reads` chunks of queries (default
  generate's "auto": `PROMPT_READS` with a trained adapter, every chunk training-free) and the new
  tokens read the blocks their layer chooses (`MemoryConfig.layer_blocks`);
* generate, every chunk: the same with every chunk of the prompt reading (`prompt_reads=None`);
* generate (kNN reads): the same with `layer_blocks=0`, each query reading its top-k keys;
* generate, last window read once: the default read, with the last window's reads done once at
  reading time (`model.context_cache`), so an answer runs the cue and its new tokens only;
* generate over the same prompt with memory off: the same tokens without any memory read, the
  floor of the rows above (what their reads add is the difference; the search column says how
  much of that is the search: the index's top-k, or the layers' block choice);
* truncate (the tail) and rag (retrieved passages), memory off, the same token budget.

Reading time (memorize, passage embeddings) is reported apart.

    .venv/bin/python benchmarks/qa_latency.py --tokens 16k,64k --repeats 3 --threads 1
    .venv/bin/python benchmarks/qa_latency.py --tokens 16k --adapter none --name qa_latency_training_free
    .venv/bin/python benchmarks/qa_latency.py --tokens 16k,64k --cases memory,rag --needle multivalue --name qa_latency_multivalue

By default the model is what `from_pretrained()` gives: the default backbone with its shipped trained
sparse memory. `--adapter DIR` loads other trained weights with the memory config they were trained
for; `--adapter none` measures training-free all-layer memory.
Results: benchmarks/results/<name>.md and <name>.json (name qa_latency by default).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from memformer import MemformerForCausalLM
from memformer.eval.needle import VARIANTS, make_sample, score_query
from memformer.eval.passkey import parse_length
from memformer.memory_layer import memory_pass
from memformer.model import PROMPT_READS
from memformer.qa import longdoc as qa

CASES = ("memory", "generate", "generate-every", "generate-knn", "generate-off", "generate-cached", "truncate", "rag")
LABELS = {"memory": "memory (question reads, `model.ask`)",
          "generate": "generate (block reads chosen by the layers in the prompt's last chunks, `prompt_reads`, the default)",
          "generate-every": "generate (block reads in every chunk of the prompt, `prompt_reads=None`)",
          "generate-knn": "generate (kNN reads, `layer_blocks=0`)",
          "generate-off": "generate over the same prompt, memory off (no read: the floor of the rows above)",
          "generate-cached": "generate (block reads), last window read once (`context_cache`)",
          "truncate": "truncate", "rag": "rag"}


class SearchClock:
    """Seconds spent in memory search while it is installed: `LayerMemory.search` (the index's
    top-k over the stored keys, kNN reads) and `memformer.blocks.chosen_blocks` (each layer's
    block choice, block reads); `take()` returns and resets them."""

    def __init__(self):
        from memformer import blocks
        from memformer.index.store import LayerMemory
        self.seconds = 0.0

        def timed(fn):
            def run(*args, **kw):
                t0 = time.perf_counter()
                out = fn(*args, **kw)
                self.seconds += time.perf_counter() - t0
                return out
            return run
        LayerMemory.search = timed(LayerMemory.search)
        blocks.chosen_blocks = timed(blocks.chosen_blocks)

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s


def continuation(model, text: str, cue: str, max_new_tokens: int, repeats: int, cached: bool = False,
                 clock: SearchClock | None = None, memory_off: bool = False, knn: bool = False,
                 prompt_reads: int | str | None = "auto"):
    """The continuation read: everything before the last window memorized, then generate over
    [last window ‖ cue]. cached: the last window (less the cue) is read once with the document
    (`context_cache`), so an answer runs only the cue and its new tokens; same tokens, same output.
    memory_off: the same prompt and memory with every memory layer off (`model.memory_disabled()`):
    what the answer costs without any memory read. knn: kNN reads (`layer_blocks=0`) instead of
    the layers' block reads. prompt_reads: `generate`'s argument (the prompt's chunks that read). Returns (read s, answer times, text, prompt
    tokens run, median search s per answer)."""
    ids = model.tokenizer(text + "\n\n" + cue, add_special_tokens=False)["input_ids"]
    local = model.local_window
    t0 = time.perf_counter()
    model.reset_memory()
    model.memorize(torch.tensor([ids[:-local]]), show_progress=False)
    x = torch.tensor([ids[-local:]])
    cue_n = len(model.tokenizer(cue, add_special_tokens=False)["input_ids"])
    kw = dict(cache=model.context_cache(x[:, :-cue_n])) if cached else {}
    read_s = time.perf_counter() - t0
    times, searches, text_out = [], [], ""
    for _ in range(repeats):
        off = (model.memory_disabled() if memory_off else
               memory_pass(model.runtime, model.memory_modules, layer_blocks=0) if knn else contextlib.nullcontext())
        if clock:
            clock.take()                                          # drop what reading the document searched
        t0 = time.perf_counter()
        with off:
            out = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False, prompt_reads=prompt_reads, **kw)
        times.append(time.perf_counter() - t0)
        searches.append(clock.take() if clock else 0.0)
        text_out = model.tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True).strip()
    prompt = cue_n if cached else x.shape[1]                      # prompt tokens an answer runs
    return read_s, times, text_out, prompt, statistics.median(searches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="16k", help="comma-separated document lengths, e.g. 16k,64k")
    ap.add_argument("--adapter", default="auto",
                    help="trained memory-layer weights (save_pretrained folder); default: the shipped adapter")
    ap.add_argument("--name", default="qa_latency", help="result file stem under --out")
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated cases to run (default all: {','.join(CASES)}); RAG is the ratio's base")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--needle", default="single-number", choices=VARIANTS,
                    help="the needle variant asked (memformer.eval.needle); its first query is timed")
    ap.add_argument("--prompt-reads", type=int, default=None,
                    help="chunks of the prompt that read, case generate (default: generate's 'auto')")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    cases = [c for c in CASES if c in args.cases.split(",")]
    if "rag" not in cases or set(args.cases.split(",")) - set(CASES):
        ap.error(f"--cases: choose among {','.join(CASES)}, rag included (the ratio's base)")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = MemformerForCausalLM.from_pretrained(adapter=None if args.adapter == "none" else args.adapter)
    rows, lengths, clock = [], [], SearchClock()
    for length in args.tokens.split(","):
        sample = make_sample(model.tokenizer, args.needle, parse_length(length), 0.5, random.Random(args.seed))
        query = sample.queries[0]
        lengths.append(sample.tokens)
        for case in cases:
            n_reads = None
            if case.startswith("generate"):
                read_s, times, text, prompt, search_s = continuation(
                    model, sample.text, query.cue, sample.max_new_tokens, args.repeats,
                    cached=case == "generate-cached", clock=clock, memory_off=case == "generate-off",
                    knn=case == "generate-knn",
                    prompt_reads=None if case == "generate-every" else args.prompt_reads or "auto")
            else:
                t0 = time.perf_counter()
                ctx = qa.prepare(model, [sample.text], case, show_progress=False)
                read_s = time.perf_counter() - t0
                times, searches, ans = [], [], None
                for _ in range(args.repeats):
                    clock.take()
                    ans = ctx.answer(cue=query.cue, max_new_tokens=sample.max_new_tokens, evidence=0)
                    times.append(ans.seconds)
                    searches.append(clock.take())
                text, prompt, search_s = ans.text, ans.prompt_tokens, statistics.median(searches)
                n_reads = ans.reads if case == "memory" else None
            reads = args.prompt_reads or (PROMPT_READS if model.memory_trained else "every chunk")
            label = LABELS[case].replace("`prompt_reads`", f"`prompt_reads={reads}`")
            rows.append(dict(tokens=sample.tokens, mode=label, read_s=round(read_s, 2),
                             answer_s=round(statistics.median(times), 3), times=[round(t, 3) for t in times],
                             search_s=round(search_s, 3),
                             prompt_tokens=prompt, reads=n_reads, score=score_query(text, query),
                             correct=score_query(text, query) == 1.0, answer=text[:40]))
            print(rows[-1], flush=True)
            model.reset_memory()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.memory_config
    meta = dict(tokens=lengths, needle=args.needle, repeats=args.repeats, threads=torch.get_num_threads(), adapter=args.adapter,
                memory_layers=list(model.memory_layer_ids), knn_layers=[i for i, m in model.memory_modules.items() if m.knn],
                window=cfg.window, layer_blocks=cfg.layer_blocks, cpu=platform.processor() or platform.machine(),
                torch=torch.__version__)
    (out / f"{args.name}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    cmd = " ".join(["benchmarks/qa_latency.py", *sys.argv[1:]])
    lines = [f"# Answer time per QA mode ({args.needle} needle at depth 0.5)", "",
             f"Command: `.venv/bin/python {cmd}`; {meta['threads']} torch thread(s), {meta['cpu']}, torch "
             f"{meta['torch']}; {'training-free all-layer memory' if args.adapter == 'none' else 'shipped trained adapter' if args.adapter == 'auto' else 'adapter ' + args.adapter} "
             f"(memory layers {_span(meta['memory_layers'])}, own reads with no question in {_span(meta['knn_layers'])}: "
             f"{cfg.layer_blocks} blocks chosen per chunk of queries, window "
             f"{cfg.window}); median of {args.repeats} answers (greedy, {sample.max_new_tokens} new tokens at most), "
             f"after the document was read once. Ratio: answer time / RAG's at the same length.", "",
             "Search: seconds of the answer spent in memory search, all layers: the index's top-k "
             "(`LayerMemory.search`, kNN reads) or the layers' block choice (`chosen_blocks`, block reads).", "",
             "Reads: the checked reads `ask` answered from (`MemoryConfig.answer_reads`). Score: the "
             "needle suite's (the fraction of the values asked for that the answer gives).", "",
             "| tokens | mode | prompt tokens run | answer (s) | of which search (s) | vs RAG | read once (s) | reads | score |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    rag = {r["tokens"]: r["answer_s"] for r in rows if r["mode"] == LABELS["rag"]}
    lines += [f"| {r['tokens']:,} | {r['mode']} | {r['prompt_tokens']} | {r['answer_s']:.2f} | {r['search_s']:.2f} | "
              f"{r['answer_s'] / rag[r['tokens']]:.2f}x | {r['read_s']:.1f} | {r['reads'] or '-'} | {r['score']:g} |"
              for r in rows]
    # notes written by hand below the marker survive a re-run
    md = out / f"{args.name}.md"
    notes = md.read_text().split(NOTES, 1)[1] if md.exists() and NOTES in md.read_text() else "\n"
    md.write_text("\n".join(lines) + "\n\n" + NOTES + notes)
    print("\n".join(lines))


NOTES = "<!-- notes: kept when the benchmark rewrites the table above -->"


def _span(layers: list[int]) -> str:
    return f"{layers[0]}..{layers[-1]}" if layers and layers == list(range(layers[0], layers[-1] + 1)) else str(layers)


if __name__ == "__main__":
    main()
