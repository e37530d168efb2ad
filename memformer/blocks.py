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
same way (`chosen_block_attention`). Chunks count positions from the start of the local window, so
generating with a KV cache reads what one forward over the whole sequence reads: the cache keeps
each layer's chooser queries and the current chunk's laid-out rows (`LayerReads`), and a new token
chooses and gathers only when it starts a chunk.

Copy pointer (`CopyPointer`, `MemoryConfig.copy_pointer`): while tokens are generated one at a
time under pinned reads, each head's memory logit at row j gets + beta times the share of the
one softmax the head gave row j - 1 at the step before. A head that copies from memory (it read
the row of the token it just gave) is pointed at the row that follows, so a copy does not jump
ahead where one token repeats: after the first "4" of "3544.", the rows of the second "4" and of
the "." both follow a "4", and the pointer picks the one after the row just read. It follows
the answer's first item only: once the generated text ends a line, or holds ".", "!" or "?"
followed by whitespace, it rests (`MemformerForCausalLM.reading_blocks`), so a copied value does
not run on into the text after it; a point inside a value ("10.8.0.254") leaves it copying.
An answer to a cue starts under the pointer: a cue is the answer's own beginning, often the
memorized sentence up to its value ("The special magic word for wild-cabin is"), so its last
token, the answer's first step (`ask` continues the check's prompt cache, which holds all but
it), is pointed from the shares its heads gave at the token before (`seeded_pointers`), and the
first answer token follows the memory's own sentence rather than another "is" or quote in the read.

Every query of a chunk reads the same rows, so the memory logits are one matmul per kv group
(`shared_rows_attention`), differentiable; without a gradient on the CPU they go through
PyTorch's fused attention, which gives the log-sum-exp the merge with the local part needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from memformer.kernels.reference import can_fuse, fused_attention, local_attention


@dataclass
class CopyPointer:
    """The copy pointer of one memory layer over one pinned read (see the module docstring).

    beta: weight of the previous step's share on the row before. share: [B, Hq, R] each head's
    share of the one softmax (local and memory together) on each laid-out row at the last query
    seen so far, or None before the first. A step's bias applies only to a single new query
    (T == 1, a generated token) over the same rows as the step before."""
    beta: float
    share: torch.Tensor | None = None

    def bias(self, B: int, Hq: int, T: int, R: int, rest: torch.Tensor | None = None) -> torch.Tensor | None:
        """[B, Hq, 1, R] memory-logit bias for this step, or None (no earlier step of this shape,
        or a query block of T > 1: a prompt is read as it is). rest: [B] bool, rows that get no
        bias this step (their last token ended a sentence or line: the item copied has ended)."""
        if T != 1 or self.share is None or tuple(self.share.shape) != (B, Hq, R):
            return None
        after = torch.nn.functional.pad(self.share[..., :-1], (1, 0))                 # [B, Hq, R] row j-1's share at j
        if rest is not None and tuple(rest.shape) == (B,):
            after = after * (~rest.to(after.device)).view(B, 1, 1)
        return self.beta * after[:, :, None, :]

    def update(self, share_last: torch.Tensor) -> None:
        """Keep share_last [B, Hq, R], the last query's share per row, for the next step."""
        self.share = share_last.detach()


def seeded_pointers(beta: float, shares: dict, R: int) -> dict:
    """{layer: CopyPointer} that start from shares {layer: [B, Hq, R0]} kept at a prompt's last
    token but one (a check's prompt cache, `question_reads.candidate_reads`), for reads laid out in
    R <= R0 rows: -1 pads a row on the left, so a read's own rows are the last R columns."""
    return {i: CopyPointer(beta, s[..., -R:]) for i, s in shares.items() if s.shape[-1] >= R}


