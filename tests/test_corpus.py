"""Corpus memories: merged retrieval, build / resume / attach / refuse, evidence, the CLI."""
import json

import pytest
import torch

from memformer import MemformerForCausalLM, MemoryConfig, MemoryFileError, corpus
from memformer.cli.main import main
from memformer.index import LayerMemory
from memformer.kernels import knn_attention_reference
from memformer.memory_layer import merged_retrieval
from tests.conftest import HashedWords, tiny_backbone


class CharTokenizer:
    """One token per character (vocab 128), enough for a tiny random model."""
    eos_token_id = 0
    pad_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 127 for c in text]}

    def decode(self, ids, **kw):
        return "".join(chr(i - 1) for i in ids if i > 0)


def _cfg(**kw):
    return MemoryConfig(**{**dict(window=48, sink_tokens=2, overlap=8, top_k=4), **kw})


def _model(**kw):
    return MemformerForCausalLM(tiny_backbone(), CharTokenizer(), _cfg(**kw), embedder=HashedWords(64, r"\S+", eps=1e-3))


def _docs(tmp_path, n=5):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    for i in range(n):
        folder = d / "sub" if i % 2 else d
        (folder / f"doc{i}.txt").write_text(f"Document {i}. " + "lorem ipsum dolor " * (8 + 3 * i))
    return d


def _interrupted_build(monkeypatch, docs, out, after: int):
    """A build of `docs` into `out` stopped by Ctrl-C while reading document `after` + 1."""
    calls = {"n": 0}
    real_read = corpus.read_document

    def flaky(path):
        calls["n"] += 1
        if calls["n"] == after + 1:
            raise KeyboardInterrupt
        return real_read(path)
    monkeypatch.setattr(corpus, "read_document", flaky)
    with pytest.raises(KeyboardInterrupt):
        corpus.build_corpus(_model(), docs, out, save_every=100, show_progress=False)
    monkeypatch.setattr(corpus, "read_document", real_read)


@pytest.mark.parametrize("with_own", [True, False])
def test_merged_retrieval_equals_one_concatenated_memory(with_own):
    B, Hkv, G, T, D, k = 2, 2, 2, 5, 16, 4
    g = torch.Generator().manual_seed(0)
    own_k, own_v = torch.randn(B, Hkv, 30, D, generator=g), torch.randn(B, Hkv, 30, D, generator=g)
    cor_k, cor_v = torch.randn(1, Hkv, 40, D, generator=g), torch.randn(1, Hkv, 40, D, generator=g)
    own = LayerMemory(B, Hkv, D)
    own.add(own_k, own_v, torch.arange(30).expand(B, 30))
    cor = LayerMemory(1, Hkv, D)
    cor.add(cor_k, cor_v, torch.arange(40)[None])
    both = LayerMemory(B, Hkv, D)                                # the oracle: each sequence holds both
    if with_own:
        both.add(torch.cat([own_k, cor_k.expand(B, -1, -1, -1)], 2), torch.cat([own_v, cor_v.expand(B, -1, -1, -1)], 2),
                 torch.arange(70).expand(B, 70))
    else:
        both.add(cor_k.expand(B, -1, -1, -1), cor_v.expand(B, -1, -1, -1), torch.arange(40).expand(B, 40))
    q = torch.randn(B, Hkv * G, T, D, generator=g)
    kl, vl = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    queries = q.reshape(B, Hkv, G * T, D)
    k_mem, v_mem, ids, scores, own_ids, cor_ids = merged_retrieval(own if with_own else None, cor, queries, k, G, T)
    got = knn_attention_reference(q, kl, vl, k_mem, v_mem, ids, mem_scores=scores, return_mem_probs=True)
    s2, i2 = both.search(queries, k)
    i2 = i2.view(B, Hkv, G, T, k).reshape(B, Hkv * G, T, k)
    want = knn_attention_reference(q, kl, vl, both.keys, both.values, i2, return_mem_probs=True)
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-5)
    # every winner is named in exactly one source, and the row ids point at the right rows
    offset = 30 if with_own else 0
    from_cor = cor_ids >= 0
    assert torch.equal(torch.where(from_cor, cor_ids + offset, own_ids if with_own else -1), i2)


