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
from memformer.qa import python_docs_text


@torch.no_grad()
def plain_windowed_forward(backbone, ids: torch.Tensor, window: int) -> None:
    """The frozen backbone's decoder over each window of W tokens (no logits, as memorize)."""
    decoder = backbone.get_decoder()
    for start in range(0, ids.shape[1], window):
        x = ids[:, start:start + window]
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

    plain_warm = lambda: plain_windowed_forward(baseline, ids[:, :args.window], args.window)
    mem_warm = lambda: (model.reset_memory(), model.memorize(ids[:, :args.window], show_progress=False))
    plain_warm(), mem_warm()                                            # warm-up, not timed
    t_plain, t_mem = [], []
    for _ in range(args.repeats):                                      # alternate so drift hits both
        t0 = time.perf_counter()
        plain_windowed_forward(baseline, ids, args.window)
        t_plain.append(time.perf_counter() - t0)
        model.reset_memory()
        t0 = time.perf_counter()
        model.memorize(ids, show_progress=False)
        t_mem.append(time.perf_counter() - t0)
    bpt = {"float32": memory_bytes_per_token(model)}
    half = MemformerForCausalLM.from_pretrained(None, MemoryConfig(window=args.window, memory_dtype="bfloat16"))
    half.memorize(ids[:, :args.window], show_progress=False)
    bpt["bfloat16"] = memory_bytes_per_token(half)
    del half
    plain, mem = statistics.median(t_plain), statistics.median(t_mem)
    ratio = mem / plain
    L = len(model.memories)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = platform.processor() or platform.machine()
    rows = [{"tokens": n, "window": args.window, "threads": torch.get_num_threads(),
             "plain_s": round(plain, 3), "memorize_s": round(mem, 3),
             "plain_tok_s": round(n / plain, 1), "memorize_tok_s": round(n / mem, 1),
             "ratio": round(ratio, 3), "bytes_per_token_fp32": int(bpt["float32"]),
             "bytes_per_token_bf16": int(bpt["bfloat16"])}]
    with open(out / "ingest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = rows[0]
    md = (f"# Ingest: memorize vs plain windowed forward\n\n"
          f"SmolLM2-135M-Instruct (fp32), memory in all {L} layers, {n} tokens of Python's docs, window "
          f"{args.window}, {args.repeats} alternating repeats (median), CPU {cpu}, {r['threads']} torch threads, "
          f"torch {torch.__version__}.\n\n"
          f"| path | seconds | tokens/s |\n|---|---|---|\n"
          f"| plain windowed forward (frozen HF backbone) | {plain:.2f} | {n / plain:.0f} |\n"
          f"| `memorize` (memory layers, writes every window) | {mem:.2f} | {n / mem:.0f} |\n\n"
          f"**Overhead of memory: {ratio:.2f}x** (all repeats: plain {[round(t, 2) for t in t_plain]}, "
          f"memorize {[round(t, 2) for t in t_mem]}).\n\n"
          f"Memory per token (keys + values of all layers and kv heads, valid flags, positions): "
          f"{bpt['float32']:.0f} B in float32, {bpt['bfloat16']:.0f} B in bfloat16 (both measured from the stored tensors).\n")
    (out / "ingest.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
