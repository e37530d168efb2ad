"""Passkey retrieval (LongLLaMA / landmark-attention prompt), the modes side by side.

The prompt: a task line, the filler "The grass is green. ..." repeated, the needle "The pass
key is K. Remember it. K is the pass key." at a chosen depth, and "What is the pass key? The
pass key is". Greedy decoding; a trial is correct when the first number generated equals K.

`make_sample` builds the prompt as a document + cue, which the needle runner reads in any of its
modes (memory, truncate, rag, full): `memformer.eval.needle.evaluate(model, ["passkey"], ...)`, what
`memformer eval passkey` runs. `make_document` puts several named pass keys ("The pass key of Alice
is K. ...") in one prompt, each asked on its own ("What is the pass key of Alice? The pass key of
Alice is"): one read, many trials (`--needles-per-doc`). `run_trial` is the direct token-level path (memory / truncate only)
the integration tests use.
"""
from __future__ import annotations

import re

import torch

from memformer.config import parse_length  # noqa: F401 (the evaluations' length flags)
from memformer.eval.samples import Query, Sample, Trial, encode, token_fractions

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
# several pass keys in one document (`make_document`): each has its owner's name
NAMED_NEEDLE = "The pass key of {name} is {key}. Remember it. {key} is the pass key of {name}."
NAMED_QUESTION = "What is the pass key of {name}? The pass key of {name} is"
NAMES = ("Alice", "Bruno", "Carmen", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ingrid", "Jamal", "Katya",
         "Lars", "Mei", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Samir", "Tamsin", "Ulrich", "Vera",
         "Wendell", "Ximena", "Yusuf", "Zora", "Anders", "Beatriz", "Cosmo", "Delia", "Emeka", "Flora",
         "Gustav", "Hana", "Ivo", "Juno", "Kwame", "Lucia", "Milo", "Noor", "Otto", "Paloma", "Rafael",
         "Sigrid", "Tobias", "Uma", "Viktor", "Wanda")


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
        with model.backbone_only():
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


def make_document(tokenizer, length: int, depths: list[float], rng, index: int = 0) -> Sample:
    """The passkey prompt with one named pass key per depth in `depths` ("The pass key of Alice is
    K. ..."; distinct names and distinct 5-digit keys, drawn from `rng`), as a multi-needle
    document of about `length` tokens (with the longest question): a trial per pass key, asked
    "What is the pass key of Alice? The pass key of Alice is". Depths count filler sentences."""
    if len(depths) > len(NAMES):
        raise ValueError(f"at most {len(NAMES)} pass keys per document, got {len(depths)}")
    enc = lambda t: encode(tokenizer, t)
    names, keys = rng.sample(NAMES, len(depths)), rng.sample(range(10000, 100000), len(depths))
    needles = [NAMED_NEEDLE.format(name=n, key=k) for n, k in zip(names, keys)]
    questions = [NAMED_QUESTION.format(name=n) for n in names]
    fixed = len(enc(TASK)) + sum(len(enc(" " + x)) for x in needles) + max(len(enc("\n\n" + q)) for q in questions)
    n = max(1, (length - fixed) // len(enc(" " + FILLER)))
    text, offsets, done = TASK, [0] * len(depths), 0
    for j in sorted(range(len(depths)), key=lambda j: depths[j]):
        before = int(round(depths[j] * n))
        text += (" " + FILLER) * (before - done) + " "
        offsets[j], done = len(text), before
        text += needles[j]
    text += (" " + FILLER) * (n - done)
    tokens, measured = token_fractions(tokenizer, text, offsets)
    trials = [Trial(d, [Query(q, [str(k)], "number")], [m], name)
              for d, q, k, m, name in zip(depths, questions, keys, measured, names)]
    return Sample("passkey", length, index, None, text, [t.queries[0] for t in trials], tokens, measured,
                  max_new_tokens=8, needles=trials)
