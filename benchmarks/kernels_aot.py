"""Compile every launch the fused kNN-attention kernels make, ahead of time, for sm_80 and sm_90.

No GPU needed: Triton's compiler and bundled ptxas run on the CPU (see knn_kernels/aot.py).
The matrix: heads 9/3 with head_dim 64 and 32/8 with head_dim 128; prefill T = S = 256 and decode
T = 1 over S = 2048; fp32, bf16, fp16; forward without memory, with K = 32 memory rows, with
int8 memory rows (bf16/fp16); backward without memory, with memory, with memory gradients.
Identical launches (same kernel, specialisation, options) are compiled once.

    .venv/bin/python benchmarks/kernels_aot.py                   # full matrix, both targets
    .venv/bin/python benchmarks/kernels_aot.py --arch 90 --dtype bf16 --phase prefill

Writes benchmarks/results/kernels_aot/aot.md and aot.csv (registers, stack frame, local-memory
stores/loads in SASS, dynamic shared memory against the target's limit, compile seconds) and
exits 1 if a launch fails to compile, exceeds shared memory or the spill budget.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

# the forward must not spill; the backward's stack frame is allowed this many bytes
FWD_SPILL_BUDGET = 0
BWD_SPILL_BUDGET = 0


def matrix(dtypes=("fp32", "bf16", "fp16"), phases=("prefill", "decode"), heads=((9, 3, 64), (32, 8, 128))):
    from memformer.kernels.aot import DTYPES, Case
    for hq, hkv, d in heads:
        for phase in phases:
            for dt in dtypes:
                dtype = DTYPES[dt]
                yield Case(hq, hkv, d, phase, 0, dtype)
                yield Case(hq, hkv, d, phase, 32, dtype)
                if dt != "fp32":
                    yield Case(hq, hkv, d, phase, 32, dtype, memory="int8")
                yield Case(hq, hkv, d, phase, 0, dtype, backward=True)
                yield Case(hq, hkv, d, phase, 32, dtype, backward=True)
                yield Case(hq, hkv, d, phase, 32, dtype, backward=True, mem_grad=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, action="append", help="80, 90 (default both)")
    ap.add_argument("--dtype", action="append", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--phase", action="append", choices=["prefill", "decode"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels_aot"))
    ap.add_argument("--update", action="store_true",
                    help="keep the stored table's rows of the cases not selected here, replace the others")
    args = ap.parse_args(argv)
    import warnings
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    from memformer.kernels.aot import compile_case, over_budget, table
    arches = args.arch or [80, 90]
    cases = list(matrix(tuple(args.dtype or ("fp32", "bf16", "fp16")), tuple(args.phase or ("prefill", "decode"))))
    rows, failures, seen = [], [], set()
    t0 = time.perf_counter()
    for arch in arches:
        for case in cases:
            try:
                new = compile_case(case, arch, seen)
            except Exception as e:  # noqa: BLE001 - a compile error is a result to report
                failures.append(f"{case.label} sm_{arch}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                print(failures[-1], flush=True)
                continue
            for r in new:
                budget = BWD_SPILL_BUDGET if r["launch"].startswith("bwd") else FWD_SPILL_BUDGET
                why = over_budget(r, budget)
                r["ok"] = "ok" if not why else "; ".join(why)
                if why:
                    failures.append(f"{r['case']} {r['launch']} sm_{arch}: {r['ok']}")
                print(f"{r['case']:<42} {r['launch']:<9} sm_{arch} regs {r['regs']:>3} stack {r['stack']:>5} "
                      f"shared {r['shared']:>6}/{r['limit']} {r['compile_s']:>5.1f}s {r['ok']}", flush=True)
                rows.append(r)
    total = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kept = 0
    if args.update and (out / "aot.csv").exists():
        redone = {(c.label, a) for c in cases for a in arches}
        with open(out / "aot.csv") as f:
            old = [r for r in csv.DictReader(f) if (r["case"], int(r["arch"])) not in redone]
        kept = len(old)
        failures += [f"{r['case']} {r['launch']} sm_{r['arch']}: {r['ok']}" for r in old if r["ok"] != "ok"]
        rows = old + rows
    import triton
    head = [f"# Ahead-of-time compile of the kNN-attention kernels (Triton {triton.__version__}, bundled ptxas)\n",
            f"Targets: {', '.join(f'sm_{a}' for a in arches)}; {len(rows)} distinct launches"
            + (f" ({kept} kept from the previous table, the rest compiled or read from Triton's cache in "
               f"{total:.0f} s)" if kept else f" compiled in {total:.0f} s")
            + f" on a 2-core CPU shared with other jobs. Budgets: forward stack {FWD_SPILL_BUDGET} B, backward stack "
            f"{BWD_SPILL_BUDGET} B; shared memory limit = the target's opt-in maximum per block "
            f"(A100 166,912 B, H100 232,448 B). `stack`: ptxas stack frame (bytes); `stl`/`ldl`: local-memory "
            f"store/load instructions in SASS (spills); `shared`: dynamic shared memory Triton requests.\n",
            f"Failures: {len(failures)}\n" + "".join(f"- {f}\n" for f in failures), table(rows), ""]
    (out / "aot.md").write_text("\n".join(head))
    with open(out / "aot.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["case"])
        w.writeheader()
        w.writerows(rows)
    print(f"{len(rows)} launches, {len(failures)} failures, {total:.0f} s -> {out / 'aot.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
