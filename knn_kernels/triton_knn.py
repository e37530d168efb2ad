"""Fused kNN attention in Triton: local causal tiles + retrieved memory rows in one online softmax.

Layout. One program owns a block of *rows* of one (sequence, kv head). The G query heads of a GQA
group are packed token-major, row r -> token t = r // G, head g = r % G, so a local key/value tile
is loaded once for the whole group and a row block covers a contiguous range of tokens, which is
what causal tile skipping needs: keys past the block's last token are never visited, and tiles
every row of the block sees run without a mask. Decoding (T = 1) packs the G rows into one
16-row tile and splits the keys and the memory slots over SPLIT programs per (sequence, kv head),
merged by log-sum-exp, so a single sequence still fills the GPU.

Memory. Every row has its own K retrieved rows, so the memory part has no shared operand for a
tensor-core product. It iterates slot by slot: each step gathers one memory row per query row
([R, D] tiles, not [R, K, D]), so the register footprint does not grow with K and nothing spills.
`HAS_MEMORY` is a compile-time flag: without memory (K = 0) the loop and its loads are not in the
binary. int8 memory rows are dequantised by folding the per-row scale into the score and the
probability (no [R, D] multiply).

Offsets. A 4M-row memory of 8 kv heads at head_dim 128 is 2^32 elements per sequence, so the
sequence, head and memory-row indices are int64 before they meet a stride (`hk * skm_h`,
`rid * skm_m`), and every stride is declared `tl.int64`, which also keeps one compiled signature
whatever the strides' values (an int argument of 2^31 or more would otherwise switch it to i64).

Backward (FlashAttention-2 style, no atomics on local keys): `_bwd_dkdv_kernel` is key-major
(one program per local key block accumulates dK/dV over all query rows of its kv group that can
see it), `_bwd_dq_kernel` is row-major (dQ over the local keys, then dQ_mem and the memory gate's
gradient). Only when memory gradients are asked for, it also writes each slot's dS and P, and
`_bwd_mem_scatter_kernel` adds them into dK_mem/dV_mem with relaxed atomics (memory rows are
shared between queries); otherwise no memory-sized buffer is allocated.

Products run on tensor cores: bf16/fp16 with fp32 accumulation, fp32 inputs as three TF32
products (3xTF32, error close to fp32's).

Block sizes and pipelining depth come from `fwd_config` / `bwd_config`, per target: every
configuration they return is compiled ahead of time for sm_80 and sm_90 by tests/test_kernel_aot.py
and checked against the target's shared memory and a register-spill budget.

Checked against `kernels.reference.knn_attention_reference` (tests run it under
TRITON_INTERPRET=1 on CPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Dynamic shared memory per block (CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, which is
# what Triton checks at load time), by compute capability; CUDA C Programming Guide, "Technical
# Specifications per Compute Capability": 163 KB on 8.0/8.7, 99 KB on 8.6/8.9/12.x, 227 KB on 9.0/10.x.
SHARED_MEMORY_LIMIT = {80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448,
                       100: 232_448, 103: 232_448, 120: 101_376}


@triton.jit
def _fwd_local_tiles(acc, m_i, l_i, q, k_ptrs, v_ptrs, sk_s, sv_s, q_pos, lo, hi, scale,
                     MASKED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_S: tl.constexpr):
    """Online softmax over local key tiles [lo, hi). Unmasked tiles are whole and visible to every
    row of the block; masked tiles apply causality and the end of the range."""
    for s0 in range(lo, hi, BLOCK_S):
        ks = s0 + tl.arange(0, BLOCK_S)
        if MASKED:
            k_ok = ks < hi
            k = tl.load(k_ptrs + s0 * sk_s, mask=k_ok[:, None], other=0.0)        # [BS, D]
            v = tl.load(v_ptrs + s0 * sv_s, mask=k_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs + s0 * sk_s)
            v = tl.load(v_ptrs + s0 * sv_s)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale              # [R, BS] fp32
        if MASKED:
            s = tl.where((ks[None, :] <= q_pos[:, None]) & k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)                     # rows seeing nothing yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _knn_attention_fwd_kernel(
    Q, QM, KL, VL, KM, VM, KSC, VSC, IDS, BIAS, O, LSE,
    sq_b: tl.int64, sq_h: tl.int64, sq_t: tl.int64, sqm_b: tl.int64, sqm_h: tl.int64, sqm_t: tl.int64,
    sk_b: tl.int64, sk_h: tl.int64, sk_s: tl.int64, sv_b: tl.int64, sv_h: tl.int64, sv_s: tl.int64,
    skm_b: tl.int64, skm_h: tl.int64, skm_m: tl.int64, svm_b: tl.int64, svm_h: tl.int64, svm_m: tl.int64,
    sks_b: tl.int64, sks_h: tl.int64, svs_b: tl.int64, svs_h: tl.int64,
    sid_b: tl.int64, sid_h: tl.int64, sid_t: tl.int64,
    so_sp: tl.int64, so_b: tl.int64, so_h: tl.int64, so_t: tl.int64,
    sl_sp: tl.int64, sl_b: tl.int64, sl_h: tl.int64,
    T, S, K, G, HKV, ID_GROUP, scale, S_PER_SPLIT, K_PER_SPLIT,
    HAS_MEMORY: tl.constexpr, HAS_BIAS: tl.constexpr, MEM_INT8: tl.constexpr, SEPARATE_QM: tl.constexpr,
    D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One (row block, sequence x kv head, split): out/lse of that split's keys and slots."""
    pid_r, pid_bh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (pid_bh // HKV).to(tl.int64)              # 64-bit: head * stride can pass 2^31
    hk = (pid_bh % HKV).to(tl.int64)
    n_rows = G * T
    r0 = pid_r * BLOCK_R
    rows = r0 + tl.arange(0, BLOCK_R)                               # [R] token-major rows of the group
    row_ok = rows < n_rows
    t = rows // G
    hq = hk * G + rows % G                                          # query head of each row
    d = tl.arange(0, D)

    q = tl.load(Q + b * sq_b + hq[:, None] * sq_h + t[:, None] * sq_t + d[None, :],
                mask=row_ok[:, None], other=0.0)                   # [R, D] native dtype for tl.dot
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)

    # ---- local keys of this split, causal (queries are the last T of S). Keys past the block's
    # last token are skipped; keys before its first token's position need no mask.
    s_lo = split * S_PER_SPLIT
    s_hi = tl.minimum(s_lo + S_PER_SPLIT, S)
    t_first = r0 // G
    t_last = (tl.minimum(r0 + BLOCK_R, n_rows) - 1) // G
    s_end = tl.minimum(s_hi, S - T + t_last + 1)
    s_full = tl.minimum(s_end, S - T + t_first + 1)
    s_mid = s_lo + tl.maximum(s_full - s_lo, 0) // BLOCK_S * BLOCK_S
    q_pos = t + (S - T)                                             # [R]
    s_rel = tl.arange(0, BLOCK_S)
    k_ptrs = KL + b * sk_b + hk * sk_h + s_rel[:, None] * sk_s + d[None, :]   # [BS, D] at key 0
    v_ptrs = VL + b * sv_b + hk * sv_h + s_rel[:, None] * sv_s + d[None, :]
    acc, m_i, l_i = _fwd_local_tiles(acc, m_i, l_i, q, k_ptrs, v_ptrs, sk_s, sv_s, q_pos, s_lo, s_mid,
                                     scale, False, PRECISION, BLOCK_S)
    acc, m_i, l_i = _fwd_local_tiles(acc, m_i, l_i, q, k_ptrs, v_ptrs, sk_s, sv_s, q_pos, s_mid, s_end,
                                     scale, True, PRECISION, BLOCK_S)

    # ---- retrieved memory rows of this split: one slot per step, one memory row per query row
    if HAS_MEMORY:
        if SEPARATE_QM:
            qm = tl.load(QM + b * sqm_b + hq[:, None] * sqm_h + t[:, None] * sqm_t + d[None, :],
                         mask=row_ok[:, None], other=0.0).to(tl.float32)
        else:
            qm = q.to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(BIAS + hq, mask=row_ok, other=0.0).to(tl.float32)     # [R] memory gate
        else:
            bias = tl.zeros([BLOCK_R], tl.float32)
        id_ptrs = IDS + b * sid_b + (hq // ID_GROUP) * sid_h + t * sid_t        # [R] at slot 0
        km_base = KM + b * skm_b + hk * skm_h
        vm_base = VM + b * svm_b + hk * svm_h
        k_lo = split * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        for j in range(k_lo, k_hi):
            ids = tl.load(id_ptrs + j, mask=row_ok, other=-1)
            ok = ids >= 0
            rid = tl.where(ok, ids, 0).to(tl.int64)
            km = tl.load(km_base + rid[:, None] * skm_m + d[None, :], mask=ok[:, None], other=0.0)
            s = tl.sum(qm * km.to(tl.float32), axis=1)                             # [R]
            # the value row is loaded once the key row is consumed (prefetching the next slot's ids
            # or loading both rows up front spills 128 B at head_dim 128 on sm_90)
            vm = tl.load(vm_base + rid[:, None] * svm_m + d[None, :], mask=ok[:, None], other=0.0)
            if MEM_INT8:
                s = s * tl.load(KSC + b * sks_b + hk * sks_h + rid, mask=ok, other=0.0)
            s = tl.where(ok, s * scale + bias, float("-inf"))
            m_new = tl.maximum(m_i, s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe)
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + p
            if MEM_INT8:
                p = p * tl.load(VSC + b * svs_b + hk * svs_h + rid, mask=ok, other=0.0)
            acc = acc * alpha[:, None] + p[:, None] * vm.to(tl.float32)
            m_i = m_new

    # ---- this split's normalised output and log-sum-exp (splits merged by _merge_splits_kernel)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(O + split.to(tl.int64) * so_sp + b * so_b + hq[:, None] * so_h + t[:, None] * so_t + d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + split.to(tl.int64) * sl_sp + b * sl_b + hq * sl_h + t, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(OP, LP, O, LSE, n_rows, SPLITS, so_sp: tl.int64, sl_sp: tl.int64,
                         D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_SP: tl.constexpr):
    """Merge per-split partial outputs [SPLITS, rows, D] and lse [SPLITS, rows] by log-sum-exp."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    sp = tl.arange(0, BLOCK_SP)
    d = tl.arange(0, D)
    lse = tl.load(LP + sp[:, None] * sl_sp + rows[None, :], mask=(sp[:, None] < SPLITS) & row_ok[None, :],
                  other=float("-inf"))                                          # [SP, R]
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe[None, :])                                           # 0 for empty splits
    total = tl.sum(w, axis=0)
    empty = total == 0.0
    w = w / tl.where(empty, 1.0, total)[None, :]
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    for i in range(0, SPLITS):
        wi = tl.sum(tl.where(sp[:, None] == i, w, 0.0), axis=0)                 # [R]
        o = tl.load(OP + i * so_sp + rows[:, None] * D + d[None, :], mask=row_ok[:, None] & (wi[:, None] > 0),
                    other=0.0)
        acc += wi[:, None] * o
    tl.store(O + rows[:, None] * D + d[None, :], acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + rows, tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, total))), mask=row_ok)


@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, n_rows, T,
                           so_b: tl.int64, so_h: tl.int64, so_t: tl.int64,
                           sdo_b: tl.int64, sdo_h: tl.int64, sdo_t: tl.int64, HQ,
                           D: tl.constexpr, BLOCK_R: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, rows of [B, Hq, T] flattened (delta is contiguous)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    t = rows % T
    bh = (rows // T).to(tl.int64)
    b = bh // HQ
    h = bh % HQ
    d = tl.arange(0, D)
    o = tl.load(O + b[:, None] * so_b + h[:, None] * so_h + t[:, None] * so_t + d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b[:, None] * sdo_b + h[:, None] * sdo_h + t[:, None] * sdo_t + d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, axis=1), mask=row_ok)


@triton.jit
def _bwd_dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, do_base, l_base,
                    sq_h, sq_t, sdo_h, sdo_t, sl_h, hk, G, n_rows, S_MINUS_T, ks, lo, hi, d, scale,
                    MASKED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """Accumulate dK/dV [BS, D] of one key block over query row blocks [lo, hi) (token-major rows).
    Products are key-major: s^T = k q^T, so dK and dV stay in the program's registers."""
    for r0 in range(lo, hi, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        t = rows // G
        hq = hk * G + rows % G
        q = tl.load(q_base + hq[:, None] * sq_h + t[:, None] * sq_t + d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + hq[:, None] * sdo_h + t[:, None] * sdo_t + d[None, :], mask=row_ok[:, None],
                     other=0.0)
        # padded rows get lse = +inf, so their probabilities are 0
        lse = tl.load(LSE + l_base + hq * sl_h + t, mask=row_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        delta = tl.load(DELTA + l_base + hq * sl_h + t, mask=row_ok, other=0.0)
        p_t = tl.exp(tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale - lse[None, :])   # [BS, R]
        if MASKED:
            p_t = tl.where(ks[:, None] <= (t + S_MINUS_T)[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)                         # [BS, R]
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, KL, VL, DO, LSE, DELTA, DKL, DVL,
    sq_b: tl.int64, sq_h: tl.int64, sq_t: tl.int64, sk_b: tl.int64, sk_h: tl.int64, sk_s: tl.int64,
    sv_b: tl.int64, sv_h: tl.int64, sv_s: tl.int64, sdo_b: tl.int64, sdo_h: tl.int64, sdo_t: tl.int64,
    sl_b: tl.int64, sl_h: tl.int64, sdk_b: tl.int64, sdk_h: tl.int64, sdk_s: tl.int64,
    sdv_b: tl.int64, sdv_h: tl.int64, sdv_s: tl.int64,
    T, S, G, HKV, scale,
    D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One (local key block, sequence x kv head): dK, dV over the G*T rows that can see it."""
    pid_s, pid_bh = tl.program_id(0), tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)              # 64-bit: head * stride can pass 2^31
    hk = (pid_bh % HKV).to(tl.int64)
    n_rows = G * T
    s0 = pid_s * BLOCK_S
    ks = s0 + tl.arange(0, BLOCK_S)
    k_ok = ks < S
    d = tl.arange(0, D)
    k = tl.load(KL + b * sk_b + hk * sk_h + ks[:, None] * sk_s + d[None, :], mask=k_ok[:, None], other=0.0)
    v = tl.load(VL + b * sv_b + hk * sv_h + ks[:, None] * sv_s + d[None, :], mask=k_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_S, D], tl.float32)
    dv = tl.zeros([BLOCK_S, D], tl.float32)
    # rows of tokens before s0 - (S - T) cannot see this block; from the token at the block's last
    # key on, every row sees all of it (mask-free row blocks)
    r_lo = tl.maximum(s0 - (S - T), 0) * G // BLOCK_R * BLOCK_R
    r_full = tl.minimum(tl.maximum(s0 + BLOCK_S - 1 - (S - T), 0) * G, n_rows)
    r_mid = tl.minimum(r_lo + tl.cdiv(tl.maximum(r_full - r_lo, 0), BLOCK_R) * BLOCK_R, n_rows)
    q_base = Q + b * sq_b
    do_base = DO + b * sdo_b
    l_base = b * sl_b
    dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, do_base, l_base,
                             sq_h, sq_t, sdo_h, sdo_t, sl_h, hk, G, n_rows, S - T, ks, r_lo, r_mid, d, scale,
                             True, PRECISION, BLOCK_R)
    dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, do_base, l_base,
                             sq_h, sq_t, sdo_h, sdo_t, sl_h, hk, G, n_rows, S - T, ks, r_mid, n_rows, d, scale,
                             False, PRECISION, BLOCK_R)
    tl.store(DKL + b * sdk_b + hk * sdk_h + ks[:, None] * sdk_s + d[None, :], (dk * scale).to(DKL.dtype.element_ty),
             mask=k_ok[:, None])
    tl.store(DVL + b * sdv_b + hk * sdv_h + ks[:, None] * sdv_s + d[None, :], dv.to(DVL.dtype.element_ty),
             mask=k_ok[:, None])


@triton.jit
def _bwd_dq_local_tiles(dq, q, do, lse, delta, k_ptrs, v_ptrs, sk_s, sv_s, q_pos, lo, hi, scale,
                        MASKED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_S: tl.constexpr):
    for s0 in range(lo, hi, BLOCK_S):
        ks = s0 + tl.arange(0, BLOCK_S)
        if MASKED:
            k_ok = ks < hi
            k = tl.load(k_ptrs + s0 * sk_s, mask=k_ok[:, None], other=0.0)
            v = tl.load(v_ptrs + s0 * sv_s, mask=k_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs + s0 * sk_s)
            v = tl.load(v_ptrs + s0 * sv_s)
        p = tl.exp(tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale - lse[:, None])   # [R, BS]
        if MASKED:
            p = tl.where((ks[None, :] <= q_pos[:, None]) & k_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, QM, KL, VL, KM, VM, IDS, BIAS, DO, LSE, DELTA, DQ, DQM, DS, P, DBIAS,
    sq_b: tl.int64, sq_h: tl.int64, sq_t: tl.int64, sqm_b: tl.int64, sqm_h: tl.int64, sqm_t: tl.int64,
    sk_b: tl.int64, sk_h: tl.int64, sk_s: tl.int64, sv_b: tl.int64, sv_h: tl.int64, sv_s: tl.int64,
    skm_b: tl.int64, skm_h: tl.int64, skm_m: tl.int64, svm_b: tl.int64, svm_h: tl.int64, svm_m: tl.int64,
    sid_b: tl.int64, sid_h: tl.int64, sid_t: tl.int64, sdo_b: tl.int64, sdo_h: tl.int64, sdo_t: tl.int64,
    sl_b: tl.int64, sl_h: tl.int64, sdq_b: tl.int64, sdq_h: tl.int64, sdq_t: tl.int64,
    sdqm_b: tl.int64, sdqm_h: tl.int64, sdqm_t: tl.int64, sds_b: tl.int64, sds_h: tl.int64, sds_t: tl.int64,
    T, S, K, G, HKV, ID_GROUP, scale,
    HAS_MEMORY: tl.constexpr, HAS_BIAS: tl.constexpr, MEM_GRAD: tl.constexpr, SEPARATE_QM: tl.constexpr,
    D: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One (row block, sequence x kv head): dQ over the local keys; with memory, dQ_mem (added to
    dQ when q_mem is q), the gate's gradient and, with MEM_GRAD, each slot's dS and P [B, Hq, T, K]
    for `_bwd_mem_scatter_kernel` (kept out of this loop, whose registers are already full)."""
    pid_r, pid_bh = tl.program_id(0), tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)              # 64-bit: head * stride can pass 2^31
    hk = (pid_bh % HKV).to(tl.int64)
    n_rows = G * T
    r0 = pid_r * BLOCK_R
    rows = r0 + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    t = rows // G
    hq = hk * G + rows % G
    d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + hq[:, None] * sq_h + t[:, None] * sq_t + d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdo_b + hq[:, None] * sdo_h + t[:, None] * sdo_t + d[None, :], mask=row_ok[:, None],
                 other=0.0)
    lse = tl.load(LSE + b * sl_b + hq * sl_h + t, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(DELTA + b * sl_b + hq * sl_h + t, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_R, D], tl.float32)

    t_first = r0 // G
    t_last = (tl.minimum(r0 + BLOCK_R, n_rows) - 1) // G
    s_end = tl.minimum(S, S - T + t_last + 1)
    s_mid = tl.minimum(s_end, S - T + t_first + 1) // BLOCK_S * BLOCK_S
    q_pos = t + (S - T)
    s_rel = tl.arange(0, BLOCK_S)
    k_ptrs = KL + b * sk_b + hk * sk_h + s_rel[:, None] * sk_s + d[None, :]
    v_ptrs = VL + b * sv_b + hk * sv_h + s_rel[:, None] * sv_s + d[None, :]
    dq = _bwd_dq_local_tiles(dq, q, do, lse, delta, k_ptrs, v_ptrs, sk_s, sv_s, q_pos, 0, s_mid, scale,
                             False, PRECISION, BLOCK_S)
    dq = _bwd_dq_local_tiles(dq, q, do, lse, delta, k_ptrs, v_ptrs, sk_s, sv_s, q_pos, s_mid, s_end, scale,
                             True, PRECISION, BLOCK_S)
    qoff = hq[:, None] * sdq_h + t[:, None] * sdq_t + d[None, :]

    if HAS_MEMORY:
        if SEPARATE_QM:
            qm = tl.load(QM + b * sqm_b + hq[:, None] * sqm_h + t[:, None] * sqm_t + d[None, :],
                         mask=row_ok[:, None], other=0.0).to(tl.float32)
            dqm = tl.zeros([BLOCK_R, D], tl.float32)
        else:
            qm = q.to(tl.float32)
            dqm = dq                                    # q is the memory query: one accumulator
        if HAS_BIAS:
            bias = tl.load(BIAS + hq, mask=row_ok, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros([BLOCK_R], tl.float32)
        dbias = tl.zeros([BLOCK_R], tl.float32)
        do32 = do.to(tl.float32)
        id_ptrs = IDS + b * sid_b + (hq // ID_GROUP) * sid_h + t * sid_t
        ds_off = b * sds_b + hq * sds_h + t * sds_t                                      # [R] at slot 0
        km_base = KM + b * skm_b + hk * skm_h
        vm_base = VM + b * svm_b + hk * svm_h
        for j in range(0, K):
            ids = tl.load(id_ptrs + j, mask=row_ok, other=-1)
            ok = ids >= 0
            rid = tl.where(ok, ids, 0).to(tl.int64)
            km = tl.load(km_base + rid[:, None] * skm_m + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            vm = tl.load(vm_base + rid[:, None] * svm_m + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            s = tl.sum(qm * km, axis=1) * scale + bias
            p = tl.where(ok, tl.exp(s - lse), 0.0)                                       # [R]
            ds = p * (tl.sum(do32 * vm, axis=1) - delta)
            dqm += ds[:, None] * km
            dbias += ds
            if MEM_GRAD:
                tl.store(DS + ds_off + j, ds, mask=row_ok)
                tl.store(P + ds_off + j, p, mask=row_ok)
        if HAS_BIAS:
            tl.atomic_add(DBIAS + hq, dbias, mask=row_ok, sem="relaxed")
        if SEPARATE_QM:
            tl.store(DQM + b * sdqm_b + hq[:, None] * sdqm_h + t[:, None] * sdqm_t + d[None, :],
                     (dqm * scale).to(DQM.dtype.element_ty), mask=row_ok[:, None])
        else:
            dq = dqm
    tl.store(DQ + b * sdq_b + qoff, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _bwd_mem_scatter_kernel(
    QM, DO, IDS, DS, P, DKM, DVM,
    sqm_b: tl.int64, sqm_h: tl.int64, sqm_t: tl.int64, sdo_b: tl.int64, sdo_h: tl.int64, sdo_t: tl.int64,
    sid_b: tl.int64, sid_h: tl.int64, sid_t: tl.int64, sds_b: tl.int64, sds_h: tl.int64, sds_t: tl.int64,
    sdkm_b: tl.int64, sdkm_h: tl.int64, sdkm_m: tl.int64, sdvm_b: tl.int64, sdvm_h: tl.int64, sdvm_m: tl.int64,
    T, K, G, HKV, ID_GROUP, scale,
    D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dK_mem[id] += scale * dS * q_mem and dV_mem[id] += P * dO for every (row, slot) of one row
    block. Rows of different queries may hit the same memory row, hence atomics; their order does
    not matter, so they are relaxed (no fences)."""
    pid_r, pid_bh = tl.program_id(0), tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)              # 64-bit: head * stride can pass 2^31
    hk = (pid_bh % HKV).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < G * T
    t = rows // G
    hq = hk * G + rows % G
    d = tl.arange(0, D)
    qm = tl.load(QM + b * sqm_b + hq[:, None] * sqm_h + t[:, None] * sqm_t + d[None, :], mask=row_ok[:, None],
                 other=0.0).to(tl.float32) * scale
    do = tl.load(DO + b * sdo_b + hq[:, None] * sdo_h + t[:, None] * sdo_t + d[None, :], mask=row_ok[:, None],
                 other=0.0).to(tl.float32)
    id_ptrs = IDS + b * sid_b + (hq // ID_GROUP) * sid_h + t * sid_t
    ds_off = b * sds_b + hq * sds_h + t * sds_t
    dkm_base = DKM + b * sdkm_b + hk * sdkm_h
    dvm_base = DVM + b * sdvm_b + hk * sdvm_h
    for j in range(0, K):
        ids = tl.load(id_ptrs + j, mask=row_ok, other=-1)
        ok = ids >= 0
        rid = tl.where(ok, ids, 0).to(tl.int64)
        ds = tl.load(DS + ds_off + j, mask=ok, other=0.0)
        p = tl.load(P + ds_off + j, mask=ok, other=0.0)
        tl.atomic_add(dkm_base + rid[:, None] * sdkm_m + d[None, :], ds[:, None] * qm, mask=ok[:, None],
                      sem="relaxed")
        tl.atomic_add(dvm_base + rid[:, None] * sdvm_m + d[None, :], p[:, None] * do, mask=ok[:, None],
                      sem="relaxed")


# ------------------------------------------------------------------------------------------------
# configurations


def _precision(dtype: torch.dtype) -> str:
    """fp16/bf16 products run on tensor cores as they are. fp32 inputs use three TF32 products
    (split-precision, error close to fp32's) instead of exact FMA products ("ieee"), whose
    [R, D] x [D, BS] loops on the CUDA cores spill (7.6 KB stack frame on sm_80 at head_dim 64)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _big_shared(arch: int) -> bool:
    return SHARED_MEMORY_LIMIT.get(arch, 101_376) >= 160_000


# Options every launch compiles with. FMA contraction stays on explicitly: Triton 3.9 warns that its
# default flips to off in 3.10, which would change the kernels' rounding, registers and speed.
COMPILE_OPTIONS = dict(enable_fp_fusion=True)


def fwd_config(D: int, dtype: torch.dtype, rows: int, arch: int, int8: bool = False) -> dict:
    """Block sizes, warps and pipeline depth of the forward for one (head_dim, dtype, G*T, target).

    Rows of a decode step (G*T < 64) fill one 16-row tile, the smallest tensor-core product. The
    per-slot memory loop keeps four [R, D] fp32 tiles live (q_mem, a memory row, its value, the
    accumulator), so head_dim 128 runs on 8 warps to halve the registers per thread. fp32 inputs
    (3xTF32: every operand held as two TF32 halves) take half-size tiles; 64-row fp32 tiles spill
    on sm_80 whatever the warps and stages. int8 memory rows at head_dim 128 (the dequantising
    loads) take 32-row blocks on 4 warps: 64 rows on 8 warps spill 8 B on sm_90.
    """
    small = rows < 64
    if dtype == torch.float32:
        # decode at head_dim <= 64 on 32-key tiles compiles to 128 registers and spills 8-16 B
        return dict(BLOCK_R=16 if small else 32, BLOCK_S=64 if (small and D <= 64) else 32,
                    num_warps=8 if D == 128 else 4, num_stages=3 if (D <= 64 and not small) else 2)
    block_r = 16 if small else (32 if (int8 and D == 128) else 64)
    return dict(BLOCK_R=block_r, BLOCK_S=64, num_warps=8 if (D == 128 and block_r == 64) else 4,
                num_stages=3 if _big_shared(arch) else 2)


def bwd_config(D: int, dtype: torch.dtype, rows: int, arch: int) -> tuple[dict, dict]:
    """(dK/dV kernel, dQ kernel) configurations of the backward.

    dK and dV stay in registers for the whole row loop (two [BS, D] fp32 tiles), and the dQ
    kernel's memory loop keeps ~6 [R, D] fp32 tiles live (dQ, q_mem, dO, a memory row, its value,
    dQ_mem): 8 warps at head_dim 128, 32 dQ rows at head_dim 128. fp32 (3xTF32) needs 16 dQ rows,
    and at head_dim 128 16-key dK/dV blocks, not to spill."""
    half = dtype != torch.float32
    warps = 8 if D == 128 else 4
    small = rows < 64                                # decoding: one 16-row tile
    if half:
        dkdv = dict(BLOCK_S=64, BLOCK_R=16 if small else 32)
        dq_rows = 16 if small else (32 if D == 128 else 64)
    else:
        dkdv = dict(BLOCK_S=16 if D == 128 else 32, BLOCK_R=16 if small else 32)
        dq_rows = 16
    return (dict(dkdv, num_warps=warps, num_stages=2),
            dict(BLOCK_R=dq_rows, BLOCK_S=32, num_warps=8, num_stages=2))


def _arch(device: torch.device) -> int:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major * 10 + minor
    return 80                                       # interpreter: any target's blocks are valid


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _splits(row_blocks: int, bh: int, S: int, K: int, block_s: int, n_sm: int) -> int:
    """Programs per row block over the keys: enough to give every SM two programs when the row
    blocks alone fill fewer than half the SMs (decoding), but no fewer than one local key tile or 8 memory slots each."""
    programs = row_blocks * bh
    if 2 * programs >= n_sm:                                        # prefill: rows fill the GPU
        return 1
    work = max(triton.cdiv(S, block_s), triton.cdiv(K, 8))          # local tiles, or 8 slots each
    return max(1, min(triton.cdiv(2 * n_sm, programs), work, 64))


# ------------------------------------------------------------------------------------------------
# launchers


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Kernels take every stride but need the last one to be 1 (vectorised row loads); anything
    else is copied, which the memory bank (read in place) never needs."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _fwd_launch(q, k_local, v_local, k_mem=None, v_mem=None, mem_ids=None, *, q_mem=None, scale=None,
                mem_bias=None, k_scale=None, v_scale=None, splits=None, arch=None, n_sm=None):
    """Everything a forward launch needs: (grid, args, meta, finish) with finish() -> (out, lse).
    Split out of `knn_attention_triton` so that the ahead-of-time compile test builds exactly the
    launches the library makes."""
    B, Hq, T, D = q.shape
    Hkv, S = k_local.shape[1], k_local.shape[2]
    G = Hq // Hkv
    if D not in (16, 32, 64, 128) or Hq % Hkv:
        raise ValueError(f"knn_attention_triton: head_dim {D} (need 16/32/64/128), heads {Hq}/{Hkv}")
    scale = D ** -0.5 if scale is None else float(scale)
    dev = q.device
    arch = _arch(dev) if arch is None else arch
    has_mem = (k_mem is not None and v_mem is not None and mem_ids is not None and k_mem.shape[2] > 0
               and mem_ids.shape[-1] > 0)
    q, k_local, v_local = (_last_dim_contiguous(x) for x in (q, k_local, v_local))
    int8 = has_mem and k_mem.dtype == torch.int8
    if int8 and (k_scale is None or v_scale is None):
        raise ValueError("int8 memory needs k_scale and v_scale [B, Hkv, M]")
    if has_mem:
        k_mem, v_mem, mem_ids = (_last_dim_contiguous(x) for x in (k_mem, v_mem, mem_ids))
        if mem_ids.shape[1] not in (Hq, Hkv):
            raise ValueError(f"mem_ids has {mem_ids.shape[1]} heads, need {Hq} or {Hkv}")
        K = mem_ids.shape[-1]
        id_group = G if mem_ids.shape[1] != Hq else 1
    else:                                          # never read: HAS_MEMORY=False compiles the loop out
        k_mem = v_mem = k_local
        mem_ids = q
        K, id_group = 0, 1
    qm = q if q_mem is None else _last_dim_contiguous(q_mem)
    ksc = k_scale if int8 else q.new_empty(1, 1, 1, dtype=torch.float32)
    vsc = v_scale if int8 else ksc
    cfg = fwd_config(D, q.dtype, G * T, arch, int8)
    BLOCK_R, BLOCK_S = cfg["BLOCK_R"], cfg["BLOCK_S"]
    row_blocks = triton.cdiv(G * T, BLOCK_R)
    if splits is None:
        splits = _splits(row_blocks, B * Hkv, S, K, BLOCK_S, _sm_count(dev) if n_sm is None else n_sm)
    # local keys per split in whole tiles (aligned, mask-free loads); memory slots spread evenly
    s_per = triton.cdiv(triton.cdiv(S, splits), BLOCK_S) * BLOCK_S
    k_per = triton.cdiv(K, splits) if K else 0
    if splits == 1:                                # written in q's dtype, no merge
        out = torch.empty(1, B, Hq, T, D, device=dev, dtype=q.dtype)
    else:
        out = torch.empty(splits, B, Hq, T, D, device=dev, dtype=torch.float32)
    lse = torch.empty(splits, B, Hq, T, device=dev, dtype=torch.float32)
    bias = mem_bias if mem_bias is not None else ksc
    grid = (row_blocks, B * Hkv, splits)
    args = (q, qm, k_local, v_local, k_mem, v_mem, ksc, vsc, mem_ids, bias, out, lse,
            *q.stride()[:3], *qm.stride()[:3], *k_local.stride()[:3], *v_local.stride()[:3],
            *k_mem.stride()[:3], *v_mem.stride()[:3], *ksc.stride()[:2], *vsc.stride()[:2],
            *mem_ids.stride()[:3], *out.stride()[:4], *lse.stride()[:3],
            T, S, K, G, Hkv, id_group, scale, s_per, k_per)
    meta = dict(HAS_MEMORY=has_mem, HAS_BIAS=has_mem and mem_bias is not None, MEM_INT8=int8,
                SEPARATE_QM=has_mem and q_mem is not None, D=D, PRECISION=_precision(q.dtype), **cfg,
                **COMPILE_OPTIONS)

    def finish():
        if splits == 1:
            return out[0], lse[0]
        o, l_ = torch.empty(B, Hq, T, D, device=dev, dtype=q.dtype), torch.empty(B, Hq, T, device=dev)
        m_grid, m_args, m_meta = _merge_launch(out, lse, o, l_)
        _merge_splits_kernel[m_grid](*m_args, **m_meta)
        return o, l_

    return grid, args, meta, finish


def _merge_launch(parts, lse_parts, out, lse):
    """(grid, args, meta) of the merge of split partials: parts [splits, B, Hq, T, D] fp32,
    lse_parts [splits, B, Hq, T] -> out [B, Hq, T, D], lse [B, Hq, T]."""
    splits, D, n = parts.shape[0], parts.shape[-1], out[..., 0].numel()
    return ((triton.cdiv(n, 16),), (parts, lse_parts, out, lse, n, splits, parts.stride(0), lse_parts.stride(0)),
            dict(D=D, BLOCK_R=16, BLOCK_SP=triton.next_power_of_2(splits), **COMPILE_OPTIONS))


def knn_attention_triton(q, k_local, v_local, k_mem=None, v_mem=None, mem_ids=None, *, q_mem=None,
                         scale=None, mem_bias=None, k_scale=None, v_scale=None, splits=None):
    """Fused forward of kNN attention (causal local window, no padding mask).

    q [B, Hq, T, D]; k_local, v_local [B, Hkv, S, D] with S >= T (queries are the last T);
    k_mem, v_mem [B, Hkv, M, D] (fp32/fp16/bf16, or int8 with k_scale/v_scale [B, Hkv, M]), read in
    place (any strides with the last one 1); mem_ids [B, Hq, T, K] or [B, Hkv, T, K] int (-1 = none);
    q_mem [B, Hq, T, D] (default q); mem_bias [Hq].
    splits: programs per row block over the keys (None: 1 when the row blocks fill the GPU,
    more for decoding).
    returns (out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] float32)
    """
    grid, args, meta, finish = _fwd_launch(q, k_local, v_local, k_mem, v_mem, mem_ids, q_mem=q_mem, scale=scale,
                                           mem_bias=mem_bias, k_scale=k_scale, v_scale=v_scale, splits=splits)
    _knn_attention_fwd_kernel[grid](*args, **meta)
    return finish()


def _bwd_launches(q, k_local, v_local, k_mem, v_mem, mem_ids, q_mem, mem_bias, out, lse, d_out, scale,
                  mem_grad, arch=None):
    """The backward's launches [(kernel, grid, args, meta)] and its gradient tensors: rowsum(dO*O),
    dK/dV (key-major), dQ and the memory part (row-major), and with mem_grad the memory-row scatter.
    Nothing is copied or converted: dQ, dK, dV are written in their inputs' dtypes; dK_mem/dV_mem
    (fp32, the atomics' accumulator) and the per-slot dS/P exist only with mem_grad."""
    B, Hq, T, D = q.shape
    Hkv, S = k_local.shape[1], k_local.shape[2]
    G = Hq // Hkv
    dev = q.device
    arch = _arch(dev) if arch is None else arch
    scale = D ** -0.5 if scale is None else float(scale)
    has_mem = (k_mem is not None and v_mem is not None and mem_ids is not None and k_mem.shape[2] > 0
               and mem_ids.shape[-1] > 0)
    q, k_local, v_local, d_out = (_last_dim_contiguous(x) for x in (q, k_local, v_local, d_out))
    if has_mem:
        k_mem, v_mem, mem_ids = (_last_dim_contiguous(x) for x in (k_mem, v_mem, mem_ids))
        K = mem_ids.shape[-1]
        id_group = G if mem_ids.shape[1] != Hq else 1
    else:
        k_mem = v_mem = k_local
        mem_ids = q
        K, id_group = 0, 1
    mem_grad = bool(mem_grad) and has_mem
    qm = q if q_mem is None else _last_dim_contiguous(q_mem)
    delta = torch.empty(B, Hq, T, device=dev, dtype=torch.float32)
    dq = torch.empty_like(q)
    dqm = torch.empty_like(qm) if (q_mem is not None and has_mem) else dq
    dkl, dvl = torch.empty_like(k_local), torch.empty_like(v_local)
    if mem_grad:
        dkm = torch.zeros(k_mem.shape, device=dev, dtype=torch.float32)
        dvm = torch.zeros(v_mem.shape, device=dev, dtype=torch.float32)
        ds = torch.empty(B, Hq, T, K, device=dev, dtype=torch.float32)          # per-slot dS and P
        p = torch.empty_like(ds)
    else:                                          # never written: MEM_GRAD=False
        dkm = dvm = ds = p = dq
    dbias = torch.zeros(Hq, device=dev, dtype=torch.float32)
    bias = mem_bias if mem_bias is not None else dbias
    lse = lse.contiguous()
    prec = _precision(q.dtype)
    c_kv, c_q = bwd_config(D, q.dtype, G * T, arch)
    n = B * Hq * T
    launches = [
        (_bwd_preprocess_kernel, (triton.cdiv(n, 64),),
         (out, d_out, delta, n, T, *out.stride()[:3], *d_out.stride()[:3], Hq), dict(D=D, BLOCK_R=64, **COMPILE_OPTIONS)),
        (_bwd_dkdv_kernel, (triton.cdiv(S, c_kv["BLOCK_S"]), B * Hkv),
         (q, k_local, v_local, d_out, lse, delta, dkl, dvl,
          *q.stride()[:3], *k_local.stride()[:3], *v_local.stride()[:3], *d_out.stride()[:3], *lse.stride()[:2],
          *dkl.stride()[:3], *dvl.stride()[:3], T, S, G, Hkv, scale),
         dict(D=D, PRECISION=prec, **c_kv, **COMPILE_OPTIONS)),
        (_bwd_dq_kernel, (triton.cdiv(G * T, c_q["BLOCK_R"]), B * Hkv),
         (q, qm, k_local, v_local, k_mem, v_mem, mem_ids, bias, d_out, lse, delta, dq, dqm, ds, p, dbias,
          *q.stride()[:3], *qm.stride()[:3], *k_local.stride()[:3], *v_local.stride()[:3],
          *k_mem.stride()[:3], *v_mem.stride()[:3], *mem_ids.stride()[:3], *d_out.stride()[:3], *lse.stride()[:2],
          *dq.stride()[:3], *dqm.stride()[:3], *ds.stride()[:3], T, S, K, G, Hkv, id_group, scale),
         dict(HAS_MEMORY=has_mem, HAS_BIAS=has_mem and mem_bias is not None, MEM_GRAD=mem_grad,
              SEPARATE_QM=has_mem and q_mem is not None, D=D, PRECISION=prec, **c_q, **COMPILE_OPTIONS)),
    ]
    if mem_grad:
        # 16 rows: each thread holds q_mem, dO and two atomic updates of [16, D] / 128 threads
        launches.append((_bwd_mem_scatter_kernel, (triton.cdiv(G * T, 16), B * Hkv),
                         (qm, d_out, mem_ids, ds, p, dkm, dvm, *qm.stride()[:3], *d_out.stride()[:3],
                          *mem_ids.stride()[:3], *ds.stride()[:3], *dkm.stride()[:3], *dvm.stride()[:3],
                          T, K, G, Hkv, id_group, scale),
                         dict(D=D, BLOCK_R=16, num_warps=4, **COMPILE_OPTIONS)))
    grads = dict(q=dq, q_mem=dqm if (q_mem is not None and has_mem) else None, k_local=dkl, v_local=dvl,
                 k_mem=dkm if mem_grad else None, v_mem=dvm if mem_grad else None,
                 mem_bias=dbias if (mem_bias is not None and has_mem) else None)
    return launches, grads


class KNNAttentionFunction(torch.autograd.Function):
    """Differentiable fused kNN attention: grads for q, q_mem, local k/v, the memory gate and,
    with mem_grad=True, the memory rows that were read (retrieval itself is not differentiable)."""

    @staticmethod
    def forward(ctx, q, k_local, v_local, k_mem, v_mem, mem_ids, q_mem, mem_bias, scale, mem_grad):
        out, lse = knn_attention_triton(q, k_local, v_local, k_mem, v_mem, mem_ids, q_mem=q_mem,
                                        scale=scale, mem_bias=mem_bias)
        ctx.save_for_backward(q, k_local, v_local, k_mem, v_mem, mem_ids, q_mem, mem_bias, out, lse)
        ctx.scale, ctx.mem_grad = scale, mem_grad
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, k_local, v_local, k_mem, v_mem, mem_ids, q_mem, mem_bias, out, lse = ctx.saved_tensors
        launches, g = _bwd_launches(q, k_local, v_local, k_mem, v_mem, mem_ids, q_mem, mem_bias, out, lse, d_out,
                                    ctx.scale, ctx.mem_grad)
        for kernel, grid, args, meta in launches:
            kernel[grid](*args, **meta)
        cast = lambda x, like: None if x is None else x.to(like.dtype)
        d_bias = None
        if mem_bias is not None:
            d_bias = g["mem_bias"].to(mem_bias.dtype) if g["mem_bias"] is not None else torch.zeros_like(mem_bias)
        d_qm = None
        if q_mem is not None:
            d_qm = g["q_mem"] if g["q_mem"] is not None else torch.zeros_like(q_mem)
        return (g["q"], g["k_local"], g["v_local"], cast(g["k_mem"], k_mem), cast(g["v_mem"], v_mem), None,
                d_qm, d_bias, None, None)
