"""Fused kNN attention in Triton: local causal tiles + retrieved memory rows in one online softmax.

One program owns a block of *rows* of one (sequence, kv head): the G query heads of a GQA group
are laid out as G*T rows (row r -> head g = r // T, token t = r % T), so every local key/value
tile is loaded once for the whole group. Memory rows are gathered by id inside the kernel (no
[B, Hq, T, K, D] copies), dequantised there when stored as int8 with per-row scales, and enter
the same running max / sum as the local keys. Work can be split over the keys (SPLIT programs per
row block, merged by log-sum-exp) so that decoding (T = 1) still fills the GPU.

Checked against `kernels.reference.knn_attention_reference` (tests run it under
TRITON_INTERPRET=1 on CPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _online_softmax_step(s, m_i, l_i):
    """Fold a block of logits s [R, N] (-inf = masked) into the running max m_i and sum l_i [R].
    Returns (p [R, N] = exp(s - new max), alpha [R] = rescale for the old accumulator, m, l);
    a row that has seen only -inf keeps max -inf and sum 0 without producing NaNs."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _knn_attention_fwd_kernel(
    Q, QM, KL, VL, KM, VM, KSC, VSC, IDS, BIAS, O, LSE,
    sq_b, sq_h, sq_t, sqm_b, sqm_h, sqm_t,
    skl_b, skl_h, skl_s, svl_b, svl_h, svl_s,
    skm_b, skm_h, skm_m, svm_b, svm_h, svm_m,
    ssc_b, ssc_h, sid_b, sid_h, sid_t,
    so_sp, so_b, so_h, so_t, sl_sp, sl_b, sl_h,
    T, S, K, G, HKV, scale, S_PER_SPLIT, K_PER_SPLIT,
    HAS_BIAS: tl.constexpr, MEM_INT8: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_r, pid_bh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)                  # [R] rows of the kv group
    row_ok = rows < G * T
    g = rows // T
    t = rows % T
    hq = hk * G + g                                                 # query head of each row
    d = tl.arange(0, D)

    q = tl.load(Q + b * sq_b + hq[:, None] * sq_h + t[:, None] * sq_t + d[None, :],
                mask=row_ok[:, None], other=0.0)                   # [R, D] native dtype for tl.dot
    qm = tl.load(QM + b * sqm_b + hq[:, None] * sqm_h + t[:, None] * sqm_t + d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)   # [R, D]
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)

    # ---- local keys of this split: causal, queries are the last T of S
    s_lo = split * S_PER_SPLIT
    s_hi = tl.minimum(s_lo + S_PER_SPLIT, S)
    q_pos = t + (S - T)                                             # [R]
    for s0 in range(s_lo, s_hi, BLOCK_S):
        ks = s0 + tl.arange(0, BLOCK_S)
        k_ok = ks < s_hi
        k = tl.load(KL + b * skl_b + hk * skl_h + ks[:, None] * skl_s + d[None, :],
                    mask=k_ok[:, None], other=0.0)                 # [BS, D]
        v = tl.load(VL + b * svl_b + hk * svl_h + ks[:, None] * svl_s + d[None, :],
                    mask=k_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale   # [R, BS] fp32 accumulate
        vis = (ks[None, :] <= q_pos[:, None]) & k_ok[None, :] & row_ok[:, None]
        p, alpha, m_i, l_i = _online_softmax_step(tl.where(vis, s, float("-inf")), m_i, l_i)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)

    # ---- retrieved memory rows of this split: gathered by id, one softmax with the local keys
    k_lo = split * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    if HAS_BIAS:
        bias = tl.load(BIAS + hq, mask=row_ok, other=0.0).to(tl.float32)   # [R] memory gate
    else:
        bias = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        slot_ok = (kk[None, :] < k_hi) & row_ok[:, None]            # [R, BK]
        ids = tl.load(IDS + b * sid_b + hq[:, None] * sid_h + t[:, None] * sid_t + kk[None, :],
                      mask=slot_ok, other=-1)
        ok = slot_ok & (ids >= 0)
        rid = tl.where(ok, ids, 0).to(tl.int32)                     # 32-bit row arithmetic
        km = tl.load(KM + b * skm_b + hk * skm_h + rid[:, :, None] * skm_m + d[None, None, :],
                     mask=ok[:, :, None], other=0.0).to(tl.float32)   # [R, BK, D]
        vm = tl.load(VM + b * svm_b + hk * svm_h + rid[:, :, None] * svm_m + d[None, None, :],
                     mask=ok[:, :, None], other=0.0).to(tl.float32)
        if MEM_INT8:
            ksc = tl.load(KSC + b * ssc_b + hk * ssc_h + rid, mask=ok, other=0.0).to(tl.float32)
            vsc = tl.load(VSC + b * ssc_b + hk * ssc_h + rid, mask=ok, other=0.0).to(tl.float32)
            km = km * ksc[:, :, None]
            vm = vm * vsc[:, :, None]
        s = tl.sum(qm[:, None, :] * km, axis=2) * scale + bias[:, None]    # [R, BK]
        p, alpha, m_i, l_i = _online_softmax_step(tl.where(ok, s, float("-inf")), m_i, l_i)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vm, axis=1)

    # ---- this split's normalised output and log-sum-exp (merged across splits outside)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(O + split * so_sp + b * so_b + hq[:, None] * so_h + t[:, None] * so_t + d[None, :], out,
             mask=row_ok[:, None])
    tl.store(LSE + split * sl_sp + b * sl_b + hq * sl_h + t, lse, mask=row_ok)


