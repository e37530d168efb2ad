"""Faults, the fast subset (the full suite: `python benchmarks/faults.py`, docs/reliability.md):
kill -9 during saves, a writer killed between its renames, concurrent writers and readers, a full
disk, a read-only folder, hostile files and arguments. Each test reproduces a fault that was found
and fixed, or checks a guarantee docs/reliability.md states."""
import json
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from memformer import MemformerForCausalLM, MemoryFileError, corpus
from memformer import fileio
from memformer.cli.main import main
from memformer.qa.longdoc import QA_FILE, LongDocQA
from tests.conftest import HashedWords, tiny_backbone

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import faults_fixtures as fx  # noqa: E402
import faults_hostile as hostile  # noqa: E402


def _model(**kw):
    return fx.tiny_model(**kw)


def _memorized(chunks: int):
    m = _model()
    for i in range(chunks):
        m.memorize(fx.text(i), show_progress=False)
    return m


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fork(fn, preexec=None):
    """Run `fn(write)` in a forked child (no new interpreter: fast); `write(line)` reports to the
    parent. Returns (pid, read end)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                                   # the child
        os.close(r)
        code = 0
        try:
            if preexec:
                preexec()
            fn(lambda line: os.write(w, (line + "\n").encode()))
        except BaseException as e:                                # noqa: BLE001
            os.write(w, f"error {type(e).__name__}: {e}\n".encode())
            code = 1
        os._exit(code)
    os.close(w)
    return pid, r


def _read_all(r) -> list[str]:
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    return b"".join(chunks).decode().splitlines()


# ---------------------------------------------------------------- kill -9
def test_sigkill_during_save_memory_keeps_the_last_save_and_resumes_to_the_same_memory(tmp_path):
    torch.set_num_threads(1)
    chunks = 5
    refs = [_memorized(k).state.to_tensors() for k in range(1, chunks + 1)]
    mem = tmp_path / "mem"
    rng = random.Random(0)

    def op(say):
        model = _model()
        done = 0
        if (mem / "manifest.json").is_file():
            model.load_memory(mem)
            done = len(model.state.doc_starts[0])
        for i in range(done, chunks):
            model.memorize(fx.text(i), show_progress=False)
            model.save_memory(mem)
            say(f"saved {i + 1}")
    t0 = time.monotonic()
    pid, r = _fork(op)
    os.waitpid(pid, 0)
    _read_all(r)
    span = time.monotonic() - t0
    kills = 0
    for _ in range(5):
        shutil.rmtree(mem, ignore_errors=True)
        pid, r = _fork(op)
        time.sleep(rng.uniform(0, span))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills += 1
        acked = max([int(x.split()[1]) for x in _read_all(r) if x.startswith("saved")], default=0)
        check = _model()
        if acked == 0 and not mem.exists():
            continue
        check.load_memory(mem)                                     # intact, whatever instant the kill hit
        k = len(check.state.doc_starts[0])
        assert k >= acked and _same(check.state.to_tensors(), refs[k - 1])
        pid, r = _fork(op)                                         # resume to the end
        os.waitpid(pid, 0)
        assert not [x for x in _read_all(r) if x.startswith("error")]
        final = _model()
        final.load_memory(mem)
        assert _same(final.state.to_tensors(), refs[-1])
    assert kills == 5


def test_a_writer_killed_between_its_two_renames_loses_nothing(tmp_path, monkeypatch):
    """Fault found: without an atomic exchange, replacing a folder is two renames; a kill between
    them left no memory at its path (the old one hidden in a sibling). Now the swap is one
    renameat2(RENAME_EXCHANGE) where available, and readers rename a stranded version back."""
    old, new = _memorized(1), _memorized(2)
    old.save_memory(tmp_path / "mem")
    stranded = tmp_path / ".mem.old-999999-1"
    os.rename(tmp_path / "mem", stranded)                          # the state a kill there leaves
    back = _model()
    back.load_memory(tmp_path / "mem")
    assert _same(back.state.to_tensors(), old.state.to_tensors()) and not stranded.exists()
    # the fallback path (no exchange) still replaces correctly
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    new.save_memory(tmp_path / "mem")
    got = _model()
    got.load_memory(tmp_path / "mem")
    assert _same(got.state.to_tensors(), new.state.to_tensors())
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name or ".tmp-" in p.name]


def test_leftovers_of_killed_writers_are_removed_but_a_live_writers_are_kept(tmp_path):
    """Fault found: a kill during a save left its `.NAME.tmp-*` folder forever."""
    dead = tmp_path / ".mem.tmp-1-1"
    dead.mkdir()
    (dead / "memory.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / ".mem.tmp-2-2"
    live.mkdir()
    fd = fileio._claim(live)                                      # a writer of this process, still writing
    try:
        _memorized(1).save_memory(tmp_path / "mem")
        assert not dead.exists() and live.exists()
    finally:
        os.close(fd)


# ---------------------------------------------------------------- concurrency
def test_concurrent_writers_and_readers_of_one_folder(tmp_path, monkeypatch):
    """Fault found: two writers of one folder crashed (the second rename found the path taken or
    gone), and a reader during a save found no folder, or the manifest of one version and the
    tensors of another. Writers now swap under the folder's lock; readers share it. Renames are
    slowed down and the two-rename fallback is forced, so the race windows are wide open."""
    real_rename = os.rename

    def slow_rename(a, b):
        real_rename(a, b)
        time.sleep(0.02)
    monkeypatch.setattr(os, "rename", slow_rename)
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False, raising=False)
    a, b = _memorized(1), _memorized(2)
    path = tmp_path / "mem"
    a.save_memory(path)
    states = [a.state.to_tensors(), b.state.to_tensors()]
    errors = []

    def write(model):
        try:
            for _ in range(6):
                model.save_memory(path)
        except Exception as e:                                     # noqa: BLE001
            errors.append(repr(e))

    readers = [_model() for _ in range(2)]          # built here: the seeded RNG is global, threads race on it

    def read(m):
        try:
            for _ in range(6):
                m.load_memory(path)
                assert any(_same(m.state.to_tensors(), s) for s in states)
        except Exception as e:                                     # noqa: BLE001
            errors.append(repr(e))
    threads = [threading.Thread(target=write, args=(m,)) for m in (a, b)] + [threading.Thread(target=read, args=(m,))
                                                                            for m in readers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name or ".tmp-" in p.name]


# ---------------------------------------------------------------- resources
def _fsize_limit(limit):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def test_disk_full_is_a_clear_error_and_keeps_the_previous_memory(tmp_path):
    old = _memorized(1)
    old.save_memory(tmp_path / "mem")
    before = sorted(os.listdir(tmp_path))
    pid, r = _fork(lambda say: _memorized(3).save_memory(tmp_path / "mem"), preexec=_fsize_limit(64 << 10))
    os.waitpid(pid, 0)
    out = _read_all(r)
    assert out and out[0].startswith("error WriteError") and str(tmp_path / "mem") in out[0], out
    assert "File too large" in out[0]
    assert sorted(os.listdir(tmp_path)) == before                 # nothing half-written beside it
    back = _model()
    back.load_memory(tmp_path / "mem")
    assert _same(back.state.to_tensors(), old.state.to_tensors())


def test_read_only_folder_is_a_clear_error_naming_it(tmp_path):
    base = Path(tempfile.mkdtemp(dir=tmp_path if os.geteuid() else "/tmp"))   # the child may drop to nobody
    base.chmod(0o755)
    folder = base / "ro"
    folder.mkdir()
    m = _memorized(1)
    m.save_memory(folder / "mem")
    folder.chmod(0o555)

    def save(say):
        if os.geteuid() == 0:                                      # root ignores permissions
            os.setgid(65534)
            os.setuid(65534)
        try:
            _model().load_memory(folder / "mem")                   # reading a read-only memory works
            say("loaded")
        except Exception as e:                                     # noqa: BLE001
            say(f"load failed {e!r}")
        _memorized(2).save_memory(folder / "mem")
    try:
        pid, r = _fork(save)
        os.waitpid(pid, 0)
        out = _read_all(r)
    finally:
        folder.chmod(0o755)
    back = _model()
    back.load_memory(folder / "mem")
    assert _same(back.state.to_tensors(), m.state.to_tensors())
    shutil.rmtree(base)
    assert out[0] == "loaded", out
    assert out[1].startswith("error WriteError") and str(folder / "mem") in out[1], out


def test_qa_cache_that_cannot_be_written_warns_and_answers(tmp_path):
    """Fault found: the QA cache was written as two files (memory, then qa_documents.json) and a
    cache that could not be written stopped the whole QA. Now one atomic write, and a warning."""
    emb = HashedWords()
    model = _model()
    model.questions.use_embedder(emb)
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="memory not cached"):
        qa = LongDocQA(model).read([fx.text(1, 80)], cache_dir=blocker, show_progress=False)
    assert qa.memorized and qa.answer("lamp?", max_new_tokens=2).text is not None
    qa = LongDocQA(model).read([fx.text(1, 80)], cache_dir=tmp_path / "ok", show_progress=False)
    entry = next(p for p in (tmp_path / "ok").iterdir() if not p.name.startswith("."))
    manifest = json.loads((entry / "manifest.json").read_text())
    assert QA_FILE in manifest["extra_files"]                      # in the memory's own atomic write


# ---------------------------------------------------------------- training
def test_resume_skips_incomplete_checkpoints_and_torn_metric_rows(tmp_path):
    """Faults found: a checkpoint folder left half-deleted (or half-replaced) was taken for a
    checkpoint by resume; a metrics row cut by a kill crashed the resumed run's plot."""
    from memformer.training.metrics import MetricsLogger, read_metrics
    from memformer.training.recipe import CrossbatchRecipe
    r = CrossbatchRecipe.__new__(CrossbatchRecipe)
    r.out = tmp_path
    r.cfg = type("C", (), {"checkpoint": type("K", (), {"resume": "auto"})()})()
    good, torn = tmp_path / "checkpoints" / "step_0000002", tmp_path / "checkpoints" / "step_0000004"
    for p in (good, torn):
        (p / "adapter").mkdir(parents=True)
        (p / "trainer_state.json").write_text("{}")
    (good / "training_state.pt").write_bytes(b"x")
    (good / "adapter" / "adapter.safetensors").write_bytes(b"x")
    assert r._resume_path() == good
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log(1, {"loss": 1.0}, "train")
    log.log(2, {"loss": 0.5}, "train")
    with open(log.path, "a") as f:
        f.write("3,train/lo")                                      # killed mid-row
    log.truncate_after(2)
    assert read_metrics(log.path)["train/loss"] == [(1, 1.0), (2, 0.5)]


