"""The model's confidence in an answer: mean log-probability of the tokens of its first line.

Question reads can lay the pinned memory blocks out two ways (`LongDocQA(sink_prefix=...)`):
after the sink their windows were computed with, or without it. Neither is better on every
question with SmolLM2-135M: with the sink it copies long needles (UUIDs, 7-digit numbers among
look-alikes) without slips; without it, it answers the passkey that it cannot answer from the
same text re-encoded. Where one read is wrong the model is visibly less sure of it (a slip or a
made-up phrase costs log-probability), so `sink_prefix="auto"` answers with both reads and keeps
the answer whose first line the model gave the higher mean log-probability: the first line,
because a greedy continuation runs on past the answer ("7272724.\\n\\nThe special magic...").
"""
from __future__ import annotations

import torch


def first_line_span(tokenizer, new_ids: list[int]) -> int:
    """Number of leading generated tokens that make up the answer's first line: up to (not
    including) the first token that ends a line after some non-blank text; at least 1."""
    text = ""
    for k, t in enumerate(new_ids):
        piece = tokenizer.decode([t])
        if "\n" in piece and text.strip():
            return max(k, 1)
        text += piece
    return max(len(new_ids), 1)


def answer_confidence(tokenizer, new_ids: torch.Tensor, logits) -> float:
    """Mean log-probability the model gave its own greedy answer's first line.

    new_ids [n]: the generated tokens; logits: n tensors [1, V] or [V], the raw logits each was
    drawn from (`generate(..., output_logits=True, return_dict_in_generate=True).logits`).
    Returns a float <= 0 (nan when nothing was generated)."""
    ids = [int(t) for t in new_ids]
    if not ids:
        return float("nan")
    n = first_line_span(tokenizer, ids)
    logp = torch.stack([lg.reshape(-1) for lg in logits[:n]]).float().log_softmax(-1)   # [n, V]
    return float(logp[torch.arange(n), torch.tensor(ids[:n])].mean())