def _precision(x: torch.Tensor) -> str:
    """fp32 inputs get exact fp32 dots (no TF32 on GPUs); fp16/bf16 use the tensor cores as is."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _pow2(n: int, lo: int = 16, hi: int = 128) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def knn_attention_triton(q, k_local, v_local, k_mem=None, v_mem=None, mem_ids=None, *, q_mem=None,
                         scale=None, mem_bias=None, k_scale=None, v_scale=None, splits=None):
    """Fused forward of kNN attention (causal local window, no padding mask).

    q [B, Hq, T, D]; k_local, v_local [B, Hkv, S, D] with S >= T (queries are the last T);
    k_mem, v_mem [B, Hkv, M, D] (fp32/fp16/bf16, or int8 with k_scale/v_scale [B, Hkv, M]);
    mem_ids [B, Hq, T, K] int (-1 = none); q_mem [B, Hq, T, D] (default q); mem_bias [Hq].
    splits: programs per row block over the keys (None = 1 for prefill, more for decode).
    returns (out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] float32)
    """
    B, Hq, T, D = q.shape
    Hkv, S = k_local.shape[1], k_local.shape[2]
    G = Hq // Hkv
    if D not in (16, 32, 64, 128) or Hq % Hkv:
        raise ValueError(f"knn_attention_triton: head_dim {D} (need 16/32/64/128), heads {Hq}/{Hkv}")
    scale = D ** -0.5 if scale is None else float(scale)
    qm = q if q_mem is None else q_mem
    has_mem = k_mem is not None and mem_ids is not None and k_mem.shape[2] > 0 and mem_ids.shape[-1] > 0
    if not has_mem:                              # dummies the kernel never reads (K = 0)
        k_mem = v_mem = k_local[:, :, :1]
        mem_ids = torch.full((B, Hq, T, 1), -1, dtype=torch.int32, device=q.device)
        K = 0
    else:
        if mem_ids.shape[1] != Hq:
            mem_ids = mem_ids.repeat_interleave(Hq // mem_ids.shape[1], dim=1)
        K = mem_ids.shape[-1]
    int8 = k_mem.dtype == torch.int8
    if int8 and (k_scale is None or v_scale is None):
        raise ValueError("int8 memory needs k_scale and v_scale [B, Hkv, M]")
    q, qm, k_local, v_local = (x.contiguous() for x in (q, qm, k_local, v_local))
    k_mem, v_mem, mem_ids = k_mem.contiguous(), v_mem.contiguous(), mem_ids.contiguous()
    ksc = (k_scale if int8 else torch.empty(1, 1, 1, device=q.device)).contiguous()
    vsc = (v_scale if int8 else ksc).contiguous()
    if splits is None:
        splits = 1 if T * G >= 64 else max(1, min(16, (S + K) // 256))
    s_per = triton.cdiv(S, splits)
    k_per = triton.cdiv(K, splits) if K else 0
    out = torch.empty(splits, B, Hq, T, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(splits, B, Hq, T, device=q.device, dtype=torch.float32)
    BLOCK_R = _pow2(G * T, 16, 64)
    grid = (triton.cdiv(G * T, BLOCK_R), B * Hkv, splits)
    bias = mem_bias if mem_bias is not None else ksc
    _knn_attention_fwd_kernel[grid](
        q, qm, k_local, v_local, k_mem, v_mem, ksc, vsc, mem_ids, bias, out, lse,
        q.stride(0), q.stride(1), q.stride(2), qm.stride(0), qm.stride(1), qm.stride(2),
        k_local.stride(0), k_local.stride(1), k_local.stride(2),
        v_local.stride(0), v_local.stride(1), v_local.stride(2),
        k_mem.stride(0), k_mem.stride(1), k_mem.stride(2), v_mem.stride(0), v_mem.stride(1), v_mem.stride(2),
        ksc.stride(0) if int8 else 0, ksc.stride(1) if int8 else 0,
        mem_ids.stride(0), mem_ids.stride(1), mem_ids.stride(2),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3), lse.stride(0), lse.stride(1), lse.stride(2),
        T, S, K, G, Hkv, scale, s_per, k_per,
        HAS_BIAS=mem_bias is not None, MEM_INT8=int8, D=D, PRECISION=_precision(q),
        BLOCK_R=BLOCK_R, BLOCK_S=_pow2(S, 16, 64), BLOCK_K=_pow2(K, 16, 32),
    )
    if splits == 1:
        return out[0].to(q.dtype), lse[0]
    lse_all = torch.logsumexp(lse, dim=0)                                  # [B, Hq, T]
    w = torch.nan_to_num(torch.exp(lse - lse_all), nan=0.0)[..., None]     # [splits, B, Hq, T, 1]
    return (w * out).sum(0).to(q.dtype), lse_all


@triton.jit
def _knn_attention_bwd_kernel(
    Q, QM, KL, VL, KM, VM, IDS, BIAS, DO, LSE, DELTA,
    DQ, DQM, DKL, DVL, DKM, DVM, DBIAS,
    sq_b, sq_h, sq_t, skl_b, skl_h, skl_s, skm_b, skm_h, skm_m, sid_b, sid_h, sid_t, sl_b, sl_h,
    T, S, K, G, HKV, scale,
    HAS_BIAS: tl.constexpr, MEM_GRAD: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Rows as in the forward. dQ is owned by the program; dK/dV (local and, with MEM_GRAD,
    memory rows) and the gate's gradient are accumulated with atomics since several row blocks
    and query heads touch the same keys. All [B, H, T|S|M, D] tensors share strides by role."""
    pid_r, pid_bh = tl.program_id(0), tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < G * T
    g = rows // T
    t = rows % T
    hq = hk * G + g
    d = tl.arange(0, D)
    qoff = b * sq_b + hq[:, None] * sq_h + t[:, None] * sq_t + d[None, :]           # [R, D]
    q = tl.load(Q + qoff, mask=row_ok[:, None], other=0.0).to(tl.float32)
    qm = tl.load(QM + qoff, mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + qoff, mask=row_ok[:, None], other=0.0).to(tl.float32)
    lse = tl.load(LSE + b * sl_b + hq * sl_h + t, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(DELTA + b * sl_b + hq * sl_h + t, mask=row_ok, other=0.0)       # rowsum(dO * O)
    dq = tl.zeros([BLOCK_R, D], tl.float32)
    dqm = tl.zeros([BLOCK_R, D], tl.float32)

    q_pos = t + (S - T)
    for s0 in range(0, S, BLOCK_S):
        ks = s0 + tl.arange(0, BLOCK_S)
        k_ok = ks < S
        koff = b * skl_b + hk * skl_h + ks[:, None] * skl_s + d[None, :]           # [BS, D]
        k = tl.load(KL + koff, mask=k_ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(VL + koff, mask=k_ok[:, None], other=0.0).to(tl.float32)
        vis = (ks[None, :] <= q_pos[:, None]) & k_ok[None, :] & row_ok[:, None]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)                                 # [R, BS]
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dq += tl.dot(ds, k, input_precision=PRECISION) * scale
        tl.atomic_add(DKL + koff, tl.dot(tl.trans(ds), q, input_precision=PRECISION) * scale, mask=k_ok[:, None])
        tl.atomic_add(DVL + koff, tl.dot(tl.trans(p), do, input_precision=PRECISION), mask=k_ok[:, None])

    if HAS_BIAS:
        bias = tl.load(BIAS + hq, mask=row_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_R], tl.float32)
    dbias = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        slot_ok = (kk[None, :] < K) & row_ok[:, None]
        ids = tl.load(IDS + b * sid_b + hq[:, None] * sid_h + t[:, None] * sid_t + kk[None, :],
                      mask=slot_ok, other=-1)
        ok = slot_ok & (ids >= 0)
        rid = tl.where(ok, ids, 0).to(tl.int32)
        moff = b * skm_b + hk * skm_h + rid[:, :, None] * skm_m + d[None, None, :]     # [R, BK, D]
        km = tl.load(KM + moff, mask=ok[:, :, None], other=0.0).to(tl.float32)
        vm = tl.load(VM + moff, mask=ok[:, :, None], other=0.0).to(tl.float32)
        s = tl.sum(qm[:, None, :] * km, axis=2) * scale + bias[:, None]
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)                                # [R, BK]
        ds = p * (tl.sum(do[:, None, :] * vm, axis=2) - delta[:, None])
        dqm += tl.sum(ds[:, :, None] * km, axis=1) * scale
        dbias += tl.sum(ds, axis=1)
        if MEM_GRAD:
            tl.atomic_add(DKM + moff, ds[:, :, None] * qm[:, None, :] * scale, mask=ok[:, :, None])
            tl.atomic_add(DVM + moff, p[:, :, None] * do[:, None, :], mask=ok[:, :, None])

    tl.store(DQ + qoff, dq, mask=row_ok[:, None])
    tl.store(DQM + qoff, dqm, mask=row_ok[:, None])
    if HAS_BIAS:
        tl.atomic_add(DBIAS + hq, dbias, mask=row_ok)


