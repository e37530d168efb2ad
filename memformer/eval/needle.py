"""Needle-in-a-haystack evaluation, RULER style, on a real-text haystack.

The haystack is Python's documentation topics (`demo.python_docs_text`), with standard-library
source appended for long lengths; each trial starts it at a seeded offset. Needles are
sentences planted at line starts; every question is asked as a sentence to complete (a cue),
which small instruction models answer far better than a chat question. Variants:

* single-number / single-word / single-uuid: one needle "The special magic number for
  {key} is {value}." with a 7-digit number, an English word or a UUID as value;
* multikey: the same with 3 distractor needles (other keys, same kind of value);
* multivalue: 4 needles give the same key 4 numbers; the answer must list all of them;
* multiquery: 4 needles with 4 keys; each key is asked (a cue each), score = fraction right.

Mode memory runs the library path, `model.memorize(text)` then `model.ask(cue=...)` per cue; the
baselines run through `memformer.qa.longdoc` (`prepare` the document, `answer` each cue), so the
modes see the same text and differ only in how they reach it. Scoring is strict: the first
value(s) of the right kind in the answer must be the expected ones.
"""
from __future__ import annotations

import functools
import random
import re
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from memformer.eval.plots import TrialLog

VARIANTS = ("single-number", "single-word", "single-uuid", "multikey", "multivalue", "multiquery")
TASKS = VARIANTS + ("passkey",)          # passkey (memformer.eval.passkey) can run in the same evaluation
DISTRACTORS, VALUES, QUERIES = 3, 4, 4
NUMBER_DIGITS = 7

_ADJECTIVES = ("amber", "ancient", "brave", "bright", "calm", "clever", "crimson", "curious", "daring",
               "distant", "eager", "elegant", "fierce", "gentle", "golden", "hidden", "hollow", "humble",
               "icy", "jolly", "lively", "lonely", "lucky", "misty", "noble", "odd", "pale", "patient",
               "proud", "quiet", "rapid", "rustic", "scarlet", "silent", "silver", "sleepy", "smooth",
               "stormy", "sunny", "swift", "tidy", "velvet", "vivid", "wandering", "wild", "wise",
               "wooden", "young")
_NOUNS = ("anchor", "badger", "banner", "beacon", "bison", "cabin", "canyon", "castle", "cedar", "comet",
          "compass", "falcon", "fjord", "forest", "fountain", "glacier", "harbor", "heron", "island",
          "lantern", "meadow", "mill", "orchard", "otter", "painter", "parrot", "pebble", "pilgrim",
          "prairie", "quarry", "raven", "river", "sailor", "scholar", "shepherd", "spruce", "summit",
          "tailor", "temple", "thistle", "tower", "valley", "violin", "walrus", "weaver", "willow",
          "wizard", "yak")
# values of the word variant: disjoint from the key words and from the cue's own words
_VALUE_WORDS = ("apple", "basket", "bicycle", "blanket", "bottle", "bucket", "butter", "candle", "carpet",
                "carrot", "cherry", "chimney", "cookie", "copper", "cotton", "cricket", "dolphin", "engine",
                "feather", "garlic", "giraffe", "guitar", "hammer", "helmet", "honey", "jacket", "kettle",
                "kitten", "ladder", "lemon", "magnet", "marble", "mirror", "monkey", "needle", "noodle",
                "orange", "oyster", "pencil", "pepper", "pillow", "pocket", "potato", "puzzle", "rabbit",
                "ribbon", "saddle", "salmon", "sandal", "spider", "spoon", "squirrel", "teapot", "ticket",
                "tomato", "trumpet", "turtle", "umbrella", "wallet", "walnut", "whistle", "window",
                "zebra", "zipper")
# words a model may put before the value ("... is the word apple") that are not an answer
_NOT_ANSWERS = {"the", "a", "an", "is", "are", "was", "word", "words", "magic", "special", "for", "and",
                "of", "one", "number", "numbers", "uuid", "it", "this", "that", "be", "value"}
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_STDLIB_CHARS = 2_000_000     # how much standard-library source the long haystack corpus holds