# ---------------------------------------------------------------- hostile input
def _corpus(tmp_path):
    docs = fx.write_docs(tmp_path / "docs", 2, words=30)
    corpus.build_corpus(_model(), docs, tmp_path / "mem", show_progress=False)
    return tmp_path / "mem"


def _rewrite(mem: Path, file: str, data: bytes, fix: bool = True):
    (mem / file).write_bytes(data)
    if fix:
        hostile._fix_checksums(mem)


@pytest.mark.parametrize("change", [
    {"seen": "x"}, {"batch": [1]}, {"fingerprint": []}, {"extra_files": ["corpus.json"]},
    {"extra_files": {"../outside.json": "0" * 64}}, {"tokens": None}, {"fingerprint": {"window": 48}}])
def test_manifest_with_wrong_types_or_names_leaving_the_folder_is_a_memory_file_error(tmp_path, change):
    """Fault found: manifest fields were used unchecked (AttributeError / TypeError tracebacks,
    a checksum read of a file outside the folder)."""
    mem = _corpus(tmp_path)
    manifest = json.loads((mem / "manifest.json").read_text())
    _rewrite(mem, "manifest.json", json.dumps({**manifest, **change}).encode(), fix=False)
    model = _memorized(1)
    before = model.state.to_tensors()
    with pytest.raises(MemoryFileError, match="manifest.json"):
        model.load_memory(mem)
    with pytest.raises(MemoryFileError):
        corpus.corpus_info(mem)
    assert _same(model.state.to_tensors(), before)


