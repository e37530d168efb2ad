"""Lance corpus stores (memformer.corpus_store) and their build (memformer.corpus_build): the same
rows and answers as a memory directory, appends, refusals, a killed write, attach RSS, the CLI,
conversion, and a 2-worker Ray build with a worker killed mid-build."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("lance", reason="the scale extra (pip install 'memformer[scale]') is not installed")
pytest.importorskip("lancedb", reason="the scale extra (pip install 'memformer[scale]') is not installed")

from memformer import MemoryFileError, corpus, corpus_build, corpus_store  # noqa: E402
from memformer.cli.main import main  # noqa: E402
from memformer.fileio import BusyError, WriteError, hold_dir_lock, release_dir_lock  # noqa: E402
from tests.test_corpus import _docs, _model  # noqa: E402

CUE = "The zebraquartz lives in the"


def _zebra_docs(tmp_path, n=5):
    docs = _docs(tmp_path, n)
    (docs / "zebra.txt").write_text("The zebraquartz lives in the blue cellar. " + "lorem ipsum dolor " * 6)
    return docs


def _tables(uri) -> dict:
    """Every committed row of a store's tables, as pyarrow Tables (at the manifest's versions)."""
    store = corpus_store.CorpusStore(uri)
    return {name: ds.to_table() for name, ds in store.datasets.items()}


def _same_rows(a, b) -> None:
    ta, tb = _tables(a), _tables(b)
    for name in corpus_store.TABLES:
        assert ta[name].equals(tb[name]), name


def test_store_holds_the_directory_rows_and_answers_the_same(tmp_path, monkeypatch):
    """A store built document by document holds exactly the rows of the memory directory built by
    `build_corpus`; asking over either gives the same blocks, answer and evidence, with FAISS or
    LanceDB ranking the passages; the blocks read are fetched, the rest never loaded."""
    docs = _zebra_docs(tmp_path)
    corpus.build_corpus(_model(), docs, tmp_path / "dir", show_progress=False)
    corpus_build.build_store(_model(), docs, tmp_path / "store", shard_tokens=300, show_progress=False)
    ram, lazy = _model(knn_layers=[1]), _model(knn_layers=[1])
    table = ram.attach_corpus(tmp_path / "dir")
    lazy.attach_corpus(tmp_path / "store")
    assert lazy.state.corpus_attached and all(m.corpus is None for m in lazy.memory_modules.values())
    store = lazy.state.corpus_store
    every = store.fetch_blocks(range(store.blocks))
    for i, mem in every.items():
        want = ram.memory_modules[i].corpus
        for name in ("positions", "slots", "keys", "values", "valid"):
            assert torch.equal(getattr(mem, name), getattr(want, name)), (i, name)
    assert [(d.name, d.start, d.end) for d in lazy.state.corpus_documents] == [(d.name, d.start, d.end) for d in table]

    blocks = ram.questions.blocks_for(CUE, source="corpus")
    assert lazy.questions.blocks_for(CUE, source="corpus") == blocks
    fetched = []
    real_fetch = store.fetch_blocks
    monkeypatch.setattr(store, "fetch_blocks", lambda b, device="cpu": fetched.append(list(b)) or real_fetch(b, device))
    # every read near the best answers (the tiny random model's scores hardly stand out of the field)
    import memformer.model as model_module
    from memformer.question_reads import answer_reads
    monkeypatch.setattr(model_module, "answer_reads", lambda scored, limit: answer_reads(scored, limit, lift=float("-inf")))
    out = lazy.ask(cue=CUE, max_new_tokens=4, record=True, return_dict=True)
    assert out == ram.ask(cue=CUE, max_new_tokens=4, record=True, return_dict=True)
    # the candidates are fetched together to be checked (`checked_reads`, one batched read),
    # the embedder's first among them, then each read answered from again: never the whole store
    candidates, _ = lazy.questions.candidates(CUE)
    # (a read entered again right after itself, for the next generation of its answer, fetches again)
    fetched = [f for i, f in enumerate(fetched) if i == 0 or f != fetched[i - 1]]
    assert candidates[0][0] == blocks and len(fetched) == 1 + out.reads
    assert fetched[0] == sorted(b for c, _ in candidates for b in c)
    assert all(f in [c for c, _ in candidates] for f in fetched[1:])
    assert all(m.corpus is None for m in lazy.memory_modules.values())
    # the evidence covers every read (each recording mapped to the rows fetched for it)
    assert out.reads > 1 and lazy.corpus_evidence(top=2) == ram.corpus_evidence(top=2)
    for m in (lazy, ram):
        m.memory_config.answer_reads = 1                  # the best read alone draws on the zebra
    assert lazy.ask(cue=CUE, max_new_tokens=4, record=True) == ram.ask(cue=CUE, max_new_tokens=4, record=True)
    assert lazy.corpus_evidence(top=1) == ram.corpus_evidence(top=1)
    assert lazy.corpus_evidence(top=1)[0]["doc"] == "zebra.txt"
    ram.memory_config.answer_reads = lazy.memory_config.answer_reads = out.reads

    # past FAISS_MAX_PASSAGES LanceDB ranks the passages: the same best ones, the same answer
    monkeypatch.setattr(corpus_store, "FAISS_MAX_PASSAGES", 0)
    by_lance = _model(knn_layers=[1])
    by_lance.attach_corpus(tmp_path / "store")
    assert isinstance(by_lance.state.corpus_passages, corpus_store.StorePassages)
    assert by_lance.questions.blocks_for(CUE, source="corpus") == blocks
    assert by_lance.ask(cue=CUE, max_new_tokens=4) == ram.ask(cue=CUE, max_new_tokens=4)
    with pytest.raises(ValueError, match="block ids must be in"):
        with by_lance.reading_blocks([store.blocks], source="corpus"):
            pass


def test_past_index_min_passages_lancedb_ranks_with_its_ivf_pq_index(tmp_path, monkeypatch):
    """A build with INDEX_MIN_PASSAGES passages ends by training LanceDB's IVF-PQ index; the
    question's passage is still found first and its block read."""
    docs = _zebra_docs(tmp_path, n=2)
    for i in range(12):
        words = " ".join(f"w{i}x{j}" for j in range(400))                # distinct words per document
        (docs / f"many{i:02d}.txt").write_text(f"Many {i}. {words}")
    monkeypatch.setattr(corpus_store, "INDEX_MIN_PASSAGES", 256)
    monkeypatch.setattr(corpus_store, "FAISS_MAX_PASSAGES", 0)
    manifest = corpus_build.build_store(_model(window=256), docs, tmp_path / "store", show_progress=False)
    assert manifest["passages"] >= 256 and manifest["passage_index_rows"] == manifest["passages"]
    reader = _model(window=256)
    table = reader.attach_corpus(tmp_path / "store")
    passages = reader.state.corpus_passages
    assert passages.indexed and list(passages.table.list_indices())
    best = passages.search(CUE)[0]
    zebra = next(d for d in table if d.name == "zebra.txt")
    assert zebra.start <= best.start < zebra.end
    assert zebra.start // reader.memory_config.block_size in reader.questions.blocks_for(CUE, source="corpus")


