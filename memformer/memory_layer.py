"""MemoryAttention: wraps one backbone attention module so it reads and writes kNN memory.

The wrapper reuses the backbone's own projections, RoPE function, KV cache and attention
implementation; it adds (1) a read of this layer's memory: the blocks a question pinned (`memformer.blocks`, every memory
layer) or, with no question, a kNN search with the query moved one window further (kNN layers);
(2) one softmax over local keys + memory keys (`memformer.kernels.knn_attention`); and (3) hands
the window's keys (rotated at their window position) and values to the model, which writes them
to memory after the window (so a token never retrieves itself or anything after it).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from memformer.blocks import CopyPointer, block_attention, chosen_block_attention, gather_rows, reads_on_cache
from memformer.kernels import knn_attention


@dataclass
class MemoryRuntime:
    """The read/write mode shared by the model and all its memory layers for one pass; what each
    layer holds (its memory, its pending keys, what it read) lives on the layer itself.

    enabled: False turns every memory layer into the plain backbone attention (wins over read/write).
    read: memory layers read memory. write: they keep (k, v) of this pass in `pending`.
    record: each layer keeps the attention mass its memory rows received (evidence spans).
    top_k: keys retrieved per query head by kNN reads.
    layer_blocks: blocks each chunk of queries reads by the layer's own choice when no blocks are
        pinned (0 = kNN reads); layer_rotation: (cos, sin) of positions -R .. -1 of their layout.
    block_size: tokens per memory block (question reads).
    pinned_blocks: None, or block ids [B, n] every memory layer reads (`reading_blocks`).
    pinned_source: "own" (the blocks are the layer's own memory's) or "corpus" (the attached
        corpus memory's).
    q_rotation: (cos, sin) of the window distance W: kNN reads move the query W further, so every
        memory window looks like the window just before the current one.
    row_rotation / slot_rotation: (cos, sin) of positions -R .. -1 (the pinned blocks' layout) and
        of 0 .. W-1 at unit scale (undoes a stored key's rotation at its window slot).
    write_slice: slice of the time axis whose keys/values are written (drops sink and context).
    read_from: layer block reads skip the chunks that end at or before this window position
        (`generate` sets it from its `prompt_reads`; 0 = every chunk reads).
    pointers: {layer index: `CopyPointer`} of the pinned read in progress, or None (no copy
        pointer: `MemoryConfig.copy_pointer` 0, or no pinned read); copy_pointer: its weight;
        pointer_rest: [B] bool, rows that have generated a token ending a sentence or line since
        the read's first forward (the pointer gives them no bias; set by
        `MemformerForCausalLM.reading_blocks`), or None.
    """
    enabled: bool = True
    read: bool = False
    write: bool = False
    record: bool = False
    top_k: int = 32
    block_size: int = 64
    pinned_blocks: torch.Tensor | None = None
    pinned_source: str = "own"
    q_rotation: tuple | None = None
    row_rotation: tuple | None = None
    slot_rotation: tuple | None = None
    write_slice: slice = field(default_factory=lambda: slice(None))
    layer_blocks: int = 0
    layer_rotation: tuple | None = None
    read_from: int = 0
    pointers: dict | None = None
    copy_pointer: float = 0.0
    pointer_rest: torch.Tensor | None = None


@contextlib.contextmanager
def memory_pass(runtime: MemoryRuntime, layers: dict, *, read: bool | None = None, write: bool | None = None,
                record: bool | None = None, enabled: bool | None = None, write_slice: slice | None = None,
                layer_blocks: int | None = None, read_from: int | None = None):
    """Within this block the memory layers run one pass in the mode given (None: as it is) and
    yield `runtime`; on leaving, the mode is restored and the keys the pass kept for writing
    (`pending` of every layer in `layers`, {index: MemoryAttention}) are dropped, so whoever
    writes them does so inside the block. The model's passes (memorize, forward, generate) and
    training's (`memformer.training.crossbatch.runtime_state`) all go through it."""
    rt = runtime
    old = (rt.read, rt.write, rt.record, rt.enabled, rt.write_slice, rt.layer_blocks, rt.read_from)
    for name, value in (("read", read), ("write", write), ("record", record), ("enabled", enabled),
                        ("write_slice", write_slice), ("layer_blocks", layer_blocks), ("read_from", read_from)):
        if value is not None:
            setattr(rt, name, value)
    try:
        yield rt
    finally:
        rt.read, rt.write, rt.record, rt.enabled, rt.write_slice, rt.layer_blocks, rt.read_from = old
        for m in layers.values():
            m.pending = None


@contextlib.contextmanager
def pinned_reads(runtime: MemoryRuntime, blocks: torch.Tensor, source: str, row_rotation: tuple,
                 copy_pointer: float = 0.0):
    """Within this block every memory layer reads the blocks `blocks` [B or 1, n] of its memory
    (source "own") or of the attached corpus ("corpus"), laid out at positions -R .. -1 whose
    rotation `row_rotation` (cos, sin) [1, R, D] gives (`MemformerForCausalLM.reading_blocks`;
    training's block reads, `memformer.training.crossbatch.reading_layout`). copy_pointer > 0:
    tokens generated one at a time are pointed at the row after the one each head read at the
    step before (`memformer.blocks.CopyPointer`); each entry starts without a step before."""
    rt = runtime
    old = (rt.pinned_blocks, rt.pinned_source, rt.row_rotation, rt.pointers, rt.copy_pointer)
    rt.pinned_blocks, rt.pinned_source, rt.row_rotation = blocks, source, row_rotation
    rt.pointers, rt.copy_pointer = ({} if copy_pointer > 0 else None), float(copy_pointer)
    try:
        yield rt
    finally:
        rt.pinned_blocks, rt.pinned_source, rt.row_rotation, rt.pointers, rt.copy_pointer = old


class MemoryAttention(nn.Module):
    """A backbone attention module with kNN memory. Drop-in: same forward signature and outputs.

    Per layer: `memory` (this layer's LayerMemory, None until something is memorized), `corpus`
    (an attached read-only corpus memory, batch 1, shared by every sequence), `knn` (whether this
    layer runs kNN reads when no blocks are pinned), `pending` ((k, v) of the last writing pass,
    which the model appends to `memory`), and with `runtime.record` the reads it made:
    `reads` / `corpus_reads`, a list of (row ids, probs) [B, Hq or 1, T, K] per forward call."""

    def __init__(self, attn: nn.Module, layer_idx: int, rotary_fn, eager_fn, runtime: MemoryRuntime,
                 knn: bool = True, gate_init: float = 0.0):
        super().__init__()
        self.attn = attn
        self.eager_fn = eager_fn
        self.layer_idx = layer_idx
        self.rotary_fn = rotary_fn
        self.runtime = runtime  # shared, not a submodule
        cfg = attn.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = attn.head_dim
        # Per-query-head additive logit bias on memory keys: the memory gate. 0 = memory and
        # local keys compete in one plain softmax (what works training-free).
        self.memory_gate = nn.Parameter(torch.full((self.num_heads,), float(gate_init)))
        self.knn = knn
        self.memory = None
        self.corpus = None
        self.pending = None
        self.reads: list = []
        self.corpus_reads: list = []

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                past_key_values=None, cache=None, **kwargs):
        # transformers >= 5.24 passes the KV cache as `cache` (earlier: `past_key_values`)
        past_key_values = cache if cache is not None else past_key_values
        attn, rt = self.attn, self.runtime
        B, T, _ = hidden_states.shape
        D, Hq, Hkv = self.head_dim, self.num_heads, self.num_kv_heads
        q = attn.q_proj(hidden_states).view(B, T, Hq, D).transpose(1, 2)      # [B, Hq, T, D]
        k = attn.k_proj(hidden_states).view(B, T, Hkv, D).transpose(1, 2)     # [B, Hkv, T, D] un-rotated
        v = attn.v_proj(hidden_states).view(B, T, Hkv, D).transpose(1, 2)     # [B, Hkv, T, D]
        cos, sin = position_embeddings
        q_rot, k_rot = self.rotary_fn(q, k, cos, sin)

        if rt.write and rt.enabled:
            # rotated at their window position: memory keeps the order of its tokens
            self.pending = (k_rot[:, :, rt.write_slice].detach(), v[:, :, rt.write_slice].detach())
        offset = 0                                                             # tokens already in the KV cache
        if past_key_values is not None:
            offset = past_key_values.get_seq_length(self.layer_idx)
            k_all, v_all = past_key_values.update(k_rot, v, self.layer_idx)
        else:
            k_all, v_all = k_rot, v

        pinned = rt.pinned_blocks is not None
        from_corpus = pinned and rt.pinned_source == "corpus"                  # question reads of a corpus
        reading = rt.read and rt.enabled and (pinned or self.knn)
        mem = (self.corpus if from_corpus else self.memory) if reading else None
        corpus = self.corpus if reading and not pinned else None
        mem = mem if mem is not None and len(mem) > 0 else None
        corpus = corpus if corpus is not None and len(corpus) > 0 else None
        if mem is None and corpus is None:
            # No memory to read: exactly the backbone's own attention path.
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, self.eager_fn)
            out, _ = interface(attn, q_rot, k_all, v_all, attention_mask,
                               dropout=0.0, scaling=attn.scaling, **kwargs)   # [B, T, Hq, D]
            return attn.o_proj(out.reshape(B, T, Hq * D)), None

        if pinned:                                                             # question reads
            pointer = None if rt.pointers is None else rt.pointers.get(self.layer_idx)
            if rt.pointers is not None and pointer is None:                    # this read's copy pointer, made once
                pointer = rt.pointers[self.layer_idx] = CopyPointer(rt.copy_pointer)
            out, rows, probs = block_attention(mem, q_rot, k_all, v_all, rt.pinned_blocks,
                                               block_size=rt.block_size, scale=attn.scaling,
                                               rotary_fn=self.rotary_fn, row_rotation=rt.row_rotation,
                                               slot_rotation=rt.slot_rotation, local_mask=attention_mask,
                                               mem_bias=self.memory_gate, pointer=pointer, rest=rt.pointer_rest,
                                               with_probs=rt.record)           # [B, Hq, T, D]; [B, 1, T, R]
            if rt.record:
                (self.corpus_reads if from_corpus else self.reads).append((rows, probs))
            return attn.o_proj(out.transpose(1, 2).reshape(B, T, Hq * D)), None

        # kNN reads: the query moved a window further against keys rotated at their window slot
        q_mem = self.rotary_fn(q_rot, q_rot[:, :0], *rt.q_rotation)[0]          # [B, Hq, T, D] (no key to rotate)
        G = Hq // Hkv
        if rt.layer_blocks and corpus is None:                                 # block reads chosen by this layer
            kept = reads_on_cache(past_key_values)                             # what earlier calls chose
            out, rows, probs, after = chosen_block_attention(
                mem, q_rot, q_mem, k_all, v_all, n=rt.layer_blocks, block_size=rt.block_size, scale=attn.scaling,
                rotary_fn=self.rotary_fn, row_rotation=rt.layer_rotation, slot_rotation=rt.slot_rotation,
                local_mask=attention_mask, mem_bias=self.memory_gate, with_probs=rt.record, offset=offset,
                reads=kept.get(self.layer_idx) if kept is not None else None, read_from=rt.read_from)
            if kept is not None:
                kept[self.layer_idx] = after
            if rt.record:
                self.reads.append((rows, probs))
            return attn.o_proj(out.transpose(1, 2).reshape(B, T, Hq * D)), None
        queries = q_mem.reshape(B, Hkv, G * T, D)                              # query heads of a kv group
        to_heads = lambda x: x.view(B, Hkv, G, T, -1).reshape(B, Hq, T, -1)   # [B, Hkv, G*T, K] -> [B, Hq, T, K]
        if corpus is None:
            scores, ids = mem.search(queries, rt.top_k)                        # [B, Hkv, G*T, K]
            ids, scores = to_heads(ids), to_heads(scores)                      # scores = q_mem . k_mem[ids]
            k_mem, v_mem, own_ids, corpus_ids = mem.keys, mem.values, ids, None
            k_scale, v_scale = getattr(mem, "key_scales", None), getattr(mem, "value_scales", None)
        else:
            k_mem, v_mem, ids, scores, own_ids, corpus_ids = merged_retrieval(mem, corpus, queries, rt.top_k, G, T)
            k_scale = v_scale = None
        res = knn_attention(q_rot, k_all, v_all, k_mem, v_mem, ids, q_mem=q_mem, mem_scores=scores,
                            scale=attn.scaling, local_mask=attention_mask, mem_bias=self.memory_gate,
                            k_scale=k_scale, v_scale=v_scale, return_mem_probs=rt.record)
        out = res[0]                                                           # [B, Hq, T, D]
        if rt.record:  # attention mass of each retrieved row (evidence; tests)
            probs = res[2].detach()
            if own_ids is not None:
                self.reads.append((own_ids, probs))
            if corpus_ids is not None:
                self.corpus_reads.append((corpus_ids, probs))
        out = out.transpose(1, 2).reshape(B, T, Hq * D)                        # [B, T, Hq*D]
        return attn.o_proj(out), None


