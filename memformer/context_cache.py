"""Context caches: a long prompt's shared part read once, continued any number of times.

    cache = model.context_cache(ctx)                                  # ctx [B, T]
    model.generate(torch.cat([ctx, more], 1), cache=cache)           # runs `more` only

The cache is the transformers `DynamicCache` of generate's prefill over [sink ‖ ctx] (memory read
as in that prefill). It remembers the ids it read and the memory's `MemoryState.version`, and a
generate call given it checks that its input continues those ids over the same memory, then
extends a copy, so the cache is left unchanged for the next call.
"""
from __future__ import annotations

import copy
import inspect

import torch

from memformer.memory_layer import memory_pass


def cache_argument(backbone) -> str:
    """The name the backbone takes a KV cache by: `cache` since transformers 5.24, else
    `past_key_values`."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


@torch.no_grad()
def make_context_cache(model, input_ids: torch.Tensor, return_logits: bool = False):
    """The KV cache of reading input_ids [B, T] as `model.generate`'s prompt: pass it as
    `generate(torch.cat([input_ids, more], 1), cache=cache)` and only `more` and the new tokens
    are run, so the reads of a long prompt's shared part are paid once for any number of
    continuations. T + more + new tokens must fit the local window (window - sink_tokens). The
    cache keeps the memory as it was read: re-create it after memorizing more. Inside
    `reading_blocks` of [K, n] over a memory of one sequence, B = K reads of it. Returns a
    transformers `DynamicCache`; with return_logits, (cache, logits [B, T, V]) where logits[:, t]
    predict the token after input_ids[:, t]."""
    from transformers import DynamicCache
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    B, T = input_ids.shape
    local = model.local_window
    if not 0 < T < local:
        raise ValueError(f"context_cache: the context must hold 1 to {local - 1} tokens (the local window "
                         f"less room for the continuation), got {T}")
    state, backbone = model.state, model.backbone
    if state.memories:
        state.ensure(B, model.runtime.pinned_blocks)
    x = state.with_sink(input_ids, model.memory_config.sink_tokens)      # [B, S + T]
    cache = DynamicCache(config=backbone.config)
    name = cache_argument(backbone)
    # the context's positions by index (a copy): a batch's last T of S + T positions by a slice are
    # no one matrix, and the head over them runs as a batched matmul several times slower
    keep = torch.arange(x.shape[1] - T, x.shape[1], device=model.device) if return_logits else 1
    with memory_pass(model.runtime, model.memory_modules, read=True, write=False):
        out = backbone(input_ids=x.to(model.device), attention_mask=torch.ones_like(x).to(model.device),
                       use_cache=True, logits_to_keep=keep, **{name: cache})
    cache.memformer_ids = x.cpu().clone()              # [sink ‖ context]: checked at reuse
    cache.memformer_version = state.version            # the memory it read
    return (cache, out.logits) if return_logits else cache


def reuse_context(model, context, input_ids: torch.Tensor):
    """A copy of a `make_context_cache` cache for one generate call (the call extends the cache
    it gets), after checking that input_ids [B, T] continue exactly the context it was made from,
    over the same memory (ValueError otherwise)."""
    ctx = context.memformer_ids
    x = model.state.with_sink(input_ids, model.memory_config.sink_tokens).cpu()
    P = ctx.shape[1]
    if x.shape[0] != ctx.shape[0] or x.shape[1] <= P or not torch.equal(x[:, :P], ctx):
        raise ValueError("generate: input_ids must start with the context tokens the cache was made "
                         "from, for the same batch, and add at least one token")
    if input_ids.shape[1] > model.local_window:
        raise ValueError(f"generate: with a context cache the input must fit the local window "
                         f"({model.local_window} tokens), got {input_ids.shape[1]}")
    if context.memformer_version != model.state.version:
        raise ValueError("generate: the memory changed since this context cache was made (memorize, "
                         "reset, load or a corpus attached); make a new one with context_cache()")
    return copy.deepcopy(context)
