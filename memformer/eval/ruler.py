"""RULER's synthetic retrieval tasks (Hsieh et al., 2024), its protocol, the modes side by side.

Each sample is RULER's input split where a long-document reader splits it: the *document* is the
task template up to its context (the instruction line, then the haystack with the needles in
it), and the *cue* is the template's question followed by its answer prefix, which the model
continues. Every mode reads the same document and completes the same cue through
`memformer.qa.longdoc` (`prepare`, then `answer(cue=...)`): memory (the library's question
reads), rag and truncate differ only in how they reach the document.

Tasks (RULER's `synthetic.yaml`):

* niah_single_1   noise haystack, one needle, word key, 7-digit number value;
* niah_single_2   essay haystack, otherwise as niah_single_1;
* niah_single_3   essay haystack, UUID value;
* niah_multikey_1 essay haystack, 4 needles of the same form with different keys, one asked;
* niah_multivalue essay haystack, 4 needles give one key 4 values, all asked;
* niah_multiquery essay haystack, 4 keys, all 4 asked in one question;
* vt              variable tracking: one chain of 4 hops in the noise haystack, after a one-shot
                  example of the task with its answer; all 5 variable names asked.

Needle: "One of the special magic {numbers} for {key} is: {value}."; keys are adjective-noun
pairs from the `wonderwords` lists (RULER's); one-value one-query templates are put in the
singular, as RULER does. Placement follows RULER: the noise haystack is the sentence "The grass
is green. ..." repeated, one per line, needles inserted at random lines; an essay haystack is
the text's first words (whitespace collapsed), split into sentences, needles inserted at depths
drawn from 40 evenly spaced depths. The sentence split is a regular expression where RULER uses
NLTK's punkt. A haystack shorter than a sample needs is repeated.

Length: document + cue + the task's answer budget (RULER's tokens_to_generate: 128 for the
needles, 30 for vt) fill the requested length, in the backbone's tokens.

Score: RULER's `string_match_all`, the fraction of the expected strings found anywhere in the
answer (case-insensitive). Every answer is also checked for a degenerate loop (`looping`).
"""
from __future__ import annotations

import bisect
import functools
import random
import re
import string
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from memformer.decoding import looping  # noqa: F401 (re-exported: the eval's loop check)
from memformer.eval.plots import TrialLog, length_label, ordered_modes
from memformer.loading import encode_text
from memformer.qa.memory_cache import DEFAULT_LIMIT as DEFAULT_CACHE_LIMIT

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
NIAH_HEAD = ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the {type_v} afterwards.")
NIAH_QUESTION = "What are all the special magic {type_v} for {query} mentioned in the provided text?"
NIAH_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION = "Question: Find all variables that are assigned the value {query} in the text above."
# "assgined" is RULER's own spelling, kept so the prompt is the published one
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
             "are assgined the value {query}, they are: ")
DEPTHS = [round(100 * i / 39) for i in range(40)]       # RULER: np.linspace(0, 100, 40), rounded
NUMBER_DIGITS = 7
VT_HOPS, VT_ICL_TOKENS = 4, 500


@dataclass(frozen=True)
class TaskSpec:
    """One RULER task: its kind ("niah" | "vt"), haystack ("noise" | "essay"), needle counts
    (keys k, values per key v, keys asked q) and value type, and its answer budget."""
    kind: str
    haystack: str
    value: str = "numbers"           # "numbers" | "uuids"
    k: int = 1
    v: int = 1
    q: int = 1
    tokens_to_generate: int = 128


TASKS = {
    "niah_single_1": TaskSpec("niah", "noise"),
    "niah_single_2": TaskSpec("niah", "essay"),
    "niah_single_3": TaskSpec("niah", "essay", value="uuids"),
    "niah_multikey_1": TaskSpec("niah", "essay", k=4),
    "niah_multivalue": TaskSpec("niah", "essay", v=4),
    "niah_multiquery": TaskSpec("niah", "essay", k=4, q=4),
    "vt": TaskSpec("vt", "noise", tokens_to_generate=30),
}
DEFAULT_TASKS = ("niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multivalue", "niah_multiquery", "vt")


