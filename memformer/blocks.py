"""Block reads: attend to whole blocks of contiguous memory instead of scattered top-k rows.

Token-level reads (Memorizing Transformers) give every query head its own top-k rows. A frozen
small backbone then sees scattered fragments: a UUID arrives in pieces, and each head may pick a
different look-alike needle. Block reads (as InfLLM's memory units) keep the kNN index as the
retriever but attend to *contiguous text*:

1. every query token searches its top-k rows per head, as in token reads;
2. each hit gets the share of attention it would draw in the token-read softmax
   (exp(logit - logsumexp over local keys and hits)); heads that do not look at memory vote little;
3. the hits' shares are summed per memory block (`block_size` consecutive document positions) over
   all heads of the layer and all query tokens of a query chunk (`block_size` tokens, aligned to
   the end, so the last chunk is the question and each generated token is its own chunk);
4. every query of the chunk attends, in one softmax with its local keys, to all rows of the
   chunk's `n_blocks` best blocks (the same rows for every head, in document order).

Pinned blocks skip steps 1-3: the blocks are chosen outside the model (`model.reading_blocks`;
`memformer.qa` picks them from the question with a sentence embedder) and every query reads them.

Positions: with keys stored rotated ("window" mode) voted rows keep their in-window rotation and
the query is moved one window further, so the text inside a block keeps its order, but a block
that straddles a window boundary jumps back by up to a window, and blocks from different windows
can overlap in position. With keys stored un-rotated ("first", "fixed") a read can put them
anywhere: `row_rotation` lays the chunk's blocks out contiguously, in document order, just before
the local window (slot j of R at position j - R), as retrieved passages sit before the question
in a RAG prompt, and memory logits use the query at its local position. Pinned blocks over
rotated keys get the same layout: `slot_rotation` first undoes each row's rotation at its
recorded window slot (RoPE rotations compose, so R(j - R) R(slot)^-1 R(slot) k = R(j - R) k).
"""
from __future__ import annotations

import torch

from memformer.kernels.reference import local_attention


