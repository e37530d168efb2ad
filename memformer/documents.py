"""Documents and the token stream they are read as.

A `Corpus` is one or more documents tokenized into a single stream
`doc0 tokens, <eos>, doc1 tokens, <eos>, ...` — the stream `memorize` writes to memory — and it
keeps, for every stream token, which document it came from and its character span there. Memory
rows carry their stream position (`LayerMemory.positions`), so a retrieved row maps back to
`(document, start char, end char)`: that is what evidence spans and the RAG baseline print.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import torch

from memformer.loading import encode_text


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


TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".markdown"}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
PDF_SUFFIXES = {".pdf"}
DOC_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES


def read_document(path) -> str:
    """The text of a document file, with a clear `DocumentError` for anything unreadable.

    By suffix: .html/.htm/.xhtml -> the visible text (`html_to_text`); .pdf -> the text layer of
    every page (pypdf); anything else is read as UTF-8 plain text (Markdown, reST, ...)."""
    p = Path(path)
    if not p.exists():
        raise DocumentError(f"{p}: no such file")
    if not p.is_file():
        raise DocumentError(f"{p}: not a regular file")
    data = p.read_bytes()
    if not data.strip():
        raise DocumentError(f"{p}: the document is empty")
    suffix = p.suffix.lower()
    if suffix in PDF_SUFFIXES or data[:5] == b"%PDF-":
        text = _pdf_text(p)
    elif b"\x00" in data[:8192]:
        raise DocumentError(f"{p}: looks like a binary file, not text")
    elif suffix in HTML_SUFFIXES:
        text = html_to_text(_decode(p, data, _html_charset(data)))
    else:
        text = _decode(p, data)
    if not text.strip():
        raise DocumentError(f"{p}: the document has no text")
    return text


def _decode(p: Path, data: bytes, encoding: str = "utf-8") -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        label = "UTF-8" if encoding.replace("_", "-").lower() in ("utf-8", "utf8") else encoding
        raise DocumentError(f"{p}: not valid {label} text ({e.reason} at byte {e.start})") from None


def _html_charset(data: bytes) -> str:
    """The charset an HTML file declares in its first 2 KB (<meta charset=...>), else UTF-8."""
    import codecs
    m = re.search(rb"""<meta[^>]+charset=["']?([A-Za-z0-9_.:-]+)""", data[:2048], re.IGNORECASE)
    if m:
        try:
            return codecs.lookup(m.group(1).decode("ascii")).name
        except LookupError:
            pass
    return "utf-8"


class _TextOfHTML(HTMLParser):
    """Collects the text a browser shows: no script/style/head, a line break per block element."""
    SKIP = {"script", "style", "head", "title", "noscript", "template", "svg"}
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table",
             "section", "article", "header", "footer", "pre", "blockquote", "dt", "dd", "hr", "figcaption"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")
            self.pre += tag == "pre"

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")
            self.pre = max(0, self.pre - (tag == "pre"))

    def handle_data(self, data):
        if self.skipping:
            return
        if not self.pre:                   # outside <pre> any run of white space is one space
            data = re.sub(r"\s+", " ", data)
            if not self.parts or self.parts[-1].endswith("\n"):
                data = data.lstrip()
        self.parts.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML page: entities decoded, white space collapsed as a browser does
    (kept inside <pre>), one blank line between blocks."""
    parser = _TextOfHTML()
    parser.feed(html)
    parser.close()
    lines = [line.rstrip() for line in "".join(parser.parts).splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _pdf_text(p: Path) -> str:
    """The text layer of every page of a PDF, pages separated by a blank line (pypdf)."""
    try:
        from pypdf import PdfReader
        from pypdf.errors import PyPdfError
    except ImportError:
        raise DocumentError(f"{p}: reading PDF needs pypdf (pip install pypdf)") from None
    try:
        reader = PdfReader(p)
        if reader.is_encrypted:
            raise DocumentError(f"{p}: the PDF is encrypted")
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as e:
        raise DocumentError(f"{p}: not a readable PDF ({type(e).__name__}: {e})") from None
    if not any(t.strip() for t in pages):
        raise DocumentError(f"{p}: the PDF has no text layer (a scan? run OCR first)")
    return "\n\n".join(t.strip() for t in pages if t.strip())


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
        enc = encode_text(tokenizer, text, return_offsets_mapping=True)
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
            toks = encode_text(tokenizer, doc.text)["input_ids"]
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
