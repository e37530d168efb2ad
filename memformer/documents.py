"""Documents and the token stream they are read as.

A `Corpus` is one or more documents tokenized into a single stream
`doc0 tokens, <eos>, doc1 tokens, <eos>, ...` — the stream `memorize` writes to memory — and it
keeps, for every stream token, which document it came from and its character span there. Memory
rows carry their stream position (`LayerMemory.positions`), so a retrieved row maps back to
`(document, start char, end char)`: that is what evidence spans and the RAG baseline print.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch


class DocumentError(ValueError):
    """A document that is missing, empty, binary or not decodable as text."""


@dataclass(frozen=True)
class Document:
    """One named text. `name` is what evidence spans print (a file path, a title)."""
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


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


def as_documents(items) -> list[Document]:
    """Documents from a mix of `Document`s, files (`pathlib.Path`, read with `read_document`) and
    texts (`str`, named "text 1", "text 2", ... by their place in the list)."""
    if isinstance(items, (str, Path, Document)):
        items = [items]
    docs = []
    for n, item in enumerate(items, 1):
        if isinstance(item, Document):
            doc = item
        elif isinstance(item, Path):
            doc = Document(str(item), read_document(item))
        elif isinstance(item, str):
            doc = Document(f"text {n}", item)
        else:
            raise TypeError(f"document {n}: expected a path, a text or a Document, got {type(item).__name__}")
        if not doc.text.strip():
            raise DocumentError(f"{doc.name}: the document is empty")
        docs.append(doc)
    if not docs:
        raise DocumentError("no documents given")
    return docs


def _char_spans(tokenizer, text: str, ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) character span of each token of `text`.

    Fast tokenizers report offsets; for others each decoded token is searched for from where the
    previous one ended (a token that cannot be found gets an empty span there)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == list(ids):
            return [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        pass
    spans, at = [], 0
    for i in ids:
        piece = tokenizer.decode([i]).strip()
        found = text.find(piece, at) if piece else -1
        if found < 0:
            spans.append((at, at))
        else:
            spans.append((found, found + len(piece)))
            at = found + len(piece)
    return spans


@dataclass
class Corpus:
    """Documents as one token stream, each stream token mapped back to its document.

    ids: [N] token ids of the stream (each document followed by one separator token).
    doc_index: [N] long, the document of each token; -1 for separators.
    char_spans: [N, 2] long, [start, end) character offsets inside that document.
    starts: first stream position of each document (len = number of documents).
    """
    documents: list[Document]
    ids: list[int]
    doc_index: torch.Tensor
    char_spans: torch.Tensor
    starts: list[int]

    @classmethod
    def from_documents(cls, documents, tokenizer) -> "Corpus":
        """Tokenize documents (see `as_documents`) into one stream separated by the EOS token."""
        docs = as_documents(documents)
        sep = tokenizer.eos_token_id if getattr(tokenizer, "eos_token_id", None) is not None else 0
        ids, owner, spans, starts = [], [], [], []
        for d, doc in enumerate(docs):
            toks = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
            if not toks:
                raise DocumentError(f"{doc.name}: the tokenizer produced no tokens")
            starts.append(len(ids))
            ids += list(toks) + [sep]
            owner += [d] * len(toks) + [-1]
            end = len(doc.text)
            spans += _char_spans(tokenizer, doc.text, list(toks)) + [(end, end)]
        return cls(docs, ids, torch.tensor(owner, dtype=torch.long),
                   torch.tensor(spans, dtype=torch.long).view(-1, 2), starts)

    def __len__(self) -> int:
        return len(self.ids)

    def key(self) -> str:
        """Hash of the documents (names and texts), in order."""
        h = hashlib.sha256()
        for doc in self.documents:
            h.update(hashlib.sha256(doc.name.encode()).digest() + bytes.fromhex(doc.sha256))
        return h.hexdigest()

    def locate(self, t0: int, t1: int) -> tuple[int, int, int]:
        """Stream tokens [t0, t1) -> (document index, start char, end char).

        The range must lie in one document (separators at its ends are ignored)."""
        if not 0 <= t0 < t1 <= len(self):
            raise ValueError(f"token range [{t0}, {t1}) outside the corpus of {len(self)} tokens")
        owner = self.doc_index[t0:t1]
        docs = owner[owner >= 0].unique()
        if len(docs) != 1:
            raise ValueError(f"token range [{t0}, {t1}) spans {len(docs)} documents, not one")
        d = int(docs[0])
        inside = (owner == d).nonzero().flatten() + t0                   # positions of d's tokens
        return d, int(self.char_spans[inside[0], 0]), int(self.char_spans[inside[-1], 1])

    def document_range(self, d: int) -> tuple[int, int]:
        """Stream positions [start, end) of document d's tokens (its separator excluded)."""
        end = self.starts[d + 1] - 1 if d + 1 < len(self.starts) else len(self) - 1
        return self.starts[d], end
