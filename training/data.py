"""Long documents for crossbatch training: sources, held-out split, packing, synthetic retrieval.

A *source* yields documents (name + lazily read text): plain-text files, JSONL lines, a Hugging
Face `datasets` dataset saved with `save_to_disk`, or the default corpus that exists offline on
every machine — Python's standard library, each package's source files concatenated into one
document (like the GitHub set of Memorizing Transformers), and Python's documentation topics
(`pydoc_data.topics`) cut into parts. Documents are split into train / held-out *by document*
(a hash of the name), tokenised when first read, packed into samples of `seq_len` tokens that
never mix documents, and mixed through a seeded shuffle buffer; synthetic retrieval samples
(passkey, key-value lookup, look-alike needles planted in a real document), whose answer sits
beyond the local window, are mixed in at a rate.
Everything is a function of the seed, so a resumed run replays the same stream.
"""
from __future__ import annotations

import hashlib
import random
import string
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch

from memformer.loading import encode_text

SOURCE_TYPES = ("stdlib", "python_docs", "text", "jsonl", "hf_disk")
SYNTHETIC_TASKS = ("passkey", "kv", "needles", "facts")
STDLIB_EXCLUDE = ("test", "encodings", "pydoc_data", "__phello__", "site-packages", "idlelib", "turtledemo")


class LazyDoc(NamedTuple):
    """A document's name and a function that reads its text (called only for kept documents)."""
    name: str
    load: Callable[[], str]


# ---------------------------------------------------------------- sources
def stdlib_documents(rng: random.Random, exclude=STDLIB_EXCLUDE, root: str | None = None) -> Iterator[LazyDoc]:
    """One document per standard-library package (its .py files concatenated, each under a
    `# file: path` header) and one per top-level module, in a seeded order."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    items = [p for p in base.iterdir() if p.name not in exclude and not p.name.startswith(".")
             and ((p.is_dir() and (p / "__init__.py").is_file()) or (p.is_file() and p.suffix == ".py"))]
    items.sort()
    rng.shuffle(items)

    def read(p: Path) -> str:
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        return "\n\n".join(f"# file: {f.relative_to(base)}\n{f.read_text(encoding='utf-8', errors='replace')}"
                           for f in files)
    for p in items:
        yield LazyDoc(f"stdlib/{p.name}", lambda p=p: read(p))


def python_docs_documents(rng: random.Random, parts: int = 8) -> Iterator[LazyDoc]:
    """Python's documentation topics (`pydoc_data.topics`) cut into `parts` documents
    of consecutive topics, so the held-out split can take some of them."""
    from pydoc_data.topics import topics
    keys = sorted(topics)
    n = max(1, min(parts, len(keys)))
    groups = [keys[i * len(keys) // n:(i + 1) * len(keys) // n] for i in range(n)]
    order = list(range(n))
    rng.shuffle(order)
    for i in order:
        yield LazyDoc(f"python_docs/part{i}", lambda g=groups[i]: "\n\n".join(topics[k].strip() for k in g))


def text_documents(rng: random.Random, paths) -> Iterator[LazyDoc]:
    """Each file a document; a folder means its *.txt / *.md / *.rst / *.py files, recursively.
    A document is named "<folder name>/<path inside the folder>" (a file given alone: its file
    name), so the held-out split does not depend on where the corpus lies on disk."""
    from memformer.documents import read_document
    files = []  # (name, path)
    for p in map(Path, [paths] if isinstance(paths, str) else paths):
        if p.is_dir():
            files += [(f"{p.name}/{f.relative_to(p).as_posix()}", f) for f in sorted(p.rglob("*"))
                      if f.suffix in (".txt", ".md", ".rst", ".py") and f.is_file()]
        elif p.is_file():
            files.append((p.name, p))
        else:
            raise FileNotFoundError(f"text source: {p} does not exist")
    if not files:
        raise ValueError(f"text source: no documents under {paths}")
    rng.shuffle(files)
    for name, f in files:
        yield LazyDoc(name, lambda f=f: read_document(f))


def jsonl_documents(rng: random.Random, path, text_field: str = "text", name_field: str | None = None) -> Iterator[LazyDoc]:
    """Each line of a JSONL file a document (`text_field`), in file order (the shuffle buffer mixes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"jsonl source: {path} does not exist")
    from memformer.fileio import jsonl_objects
    for n, row in jsonl_objects(path):
        if not isinstance(row.get(text_field), str):
            raise ValueError(f"{path}:{n}: no string field {text_field!r}")
        name = str(row[name_field]) if name_field and name_field in row else f"{path.name}:{n}"
        yield LazyDoc(name, lambda t=row[text_field]: t)