@dataclass
class Query:
    """One cue to complete and the value(s) its answer must start with, in any order."""
    cue: str
    expected: list[str]
    kind: str                     # "number" | "word" | "uuid": what counts as a value in the answer


@dataclass
class Sample:
    """One trial's document (without the cue) and its queries."""
    task: str
    length: int                   # requested length in tokens (document + cue)
    index: int                    # trial number at this length
    depth: float                  # requested depth of the target needle, 0..1
    text: str
    queries: list[Query]
    tokens: int = 0               # tokens of `text`
    needle_depths: list[float] = field(default_factory=list)   # measured, in tokens, target first
    max_new_tokens: int = 16


# ---------------------------------------------------------------------- corpora
def stdlib_source_text() -> str:
    """The standard library's top-level modules (`*.py`, sorted), each under a header line."""
    root = Path(sysconfig.get_path("stdlib"))
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no standard-library sources (*.py) under {root}")
    return "\n\n".join(f"# ---- {f.name} ----\n{f.read_text(encoding='utf-8', errors='replace')}" for f in files)


@functools.lru_cache(maxsize=4)
def _corpus_ids(tokenizer, long: bool) -> list[int]:
    """Haystack corpus tokens: the Python docs, plus standard-library source when `long`."""
    from memformer.qa.demo import python_docs_text
    text = python_docs_text()
    if long:
        text += "\n\n" + stdlib_source_text()[:_STDLIB_CHARS]
    return encode(tokenizer, text)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids without special tokens (and without the too-long-for-the-model warning)."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def haystack(tokenizer, n_tokens: int, rng: random.Random) -> str:
    """About `n_tokens` tokens of real text from a seeded offset, starting at a line start."""
    ids = _corpus_ids(tokenizer, False)
    if n_tokens > len(ids) // 2:          # leave room for varied offsets
        ids = _corpus_ids(tokenizer, True)
    if n_tokens > len(ids):
        raise ValueError(f"a haystack of {n_tokens} tokens is longer than the corpus ({len(ids)} tokens)")
    start = rng.randrange(len(ids) - n_tokens + 1)
    text = tokenizer.decode(ids[start:start + n_tokens])
    cut = text.find("\n", 0, 400)            # drop the partial first line
    return text[cut + 1:] if cut >= 0 else text


def plant(text: str, needles: list[tuple[float, str]]) -> tuple[str, list[int]]:
    """Insert each (depth, sentence) as its own line at the first line start at or after
    depth x the length of the *result*, so a needle's depth counts the needles before it.
    Returns (new text, char offset of each sentence, in input order)."""
    if any(not 0.0 <= d <= 1.0 for d, _ in needles):
        raise ValueError(f"needle depths must be in [0, 1], got {[d for d, _ in needles]}")
    total = len(text) + sum(len(s) + 2 for _, s in needles)
    spots, prev, before = [0] * len(needles), 0, 0
    for i in sorted(range(len(needles)), key=lambda i: needles[i][0]):
        at = min(len(text), max(prev, int(needles[i][0] * total) - before))
        if 0 < at < len(text) and text[at - 1] != "\n":
            nl = text.find("\n", at)
            at = len(text) if nl < 0 else nl + 1
        spots[i], prev = at, at
        before += len(needles[i][1]) + 1
    out, last, offsets, shift = [], 0, [0] * len(needles), 0
    for i in sorted(range(len(needles)), key=lambda i: (spots[i], needles[i][0])):
        out.append(text[last:spots[i]])
        shift += spots[i] - last
        sep = "" if spots[i] == 0 or text[spots[i] - 1] == "\n" else "\n"
        offsets[i] = shift + len(sep)
        line = sep + needles[i][1] + "\n"
        out.append(line)
        shift += len(line)
        last = spots[i]
    out.append(text[last:])
    return "".join(out), offsets


