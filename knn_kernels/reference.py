"""Pure-torch kNN attention: one softmax over the local causal window and retrieved memory keys.

This is the reference every fused kernel is checked against, and the path used on CPU. It is
computed as two partial attentions merged through their log-sum-exp, which is exactly one
softmax over [local ‖ memory]:  o = (e^(lse_l-m) o_l + e^(lse_m-m) o_m) / (e^(lse_l-m) + e^(lse_m-m)).
"""
from __future__ import annotations

import torch

# PyTorch's fused CPU attention that also returns the log-sum-exp (natural log); private, so
# every use has an explicit fallback (`can_fuse`, `fused_attention`).
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def gather_memory(mem: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows of a per-(sequence, kv head) memory picked by query-head ids.

    mem: [B, Hkv, M, D]; ids: [B, Hq, T, K] int64 (Hq a multiple of Hkv; -1 allowed, gathers row 0)
    returns [B, Hq, T, K, D]
    """
    B, Hkv, M, D = mem.shape
    Hq = ids.shape[1]
    group = Hq // Hkv
    b = torch.arange(B, device=mem.device)[:, None, None, None]                 # [B, 1, 1, 1]
    h = (torch.arange(Hq, device=mem.device) // group)[None, :, None, None]     # [1, Hq, 1, 1]
    return mem[b, h, ids.clamp(min=0)]                                          # [B, Hq, T, K, D]


def weighted_rows(mem: torch.Tensor, ids: torch.Tensor, p: torch.Tensor, scale: torch.Tensor | None = None):
    """sum_k p[..., k] * mem[row ids[..., k]]: the memory half of the attention output.

    mem [B, Hkv, M, D] (int8 with per-row `scale` [B, Hkv, M]); ids, p [B, Hq, T, K] (a -1 id must
    carry p = 0) -> [B, Hq, T, D] float32. Float32 rows go through `embedding_bag` per kv head,
    which sums the weighted rows without materialising the [B, Hq, T, K, D] gather (about 30x
    faster on CPU for a 1k-token window); other dtypes gather and dequantise only the rows read.
    """
    B, Hkv, M, D = mem.shape
    _, Hq, T, K = ids.shape
    if mem.dtype != torch.float32 or scale is not None or mem.stride(-1) != 1:
        vg = gather_memory(mem, ids).float()                                     # [B, Hq, T, K, D]
        if scale is not None:
            vg = vg * gather_memory(scale[..., None], ids).float()
        return torch.einsum("bhtk,bhtkd->bhtd", p.float(), vg)
    G = Hq // Hkv
    rows = ids.clamp(min=0).reshape(B, Hkv, G * T, K)                            # a kv head's queries
    w = p.float().reshape(B, Hkv, G * T, K)
    out = torch.stack([torch.stack([torch.nn.functional.embedding_bag(rows[b, h], mem[b, h], mode="sum",
                                                                      per_sample_weights=w[b, h])
                                    for h in range(Hkv)]) for b in range(B)])    # [B, Hkv, G*T, D]
    return out.view(B, Hq, T, D)


def _additive_mask(mask, T: int, S: int, device, dtype=torch.float32) -> torch.Tensor:
    """An additive [.., T, S] mask from None (causal, queries = last T of S), bool or float."""
    if mask is None:
        q_pos = torch.arange(S - T, S, device=device)[:, None]                  # [T, 1]
        mask = torch.arange(S, device=device)[None, :] <= q_pos                 # [T, S]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=device, dtype=dtype).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)


def can_fuse(*tensors) -> bool:
    """Whether `fused_attention` may run on these tensors (None entries are skipped): the op
    exists, they are fp32 on the CPU, and no gradient is wanted (the op does not propagate
    gradients through its lse output, which every merge with memory needs)."""
    xs = [x for x in tensors if x is not None]
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in xs)
    return _CPU_FLASH is not None and not needs_grad and all(x.device.type == "cpu" for x in xs) \
        and xs[0].dtype == torch.float32


def fused_attention(q, k, v, scale: float, mask=None, causal: bool = False):
    """PyTorch's fused CPU attention with its log-sum-exp (check `can_fuse` first).
    q [B, H, T, D]; k, v [B, H, S, D]; mask: additive, broadcastable to [B, H, T, S], or None.
    returns (out [B, H, T, D], lse [B, H, T]); a query whose mask hides every key attends
    nothing: out 0, lse -inf (the op leaves junk there)."""
    out, lse = _CPU_FLASH(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    if mask is not None:
        dead = torch.isneginf(mask).all(-1).expand(lse.shape)                       # [B, H, T]
        if bool(dead.any()):
            lse = lse.masked_fill(dead, float("-inf"))
            out = out.masked_fill(dead[..., None], 0.0)
    return out, lse


def local_attention(q, k_local, v_local, scale: float, local_mask=None):
    """Causal attention over the local window with its log-sum-exp.

    q [B, Hq, T, D]; k_local, v_local [B, Hkv, S, D] -> (out [B, Hq, T, D] fp32, lse [B, Hq, T] fp32)
    """
    B, Hq, T, D = q.shape
    Hkv, S = k_local.shape[1], k_local.shape[2]
    G = Hq // Hkv
    if can_fuse(q, k_local, v_local):
        mask = None if local_mask is None else _additive_mask(local_mask, T, S, q.device)
        if T == 1 and G > 1 and (mask is None or (mask.dim() == 4 and mask.shape[1] == 1)):
            # one query per head (a generated token): the G query heads of a kv group are one
            # query axis over the group's keys, which are then never copied per query head
            out, lse = fused_attention(q.reshape(B, Hkv, G, D), k_local.float(), v_local.float(), scale, mask)
            return out.reshape(B, Hq, 1, D), lse.reshape(B, Hq, 1)                  # [B, Hq, 1, D], [B, Hq, 1]
        k = k_local.float().repeat_interleave(G, dim=1) if G > 1 else k_local.float()   # [B, Hq, S, D]
        v = v_local.float().repeat_interleave(G, dim=1) if G > 1 else v_local.float()
        if local_mask is None and T == S:
            return fused_attention(q, k, v, scale, causal=True)
        if local_mask is None and T > 1:
            mask = _additive_mask(None, T, S, q.device)                             # causal, queries last T of S
        return fused_attention(q, k, v, scale, mask)
    qg = q.float().view(B, Hkv, G, T, D)                                          # query heads grouped
    s = (qg @ k_local.float()[:, :, None].transpose(-1, -2)).view(B, Hq, T, S) * scale   # [B, Hq, T, S]
    s = s + _additive_mask(local_mask, T, S, q.device)
    lse = torch.logsumexp(s, dim=-1)                                              # [B, Hq, T]
    p = torch.nan_to_num(torch.exp(s - lse[..., None]), nan=0.0).view(B, Hkv, G, T, S)
    return (p @ v_local.float()[:, :, None]).view(B, Hq, T, D), lse


def knn_attention_reference(q, k_local, v_local, k_mem=None, v_mem=None, mem_ids=None, *,
                            q_mem=None, mem_scores=None, scale=None, local_mask=None, mem_bias=None,
                            k_scale=None, v_scale=None, return_mem_probs: bool = False):
    """Attention of q over [local keys ‖ retrieved memory keys] in one softmax (fp32).

    q:        [B, Hq, T, D]   queries, RoPE applied at their local positions
    k_local:  [B, Hkv, S, D]  local keys (RoPE applied), S >= T; queries are the last T of S
    v_local:  [B, Hkv, S, D]
    k_mem:    [B, Hkv, M, D]  memory keys (stored un-rotated) or None
    v_mem:    [B, Hkv, M, D]  memory values or None
    mem_ids:  [B, Hq, T, K] or [B, Hkv, T, K] int64 rows of k_mem/v_mem; -1 = no neighbour
    q_mem:    [B, Hq, T, D]   query used against memory keys (default q); search must use the same
    mem_scores: [B, Hq, T, K] q_mem . k_mem[ids] when the search already computed them (skips the
              key gather); None = computed here
    local_mask: None (causal), bool [.., T, S] (True = attend) or additive float [.., T, S]
    mem_bias: [Hq] additive logit bias on memory keys (the memory gate), or None
    k_scale, v_scale: [B, Hkv, M] per-row scales when k_mem / v_mem are int8 (row = int8 * scale)
    returns (out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] float32[, mem_probs [B, Hq, T, K]])
    """
    B, Hq, T, D = q.shape
    Hkv = k_local.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of kv heads {Hkv}")
    scale = D ** -0.5 if scale is None else scale
    out, lse = local_attention(q, k_local, v_local, scale, local_mask)          # [B, Hq, T, D], [B, Hq, T]

    use_mem = v_mem is not None and mem_ids is not None and v_mem.shape[2] > 0 and mem_ids.shape[-1] > 0
    p_mem = None
    if use_mem:
        ids = mem_ids
        if ids.shape[1] != Hq:                                                   # kv-head ids -> query heads
            ids = ids.repeat_interleave(Hq // ids.shape[1], dim=1)               # [B, Hq, T, K]
        if mem_scores is None:
            kg = gather_memory(k_mem, ids).float()                               # [B, Hq, T, K, D]
            if k_scale is not None:
                kg = kg * gather_memory(k_scale[..., None], ids).float()          # dequantise int8
            qm = (q if q_mem is None else q_mem).float()
            mem_scores = torch.einsum("bhtd,bhtkd->bhtk", qm, kg)               # [B, Hq, T, K]
        s_mem = mem_scores.float() * scale
        if mem_bias is not None:
            s_mem = s_mem + mem_bias.float().view(1, Hq, 1, 1)
        s_mem = s_mem.masked_fill(ids < 0, float("-inf"))
        lse_mem = torch.logsumexp(s_mem, dim=-1)                                 # [B, Hq, T]
        p = torch.nan_to_num(torch.exp(s_mem - lse_mem[..., None]), nan=0.0)    # softmax within memory
        out_mem = weighted_rows(v_mem, ids, p, v_scale)                          # [B, Hq, T, D]
        # merge the two partial softmaxes by their log-sum-exp
        lse_all = torch.logaddexp(lse, lse_mem)                                  # [B, Hq, T]
        w_loc = torch.nan_to_num(torch.exp(lse - lse_all), nan=0.0)[..., None]
        w_mem = torch.nan_to_num(torch.exp(lse_mem - lse_all), nan=0.0)[..., None]
        out = w_loc * out + w_mem * out_mem
        p_mem = p * w_mem                                                        # share of the one softmax
        lse = lse_all
    out = torch.nan_to_num(out, nan=0.0).to(q.dtype)
    if return_mem_probs:
        if p_mem is None:
            p_mem = q.new_zeros(B, Hq, T, 0, dtype=torch.float32)
        return out, lse, p_mem
    return out, lse