def test_build_resume_attach_and_evidence(tmp_path, monkeypatch):
    docs = _docs(tmp_path)
    model = _model()
    table = corpus.build_corpus(model, docs, tmp_path / "full", show_progress=False)
    assert [d.name for d in table] == ["doc0.txt", "doc2.txt", "doc4.txt", "sub/doc1.txt", "sub/doc3.txt"]
    assert all(a.end == b.start for a, b in zip(table, table[1:]))
    full = dict(model.memories[0].state_dict())

    # interrupted after two documents (Ctrl-C while reading the third), then resumed
    _interrupted_build(monkeypatch, docs, tmp_path / "resumed", after=2)
    assert len(corpus.read_corpus_table(tmp_path / "resumed")) == 2
    resumed = _model()
    corpus.build_corpus(resumed, docs, tmp_path / "resumed", show_progress=False)
    for key, t in resumed.memories[0].state_dict().items():
        assert torch.equal(t, full[key]), key

    # attach read-only: own memory untouched, retrieval now sees the corpus
    reader = _model()
    x = torch.tensor([CharTokenizer()("lorem ipsum dolor lorem")["input_ids"]])
    with reader.memory_disabled():
        plain = reader(x).logits
    reader.attach_corpus(tmp_path / "full")
    assert reader.memory_size() == 0 and len([m for m in reader.memory_modules.values() if m.corpus is not None]) == 2
    out = reader.generate(x, max_new_tokens=3, do_sample=False, record=True)
    assert out.shape[1] == x.shape[1] + 3
    ev = reader.corpus_evidence(top=5)
    assert ev and abs(sum(e["share"] for e in ev) - 1) < 1e-3
    assert {e["doc"] for e in ev} <= {d.name for d in table}
    assert not torch.equal(reader(x).logits, plain)
    reader.detach_corpus()
    assert torch.allclose(reader(x).logits, plain, atol=1e-5)


def test_corpus_from_another_config_or_corrupt_is_refused(tmp_path):
    docs = _docs(tmp_path, n=2)
    corpus.build_corpus(_model(), docs, tmp_path / "mem", show_progress=False)
    other = _model(window=64)
    with pytest.raises(MemoryFileError, match="window"):
        other.attach_corpus(tmp_path / "mem")
    assert not other.state.corpus_attached
    table = tmp_path / "mem" / corpus.CORPUS_FILE
    table.write_text(table.read_text()[:-20])                    # truncated table
    with pytest.raises(MemoryFileError):
        _model().attach_corpus(tmp_path / "mem")
    with pytest.raises(ValueError, match="other documents"):     # resuming with another folder
        (tmp_path / "docs2").mkdir()
        (tmp_path / "docs2" / "x.txt").write_text("something else entirely")
        corpus.build_corpus(_model(), tmp_path / "docs2", tmp_path / "mem2", show_progress=False)
        corpus.build_corpus(_model(), docs, tmp_path / "mem2", show_progress=False)
    with pytest.raises(ValueError, match="no documents"):
        corpus.find_documents(tmp_path / "mem")


