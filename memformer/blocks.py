"""Block reads: memory layers attend to whole memory blocks, chosen by a question or by the layer.

Question reads: a question picks `question_blocks` blocks of `block_size` consecutive stream positions (the
blocks under the passages a sentence embedder finds nearest to it, `memformer.passages`); every
memory layer then reads all rows of those blocks, the same contiguous text for every head, in one
softmax with its local keys, for every query (prompt and generated tokens alike).

Positions: memory keys are stored rotated at their slot in the window that computed them. The
blocks read are laid out contiguously just before the local window (slot j of R at position
j - R), as retrieved passages sit before the question in a RAG prompt: each row's rotation at its
recorded slot is undone first (RoPE rotations compose, so R(j - R) R(slot)^-1 R(slot) k =
R(j - R) k), and memory logits use the query at its local position.

Layer reads (no question known: `generate`, `forward`, perplexity): each chunk of `block_size`
queries reads the `MemoryConfig.layer_blocks` blocks its layer's own queries choose
(`chosen_blocks`: a block's best key against the mean query of the chunk before), laid out the
same way (`chosen_block_attention`).

Every query of a chunk reads the same rows, so the memory logits are one matmul per kv group
(`shared_rows_attention`), differentiable.
"""
from __future__ import annotations

import torch

from memformer.kernels.reference import local_attention