def block_attention(mem, q_rot, q_mem, k_local, v_local, *, top_k: int, n_blocks: int, block_size: int,
                    scale: float, local_mask=None, mem_bias=None, rotary_fn=None, row_rotation=None,
                    slot_rotation=None, pinned=None, prefix=None):
    """Attention over [local keys ‖ rows of the best memory blocks], one softmax per query.

    mem: LayerMemory [B, Hkv, M, D] (keys, values, positions [B, M], valid [B, M], search).
    q_rot [B, Hq, T, D]: queries rotated at their local positions (for local keys);
    q_mem [B, Hq, T, D]: the same queries as memory sees them (search and memory logits);
    k_local, v_local [B, Hkv, S, D]: local keys/values (queries are the last T of S unless
        local_mask says otherwise); mem_bias [Hq]: the memory gate, added to memory logits.
    row_rotation: None (rows are read as stored, against q_mem), or (cos, sin) [1, R', D] of
        positions -R' .. -1, R' >= n_blocks*block_size: un-rotated rows are rotated by their slot
        (the last R slots when fewer blocks exist) with `rotary_fn` (the backbone's
        apply_rotary_pos_emb) and read against q_rot.
    slot_rotation: None, or (cos, sin) [1, P, D] of positions 0 .. P-1 with unit scale: the rows
        are stored rotated at their window slot (`mem.slots`, "window" mode); that rotation is
        undone first, so `row_rotation` can lay them out contiguously as well. The rows read must
        have known slots (checked once by `reading_blocks`, not here on every step).
    pinned: None (each query chunk votes for its blocks), or block ids [B, n] chosen outside
        (`MemformerForCausalLM.reading_blocks`): every query reads those n blocks, no search.
    prefix: None, or (keys, values) [B, Hkv, P, D] read before the pinned blocks in the same
        softmax (keys already rotated where they sit, -R-P .. -R-1): the attention sink the
        blocks' states were computed after (`reading_blocks(sink_prefix=True)`); pinned only.
    returns (out [B, Hq, T, D] in q_rot's dtype,
             rows [B, 1, T, n*block_size] memory rows read (-1 = none; same for all heads),
             probs [B, 1, T, n*block_size] their attention probability, mean over heads).
    """
    B, Hq, T, D = q_rot.shape
    Hkv = k_local.shape[1]
    G = Hq // Hkv
    out_loc, lse_loc = local_attention(q_rot, k_local, v_local, scale, local_mask)   # [B, Hq, T, D], [B, Hq, T]
    bias = torch.zeros(Hq, device=q_rot.device) if mem_bias is None else mem_bias.float()
    positions = mem.positions.to(q_rot.device)                                        # [B, M]
    valid = mem.valid.to(q_rot.device)                                                # [B, M]
    block_of_row = torch.where(valid, positions // block_size, -1)                    # [B, M]
    if pinned is None:
        chunk_of_query = (torch.arange(T, device=q_rot.device) - T) // block_size     # ..., -2, -1 (end-aligned)
        chunk_of_query = chunk_of_query - int(chunk_of_query[0])                     # 0 .. C-1
        top_blocks, top_votes = _vote_blocks(mem, q_mem, lse_loc, bias, block_of_row, chunk_of_query,
                                             top_k=top_k, n_blocks=n_blocks, scale=scale, G=G)
    else:                                                                             # one chunk: every query
        chunk_of_query = torch.zeros(T, dtype=torch.long, device=q_rot.device)
        top_blocks = pinned.to(q_rot.device).view(B, 1, -1).sort(dim=-1).values      # [B, 1, n] document order
        top_votes = torch.ones(top_blocks.shape, device=q_rot.device)
    C, n = top_blocks.shape[1], top_blocks.shape[2]
    if prefix is not None and pinned is None:
        raise ValueError("block_attention: a prefix is read only before pinned blocks")

    # rows of the chosen blocks: [B, C, n*block_size], -1 where a block is short or unchosen
    first_pos = (top_blocks * block_size).reshape(B, -1)                              # [B, C*n]
    start = torch.searchsorted(positions.contiguous(), first_pos.contiguous())        # first row of each block
    rows = start[..., None] + torch.arange(block_size, device=q_rot.device)           # [B, C*n, bs]
    M = positions.shape[1]
    inside = rows < M
    rc = rows.clamp(max=max(M - 1, 0)).reshape(B, -1)
    same = block_of_row.gather(1, rc).view_as(rows) == top_blocks.reshape(B, -1, 1)
    rows = torch.where(inside & same & (top_votes.reshape(B, -1, 1) > 0), rows, -1)
    rows = rows.view(B, C, n * block_size)                                            # [B, C, R]
    R = rows.shape[-1]

    keys, values = _block_rows(mem, rows)                                             # [B, C, Hkv, R, D]
    q_read = q_mem
    if slot_rotation is not None:                                                     # undo the window rotation
        slots = mem.slots.to(rows.device).gather(1, rows.clamp(min=0).view(B, -1)).view(B, C, R)
        cos, sin = (x[0].to(keys.device, keys.dtype) for x in slot_rotation)          # [P, D]
        cos, sin = cos[slots.clamp(min=0)], sin[slots.clamp(min=0)]                  # [B, C, R, D]
        flat = keys.reshape(B * C, Hkv, R, D)
        keys = rotary_fn(flat, flat, cos.reshape(B * C, R, D), -sin.reshape(B * C, R, D))[1].view(B, C, Hkv, R, D)
    if row_rotation is not None:                                                      # contiguous layout
        cos, sin = (x.to(keys.device, keys.dtype) for x in row_rotation)             # [1, R, D]
        if cos.shape[1] < R:
            raise ValueError(f"row_rotation covers {cos.shape[1]} slots, the blocks read {R}")
        cos, sin = cos[:, -R:], sin[:, -R:]                                           # fewer blocks exist: -R .. -1
        flat = keys.reshape(B * C, Hkv, R, D)
        keys = rotary_fn(flat, flat, cos, sin)[1].view(B, C, Hkv, R, D)
        q_read = q_rot
    unread = rows < 0                                                                 # [B, C, R]
    P = 0
    if prefix is not None:                        # the sink before the blocks: more columns, same softmax
        kp, vp = (x.to(keys.device).float()[:, None] for x in prefix)                # [B, 1, Hkv, P, D]
        P = kp.shape[3]
        keys, values = torch.cat([kp, keys], 3), torch.cat([vp, values], 3)           # [B, 1, Hkv, P+R, D]
        unread = torch.cat([unread.new_zeros(B, C, P), unread], 2)                    # [B, 1, P+R]
    out = torch.empty(B, Hq, T, D, device=q_rot.device, dtype=torch.float32)
    probs = torch.zeros(B, 1, T, R, device=q_rot.device)
    for c in range(C):
        tq = (chunk_of_query == c).nonzero().flatten()                                # this chunk's queries
        t0, t1 = int(tq[0]), int(tq[-1]) + 1
        qc = q_read[:, :, t0:t1].float().view(B, Hkv, G, t1 - t0, D)                   # [B, Hkv, G, Tc, D]
        s = (qc @ keys[:, c, :, None].transpose(-1, -2)).view(B, Hq, t1 - t0, P + R)  # [B, Hq, Tc, P+R]
        s = s * scale + bias.view(1, Hq, 1, 1)
        s = s.masked_fill(unread[:, c].view(B, 1, 1, P + R), float("-inf"))
        lse_mem = torch.logsumexp(s, dim=-1)                                          # [B, Hq, Tc]
        lse = torch.logaddexp(lse_loc[:, :, t0:t1], lse_mem)
        p = torch.nan_to_num(torch.exp(s - lse[..., None]), nan=0.0)                  # share of the one softmax
        o_mem = (p.view(B, Hkv, G, t1 - t0, P + R) @ values[:, c, :, None]).view(B, Hq, t1 - t0, D)
        w_loc = torch.nan_to_num(torch.exp(lse_loc[:, :, t0:t1] - lse), nan=0.0)[..., None]
        out[:, :, t0:t1] = w_loc * out_loc[:, :, t0:t1].float() + o_mem
        probs[:, 0, t0:t1] = p[..., P:].mean(dim=1).detach()                         # block rows only
    read = rows[:, chunk_of_query][:, None]                                           # [B, 1, T, R]
    return torch.nan_to_num(out, nan=0.0).to(q_rot.dtype), read, probs


def _vote_blocks(mem, q_mem, lse_loc, bias, block_of_row, chunk_of_query, *, top_k: int, n_blocks: int,
                 scale: float, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-3: every query's top-k hits vote, by their share of the token-read softmax, for
    their blocks; returns each chunk's n best blocks (document order) and their votes, [B, C, n]."""
    B, Hq, T, D = q_mem.shape
    Hkv = Hq // G
    # 1-2. each top-k hit's share of the token-read softmax
    scores, ids = mem.search(q_mem.reshape(B, Hkv, G * T, D), top_k)                 # [B, Hkv, G*T, K]
    K = ids.shape[-1]
    scores = scores.reshape(B, Hq, T, K).to(q_mem.device).float()                     # query heads
    ids = ids.reshape(B, Hq, T, K).to(q_mem.device)
    logits = (scores * scale + bias.view(1, Hq, 1, 1)).masked_fill(ids < 0, float("-inf"))
    lse_all = torch.logaddexp(lse_loc.detach(), torch.logsumexp(logits, dim=-1))     # [B, Hq, T]
    share = torch.nan_to_num(torch.exp(logits - lse_all[..., None]), nan=0.0)        # [B, Hq, T, K]

    # 3. votes per (query chunk, block)
    n_all = int(block_of_row.max()) + 1 if block_of_row.numel() else 0
    C = int(chunk_of_query[-1]) + 1
    hit_block = block_of_row.gather(1, ids.clamp(min=0).reshape(B, -1)).view(B, Hq, T, K)
    hit_ok = (ids >= 0) & (hit_block >= 0)
    slot = chunk_of_query.view(1, 1, T, 1) * max(n_all, 1) + hit_block.clamp(min=0)   # [B, Hq, T, K]
    votes = torch.zeros(B, C * max(n_all, 1), device=q_mem.device)
    votes.scatter_add_(1, slot.reshape(B, -1), (share * hit_ok).reshape(B, -1))
    votes = votes.view(B, C, max(n_all, 1))                                           # [B, C, blocks]
    n = min(n_blocks, votes.shape[-1])
    top_blocks = votes.topk(n, dim=-1).indices.sort(dim=-1).values                   # [B, C, n] document order
    return top_blocks, votes.gather(-1, top_blocks)


def _block_rows(mem, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float keys and values of memory rows shared by all heads.
    rows [B, C, R] (-1 reads row 0; callers mask it) -> [B, C, Hkv, R, D] each."""
    B, C, R = rows.shape
    b = torch.arange(B, device=rows.device)[:, None, None, None] if mem.batch > 1 else 0
    h = torch.arange(mem.keys.shape[1], device=rows.device)[None, None, :, None]
    i = rows.clamp(min=0)[:, :, None, :].to(mem.keys.device)                          # [B, C, 1, R]
    out = []
    for data, scales in ((mem.keys, mem.key_scales), (mem.values, mem.value_scales)):
        x = data[b, h, i].float()                                                    # [B, C, Hkv, R, D]
        out.append(x if scales is None else x * scales[b, h, i][..., None])
    return out[0].to(rows.device), out[1].to(rows.device)


def sink_prefix_states(model, R: int, batch: int) -> dict:
    """{memory layer: (keys, values) [batch, Hkv, S, D]}: the sink tokens run alone through the
    frozen model (as at the start of every memory window; causal, so exactly the states every
    window's tokens attended to), keys moved from positions 0 .. S-1 to -R-S .. -R-1, just before
    R rows of pinned blocks; {} without a sink. Why: read with only the local window's sink after
    them, SmolLM2 copied a 32k needle's UUID with a group skipped, with this sink before them whole."""
    sink = model.sink_ids                                                             # [b, S]
    if sink is None or sink.shape[1] == 0 or not model.memories:
        return {}
    S = sink.shape[1]
    with model.memory_disabled(), torch.no_grad():
        out = model.backbone(input_ids=sink.to(model.device), use_cache=True)
    cache = getattr(out, "cache", None)
    cache = out.past_key_values if cache is None else cache
    cos, sin = model._rotation_at(*[-(R + S)] * S)                                  # [1, S, D], one angle
    unit = model._rotation_at(0)[0][0, 0, 0]          # the rotary's attention scaling: rotate only
    rotate = model.adapter.apply_rotary()
    states = {}
    for i in model.memories:
        k, v = cache.layers[i].keys, cache.layers[i].values                          # [b, Hkv, S, D], k at 0..S-1
        k = rotate(k, k, (cos / unit).to(k), (sin / unit).to(k))[1]                  # now at -R-S .. -R-1
        states[i] = (k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
    return states


def pinned_block_ids(model, blocks, block_size, layout: str, sink_prefix: bool) -> tuple[torch.Tensor, int, int]:
    """`MemformerForCausalLM.reading_blocks`' arguments checked (ValueError naming what is wrong):
    returns (block ids [batch, n], block size, batch)."""
    if layout not in ("contiguous", "stored"):
        raise ValueError(f"reading_blocks: unknown layout {layout!r}; choose 'contiguous' or 'stored'")
    if model.runtime.corpus:
        raise ValueError("block reads need the sequence's own memory; a corpus memory is attached")
    bs = model.memory_config.block_size if block_size is None else int(block_size)
    if bs < 1:
        raise ValueError(f"reading_blocks: block_size must be >= 1, got {bs}")
    ids = torch.as_tensor(blocks, dtype=torch.long)
    ids = ids[None] if ids.dim() == 1 else ids                                  # [B, n]
    batch = next(iter(model.memories.values())).batch if model.memories else 0
    if not batch:
        raise ValueError("reading_blocks: nothing is memorized")
    if ids.dim() != 2 or ids.shape[1] < 1 or ids.shape[0] not in (1, batch):
        raise ValueError(f"reading_blocks: blocks must be [n] or [{batch}, n] with n >= 1, got {tuple(ids.shape)}")
    have = model.memory_blocks(bs)
    if int(ids.min()) < 0 or int(ids.max()) >= have:
        raise ValueError(f"reading_blocks: block ids must be in [0, {have}) (memory of {have} blocks of "
                         f"{bs}), got {ids.min().item()}..{ids.max().item()}")
    if any(len(set(row)) < len(row) for row in ids.tolist()):
        raise ValueError("reading_blocks: a block id repeats (each block is read once)")
    contiguous = layout == "contiguous"
    if sink_prefix and not contiguous:
        raise ValueError("reading_blocks: sink_prefix needs the contiguous layout (the sink is laid out "
                         "just before the blocks)")
    if contiguous and model.unknown_window_slots(ids.expand(batch, -1), bs):
        raise ValueError("reading_blocks: this memory has no recorded window slots (saved before "
                         "they were kept); memorize the documents again, or use layout='stored'")
    return ids.expand(batch, -1).contiguous(), bs, batch