# ---------------------------------------------------------------------- values and scoring
def make_key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def make_value(kind: str, rng: random.Random) -> str:
    if kind == "number":
        return str(rng.randrange(10 ** (NUMBER_DIGITS - 1), 10 ** NUMBER_DIGITS))
    if kind == "word":
        return rng.choice(_VALUE_WORDS)
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown value kind {kind!r}")


def candidates(kind: str, answer: str) -> list[str]:
    """The values of `kind` in an answer, in order."""
    if kind == "number":
        return re.findall(r"\d+", answer)
    if kind == "uuid":
        return _UUID.findall(answer.lower())
    return [w for w in re.findall(r"[a-z]+", answer.lower()) if w not in _NOT_ANSWERS]


def score_query(answer: str, query: Query) -> float:
    """Fraction of the expected values among the answer's first len(expected) values."""
    first = candidates(query.kind, answer)[:len(query.expected)]
    return sum(v in first for v in query.expected) / len(query.expected)


# ---------------------------------------------------------------------- samples
def _distinct(make, n: int, rng: random.Random) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = make(rng)
        if v not in out:
            out.append(v)
    return out


def _plan(variant: str, rng: random.Random) -> tuple[list[str], list[Query], int]:
    """(needle sentences, target first; queries; max new tokens) of one trial of `variant`."""
    if variant.startswith("single-") or variant == "multikey":
        kind = variant.removeprefix("single-") if variant.startswith("single-") else "number"
        n = 1 + (DISTRACTORS if variant == "multikey" else 0)
        keys, values = _distinct(make_key, n, rng), [make_value(kind, rng) for _ in range(n)]
        sentences = [f"The special magic {kind} for {k} is {v}." for k, v in zip(keys, values)]
        budget = 40 if kind == "uuid" else 16
        return sentences, [Query(f"The special magic {kind} for {keys[0]} is", [values[0]], kind)], budget
    if variant == "multivalue":
        key = make_key(rng)
        values = _distinct(lambda r: make_value("number", r), VALUES, rng)
        sentences = [f"One of the special magic numbers for {key} is {v}." for v in values]
        return sentences, [Query(f"The special magic numbers for {key} are", values, "number")], 12 * VALUES
    if variant == "multiquery":
        keys = _distinct(make_key, QUERIES, rng)
        values = [make_value("number", rng) for _ in keys]
        sentences = [f"The special magic number for {k} is {v}." for k, v in zip(keys, values)]
        queries = [Query(f"The special magic number for {k} is", [v], "number") for k, v in zip(keys, values)]
        return sentences, queries, 16
    raise ValueError(f"unknown needle variant {variant!r}; choose from {', '.join(VARIANTS)}")


def make_sample(tokenizer, variant: str, length: int, depth: float, rng: random.Random, index: int = 0) -> Sample:
    """A document of about `length` tokens (with the longest cue) holding `variant`'s needles:
    the target (first query's) needle at `depth`, the others at random depths."""
    sentences, queries, budget = _plan(variant, rng)
    depths = [depth] + [rng.random() for _ in sentences[1:]]
    fixed = sum(len(encode(tokenizer, s + "\n")) for s in sentences)
    fixed += max(len(encode(tokenizer, "\n\n" + q.cue)) for q in queries)
    if length - fixed < 64:
        raise ValueError(f"length {length} is too short for the {variant} needles ({fixed} tokens); use >= {fixed + 64}")
    text, offsets = plant(haystack(tokenizer, length - fixed, rng), list(zip(depths, sentences)))
    tokens = len(encode(tokenizer, text))
    measured = [round(len(encode(tokenizer, text[:o])) / tokens, 4) for o in offsets]
    return Sample(variant, length, index, depth, text, queries, tokens, measured, budget)


# ---------------------------------------------------------------------- running
def answer_cues(model, text: str, cues: list[str], mode: str, max_new_tokens: int) -> list[str] | None:
    """Answers to `cues` after `text` in a baseline `mode` (`memformer.qa.longdoc`), or None when
    the mode cannot hold the text (mode "full" beyond the native context)."""
    from memformer.qa import longdoc as qa
    try:       # "full" checks the documents in prepare and the documents + cue in answer
        ctx = qa.prepare(model, [text], mode, show_progress=False)
        # evidence=0: no retrieval recording, which only costs time and memory here
        return [qa.answer(model, ctx, cue=c, max_new_tokens=max_new_tokens, evidence=0).text for c in cues]
    except qa.DoesNotFit:
        return None


