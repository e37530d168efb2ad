"""Where does the frozen backbone copy? Induction heads per layer, to place sparse memory layers.

Copying a value out of memory (a needle's 7 digits, a UUID) is what sparse memory in layers
20..24 fails at: it reads the right passage and copies it short. In a transformer, copying a
sequence seen before is done by induction heads: at a token that occurred earlier, they attend
to the token that followed it then. This measures them the standard way: random token sequences
of length L, each repeated twice; a head's induction score is its mean attention from every
token of the second copy (t) to the token after its first occurrence (t - L + 1).

    .venv/bin/python benchmarks/induction_heads.py --out benchmarks/results/induction_heads

Writes induction_heads.csv (layer, head, score), induction_heads.md (per layer: best head,
mean over heads; the command) and induction_heads.png (layers x heads heatmap).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from memformer.loading import load_backbone


@torch.no_grad()
def induction_scores(model, vocab: int, length: int, batch: int, seed: int) -> torch.Tensor:
    """[layers, heads] mean attention from each second-copy token to the token after its first
    occurrence, over `batch` random sequences [x ‖ x] of 2 * length tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1000, vocab, (batch, length), generator=g)          # skip special / byte tokens
    ids = torch.cat([x, x], dim=1)                                         # [B, 2L]
    out = model(input_ids=ids, output_attentions=True, use_cache=False)
    t = torch.arange(length, 2 * length - 1)                               # second-copy positions
    scores = []
    for att in out.attentions:                                            # [B, H, 2L, 2L] per layer
        scores.append(att[:, :, t, t - length + 1].mean(dim=(0, 2)))       # [H]
    return torch.stack(scores)                                             # [layers, heads]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=256, help="tokens per random sequence (each seen twice)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/induction_heads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_backbone(None, torch_dtype="float32", attn_implementation="eager")
    s = induction_scores(model, model.config.vocab_size, args.length, args.batch, args.seed)   # [L, H]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "induction_heads.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "head", "score"])
        for layer in range(s.shape[0]):
            for head in range(s.shape[1]):
                w.writerow([layer, head, f"{s[layer, head]:.4f}"])
    best, mean = s.max(1).values, s.mean(1)
    order = best.argsort(descending=True).tolist()
    cmd = " ".join(["benchmarks/induction_heads.py", *(argv if argv is not None else sys.argv[1:])])
    lines = ["# Induction heads of the frozen default backbone", "",
             f"Command: `.venv/bin/python {cmd}`. Random sequences of {args.length} tokens, each repeated "
             f"once, batch {args.batch}; score = mean attention from a second-copy token to the token after "
             f"its first occurrence (chance ~ 1/{args.length}). Layers by their best head: "
             f"{', '.join(str(i) for i in order[:8])} (the top eight).", "",
             "| layer | best head | best score | mean over heads |", "|---:|---:|---:|---:|"]
    lines += [f"| {i} | {int(s[i].argmax())} | {best[i]:.3f} | {mean[i]:.3f} |" for i in range(s.shape[0])]
    (out / "induction_heads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 8))
        im = ax.imshow(s.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_title("induction score (frozen backbone)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / "induction_heads.png", dpi=100)
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
