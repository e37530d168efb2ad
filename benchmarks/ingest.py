"""Ingest speed: `memorize` versus a plain windowed forward of the same frozen backbone.

Both read the same document (Python's documentation) in the same windows of W tokens; the
baseline is the untouched Hugging Face backbone (no memory layers, no adapters), run side by
side with memformer in one process, alternating, several repeats. Also reports bytes of memory
per token for each memory dtype.

    .venv/bin/python benchmarks/ingest.py --tokens 8192 --window 1024 --repeats 3

Results: benchmarks/results/ingest.md and ingest.csv.
"""
from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from pathlib import Path

import torch

from memformer import MemformerForCausalLM, MemoryConfig
from memformer.loading import load_backbone
from memformer.qa.demo import python_docs_text


@torch.no_grad()
def plain_forward(backbone, windows) -> None:
    """The frozen backbone's decoder over each window (no logits, as memorize)."""
    decoder = backbone.get_decoder()
    for x in windows:
        decoder(input_ids=x, attention_mask=torch.ones_like(x),
                position_ids=torch.arange(x.shape[1])[None], use_cache=False)


def memory_bytes_per_token(model) -> float:
    total = 0
    for mem in model.memories.values():
        for t in mem.state_dict().values():
            total += t.numel() * t.element_size()
    return total / max(1, model.memory_size())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    baseline, tok = load_backbone()
    model = MemformerForCausalLM.from_pretrained(None, MemoryConfig(window=args.window))
    ids = torch.tensor([tok(python_docs_text(), add_special_tokens=False)["input_ids"][:args.tokens]])
    n = ids.shape[1]

    # the exact windows memorize reads ([sink | overlap context | new tokens]) ...
    S = model.memory_config.sink_tokens
    same = [x for x, *_ in model.plan_windows(ids, [n], S, ids[:, :S], None)]
    # ... and plain non-overlapping windows of W tokens (what a reader with no memory would do)
    disjoint = [ids[:, a:a + args.window] for a in range(0, n, args.window)]
    plain_forward(baseline, disjoint[:1])                                 # warm-up, not timed
    model.reset_memory(), model.memorize(ids[:, :args.window], show_progress=False)
    t_same, t_disjoint, t_mem = [], [], []
    for _ in range(args.repeats):                                      # alternate so drift hits all
        for runs, fn in ((t_same, lambda: plain_forward(baseline, same)),
                         (t_disjoint, lambda: plain_forward(baseline, disjoint)),
                         (t_mem, lambda: (model.reset_memory(), model.memorize(ids, show_progress=False)))):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
    bpt = {"float32": memory_bytes_per_token(model)}
    half = MemformerForCausalLM.from_pretrained(None, MemoryConfig(window=args.window, memory_dtype="bfloat16"))
    half.memorize(ids[:, :args.window], show_progress=False)
    bpt["bfloat16"] = memory_bytes_per_token(half)
    del half
    same_s, disjoint_s, mem = (statistics.median(t) for t in (t_same, t_disjoint, t_mem))
    L = len(model.memories)
    cfg = model.memory_config
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = platform.processor() or platform.machine()
    row = {"tokens": n, "window": args.window, "sink_tokens": S, "overlap": cfg.overlap,
           "threads": torch.get_num_threads(), "windows_memorize": len(same), "windows_disjoint": len(disjoint),
           "plain_same_windows_s": round(same_s, 3), "plain_disjoint_windows_s": round(disjoint_s, 3),
           "memorize_s": round(mem, 3), "memorize_tok_s": round(n / mem, 1),
           "ratio_vs_same_windows": round(mem / same_s, 3), "ratio_vs_disjoint_windows": round(mem / disjoint_s, 3),
           "bytes_per_token_fp32": int(bpt["float32"]), "bytes_per_token_bf16": int(bpt["bfloat16"])}
    with open(out / "ingest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        w.writeheader()
        w.writerow(row)
    md = (f"# Ingest: memorize vs plain windowed forward\n\n"
          f"SmolLM2-135M-Instruct (fp32), memory in all {L} layers, {n} tokens of Python's docs, window "
          f"{args.window} (sink {S}, overlap {cfg.overlap}), {args.repeats} alternating repeats (median), "
          f"CPU {cpu}, {row['threads']} torch threads, torch {torch.__version__}.\n\n"
          f"| path | windows | seconds | tokens/s |\n|---|---|---|---|\n"
          f"| plain forward, untouched HF backbone, the same windows memorize reads | {len(same)} | {same_s:.2f} | {n / same_s:.0f} |\n"
          f"| plain forward, untouched HF backbone, disjoint windows of {args.window} | {len(disjoint)} | {disjoint_s:.2f} | {n / disjoint_s:.0f} |\n"
          f"| `memorize` (memory layers + LoRA, writes every window) | {len(same)} | {mem:.2f} | {n / mem:.0f} |\n\n"
          f"**Overhead of memory: {mem / same_s:.2f}x** the plain forward over the same windows; "
          f"{mem / disjoint_s:.2f}x plain disjoint windows (this includes re-reading {cfg.overlap} overlap "
          f"tokens + {S} sink tokens per window). All repeats (s): same {[round(t, 2) for t in t_same]}, "
          f"disjoint {[round(t, 2) for t in t_disjoint]}, memorize {[round(t, 2) for t in t_mem]}.\n\n"
          f"Memory per token (keys + values of all layers and kv heads, valid flags, positions): "
          f"{bpt['float32']:.0f} B in float32, {bpt['bfloat16']:.0f} B in bfloat16 (both measured from the stored tensors).\n\n"
          f"Command: `.venv/bin/python benchmarks/ingest.py --tokens {args.tokens} --window {args.window} "
          f"--repeats {args.repeats}`\n")
    (out / "ingest.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
