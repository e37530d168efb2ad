"""MemoryAttention: wraps one backbone attention module so it reads and writes kNN memory.

The wrapper reuses the backbone's own projections, RoPE function, KV cache and attention
implementation; it adds (1) a kNN search of this layer's memory with the rotated query,
(2) one softmax over local keys + retrieved keys (`memformer.kernels.knn_attention`), and
(3) hands the window's keys (rotated at their window position in position_mode "window",
un-rotated in "first"/"fixed") and values to the model, which writes them to memory after the
window (so a token never retrieves itself or anything after it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from memformer.kernels import knn_attention


@dataclass
class MemoryRuntime:
    """State shared by the model and all its memory layers for one forward pass.

    enabled: False turns every memory layer into the plain backbone attention (wins over read/write).
    read: memory layers retrieve from memory. write: they hand (k, v) of this pass to `pending`.
    record: keep the attention mass each retrieved row received (for evidence spans).
    memories: layer index -> LayerMemory (None until a memory exists).
    q_rotation: (cos, sin) of the fixed memory distance for position_mode "fixed"/"window", else None.
    store_rotated: position_mode "window" stores keys rotated at their window position.
    write_slice: slice of the time axis whose keys/values are written (drops sink prefixes).
    """
    enabled: bool = True
    read: bool = False
    write: bool = False
    record: bool = False
    top_k: int = 32
    memories: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)
    retrieved: dict = field(default_factory=dict)
    q_rotation: tuple | None = None
    store_rotated: bool = False
    write_slice: slice = field(default_factory=lambda: slice(None))


class MemoryAttention(nn.Module):
    """A backbone attention module with kNN memory. Drop-in: same forward signature and outputs."""

    def __init__(self, attn: nn.Module, layer_idx: int, rotary_fn, eager_fn, runtime: MemoryRuntime,
                 gate_init: float = 0.0):
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

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                past_key_values=None, **kwargs):
        attn, rt = self.attn, self.runtime
        B, T, _ = hidden_states.shape
        D, Hq, Hkv = self.head_dim, self.num_heads, self.num_kv_heads
        q = attn.q_proj(hidden_states).view(B, T, Hq, D).transpose(1, 2)      # [B, Hq, T, D]
        k = attn.k_proj(hidden_states).view(B, T, Hkv, D).transpose(1, 2)     # [B, Hkv, T, D] un-rotated
        v = attn.v_proj(hidden_states).view(B, T, Hkv, D).transpose(1, 2)     # [B, Hkv, T, D]
        cos, sin = position_embeddings
        q_rot, k_rot = self.rotary_fn(q, k, cos, sin)

        if rt.write and rt.enabled:
            # Un-rotated ("first"/"fixed": memory keys enter at one fixed relative position) or
            # rotated at their window position ("window": memory keeps its order).
            k_store = k_rot if rt.store_rotated else k
            rt.pending[self.layer_idx] = (k_store[:, :, rt.write_slice].detach(), v[:, :, rt.write_slice].detach())
        if past_key_values is not None:
            k_all, v_all = past_key_values.update(k_rot, v, self.layer_idx)
        else:
            k_all, v_all = k_rot, v

        mem = rt.memories.get(self.layer_idx) if (rt.read and rt.enabled) else None
        if mem is None or len(mem) == 0:
            # No memory to read: exactly the backbone's own attention path.
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, self.eager_fn)
            out, _ = interface(attn, q_rot, k_all, v_all, attention_mask,
                               dropout=0.0, scaling=attn.scaling, **kwargs)   # [B, T, Hq, D]
            return attn.o_proj(out.reshape(B, T, Hq * D)), None

        # "first": q at its real local position against un-rotated keys (keys "as if first");
        # "fixed": every memory key looks a fixed distance away (InfLLM);
        # "window": q moved a window further against keys rotated at their window position.
        if rt.q_rotation is None:
            q_mem = q_rot
        else:
            base = q_rot if rt.store_rotated else q
            q_mem = self.rotary_fn(base, base, *rt.q_rotation)[0]
        G = Hq // Hkv
        queries = q_mem.reshape(B, Hkv, G * T, D)                              # query heads of a kv group
        scores, ids = mem.search(queries, rt.top_k)                            # [B, Hkv, G*T, K]
        ids = ids.view(B, Hkv, G, T, -1).reshape(B, Hq, T, -1)                # [B, Hq, T, K]
        scores = scores.view(B, Hkv, G, T, -1).reshape(B, Hq, T, -1)          # = q_mem . k_mem[ids]
        track = getattr(mem, "tracks_attention", False)                        # score (H2O) eviction
        res = knn_attention(q_rot, k_all, v_all, mem.keys, mem.values, ids, q_mem=q_mem, mem_scores=scores,
                            scale=attn.scaling, local_mask=attention_mask, mem_bias=self.memory_gate,
                            k_scale=getattr(mem, "key_scales", None), v_scale=getattr(mem, "value_scales", None),
                            return_mem_probs=rt.record or track)
        out = res[0]                                                           # [B, Hq, T, D]
        if rt.record:  # attention mass of each retrieved row (evidence; tests)
            rt.retrieved.setdefault(self.layer_idx, []).append((ids, res[2].detach()))
        if track:
            mem.record_attention(ids, res[2].detach())
        out = out.transpose(1, 2).reshape(B, T, Hq * D)                        # [B, T, Hq*D]
        return attn.o_proj(out), None
