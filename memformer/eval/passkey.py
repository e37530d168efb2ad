"""Passkey retrieval (LongLLaMA / landmark-attention prompt), the modes side by side.

The prompt: a task line, the filler "The grass is green. ..." repeated, the needle "The pass
key is K. Remember it. K is the pass key." at a chosen depth, and "What is the pass key? The
pass key is". Greedy decoding; a trial is correct when the first number generated equals K.

`evaluate` runs the prompt as a document + cue through `memformer.qa.longdoc` in any of its modes
(memory, truncate, rag, full), as task "passkey" of the needle evaluation (`memformer.eval.needle`);
`run_trial` is the direct token-level path (memory / truncate only) the integration tests use.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from memformer.eval.plots import accuracy_table, plot_depth_heatmaps
from memformer.eval.needle import Query, Sample, encode

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def parse_length(s: str) -> int:
    """'4k' -> 4096, '16K' -> 16384, '1000' -> 1000, '1m' -> 1048576."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", s)
    if not m:
        raise ValueError(f"not a length: {s!r} (use e.g. 4k, 16k, 32000)")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]


def make_prompt(tokenizer, length: int, depth: float, key: int) -> tuple[list[int], int]:
    """Token ids of a passkey prompt of about `length` tokens with the needle at `depth` in [0, 1].

    Returns (ids, needle_token_index)."""
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]
    head, filler = enc(TASK + " "), enc(" " + FILLER)
    needle, tail = enc(" " + NEEDLE.format(key=key)), enc(" " + QUESTION)
    n = max(1, (length - len(head) - len(needle) - len(tail)) // len(filler))
    before = int(round(depth * n))
    ids = head + filler * before
    at = len(ids)
    ids += needle + filler * (n - before) + tail
    return ids, at


def first_number(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def run_trial(model, ids: list[int], key: int, mode: str, max_new_tokens: int = 8) -> tuple[str, bool]:
    """The passkey prompt read as one continuation (no question known), as the training recipe's
    evaluation reads it: mode "memory": everything but the last window goes to memory and
    `generate` answers with kNN reads; "truncate": last window only. (`memformer eval passkey`
    asks the question with `model.ask` instead: `make_sample`.)"""
    x = torch.tensor([ids])
    model.reset_memory()
    if mode == "memory":
        out = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False)
    elif mode == "truncate":
        x = x[:, -model.memory_config.window:]
        with model.memory_disabled():
            out = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False)
    else:
        raise ValueError(f"unknown passkey mode {mode!r}")
    answer = model.tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True)
    model.reset_memory()
    return answer.strip(), first_number(answer) == key


def make_sample(tokenizer, length: int, depth: float, key: int, index: int = 0) -> Sample:
    """The passkey prompt as a document of about `length` tokens (with the question) and its
    question as a cue, for the mode-agnostic runner (`memformer.eval.needle.run_trials`)."""
    enc = lambda t: encode(tokenizer, t)
    fixed = len(enc(TASK)) + len(enc(" " + NEEDLE.format(key=key))) + len(enc("\n\n" + QUESTION))
    n = max(1, (length - fixed) // len(enc(" " + FILLER)))
    before = int(round(depth * n))
    head = TASK + (" " + FILLER) * before
    text = head + " " + NEEDLE.format(key=key) + (" " + FILLER) * (n - before)
    tokens = len(enc(text))
    return Sample("passkey", length, index, depth, text, [Query(QUESTION, [str(key)], "number")], tokens,
                  [round(len(enc(head)) / tokens, 4)], max_new_tokens=8)


def evaluate(model, lengths: list[int], trials: int, modes=("memory", "truncate"), seed: int = 0,
             out_dir: str | Path | None = None, resume: bool = False, show_progress: bool = True,
             evidence: bool = False) -> list[dict]:
    """Every (length, trial) in every mode (`memformer.qa.longdoc`); trial i of n puts the needle at depth
    (i + 0.5) / n, its key drawn from the trial's own seeded generator. Records (see
    `memformer.eval.plots`) stream to out_dir/trials.jsonl; resume=True skips finished ones.
    evidence: memory trials record whether their evidence spans point at the passkey sentence."""
    from memformer.eval import needle
    return needle.evaluate(model, ["passkey"], lengths, trials, modes, seed, out_dir, resume, show_progress,
                           name="passkey", evidence=evidence)


def summary_table(results: list[dict]) -> str:
    """Markdown: one row per length, accuracy (correct/total) per mode."""
    return accuracy_table(results)


def plot_heatmap(results: list[dict], path: str | Path, bins: int = 5) -> Path:
    """Depth (rows, binned) x length (columns) accuracy heatmap, one panel per mode."""
    return plot_depth_heatmaps(results, path, bins=bins, title="passkey accuracy")
