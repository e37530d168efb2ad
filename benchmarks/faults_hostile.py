"""Hostile and malformed input for the fault suite: documents (text, HTML, PDF), memory files
(manifest, corpus table, QA documents, safetensors headers and tensors), adapter files and the
CLI's arguments.

Every case runs in this process under a time limit and ends in one of:
  clear error  — a memformer error type (MemoryFileError, DocumentError, WriteError, ...), a
                 FileNotFoundError naming the file, or a CLI message with a non-zero exit;
  correct      — a result, checked (a loaded memory still answers and memorizes; a document's text);
  traceback    — any other exception (a fault);
  hang         — the time limit passed (a fault);
and nothing may change outside the case's own folder ("write outside").
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import struct
import time
import zlib
from pathlib import Path

import torch

import faults_fixtures as fx

TIME_LIMIT = 20


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang


def clear_errors():
    from memformer import MemoryCapacityError, MemoryFileError
    from memformer.qa.documents import DocumentError
    from memformer.training.config import ConfigError
    import memformer.fileio
    write = getattr(memformer.fileio, "WriteError", FileNotFoundError)    # older versions had none
    return (MemoryFileError, DocumentError, write, MemoryCapacityError, ConfigError, FileNotFoundError)


def snapshot(folder: Path, skip: Path) -> dict:
    """Files and folders under `folder` with their modification times, except inside `skip` (the
    case's own folder) and inside earlier cases' folders (only their names: walking them all for
    every case would make the suite quadratic)."""
    out = {}
    cases = folder / "cases"
    for root, dirs, files in os.walk(folder):
        r = Path(root)
        if r == cases:
            out.update({str(r / d): "dir" for d in dirs})
            dirs[:] = [d for d in dirs if (r / d) in skip.parents or (r / d) == skip]
        dirs[:] = [d for d in dirs if (r / d) != skip]
        for f in files:
            with contextlib.suppress(OSError):
                out[str(r / f)] = (r / f).lstat().st_mtime_ns
    return out


class Tally:
    """Counts per family; `run(family, name, fn)` classifies one case."""

    def __init__(self, sandbox: Path):
        self.sandbox = sandbox
        self.families: dict[str, dict] = {}
        self.faults: list[str] = []
        self.n = 0

    def case_dir(self) -> Path:
        self.n += 1
        d = self.sandbox / "cases" / str(self.n)
        d.mkdir(parents=True)
        return d

    def run(self, family: str, name: str, fn, case: Path | None = None) -> str:
        row = self.families.setdefault(family, {k: 0 for k in ("cases", "clear_error", "correct", "traceback",
                                                                "hang", "outside")})
        before = snapshot(self.sandbox, case) if case is not None else None
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(TIME_LIMIT)
        try:
            fn()
            kind = "correct"
        except Hang:
            kind = "hang"
        except clear_errors():
            kind = "clear_error"
        except SystemExit as e:                               # argparse: usage and exit 2
            kind = "clear_error" if e.code not in (0, None) else "correct"
        except Exception as e:                                # noqa: BLE001 - the fault being looked for
            kind = "traceback"
            self.faults.append(f"{family}: {name}: {type(e).__name__}: {str(e)[:200]}")
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        row["cases"] += 1
        row[kind] += 1
        if kind == "hang":
            self.faults.append(f"{family}: {name}: no answer within {TIME_LIMIT}s")
        if before is not None and snapshot(self.sandbox, case) != before:
            row["outside"] += 1
            self.faults.append(f"{family}: {name}: wrote outside its folder")
        return kind


# ---------------------------------------------------------------- documents
def minimal_pdf(text: str) -> bytes:
    """A one-page PDF with `text` in its text layer (Helvetica), with a correct xref table."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
            b"/Resources << /Font << /F1 5 0 R >> >> >>",
            b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


def _bomb_pdf(mb: int) -> bytes:
    """A PDF whose content stream inflates to `mb` MB (a decompression bomb)."""
    raw = zlib.compress(b"0 0 m " * (mb * (1 << 20) // 6), 9)
    base = minimal_pdf("x")
    head = b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(raw) + raw + b"\nendstream"
    i = base.index(b"4 0 obj\n") + len(b"4 0 obj\n")
    j = base.index(b"\nendobj", i)
    return base[:i] + head + base[j:]


def document_cases(rng: random.Random) -> list[tuple[str, str, bytes]]:
    """(family, file name, bytes)."""
    cases = []
    good = "The river stone lamp points north. " * 20
    for n in range(25):                                       # random bytes, with and without NULs
        size = rng.choice([1, 7, 100, 5000, 20000])
        data = bytes(rng.randrange(256) for _ in range(size))
        if n % 2:
            data = data.replace(b"\x00", b"\x01")
        cases.append(("documents: text", f"random{n}.txt", data))
    for n, data in enumerate([b"", b"   \n\t ", b"\xef\xbb\xbf", b"\xef\xbb\xbfhello", good.encode("utf-16"),
                              b"\xed\xa0\x80 surrogate", b"\xc3", b"ok \xff\xfe bad", b"a" * (1 << 20),
                              "\u202e\u0000x".encode(), b"x" * 8192 + b"\x00", "naïve café".encode("latin-1"),
                              b"\r\n" * 1000 + b"z", b"%PDF-" + good.encode()]):
        cases.append(("documents: text", f"edge{n}.md", data))
    html = f"<html><head><title>t</title><style>x{{}}</style></head><body><p>{good}</p><pre> a  b </pre></body></html>"
    for n, data in enumerate([b"<" * 5000, b"<div>" * 20000 + b"deep" + b"</div>" * 20000, b"<script>" + b"x" * 1000,
                              b"<!--" + good.encode(), b"<p>&#99999999; &#x110000; &bogus; &amp</p>",
                              b'<meta charset="utf-16"><p>' + good.encode() + b"</p>",
                              b'<meta charset="no-such-charset"><p>hi</p>', b'<meta charset="utf-7"><p>+AGEAYgBj-</p>',
                              b"<p>\xff\xfe not utf-8</p>", b"<![CDATA[" * 100, b"<svg><p>hidden</p></svg>",
                              b"<title>" + b"x" * 100000, b"</p></div></pre>" * 100 + b"text",
                              b"<p a='" + b"x" * 100000 + b"'>ok</p>", b"<head>" * 500 + b"<p>x</p>"]):
        cases.append(("documents: HTML", f"edge{n}.html", data))
    base = html.encode()
    for n in range(25):                                        # mutated pages
        b = bytearray(base)
        for _ in range(rng.randint(1, 20)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        cases.append(("documents: HTML", f"mut{n}.html", bytes(b[:rng.randint(1, len(b))] if n % 3 == 0 else b)))
    pdf = minimal_pdf("The river stone lamp points north")
    cases.append(("documents: PDF", "good.pdf", pdf))
    for n in range(20):                                        # truncated
        cases.append(("documents: PDF", f"trunc{n}.pdf", pdf[:rng.randint(1, len(pdf) - 1)]))
    for n in range(40):                                        # flipped bytes
        b = bytearray(pdf)
        for _ in range(rng.randint(1, 12)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        cases.append(("documents: PDF", f"flip{n}.pdf", bytes(b)))
    for n in range(15):                                        # chunks cut out or repeated
        i, j = sorted(rng.sample(range(len(pdf)), 2))
        cases.append(("documents: PDF", f"splice{n}.pdf", pdf[:i] + (pdf[i:j] * 2 if n % 2 else b"") + pdf[j:]))
    for n, data in enumerate([b"%PDF-1.4", b"%PDF-1.7\n" + bytes(rng.randrange(256) for _ in range(3000)),
                              b"%PDF-1.4\n1 0 obj\n" + b"[" * 50000 + b"\nendobj\n",
                              b"%PDF-1.4\n1 0 obj\n" + b"<<" * 20000 + b"\nendobj\ntrailer<</Root 1 0 R>>",
                              pdf.replace(b"/Count 1", b"/Count 99999999"),
                              pdf.replace(b"/Kids [3 0 R]", b"/Kids [2 0 R]"),            # a page tree loop
                              pdf.replace(b"/Parent 2 0 R", b"/Parent 3 0 R"),
                              pdf.replace(b"startxref\n", b"startxref\n99999999"),
                              pdf.replace(b"/Length ", b"/Length 9999999"),
                              pdf.replace(b"/Root 1 0 R", b"/Root 9 0 R"),
                              pdf.replace(b"<< /Type /Catalog", b"<< /Encrypt << /Filter /Standard /V 1 >> /Type /Catalog"),
                              _bomb_pdf(20)]):
        cases.append(("documents: PDF", f"edge{n}.pdf", data))
    return cases


def run_documents(t: Tally, rng: random.Random) -> None:
    from memformer.qa.documents import read_document
    for family, name, data in document_cases(rng):
        case = t.case_dir()
        f = case / name
        f.write_bytes(data)

        def read():
            text = read_document(f)
            assert isinstance(text, str) and text.strip()
        t.run(family, name, read, case)
    for name, make in (("a folder", lambda c: (c / "d.txt").mkdir()),
                       ("a FIFO", lambda c: os.mkfifo(c / "d.txt")),
                       ("a symlink loop", lambda c: os.symlink(c / "d.txt", c / "d.txt")),
                       ("a dangling symlink", lambda c: os.symlink(c / "nowhere", c / "d.txt")),
                       ("missing", lambda c: None)):
        case = t.case_dir()
        make(case)
        t.run("documents: text", name, lambda: read_document(case / "d.txt"), case)


# ---------------------------------------------------------------- memory files
def _sha(p: Path) -> str:
    from memformer.index.base import sha256_file
    return sha256_file(p)


def _fix_checksums(d: Path) -> None:
    """Make the manifest's checksums match the (mutated) files: a hostile file, not a torn one."""
    m = json.loads((d / "manifest.json").read_text())
    if not isinstance(m, dict):
        return
    if (d / "memory.safetensors").is_file():
        m["sha256"] = _sha(d / "memory.safetensors")
    if isinstance(m.get("extra_files"), dict):
        m["extra_files"] = {n: _sha(d / n) if isinstance(n, str) and "/" not in n and (d / n).is_file() else v
                            for n, v in m["extra_files"].items()}
    (d / "manifest.json").write_text(json.dumps(m))


BAD_VALUES = [None, "x", -1, 0, 1.5, True, [], {}, 10 ** 30, [-1], ["a"], [[1]]]


def _json_mutations(obj: dict, rng: random.Random, nested: tuple = ()) -> list[tuple[str, object]]:
    """(description, mutated object): each field deleted and set to each bad value."""
    out = []
    for key in list(obj):
        deleted = json.loads(json.dumps(obj))
        del deleted[key]
        out.append((f"no {key}", deleted))
        for v in BAD_VALUES:
            m = json.loads(json.dumps(obj))
            m[key] = v
            out.append((f"{key}={json.dumps(v)[:20]}", m))
    for key in nested:
        for sub in list(obj.get(key, {})):
            for v in BAD_VALUES[:8]:
                m = json.loads(json.dumps(obj))
                m[key][sub] = v
                out.append((f"{key}.{sub}={json.dumps(v)[:20]}", m))
    return out


def _text_mutations(text: str, rng: random.Random) -> list[tuple[str, bytes]]:
    out = [(f"cut at {i}", text.encode()[:i]) for i in sorted(rng.sample(range(len(text)), 8))]
    out += [("not JSON", b"not json"), ("a list", b"[1, 2]"), ("null", b"null"), ("latin-1", b"{\"a\": \"\xff\"}"),
            ("deeply nested", b"[" * 100000 + b"]" * 100000), ("huge number", b"{\"a\": 1e999999}"),
            ("empty", b""), ("NUL bytes", b"\x00" * 64)]
    return out


def _built_memories(base: Path):
    """A corpus memory (memory build) and a QA memory (LongDocQA.save) of the tiny model."""
    from memformer import corpus
    from memformer.qa.longdoc import LongDocQA
    fx.use_hashed_embedder()
    docs = fx.write_docs(base / "docs", 3, words=40)
    corpus.build_corpus(fx.tiny_model(), docs, base / "corpus", show_progress=False)
    qa = LongDocQA(fx.tiny_model()).read([fx.text(7, 60), fx.text(8, 60)], show_progress=False)
    qa.save(base / "qa")
    return base / "corpus", base / "qa"


class Probes:
    """The models the memory-file loaders run on, built once (a case costs a load, not a model).
    `own` holds a memory of its own, so a refused load can be checked to have kept it."""

    def __init__(self):
        self.own = fx.tiny_model()
        self.own.memorize(fx.text(99), show_progress=False)
        self.before = self.own.state.to_tensors()
        self.reader = fx.tiny_model()

    def restore(self) -> None:
        self.own.state.load_tensors(self.before, 1)
        self.reader.detach_corpus()
        self.reader.reset_memory()


def _loaders(folder: Path, probes: Probes):
    """Every reader of a memory folder; a loaded memory must then still work."""
    from memformer import corpus
    from memformer.cli.main import main
    from memformer.qa.longdoc import LongDocQA

    def load_memory():
        m = probes.own
        try:
            try:
                m.load_memory(folder)
            except BaseException:
                after = m.state.to_tensors()                      # the old memory is kept on any error
                assert after.keys() == probes.before.keys() and all(
                    torch.equal(after[k], probes.before[k]) for k in after), "a refused load changed the memory"
                raise
            _exercise(m)
        finally:
            probes.restore()

    def attach():
        try:
            probes.reader.attach_corpus(folder)
            x = torch.tensor([fx.ByteTokenizer()("lamp north")["input_ids"]])
            probes.reader.generate(x, max_new_tokens=2, do_sample=False)
        finally:
            probes.restore()

    def info():
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            rc = main(["memory", "info", str(folder)])
        if rc:
            assert err.getvalue().strip(), "a non-zero exit without a message"
            raise SystemExit(rc)
        corpus.corpus_info(folder)

    def qa_load():
        try:
            qa = LongDocQA.load(probes.reader, folder)
            qa.answer("where does the lamp point?", max_new_tokens=2)
        finally:
            probes.restore()
    return {"load_memory": load_memory, "attach_corpus": attach, "memory info": info, "LongDocQA.load": qa_load}


def _exercise(m) -> None:
    """A loaded memory must answer and accept more text without an error."""
    x = torch.tensor([fx.ByteTokenizer()("lamp north")["input_ids"]])
    m.generate(x, max_new_tokens=2, do_sample=False)
    m.memorize(fx.text(98), show_progress=False)


def _tensor_mutations(tensors: dict, rng: random.Random) -> list[tuple[str, dict]]:
    """Tensors of the right file format but the wrong content for a memory."""
    out = []
    for key in sorted(tensors):
        t = tensors[key]
        drop = dict(tensors)
        del drop[key]
        out.append((f"no {key}", drop))
        variants = [("float", t.float() if not t.is_floating_point() else t.long()), ("empty", t.reshape(-1)[:0]),
                    ("1 more row", torch.cat([t, t[..., :1]], -1) if t.dim() and t.shape[-1] else t.reshape(-1)[:0])]
        if not t.is_floating_point() and t.dtype != torch.bool and t.numel():
            variants += [("negative", -t - 1), ("huge", t + 10 ** 9)]
        for what, v in variants:
            m = dict(tensors)
            m[key] = v.contiguous()
            out.append((f"{key} {what}", m))
    return out


def _header_mutations(raw: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    """safetensors files with absurd header lengths, shapes, offsets and dtypes."""
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    names = [k for k in header if k != "__metadata__"]

    def pack(h, data=body):
        text = json.dumps(h).encode()
        return struct.pack("<Q", len(text)) + text + data
    out = [("header length 0", struct.pack("<Q", 0) + raw[8:]), ("header length 2^63", struct.pack("<Q", 1 << 63) + raw[8:]),
           ("header length > file", struct.pack("<Q", len(raw)) + raw[8:]), ("8 bytes only", raw[:8]),
           ("header not JSON", struct.pack("<Q", 5) + b"xxxxx" + body), ("header a list", pack([1, 2])),
           ("truncated body", raw[:len(raw) - 100]), ("no body", pack(header, b""))]
    for name in rng.sample(names, min(6, len(names))):
        entry = header[name]
        begin, end = entry["data_offsets"]
        for what, change in (("shape absurd", {"shape": [1 << 40, 1 << 40]}), ("shape negative", {"shape": [-1]}),
                             ("dtype unknown", {"dtype": "Q99"}), ("offsets reversed", {"data_offsets": [end, begin]}),
                             ("offsets past the end", {"data_offsets": [begin, len(body) + 10 ** 6]}),
                             ("offsets huge", {"data_offsets": [1 << 62, (1 << 62) + 8]}),
                             ("offsets overlap", {"data_offsets": [0, end - begin]}), ("no offsets", {"data_offsets": None}),
                             ("shape not a list", {"shape": "big"})):
            if change.get("data_offsets") == [begin, end]:
                continue                                       # no change (the first tensor already starts at 0)
            h = json.loads(json.dumps(header))
            h[name] = {**entry, **change}
            if change.get("data_offsets", 0) is None:
                del h[name]["data_offsets"]
            out.append((f"{name}: {what}", pack(h)))
    h = json.loads(json.dumps(header))
    h["__metadata__"] = {"x": [1]}
    out.append(("metadata not strings", pack(h)))
    return out


def run_memory_files(t: Tally, rng: random.Random) -> None:
    from safetensors.torch import load_file, save_file
    from memformer.corpus import CORPUS_FILE
    from memformer.qa.longdoc import QA_FILE
    base = t.sandbox / "built"
    corpus_dir, qa_dir = _built_memories(base)
    probes = Probes()

    def variants(src: Path, file: str, data_list, fix: bool):
        for desc, data in data_list:
            for fixed in ((False, True) if fix else (False,)):
                case = t.case_dir()
                d = case / "mem"
                shutil.copytree(src, d)
                (d / file).write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
                if fixed:
                    with contextlib.suppress(Exception):
                        _fix_checksums(d)
                for loader, fn in _loaders(d, probes).items():
                    if src == qa_dir and loader in ("attach_corpus", "memory info"):
                        continue
                    if src == corpus_dir and loader == "LongDocQA.load":
                        continue
                    t.run(f"memory files: {file}", f"{desc}{' (checksums fixed)' if fixed else ''} / {loader}", fn, case)

    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    muts = _json_mutations(manifest, rng, nested=("fingerprint",))
    muts += [(f"extra_files {n!r}", {**manifest, "extra_files": {n: "0" * 64}})
             for n in ("../outside.json", "/etc/passwd", "sub/x", "..", ".", "", "\x00")]
    muts += [(f"format {v!r}", {**manifest, "format_version": v}) for v in (1, 3, "2")]
    variants(corpus_dir, "manifest.json", muts, fix=False)
    variants(corpus_dir, "manifest.json", _text_mutations(json.dumps(manifest), rng), fix=False)
    table = json.loads((corpus_dir / CORPUS_FILE).read_text())
    doc = table["documents"][0]
    tmuts = [(f"documents[0]: {d}", {**table, "documents": [m] + table["documents"][1:]})
             for d, m in _json_mutations(doc, rng)]
    tmuts += _json_mutations(table, rng)
    tmuts += [("name leaving the folder", {**table, "documents": [{**doc, "name": "../../etc/passwd"}] + table["documents"][1:]})]
    variants(corpus_dir, CORPUS_FILE, tmuts, fix=True)
    variants(corpus_dir, CORPUS_FILE, _text_mutations(json.dumps(table), rng), fix=True)
    qa = json.loads((qa_dir / QA_FILE).read_text())
    qmuts = _json_mutations(qa, rng) + [(f"documents[0]: {d}", {**qa, "documents": [m] + qa["documents"][1:]})
                                        for d, m in _json_mutations(qa["documents"][0], rng)]
    variants(qa_dir, QA_FILE, qmuts, fix=True)
    raw = (corpus_dir / "memory.safetensors").read_bytes()
    variants(corpus_dir, "memory.safetensors", _header_mutations(raw, rng), fix=True)
    tensors = load_file(str(corpus_dir / "memory.safetensors"))
    tm = []
    for desc, m in _tensor_mutations(tensors, rng):
        buf = t.sandbox / "t.safetensors"
        save_file(m, str(buf))
        tm.append((desc, buf.read_bytes()))
    variants(corpus_dir, "memory.safetensors", tm, fix=True)
    for desc, data in [("flipped bytes", None)] * 5:                   # a torn / damaged file, checksums as saved
        b = bytearray(raw)
        for _ in range(8):
            b[rng.randrange(len(b))] ^= 0xFF
        variants(corpus_dir, "memory.safetensors", [(desc, bytes(b))], fix=False)


def run_adapters(t: Tally, rng: random.Random) -> None:
    from safetensors.torch import load_file, save_file
    from memformer import MemformerForCausalLM
    from memformer.config import AdapterConfig
    from memformer.persistence import read_adapter_config
    src = t.sandbox / "adapter"
    m = fx.tiny_model()
    m.add_lora(AdapterConfig(lora_rank=4))
    m.save_pretrained(src) if hasattr(m, "save_pretrained") else None
    if not (src / "adapter.safetensors").is_file():
        from memformer.persistence import save_adapter
        save_adapter(m, src)

    def load(d):
        def fn():
            cfg = read_adapter_config(d)
            MemformerForCausalLM.from_pretrained(fx.tiny_backbone(), cfg, adapter=d, tokenizer=fx.ByteTokenizer())
        return fn
    cases = []
    for file in ("memory_config.json", "adapter_config.json"):
        obj = json.loads((src / file).read_text())
        cases += [(file, d, json.dumps(v).encode()) for d, v in _json_mutations(obj, rng)]
        cases += [(file, d, v) for d, v in _text_mutations(json.dumps(obj), rng)]
    tensors = load_file(str(src / "adapter.safetensors"))
    for desc, mt in _tensor_mutations(tensors, rng)[:60]:
        buf = t.sandbox / "a.safetensors"
        save_file(mt, str(buf))
        cases.append(("adapter.safetensors", desc, buf.read_bytes()))
    raw = (src / "adapter.safetensors").read_bytes()
    cases += [("adapter.safetensors", d, v) for d, v in _header_mutations(raw, rng)]
    for file, desc, data in cases:
        case = t.case_dir()
        d = case / "adapter"
        shutil.copytree(src, d)
        (d / file).write_bytes(data)
        t.run(f"adapter files: {file}", desc, load(d), case)


# ---------------------------------------------------------------- CLI arguments
def run_cli(t: Tally, rng: random.Random) -> None:
    from memformer.cli.main import main
    fx.use_hashed_embedder()
    folder = fx.tiny_model_folder(t.sandbox / "tiny_model")
    docs = fx.write_docs(t.sandbox / "cli_docs", 2, words=30)
    doc = docs / "doc000.txt"
    bad_manifest = t.sandbox / "bad_mem"
    bad_manifest.mkdir()
    (bad_manifest / "manifest.json").write_text('{"format": "memformer-memory", "format_version": 2, "seen": "x"}')
    questions = t.sandbox / "q.jsonl"
    questions.write_text('{"question": 1}\nnot json\n')
    bad_yaml = t.sandbox / "bad.yaml"
    bad_yaml.write_text("train: [unclosed\n")
    m = ["--model", str(folder)]
    out = lambda: str(t.case_dir() / "out")                     # noqa: E731
    argvs = [
        [], ["--bogus"], ["memory"], ["memory", "build"], ["memory", "build", "--docs", str(docs)],
        ["memory", "build", *m, "--docs", str(docs), "--out", out(), "--save-every", "0"],
        ["memory", "build", *m, "--docs", str(docs), "--out", out(), "--save-every", "-3"],
        ["memory", "build", *m, "--docs", str(docs), "--out", out(), "--save-every", "x"],
        ["memory", "build", *m, "--docs", "/no/such/dir", "--out", out()],
        ["memory", "build", *m, "--docs", str(doc), "--out", out()],
        ["memory", "build", *m, "--docs", str(docs), "--out", str(doc)],
        ["memory", "build", *m, "--docs", str(docs), "--out", "/proc/version/x"],
        ["memory", "build", *m, "--docs", str(docs), "--out", out() + "/" + "x" * 300],
        ["memory", "build", *m, "--docs", str(docs), "--out", out(), "--window", "48"],
        ["memory", "info", "/no/such/mem"], ["memory", "info", str(doc)], ["memory", "info", str(bad_manifest)],
        ["memory", "info", str(docs)], ["memory", "info", ""],
        ["qa", *m, "--doc", "/no/such.txt", "-q", "x", "--no-cache"],
        ["qa", *m, "--doc", str(docs), "-q", "x", "--no-cache"],
        ["qa", *m, "--doc", str(doc), "--memory", str(bad_manifest), "-q", "x"],
        ["qa", *m, "--memory", str(bad_manifest), "-q", "x"], ["qa", *m, "--memory", "/no/such", "-q", "x"],
        ["qa", *m, "--corpus", str(bad_manifest), "-q", "x"], ["qa", *m, "--corpus", str(docs), "-q", "x"],
        ["qa", *m, "--doc", str(doc), "--questions", str(questions), "--no-cache"],
        ["qa", *m, "--doc", str(doc), "--questions", "/no/such.jsonl", "--no-cache"],
        ["qa", *m, "--doc", str(doc), "-q", "x", "--no-cache", "--window", "256", "--max-new-tokens", "2"],
        ["qa", *m, "--doc", str(doc), "-q", "x", "--cache-dir", str(doc), "--window", "256", "--max-new-tokens", "2"],
        ["qa", *m, "--doc", str(doc), "-q", "x", "--no-cache", "--save-memory", str(doc), "--window", "256",
         "--max-new-tokens", "2"],
        ["qa", *m, "--doc", str(doc), "-q", "x", "--no-cache", "--rag-chunk-tokens", "0", "--compare"],
        ["qa", *m, "--doc", str(doc), "-q", "x", "--no-cache", "--evidence", "-1", "--window", "256",
         "--max-new-tokens", "2"],
        ["qa", *m, "--doc", str(doc), "-q", "x", "--no-cache", "--max-new-tokens", "-5", "--window", "256"],
        ["qa", *m, "--demo", "--demo-tokens", "-1", "-q", "x"],
        ["qa", "--model", "/no/such/model", "--doc", str(doc), "-q", "x"], ["qa", "--model", str(doc), "--doc", str(doc)],
        ["qa", *m, "--adapter", "/no/such/adapter", "--doc", str(doc), "-q", "x"],
        ["qa", *m, "--adapter", str(bad_manifest), "--doc", str(doc), "-q", "x"],
        ["eval", "passkey", "--lengths", "abc"], ["eval", "passkey", *m, "--trials", "0"],
        ["eval", "passkey", *m, "--modes", "nope"], ["eval", "needle", *m, "--lengths", "-4k"],
        ["train", "--config", "/no/such.yaml"], ["train", "--config", str(bad_yaml)],
        ["train", "--config", str(fx.ROOT / "training/configs/smollm2_cpu.yaml"), "train.max_steps=abc", "--print-config"],
        ["train", "--config", str(fx.ROOT / "training/configs/smollm2_cpu.yaml"), "nokey", "--print-config"],
    ]
    for flag, values in (("--window", ["0", "-1", "x", "99999999999"]), ("--top-k", ["0", "-2", "1.5"]),
                         ("--memory-layers", ["5..2", "99", "a", ",", "1..", "-1"]), ("--knn-layers", ["7", "x..y"]),
                         ("--block-size", ["0", "-64"]), ("--question-blocks", ["-1"]), ("--sink-tokens", ["-1", "100000"]),
                         ("--index", ["bogus", "faiss-ivf"]), ("--memory-dtype", ["float8"]), ("--threads", ["-1", "0"]),
                         ("--storage-dir", [str(doc)])):
        for v in values:
            argvs.append(["memory", "build", *m, "--docs", str(docs), "--out", out(), flag, v])
    for argv in argvs:
        case = Path(argv[argv.index("--out") + 1]).parent if "--out" in argv else None

        def fn(argv=argv):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
                rc = main(argv)
            if rc:
                assert err.getvalue().strip(), "a non-zero exit without a message"
                raise SystemExit(rc)
        t.run("CLI arguments", " ".join(a if len(a) < 40 else "..." for a in argv), fn, case)


def run_all(sandbox: Path, seed: int = 0) -> dict:
    sandbox.mkdir(parents=True, exist_ok=True)
    t = Tally(sandbox)
    rng = random.Random(seed)
    torch.set_num_threads(1)
    for part in (run_documents, run_memory_files, run_adapters, run_cli):
        t0 = time.time()
        part(t, rng)
        print(f"  {part.__name__}: {t.n} cases so far, {time.time() - t0:.0f}s", flush=True)
    total = {k: sum(f[k] for f in t.families.values()) for k in ("cases", "clear_error", "correct", "traceback",
                                                                  "hang", "outside")}
    for f in t.faults[:60]:
        print("  FAULT", f)
    return {"families": t.families, "total": total, "faults": t.faults}
