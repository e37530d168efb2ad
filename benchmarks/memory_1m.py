"""A memory of a million tokens: save, reload, answer identically; a truncated file is refused.

    .venv/bin/python benchmarks/memory_1m.py --tokens 1M --index exact --memory-dtype float32

Uses a small random llama built in code (2 layers, head_dim 64, 1 kv head) so a million tokens
are read in minutes on a CPU; the memory path (windows, index, store, persistence) is the same
as for any backbone. Measures memorize, save and load time, bytes on disk, and checks that
logits and greedy generations after a reload are bit-identical to before, and that a truncated
memory file is refused without touching the loaded memory. Appends a row to memory_1m.md.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memformer import MemformerForCausalLM, MemoryConfig, MemoryFileError  # noqa: E402
from memformer.eval.passkey import parse_length  # noqa: E402


def small_backbone(seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1M")
    ap.add_argument("--index", default="exact")
    ap.add_argument("--memory-dtype", default="float32")
    ap.add_argument("--out", default="benchmarks/results/memory_1m.md")
    args = ap.parse_args(argv)
    n = parse_length(args.tokens)
    cfg = MemoryConfig(window=1024, index=args.index, memory_dtype=args.memory_dtype)
    model = MemformerForCausalLM(small_backbone(), None, cfg)
    ids = torch.randint(0, 512, (1, n + 64), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    model.memorize(ids[:, :n])
    memorize_s = time.perf_counter() - t0
    query = ids[:, n:]
    before_logits = model(query).logits
    before_gen = model.generate(query, max_new_tokens=16, do_sample=False)
    tmp = Path(tempfile.mkdtemp(prefix="memformer-1m-"))
    try:
        t0 = time.perf_counter()
        model.save_memory(tmp / "mem")
        save_s = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in (tmp / "mem").iterdir())
        fresh = MemformerForCausalLM(small_backbone(), None, cfg)   # same seed: same weights
        t0 = time.perf_counter()
        fresh.load_memory(tmp / "mem")
        load_s = time.perf_counter() - t0
        same_logits = torch.equal(fresh(query).logits, before_logits)
        same_gen = torch.equal(fresh.generate(query, max_new_tokens=16, do_sample=False), before_gen)
        # a truncated copy is refused and the loaded memory stays as it was
        shutil.copytree(tmp / "mem", tmp / "cut")
        data = tmp / "cut" / "memory.safetensors"
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
        try:
            fresh.load_memory(tmp / "cut")
            refused = False
        except MemoryFileError as e:
            refused = "corrupt or truncated" in str(e)
        kept = fresh.memory_size() == model.memory_size() and torch.equal(fresh(query).logits, before_logits)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    row = (f"| {n:,} | {args.index} | {args.memory_dtype} | {model.memory_size():,} | {memorize_s:.0f} | "
           f"{save_s:.1f} | {load_s:.1f} | {disk / 2**20:.0f} | {same_logits and same_gen} | {refused and kept} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.write_text("# A memory of a million tokens: save, reload, answer identically\n\n"
                       "Command: `python benchmarks/memory_1m.py --tokens 1M --index <index> --memory-dtype <dtype>` "
                       "(small random llama, 2 memory layers, 1 kv head of dim 64, window 1024, CPU).\n\n"
                       "| tokens read | index | dtype | tokens in memory | memorize (s) | save (s) | load (s) | "
                       "MiB on disk | identical logits + generation after reload | truncated file refused, memory kept |\n"
                       "|---:|---|---|---:|---:|---:|---:|---:|---|---|\n")
    with open(out, "a") as f:
        f.write(row + "\n")
    print(row)
    return 0 if (same_logits and same_gen and refused and kept) else 1


if __name__ == "__main__":
    sys.exit(main())