def test_memory_info_and_cli_errors(tmp_path, capsys):
    docs = _docs(tmp_path, n=3)
    corpus.build_corpus(_model(), docs, tmp_path / "mem", show_progress=False)
    assert main(["memory", "info", str(tmp_path / "mem"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["documents"] == 3 and info["tokens_in_memory"] > 0 and info["memory_layers"] == [0, 1]
    assert main(["memory", "info", str(tmp_path / "nothing")]) == 2
    assert main(["memory", "build", "--docs", str(tmp_path / "nothing"), "--out", str(tmp_path / "m")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_build_embeds_the_passages_and_a_resume_keeps_them(tmp_path, monkeypatch):
    """The corpus memory holds its passages (per document, EOS left out, as `PassageIndex.
    from_stream` cuts them); a resumed build embeds only the documents read after the resume and
    ends with the same passages as one uninterrupted build; a memory saved without passages (an
    older build) gets them on its next save."""
    from memformer.passages import chunk_ranges
    docs = _docs(tmp_path)
    model = _model()
    table = corpus.build_corpus(model, docs, tmp_path / "full", show_progress=False)
    want = chunk_ranges([(d.start, d.end - 1) for d in table])
    reader = _model()
    reader.attach_corpus(tmp_path / "full")
    got = reader.state.corpus_passages
    assert got.ranges == want and got.embeddings.shape == (len(want), 64)
    texts = [reader.tokenizer.decode(model.state.stream[0][a:b]) for a, b in want]
    assert torch.allclose(got.embeddings, HashedWords(64, r"\S+", eps=1e-3).encode(texts))

    _interrupted_build(monkeypatch, docs, tmp_path / "resumed", after=3)
    resumed = _model()
    corpus.build_corpus(resumed, docs, tmp_path / "resumed", show_progress=False)
    embedded = [t for call in resumed.questions.embedder.calls for t in call]
    assert len(embedded) == len(chunk_ranges([(d.start, d.end - 1) for d in table[3:]]))   # only the new ones
    again = _model()
    again.attach_corpus(tmp_path / "resumed")
    assert again.state.corpus_passages.ranges == want and torch.equal(again.state.corpus_passages.embeddings, got.embeddings)

    # an older corpus memory (no passages) gets them all at its next save
    monkeypatch.setattr(corpus, "embed_passages", lambda *a: None)
    corpus.build_corpus(_model(), docs, tmp_path / "old", show_progress=False)
    monkeypatch.undo()
    assert "passage_ranges" not in corpus.persistence.read_memory(_model(), tmp_path / "old")[1]
    (docs / "zz.txt").write_text("A last document. " + "lorem ipsum " * 5)
    table = corpus.build_corpus(_model(), docs, tmp_path / "old", show_progress=False)
    old = _model()
    old.attach_corpus(tmp_path / "old")
    assert old.state.corpus_passages.ranges == chunk_ranges([(d.start, d.end - 1) for d in table])


def test_question_reads_over_an_attached_corpus(tmp_path, monkeypatch):
    """`ask` over an attached corpus reads the corpus blocks under the passages nearest to the
    question, in every memory layer, exactly as the same memory loaded as the model's own memory
    is read (the oracle); beside an own memory the source of the best passage is read; a corpus
    memory built without passages falls back to kNN reads."""
    docs = _docs(tmp_path)
    (docs / "zebra.txt").write_text("The zebraquartz lives in the blue cellar. " + "lorem ipsum dolor " * 6)
    table = corpus.build_corpus(_model(), docs, tmp_path / "mem", show_progress=False)
    reader = _model(knn_layers=[1], answer_reads=1)      # the best read alone, checked against the oracle
    reader.attach_corpus(tmp_path / "mem")
    cue = "The zebraquartz lives in the"
    blocks = reader.questions.blocks_for(cue, source="corpus")
    zebra = next(d for d in table if d.name == "zebra.txt")
    bs = reader.memory_config.block_size
    assert zebra.start // bs in blocks and blocks == sorted(blocks)
    pinned = []
    real = reader.reading_blocks

    def spy(b, source="own"):                 # a read entered again right after itself counts once
        read = (torch.as_tensor(b).tolist(), source)
        if not pinned or pinned[-1] != read:
            pinned.append(read)
        return real(b, source)
    reader.reading_blocks = spy
    ans = reader.ask(cue=cue, max_new_tokens=3, record=True)
    # the candidates are checked in one batch (`verified_blocks`: [K, n], -1 padding), the
    # embedder's first among them, then the answer reads the one chosen
    candidates, source = reader.questions.candidates(cue)
    assert source == "corpus" and candidates[0][0] == blocks and len(pinned) == 2
    assert pinned[0] == ([[-1] * (max(len(c) for c, _ in candidates) - len(c)) + c for c, _ in candidates], "corpus")
    assert pinned[1] in [(c, "corpus") for c, _ in candidates]
    blocks = pinned[-1][0]
    assert reader.memory_size() == 0
    assert set(reader.recorded_reads(corpus=True)) == {0, 1} and not reader.recorded_reads()  # every memory layer
    assert reader.corpus_evidence(top=1)[0]["doc"] == "zebra.txt"
    for layer, calls in reader.recorded_reads(corpus=True).items():
        pos = reader.memory_modules[layer].corpus.positions[0]
        for rows, _ in calls:
            read = {int(pos[r]) // bs for r in rows[0, 0, 0].tolist() if r >= 0}
            assert read == set(blocks)
    x = reader.questions.prompt_ids(cue=cue)
    with real(blocks, source="corpus"):
        logits_corpus = reader(x).logits
    # the oracle: the same memory loaded as the model's own memory, the same blocks read
    own = _model(knn_layers=[1])
    own.load_memory(tmp_path / "mem")
    with own.reading_blocks(blocks):
        assert torch.allclose(own(x).logits, logits_corpus, atol=1e-5)
        out = own.generate(x, max_new_tokens=3, do_sample=False)
    assert ans == own.tokenizer.decode(out[0, x.shape[1]:]).strip()

    # CorpusQA (`memformer qa --corpus`) answers through the same question read
    from memformer.qa.corpus_qa import CorpusQA
    pinned.clear()
    qa_ans = CorpusQA(reader).answer(cue=cue, max_new_tokens=3, evidence=1)
    assert pinned[-1] == (blocks, "corpus") and qa_ans.text == ans
    assert qa_ans.corpus_evidence[0]["doc"] == "zebra.txt"

    # an own memory beside the corpus: the source holding the best passage is read
    reader.memorize("The keeper's cat is called Marmalade. " * 4, show_progress=False)
    pinned.clear()
    reader.ask(cue="The keeper's cat is called", max_new_tokens=2)
    reader.ask(cue=cue, max_new_tokens=2)
    sources = [src for _, src in pinned]                 # each answer's candidate checks, then its read
    assert sources[0] == "own" and sources[-1] == "corpus" and sources == sorted(sources, key=lambda s: s != "own")

    # a corpus memory built without passages: kNN reads over both, nothing pinned
    monkeypatch.setattr(corpus, "embed_passages", lambda *a: None)
    corpus.build_corpus(_model(), docs, tmp_path / "bare", show_progress=False)
    monkeypatch.undo()
    reader.attach_corpus(tmp_path / "bare")
    assert reader.state.corpus_passages is None
    pinned.clear()
    reader.clear_recorded_reads()
    reader.ask(cue="The cat is called", max_new_tokens=2, record=True)
    assert pinned == [] and set(reader.recorded_reads()) == set(reader.recorded_reads(corpus=True)) == {1}
    reader.clear_recorded_reads()
    reader.detach_corpus()                                               # own memory alone: question reads
    reader.ask(cue="The cat is called", max_new_tokens=2, record=True)
    assert pinned == [(pinned[0][0], "own")] and set(reader.recorded_reads()) == {0, 1}


def test_build_saves_as_the_memory_grows_by_a_quarter(tmp_path, monkeypatch):
    """A save rewrites the whole memory: after the first, each comes once the memory has grown by
    SAVE_GROWTH (and save_every documents), and the last document is always saved."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"d{i:02d}.txt").write_text(f"Doc {i}. " + "lorem ipsum " * 4)
    saves = []
    real_save = corpus.persistence.save_memory

    def counting(model, path, extra_files=None):
        saves.append(len(json.loads(extra_files[corpus.CORPUS_FILE])["documents"]))
        return real_save(model, path, extra_files=extra_files)
    monkeypatch.setattr(corpus.persistence, "save_memory", counting)
    table = corpus.build_corpus(_model(), docs, tmp_path / "mem", save_every=2, show_progress=False)
    ends = [table[n - 1].end for n in saves]
    assert saves[0] == 2 and saves[-1] == 40
    assert all(b - a >= corpus.SAVE_GROWTH * a for a, b in zip(ends, ends[1:-1]))
    assert len(saves) < 20                     # every second document would be 20 saves
    assert len(corpus.read_corpus_table(tmp_path / "mem")) == 40


def test_several_corpus_reads_answer_side_by_side_as_each_read_alone(tmp_path, monkeypatch):
    """Over an attached corpus, a question answered from several reads runs them as one batch
    (row k reading its own corpus blocks): each row's scores are those of that read alone, and
    the reads' scores differ, so a row reading another's blocks would show."""
    import memformer.model as model_module
    from memformer.question_reads import candidate_reads
    docs = _docs(tmp_path)
    (docs / "zebra.txt").write_text("The zebraquartz lives in the blue cellar. " + "lorem ipsum dolor " * 6)
    corpus.build_corpus(_model(), docs, tmp_path / "mem", show_progress=False)
    reader = _model(knn_layers=[1], answer_reads=3)
    reader.attach_corpus(tmp_path / "mem")
    cue = "The zebraquartz lives in the"
    candidates, source = reader.questions.candidates(cue)
    assert source == "corpus" and len(candidates) >= 3
    taken = []

    def top_three(scored, limit):
        taken[:] = [b for b, _ in scored[:3]]
        return list(taken)
    monkeypatch.setattr(model_module, "answer_reads", top_three)
    monkeypatch.setattr("memformer.item_choice.ITEM_ALTERNATIVES", 0)   # greedy items alone (runner-ups: test_item_choice)
    real_generate, batched = reader.generate, []

    def spy(ids, **kw):
        out = real_generate(ids, **{**kw, "output_scores": True, "return_dict_in_generate": True})
        batched.append(torch.stack(out.scores))                                # [new, B, V]
        return out
    reader.generate = spy
    assert reader.ask(cue=cue, max_new_tokens=4, return_dict=True).reads == 3
    reader.generate = real_generate
    assert len(batched) == 1 and batched[0].shape[1] == 3
    x = reader.questions.prompt_ids(cue=cue)
    firsts = []
    for k, blocks in enumerate(taken):
        # a cue's answer starts from its read's check cache (its copy-pointer shares): that read alone's
        alone, _ = candidate_reads(reader, [blocks], "corpus", x)
        with reader.reading_blocks(blocks, "corpus"):
            g = reader.generate(x, cache=alone, max_new_tokens=1, do_sample=False, output_scores=True,
                                return_dict_in_generate=True)
        torch.testing.assert_close(batched[0][0, k], g.scores[0][0], atol=1e-4, rtol=1e-4)
        firsts.append(g.scores[0][0])
    assert not torch.allclose(firsts[0], firsts[1], atol=1e-4) and not torch.allclose(firsts[1], firsts[2], atol=1e-4)


def test_corpus_question_reads_refuse_bad_input(tmp_path):
    """No corpus attached, an unknown source, or a sentence embedder of another width than the
    corpus was built with: a ValueError naming it, and nothing pinned."""
    docs = _docs(tmp_path, n=3)
    corpus.build_corpus(_model(), docs, tmp_path / "mem", show_progress=False)
    reader = _model()
    with pytest.raises(ValueError, match="no corpus memory is attached"):
        with reader.reading_blocks([0], source="corpus"):
            pass
    with pytest.raises(ValueError, match="no corpus memory with passages"):
        reader.questions.blocks_for("lorem", source="corpus")
    with pytest.raises(ValueError, match="source must be"):
        reader.questions.blocks_for("lorem", source="elsewhere")
    reader.attach_corpus(tmp_path / "mem")
    reader.questions.use_embedder(HashedWords(32, r"\S+", eps=1e-3))              # built 64-wide
    with pytest.raises(ValueError, match="64-wide"):
        reader.ask(cue="Document 1. lorem", max_new_tokens=2)
    assert reader.runtime.pinned_blocks is None and reader.runtime.pinned_source == "own"
