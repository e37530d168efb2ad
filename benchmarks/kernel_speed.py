"""Fused kNN attention vs the torch reference (and SDPA over pre-gathered keys), on a CUDA GPU.

    .venv/bin/python benchmarks/kernel_speed.py                    # full sweep, bf16
    .venv/bin/python benchmarks/kernel_speed.py --quick            # one shape per phase

Phases: prefill (T = S = 2048, K = 32 retrieved rows per query, memory of M rows per kv head),
decode (T = 1 over a 2048-key window, batch 1 and 16) and forward + backward through autograd
(prefill shapes, with and without memory gradients), for SmolLM2-like heads (9 query / 3 kv, head_dim 64) and a 7B-like
shape (32 / 8, head_dim 128). Times are `triton.testing.do_bench` medians (ms).

Throughput is reported against the GPU's datasheet peaks (PEAKS, by device name) and against a
measured device-to-device copy:
- bytes: what the fused forward must read and write once: q, the local K/V window, the ids, one
  K and one V row per retrieved slot and query head, the output (and lse);
- FLOPs, FlashAttention convention: 4*D per visible (query, key) pair in the forward (causal
  pairs of the window plus the K memory slots), 3.5x that for forward + backward (recomputation
  of the scores is not counted). Bytes are the forward's also in forward+backward rows, where
  only the FLOP columns are meaningful.

Results: benchmarks/results/kernel_speed/<gpu>/kernels.csv and kernels.md, with the GPU's name, the
torch and triton versions and the date. Needs a CUDA GPU; exits with status 2 without one.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import re
import sys
from pathlib import Path

import torch

# Datasheet peaks by device-name fragment: (memory bandwidth B/s, dense bf16 tensor FLOP/s).
# Checked in order; "H100 PCIe" before "H100".
PEAKS = [
    ("H200", 4.8e12, 989e12), ("H100 PCIe", 2.0e12, 756e12), ("H100", 3.35e12, 989e12),
    ("A100-SXM4-80GB", 2.039e12, 312e12), ("A100 80GB PCIe", 1.935e12, 312e12), ("A100", 1.555e12, 312e12),
    ("L40S", 0.864e12, 362e12), ("L4", 0.3e12, 121e12), ("A10", 0.6e12, 125e12),
]


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
    """Bytes the fused forward reads and writes once (GQA rows of a group share the local loads)."""
    return (B * Hq * T * D * elt * 2            # q in, out
            + B * Hkv * S * D * elt * 2          # local K, V
            + B * Hq * T * K * 8                 # ids
            + B * Hq * T * K * 2 * D * elt       # one K and one V row per slot and query head
            + B * Hq * T * 4)                    # lse


def flops(B, Hq, T, S, K, D, backward=False):
    """FlashAttention-convention FLOPs: 4*D per visible (query, key) pair; forward + backward is
    3.5x the forward (the backward's 2.5x does not count recomputing the scores)."""
    pairs = B * Hq * (T * (S - T) + T * (T + 1) // 2 + T * K)
    return 4 * D * pairs * (3.5 if backward else 1.0)


def peaks(gpu: str):
    for frag, bw, tf in PEAKS:
        if frag in gpu:
            return bw, tf
    return None, None


def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second), 1 GiB."""
    import triton
    a = torch.empty(1 << 29, dtype=torch.int16, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a))
    del a, b
    return 2 * (1 << 30) / (ms * 1e-3)


def _bench(fn):
    import triton
    try:
        return triton.testing.do_bench(fn)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan")


# (heads Hq, Hkv, head_dim), memory rows M, prefill T = S, decode S, decode batches
FULL = dict(heads=[(9, 3, 64), (32, 8, 128)], mems=[65536, 1 << 20, 1 << 22], prefill=2048, decode_s=2048,
            batches=(1, 16), K=32)
QUICK = dict(FULL, heads=[(9, 3, 64)], mems=[1 << 20])


def sweep(shapes, dtype, device, bench, gpu, peak_bw, peak_tf, copy_bw, log=print):
    """Time every case of `shapes` (FULL/QUICK layout) with `bench(fn) -> ms`; returns the rows."""
    from memformer.kernels import knn_attention
    from memformer.kernels.reference import knn_attention_reference
    from memformer.kernels.triton_knn import knn_attention_triton
    dtype_name = str(dtype).replace("torch.", "")
    rows = []

    def record(phase, B, Hq, Hkv, T, S, M, K, D, fused, ref, sdpa=float("nan"), backward=False, note=""):
        elt = torch.finfo(dtype).bits // 8
        gbs = bytes_moved(B, Hq, Hkv, T, S, K, D, elt) / (fused * 1e-3) / 1e9
        tfs = flops(B, Hq, T, S, K, D, backward) / (fused * 1e-3) / 1e12
        rows.append(dict(gpu=gpu, dtype=dtype_name, phase=phase, note=note, B=B, heads=f"{Hq}/{Hkv}", head_dim=D,
                         T=T, S=S, K=K, M=M, fused_ms=round(fused, 4), reference_ms=round(ref, 4),
                         sdpa_pregathered_ms=round(sdpa, 4),
                         speedup_vs_reference=round(ref / fused, 2) if math.isfinite(ref) else "",
                         fused_GBps=round(gbs, 1),
                         pct_peak_bw=round(100 * gbs * 1e9 / peak_bw, 1) if peak_bw else "",
                         pct_copy_bw=round(100 * gbs * 1e9 / copy_bw, 1) if copy_bw else "",
                         fused_TFLOPs=round(tfs, 2),
                         pct_peak_flops=round(100 * tfs * 1e12 / peak_tf, 1) if peak_tf else ""))
        log(rows[-1])

    K = shapes["K"]
    for Hq, Hkv, D in shapes["heads"]:
        for M in shapes["mems"]:
            T = S = shapes["prefill"]
            x = make_case(1, Hq, Hkv, T, S, M, K, D, dtype, device)
            record("prefill", 1, Hq, Hkv, T, S, M, K, D, bench(lambda: knn_attention_triton(**x)),
                   bench(lambda: knn_attention_reference(**x)),
                   bench(sdpa_pregathered(x)) if D == 64 and M <= (1 << 20) else float("nan"))
            # forward + backward through autograd, fused vs the reference
            for mem_grad in (False, True):
                xs = {k: v.detach().requires_grad_(v.is_floating_point() and (mem_grad or k not in ("k_mem", "v_mem")))
                      for k, v in x.items()}
                go = torch.randn(1, Hq, T, D, device=device, dtype=dtype)
                grad_in = [v for v in xs.values() if v.requires_grad]

                def fused_bwd():
                    torch.autograd.grad(knn_attention(**xs, mem_grad=mem_grad)[0], grad_in, go)

                def ref_bwd():
                    torch.autograd.grad(knn_attention_reference(**xs)[0], grad_in, go)

                record("forward+backward", 1, Hq, Hkv, T, S, M, K, D, bench(fused_bwd), bench(ref_bwd),
                       backward=True, note="memory gradients" if mem_grad else "")
                del xs
            del x
            if device == "cuda":
                torch.cuda.empty_cache()
            for B in shapes["batches"]:
                T, S = 1, shapes["decode_s"]
                x = make_case(B, Hq, Hkv, T, S, M, K, D, dtype, device)
                record("decode", B, Hq, Hkv, T, S, M, K, D, bench(lambda: knn_attention_triton(**x)),
                       bench(lambda: knn_attention_reference(**x)), bench(sdpa_pregathered(x)))
                del x
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def write(rows, out: Path, header: str) -> Path:
    """kernels.csv and kernels.md under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "kernels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = ["phase", "B", "heads", "head_dim", "K", "M", "fused_ms", "reference_ms", "sdpa_pregathered_ms",
            "speedup_vs_reference", "fused_GBps", "pct_peak_bw", "pct_copy_bw", "fused_TFLOPs", "pct_peak_flops", "note"]
    md = [header, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (out / "kernels.md").write_text("\n".join(md) + "\n")
    return out / "kernels.md"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernel_speed"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernel_speed.py needs a CUDA GPU (the fused kernel's speed is a GPU property); "
              "correctness is covered on CPU by tests/test_triton_kernels.py and the compile for "
              "sm_80/sm_90 by tests/test_kernel_aot.py", file=sys.stderr)
        return 2
    import triton
    dtype = getattr(torch, args.dtype)
    gpu = torch.cuda.get_device_name()
    peak_bw, peak_tf = peaks(gpu)
    copy_bw = copy_bandwidth()
    print(f"{gpu}: datasheet {peak_bw} B/s, {peak_tf} FLOP/s; measured copy {copy_bw / 1e9:.0f} GB/s", flush=True)
    rows = sweep(QUICK if args.quick else FULL, dtype, "cuda", _bench, gpu, peak_bw, peak_tf, copy_bw,
                 log=lambda r: print(r, flush=True))
    header = (f"# kNN attention kernels on {gpu} ({args.dtype})\n\n"
              f"torch {torch.__version__}, triton {triton.__version__}, {datetime.date.today().isoformat()}. "
              f"Datasheet peaks used: {peak_bw} B/s, {peak_tf} FLOP/s (bf16 dense); measured device copy "
              f"{copy_bw / 1e9:.0f} GB/s. Times: triton.testing.do_bench medians.\n")
    md = write(rows, Path(args.out) / re.sub(r"[^A-Za-z0-9_.-]+", "_", gpu), header)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