@pytest.mark.parametrize("data", [b"[" * 100000 + b"]" * 100000, b"\xff\xfe", b"{\"format\": 1e999999}"])
def test_json_that_breaks_the_parser_is_a_memory_file_error(tmp_path, data):
    """Fault found: deeply nested JSON raised RecursionError out of read_json."""
    mem = _corpus(tmp_path)
    _rewrite(mem, "manifest.json", data, fix=False)
    with pytest.raises(MemoryFileError):
        _model().load_memory(mem)


@pytest.mark.parametrize("row", [{"start": "0"}, {"end": -5}, {"text": None}, {"extra": 1}, {"start": True}])
def test_corpus_table_with_wrong_types_is_refused(tmp_path, row):
    mem = _corpus(tmp_path)
    table = json.loads((mem / corpus.CORPUS_FILE).read_text())
    table["documents"][0].update(row)
    _rewrite(mem, corpus.CORPUS_FILE, json.dumps(table).encode())
    with pytest.raises(MemoryFileError, match="corpus.json"):
        _model().attach_corpus(mem)


def test_safetensors_headers_with_absurd_shapes_and_offsets_are_refused(tmp_path):
    mem = _corpus(tmp_path)
    raw = (mem / "memory.safetensors").read_bytes()
    cases = hostile._header_mutations(raw, random.Random(0))
    for desc, data in cases:
        _rewrite(mem, "memory.safetensors", data)
        with pytest.raises(MemoryFileError):
            _model().load_memory(mem)
    assert len(cases) > 40