class KNNAttentionFunction(torch.autograd.Function):
    """Differentiable fused kNN attention: grads for q, q_mem, local k/v, the memory gate and,
    with mem_grad=True, the memory rows that were read (retrieval itself is not differentiable)."""

    @staticmethod
    def forward(ctx, q, k_local, v_local, k_mem, v_mem, mem_ids, q_mem, mem_bias, scale, mem_grad):
        out, lse = knn_attention_triton(q, k_local, v_local, k_mem, v_mem, mem_ids, q_mem=q_mem,
                                        scale=scale, mem_bias=mem_bias, splits=1)
        ctx.save_for_backward(q, k_local, v_local, k_mem, v_mem, mem_ids, q_mem, mem_bias, out, lse)
        ctx.scale, ctx.mem_grad = scale, mem_grad
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, k_local, v_local, k_mem, v_mem, mem_ids, q_mem, mem_bias, out, lse = ctx.saved_tensors
        B, Hq, T, D = q.shape
        Hkv, S = k_local.shape[1], k_local.shape[2]
        G = Hq // Hkv
        scale = D ** -0.5 if ctx.scale is None else float(ctx.scale)
        qm = q if q_mem is None else q_mem
        K = 0 if (k_mem is None or mem_ids is None or k_mem.shape[2] == 0) else mem_ids.shape[-1]
        if K == 0:
            k_mem = v_mem = k_local[:, :, :1]
            mem_ids = torch.full((B, Hq, T, 1), -1, dtype=torch.int32, device=q.device)
        elif mem_ids.shape[1] != Hq:
            mem_ids = mem_ids.repeat_interleave(Hq // mem_ids.shape[1], dim=1)
        f32 = lambda x: x.float().contiguous()
        q_, qm_, kl, vl, km, vm, do = map(f32, (q, qm, k_local, v_local, k_mem, v_mem, d_out))
        mem_ids, lse = mem_ids.contiguous(), lse.contiguous()
        delta = (do * out.float()).sum(-1).contiguous()                          # [B, Hq, T]
        dq, dqm = torch.empty_like(q_), torch.empty_like(q_)
        dkl, dvl = torch.zeros_like(kl), torch.zeros_like(vl)
        dkm, dvm = torch.zeros_like(km), torch.zeros_like(vm)
        dbias = torch.zeros(Hq, device=q.device, dtype=torch.float32)
        BLOCK_R = _pow2(G * T, 16, 64)
        grid = (triton.cdiv(G * T, BLOCK_R), B * Hkv)
        bias = mem_bias.float().contiguous() if mem_bias is not None else dbias
        _knn_attention_bwd_kernel[grid](
            q_, qm_, kl, vl, km, vm, mem_ids, bias, do, lse, delta,
            dq, dqm, dkl, dvl, dkm, dvm, dbias,
            q_.stride(0), q_.stride(1), q_.stride(2), kl.stride(0), kl.stride(1), kl.stride(2),
            km.stride(0), km.stride(1), km.stride(2), mem_ids.stride(0), mem_ids.stride(1), mem_ids.stride(2),
            lse.stride(0), lse.stride(1),
            T, S, K, G, Hkv, scale,
            HAS_BIAS=mem_bias is not None, MEM_GRAD=bool(ctx.mem_grad) and K > 0, D=D, PRECISION="ieee",
            BLOCK_R=BLOCK_R, BLOCK_S=_pow2(S, 16, 64), BLOCK_K=_pow2(K, 16, 32),
        )
        if q_mem is None:
            dq, dqm = dq + dqm, None
        mem = bool(ctx.mem_grad) and K > 0
        return (dq.to(q.dtype), dkl.to(k_local.dtype), dvl.to(v_local.dtype),
                dkm.to(k_mem.dtype) if mem else None, dvm.to(v_mem.dtype) if mem else None, None,
                None if dqm is None else dqm.to(q_mem.dtype),
                None if mem_bias is None else dbias.to(mem_bias.dtype), None, None)