def memory_answers(model, text: str, cues: list[str], max_new_tokens: int, evidence: int = 3) -> list:
    """Mode memory through the library path: `model.memorize(text)`, then `model.ask(cue=...)` per
    cue; `memformer.qa.longdoc.Answer`s, each with `evidence` spans."""
    from memformer.qa.documents import Corpus
    from memformer.qa.evidence import answer_evidence
    from memformer.qa.longdoc import Answer
    model.reset_memory()
    model.memorize(text, show_progress=False)
    corpus = Corpus.from_documents([text], model.tokenizer) if evidence else None
    out = []
    for c in cues:
        ans = Answer("memory", model.ask(cue=c, max_new_tokens=max_new_tokens, record=evidence > 0))
        if evidence:
            ans.evidence, ans.memory_share = answer_evidence(model, corpus, evidence)
        out.append(ans)
    return out


def evidence_record(sample: Sample, answer) -> dict:
    """Where the first answer's evidence points: does its top span (top 3 spans) hold the target
    needle's value, i.e. lie on the planted sentence?"""
    value = sample.queries[0].expected[0]
    spans = answer.evidence
    return dict(evidence_top1=bool(spans) and value in spans[0].text,
                evidence_top3=any(value in s.text for s in spans),
                evidence=[dict(start=s.start, end=s.end, score=round(s.score, 4), text=s.text[:160]) for s in spans])


def run_sample(model, sample: Sample, mode: str, evidence: bool = False) -> dict:
    """Run one sample in one mode: its trial record (see `memformer.eval.plots`). evidence: in
    mode memory, also record where the evidence spans point (`evidence_record`)."""
    t0 = time.perf_counter()
    cues, found = [q.cue for q in sample.queries], {}
    if mode == "memory":
        full = memory_answers(model, sample.text, cues, sample.max_new_tokens, evidence=3 if evidence else 0)
        answers = [a.text for a in full]
        if evidence:
            found.update(evidence_record(sample, full[0]))
    else:
        answers = answer_cues(model, sample.text, cues, mode, sample.max_new_tokens)
    rec = dict(id=record_id(sample.task, sample.length, sample.index, mode), task=sample.task,
               length=sample.length, index=sample.index, depth=round(sample.depth, 4), mode=mode,
               tokens=sample.tokens, needle_depths=sample.needle_depths,
               expected=[q.expected for q in sample.queries])
    if answers is None:
        return dict(rec, status="n/a", score=None, correct=None, answers=None, seconds=0.0)
    scores = [score_query(a, q) for a, q in zip(answers, sample.queries)]
    score = sum(scores) / len(scores)
    return dict(rec, status="ok", score=score, correct=score == 1.0, answers=answers,
                seconds=round(time.perf_counter() - t0, 2), **found)


def record_id(task: str, length: int, index: int, mode: str) -> str:
    return f"{task}/{length}/{index}/{mode}"


def trial_rng(seed: int, task: str, length: int, index: int) -> random.Random:
    """One generator per trial, so a trial is the same whatever else the run holds."""
    return random.Random(f"{seed}/{task}/{length}/{index}")


def run_trials(model, jobs, build, modes, log: TrialLog | None, desc: str, show_progress: bool = True,
               evidence: bool = False) -> list[dict]:
    """jobs: (task, length, index, depth) tuples; build(job) -> Sample, called only when a mode
    of the job is not in `log` yet. Records stream to `log`; returns every job's records."""
    results = []
    bar = tqdm(total=len(jobs) * len(modes), desc=desc, unit="trial", disable=not show_progress)
    for job in jobs:
        sample = None
        for mode in modes:
            rid = record_id(job[0], job[1], job[2], mode)
            if log is not None and rid in log:
                results.append(log.get(rid))
            else:
                sample = sample or build(job)
                rec = run_sample(model, sample, mode, evidence)
                if log is not None:
                    log.append(rec)
                results.append(rec)
            bar.update(1)
    bar.close()
    return results