@dataclass
class RulerSample:
    """One sample: the document (instruction line + context), the cue to complete (question +
    answer prefix), the strings the answer must hold, and where the needles sit (0..1 of the
    document's tokens, in document order)."""
    task: str
    length: int
    index: int
    document: str
    cue: str
    expected: list[str]
    max_new_tokens: int
    tokens: int = 0                    # tokens of document + "\n\n" + cue
    needle_depths: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------- words and values
@functools.lru_cache(maxsize=1)
def key_words() -> tuple[str, ...]:
    """RULER's keys: every "adjective-noun" of the wonderwords lists, sorted."""
    try:
        from importlib.resources import files
        assets = files("wonderwords") / "assets"
        read = lambda name: [w.strip() for w in (assets / name).read_text().splitlines() if w.strip()]
        adjs, nouns = read("adjectivelist.txt"), read("nounlist.txt")
    except (ImportError, FileNotFoundError) as e:
        raise ImportError(f"the RULER evaluation draws its keys from the wonderwords word lists: "
                          f"pip install wonderwords ({e})") from None
    return tuple(sorted({f"{a}-{n}" for a in adjs for n in nouns}))


def make_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** (NUMBER_DIGITS - 1), 10 ** NUMBER_DIGITS - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown value type {kind!r}")


def string_match_all(answer: str, expected: list[str]) -> float:
    """RULER's score: the fraction of `expected` found in the answer, case-insensitively (control
    characters read as newlines, as RULER's post-processing does)."""
    pred = re.sub(r"[\x00-\x1f]", "\n", answer).strip().lower()
    return sum(r.lower() in pred for r in expected) / len(expected)


def wrong_values(answer: str | None, expected: list[str]) -> int:
    """Values of the asked-for form (numbers of as many digits, uuids, vt's upper-case names of as
    many letters) that the answer names but that are not expected: what `string_match_all`,
    which counts recall only, does not see. 0 for an empty answer or values of another form."""
    if not answer or not expected:
        return 0
    v = expected[0]
    if v.isdigit():
        form = rf"(?<!\d)\d{{{len(v)}}}(?!\d)"
    elif re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", v.lower()):
        form = r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}"
    elif v.isalpha() and v.isupper():
        form = rf"(?<![A-Za-z])[A-Z]{{{len(v)}}}(?![A-Za-z])"
    else:
        return 0
    want = {e.lower() for e in expected}
    return len({m.lower() for m in re.findall(form, answer)} - want)


# ---------------------------------------------------------------------- haystacks
def essay_words(text: str) -> list[str]:
    """RULER's essay haystack units: the text's words, whitespace collapsed."""
    words = re.sub(r"\s+", " ", text).strip().split(" ")
    if not words or words == [""]:
        raise ValueError("the essay haystack is empty")
    return words


