"""Ahead-of-time compilation of the fused kernels for a GPU target, on a machine without one.

The launchers (`triton_knn._fwd_launch`, `triton_knn._bwd_launches`) return their kernels'
arguments instead of launching; here they are bound exactly as `JITFunction.run` binds them
(same specialisation of ints and pointer alignment, same constexprs and options), but against an
explicit `GPUTarget` rather than the active driver's, and compiled with `triton.compile` and
Triton's bundled ptxas. Resource use is read from the cubin with the bundled cuobjdump (registers,
stack frame) and from SASS (local-memory stores = spills), since `CompiledKernel.n_regs` /
`n_spills` exist only once a binary is loaded on a device.

    from memformer.kernels.aot import Case, compile_case
    for row in compile_case(Case(9, 3, 64, "prefill", 32, torch.bfloat16), arch=90): print(row)
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import subprocess
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from . import triton_knn as tk

# prefill T = S = 256; decode T = 1 over a 2048-key window (the shapes)
PHASES = {"prefill": (256, 256), "decode": (1, 2048)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of the library: heads Hq/Hkv, head_dim D, phase, K retrieved slots (0 = no memory),
    dtype of q/k/v; `memory` is "rows" (same dtype as q), "int8" (forward only) and `mem_grad`
    asks the backward for memory gradients."""
    hq: int
    hkv: int
    d: int
    phase: str
    k: int
    dtype: torch.dtype
    memory: str = "rows"
    mem_grad: bool = False
    backward: bool = False

    @property
    def label(self) -> str:
        mem = "no-mem" if self.k == 0 else f"K={self.k}" + (" int8" if self.memory == "int8" else "")
        if self.backward:
            mem += " mem-grad" if self.mem_grad else ""
        dt = next(n for n, t in DTYPES.items() if t == self.dtype)
        return f"{'bwd' if self.backward else 'fwd'} {self.phase} {self.hq}/{self.hkv} d{self.d} {dt} {mem}"


def _tensors(case: Case):
    """Small CPU stand-ins with the shapes, dtypes and layouts of a real call (M is small: the
    memory's size only reaches the kernel through int64 strides, which do not specialise)."""
    T, S = PHASES[case.phase]
    B, M = 1, 64
    r = lambda *s: torch.zeros(*s, dtype=case.dtype)
    x = dict(q=r(B, case.hq, T, case.d), k_local=r(B, case.hkv, S, case.d), v_local=r(B, case.hkv, S, case.d))
    if case.k:
        if case.memory == "int8":
            x.update(k_mem=torch.zeros(B, case.hkv, M, case.d, dtype=torch.int8),
                     v_mem=torch.zeros(B, case.hkv, M, case.d, dtype=torch.int8),
                     k_scale=torch.ones(B, case.hkv, M), v_scale=torch.ones(B, case.hkv, M))
        else:
            x.update(k_mem=r(B, case.hkv, M, case.d), v_mem=r(B, case.hkv, M, case.d))
        # what memory_layer passes: its own memory query and the gate
        x.update(mem_ids=torch.zeros(B, case.hq, T, case.k, dtype=torch.int64), q_mem=r(B, case.hq, T, case.d),
                 mem_bias=torch.zeros(case.hq))
    return x


def launches(case: Case, arch: int, n_sm: int = 132) -> list[tuple[str, object, tuple, dict]]:
    """[(name, kernel, args, meta)] of every launch the library makes for this case on `arch`."""
    x = _tensors(case)
    if not case.backward:
        grid, args, meta, _ = tk._fwd_launch(**x, arch=arch, n_sm=n_sm)
        out = [("fwd", tk._knn_attention_fwd_kernel, args, meta)]
        if grid[2] > 1:                             # split decode: the merge kernel runs too
            D, sp = case.d, grid[2]
            B, Hq, T = x["q"].shape[:3]
            _g, m_args, m_meta = tk._merge_launch(torch.zeros(sp, B, Hq, T, D), torch.zeros(sp, B, Hq, T),
                                                  torch.zeros(B, Hq, T, D, dtype=case.dtype), torch.zeros(B, Hq, T))
            out.append(("merge", tk._merge_splits_kernel, m_args, m_meta))
        return out
    T = x["q"].shape[2]
    out_t = torch.zeros_like(x["q"])
    lse = torch.zeros(x["q"].shape[:3])
    ls, _ = tk._bwd_launches(x["q"], x["k_local"], x["v_local"], x.get("k_mem"), x.get("v_mem"), x.get("mem_ids"),
                             x.get("q_mem"), x.get("mem_bias"), out_t, lse, torch.zeros_like(out_t), None,
                             case.mem_grad, arch=arch)
    names = ("bwd-delta", "bwd-dkdv", "bwd-dq", "bwd-scatter")
    return [(n, kern, args, meta) for n, (kern, _grid, args, meta) in zip(names, ls)]