def test_adding_documents_appends_and_a_changed_one_is_refused(tmp_path):
    """A second build of a folder with more documents appends them (the first write's fragments
    stay as they were) and ends with the rows of one build of all of them."""
    docs = _zebra_docs(tmp_path, n=2)
    corpus_build.build_store(_model(), docs, tmp_path / "grown", show_progress=False)
    before = {f.metadata.files[0].path for f in corpus_store.CorpusStore(tmp_path / "grown").datasets["blocks"].get_fragments()}
    for i in (7, 8):
        (docs / f"later{i}.txt").write_text(f"Later {i}. " + "sit amet " * (10 + i))
    manifest = corpus_build.build_store(_model(), docs, tmp_path / "grown", show_progress=False)
    after = {f.metadata.files[0].path for f in corpus_store.CorpusStore(tmp_path / "grown").datasets["blocks"].get_fragments()}
    assert before < after and manifest["documents"] == 5
    assert corpus_build.build_store(_model(), docs, tmp_path / "grown", show_progress=False)["documents"] == 5
    # the oracle: documents sorted by name then, all in one build
    order = corpus.find_documents(docs)
    names = [p.relative_to(docs).as_posix() for p in order]
    assert [d.name for d in corpus_store.CorpusStore(tmp_path / "grown").documents()] == \
        [n for n in names if not n.startswith("later")] + ["later7.txt", "later8.txt"]
    (docs / "zebra.txt").write_text("changed")
    with pytest.raises(ValueError, match="zebra.txt changed"):
        corpus_build.build_store(_model(), docs, tmp_path / "grown", show_progress=False)


def test_a_write_killed_midway_is_invisible_and_the_next_build_continues(tmp_path, monkeypatch):
    """Block fragments committed without the manifest (a build killed between its commits) are
    not seen by readers, and are dropped by the next build, which ends with the rows of one
    uninterrupted build."""
    docs = _zebra_docs(tmp_path)
    corpus_build.build_store(_model(), docs, tmp_path / "whole", shard_tokens=300, show_progress=False)
    calls = {"n": 0}
    real = corpus_store.StoreWriter._write_manifest

    def dies_at_third(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self)
    monkeypatch.setattr(corpus_store.StoreWriter, "_write_manifest", dies_at_third)
    with pytest.raises(KeyboardInterrupt):
        corpus_build.build_store(_model(), docs, tmp_path / "killed", shard_tokens=300, show_progress=False)
    monkeypatch.undo()
    half = corpus_store.CorpusStore(tmp_path / "killed")
    assert half.manifest["documents"] == 1 and half.datasets["documents"].count_rows() == 1
    assert half.datasets["blocks"].count_rows() == half.manifest["block_rows"]
    corpus_build.build_store(_model(), docs, tmp_path / "killed", shard_tokens=300, show_progress=False)
    _same_rows(tmp_path / "killed", tmp_path / "whole")