def split_sentences(text: str) -> list[str]:
    """Sentences: split after ., ! or ? followed by a space (RULER uses NLTK's punkt)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _take(words: list[str], n: int) -> list[str]:
    """The first n words, the haystack repeated when it is shorter."""
    reps = -(-n // len(words))
    return (words * reps)[:n]


def _niah_context(spec: TaskSpec, n: int, needles: list[str], essay: list[str], rng: random.Random) -> str:
    if spec.haystack == "noise":
        sentences = [NOISE] * n
        for at, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
            sentences.insert(at, needle)
        return "\n".join(sentences)
    sents = split_sentences(" ".join(_take(essay, n)))
    cuts = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles))) + [len(sents)]
    parts = []
    for i in range(1, len(cuts)):
        parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
        if i - 1 < len(needles):
            parts.append(needles[i - 1])
    return " ".join(p for p in parts if p)


def _niah(spec: TaskSpec, n: int, essay: list[str], rng: random.Random) -> tuple[str, str, list[str], list[str]]:
    """(document, cue, expected, needles) of a needle task with a haystack of n units."""
    keys = rng.sample(key_words(), spec.k)
    values = [[make_value(spec.value, rng) for _ in range(spec.v)] for _ in keys]
    needles = [NEEDLE.format(type_v=spec.value, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    context = _niah_context(spec, n, needles, essay, rng)
    asked = rng.sample(range(spec.k), spec.q)
    expected = [v for i in asked for v in values[i]]
    names = [keys[i] for i in asked]
    query = names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1]
    head, question, prefix, type_v = NIAH_HEAD, NIAH_QUESTION, NIAH_PREFIX, spec.value
    if spec.q * spec.v == 1:               # RULER's singular for one value asked
        head = head.replace("Some", "A").replace("are all", "is").replace("are", "is")
        question = question.replace("are all", "is").replace("are", "is")
        prefix = prefix.replace("are", "is")
        type_v = type_v[:-1]
    document = head.format(type_v=type_v) + "\n" + context
    cue = question.format(type_v=type_v, query=query) + prefix.format(type_v=type_v, query=query)
    return document, cue, expected, needles


def _vt_chain(rng: random.Random, hops: int, letters: int) -> tuple[list[str], list[str], str]:
    """(variable names, chain statements, the value): VAR A = 12345, VAR B = VAR A, ..."""
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    return names, chain, value


def _vt_text(n: int, chain: list[str], rng: random.Random) -> str:
    """RULER's variable-tracking context: n noise paragraphs, the chain's statements inserted in
    order at random places."""
    sentences = [NOISE + "\n"] * n
    at = sorted(rng.sample(range(len(sentences)), min(len(chain), len(sentences))))
    for i, (pos, statement) in enumerate(zip(at, chain)):
        sentences.insert(pos + i, statement)
    for statement in chain[len(at):]:
        sentences.append(statement)
    return "\n".join(sentences).replace(". \n", ".\n")


def _vt(n: int, rng: random.Random, icl: str) -> tuple[str, str, list[str], list[str]]:
    names, chain, value = _vt_chain(rng, VT_HOPS, 5)
    document = (icl + "\n\n" if icl else "") + VT_HEAD + "\n\n" + _vt_text(n, chain, rng)
    cue = "\n" + VT_QUESTION.format(query=value) + VT_PREFIX.format(num_v=VT_HOPS + 1, query=value)
    return document, cue, names, chain


def vt_example(tokenizer, rng: random.Random) -> str:
    """RULER's one-shot example for vt: a sample of about 500 tokens with 3-letter variables,
    question, answer prefix and its answer, all as text."""
    names, chain, value = _vt_chain(rng, VT_HOPS, 3)
    body = lambda n: (VT_HEAD + "\n\n" + _vt_text(n, chain, random.Random(rng.random())) + "\n"
                      + VT_QUESTION.format(query=value) + VT_PREFIX.format(num_v=VT_HOPS + 1, query=value))
    n = 1
    while n < 64 and len(encode_text(tokenizer, body(n + 1))["input_ids"]) <= VT_ICL_TOKENS - 30:
        n += 1
    return body(n) + " " + " ".join(names)


# ---------------------------------------------------------------------- samples
def make_sample(tokenizer, task: str, length: int, rng: random.Random, essay: list[str], index: int = 0) -> RulerSample:
    """A sample of `task` whose document + cue + answer budget fill about `length` tokens: the
    haystack's size is searched (a few encodings) so that it fits, as RULER does."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; choose from {', '.join(TASKS)}")
    spec = TASKS[task]
    budget = length - spec.tokens_to_generate
    icl = vt_example(tokenizer, random.Random(rng.random())) if spec.kind == "vt" else ""
    state = rng.getstate()

    def build(n: int):
        rng.setstate(state)                # the same keys and values at every size tried
        if spec.kind == "vt":
            return _vt(n, rng, icl)
        return _niah(spec, n, essay, rng)

    def size(parts) -> int:
        return len(encode_text(tokenizer, parts[0] + "\n\n" + parts[1])["input_ids"])

    unit = NOISE if spec.haystack == "noise" else " ".join(essay[:2000])
    per_unit = len(encode_text(tokenizer, unit)["input_ids"]) / (1 if spec.haystack == "noise" else min(2000, len(essay)))
    lo, hi = 1, max(2, int(budget / max(per_unit, 1e-3) * 1.2) + 8)
    if size(build(lo)) > budget:
        raise ValueError(f"length {length} is too short for {task}: its template and needles alone take "
                         f"{size(build(lo))} tokens with {spec.tokens_to_generate} to generate")
    while size(build(hi)) <= budget:       # the estimate was short: grow until over
        lo, hi = hi, hi * 2
    while hi - lo > max(1, lo // 200):     # the largest size that fits, within 0.5%
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(build(mid)) <= budget else (lo, mid)
    document, cue, expected, needles = build(lo)
    sample = RulerSample(task, length, index, document, cue, expected, spec.tokens_to_generate)
    sample.tokens = size((document, cue))
    sample.needle_depths = needle_depths(tokenizer, document, needles)
    return sample


def needle_depths(tokenizer, document: str, needles: list[str]) -> list[float]:
    """Each needle's position in the document as a fraction of its tokens, in document order."""
    enc = encode_text(tokenizer, document, return_offsets_mapping=True)
    starts = [a for a, _ in enc["offset_mapping"]]
    out = []
    for s in needles:
        at = document.find(s.strip())
        if at >= 0:
            out.append(round(bisect.bisect_left(starts, at) / max(1, len(starts)), 4))
    return sorted(out)


def trial_rng(seed: int, task: str, length: int, index: int) -> random.Random:
    """One generator per sample, so a sample is the same whatever else the run holds."""
    return random.Random(f"ruler/{seed}/{task}/{length}/{index}")


def haystack_text(path=None) -> tuple[str, str]:
    """(name, text) of the essay haystack: a file (`memformer.qa.documents.read_document`), or by
    default Python's documentation topics."""
    if path is None:
        from memformer.qa.demo import python_docs_text
        return "python-docs", python_docs_text()
    from memformer.qa.documents import read_document
    return Path(path).name, read_document(path)


# ---------------------------------------------------------------------- running
def run_sample(model, sample: RulerSample, mode: str, cache_dir=None, cache_limit=DEFAULT_CACHE_LIMIT) -> dict:
    """Read the sample's document in `mode` and complete its cue: one record. cache_dir: mode
    memory reuses the memory saved there for the same document and memory-writing settings
    (`memformer.qa.longdoc.memory_key`), so runs that differ only in how memory is read share it;
    the folder is kept under `cache_limit` (`memformer.qa.memory_cache`)."""
    from memformer.qa import longdoc as qa
    t0 = time.perf_counter()
    rec = dict(id=record_id(sample.task, sample.length, sample.index, mode), task=sample.task,
               length=sample.length, index=sample.index, mode=mode, tokens=sample.tokens,
               depth=sample.needle_depths[0] if sample.needle_depths else 0.0,
               needle_depths=sample.needle_depths, expected=sample.expected)
    try:
        ctx = qa.prepare(model, [sample.document], mode, show_progress=False,
                         cache_dir=cache_dir if mode == "memory" else None, cache_limit=cache_limit)
        # evidence=0: no retrieval recording, which only costs time here
        ans = qa.answer(model, ctx, cue=sample.cue, max_new_tokens=sample.max_new_tokens, evidence=0)
    except qa.DoesNotFit:
        return dict(rec, status="n/a", score=None, correct=None, answer=None, looping=None, seconds=0.0)
    text = ans.text
    score = string_match_all(text, sample.expected)
    # looping: generation ran into a loop (cut back by the library's loop stop) or still holds one
    return dict(rec, status="ok", score=score, correct=score == 1.0, answer=text,
                looping=ans.loop_cut or looping(text), reads=ans.reads,
                read_answers=ans.read_answers, read_loops=ans.read_loops,
                seconds=round(time.perf_counter() - t0, 2))


def record_id(task: str, length: int, index: int, mode: str) -> str:
    return f"{task}/{length}/{index}/{mode}"


def evaluate(model, tasks=DEFAULT_TASKS, lengths=(16384,), samples: int = 10, modes=("memory", "rag", "truncate"),
             seed: int = 0, haystack=None, out_dir=None, resume: bool = False, show_progress: bool = True,
             cache_dir=None, cache_limit=DEFAULT_CACHE_LIMIT) -> list[dict]:
    """Every task x length x sample in every mode; returns the records (task, length, index
    order, modes in the order given). haystack: a file for the essay tasks (default Python's
    documentation topics). Records stream to out_dir/trials.jsonl (resumable with resume=True
    when the settings that decide the outcome are unchanged; a larger `samples` adds samples to a
    finished run). cache_dir, cache_limit: memories kept there, under that size (`run_sample`)."""
    from memformer.eval.needle import check_modes
    if model.tokenizer is None:
        raise ValueError("the RULER evaluation needs a model with a tokenizer")
    tasks, modes = list(tasks), check_modes(modes)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"unknown RULER task(s) {bad or tasks}; choose from {', '.join(TASKS)}")
    if samples < 1 or not lengths or min(lengths) < 1:
        raise ValueError(f"need samples >= 1 and positive lengths, got samples={samples}, lengths={list(lengths)}")
    name, text = haystack_text(haystack)
    essay = essay_words(text)
    build = lambda task, L, i: make_sample(model.tokenizer, task, L, trial_rng(seed, task, L, i), essay, i)
    for t in tasks:                        # a length too short fails now, not hours into the run
        build(t, min(lengths), 0)
    # sample i is drawn from its own generator (`trial_rng`), so the number of samples decides no
    # outcome: a finished run grows with resume=True and a larger `samples`
    settings = {"eval": "ruler", "seed": seed, "haystack": name,
                "haystack_words": len(essay), "backbone": model.backbone_fingerprint,
                "memory_config": model.memory_config.to_dict()}
    log = None if out_dir is None else TrialLog(out_dir, settings, resume)
    jobs = [(t, L, i) for L in lengths for t in tasks for i in range(samples)]
    done = 0 if log is None else sum(record_id(*j, m) in log for j in jobs for m in modes)
    bar = tqdm(total=len(jobs) * len(modes), initial=done, desc="ruler", unit="sample", disable=not show_progress)
    results = []
    try:
        for job in jobs:
            sample = None
            for mode in modes:
                rid = record_id(*job, mode)
                if log is not None and rid in log:
                    results.append(log.get(rid))
                    continue
                sample = sample or build(*job)
                rec = run_sample(model, sample, mode, cache_dir, cache_limit)
                if log is not None:
                    log.append(rec)
                results.append(rec)
                bar.update(1)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return results