def bind(kernel, args, meta, target: GPUTarget):
    """(ASTSource, options) for a launch, specialised as `kernel[grid](*args, **meta)` would be."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options


def launch_id(kernel, args, meta, arch: int) -> str:
    """What the compiled binary depends on besides the kernels' source: kernel, argument types
    and specialisation, constexprs, warps/stages, target. Cheap (no compile): lets a test check
    that a stored table covers every launch the launchers make now."""
    target = GPUTarget("cuda", arch, 32)
    src, options = bind(kernel, args, meta, target)
    key = (kernel.__name__, sorted(src.signature.items()), sorted((str(k), str(v)) for k, v in src.constants.items()),
           sorted((str(k), str(v)) for k, v in src.attrs.items()), options.num_warps, options.num_stages, arch)
    return hashlib.sha256(repr(key).encode()).hexdigest()[:16]


def _tool(name: str) -> str:
    from triton import knobs
    return getattr(knobs.nvidia, name).path


def resource_usage(cubin: bytes) -> dict:
    """Registers and stack frame (cuobjdump -res-usage) and local-memory traffic (STL/LDL in SASS)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{res}")
    regs, stack, static_shared, local = map(int, m.groups())
    return dict(regs=regs, stack=stack, static_shared=static_shared, local=local,
                stl=len(re.findall(r"\bSTL(\.\w+)*\b", sass)), ldl=len(re.findall(r"\bLDL(\.\w+)*\b", sass)))


def compile_launch(kernel, args, meta, arch: int) -> dict:
    """Compile one launch for sm_<arch>; returns the resource row (raises on a compile error)."""
    target = GPUTarget("cuda", arch, 32)
    src, options = bind(kernel, args, meta, target)
    t0 = time.perf_counter()
    compiled = triton.compile(src, target=target, options=options.__dict__)
    seconds = time.perf_counter() - t0
    usage = resource_usage(compiled.asm["cubin"])
    cfg = {k: meta[k] for k in ("BLOCK_R", "BLOCK_S") if k in meta}
    return dict(kernel=kernel.__name__, arch=arch, shared=compiled.metadata.shared,
                limit=tk.SHARED_MEMORY_LIMIT[arch], num_warps=compiled.metadata.num_warps,
                num_stages=compiled.metadata.num_stages, compile_s=round(seconds, 1),
                launch_id=launch_id(kernel, args, meta, arch), triton=triton.__version__, **cfg, **usage)


def compile_case(case: Case, arch: int, seen: set | None = None) -> list[dict]:
    """Compile every launch of a case for sm_<arch>; launches already in `seen` (same kernel,
    specialisation and options) are skipped."""
    rows = []
    for name, kernel, args, meta in launches(case, arch):
        target = GPUTarget("cuda", arch, 32)
        src, options = bind(kernel, args, meta, target)
        key = (src.hash(), str(sorted(options.__dict__.items())), arch)
        if seen is not None:
            if key in seen:
                continue
            seen.add(key)
        rows.append(dict(case=case.label, launch=name, **compile_launch(kernel, args, meta, arch)))
    return rows


def over_budget(row: dict, spill_budget: int) -> list[str]:
    """Why a compiled launch would fail or is not accepted: shared memory above the target's
    per-block limit (static + dynamic), or a stack frame above the budget."""
    why = []
    if row["shared"] + row["static_shared"] > row["limit"]:
        why.append(f"shared {row['shared']} + {row['static_shared']} B > {row['limit']} B")
    if row["stack"] > spill_budget:
        why.append(f"stack {row['stack']} B > budget {spill_budget} B")
    return why


def table(rows: list[dict]) -> str:
    cols = ["case", "launch", "arch", "BLOCK_R", "BLOCK_S", "num_warps", "num_stages", "regs", "stack", "stl", "ldl",
            "shared", "limit", "compile_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