def check_modes(modes) -> list[str]:
    from memformer.qa import longdoc as qa
    modes = list(modes)
    bad = [m for m in modes if m not in qa.MODES]
    if bad or not modes:
        raise ValueError(f"unknown mode(s) {bad or modes}; choose from {', '.join(qa.MODES)}")
    return modes


def run_settings(model, name: str, seed: int | None, trials: int) -> dict:
    """What decides a trial's outcome; a --resume run must match it."""
    return {"eval": name, "seed": seed, "trials": trials, "backbone": model.backbone_fingerprint,
            "memory_config": model.memory_config.to_dict(), "python": sys.version.split()[0]}


def build_sample(tokenizer, task: str, length: int, index: int, depth: float, seed: int) -> Sample:
    """Trial `index` of `task` (a variant, or "passkey") at `length`, from its own seeded generator."""
    rng = trial_rng(seed, task, length, index)
    if task == "passkey":
        from memformer.eval import passkey
        return passkey.make_sample(tokenizer, length, depth, rng.randint(10000, 99999), index)
    return make_sample(tokenizer, task, length, depth, rng, index=index)


def evaluate(model, variants=TASKS, lengths=(4096,), trials: int = 5, modes=("memory", "truncate"),
             seed: int = 0, out_dir=None, resume: bool = False, show_progress: bool = True,
             name: str = "needle", evidence: bool = False) -> list[dict]:
    """Every task (needle variants, and "passkey") x length x trial in every mode; trial i of n
    puts its target needle at depth (i + 0.5) / n. Records stream to out_dir/trials.jsonl
    (resumable) when out_dir is set; `name` labels the run in out_dir/run.json. evidence: memory
    trials also record whether their evidence spans point at the needle (`evidence_table`)."""
    if model.tokenizer is None:
        raise ValueError(f"the {name} evaluation needs a model with a tokenizer")
    variants, modes = list(variants), check_modes(modes)
    bad = [v for v in variants if v not in TASKS]
    if bad or not variants:
        raise ValueError(f"unknown needle variant(s) {bad or variants}; choose from {', '.join(TASKS)}")
    if trials < 1 or not lengths or min(lengths) < 1:
        raise ValueError(f"need trials >= 1 and positive lengths, got trials={trials}, lengths={list(lengths)}")
    for v in variants:                    # a length too short fails now, not hours into the run
        build_sample(model.tokenizer, v, min(lengths), 0, 0.5, seed)
    jobs = [(v, L, i, (i + 0.5) / trials) for L in lengths for v in variants for i in range(trials)]
    build = lambda job: build_sample(model.tokenizer, job[0], job[1], job[2], job[3], seed)
    settings = run_settings(model, name, seed, trials)
    log = None if out_dir is None else TrialLog(out_dir, settings, resume)
    try:
        return run_trials(model, jobs, build, modes, log, name, show_progress, evidence)
    finally:
        if log is not None:
            log.close()


def evidence_table(records) -> str:
    """Markdown: per task and length, memory trials whose top evidence span (top 3 spans) holds
    the target needle's value; "" when no trial recorded evidence."""
    from memformer.eval.plots import length_label
    rows: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        if r.get("mode") == "memory" and "evidence_top1" in r:
            rows.setdefault((r["task"], r["length"]), []).append(r)
    if not rows:
        return ""
    out = ["| task | length | evidence top-1 span on the needle | in the top 3 |", "|---|---:|---:|---:|"]
    for (task, length), rs in sorted(rows.items()):
        n = len(rs)
        top1, top3 = sum(r["evidence_top1"] for r in rs), sum(r["evidence_top3"] for r in rs)
        out.append(f"| {task} | {length_label(length)} | {top1}/{n} ({top1 / n:.0%}) | {top3}/{n} |")
    return "\n".join(out)
