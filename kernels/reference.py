"""Pure-torch kNN attention: one softmax over the local causal window and retrieved memory keys.

This is the reference every fused kernel is checked against, and the path used on CPU.
"""
from __future__ import annotations

import torch


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


def _local_scores_mask(mask, T: int, S: int, device) -> torch.Tensor:
    """An additive [.., T, S] float mask from None (causal, queries = last T of S), bool or float."""
    if mask is None:
        q_pos = torch.arange(S - T, S, device=device)[:, None]                  # [T, 1]
        k_pos = torch.arange(S, device=device)[None, :]                         # [1, S]
        mask = k_pos <= q_pos                                                    # [T, S]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=device).masked_fill_(~mask, float("-inf"))
    return mask.float()


def knn_attention_reference(q, k_local, v_local, k_mem=None, v_mem=None, mem_ids=None, *,
                            q_mem=None, scale=None, local_mask=None, mem_bias=None,
                            return_mem_probs: bool = False):
    """Attention of q over [local keys ‖ retrieved memory keys] in one softmax (fp32).

    q:        [B, Hq, T, D]   queries, RoPE applied at their local positions
    k_local:  [B, Hkv, S, D]  local keys (RoPE applied), S >= T; queries are the last T of S
    v_local:  [B, Hkv, S, D]
    k_mem:    [B, Hkv, M, D]  memory keys (stored un-rotated) or None
    v_mem:    [B, Hkv, M, D]  memory values or None
    mem_ids:  [B, Hq, T, K] or [B, Hkv, T, K] int64 rows of k_mem/v_mem; -1 = no neighbour
    q_mem:    [B, Hq, T, D]   query used against memory keys (default q); search must use the same
    local_mask: None (causal), bool [.., T, S] (True = attend) or additive float [.., T, S]
    mem_bias: [Hq] additive logit bias on memory keys (the memory gate), or None
    returns (out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] float32[, mem_probs [B, Hq, T, K]])
    """
    B, Hq, T, D = q.shape
    Hkv, S = k_local.shape[1], k_local.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} not a multiple of kv heads {Hkv}")
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale

    # local scores without materialising repeated kv heads: [B, Hkv, G, T, S]
    qg = q.float().view(B, Hkv, G, T, D)
    s_loc = qg @ k_local.float()[:, :, None].transpose(-1, -2)                 # [B, Hkv, G, T, S]
    s_loc = s_loc.view(B, Hq, T, S) * scale
    s_loc = s_loc + _local_scores_mask(local_mask, T, S, q.device)

    use_mem = k_mem is not None and mem_ids is not None and k_mem.shape[2] > 0 and mem_ids.shape[-1] > 0
    if use_mem:
        ids = mem_ids
        if ids.shape[1] != Hq:                                                   # kv-head ids -> query heads
            ids = ids.repeat_interleave(Hq // ids.shape[1], dim=1)               # [B, Hq, T, K]
        kg = gather_memory(k_mem, ids).float()                                   # [B, Hq, T, K, D]
        qm = (q if q_mem is None else q_mem).float()
        s_mem = torch.einsum("bhtd,bhtkd->bhtk", qm, kg) * scale                # [B, Hq, T, K]
        if mem_bias is not None:
            s_mem = s_mem + mem_bias.float().view(1, Hq, 1, 1)
        s_mem = s_mem.masked_fill(ids < 0, float("-inf"))
        scores = torch.cat([s_loc, s_mem], dim=-1)                               # [B, Hq, T, S + K]
    else:
        scores = s_loc
    lse = torch.logsumexp(scores, dim=-1)                                        # [B, Hq, T]
    probs = torch.exp(scores - lse[..., None])
    probs = torch.nan_to_num(probs, nan=0.0)                                     # rows with nothing to attend
    p_loc = probs[..., :S].view(B, Hkv, G, T, S)
    out = (p_loc @ v_local.float()[:, :, None]).view(B, Hq, T, D)               # [B, Hq, T, D]
    p_mem = None
    if use_mem:
        p_mem = probs[..., S:]                                                   # [B, Hq, T, K]
        vg = gather_memory(v_mem, ids).float()                                   # [B, Hq, T, K, D]
        out = out + torch.einsum("bhtk,bhtkd->bhtd", p_mem, vg)
    out = out.to(q.dtype)
    if return_mem_probs:
        if p_mem is None:
            p_mem = q.new_zeros(B, Hq, T, 0, dtype=torch.float32)
        return out, lse, p_mem
    return out, lse
