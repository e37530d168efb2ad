"""Document readers (plain text, HTML, PDF) and their errors; the RAG passage index against an exact
ranking. PDFs are written in code (a minimal valid file, one text line per page)."""
import json
import zlib

import pytest
import torch

from memformer.qa.documents import DocumentError, html_to_text, read_document
from memformer.qa.rag import RAGBaseline, encode_texts


def make_pdf(pages: list[str]) -> bytes:
    """A minimal PDF with one Helvetica text line per page and a correct xref table."""
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", None]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET" if text else ""
        kids.append(f"{len(objs) + 1} 0 R")
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objs) + 2} 0 R "
                    f"/Resources << /Font << /F1 FONT 0 R >> >> >>")
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    objs[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    objs.append("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for n, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n{body.replace('FONT', str(len(objs)))}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def test_pdf_text_of_every_page(tmp_path):
    f = tmp_path / "report.pdf"
    f.write_bytes(make_pdf(["The secret code is 73914.", "", "The cat is called Marmalade."]))
    assert read_document(f) == "The secret code is 73914.\n\nThe cat is called Marmalade."
    g = tmp_path / "no_suffix"                              # recognised by its %PDF- header too
    g.write_bytes(f.read_bytes())
    assert "73914" in read_document(g)


def test_pdf_errors(tmp_path):
    whole = make_pdf(["Some text on the page."])
    cases = {"cut.pdf": (whole[:150], "not a readable PDF"),
             "scan.pdf": (make_pdf([""]), "no text layer"),
             "fake.pdf": (b"%PDF-1.4\nthis is not a pdf at all\n", "not a readable PDF")}
    for name, (data, msg) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DocumentError, match=msg):
            read_document(tmp_path / name)


def test_html_visible_text(tmp_path):
    page = ("<!doctype html><html><head><title>Hidden title</title><style>p {color: red}</style></head>"
            "<body><h1>Fish &amp; chips</h1><p>First    paragraph,\n spread over lines.</p>"
            "<script>var hidden = 1;</script><ul><li>one</li><li>two &lt;3</li></ul>"
            "<p>Line<br>break</p><pre>def f():\n    return 1</pre></body></html>")
    text = html_to_text(page)
    assert text == "Fish & chips\n\nFirst paragraph, spread over lines.\n\none\n\ntwo <3\n\nLine\nbreak\n\ndef f():\n    return 1"
    f = tmp_path / "page.html"
    f.write_text(page)
    assert read_document(f) == text
    latin = tmp_path / "latin.htm"                          # the declared charset is honoured
    latin.write_bytes('<meta charset="iso-8859-1"><p>Café crème</p>'.encode("latin-1"))
    assert read_document(latin) == "Café crème"
    bad = tmp_path / "bad.html"
    bad.write_bytes("<p>caf\xe9</p>".encode("latin-1"))     # no charset declared, not UTF-8
    with pytest.raises(DocumentError, match="not valid UTF-8"):
        read_document(bad)
    empty = tmp_path / "empty.html"
    empty.write_text("<html><head><script>x()</script></head><body>  </body></html>")
    with pytest.raises(DocumentError, match="no text"):
        read_document(empty)


def test_plain_text_errors(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"abc\x00\x01def")
    (tmp_path / "empty.md").write_text("  \n")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    for name, msg in [("bin.txt", "binary"), ("empty.md", "empty"), ("latin.txt", "not valid UTF-8"),
                      ("missing.txt", "no such file")]:
        with pytest.raises(DocumentError, match=msg):
            read_document(tmp_path / name)
    with pytest.raises(DocumentError, match="not a regular file"):
        read_document(tmp_path)


class RandomEmbedder:
    """Fixed random unit vectors per text (deterministic): a ranking with no ties to hide behind."""
    def encode(self, texts, convert_to_tensor=True, normalize_embeddings=True, **kw):
        out = torch.stack([torch.randn(32, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts])
        return torch.nn.functional.normalize(out, dim=1)


def test_rag_faiss_ranking_equals_exact_cosine_ranking():
    from test_qa import char_tokenizer
    from memformer.qa.documents import Corpus, Document
    corpus = Corpus.from_documents([Document("a", " ".join(f"sentence {i}." for i in range(120))),
                                    Document("b", " ".join(f"line {i}." for i in range(90)))], char_tokenizer())
    rag = RAGBaseline(corpus, RandomEmbedder(), chunk_tokens=40, overlap=8)
    query = "which passage?"
    got = rag.search(query)
    exact = rag.passages.embeddings @ encode_texts(rag.embedder, [query])[0]   # [C]
    assert len(got) == len(rag.chunks) == rag.passages.index.ntotal
    assert [(p.start, p.end) for p in got] == [rag.chunks[c] for c in exact.argsort(descending=True).tolist()]
    assert torch.allclose(torch.tensor([p.score for p in got]), exact.sort(descending=True).values, atol=1e-5)
    json.dumps([p.__dict__ for p in got])                                 # plain floats and ints