def test_another_models_store_unwritable_uri_and_unreachable_cluster_are_refused(tmp_path):
    docs = _zebra_docs(tmp_path, n=2)
    corpus_build.build_store(_model(), docs, tmp_path / "a", show_progress=False)
    corpus_build.build_store(_model(window=64), docs, tmp_path / "b", show_progress=False)
    reader = _model()
    reader.attach_corpus(tmp_path / "a")
    store = reader.state.corpus_store
    with pytest.raises(MemoryFileError, match="another model or memory layout.*window"):
        reader.attach_corpus(tmp_path / "b")
    assert reader.state.corpus_store is store                         # the attached one is kept
    with pytest.raises(MemoryFileError, match="block_size"):
        _model(block_size=32).attach_corpus(tmp_path / "a")
    versions = corpus_store.read_manifest(tmp_path / "a")["versions"]
    with pytest.raises(MemoryFileError, match="window"):                 # nothing written into it
        corpus_build.build_store(_model(window=64), docs, tmp_path / "a", show_progress=False)
    assert corpus_store.read_manifest(tmp_path / "a")["versions"] == versions
    held = hold_dir_lock(tmp_path / "a")                                 # another build is writing it
    with pytest.raises(BusyError, match="in use by another process"):
        corpus_build.build_store(_model(), docs, tmp_path / "a", show_progress=False)
    release_dir_lock(held)
    (tmp_path / "file").write_text("")
    with pytest.raises(WriteError, match="could not write .*file/store"):
        corpus_build.build_store(_model(), docs, tmp_path / "file" / "store", show_progress=False)
    with pytest.raises(ConnectionError, match="cannot reach the Ray cluster at '127.0.0.1:9'"):
        corpus_build.build_store(_model(), docs, tmp_path / "c", ray_address="127.0.0.1:9", model_factory=_model)
    assert not (tmp_path / "c").exists()


def test_an_int8_store_is_read_by_any_memory_dtype_and_the_cli_builds_int8(tmp_path, monkeypatch, capsys):
    """Attaching reads the rows in the dtype the store holds: a float32 reader of an int8 store
    reads the blocks and gives the answer an int8 reader gives; building into it is refused.
    `memformer memory build` writes int8 rows unless --memory-dtype says otherwise."""
    docs = _zebra_docs(tmp_path, n=2)
    corpus_build.build_store(_model(memory_dtype="int8"), docs, tmp_path / "q", show_progress=False)
    assert corpus_store.read_manifest(tmp_path / "q")["layout"]["dtype"] == "int8"
    f32, q8 = _model(answer_reads=1), _model(memory_dtype="int8", answer_reads=1)   # the best read alone
    f32.attach_corpus(tmp_path / "q")
    q8.attach_corpus(tmp_path / "q")
    fetched = f32.state.corpus_store.fetch_blocks([0])
    assert all(m.keys.dtype == torch.int8 and m.key_scales is not None for m in fetched.values())
    assert f32.ask(cue=CUE, max_new_tokens=4, record=True) == q8.ask(cue=CUE, max_new_tokens=4, record=True)
    assert f32.corpus_evidence(top=1)[0]["doc"] == "zebra.txt"
    with pytest.raises(MemoryFileError, match="dtype"):
        corpus_build.build_store(_model(), docs, tmp_path / "q", show_progress=False)

    from memformer.cli import memory as memory_cli
    monkeypatch.setattr(memory_cli, "load_model", lambda args: _model(memory_dtype=args.memory_dtype or "auto"))
    for flags, dtype in (([], "int8"), (["--memory-dtype", "float32"], "float32")):
        out = tmp_path / f"cli_{dtype}"
        assert main(["memory", "build", "--docs", str(docs), "--out", str(out), *flags]) == 0
        assert corpus_store.read_manifest(out)["layout"]["dtype"] == dtype
    capsys.readouterr()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_attach_rss_does_not_grow_with_the_corpus(tmp_path):
    """Attaching reads the manifest, the document offsets and (this small) the passage
    embeddings: once the libraries are loaded, a store 20x larger costs no more resident memory
    to attach, far less than its rows, which a memory directory's attach loads whole."""
    cfg = dict(window=512, sink_tokens=2, overlap=8)
    sizes = {}
    for name, n in (("small", 1), ("large", 20)):
        d = tmp_path / f"docs_{name}"
        d.mkdir()
        for i in range(n):
            (d / f"d{i:03d}.txt").write_text(f"Doc {i}. " + "lorem ipsum dolor sit amet " * 150)
        corpus_build.build_store(_model(**cfg), d, tmp_path / name, show_progress=False)
        sizes[name] = sum(f.stat().st_size for f in (tmp_path / name / "blocks.lance").rglob("*") if f.is_file())
    _model(**cfg).attach_corpus(tmp_path / "small")                    # pyarrow, Lance and FAISS loaded
    grown = {}
    for name in ("small", "large"):
        reader = _model(**cfg)
        before = _rss()
        reader.attach_corpus(tmp_path / name)
        grown[name] = _rss() - before
    assert sizes["large"] > 15 * sizes["small"] and sizes["large"] > 30e6
    assert grown["large"] - grown["small"] < 0.25 * (sizes["large"] - sizes["small"]), (grown, sizes)
    assert grown["large"] < 0.25 * sizes["large"], (grown, sizes)


