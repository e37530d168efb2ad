"""An answer's first letter or digit, chosen by the whole item it begins.

Greedy decoding commits to an answer's first content token on one step's logits. When a read
holds several numbers (a section number beside the needle, a version list before it), the
value's first digit can lose a near tie to another number's, though the memory's copy of the
value, once begun, is near certain: "1" -0.99 against the needle's "3" -1.33, and then
" 1.1.11." at -0.62 per token against " 3324572." at -0.23.

So an answer is generated greedily, and at its first step whose token holds a letter or digit
(`content_step`), each other token within `ITEM_MARGIN` nats of the greedy one that holds a
letter or digit too (`runner_ups`, at most `ITEM_ALTERNATIVES`) is continued greedily, under the
same read, to the end of its item; the answer with the highest mean log-probability per token
up to the end of what the user is given (beam search's length-normalised score, `item_score`)
is kept; a runner-up that loops, or runs to the token limit without ending (`ended`), never
wins (`MemformerForCausalLM.ask`). An answer without a near tie at
that step costs nothing more.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor

from memformer.decoding import first_item, looping

ITEM_MARGIN = 1.0         # nats below the greedy token's log-probability that a runner-up may lie
ITEM_ALTERNATIVES = 2     # runner-ups continued at most


def has_content(text: str) -> bool:
    """Whether a token's text holds a letter or digit."""
    return any(c.isalnum() for c in text)


def content_step(tokenizer, ids: list[int]) -> int | None:
    """The index of the first generated token in `ids` whose text holds a letter or digit, or None."""
    for j, t in enumerate(ids):
        if has_content(tokenizer.decode([t])):
            return j
    return None


def runner_ups(logp: torch.Tensor, chosen: int, tokenizer, margin: float | None = None,
               n: int | None = None) -> list[int]:
    """Up to n (`ITEM_ALTERNATIVES`) token ids other than `chosen`, best first, whose
    log-probability in logp [V] lies within `margin` (`ITEM_MARGIN`) of chosen's and whose text
    holds a letter or digit."""
    margin = ITEM_MARGIN if margin is None else margin
    n = ITEM_ALTERNATIVES if n is None else n
    if n <= 0:
        return []
    floor = float(logp[chosen]) - margin
    values, ids = logp.topk(min(n + 8, logp.shape[-1]))          # a few spare: some hold no letter or digit
    out = []
    for v, t in zip(values.tolist(), ids.tolist()):
        if v < floor or len(out) == n:
            break
        if t != chosen and has_content(tokenizer.decode([t])):
            out.append(t)
    return out


def ended(ids: list[int], max_new_tokens: int, eos_ids: set[int] = frozenset()) -> bool:
    """Whether a generated answer (its ids, padding stripped) ended before the token limit: it
    stopped short of `max_new_tokens` (an item ended, a stop criterion, end of sequence) or its
    last token ends the sequence. An answer cut by the limit has no score of its whole item: an
    enumeration that never ends ("1.1, 1.2, 1.3, ...") is likelier per token than any value."""
    return len(ids) < max_new_tokens or (bool(ids) and ids[-1] in eos_ids)


def mean_logp(logps: list[torch.Tensor], ids: list[int]) -> float:
    """Mean log-probability of the generated ids under each step's log-probabilities [V]."""
    if not ids:
        return float("-inf")
    return sum(float(lp[t]) for lp, t in zip(logps, ids)) / len(ids)


def item_score(tokenizer, logps: list[torch.Tensor], ids: list[int], one_item: bool) -> float:
    """An answer's score for the choice: the mean log-probability of its tokens up to the end of
    what the user is given (its first item when the answer is one item, `decoding.first_item`:
    the token generation stopped after is not part of it), or -inf when its text loops
    (`decoding.looping`: a count or a repeated unit is never the better answer)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if looping(text):
        return float("-inf")
    if one_item:
        item = first_item(text.strip())
        for k in range(1, len(ids) + 1):                   # the fewest tokens that hold the whole item
            if len(tokenizer.decode(ids[:k], skip_special_tokens=True).strip()) >= len(item):
                ids = ids[:k]
                break
    return mean_logp(logps, ids)


class ForcedPrefix(LogitsProcessor):
    """Forces the first generated tokens of each row: prefixes [B] lists of token ids, row r's
    step j keeping only prefixes[r][j] (its score as the other processors left it); later steps
    are left alone. Counts the steps by its calls (one per generated token)."""

    def __init__(self, prefixes: list[list[int]]):
        self.prefixes, self.step = prefixes, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        j, self.step = self.step, self.step + 1
        if all(j >= len(p) for p in self.prefixes):
            return scores
        scores = scores.clone()
        for r, p in enumerate(self.prefixes):
            if j < len(p):
                keep = scores[r, p[j]].clone()
                scores[r] = -float("inf")
                scores[r, p[j]] = keep
        return scores