def test_cli_bad_arguments_and_unwritable_targets_are_messages(tmp_path, capsys):
    """Faults found: --save-every 0 divided by zero; an --out that could not be written ended in
    a traceback."""
    folder = fx.tiny_model_folder(tmp_path / "model")
    docs = fx.write_docs(tmp_path / "docs", 2, words=20)
    base = ["memory", "build", "--model", str(folder), "--docs", str(docs), "--window", "256"]
    assert main(base + ["--out", str(tmp_path / "m"), "--save-every", "0"]) == 2
    assert "save_every" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(base + ["--out", str(tmp_path / "file" / "m")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "file" / "m") in err and "Traceback" not in err
    assert main(["memory", "info", str(tmp_path / "nothing")]) == 2
    assert str(tmp_path / "nothing") in capsys.readouterr().err


@pytest.mark.parametrize("name, bad", [("sink_ids", lambda t: t.float()), ("sink_ids", lambda t: t + 10 ** 6),
                                       ("tail_ids", lambda t: -t - 1), ("tail_ids", lambda t: t.reshape(-1)[:0]),
                                       ("stream", lambda t: t[:, :3]), ("seen", lambda t: t + 1),
                                       ("doc_starts", lambda t: t + 10 ** 6)])
def test_token_ids_and_offsets_outside_the_backbone_are_refused(tmp_path, name, bad):
    """Fault found: a memory whose sink / overlap ids or stream were not token ids of the backbone
    loaded, and the next generate ended in an IndexError / RuntimeError."""
    from safetensors.torch import load_file, save_file
    mem = _corpus(tmp_path)
    tensors = load_file(str(mem / "memory.safetensors"))
    tensors[name] = bad(tensors[name]).contiguous()
    save_file(tensors, str(mem / "memory.safetensors"))
    hostile._fix_checksums(mem)
    with pytest.raises(MemoryFileError, match=name):
        _model().load_memory(mem)
    with pytest.raises(MemoryFileError, match=name):
        _model().attach_corpus(mem)


@pytest.mark.parametrize("file, field, value", [("adapter_config.json", "gate_init", "x"),
                                                ("adapter_config.json", "lora_alpha", None),
                                                ("adapter_config.json", "lora_rank", 1.5),
                                                ("memory_config.json", "window", 10 ** 19),
                                                ("memory_config.json", "knn_layers", [-1]),
                                                ("memory_config.json", "top_k", True)])
def test_adapter_configs_with_wrong_types_are_refused(tmp_path, file, field, value):
    """Fault found: AdapterConfig / MemoryConfig took any JSON type; loading the adapter then
    failed deep in torch (TypeError, OverflowError)."""
    from memformer.config import AdapterConfig
    from memformer.persistence import read_adapter_config
    m = _model()
    m.add_lora(AdapterConfig(lora_rank=4))
    m.save_pretrained(tmp_path / "a")
    data = json.loads((tmp_path / "a" / file).read_text())
    (tmp_path / "a" / file).write_text(json.dumps({**data, field: value}))
    with pytest.raises(MemoryFileError, match=file):
        cfg = read_adapter_config(tmp_path / "a")
        MemformerForCausalLM.from_pretrained(tiny_backbone(vocab_size=fx.VOCAB), cfg, adapter=tmp_path / "a",
                                             tokenizer=fx.ByteTokenizer())


@pytest.mark.parametrize("flag, value", [("--threads", "-1"), ("--window", "99999999999"), ("--overlap", "-1"),
                                         ("--overlap", "5000")])
def test_cli_numbers_out_of_range_are_messages(tmp_path, capsys, flag, value):
    """Faults found: --threads -1 raised from torch; --window 99999999999 ran out of memory."""
    folder = fx.tiny_model_folder(tmp_path / "model")
    docs = fx.write_docs(tmp_path / "docs", 1, words=20)
    argv = ["memory", "build", "--model", str(folder), "--docs", str(docs), "--out", str(tmp_path / "m"), flag, value]
    try:
        code = main(argv)
    except SystemExit as e:                      # the model loader exits 2 after its message
        code = e.code
    assert code == 2 and flag.strip("-").replace("-", "_") in capsys.readouterr().err.replace("-", "_")
