"""Passkey with int8 memory vs float32 memory: the same trials, side by side, in one run.

    .venv/bin/python benchmarks/int8_passkey.py --length 16k --trials 10 --out benchmarks/results/int8_passkey

Two copies of the default backbone (SmolLM2-135M-Instruct) with MemoryConfig defaults, one
storing memory in float32 and one in int8 (per-row scales); each trial's prompt (the passkey
prompt of `memformer.eval.passkey`, needle depth (i + 0.5) / trials, key from a seeded generator as
in `memformer eval passkey`) goes through both. Also reports the bytes each memory holds.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memformer import MemformerForCausalLM, MemoryConfig  # noqa: E402
from memformer.eval import passkey  # noqa: E402


def memory_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for mem in model.memories.values() for t in mem.state_dict().values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", default="16k")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/int8_passkey")
    args = ap.parse_args(argv)
    length = passkey.parse_length(args.length)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = {dt: MemformerForCausalLM.from_pretrained(None, MemoryConfig(memory_dtype=dt)) for dt in ("float32", "int8")}
    tok = models["float32"].tokenizer
    rng = random.Random(args.seed)
    rows = []
    with open(out / "trials.jsonl", "w") as log:
        for i in range(args.trials):
            depth, key = (i + 0.5) / args.trials, rng.randint(10000, 99999)
            ids, _ = passkey.make_prompt(tok, length, depth, key)
            for dt, model in models.items():
                t0 = time.perf_counter()
                x = torch.tensor([ids])
                model.reset_memory()
                y = model.generate(x, max_new_tokens=8, do_sample=False)
                nbytes = memory_bytes(model)
                answer = tok.decode(y[0, x.shape[1]:], skip_special_tokens=True).strip()
                row = {"trial": i, "depth": round(depth, 3), "key": key, "dtype": dt, "answer": answer,
                       "correct": passkey.first_number(answer) == key, "memory_tokens": model.memory_size(),
                       "memory_bytes": nbytes, "seconds": round(time.perf_counter() - t0, 1)}
                model.reset_memory()
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(row, flush=True)
    md = [f"# Passkey at {args.length}: int8 memory vs float32 memory (same trials)\n",
          f"Command: `python benchmarks/int8_passkey.py {' '.join(sys.argv[1:])}`\n",
          "Default backbone, MemoryConfig defaults except memory_dtype; greedy; correct = first number == key.\n",
          "| memory dtype | correct | memory bytes (all layers) | bytes / token |", "|---|---:|---:|---:|"]
    for dt in models:
        rs = [r for r in rows if r["dtype"] == dt]
        ok = sum(r["correct"] for r in rs)
        md.append(f"| {dt} | {ok}/{len(rs)} | {rs[-1]['memory_bytes']:,} | "
                  f"{rs[-1]['memory_bytes'] / max(1, rs[-1]['memory_tokens']):,.0f} |")
    same = sum(a["answer"] == b["answer"] for a, b in zip(rows[0::2], rows[1::2]))
    md.append(f"\nIdentical answers in {same}/{args.trials} trials.")
    md += ["", "| trial | depth | key | float32 | int8 |", "|---:|---:|---:|---|---|"]
    for a, b in zip(rows[0::2], rows[1::2]):
        md.append(f"| {a['trial']} | {a['depth']} | {a['key']} | {a['answer'][:16]!r} {'ok' if a['correct'] else 'miss'} "
                  f"| {b['answer'][:16]!r} {'ok' if b['correct'] else 'miss'} |")
    (out / "int8_passkey.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
