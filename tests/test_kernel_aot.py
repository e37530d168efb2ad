"""The fused kernels compiled ahead of time for A100 (sm_80) and H100 (sm_90), on a CPU machine.

No GPU: Triton's compiler and bundled ptxas produce the cubin (knn_kernels/aot.py), whose
resources are checked against the target: dynamic + static shared memory within the per-block
opt-in limit (sm_80 166,912 B, sm_90 232,448 B), and no stack frame (= no register spills) in
any kernel. A launch that fails here would fail at its first launch on that GPU ("out of
resource: shared memory") or run with local-memory spills.

Per run this compiles a representative subset (the largest tiles, 32/8 heads at head_dim 128:
the bf16 prefill forward and backward with memory gradients and the bf16 decode forward for
sm_90, the fp32 prefill forward for sm_80); the full matrix is `benchmarks/kernels_aot.py`, whose stored table
(benchmarks/results/kernels_aot/aot.csv) must cover every launch the launchers make now, which
is checked here without compiling.
"""
import csv
import os
import shutil
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="the interpreter replaces the compiler (run without TRITON_INTERPRET)")

SPILL_BUDGET = 0          # bytes of stack frame allowed, forward and backward
TABLE = Path(__file__).parents[1] / "benchmarks" / "results" / "kernels_aot" / "aot.csv"


def _ptxas_runs() -> bool:
    from triton import knobs
    try:
        return shutil.which(knobs.nvidia.ptxas.path) is not None or Path(knobs.nvidia.ptxas.path).exists()
    except Exception:  # noqa: BLE001 - no CUDA toolchain shipped with this triton build
        return False


SUBSET = [  # (hq, hkv, d, phase, k, dtype, backward, mem_grad), target
    ((32, 8, 128, "prefill", 32, torch.bfloat16, False, False), 90),   # largest shared memory
    ((32, 8, 128, "decode", 32, torch.bfloat16, False, False), 90),
    ((32, 8, 128, "prefill", 32, torch.float32, False, False), 80),    # 3xTF32, the most registers
    ((32, 8, 128, "prefill", 32, torch.bfloat16, True, True), 90),
]


@pytest.mark.skipif(not _ptxas_runs(), reason="triton without its bundled ptxas")
@pytest.mark.parametrize("case,arch", SUBSET,
                         ids=[f"{'bwd' if c[6] else 'fwd'}-{c[3]}-{str(c[5])[6:]}-sm{a}" for c, a in SUBSET])
def test_compiles_within_target_resources(case, arch, capsys):
    from memformer.kernels.aot import Case, compile_case, over_budget, table
    hq, hkv, d, phase, k, dtype, backward, mem_grad = case
    rows = compile_case(Case(hq, hkv, d, phase, k, dtype, backward=backward, mem_grad=mem_grad), arch)
    with capsys.disabled():
        print("\n" + table(rows))
    assert rows
    problems = [f"{r['launch']}: {w}" for r in rows for w in over_budget(r, SPILL_BUDGET)]
    assert not problems, problems
    assert all(r["stl"] == 0 for r in rows), "local-memory stores (spills) in SASS"


def test_stored_full_matrix_covers_every_launch():
    """Every launch of the full matrix, as the launchers build it now (kernel, argument
    specialisation, constexprs, warps, stages, target), has a row in the stored table, and that
    row passed. Configurations changed without rerunning benchmarks/kernels_aot.py fail here."""
    import importlib.util
    from memformer.kernels.aot import launch_id, launches
    spec = importlib.util.spec_from_file_location("kernels_aot", TABLE.parents[2] / "kernels_aot.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with open(TABLE) as f:
        stored = {r["launch_id"]: r for r in csv.DictReader(f)}
    assert stored, f"empty {TABLE}"
    versions = {r["triton"] for r in stored.values()}
    if versions != {triton.__version__}:
        pytest.skip(f"table made with Triton {versions}, this is {triton.__version__}")
    missing, failed = [], []
    for arch in (80, 90):
        for case in script.matrix():
            for name, kernel, args, meta in launches(case, arch):
                row = stored.get(launch_id(kernel, args, meta, arch))
                if row is None:
                    missing.append(f"{case.label} {name} sm_{arch}")
                elif row["ok"] != "ok":
                    failed.append(f"{case.label} {name} sm_{arch}: {row['ok']}")
    assert not missing, f"not in {TABLE.name} (rerun benchmarks/kernels_aot.py): {missing[:5]} ({len(missing)})"
    assert not failed, failed


@pytest.mark.parametrize("case", SUBSET, ids=[f"{'bwd' if c[6] else 'fwd'}-{c[3]}-{str(c[5])[6:]}" for c, _ in SUBSET])
def test_every_launch_fixes_fp_fusion(case):
    """Every launch states FMA contraction itself (Triton 3.10 turns its default off), so the
    compiled kernels do not change with the Triton version's default."""
    from memformer.kernels.aot import Case, launches
    hq, hkv, d, phase, k, dtype, backward, mem_grad = case[0]
    for name, _kernel, _args, meta in launches(Case(hq, hkv, d, phase, k, dtype, backward=backward, mem_grad=mem_grad), 90):
        assert meta.get("enable_fp_fusion") is True, name