def block_attention(mem, q_rot, k_local, v_local, blocks, *, block_size: int, scale: float, rotary_fn,
                    row_rotation, slot_rotation, local_mask=None, mem_bias=None, with_probs: bool = False,
                    local=None, pointer: CopyPointer | None = None, rest: torch.Tensor | None = None):
    """Attention over [local keys ‖ rows of the pinned memory blocks], one softmax per query.

    mem: LayerMemory [B or 1, Hkv, M, D] (keys, values, positions, slots, valid [B or 1, M]).
    q_rot [B, Hq, T, D]: queries rotated at their local positions.
    k_local, v_local [B, Hkv, S, D]: local keys/values (queries are the last T of S unless
        local_mask says otherwise); mem_bias [Hq]: the memory gate, added to memory logits.
    blocks [B, n]: block ids read by every query (`MemformerForCausalLM.reading_blocks`).
    local: (out [B, Hq, T, D], lse [B, Hq, T]) of the local attention when the caller has it.
    pointer: the layer's `CopyPointer` for this read (biases a generated token's memory logits
        and keeps its shares for the next), or None; rest [B] bool: rows it gives no bias now.
    row_rotation: (cos, sin) [1, R', D] of positions -R' .. -1, R' >= n*block_size: rows are
        rotated by their slot in the contiguous layout (the last R slots when fewer rows exist)
        with `rotary_fn` (the backbone's apply_rotary_pos_emb).
    slot_rotation: (cos, sin) [1, W, D] of positions 0 .. W-1 with unit scale: undoes the rotation
        each row was stored with, at its window slot (`mem.slots`).
    returns (out [B, Hq, T, D] in q_rot's dtype,
             rows [B, 1, T, R] memory rows read (-1 = none; same for all heads),
             probs [B, 1, T, R] their attention probability, mean over heads; None unless with_probs).
    """
    B = q_rot.shape[0]
    rows, keys, values = block_rows(mem, blocks, B, block_size=block_size, rotary_fn=rotary_fn,
                                    row_rotation=row_rotation, slot_rotation=slot_rotation, device=q_rot.device)
    return rows_attention(q_rot, k_local, v_local, rows, keys, values, scale=scale, local_mask=local_mask,
                          mem_bias=mem_bias, with_probs=with_probs, local=local, pointer=pointer, rest=rest)