def hf_disk_documents(rng: random.Random, path, text_field: str = "text", split: str = "train") -> Iterator[LazyDoc]:
    """Rows of a `datasets` dataset saved with `save_to_disk` (a DatasetDict: its `split`), in a
    seeded order."""
    try:
        import datasets
    except ImportError:
        raise ImportError("the hf_disk source needs the `datasets` package: pip install datasets") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"hf_disk source {path}: no split {split!r} (has {sorted(ds)})")
        ds = ds[split]
    if text_field not in ds.column_names:
        raise ValueError(f"hf_disk source {path}: no column {text_field!r} (has {ds.column_names})")
    order = list(range(len(ds)))
    rng.shuffle(order)
    for i in order:
        yield LazyDoc(f"{Path(path).name}[{i}]", lambda i=i: ds[i][text_field])


_SOURCE_FUNCS = {"stdlib": stdlib_documents, "python_docs": python_docs_documents, "text": text_documents,
                 "jsonl": jsonl_documents, "hf_disk": hf_disk_documents}
_SOURCE_ARGS = {"stdlib": {"exclude", "root"}, "python_docs": {"parts"}, "text": {"paths"},
                "jsonl": {"path", "text_field", "name_field"}, "hf_disk": {"path", "text_field", "split"}}
_REQUIRED = {"text": {"paths"}, "jsonl": {"path"}, "hf_disk": {"path"}}


def check_source(spec: dict) -> None:
    """Raise ValueError for a source spec of an unknown type or with unknown / missing keys."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"data source {spec!r}: a mapping with a `type` ({', '.join(SOURCE_TYPES)})")
    kind = spec["type"]
    if kind not in SOURCE_TYPES:
        raise ValueError(f"data source type {kind!r} not in {SOURCE_TYPES}")
    args = set(spec) - {"type"}
    if args - _SOURCE_ARGS[kind]:
        raise ValueError(f"data source {kind!r}: unknown keys {sorted(args - _SOURCE_ARGS[kind])} "
                         f"(allowed: {sorted(_SOURCE_ARGS[kind])})")
    if _REQUIRED.get(kind, set()) - args:
        raise ValueError(f"data source {kind!r}: missing {sorted(_REQUIRED[kind] - args)}")


def iter_sources(specs: list[dict], rng: random.Random) -> Iterator[LazyDoc]:
    for spec in specs:
        check_source(spec)
        yield from _SOURCE_FUNCS[spec["type"]](rng, **{k: v for k, v in spec.items() if k != "type"})


def held_out(name: str, fraction: float) -> bool:
    """The held-out split, by document: a stable hash of the name below `fraction`."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2 ** 64
    return h < fraction


