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


DEMO_FACTS = [
    PlantedFact(0.15, "The secret code of the blue vault is 73914.",
                "What is the secret code of the blue vault?", "73914"),
    PlantedFact(0.5, "The name of the lighthouse keeper's cat is Marmalade.",
                "What is the name of the lighthouse keeper's cat?", "Marmalade"),
    PlantedFact(0.85, "The meeting with the archivist is scheduled for Thursday at 4 pm in room 21.",
                "In which room is the meeting with the archivist?", "21"),
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


def answer_truncated(model, document: str, question: str, max_new_tokens: int = 48) -> str:
    """Baseline: the last window of the document + the question, no memory."""
    tok = model.tokenizer
    q_ids = model.chat_ids(question)
    room = model.memory_config.window - q_ids.shape[1] - 32
    doc_ids = tok(document, add_special_tokens=False)["input_ids"][-max(room, 0):]
    tail = tok.decode(doc_ids)
    ids = model.chat_ids(f"{tail}\n\n{question}")
    with model.memory_disabled():
        out = model.generate(ids[:, -model.memory_config.window:], max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, min(ids.shape[1], model.memory_config.window):], skip_special_tokens=True).strip()


def memorize_documents(model, texts: list[str], cache_dir: str | Path | None = None, show_progress=True) -> bool:
    """Fill memory with the documents (one stream); reuse a saved memory when the key matches.

    Returns True when the memory came from the cache."""
    model.reset_memory()
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / document_key(texts, model)
        if (path / "manifest.json").is_file():
            try:
                model.load_memory(path)
                return True
            except (ValueError, FileNotFoundError):
                model.reset_memory()
    ids: list[int] = []
    for t in texts:
        ids += model.tokenizer(t, add_special_tokens=False)["input_ids"] + [model.tokenizer.eos_token_id or 0]
    model.memorize(torch.tensor([ids]), show_progress=show_progress)
    if path is not None:
        model.save_memory(path)
    return False