def merged_retrieval(mem, corpus, queries: torch.Tensor, k: int, G: int, T: int):
    """Top-k over the sequence's own memory and a read-only corpus memory together.

    queries [B, Hkv, G*T, D]. The winners are gathered (dequantised) into per-query blocks, so the
    one-softmax attention reads them like any memory: returns k_mem, v_mem [B, Hkv, G*T*k, D],
    ids / scores [B, Hq, T, k] (ids index those blocks, -1 = none), and the winners' row ids in
    the own memory and in the corpus ([B, Hq, T, k], -1 where the slot came from the other one).
    """
    B, Hkv, Q, D = queries.shape
    Hq = Hkv * G
    # the corpus is one memory shared by every sequence: all B*Q queries search it in one call
    cq = queries.transpose(0, 1).reshape(1, Hkv, B * Q, D)                     # [1, Hkv, B*Q, D]
    cs, ci = corpus.search(cq, k)                                              # [1, Hkv, B*Q, k]
    cs = cs.view(Hkv, B, Q, k).transpose(0, 1).to(queries.device)              # [B, Hkv, Q, k]
    ci = ci.view(Hkv, B, Q, k).transpose(0, 1).to(queries.device)
    ck, cv = gather_rows(corpus, ci, per_head=True)
    if mem is not None:
        ms, mi = mem.search(queries, k)                                        # [B, Hkv, Q, k]
        mk, mv = gather_rows(mem, mi, per_head=True)
        scores, pick = torch.cat([ms.to(cs.device), cs], dim=-1).topk(k, dim=-1)  # [B, Hkv, Q, k]
        from_corpus = pick >= k
        slot = (pick % k)[..., None].expand(B, Hkv, Q, k, D)
        keys = torch.where(from_corpus[..., None], ck.gather(3, slot), mk.gather(3, slot))
        values = torch.where(from_corpus[..., None], cv.gather(3, slot), mv.gather(3, slot))
        own = torch.where(from_corpus, -1, mi.to(cs.device).gather(3, pick % k))
        cor = torch.where(from_corpus, ci.gather(3, pick % k), -1)
    else:
        scores, keys, values, cor = cs, ck, cv, ci
        own = None
    none = torch.isinf(scores)                                                 # fewer than k rows exist
    blocks = torch.arange(Q * k, device=queries.device).view(1, 1, Q, k).expand(B, Hkv, Q, k)
    ids = blocks.masked_fill(none, -1)                                         # row of each slot's block
    to_heads = lambda x: x.reshape(B, Hkv, G, T, k).reshape(B, Hq, T, k)      # [B, Hkv, G*T, k] -> [B, Hq, T, k]
    own = None if own is None else to_heads(own.masked_fill(none, -1))
    cor = to_heads(cor.masked_fill(none, -1))
    return (keys.reshape(B, Hkv, Q * k, D), values.reshape(B, Hkv, Q * k, D), to_heads(ids),
            to_heads(scores), own, cor)