def block_attention(mem, q_rot, k_local, v_local, blocks, *, block_size: int, scale: float, rotary_fn,
                    row_rotation, slot_rotation, local_mask=None, mem_bias=None, with_probs: bool = False,
                    local=None):
    """Attention over [local keys ‖ rows of the pinned memory blocks], one softmax per query.

    mem: LayerMemory [B or 1, Hkv, M, D] (keys, values, positions, slots, valid [B or 1, M]).
    q_rot [B, Hq, T, D]: queries rotated at their local positions.
    k_local, v_local [B, Hkv, S, D]: local keys/values (queries are the last T of S unless
        local_mask says otherwise); mem_bias [Hq]: the memory gate, added to memory logits.
    blocks [B, n]: block ids read by every query (`MemformerForCausalLM.reading_blocks`).
    local: (out [B, Hq, T, D], lse [B, Hq, T]) of the local attention when the caller has it.
    row_rotation: (cos, sin) [1, R', D] of positions -R' .. -1, R' >= n*block_size: rows are
        rotated by their slot in the contiguous layout (the last R slots when fewer rows exist)
        with `rotary_fn` (the backbone's apply_rotary_pos_emb).
    slot_rotation: (cos, sin) [1, W, D] of positions 0 .. W-1 with unit scale: undoes the rotation
        each row was stored with, at its window slot (`mem.slots`).
    returns (out [B, Hq, T, D] in q_rot's dtype,
             rows [B, 1, T, R] memory rows read (-1 = none; same for all heads),
             probs [B, 1, T, R] their attention probability, mean over heads; None unless with_probs).
    """
    B, Hq, T, D = q_rot.shape
    # a corpus memory (batch 1) is one stream read by every sequence
    positions = mem.positions.to(q_rot.device).expand(B, -1)                          # [B, M]
    valid = mem.valid.to(q_rot.device).expand(B, -1)                                  # [B, M]
    block_of_row = torch.where(valid, positions // block_size, -1)                    # [B, M]
    top_blocks = blocks.to(q_rot.device).expand(B, -1).sort(dim=-1).values            # [B, n] document order

    # rows of the chosen blocks: [B, n*block_size], -1 where a block is short or evicted
    start = torch.searchsorted(positions.contiguous(), (top_blocks * block_size).contiguous())  # [B, n]
    rows = start[..., None] + torch.arange(block_size, device=q_rot.device)           # [B, n, bs]
    M = positions.shape[1]
    rc = rows.clamp(max=max(M - 1, 0)).reshape(B, -1)
    same = block_of_row.gather(1, rc).view_as(rows) == top_blocks[..., None]
    rows = torch.where((rows < M) & same, rows, -1).view(B, -1)                       # [B, R]
    R = rows.shape[-1]

    keys, values = gather_rows(mem, rows)                                             # [B, Hkv, R, D] float
    slots = mem.slots.to(rows.device).expand(B, -1).gather(1, rows.clamp(min=0)).clamp(min=0)  # [B, R]
    cos, sin = (x[0].to(keys.device, keys.dtype)[slots] for x in slot_rotation)      # [B, R, D]
    keys = rotary_fn(keys, keys, cos, -sin)[1]                                        # un-rotated
    cos, sin = (x.to(keys.device, keys.dtype) for x in row_rotation)                 # [1, R', D]
    if cos.shape[1] < R:
        raise ValueError(f"row_rotation covers {cos.shape[1]} slots, the blocks read {R}")
    keys = rotary_fn(keys, keys, cos[:, -R:], sin[:, -R:])[1]                         # at -R .. -1

    out, probs = shared_rows_attention(q_rot, k_local, v_local, keys, values, rows >= 0, scale=scale,
                                       local_mask=local_mask, mem_bias=mem_bias, with_probs=with_probs,
                                       local=local)
    read = rows[:, None, None, :].expand(B, 1, T, R)                                  # [B, 1, T, R]
    probs = probs.mean(dim=1, keepdim=True).detach() if with_probs else None          # [B, 1, T, R]
    return out, read, probs


def shared_rows_attention(q, k_local, v_local, k_rows, v_rows, row_ok, *, scale: float, local_mask=None,
                          mem_bias=None, with_probs: bool = False, local=None):
    """One softmax of every query over [its local keys ‖ the same R memory rows] (fp32 inside).

    Every query of a block read reads the same rows, so the memory logits are one matmul per kv
    group, [B, Hq, T, R], never the per-query gather [B, Hq, T, R, D] of the kNN kernel (which
    needs per-query ids); differentiable, as training reads blocks through it too.
    q [B, Hq, T, D]; k_local, v_local [B, Hkv, S, D] (queries are the last T of S unless
    local_mask says otherwise); k_rows, v_rows [B, Hkv, R, D] already at their layout positions;
    row_ok [B, R] bool (False = no row); mem_bias [Hq] (the memory gate) or None; local: the local
    attention's (out, lse) already computed for these queries, or None.
    returns (out [B, Hq, T, D] in q's dtype, probs [B, Hq, T, R] each row's share of the one
    softmax, or None unless with_probs)."""
    B, Hq, T, D = q.shape
    Hkv, R = k_rows.shape[1], k_rows.shape[2]
    G = Hq // Hkv
    out_loc, lse_loc = local if local is not None else local_attention(q, k_local, v_local, scale, local_mask)  # [B, Hq, T, D], [B, Hq, T]
    qg = q.float().reshape(B, Hkv, G * T, D)                                          # query heads of a kv group
    s = (qg @ k_rows.float().transpose(-1, -2)).view(B, Hq, T, R) * scale            # [B, Hq, T, R]
    if mem_bias is not None:
        s = s + mem_bias.float().view(1, Hq, 1, 1)
    s = s.masked_fill(~row_ok.to(s.device)[:, None, None, :], float("-inf"))
    lse_mem = torch.logsumexp(s, dim=-1)                                              # [B, Hq, T]
    p = torch.nan_to_num(torch.exp(s - lse_mem[..., None]), nan=0.0)                 # softmax within memory
    out_mem = (p.view(B, Hkv, G * T, R) @ v_rows.float()).view(B, Hq, T, D)          # [B, Hq, T, D]
    # merge the two partial softmaxes by their log-sum-exp
    lse = torch.logaddexp(lse_loc, lse_mem)                                           # [B, Hq, T]
    w_loc = torch.nan_to_num(torch.exp(lse_loc - lse), nan=0.0)[..., None]
    w_mem = torch.nan_to_num(torch.exp(lse_mem - lse), nan=0.0)[..., None]
    out = torch.nan_to_num(w_loc * out_loc + w_mem * out_mem, nan=0.0).to(q.dtype)
    return out, (p * w_mem if with_probs else None)


def gather_rows(mem, rows: torch.Tensor, per_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Float (dequantised) keys and values of memory rows, the one place rows are gathered
    outside the fused kernel. mem: [b, Hkv, M, D] (b = B or 1); rows: [B, ...] shared by every
    head, or [B, Hkv, ...] when per_head (-1 reads row 0; callers mask it) -> [B, Hkv, ..., D] each."""
    i = (rows if per_head else rows[:, None]).clamp(min=0).to(mem.keys.device)     # [B, Hkv or 1, ...]
    shape = [1] * i.dim()
    b = torch.arange(i.shape[0], device=i.device).view(-1, *shape[1:]) if mem.batch > 1 else 0
    h = torch.arange(mem.keys.shape[1], device=i.device).view(1, -1, *shape[2:])
    out = []
    for data, scales in ((mem.keys, mem.key_scales), (mem.values, mem.value_scales)):
        x = data[b, h, i].float()                                                     # [B, Hkv, ..., D]
        out.append((x if scales is None else x * scales[b, h, i][..., None]).to(rows.device))
    return out[0], out[1]


def pinned_block_ids(model, blocks, source: str = "own") -> torch.Tensor:
    """`MemformerForCausalLM.reading_blocks`' argument checked (ValueError naming what is wrong):
    block ids [n] or [batch, n] -> [batch, n] (batch 1 for the corpus: one stream for all)."""
    bs = model.memory_config.block_size
    ids = torch.as_tensor(blocks, dtype=torch.long)
    ids = ids[None] if ids.dim() == 1 else ids                                  # [B, n]
    memories = model.block_memories(source)
    batch = next(iter(memories.values())).batch if memories else 0
    if not batch or not any(len(m) for m in memories.values()):
        raise ValueError("reading_blocks: nothing is memorized" if source == "own" else
                         "reading_blocks: no corpus memory is attached")
    if ids.dim() != 2 or ids.shape[1] < 1 or ids.shape[0] not in (1, batch):
        raise ValueError(f"reading_blocks: blocks must be [n] or [{batch}, n] with n >= 1, got {tuple(ids.shape)}")
    have = model.memory_blocks(source)
    if int(ids.min()) < 0 or int(ids.max()) >= have:
        raise ValueError(f"reading_blocks: block ids must be in [0, {have}) (memory of {have} blocks of "
                         f"{bs}), got {ids.min().item()}..{ids.max().item()}")
    if any(len(set(row)) < len(row) for row in ids.tolist()):
        raise ValueError("reading_blocks: a block id repeats (each block is read once)")
    if any(bool((m.slots[m.valid] < 0).any()) for m in memories.values()):
        raise ValueError("reading_blocks: memory rows without their window slot (added without `slots`) "
                         "cannot be laid out; memorize() the text")
    return ids.expand(batch, -1).contiguous()


def chosen_blocks(mem, q_mem, n: int, block_size: int, chunk: int) -> torch.Tensor:
    """The `n` memory blocks each chunk of queries reads, chosen by this layer's own queries.

    Chunk c (queries [c*chunk, (c+1)*chunk)) is chosen by the mean query of chunk c-1 (chunk 0 by
    its first query), so no query's read depends on a later token. A block's score is the largest
    logit of the chooser against any of its keys, summed over kv heads (one layout per layer).
    mem: LayerMemory [b, Hkv, M, D]; q_mem [B, Hq, T, D]: queries as kNN reads rotate them (one
    window further than their local position, against keys at their window slot).
    returns blocks [B, C, n] (C = ceil(T / chunk)); ids of blocks without rows read nothing."""
    B, Hq, T, D = q_mem.shape
    Hkv = mem.keys.shape[1]
    G = Hq // Hkv
    C = -(-T // chunk)
    qg = q_mem.float().view(B, Hkv, G, T, D).mean(2)                                  # [B, Hkv, T, D]
    first = qg[:, :, :1]                                                              # chunk 0's chooser
    if C > 1:
        pad = C * chunk - T
        full = torch.nn.functional.pad(qg, (0, 0, 0, pad)).view(B, Hkv, C, chunk, D)  # [B, Hkv, C, chunk, D]
        count = torch.full((C,), chunk, device=qg.device)
        count[-1] = chunk - pad
        means = full.sum(3) / count.view(1, 1, C, 1)                                  # [B, Hkv, C, D]
        choosers = torch.cat([first, means[:, :, :-1]], dim=2)                        # [B, Hkv, C, D]
    else:
        choosers = first                                                              # [B, Hkv, 1, D]
    keys = mem.keys.float()
    if mem.key_scales is not None:
        keys = keys * mem.key_scales[..., None]
    keys = keys.to(qg.device)                                                         # [b, Hkv, M, D]
    s = choosers @ keys.transpose(-1, -2)                                             # [B, Hkv, C, M]
    valid = mem.valid.to(qg.device)                                                   # [b, M]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    block = (mem.positions.to(qg.device) // block_size).clamp(min=0)                  # [b, M]
    nb = int(block.max()) + 1
    per_block = torch.full((B, Hkv, C, nb), float("-inf"), device=qg.device)
    per_block = per_block.scatter_reduce(3, block[:, None, None, :].expand_as(s), s, reduce="amax")
    score = per_block.sum(1)                                                          # [B, C, nb]
    return score.topk(min(n, nb), dim=-1).indices                                     # [B, C, n]


def chosen_block_attention(mem, q_rot, q_mem, k_local, v_local, *, n: int, block_size: int, scale: float,
                           rotary_fn, row_rotation, slot_rotation, local_mask=None, mem_bias=None,
                           with_probs: bool = False):
    """Block reads with no question: every chunk of `block_size` queries reads the `n` blocks its
    layer's queries choose (`chosen_blocks`), laid out before the local window as question reads
    lay them out, in one softmax with its local keys (`block_attention`).
    q_rot [B, Hq, T, D] (local positions), q_mem [B, Hq, T, D] (the chooser's rotation);
    k_local, v_local [B, Hkv, S, D]; local_mask as HF gives it (None = causal, queries last T of S).
    returns (out [B, Hq, T, D], rows [B, 1, T, R], probs [B, 1, T, R] or None)."""
    B, Hq, T, D = q_rot.shape
    blocks = chosen_blocks(mem, q_mem, n, block_size, block_size)                     # [B, C, n]
    # the local part once for every query (one causal call), the memory part chunk by chunk
    out_loc, lse_loc = local_attention(q_rot, k_local, v_local, scale, local_mask)   # [B, Hq, T, D], [B, Hq, T]
    outs, rows, probs = [], [], []
    for c in range(blocks.shape[1]):
        a, b = c * block_size, min((c + 1) * block_size, T)
        o, r, p = block_attention(mem, q_rot[:, :, a:b], k_local, v_local, blocks[:, c], block_size=block_size,
                                  scale=scale, rotary_fn=rotary_fn, row_rotation=row_rotation,
                                  slot_rotation=slot_rotation, mem_bias=mem_bias, with_probs=with_probs,
                                  local=(out_loc[:, :, a:b], lse_loc[:, :, a:b]))
        outs.append(o), rows.append(r), probs.append(p)
    # every chunk reads n blocks of block_size rows (-1 where missing): the same R for all
    return torch.cat(outs, dim=2), torch.cat(rows, dim=2), None if probs[0] is None else torch.cat(probs, dim=2)
