"""The recipe's evaluation hook: held-out loss with and without memory, passkey accuracy.

Held-out loss reads each held-out sample exactly as inference would — every earlier window of
its own document in memory (d = 1, w = all), the inference top-k — and scores the windows that
have memory (all but the first), once reading memory and once not (the write pass, which reads
nothing). Passkey runs `memformer.eval.passkey.run_trial` (memorize + generate: the real inference path with
the real index) in memory mode at the configured lengths, with a fixed seed so every
evaluation of a run sees the same keys and depths.
"""
from __future__ import annotations

import contextlib
import math
import random

import torch
from tqdm.auto import tqdm

from memformer.training.crossbatch import run_episode


@torch.no_grad()
def heldout_loss(model, batches, lm=None) -> dict:
    """Token-weighted mean cross-entropy over the held-out batches' memory windows.

    Returns {"loss_memory", "loss_no_memory", "memory_gain" (no_memory - memory), "tokens"}."""
    total = {"memory": 0.0, "no_memory": 0.0}
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            res = run_episode(model, batch, d=1, w=None, top_k=model.memory_config.top_k,
                              generator=random.Random(0), first_loss_window=1, lm=lm, measure_no_memory=True)
            total["memory"] += res.total()[0]
            total["no_memory"] += res.total(no_memory=True)[0]
            tokens += res.total()[1]
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("held-out batches have no scored tokens (every sample fits in one window)")
    out = {f"loss_{k}": v / tokens for k, v in total.items()}
    out["memory_gain"] = out["loss_no_memory"] - out["loss_memory"]
    out["tokens"] = tokens
    return out


@torch.no_grad()
def passkey_accuracy(model, lengths: list, trials: int, seed: int = 0) -> dict:
    """{"passkey_<length>": accuracy in [0, 1]} reading the prompt into memory (`run_trial` in
    memory mode: memorize all but the last window, then generate). Trial i of n puts the needle
    at depth (i + 0.5) / n with a key drawn from a generator seeded by (seed, length)."""
    from memformer.eval.passkey import make_prompt, parse_length, run_trial
    if trials == 0 or not lengths:
        return {}
    if model.tokenizer is None:
        raise ValueError("passkey evaluation needs a tokenizer")
    was_training = model.training
    model.eval()
    out = {}
    try:
        for text in lengths:
            n = parse_length(str(text))
            rng = random.Random(f"{seed}-{n}")
            correct = 0
            for i in tqdm(range(trials), desc=f"eval passkey {text}", leave=False, disable=None):
                key = rng.randint(10000, 99999)
                ids, _ = make_prompt(model.tokenizer, n, (i + 0.5) / trials, key)
                correct += run_trial(model, ids, key, "memory")[1]
            out[f"passkey_{text}"] = correct / trials
    finally:
        model.reset_memory()
        model.train(was_training)
    return out


def evaluate(model, batches, passkey_lengths, passkey_trials: int, passkey_seed: int = 0, lm=None,
             direct_calls=contextlib.nullcontext) -> dict:
    """The evaluation hook: held-out losses (+ perplexity with memory) and passkey accuracies.
    direct_calls: a context manager factory entered while passkey generation calls `model` itself
    rather than `lm` (FSDP gathers the root unit's weights there)."""
    out = heldout_loss(model, batches, lm=lm)
    out["ppl_memory"] = math.exp(min(out["loss_memory"], 50.0))
    with direct_calls():
        out.update(passkey_accuracy(model, passkey_lengths, passkey_trials, passkey_seed))
    return out
