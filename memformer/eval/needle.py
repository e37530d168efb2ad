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

Multi-needle documents (`needles_per_doc` > 1, the CLI default) make one read of a long document
serve many trials: the document holds N trials' needles at spread depths (`spread_depths`), with
distinct keys and values across the document, and each trial is asked on its own after the same
read (`make_document`). A trial is what one needle is in the one-needle layout: single-* = one
needle; multikey = a needle and its 3 distractors; multivalue = one key's 4 needles; multiquery =
4 needles asked one cue each (already several needles in one document: a multi-needle
document holds N such groups of 4); passkey = one named pass key (`passkey.make_document`).
Every other trial's needle is a look-alike distractor too.

Mode memory runs the library path, `model.memorize(text)` then `model.ask(cue=...)` per cue; the
baselines run through `memformer.qa.longdoc` (`prepare` the document, `answer` each cue), so the
modes see the same text and differ only in how they reach it. Scoring is strict: the first
value(s) of the right kind in the answer must be the expected ones.
"""
from __future__ import annotations

import functools
import math
import random
import re
import sys
import sysconfig
import time
import uuid
from pathlib import Path
from typing import NamedTuple

from tqdm.auto import tqdm

from memformer.eval import passkey
from memformer.eval.plots import TrialLog
from memformer.eval.samples import Query, Sample, Trial, encode, token_fractions  # noqa: F401 (re-exported)

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


class _Group(NamedTuple):
    """One trial's needles: sentences (target first), queries, answer budget, and every key and
    value its sentences hold (so a multi-needle document can keep them distinct)."""
    sentences: list[str]
    queries: list[Query]
    max_new_tokens: int
    keys: list[str]
    values: list[str]


def _plan(variant: str, rng: random.Random) -> _Group:
    """The needles and queries of one trial of `variant`."""
    if variant.startswith("single-") or variant == "multikey":
        kind = variant.removeprefix("single-") if variant.startswith("single-") else "number"
        n = 1 + (DISTRACTORS if variant == "multikey" else 0)
        keys, values = _distinct(make_key, n, rng), [make_value(kind, rng) for _ in range(n)]
        sentences = [f"The special magic {kind} for {k} is {v}." for k, v in zip(keys, values)]
        budget = 40 if kind == "uuid" else 16
        query = Query(f"The special magic {kind} for {keys[0]} is", [values[0]], kind)
        return _Group(sentences, [query], budget, keys, values)
    if variant == "multivalue":
        key = make_key(rng)
        values = _distinct(lambda r: make_value("number", r), VALUES, rng)
        sentences = [f"One of the special magic numbers for {key} is {v}." for v in values]
        query = Query(f"The special magic numbers for {key} are", values, "number")
        return _Group(sentences, [query], 12 * VALUES, [key], values)
    if variant == "multiquery":
        keys = _distinct(make_key, QUERIES, rng)
        values = [make_value("number", rng) for _ in keys]
        sentences = [f"The special magic number for {k} is {v}." for k, v in zip(keys, values)]
        queries = [Query(f"The special magic number for {k} is", [v], "number") for k, v in zip(keys, values)]
        return _Group(sentences, queries, 16, keys, values)
    raise ValueError(f"unknown needle variant {variant!r}; choose from {', '.join(VARIANTS)}")


def make_sample(tokenizer, variant: str, length: int, depth: float, rng: random.Random, index: int = 0) -> Sample:
    """A document of about `length` tokens (with the longest cue) holding `variant`'s needles:
    the target (first query's) needle at `depth`, the others at random depths."""
    sentences, queries, budget, _, _ = _plan(variant, rng)
    depths = [depth] + [rng.random() for _ in sentences[1:]]
    fixed = sum(len(encode(tokenizer, s + "\n")) for s in sentences)
    fixed += max(len(encode(tokenizer, "\n\n" + q.cue)) for q in queries)
    if length - fixed < 64:
        raise ValueError(f"length {length} is too short for the {variant} needles ({fixed} tokens); use >= {fixed + 64}")
    text, offsets = plant(haystack(tokenizer, length - fixed, rng), list(zip(depths, sentences)))
    tokens = len(encode(tokenizer, text))
    measured = [round(len(encode(tokenizer, text[:o])) / tokens, 4) for o in offsets]
    return Sample(variant, length, index, depth, text, queries, tokens, measured, budget)


def spread_depths(n: int, doc: int, docs: int, rng: random.Random) -> list[float]:
    """Target depths of the n trials of document `doc` of `docs`, increasing: trial j sits in
    slot j * docs + doc of n * docs equal slots, at a seeded point of the slot's middle 60%.
    So every document spans all depths, the documents interleave, and needles never collide."""
    slots = n * docs
    return [(j * docs + doc + rng.uniform(0.2, 0.8)) / slots for j in range(n)]


def _document_groups(variant: str, n: int, rng: random.Random) -> list[_Group]:
    """n trials of `variant` whose keys and values are distinct across the whole document (a
    group that repeats a key or value of the document, or its own value, is drawn again)."""
    groups: list[_Group] = []
    keys: set[str] = set()
    values: set[str] = set()
    for _ in range(200 * n):                 # bounded: e.g. 64 value words cannot serve 65 trials
        if len(groups) == n:
            return groups
        g = _plan(variant, rng)
        if keys.isdisjoint(g.keys) and values.isdisjoint(g.values) and len(set(g.values)) == len(g.values):
            groups.append(g)
            keys.update(g.keys)
            values.update(g.values)
    if len(groups) < n:
        raise ValueError(f"cannot draw {n} {variant} trials with distinct keys and values for one document; "
                         "use fewer needles per document")
    return groups


def make_document(tokenizer, variant: str, length: int, depths: list[float], rng: random.Random,
                  index: int = 0) -> Sample:
    """A multi-needle document of about `length` tokens (with the longest cue): one trial of
    `variant` per depth in `depths` (its target needle there, its other needles at random depths),
    keys and values distinct across the document. Returns a Sample whose `needles` are the trials."""
    groups = _document_groups(variant, len(depths), rng)
    planted = [(d, g.sentences[0]) for d, g in zip(depths, groups)]
    owner = list(range(len(groups)))                 # the trial each planted sentence belongs to
    for j, g in enumerate(groups):
        planted += [(rng.random(), s) for s in g.sentences[1:]]
        owner += [j] * (len(g.sentences) - 1)
    queries = [q for g in groups for q in g.queries]
    fixed = sum(len(encode(tokenizer, s + "\n")) for _, s in planted)
    fixed += max(len(encode(tokenizer, "\n\n" + q.cue)) for q in queries)
    if length - fixed < 64:
        raise ValueError(f"length {length} is too short for {len(depths)} trials of {variant} needles "
                         f"({fixed} tokens); use >= {fixed + 64} or fewer needles per document")
    text, offsets = plant(haystack(tokenizer, length - fixed, rng), planted)
    tokens, measured = token_fractions(tokenizer, text, offsets)
    trials = []
    for j, (d, g) in enumerate(zip(depths, groups)):
        asked = [k for k in g.keys if any(f" {k} " in q.cue for q in g.queries)]
        trials.append(Trial(d, g.queries, [m for m, o in zip(measured, owner) if o == j], ",".join(asked)))
    return Sample(variant, length, index, None, text, queries, tokens, measured,
                  max(g.max_new_tokens for g in groups), trials)


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
    cue; `memformer.qa.longdoc.Answer`s, each with `evidence` spans and the number of checked
    reads it was answered from (`reads`)."""
    from memformer.qa.documents import Corpus
    from memformer.qa.evidence import answer_evidence
    from memformer.qa.longdoc import Answer
    model.reset_memory()
    model.memorize(text, show_progress=False)
    corpus = Corpus.from_documents([text], model.tokenizer) if evidence else None
    out = []
    for c in cues:
        asked = model.ask(cue=c, max_new_tokens=max_new_tokens, record=evidence > 0, return_dict=True)
        ans = Answer("memory", asked.text, loop_cut=asked.loop_cut, reads=asked.reads)
        if evidence:
            ans.evidence, ans.memory_share = answer_evidence(model, corpus, evidence)
        out.append(ans)
    return out


def evidence_record(trial: Trial, answer) -> dict:
    """Where the trial's first answer's evidence points: does its top span (top 3 spans) hold the
    target needle's value, i.e. lie on the planted sentence?"""
    value = trial.queries[0].expected[0]
    spans = answer.evidence
    return dict(evidence_top1=bool(spans) and value in spans[0].text,
                evidence_top3=any(value in s.text for s in spans),
                evidence=[dict(start=s.start, end=s.end, score=round(s.score, 4), text=s.text[:160]) for s in spans])


def run_document(model, sample: Sample, mode: str, todo: list[int], evidence: bool = False) -> list[dict]:
    """Read `sample`'s document once in `mode` and ask the cues of its trials `todo` (indices into
    `sample.trials`), each cue on its own: one trial record per trial (see `memformer.eval.plots`),
    in `todo` order. `seconds` is the wall time of the whole run (the read and every cue asked).
    evidence: in mode memory, also record where each trial's evidence spans point."""
    t0 = time.perf_counter()
    trials = [sample.trials[j] for j in todo]
    cues = [q.cue for t in trials for q in t.queries]
    full = None
    if mode == "memory":
        full = memory_answers(model, sample.text, cues, sample.max_new_tokens, evidence=3 if evidence else 0)
        answers = [a.text for a in full]
    else:
        answers = answer_cues(model, sample.text, cues, mode, sample.max_new_tokens)
    seconds = round(time.perf_counter() - t0, 2)
    records, at = [], 0
    for j, trial in zip(todo, trials):
        n = len(trial.queries)
        rec = trial_record(sample, j, mode, None if answers is None else answers[at:at + n], seconds)
        if full is not None:         # how many checked reads each answer came from (MemoryConfig.answer_reads)
            rec["answer_reads"] = [a.reads for a in full[at:at + n]]
        if evidence and full is not None:
            rec.update(evidence_record(trial, full[at]))
        records.append(rec)
        at += n
    return records


def trial_record(sample: Sample, j: int, mode: str, answers: list[str] | None, seconds: float) -> dict:
    """The record of trial j of `sample` given its answers (None: the mode cannot hold the
    document). A multi-needle document's trials also say which needle they are (`needle`, of
    `needles`) and the `key` asked; `index` is then the document's number."""
    trial = sample.trials[j]
    multi = bool(sample.needles)
    rec = dict(id=record_id(sample.task, sample.length, sample.index, mode, j if multi else None),
               task=sample.task, length=sample.length, index=sample.index)
    if multi:
        rec.update(needle=j, needles=len(sample.needles), key=trial.key)
    rec.update(depth=round(trial.depth, 4), mode=mode, tokens=sample.tokens, needle_depths=trial.needle_depths,
               expected=[q.expected for q in trial.queries])
    if answers is None:
        return dict(rec, status="n/a", score=None, correct=None, answers=None, seconds=0.0)
    scores = [score_query(a, q) for a, q in zip(answers, trial.queries)]
    score = sum(scores) / len(scores)
    if multi:       # tells a wrong needle found apart from no needle found
        rec["other_needles"] = other_needles(sample, j, answers)
    return dict(rec, status="ok", score=score, correct=score == 1.0, answers=answers, seconds=seconds)


def other_needles(sample: Sample, j: int, answers: list[str]) -> list[int]:
    """The document's other trials whose values the answers of trial j give among their first
    values (as many as each query expects), sorted: [] when no answer took another needle's value."""
    owner = {v: i for i, t in enumerate(sample.needles) if i != j for q in t.queries for v in q.expected}
    found = {owner[v] for a, q in zip(answers, sample.needles[j].queries)
             for v in candidates(q.kind, a)[:len(q.expected)] if v in owner}
    return sorted(found)


def other_needle_table(records) -> str:
    """Markdown: per task, length and mode, the multi-needle trials whose answer gave another
    needle's value of the same document; "" when no record is of a multi-needle document."""
    rows: dict[tuple[str, int, str], list[dict]] = {}
    for r in records:
        if "other_needles" in r:
            rows.setdefault((r["task"], r["length"], r["mode"]), []).append(r)
    if not rows:
        return ""
    from memformer.eval.plots import length_label, MODE_ORDER
    out = ["| task | length | mode | answer gave another trial's value |", "|---|---:|---|---:|"]
    order = lambda k: (k[0], k[1], MODE_ORDER.index(k[2]) if k[2] in MODE_ORDER else len(MODE_ORDER))
    for (task, length, mode), rs in sorted(rows.items(), key=lambda kv: order(kv[0])):
        n, wrong = len(rs), sum(bool(r["other_needles"]) for r in rs)
        out.append(f"| {task} | {length_label(length)} | {mode} | {wrong}/{n} ({wrong / n:.0%}) |")
    return "\n".join(out)


def record_id(task: str, length: int, index: int, mode: str, needle: int | None = None) -> str:
    """"task/length/index/mode" for a one-trial document; "/needle" appended for a multi-needle one's trial."""
    rid = f"{task}/{length}/{index}/{mode}"
    return rid if needle is None else f"{rid}/{needle}"


def trial_rng(seed: int, task: str, length: int, index) -> random.Random:
    """One generator per trial (or multi-needle document), so it is the same whatever else the run holds."""
    return random.Random(f"{seed}/{task}/{length}/{index}")


class Job(NamedTuple):
    """One document to build: a one-trial sample (needles 1, its target at `depth`) or a
    multi-needle document (document `index` of `docs`, `needles` trials, depth None)."""
    task: str
    length: int
    index: int
    depth: float | None = None
    needles: int = 1
    docs: int = 1

    def ids(self, mode: str) -> list[str]:
        if self.needles == 1:
            return [record_id(self.task, self.length, self.index, mode)]
        return [record_id(self.task, self.length, self.index, mode, j) for j in range(self.needles)]


def run_trials(model, jobs: list[Job], build, modes, log: TrialLog | None, desc: str, show_progress: bool = True,
               evidence: bool = False) -> list[dict]:
    """build(job) -> Sample, called only when a trial of the job is not in `log` yet; each document
    is read once per mode and only its unfinished trials are asked. Records stream to `log`
    (a document's after its read and asks); returns every trial's record, in job, mode, trial order."""
    results = []
    # a resumed run starts the bar at the trials already in the log
    done = 0 if log is None else sum(rid in log for job in jobs for mode in modes for rid in job.ids(mode))
    bar = tqdm(total=sum(j.needles for j in jobs) * len(modes), initial=done, desc=desc, unit="trial",
               disable=not show_progress)
    for job in jobs:
        sample = None
        for mode in modes:
            ids = job.ids(mode)
            todo = [j for j, rid in enumerate(ids) if log is None or rid not in log]
            new = {}
            if todo:
                sample = sample or build(job)
                for rec in run_document(model, sample, mode, todo, evidence):
                    if log is not None:
                        log.append(rec)
                    new[rec["id"]] = rec
            results += [new[rid] if rid in new else log.get(rid) for rid in ids]
            bar.update(len(todo))
    bar.close()
    return results


def check_modes(modes) -> list[str]:
    from memformer.qa import longdoc as qa
    modes = list(modes)
    bad = [m for m in modes if m not in qa.MODES]
    if bad or not modes:
        raise ValueError(f"unknown mode(s) {bad or modes}; choose from {', '.join(qa.MODES)}")
    return modes


def run_settings(model, name: str, seed: int | None, trials: int, needles_per_doc: int = 1) -> dict:
    """What decides a trial's outcome; a --resume run must match it. needles_per_doc is left out
    when 1, so the settings of one-needle runs (and their --resume) stay as they were."""
    out = {"eval": name, "seed": seed, "trials": trials, "backbone": model.backbone_fingerprint,
           "memory_config": model.memory_config.to_dict(), "python": sys.version.split()[0]}
    if needles_per_doc != 1:
        out["needles_per_doc"] = needles_per_doc
    return out


def build_sample(tokenizer, job: Job, seed: int) -> Sample:
    """`job`'s document (task: a variant, or "passkey"), from its own seeded generator."""
    task, length, index = job.task, job.length, job.index
    if job.needles == 1:                      # the one-needle layout, drawn exactly as before
        rng = trial_rng(seed, task, length, index)
        if task == "passkey":
            return passkey.make_sample(tokenizer, length, job.depth, rng.randint(10000, 99999), index)
        return make_sample(tokenizer, task, length, job.depth, rng, index=index)
    rng = trial_rng(seed, task, length, f"doc{index}of{job.docs}x{job.needles}")
    depths = spread_depths(job.needles, index, job.docs, rng)
    if task == "passkey":
        return passkey.make_document(tokenizer, length, depths, rng, index)
    return make_document(tokenizer, task, length, depths, rng, index)


def plan_jobs(variants, lengths, trials: int, needles_per_doc: int = 1) -> list[Job]:
    """One-needle layout: trial i of n puts its target at depth (i + 0.5) / n. Multi-needle:
    ceil(trials / needles_per_doc) documents per task and length, `needles_per_doc` trials each."""
    if needles_per_doc == 1:
        return [Job(v, L, i, (i + 0.5) / trials) for L in lengths for v in variants for i in range(trials)]
    docs = math.ceil(trials / needles_per_doc)
    return [Job(v, L, d, None, needles_per_doc, docs) for L in lengths for v in variants for d in range(docs)]


def evaluate(model, variants=TASKS, lengths=(4096,), trials: int = 5, modes=("memory", "truncate"),
             seed: int = 0, out_dir=None, resume: bool = False, show_progress: bool = True,
             name: str = "needle", evidence: bool = False, needles_per_doc: int = 1) -> list[dict]:
    """Every task (needle variants, and "passkey") x length x trial in every mode (`plan_jobs`:
    needles_per_doc > 1 plants that many trials in each document, read once per mode and asked
    one trial at a time; the trials are rounded up to whole documents). Records stream to
    out_dir/trials.jsonl (resumable) when out_dir is set; `name` labels the run in
    out_dir/run.json. evidence: memory trials also record whether their evidence spans point at
    the needle (`evidence_table`)."""
    if model.tokenizer is None:
        raise ValueError(f"the {name} evaluation needs a model with a tokenizer")
    variants, modes = list(variants), check_modes(modes)
    bad = [v for v in variants if v not in TASKS]
    if bad or not variants:
        raise ValueError(f"unknown needle variant(s) {bad or variants}; choose from {', '.join(TASKS)}")
    if trials < 1 or needles_per_doc < 1 or not lengths or min(lengths) < 1:
        raise ValueError(f"need trials >= 1, needles per document >= 1 and positive lengths, got trials={trials}, "
                         f"needles_per_doc={needles_per_doc}, lengths={list(lengths)}")
    jobs = plan_jobs(variants, lengths, trials, needles_per_doc)
    build = lambda job: build_sample(model.tokenizer, job, seed)
    for v in variants:                    # a length too short fails now, not hours into the run
        build(next(j for j in jobs if j.task == v and j.length == min(lengths)))
    settings = run_settings(model, name, seed, trials, needles_per_doc)
    try:
        log = None if out_dir is None else TrialLog(out_dir, settings, resume)
    except ValueError as e:
        if "needles_per_doc: None ->" in str(e):       # a run from before needles_per_doc existed
            raise ValueError(f"{e}; its trials have one needle per document: resume it with "
                             "--needles-per-doc 1 (needles_per_doc=1)") from None
        raise
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
