"""What every evaluation task builds and the needle runner reads: a document (`Sample`), its
trials (`Trial`) and the cues they ask (`Query`), and the token helpers the builders share.

The task modules (`memformer.eval.passkey`, the needle variants in `memformer.eval.needle`) import
these; the runner (`memformer.eval.needle`) imports the task modules, never the other way round.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from memformer.loading import encode_text


@dataclass
class Query:
    """One cue to complete and the value(s) its answer must start with, in any order."""
    cue: str
    expected: list[str]
    kind: str                     # "number" | "word" | "uuid": what counts as a value in the answer


@dataclass
class Trial:
    """One scored trial inside a multi-needle document: its needle(s) and the cue(s) that ask for
    them, each asked on its own after the document's one read."""
    depth: float                  # requested depth of the target needle, 0..1
    queries: list[Query]
    needle_depths: list[float] = field(default_factory=list)   # measured, in tokens, target first
    key: str = ""                 # what the cues ask about: the needle key(s), or the pass key's name


@dataclass
class Sample:
    """One document (without the cue) and its queries: one trial (`needles` empty), or a
    multi-needle document whose `needles` are its trials, in depth order."""
    task: str
    length: int                   # requested length in tokens (document + cue)
    index: int                    # trial number at this length (multi-needle: document number)
    depth: float | None           # requested depth of the target needle, 0..1 (multi-needle: None)
    text: str
    queries: list[Query]          # every cue of the document, in trial order
    tokens: int = 0               # tokens of `text`
    needle_depths: list[float] = field(default_factory=list)   # measured, in tokens, target first
    max_new_tokens: int = 16
    needles: list[Trial] = field(default_factory=list)

    @property
    def trials(self) -> list[Trial]:
        """The document's trials: its `needles`, or the whole sample as one trial."""
        return self.needles or [Trial(self.depth, self.queries, self.needle_depths)]


def encode(tokenizer, text: str) -> list[int]:
    """Token ids without special tokens (and without the too-long-for-the-model warning)."""
    return encode_text(tokenizer, text)["input_ids"]


def token_fractions(tokenizer, text: str, offsets: list[int]) -> tuple[int, list[float]]:
    """(tokens of `text`, each char offset's position as a fraction of them), from one encoding."""
    enc = encode_text(tokenizer, text, return_offsets_mapping=True)
    starts = [a for a, _ in enc["offset_mapping"]]
    n = len(starts)
    return n, [round(bisect.bisect_left(starts, o) / n, 4) for o in offsets]
