"""Which layers' kNN reads find a pass key? The measurement behind the sparse memory layers.

Memory in every layer, kNN reads in every layer, the frozen default backbone (or an adapter).
Each trial memorizes a passkey prompt (`memformer.eval.passkey.make_prompt`, needle at a random
depth) and prefills the question with `generate(..., record=True)`. At the last prompt token (the
one that predicts the key's first digit) every layer's recorded read says, per query head, which
memory rows it retrieved (top-k) and the probability each received in the joint softmax over
local and memory keys. Per layer:

    hit      share of trials where at least one query head retrieved a token of the key's digits
    mass     the key digits' probability, best head of the layer (mean over trials)
    mass_all the key digits' probability summed over the layer's heads / heads (mean over trials)

    .venv/bin/python benchmarks/layer_retrieval.py --length 8k --trials 16 --out benchmarks/results/layer_retrieval

Writes layer_retrieval.csv (one row per trial and layer), layer_retrieval.md (the table, the
command) and layer_retrieval.png.
"""
from __future__ import annotations

import argparse
import csv
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from memformer import MemformerForCausalLM, MemoryConfig
from memformer.eval.passkey import NEEDLE, make_prompt, parse_length


def key_token_positions(tokenizer, ids: list[int], at: int, key: int) -> list[int]:
    """Positions (in `ids`) of the needle's tokens that carry the key's digits."""
    n = len(tokenizer(" " + NEEDLE.format(key=key), add_special_tokens=False)["input_ids"])
    return [p for p in range(at, at + n) if any(c.isdigit() for c in tokenizer.decode([ids[p]]))]


def measure(model, ids: list[int], keypos: list[int]) -> dict[int, dict]:
    """One trial: {layer: {hit, mass, mass_all}} at the last prompt token."""
    model.reset_memory()
    model.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False, record=True)
    want = torch.tensor(keypos)
    out = {}
    for layer, records in model.recorded_reads().items():
        rows, probs = records[0]                                   # prefill: [1, Hq, T, K]
        rows, probs = rows[0, :, -1], probs[0, :, -1].float()      # last prompt token: [Hq, K]
        pos = model.memories[layer].positions[0]                   # [M] token position of each row
        is_key = torch.isin(pos[rows.clamp(min=0)], want) & (rows >= 0)          # [Hq, K]
        mass = (probs * is_key).sum(-1)                            # [Hq]
        out[layer] = {"hit": bool(is_key.any()), "mass": float(mass.max()), "mass_all": float(mass.mean())}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", default="8k")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--adapter", default=None, help="a trained adapter folder (default: the frozen backbone)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/layer_retrieval")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.adapter:
        model = MemformerForCausalLM.from_pretrained(None, adapter=args.adapter)
    else:
        cfg = MemoryConfig(window=args.window, top_k=args.top_k, sink_tokens=4, overlap=64)
        model = MemformerForCausalLM.from_pretrained(None, cfg)
        for m in model.memory_modules.values():   # kNN reads in every layer, not only the default 10..29
            m.knn = True
    model.eval()
    tok = model.tokenizer
    length = parse_length(args.length)
    rng = random.Random(args.seed)
    rows = []
    t0 = time.time()
    for trial in tqdm(range(args.trials), desc="trials"):
        depth, key = rng.random(), rng.randint(10000, 99999)
        ids, at = make_prompt(tok, length, depth, key)
        keypos = key_token_positions(tok, ids, at, key)
        for layer, r in sorted(measure(model, ids, keypos).items()):
            rows.append({"trial": trial, "depth": round(depth, 3), "layer": layer, **r})
    with open(out / "layer_retrieval.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    layers = sorted({r["layer"] for r in rows})
    agg = {L: {k: sum(r[k] for r in rows if r["layer"] == L) / args.trials for k in ("hit", "mass", "mass_all")}
           for L in layers}
    lines = [f"# Which layers' kNN reads find the pass key ({args.length}, {args.trials} trials)", "",
             "    .venv/bin/python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]), "",
             f"Window {args.window}, top-{args.top_k}, sink 4, overlap 64, "
             f"{'adapter ' + args.adapter if args.adapter else 'untrained (frozen backbone, gates 0)'}; "
             f"{time.time() - t0:.0f} s. At the last prompt token: hit = share of trials where some query head "
             "retrieved a key-digit token; mass = the key digits' probability in the best head; mass_all = "
             "summed over heads / heads.", "",
             "| layer | hit | mass (best head) | mass (all heads) |", "|---:|---:|---:|---:|"]
    lines += [f"| {L} | {a['hit']:.2f} | {a['mass']:.3f} | {a['mass_all']:.4f} |" for L, a in agg.items()]
    (out / "layer_retrieval.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar([L - 0.2 for L in layers], [agg[L]["hit"] for L in layers], width=0.4, label="hit (any head)")
    ax.bar([L + 0.2 for L in layers], [agg[L]["mass"] for L in layers], width=0.4, label="key mass (best head)")
    ax.set_xlabel("layer")
    ax.set_title(f"pass key found by each layer's kNN read ({args.length}, {args.trials} trials)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "layer_retrieval.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
