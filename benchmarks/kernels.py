"""Fused kNN attention vs the torch reference vs SDPA over pre-gathered keys (needs a CUDA GPU).

    .venv/bin/python benchmarks/kernels.py                    # full sweep, bf16
    .venv/bin/python benchmarks/kernels.py --quick            # a few cases

Cases: prefill (T = 2048) and decode (T = 1), K in {32, 128, 512}, memory sizes M up to 4M rows
per (sequence, kv head), SmolLM2-like heads (9 query / 3 kv, head_dim 64) and a 7B-like shape
(32 / 8, head_dim 128). Times are `triton.testing.do_bench` medians in ms. Achieved bandwidth
counts the bytes the fused kernel must read: q, local K/V, the ids and one K+V row per retrieved
slot and kv head (GQA rows of a group share loads where they hit the same rows, so this is an
upper bound on traffic), and the output. Results: benchmarks/results/kernels.csv, kernels.png,
kernels.md, with the GPU's name.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

# Peak memory bandwidth (bytes/s) by GPU name fragment, for the "% of peak" column.
PEAK_BW = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L4": 0.3e12, "A10": 0.6e12}


def make_case(B, Hq, Hkv, T, S, M, K, D, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)
    ids = torch.randint(0, M, (B, Hq, T, K), generator=g, device=device)
    return dict(q=r(B, Hq, T, D), k_local=r(B, Hkv, S, D), v_local=r(B, Hkv, S, D),
                k_mem=r(B, Hkv, M, D), v_mem=r(B, Hkv, M, D), mem_ids=ids, mem_bias=torch.zeros(Hq, device=device))


def sdpa_pregathered(x):
    """SDPA over [local ‖ gathered memory] with the memory already gathered per query (not timed)."""
    from memformer.kernels.reference import gather_memory
    kg = gather_memory(x["k_mem"], x["mem_ids"])                      # [B, Hq, T, K, D]
    vg = gather_memory(x["v_mem"], x["mem_ids"])
    B, Hq, T, K, D = kg.shape
    G = Hq // x["k_local"].shape[1]
    kl = x["k_local"].repeat_interleave(G, 1)
    vl = x["v_local"].repeat_interleave(G, 1)
    S = kl.shape[2]
    # one query per "batch" row so each query sees its own K retrieved keys plus the local window
    q1 = x["q"].reshape(B * Hq * T, 1, 1, D)
    keys = torch.cat([kl[:, :, None].expand(B, Hq, T, S, D), kg], 3).reshape(B * Hq * T, 1, S + K, D)
    vals = torch.cat([vl[:, :, None].expand(B, Hq, T, S, D), vg], 3).reshape(B * Hq * T, 1, S + K, D)
    t = torch.arange(T, device=kl.device)
    mask = torch.cat([torch.arange(S, device=kl.device)[None] <= (t + S - T)[:, None],
                      torch.ones(T, K, dtype=torch.bool, device=kl.device)], 1)          # [T, S + K]
    mask = mask[None, None].expand(B, Hq, T, S + K).reshape(B * Hq * T, 1, 1, S + K)
    return lambda: torch.nn.functional.scaled_dot_product_attention(q1, keys, vals, attn_mask=mask)


def bytes_moved(B, Hq, Hkv, T, S, K, D, elt):
    return (B * Hq * T * D * elt * 2            # q in, out
            + B * Hkv * S * D * elt * 2          # local K, V
            + B * Hq * T * K * 8                 # ids
            + B * Hkv * T * K * 2 * D * elt * (Hq // Hkv))   # gathered K+V per query head


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (the fused kernel's speed is a GPU property); "
              "correctness is covered on CPU by tests/test_triton_kernels.py", file=sys.stderr)
        return 2
    import triton
    from memformer.kernels.reference import knn_attention_reference
    from memformer.kernels.triton_knn import knn_attention_triton

    dev, dtype = "cuda", getattr(torch, args.dtype)
    gpu = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BW.items() if k in gpu), None)
    heads = [(9, 3, 64)] if args.quick else [(9, 3, 64), (32, 8, 128)]
    mems = [65536, 1 << 20] if args.quick else [65536, 1 << 20, 1 << 22]
    rows = []
    for Hq, Hkv, D in heads:
        for phase, T, S in (("prefill", 2048, 2048), ("decode", 1, 2048)):
            for K in (32, 128, 512):
                for M in mems:
                    if phase == "prefill" and (K == 512 or M > (1 << 20)) and D == 128:
                        continue                  # the reference's gathered copies would not fit
                    x = make_case(1, Hq, Hkv, T, S, M, K, D, dtype, dev)
                    fused = triton.testing.do_bench(lambda: knn_attention_triton(**x))
                    try:
                        ref = triton.testing.do_bench(lambda: knn_attention_reference(**x))
                    except torch.cuda.OutOfMemoryError:
                        ref = float("nan")
                    try:
                        sdpa = triton.testing.do_bench(sdpa_pregathered(x))
                    except torch.cuda.OutOfMemoryError:
                        sdpa = float("nan")
                    gbs = bytes_moved(1, Hq, Hkv, T, S, K, D, x["q"].element_size()) / (fused * 1e-3) / 1e9
                    rows.append(dict(gpu=gpu, dtype=args.dtype, heads=f"{Hq}/{Hkv}", head_dim=D, phase=phase,
                                     T=T, S=S, K=K, M=M, fused_ms=round(fused, 4), reference_ms=round(ref, 4),
                                     sdpa_pregathered_ms=round(sdpa, 4), speedup_vs_reference=round(ref / fused, 2),
                                     fused_GBps=round(gbs, 1),
                                     pct_peak_bw=round(100 * gbs * 1e9 / peak, 1) if peak else ""))
                    print(rows[-1], flush=True)
                    del x
                    torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "kernels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = ["phase", "heads", "head_dim", "K", "M", "fused_ms", "reference_ms", "sdpa_pregathered_ms",
            "speedup_vs_reference", "fused_GBps", "pct_peak_bw"]
    md = [f"# kNN attention kernels on {gpu} ({args.dtype})\n", "| " + " | ".join(cols) + " |",
          "|" + "---|" * len(cols)] + ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (out / "kernels.md").write_text("\n".join(md) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, phase in zip(axes, ("prefill", "decode")):
        for K in (32, 128, 512):
            rs = [r for r in rows if r["phase"] == phase and r["K"] == K and r["heads"] == "9/3"]
            if rs:
                ax.plot([r["M"] for r in rs], [r["fused_ms"] for r in rs], "o-", label=f"fused K={K}")
                ax.plot([r["M"] for r in rs], [r["reference_ms"] for r in rs], "x--", label=f"torch ref K={K}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("memory rows M per kv head")
        ax.set_ylabel("ms")
        ax.set_title(f"{phase} ({gpu})")
        ax.legend(fontsize=7)
    fig.savefig(out / "kernels.png", dpi=120, bbox_inches="tight")
    print((out / "kernels.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