def doc_id(name: str) -> int:
    """A stable int64 id of a document name (chunks of one document share it)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "big")


# ---------------------------------------------------------------- samples and batches
@dataclass
class Sample:
    """One training sequence: ids and loss targets (same length, <= seq_len), its document id."""
    ids: list
    targets: list
    doc_id: int
    kind: str


@dataclass
class Batch:
    """B samples right-padded to seq_len: ids [B, L] long, valid [B, L] bool (False = padding),
    targets [B, L] bool (tokens the loss scores), doc_ids [B] long, kinds (one per lane)."""
    ids: torch.Tensor
    valid: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor
    kinds: list


def collate(samples: list[Sample], seq_len: int, pad_id: int) -> Batch:
    B = len(samples)
    ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    valid = torch.zeros(B, seq_len, dtype=torch.bool)
    targets = torch.zeros(B, seq_len, dtype=torch.bool)
    for b, s in enumerate(samples):
        n = len(s.ids)
        ids[b, :n] = torch.tensor(s.ids, dtype=torch.long)
        valid[b, :n] = True
        targets[b, :n] = torch.tensor(s.targets, dtype=torch.bool)
    return Batch(ids, valid, targets, torch.tensor([s.doc_id for s in samples], dtype=torch.long),
                 [s.kind for s in samples])


def _encode(tokenizer, text: str) -> list[int]:
    return list(encode_text(tokenizer, text)["input_ids"])


def pack_document(ids: list[int], seq_len: int, min_tokens: int) -> list[list[int]]:
    """Consecutive chunks of seq_len tokens of one document; a last chunk shorter than min_tokens
    is dropped (too short for memory to matter)."""
    chunks = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    return [c for c in chunks if len(c) >= min_tokens]


# The training curriculum's own formats. None of them is a prompt, needle, filler or name of the
# evaluations (memformer.eval: the passkey prompt and its grass/sky filler, which is also RULER's
# noise haystack; RULER's "special magic" needles; the needle eval's names), so that the
# evaluations stay held out.
KEY_HEAD = "Somewhere in the notes below a code is written down. Keep it in mind.\n"
KEY_FILLER = ("Rain fell on the hills all morning.", "A cart rolled slowly down the lane.",
              "Bread was cooling on the window sill.", "The clock in the hall kept ticking.",
              "Small boats rocked at the pier.", "Snow lay thin on the roofs.", "A dog barked twice, then slept.",
              "Lamps came on along the street.", "The kettle began to whistle.", "Leaves gathered by the gate.")
KEY_NEEDLE = " The code to keep in mind is {key}. Once more, the code is {key}."
KEY_QUESTION = "\nWhich code was written down in the notes? The code is"
NAMES = ("Abel", "Bianca", "Cyrus", "Dagny", "Elio", "Fenna", "Gideon", "Hester", "Ilse", "Joaquin", "Kirsi",
         "Leopold", "Maren", "Nils", "Odile", "Pietro", "Rhea", "Soren", "Thea", "Ugo", "Valeska", "Wim", "Xenia",
         "Yorick", "Zelda", "Alma", "Bertil", "Clio", "Dorian", "Edda", "Florin", "Gisela", "Hamish", "Inka",
         "Jasper", "Kaija", "Lorcan", "Minna", "Nestor", "Olwen", "Pavel", "Roisin", "Silas", "Tove", "Ulla",
         "Vito", "Wren", "Yvette")


def passkey_sample(tokenizer, rng: random.Random, seq_len: int, local: int, answer_only: bool) -> Sample:
    """A code in filler text (the training curriculum's own format: `KEY_HEAD`, sentences drawn from
    `KEY_FILLER`, `KEY_NEEDLE` at a random depth, `KEY_QUESTION`), followed by the code; the
    needle lies before the last `local` tokens, so only memory can supply it."""
    key = _number(rng)
    head, question = _encode(tokenizer, KEY_HEAD), _encode(tokenizer, KEY_QUESTION)
    needle, answer = _encode(tokenizer, KEY_NEEDLE.format(key=key)), _encode(tokenizer, f" {key}.")
    room = seq_len - len(head) - len(needle) - len(question) - len(answer)
    if room < local:
        raise ValueError(f"a passkey sample needs more than seq_len {seq_len} tokens; raise data.seq_len "
                         f"or drop passkey from data.synthetic_tasks")
    filler: list[int] = []
    while True:
        sentence = _encode(tokenizer, " " + rng.choice(KEY_FILLER))
        if len(filler) + len(sentence) > room:
            break
        filler += sentence
    # the needle goes between sentences, beyond the local window of the question
    bounds = [0] + [i + 1 for i, t in enumerate(filler) if tokenizer.decode([t]).endswith(".")]
    far = [b for b in bounds if len(filler) - b + len(question) >= local] or [0]
    at = rng.choice(far)
    ids = head + filler[:at] + needle + filler[at:] + question
    targets = [not answer_only] * len(ids) + [True] * len(answer)
    return Sample(ids + answer, targets, -1, "passkey")


def kv_sample(tokenizer, rng: random.Random, seq_len: int, local: int, answer_only: bool, queries: int = 3) -> Sample:
    """Key-value lookup: lines `key: value`, then `queries` lookups of keys written before the
    last `local` tokens; the answers (the values) are the targets."""
    head = _encode(tokenizer, "A key-value store. Each line maps a key to its value.\n")
    lookup = _encode(tokenizer, "Lookup.\n")
    ids, targets, records = list(head), [not answer_only] * len(head), []
    while True:
        key = _encode(tokenizer, "".join(rng.choice(string.ascii_lowercase) for _ in range(5)) + ":")
        value = _encode(tokenizer, f" {_number(rng)}\n")
        # room for this line, the lookup header and the lookups this many lines allow, each as
        # long as this line (a short seq_len keeps fewer lines rather than none)
        line = len(key) + len(value) + 2
        if len(ids) + len(lookup) + (1 + min(queries, len(records) + 1)) * line > seq_len:
            break
        records.append((key, value, len(ids)))
        ids += key + value
        targets += [not answer_only] * (len(key) + len(value))
    if not records:
        raise ValueError(f"kv sample: seq_len {seq_len} leaves no room for a key-value line")
    far = [r for r in records if r[2] + len(r[0]) + len(r[1]) <= seq_len - local] or records[:1]
    ids, targets = ids + lookup, targets + [not answer_only] * len(lookup)
    for key, value, _ in rng.sample(far, min(queries, len(far))):
        if len(ids) + len(key) + len(value) > seq_len:
            break
        ids += key + value
        targets += [not answer_only] * len(key) + [True] * len(value)
    return Sample(ids, targets, -1, "kv")


def _number(rng: random.Random) -> str:
    """A number of 4 to 10 digits: answers of one fixed length teach the copy to stop there."""
    n = rng.randint(4, 10)
    return str(rng.randint(1, 9)) + "".join(rng.choice(string.digits) for _ in range(n - 1))


_WORDS: dict[int, list[str]] = {}


def _word(tokenizer, rng: random.Random) -> str:
    """A real word (a whole lowercase word of 4-10 letters in the tokenizer's vocabulary), or
    random letters for a toy tokenizer with few such words."""
    key = id(tokenizer)
    if key not in _WORDS:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        _WORDS[key] = sorted(w[1:] for w in vocab if w[:1] in ("\u0120", "\u2581") and w[1:].isascii()
                             and w[1:].isalpha() and w[1:].islower() and 4 <= len(w) - 1 <= 10)
    words = _WORDS[key]
    if len(words) < 100:
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(5, 8)))
    return rng.choice(words)


def _uuid(rng: random.Random) -> str:
    h = "".join(rng.choice("0123456789abcdef") for _ in range(32))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# kind: (statements, value maker(tokenizer, rng)); a statement's cue is its text up to " {value}",
# so the value's tokens begin right after the cue. Several phrasings per kind, so that what is
# learned is the copy of whatever follows the matching cue, not one sentence.
NEEDLE_KINDS = {
    "number": (("The locker combination of {name} is {value}.", "The number assigned to {name} is {value}.",
                "Note that the account number of {name} is {value}."), lambda tok, rng: _number(rng)),
    "code": (("The secret code of {name} is {value}.", "The access token of {name} is {value}."),
             lambda tok, rng: "".join(rng.choice("0123456789abcdef") for _ in range(rng.randint(6, 12)))),
    "uuid": (("The identifier of {name} is {value}.", "The record id of {name} is {value}."),
             lambda tok, rng: _uuid(rng)),
    "word": (("The favourite word of {name} is {value}.", "The password chosen by {name} is {value}."),
             lambda tok, rng: _word(tok, rng)),
}


def needles_sample(tokenizer, rng: random.Random, seq_len: int, local: int, answer_only: bool,
                   text: list[int], needles: int = 4, queries: int = 2) -> Sample:
    """Look-alike needles in real text: `needles` statements of one kind ("The locker combination
    of Abel is 48213.", one name each) planted at random depths of a real document's tokens `text`,
    all before the last `local` tokens; then `queries` of them asked as cues ("The locker
    combination of Abel is") whose values, copied exactly, are the targets. Only memory holds the
    values, and the other needles are look-alikes that differ in the name alone."""
    kind = rng.choice(sorted(NEEDLE_KINDS))
    statements, make = NEEDLE_KINDS[kind]
    statement = rng.choice(statements)
    cue = statement[:statement.index(" {value}")]
    names = rng.sample(NAMES, needles)
    facts = [(n, make(tokenizer, rng)) for n in names]
    asked = rng.sample(facts, min(queries, needles))
    tail = [(_encode(tokenizer, "\n" + cue.format(name=n)), _encode(tokenizer, f" {v}.")) for n, v in asked]
    planted = [_encode(tokenizer, " " + statement.format(name=n, value=v) + " ") for n, v in facts]
    return _plant_and_ask(rng, text, planted, tail, seq_len, local, answer_only, "needles")


def _plant_and_ask(rng: random.Random, text: list[int], planted: list[list[int]], tail: list[tuple],
                   seq_len: int, local: int, answer_only: bool, kind: str) -> Sample:
    """`planted` token runs at random depths of the real tokens `text`, all before the last `local`
    tokens, then the (question, answer) pairs of `tail`; the answers are the targets."""
    room = seq_len - sum(len(a) + len(b) for a, b in tail) - sum(len(x) for x in planted)
    if room < local:
        raise ValueError(f"a {kind} sample needs more than seq_len {seq_len} tokens; raise data.seq_len")
    body = list(text[:room])
    # depths in the part that lies beyond the local window of the questions
    far = max(1, len(body) - local + sum(len(a) + len(b) for a, b in tail))
    cuts = sorted(rng.randrange(far) for _ in planted)
    ids, prev = [], 0
    for at, x in zip(cuts, planted):
        ids += body[prev:at] + x
        prev = at
    ids += body[prev:]
    targets = [not answer_only] * len(ids)
    for q, a in tail:
        ids += q + a
        targets += [not answer_only] * len(q) + [True] * len(a)
    return Sample(ids, targets, -1, kind)


# facts: (statement, question) frames over a subject and one of its attributes; the answer restates
# the statement, so the model learns to copy the value after writing the sentence that leads to it
FACT_FRAMES = (
    ("The {attr} of {subject} is {value}.", "What is the {attr} of {subject}?"),
    ("{Subject}'s {attr} is {value}.", "What is {subject}'s {attr}?"),
    ("Everyone knows that the {attr} of {subject} is {value}.", "Do you know the {attr} of {subject}?"),
)
FACT_SUBJECTS = ("the {word} vault", "the old {word}", "the {word} museum", "the captain of the {word}",
                 "the {word} company", "the {word} project", "{name}", "{name}'s brother", "the {word} tower")
# attribute: value kind (a NEEDLE_KINDS key)
FACT_ATTRIBUTES = {"secret code": "code", "room number": "number", "password": "word", "serial number": "number",
                   "nickname": "word", "favourite colour": "word", "phone extension": "number",
                   "tracking id": "uuid", "home town": "word", "access code": "code", "budget": "number"}


def chat_turn(tokenizer, question: str, answer: str) -> tuple[str, str]:
    """(prompt, answer): the text `memformer.question_reads.chat_ids` tokenizes for a question (no
    system prompt of its own), and the assistant's answer up to the template's end of turn."""
    if not getattr(tokenizer, "chat_template", None):
        return question + "\n", answer
    user = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
    if not whole.startswith(prompt):                 # a template that rewrites earlier turns
        return prompt, answer
    return prompt, whole[len(prompt):].rstrip("\n")


def facts_sample(tokenizer, rng: random.Random, seq_len: int, local: int, answer_only: bool,
                 text: list[int], facts: int = 4, queries: int = 2) -> Sample:
    """Natural facts in real text, asked as `model.ask` asks: `facts` statements ("The room number of
    the copper vault is 4417.") planted at random depths of a real document's tokens `text`, all
    before the last `local` tokens; then `queries` of them asked, each either as a free-form question
    in the chat template (the answer restates the statement, whose value completes it) or as a cue
    (the statement up to its value). The answers are the targets; only memory holds the values."""
    attrs = rng.sample(sorted(FACT_ATTRIBUTES), facts)
    subjects = [rng.choice(FACT_SUBJECTS).format(word=_word(tokenizer, rng), name=rng.choice(NAMES))
                for _ in range(facts)]
    frame = rng.choice(FACT_FRAMES)
    planted, asks = [], []
    for attr, subject in zip(attrs, subjects):
        value = NEEDLE_KINDS[FACT_ATTRIBUTES[attr]][1](tokenizer, rng)
        fields = dict(attr=attr, subject=subject, Subject=subject[:1].upper() + subject[1:], value=value)
        statement = frame[0].format(**fields)
        planted.append(_encode(tokenizer, " " + statement + " "))
        lead = statement[:statement.rindex(value)]
        if rng.random() < 0.5:                       # a free-form question, answered in a sentence
            question = frame[1].format(**fields)
            prompt, answer = chat_turn(tokenizer, question[:1].upper() + question[1:], statement)
            q, a = _encode(tokenizer, "\n" + prompt), _encode(tokenizer, answer)
        else:                                        # a cue: the statement up to its value
            q, a = _encode(tokenizer, "\n\n" + lead.rstrip()), _encode(tokenizer, " " + value + ".")
        asks.append((q, a))
    tail = rng.sample(asks, min(queries, facts))
    return _plant_and_ask(rng, text, planted, tail, seq_len, local, answer_only, "facts")


class SampleStream:
    """Samples from documents of one split, forever (epoch after epoch), deterministic in `seed`.

    split "train": documents not held out, chunks mixed through a shuffle buffer of
    `shuffle_buffer` samples (the buffer carries over epochs); each sample drawn is synthetic with
    probability `synthetic_rate`.
    split "eval": held-out documents in a fixed order, at most `per_doc` chunks each, one pass.
    """

    def __init__(self, sources: list[dict], tokenizer, *, seq_len: int, min_tokens: int, eval_fraction: float,
                 split: str = "train", seed: int = 0, shuffle_buffer: int = 64, synthetic_rate: float = 0.0,
                 synthetic_tasks=SYNTHETIC_TASKS, synthetic_answer_only: bool = True, local: int = 0,
                 per_doc: int | None = None):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        for spec in sources:
            check_source(spec)
        self.sources, self.tokenizer, self.split = sources, tokenizer, split
        self.seq_len, self.min_tokens, self.eval_fraction = seq_len, min_tokens, eval_fraction
        self.seed, self.shuffle_buffer, self.per_doc = seed, shuffle_buffer, per_doc
        self.synthetic_rate, self.synthetic_tasks = synthetic_rate, list(synthetic_tasks)
        self.answer_only, self.local = synthetic_answer_only, local
        self.eos = getattr(tokenizer, "eos_token_id", None)

    def _chunks(self, rng: random.Random) -> Iterator[Sample]:
        """One pass over the split's documents, packed."""
        for doc in iter_sources(self.sources, rng):
            if held_out(doc.name, self.eval_fraction) != (self.split == "eval"):
                continue
            ids = _encode(self.tokenizer, doc.load()) + ([self.eos] if self.eos is not None else [])
            chunks = pack_document(ids, self.seq_len, self.min_tokens)
            for c in chunks[:self.per_doc] if self.per_doc else chunks:
                yield Sample(c, [True] * len(c), doc_id(doc.name), "text")

    def __iter__(self) -> Iterator[Sample]:
        rng = random.Random(self.seed)
        if self.split == "eval":
            yield from self._chunks(rng)
            return
        buffer: list[Sample] = []
        synthetic = 0
        epoch_empty = True
        while True:
            for s in self._chunks(rng):
                epoch_empty = False
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(s)
                    continue
                i = rng.randrange(len(buffer))
                out, buffer[i] = buffer[i], s
                while self.synthetic_rate > 0 and rng.random() < self.synthetic_rate:
                    synthetic += 1
                    yield self._synthetic(rng, synthetic, buffer)
                yield out
            if epoch_empty:
                raise ValueError("no training documents: every document is held out or shorter than "
                                 f"{self.min_tokens} tokens (lower data.min_doc_tokens or data.eval_fraction)")

    def _synthetic(self, rng: random.Random, n: int, buffer: list[Sample]) -> Sample:
        task = rng.choice(self.synthetic_tasks)
        if task in ("needles", "facts"):     # planted in the text of a document waiting in the buffer
            text = buffer[rng.randrange(len(buffer))].ids
            make = needles_sample if task == "needles" else facts_sample
            s = make(self.tokenizer, rng, self.seq_len, self.local, self.answer_only, text)
        else:
            make = passkey_sample if task == "passkey" else kv_sample
            s = make(self.tokenizer, rng, self.seq_len, self.local, self.answer_only)
        s.doc_id = -n                    # each synthetic sample its own document
        return s


class BatchStream:
    """Batches of `batch_size` samples from a SampleStream; `position` counts global batches.

    With several processes (DDP/FSDP) process r takes global batches r, r + world, ...; `skip(n)`
    replays the stream to a saved position (tokenising again, no model work)."""

    def __init__(self, stream: SampleStream, batch_size: int, pad_id: int, rank: int = 0, world: int = 1):
        self.stream, self.batch_size, self.pad_id = stream, batch_size, pad_id
        self.rank, self.world = rank, world
        self._it = iter(stream)
        self.position = 0

    def _take(self) -> list[Sample]:
        return [next(self._it) for _ in range(self.batch_size)]

    @property
    def next_global(self) -> int:
        """The first global batch that no process has taken yet (when all processes have taken
        the same number): where every process resumes. Process 0's own `position` lags behind
        the others' by up to world - 1 batches."""
        return -(-self.position // self.world) * self.world

    def skip(self, n: int) -> None:
        for _ in range(n):
            self._take()
            self.position += 1

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        while self.position % self.world != self.rank:
            self._take()
            self.position += 1
        samples = self._take()
        self.position += 1
        return collate(samples, self.stream.seq_len, self.pad_id)


def eval_batches(stream: SampleStream, batch_size: int, max_batches: int, pad_id: int) -> list[Batch]:
    """Up to `max_batches` full batches of held-out samples (a fixed set, the same at every
    evaluation); ValueError when there is not even one."""
    samples = []
    for s in stream:
        samples.append(s)
        if len(samples) == batch_size * max_batches:
            break
    n = len(samples) // batch_size
    if n == 0:
        raise ValueError(f"held-out split has {len(samples)} sample(s), fewer than one batch of {batch_size}; "
                         f"raise data.eval_fraction or lower eval.batch_size")
    return [collate(samples[i * batch_size:(i + 1) * batch_size], stream.seq_len, pad_id) for i in range(n)]
