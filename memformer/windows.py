"""Windows: how `memorize` turns its input into token ids and cuts them into windows, and how a
span of the decoder's layers runs alone (the write pass stops at the last memory layer).

    ids, lengths = as_batch(inputs, tokenizer, pad_id, vocab)       # [B, L] right-padded
    for x, mask, p, start, end in plan_windows(ids, lengths, first, sink_ids, tail_ids, cfg): ...

A window is x = [sink (S) ‖ up to `overlap` earlier tokens (context, not written again) ‖ new
tokens (≤ W − S − overlap)]; training reads documents through the same plan
(`memformer.training.crossbatch`).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from memformer.config import MemoryConfig
from memformer.loading import encode_text


def as_batch(inputs, tokenizer, pad_id: int, vocab: int) -> tuple[torch.Tensor, list[int]]:
    """str | list[str] | ids [T] | ids [B, T] | list[list[int]] -> (ids [B, L] right-padded with
    `pad_id`, lengths [B]). ValueError for empty input, text without a tokenizer, or ids outside
    a vocabulary of `vocab`."""
    if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)):
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids instead of text")
        seqs = [encode_text(tokenizer, t)["input_ids"] for t in texts]
    elif torch.is_tensor(inputs):
        seqs = [inputs.tolist()] if inputs.dim() == 1 else inputs.tolist()
    elif isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], int):
        seqs = [list(inputs)]
    elif isinstance(inputs, (list, tuple)) and inputs:
        seqs = [list(s) for s in inputs]
    else:
        raise ValueError("memorize: empty input (nothing to read)")
    lengths = [len(s) for s in seqs]
    if min(lengths) == 0:
        raise ValueError(f"memorize: sequence {lengths.index(0)} is empty (no tokens to memorize)")
    ids = torch.full((len(seqs), max(lengths)), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise ValueError(f"token ids out of range for a vocabulary of {vocab}")
    return ids, lengths


def plan_windows(ids: torch.Tensor, lengths: list[int], first: int, sink_ids, tail_ids, cfg: MemoryConfig):
    """The windows a memorize call reads, in order, over ids [B, L] (`lengths` valid tokens each)
    from position `first` on: yields (x [B, p + n], mask [B, p + n] bool, p, start, end) where
    x = [sink_ids ‖ up to `cfg.overlap` earlier tokens (context, not written again; at the first
    window `tail_ids`, the previous call's last tokens) ‖ ids[:, start:end] (new, written)] and p
    is the length of the prefix."""
    S, W, ov = cfg.sink_tokens, cfg.window, cfg.overlap
    B, L = ids.shape
    lengths_t = torch.tensor(lengths)[:, None]                               # [B, 1]
    for start in range(first, L, W - S - ov):
        end = min(L, start + W - S - ov)
        ctx = ids[:, max(first, start - ov):start]
        ctx_valid = torch.arange(start - ctx.shape[1], start)[None, :] < lengths_t
        if ctx.shape[1] == 0 and tail_ids is not None:                     # continue the previous call
            ctx, ctx_valid = tail_ids, torch.ones_like(tail_ids, dtype=torch.bool)
        prefix = ctx if S == 0 else torch.cat([sink_ids, ctx], dim=1)
        valid = torch.cat([torch.ones(B, prefix.shape[1] - ctx.shape[1], dtype=torch.bool), ctx_valid,
                           torch.arange(start, end)[None, :] < lengths_t], dim=1)
        yield torch.cat([prefix, ids[:, start:end]], dim=1), valid, prefix.shape[1], start, end


def base_decoder(backbone: nn.Module) -> nn.Module:
    """The backbone's decoder (embeddings, layers, final norm; no vocabulary projection)."""
    return backbone.get_decoder() if hasattr(backbone, "get_decoder") else backbone.model


@contextlib.contextmanager
def decoder_span(decoder: nn.Module, start: int, stop: int | None):
    """Within this block `decoder` runs only its layers [start, stop) (stop None = to the top), and
    its final norm only when the span reaches the top: its forward then maps the state entering
    layer `start` (given as inputs_embeds) to the state entering layer `stop`. The decoder's own
    forward still builds the causal mask and the RoPE tables, so a span runs exactly the
    operations the same layers run inside a whole forward."""
    layers, norm = decoder.layers, decoder.norm
    stop = len(layers) if stop is None else stop
    if (start, stop) == (0, len(layers)):
        yield
        return
    decoder.layers = nn.ModuleList(list(layers)[start:stop])
    if stop < len(layers):
        decoder.norm = nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = layers, norm