def test_cli_build_info_and_convert(tmp_path, capsys):
    """`memformer memory build` writes a Lance store and `memory info` reads it; `memory convert`
    turns a memory directory into a store with the same rows; clear errors for an unreachable
    Ray address and an unwritable URI."""
    docs = _zebra_docs(tmp_path, n=2)
    corpus.build_corpus(_model(), docs, tmp_path / "dir", show_progress=False)
    assert main(["memory", "convert", str(tmp_path / "dir"), str(tmp_path / "converted")]) == 0
    corpus_build.build_store(_model(), docs, tmp_path / "built", show_progress=False)
    _same_rows(tmp_path / "converted", tmp_path / "built")
    assert "3 documents" in capsys.readouterr().out
    assert main(["memory", "info", str(tmp_path / "converted"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "lance" and info["documents"] == 3 and info["memory_layers"] == [0, 1]
    assert main(["memory", "convert", str(tmp_path / "dir"), str(tmp_path / "converted")]) == 2
    assert "already holds" in capsys.readouterr().err
    assert main(["memory", "build", "--docs", str(docs), "--out", str(tmp_path / "x"), "--ray", "127.0.0.1:9"]) == 2
    assert "cannot reach the Ray cluster" in capsys.readouterr().err


# ---------------------------------------------------------------- Ray
_PIDS = Path(os.environ.get("MEMFORMER_TEST_PIDS", "/tmp/memformer-test-pids"))


def slow_worker_model():
    """The tiny model, in a Ray worker that notes its pid and memorizes slowly enough for the
    test to kill it mid-build (test instrumentation only)."""
    (_PIDS / str(os.getpid())).touch()
    model = _model()
    real = model.memorize
    model.memorize = lambda *a, **k: (time.sleep(0.15), real(*a, **k))[1]
    return model


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="the scale extra (pip install 'memformer[scale]') is not installed")
    repo = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{repo}{os.pathsep}{repo}/tests",
                                          "MEMFORMER_TEST_PIDS": str(_PIDS)}})
    yield ray
    ray.shutdown()


def test_two_ray_workers_one_killed_build_the_rows_of_one_process(tmp_path, local_ray, monkeypatch):
    """A 2-worker Ray build whose worker is killed (SIGKILL) mid-build is retried by Ray and
    commits every row once: the store equals the single-process build row for row."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(16):
        (docs / f"d{i:02d}.txt").write_text(f"Document {i}. " + "lorem ipsum dolor " * (4 + i % 5))
    corpus_build.build_store(_model(), docs, tmp_path / "one", shard_tokens=100, show_progress=False)
    _PIDS.mkdir(exist_ok=True)
    for p in _PIDS.iterdir():
        p.unlink()
    killed, finished = [], threading.Event()

    def kill_one_worker_mid_build():
        # until the build returns, however slow the machine (a fixed deadline ran out under load)
        while not finished.is_set():
            try:
                done = corpus_store.read_manifest(tmp_path / "ray")["documents"]
            except Exception:                    # noqa: BLE001 - not created yet, or mid-write
                done = 0
            pids = sorted(_PIDS.iterdir())
            if done >= 1 and pids:
                os.kill(int(pids[0].name), signal.SIGKILL)
                killed.append((int(pids[0].name), done))
                return
            time.sleep(0.05)
    killer = threading.Thread(target=kill_one_worker_mid_build)
    killer.start()
    manifest = corpus_build.build_store(_model(), docs, tmp_path / "ray", ray_address="local", workers=2,
                                        model_factory=slow_worker_model, shard_tokens=100, show_progress=False)
    finished.set()
    killer.join()
    assert killed and killed[0][1] < 16, "no worker was killed mid-build"
    assert len(list(_PIDS.iterdir())) >= 3                    # the killed actor was restarted
    assert manifest["documents"] == 16
    _same_rows(tmp_path / "ray", tmp_path / "one")
