"""Long-document QA: read documents into memory once, answer questions from memory.

Also the bundled demo document: Python's own documentation (`pydoc_data.topics`, present on
every Python install) with a few facts planted at chosen depths.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".markdown", ""}


class DocumentError(ValueError):
    """A document that is missing, empty, binary or not decodable as text."""


def read_document(path) -> str:
    """The text of a plain-text/Markdown file, with a clear error for anything else."""
    p = Path(path)
    if not p.exists():
        raise DocumentError(f"{p}: no such file")
    if not p.is_file():
        raise DocumentError(f"{p}: not a regular file")
    data = p.read_bytes()
    if not data.strip():
        raise DocumentError(f"{p}: the document is empty")
    if b"\x00" in data[:8192]:
        raise DocumentError(f"{p}: looks like a binary file, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{p}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise DocumentError(f"{p}: the document has no text")
    return text


@dataclass
class PlantedFact:
    depth: float          # where in the document, 0..1
    sentence: str         # what is planted
    question: str
    answer: str           # expected substring of a correct answer
    cue: str              # the same question as a sentence to complete (what the demo asks)


DEMO_FACTS = [
    PlantedFact(0.15, "The secret code of the blue vault is 73914.",
                "What is the secret code of the blue vault?", "73914", "The secret code of the blue vault is"),
    PlantedFact(0.5, "The name of the lighthouse keeper's cat is Marmalade.",
                "What is the name of the lighthouse keeper's cat?", "Marmalade",
                "The name of the lighthouse keeper's cat is"),
    PlantedFact(0.85, "The meeting with the archivist is scheduled for Thursday at 4 pm in room 21.",
                "In which room is the meeting with the archivist?", "21",
                "The meeting with the archivist is scheduled for Thursday at 4 pm in room"),
]


def python_docs_text() -> str:
    """Python's documentation topics (pydoc_data.topics) as one long real document."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def demo_document(tokenizer, max_tokens: int, facts=DEMO_FACTS) -> str:
    """The first `max_tokens` tokens of Python's docs with `facts` planted at their depths."""
    text = python_docs_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    # cut at token boundaries, planting each fact between paragraphs near its depth
    text = tokenizer.decode(ids)
    out, last = [], 0
    for f in sorted(facts, key=lambda f: f.depth):
        at = text.find("\n\n", int(f.depth * len(text)))
        at = len(text) if at < 0 else at
        out += [text[last:at], "\n\n" + f.sentence]
        last = at
    out.append(text[last:])
    return "".join(out)


def document_key(texts: list[str], model) -> str:
    """Cache key of a memory: the documents, the backbone fingerprint and the memory config."""
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    h.update(model.backbone_fingerprint.encode())
    h.update(model.memory_config.to_json().encode())
    return h.hexdigest()[:20]


def tail_room(model, reserve: int = 96) -> int:
    """Tokens of the document kept in the local window beside the question (the rest is memory)."""
    cfg = model.memory_config
    return max(16, cfg.window - cfg.sink_tokens - reserve)


def memorize_documents(model, texts: list[str], cache_dir: str | Path | None = None,
                       show_progress=True) -> tuple[list[int], bool]:
    """Memorize the documents (one stream) except their last `tail_room` tokens, which the
    question's local window will hold, as in the truncation baseline. Reuses a saved memory
    when the key matches. Returns (tail token ids, whether the memory came from the cache)."""
    tok = model.tokenizer
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id or 0]
    room = tail_room(model)
    prefix, tail = ids[:-room], ids[-room:]
    model.reset_memory()
    if not prefix:                                       # everything fits in the local window
        return tail, False
    path = None if cache_dir is None else Path(cache_dir) / document_key(texts, model)
    if path is not None and (path / "manifest.json").is_file():
        try:
            model.load_memory(path)
            return tail, True
        except (ValueError, FileNotFoundError):
            model.reset_memory()
    model.memorize(torch.tensor([prefix]), show_progress=show_progress)
    if path is not None:
        model.save_memory(path)
    return tail, False


def answer(model, tail: list[int], question: str | None = None, cue: str | None = None, *,
           use_memory: bool = True, max_new_tokens: int = 48) -> str:
    """Answer from [document tail ‖ question] in the local window, with or without memory.

    question: asked in the chat template (when the tokenizer has one); cue: a sentence for the
    model to complete instead (plain text after the tail), e.g. "The secret code is"."""
    tok = model.tokenizer
    if cue is not None:
        x = torch.tensor([tail + tok("\n\n" + cue, add_special_tokens=False)["input_ids"]])
    else:
        x = model.chat_ids(f"{tok.decode(tail)}\n\n{question}")
    local = model.memory_config.window - model.memory_config.sink_tokens
    x = x[:, -local:]                                    # never spill the prompt into memory
    if use_memory:
        out = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False)
    else:
        with model.memory_disabled():
            out = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, x.shape[1]:], skip_special_tokens=True).strip()