def block_rows(mem, blocks, B: int, *, block_size: int, rotary_fn, row_rotation, slot_rotation, device):
    """The rows of memory blocks laid out contiguously, as `block_attention` reads them.

    mem: LayerMemory [b, Hkv, M, D]; blocks [B or 1, n] block ids (-1 pads: a padded row's blocks
    sort first, so its real blocks take the same layout slots as unpadded); row_rotation /
    slot_rotation as in `block_attention`. returns (rows [B, R] memory row ids in layout order, -1
    where a block is short, evicted or padding; keys, values [B, Hkv, R, D] float, keys rotated at layout positions -R .. -1)."""
    # a memory of one stream (a corpus, or a question's candidates) is read by every row; only
    # the rows found are touched, never all M (this runs at every generated token)
    positions, valid = mem.positions.to(device), mem.valid.to(device)                 # [b, M]
    top_blocks = blocks.to(device).expand(B, -1).sort(dim=-1).values                  # [B, n] document order
    first = (top_blocks.clamp(min=0) * block_size).contiguous()                       # [B, n] first position
    if positions.shape[0] == 1:
        start = torch.searchsorted(positions[0].contiguous(), first)                  # [B, n]
    else:
        start = torch.searchsorted(positions.contiguous(), first)

    # rows of the chosen blocks: [B, n*block_size], -1 where a block is short, evicted or padding
    rows = start[..., None] + torch.arange(block_size, device=device)                 # [B, n, bs]
    M = positions.shape[1]
    rc = rows.clamp(max=max(M - 1, 0)).reshape(B, -1)                                 # [B, R]
    at = positions.expand(B, -1).gather(1, rc).view_as(rows)                          # [B, n, bs]
    same = valid.expand(B, -1).gather(1, rc).view_as(rows) & (at // block_size == top_blocks[..., None])
    same = same & (top_blocks[..., None] >= 0)
    rows = torch.where((rows < M) & same, rows, -1).view(B, -1)                       # [B, R]
    R = rows.shape[-1]

    keys, values = gather_rows(mem, rows)                                             # [B, Hkv, R, D] float
    slots = mem.slots.to(rows.device).expand(B, -1).gather(1, rows.clamp(min=0)).clamp(min=0)  # [B, R]
    cos_s, sin_s = (x[0].to(keys.device, keys.dtype)[slots] for x in slot_rotation)  # [B, R, D] at each row's slot
    cos_r, sin_r = (x.to(keys.device, keys.dtype) for x in row_rotation)             # [1, R', D]
    if cos_r.shape[1] < R:
        raise ValueError(f"row_rotation covers {cos_r.shape[1]} slots, the blocks read {R}")
    cos_r, sin_r = cos_r[:, -R:], sin_r[:, -R:]                                       # [1, R, D] at -R .. -1
    # one rotation by the difference of the two angles (undo the slot's, apply the layout's):
    # cos(a - b) = cos a cos b + sin a sin b, sin(a - b) = sin a cos b - cos a sin b, per row, so
    # the heads' keys are rotated once
    cos = cos_r * cos_s + sin_r * sin_s                                               # [B, R, D]
    sin = sin_r * cos_s - cos_r * sin_s
    # the backbone's RoPE function rotates (q, k); a query of no heads leaves it only the keys' work
    keys = rotary_fn(keys[:, :0], keys, cos, sin)[1]                                  # at -R .. -1
    return rows, keys, values


def rows_attention(q_rot, k_local, v_local, rows, keys, values, *, scale: float, local_mask=None, mem_bias=None,
                   with_probs: bool = False, local=None, pointer: CopyPointer | None = None,
                   rest: torch.Tensor | None = None):
    """`shared_rows_attention` over laid-out rows (`block_rows`: rows [B, R], keys, values
    [B, Hkv, R, D]), returning what `block_attention` returns."""
    B, Hq, T, D = q_rot.shape
    R = rows.shape[-1]
    out, probs = shared_rows_attention(q_rot, k_local, v_local, keys, values, rows >= 0, scale=scale,
                                       local_mask=local_mask, mem_bias=mem_bias, with_probs=with_probs,
                                       local=local, pointer=pointer, rest=rest)
    read = rows[:, None, None, :].expand(B, 1, T, R)                                  # [B, 1, T, R]
    probs = probs.mean(dim=1, keepdim=True).detach() if with_probs else None          # [B, 1, T, R]
    return out, read, probs


def shared_rows_attention(q, k_local, v_local, k_rows, v_rows, row_ok, *, scale: float, local_mask=None,
                          mem_bias=None, with_probs: bool = False, local=None, pointer: CopyPointer | None = None,
                          rest: torch.Tensor | None = None):
    """One softmax of every query over [its local keys ‖ the same R memory rows] (fp32 inside).

    Every query of a block read reads the same rows, so the memory logits are one matmul per kv
    group, [B, Hq, T, R], never the per-query gather [B, Hq, T, R, D] of the kNN kernel (which
    needs per-query ids); differentiable, as training reads blocks through it too.
    q [B, Hq, T, D]; k_local, v_local [B, Hkv, S, D] (queries are the last T of S unless
    local_mask says otherwise); k_rows, v_rows [B, Hkv, R, D] already at their layout positions;
    row_ok [B, R] bool (False = no row); mem_bias [Hq] (the memory gate) or None; local: the local
    attention's (out, lse) already computed for these queries, or None; pointer: a `CopyPointer`
    (its bias is added to a single query's memory logits; the last query's shares are kept in it);
    rest [B] bool: rows the pointer gives no bias this step.
    returns (out [B, Hq, T, D] in q's dtype, probs [B, Hq, T, R] each row's share of the one
    softmax, or None unless with_probs)."""
    B, Hq, T, D = q.shape
    out_loc, lse_loc = local if local is not None else local_attention(q, k_local, v_local, scale, local_mask)  # [B, Hq, T, D], [B, Hq, T]
    extra = None if pointer is None else pointer.bias(B, Hq, T, k_rows.shape[2], rest)   # [B, Hq, 1, R] or None
    # a generated token under the pointer takes the matmul path (its bias, its shares); a prompt
    # keeps the fused one and gets its last query's shares apart
    if extra is not None or with_probs or (pointer is not None and T == 1) or not can_fuse(q, k_rows, v_rows, mem_bias):
        out_mem, lse_mem, p = _rows_softmax(q, k_rows, v_rows, row_ok, scale, mem_bias, extra)
    else:
        out_mem, lse_mem = _rows_flash(q, k_rows, v_rows, row_ok, scale, mem_bias)
        p = None
    # merge the two partial softmaxes by their log-sum-exp
    lse = torch.logaddexp(lse_loc, lse_mem)                                           # [B, Hq, T]
    w_loc = torch.nan_to_num(torch.exp(lse_loc - lse), nan=0.0)[..., None]
    w_mem = torch.nan_to_num(torch.exp(lse_mem - lse), nan=0.0)[..., None]
    out = torch.nan_to_num(w_loc * out_loc + w_mem * out_mem, nan=0.0).to(q.dtype)
    if pointer is not None:
        last = p[:, :, -1] if p is not None else _rows_softmax(q[:, :, -1:], k_rows, v_rows, row_ok, scale, mem_bias)[2][:, :, 0]
        pointer.update(last * w_mem[:, :, -1])                                        # [B, Hq, R]
    return out, (p * w_mem if with_probs else None)


def _rows_softmax(q, k_rows, v_rows, row_ok, scale: float, mem_bias, extra=None):
    """The memory part of `shared_rows_attention` by plain matmuls (differentiable; gives the
    probabilities): (out [B, Hq, T, D], lse [B, Hq, T], probs within memory [B, Hq, T, R]).
    extra: a logit bias [B, Hq, T or 1, R] (the copy pointer's) or None."""
    B, Hq, T, D = q.shape
    Hkv, R = k_rows.shape[1], k_rows.shape[2]
    G = Hq // Hkv
    qg = q.float().reshape(B, Hkv, G * T, D)                                          # query heads of a kv group
    s = (qg @ k_rows.float().transpose(-1, -2)).view(B, Hq, T, R) * scale            # [B, Hq, T, R]
    if mem_bias is not None:
        s = s + mem_bias.float().view(1, Hq, 1, 1)
    if extra is not None:
        s = s + extra.to(s.device, s.dtype)
    s = s.masked_fill(~row_ok.to(s.device)[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                                  # [B, Hq, T]
    p = torch.nan_to_num(torch.exp(s - lse[..., None]), nan=0.0)                     # softmax within memory
    out = (p.view(B, Hkv, G * T, R) @ v_rows.float()).view(B, Hq, T, D)              # [B, Hq, T, D]
    return out, lse, p


def _rows_flash(q, k_rows, v_rows, row_ok, scale: float, mem_bias):
    """The memory part of `shared_rows_attention` by PyTorch's fused CPU attention (no gradient,
    fp32), about 4x faster than `_rows_softmax` at 64 queries x 2,048 rows: the G query heads of
    a kv group are one query axis (every query reads the same rows, so no mask but the missing
    rows'). The memory gate adds a constant to every memory logit of a head, so it moves only
    the head's lse. Returns (out [B, Hq, T, D], lse [B, Hq, T])."""
    B, Hq, T, D = q.shape
    Hkv, R = k_rows.shape[1], k_rows.shape[2]
    qg = q.reshape(B, Hkv, (Hq // Hkv) * T, D)                                        # [B, Hkv, G*T, D]
    ok = row_ok.to(q.device)                                                          # [B, R]
    mask = None
    if not bool(ok.all()):                                                            # [B, Hkv, G*T, R]
        mask = torch.zeros(B, 1, 1, R, device=q.device).masked_fill_(~ok[:, None, None, :], float("-inf"))
        mask = mask.expand(B, Hkv, qg.shape[2], R)
    out, lse = fused_attention(qg, k_rows.float(), v_rows.float(), scale, mask)
    out, lse = out.reshape(B, Hq, T, D), lse.reshape(B, Hq, T)                        # [B, Hq, T, D], [B, Hq, T]
    if mem_bias is not None:
        lse = lse + mem_bias.float().view(1, Hq, 1)
    return out, lse


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
    block ids [n] or [batch, n] -> [batch, n] (batch 1 for the corpus: one stream for all).

    A memory of one sequence (and the corpus) also takes [K, n]: K reads of the same memory by a
    batch of K, as a question's candidate reads are scored in one forward (`question_reads`).
    -1 pads a row that reads fewer blocks than the longest; every row reads at least one."""
    bs = model.memory_config.block_size
    ids = torch.as_tensor(blocks, dtype=torch.long)
    ids = ids[None] if ids.dim() == 1 else ids                                  # [B, n]
    memories = model.block_memories(source)
    batch = next(iter(memories.values())).batch if memories else 0
    if not batch or not any(len(m) for m in memories.values()):
        raise ValueError("reading_blocks: nothing is memorized" if source == "own" else
                         "reading_blocks: no corpus memory is attached")
    if ids.dim() != 2 or ids.shape[1] < 1 or (ids.shape[0] not in (1, batch) and batch != 1):
        shape = "[n] or [K, n]" if batch == 1 else f"[n] or [{batch}, n]"
        raise ValueError(f"reading_blocks: blocks must be {shape} with n >= 1, got {tuple(ids.shape)}")
    have = model.memory_blocks(source)
    if int(ids.min()) < -1 or int(ids.max()) >= have:
        raise ValueError(f"reading_blocks: block ids must be in [0, {have}) (memory of {have} blocks of "
                         f"{bs}; -1 pads a shorter row), got {ids.min().item()}..{ids.max().item()}")
    if bool((ids < 0).all(dim=1).any()):
        raise ValueError("reading_blocks: every row must read at least one block (-1 only pads a shorter row)")
    if any(len(set(row) - {-1}) < sum(b >= 0 for b in row) for row in ids.tolist()):
        raise ValueError("reading_blocks: a block id repeats (each block is read once)")
    if any(bool((m.slots[m.valid] < 0).any()) for m in memories.values()):
        raise ValueError("reading_blocks: memory rows without their window slot (added without `slots`) "
                         "cannot be laid out; memorize() the text")
    return ids.expand(batch, -1).contiguous() if ids.shape[0] == 1 else ids


@dataclass
class LayerReads:
    """What one layer's chosen block reads keep between the forward calls of one generation, so
    that a token read with a KV cache reads exactly the blocks a forward over the whole sequence
    gives it (kept on the cache, `reads_on_cache`, so a copied cache carries it).

    queries [B, Hkv, P, D]: the chooser queries (mean over each kv group) of positions 0 .. P-1;
    chunk: the chunk whose laid-out rows are kept; rows: (rows, keys, values) of it (`block_rows`);
    memory_rows: len(memory) when they were read (a grown memory is chosen from again)."""
    queries: torch.Tensor
    chunk: int = -1
    rows: tuple | None = None
    memory_rows: int = -1


def reads_on_cache(cache) -> dict | None:
    """{layer index: LayerReads} kept on a transformers KV cache (None without a cache, or one
    that takes no attribute)."""
    if cache is None:
        return None
    store = getattr(cache, "memformer_reads", None)
    if store is None:
        try:
            cache.memformer_reads = store = {}
        except AttributeError:
            return None
    return store


def prompt_read_start(prompt_positions: int, block_size: int, chunks: int | None) -> int:
    """The first window position that reads memory when only the last `chunks` chunks of a
    prompt of `prompt_positions` positions (sink included) read: the start of its chunk
    (`chosen_block_attention`'s read_from). None: every chunk reads (0)."""
    if chunks is None:
        return 0
    return max(0, ((prompt_positions - 1) // block_size - chunks + 1) * block_size)


def stored_blocks(mem, block_size: int) -> int:
    """Blocks a memory spans: the last stored position's block + 1 (how many `chosen_blocks` can
    choose from)."""
    return int((mem.positions // block_size).clamp(min=0).max()) + 1


def chosen_blocks(mem, choosers, n: int, block_size: int) -> torch.Tensor:
    """The `n` memory blocks each chooser query picks: a block's score is the largest logit of the
    chooser against any of its keys, summed over kv heads (one layout per layer).
    mem: LayerMemory [b, Hkv, M, D]; choosers [B, Hkv, C, D]: one query per chunk, rotated as kNN
    reads rotate them (one window further than their local position, against keys at their
    window slot). returns blocks [B, C, n], best first; ids of blocks without rows read nothing."""
    B, Hkv, C, D = choosers.shape
    keys = mem.keys.float()
    if mem.key_scales is not None:
        keys = keys * mem.key_scales[..., None]
    keys = keys.to(choosers.device)                                                   # [b, Hkv, M, D]
    s = choosers.float() @ keys.transpose(-1, -2)                                     # [B, Hkv, C, M]
    valid = mem.valid.to(choosers.device)                                             # [b, M]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    block = (mem.positions.to(choosers.device) // block_size).clamp(min=0)            # [b, M]
    nb = stored_blocks(mem, block_size)
    per_block = torch.full((B, Hkv, C, nb), float("-inf"), device=choosers.device)
    per_block = per_block.scatter_reduce(3, block[:, None, None, :].expand_as(s), s, reduce="amax")
    score = per_block.sum(1)                                                          # [B, C, nb]
    return score.topk(min(n, nb), dim=-1).indices                                     # [B, C, n]


def chunk_chooser(queries: torch.Tensor, c: int, chunk: int, known: int = 0) -> torch.Tensor:
    """The query that chooses chunk c's blocks: the mean query of chunk c-1, so no query's read
    depends on a later token (chunk 0: its first query). queries [B, Hkv, P, D] of positions
    0 .. P-1, of which those before `known` are unknown (a cache made without memory reads): a
    chunk with no known query before it is chosen by its first known query. -> [B, Hkv, D]"""
    lo, hi = max((c - 1) * chunk, known), c * chunk
    if c > 0 and hi > lo:
        return queries[:, :, lo:hi].mean(2)
    return queries[:, :, max(c * chunk, known)]


def chosen_block_attention(mem, q_rot, q_mem, k_local, v_local, *, n: int, block_size: int, scale: float,
                           rotary_fn, row_rotation, slot_rotation, local_mask=None, mem_bias=None,
                           with_probs: bool = False, offset: int = 0, reads: LayerReads | None = None,
                           read_from: int = 0):
    """Block reads with no question: every chunk of `block_size` positions reads the `n` blocks its
    layer's queries choose (`chunk_chooser`, `chosen_blocks`), laid out before the local window as
    question reads lay them out, in one softmax with its local keys (`rows_attention`). A chunk
    that ends at or before position `read_from` reads nothing (its output is the local attention's,
    its rows -1): a long prompt's early chunks can skip the read.

    q_rot [B, Hq, T, D] (local positions), q_mem [B, Hq, T, D] (the chooser's rotation): queries
    at positions offset .. offset+T-1 (offset: tokens already in the KV cache); k_local, v_local
    [B, Hkv, S, D]; local_mask as HF gives it (None = causal, queries last T of S).
    reads: the `LayerReads` the calls before this one left (None at offset 0 or when unknown); a
    chunk whose rows it holds is not chosen or gathered again.
    returns (out [B, Hq, T, D], rows [B, 1, T, R] and probs [B, 1, T, R] (both None unless
    with_probs: the rows read are only kept for recordings), LayerReads after)."""
    B, Hq, T, D = q_rot.shape
    Hkv, bs = k_local.shape[1], block_size
    qg = q_mem.float().view(B, Hkv, Hq // Hkv, T, D).mean(2)                          # [B, Hkv, T, D]
    past = reads.queries if reads is not None else None
    if past is not None and past.shape[:2] == qg.shape[:2] and past.shape[2] >= offset:
        queries, known = torch.cat([past[:, :, :offset], qg], dim=2), 0               # [B, Hkv, offset + T, D]
    else:
        queries, known, reads = torch.cat([qg.new_zeros(B, Hkv, offset, D), qg], dim=2), offset, None
    first, last = offset // bs, (offset + T - 1) // bs
    start = max(first, read_from // bs)                                               # the first chunk that reads
    size = len(mem)
    kept = reads is not None and reads.rows is not None and reads.chunk == first and reads.memory_rows == size
    todo = [c for c in range(start, last + 1) if not (kept and c == first)]
    blocks = {}
    if todo:                                                                          # [B, len(todo), n]
        choosers = torch.stack([chunk_chooser(queries, c, bs, known) for c in todo], dim=2)   # [B, Hkv, C, D]
        blocks = dict(zip(todo, chosen_blocks(mem, choosers, n, bs).unbind(1)))
    # the local part once for every query (one causal call), the memory part chunk by chunk
    out_loc, lse_loc = local_attention(q_rot, k_local, v_local, scale, local_mask)   # [B, Hq, T, D], [B, Hq, T]
    laid = reads.rows if kept else None
    outs, rows, probs = [], [], []
    R = min(n, stored_blocks(mem, bs)) * bs                                          # rows a chunk reads
    for c in range(first, last + 1):
        a, b = max(c * bs, offset) - offset, min((c + 1) * bs, offset + T) - offset
        if c < start:                                                                 # before read_from: local only
            outs.append(out_loc[:, :, a:b].to(q_rot.dtype))
            if with_probs:
                rows.append(torch.full((B, 1, b - a, R), -1, dtype=torch.long, device=q_rot.device))
                probs.append(q_rot.new_zeros(B, 1, b - a, R, dtype=torch.float32))
            continue
        if c in blocks:
            laid = block_rows(mem, blocks[c], B, block_size=bs, rotary_fn=rotary_fn, row_rotation=row_rotation,
                              slot_rotation=slot_rotation, device=q_rot.device)    # rows [B, R], keys, values
        o, r, p = rows_attention(q_rot[:, :, a:b], k_local, v_local, *laid, scale=scale, mem_bias=mem_bias,
                                 with_probs=with_probs, local=(out_loc[:, :, a:b], lse_loc[:, :, a:b]))
        outs.append(o)
        if with_probs:
            rows.append(r), probs.append(p)
    after = LayerReads(queries, last, laid, size)
    # every chunk reads min(n, stored blocks) blocks of block_size rows (-1 where missing): the same R for all
    if not with_probs:
        return torch.cat(outs, dim=2), None, None, after
    return torch.cat(outs, dim=2), torch.cat(rows, dim=2), torch.cat(probs, dim=2), after