# ---------------------------------------------------------------------- report
def mean_table(records) -> str:
    """Markdown: per length, each mode's mean score over the tasks (each task weighs the same,
    as RULER averages its tasks), the answers that looped, and the values named that were not
    asked for (`wrong_values`, summed over the answers)."""
    modes = ordered_modes(records)
    lines = ["| length | " + " | ".join(f"{m} mean" for m in modes) + " | " + " | ".join(f"{m} looping" for m in modes)
             + " | " + " | ".join(f"{m} wrong values" for m in modes) + " |",
             "|---" * (1 + 3 * len(modes)) + "|"]
    for L in sorted({r["length"] for r in records}):
        means, loops, wrong = [], [], []
        for m in modes:
            rs = [r for r in records if r["length"] == L and r["mode"] == m and r["status"] == "ok"]
            tasks = sorted({r["task"] for r in rs})
            per_task = [sum(r["score"] for r in rs if r["task"] == t) / sum(r["task"] == t for r in rs) for t in tasks]
            means.append(f"{100 * sum(per_task) / len(per_task):.1f}%" if per_task else "n/a")
            loops.append(f"{sum(bool(r['looping']) for r in rs)}/{len(rs)}")
            wrong.append(str(sum(wrong_values(r.get("answer"), r.get("expected") or []) for r in rs)))
        lines.append(f"| {length_label(L)} | " + " | ".join(means) + " | " + " | ".join(loops) + " | "
                     + " | ".join(wrong) + " |")
    return "\n".join(lines)


def looping_examples(records, limit: int = 5) -> str:
    """Markdown list of the first looping answers, per mode (empty when none looped)."""
    rows = [r for r in records if r.get("looping")]
    return "\n".join(f"- {r['id']}: `{r['answer'][:80]!r}`" for r in rows[:limit])
