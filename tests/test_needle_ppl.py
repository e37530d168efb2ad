"""Needle / passkey / perplexity evaluations: generators, scoring, the resumable trial log,
tables and plots, perplexity on a tiny model, and the CLI end to end on a tiny model + tokenizer."""
import json
import math
import random
import re
from types import SimpleNamespace

import pytest
import torch

from conftest import HashedWords, fake_default_embedder
from memformer import MemformerForCausalLM, MemoryConfig
from memformer.eval import needle, passkey, ppl, plots as evalplots


# ---------------------------------------------------------------------- a tiny byte-level tokenizer
def byte_tokenizer():
    """One token per UTF-8 byte (256) + <eos>: any text round-trips, no files needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="module")
def btok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved tiny random llama (vocab 257) with the byte tokenizer: what --model loads."""
    from conftest import tiny_backbone
    d = tmp_path_factory.mktemp("tiny_model")
    tiny_backbone("llama", vocab_size=257, max_position_embeddings=512).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


# ---------------------------------------------------------------------- generators
def test_plant_puts_each_needle_on_its_own_line_at_its_depth():
    text = "".join(f"line {i:03d} of the haystack\n" for i in range(200))
    out, offs = needle.plant(text, [(0.5, "NEEDLE A."), (0.0, "NEEDLE B."), (1.0, "NEEDLE C."), (0.25, "NEEDLE D.")])
    for (depth, s), o in zip([(0.5, "NEEDLE A."), (0.0, "NEEDLE B."), (1.0, "NEEDLE C."), (0.25, "NEEDLE D.")], offs):
        assert out[o:].startswith(s + "\n") and (o == 0 or out[o - 1] == "\n")
        assert abs(o / len(out) - depth) < 0.03
    assert out.replace("NEEDLE A.\n", "").replace("NEEDLE B.\n", "").replace("NEEDLE C.\n", "") \
        .replace("NEEDLE D.\n", "") == text                                           # haystack intact
    with pytest.raises(ValueError, match="depth"):
        needle.plant(text, [(1.5, "x")])


@pytest.mark.parametrize("variant", needle.VARIANTS)
@pytest.mark.parametrize("depth", [0.1, 0.8])
def test_samples_hold_their_needles_where_they_say(btok, variant, depth):
    s = needle.make_sample(btok, variant, 3000, depth, random.Random(7))
    assert s.task == variant and s.depth == depth
    assert abs(s.needle_depths[0] - depth) < 0.03                                       # the target needle
    cue_tokens = max(len(needle.encode(btok, "\n\n" + q.cue)) for q in s.queries)
    assert 2800 < s.tokens + cue_tokens <= 3000
    lines = s.text.split("\n")
    for q in s.queries:
        key = q.cue.split(" for ")[1].split(" ")[0]
        for v in q.expected:                                  # each expected value planted with its key
            assert any(key in ln and v in ln and "special magic" in ln for ln in lines)
    n = {"multikey": 4, "multivalue": 4, "multiquery": 4}.get(variant, 1)
    assert sum("special magic" in ln for ln in lines) == n
    assert len(s.queries) == (4 if variant == "multiquery" else 1)
    again = needle.make_sample(btok, variant, 3000, depth, random.Random(7))
    assert again.text == s.text and again.queries == s.queries                          # seeded
    assert needle.make_sample(btok, variant, 3000, depth, random.Random(8)).text != s.text


def test_sample_errors(btok):
    with pytest.raises(ValueError, match="unknown needle variant"):
        needle.make_sample(btok, "haystack", 3000, 0.5, random.Random(0))
    with pytest.raises(ValueError, match="too short"):
        needle.make_sample(btok, "multiquery", 100, 0.5, random.Random(0))


def test_passkey_sample_as_document_and_cue(btok):
    s = passkey.make_sample(btok, 2000, 0.3, 12345)
    assert s.text.startswith(passkey.TASK) and passkey.NEEDLE.format(key=12345) in s.text
    assert s.queries == [needle.Query(passkey.QUESTION, ["12345"], "number")]
    # depth counts filler sentences (as in make_prompt), so the task line shifts it a little
    assert abs(s.needle_depths[0] - 0.3) < 0.1 and 1800 < s.tokens <= 2000


# ---------------------------------------------------------------------- scoring
def test_scoring_takes_the_first_values_of_the_right_kind():
    num = needle.Query("cue", ["1234567"], "number")
    assert needle.score_query(" 1234567. The special magic number for x is 7", num) == 1
    assert needle.score_query(" 7654321, or maybe 1234567", num) == 0                   # a distractor first
    assert needle.score_query(" 12345678", num) == 0
    word = needle.Query("cue", ["teapot"], "word")
    assert needle.score_query(" the word Teapot.", word) == 1
    assert needle.score_query(" kettle, not teapot", word) == 0
    u = "1f0e8c1a-2b3c-4d5e-8f70-0123456789ab"
    assert needle.score_query(f" {u.upper()}.", needle.Query("cue", [u], "uuid")) == 1
    assert needle.score_query(" 1f0e8c1a", needle.Query("cue", [u], "uuid")) == 0
    multi = needle.Query("cue", ["111", "222", "333", "444"], "number")
    assert needle.score_query(" 222, 111, 999 and 555, 333", multi) == 0.5             # first four values only


# ---------------------------------------------------------------------- runner, trial log, resume
def _fake_model(btok, **cfg):
    return SimpleNamespace(tokenizer=btok, backbone_fingerprint="fake", memory_config=MemoryConfig(**cfg))


def _fake_answers(calls):
    """memory answers right, truncate answers a wrong number; counts the trials run."""
    def answer_cues(model, text, cues, mode, max_new_tokens):
        calls.append(mode)
        out = []
        for cue in cues:
            key = cue.split(" for ")[1].split(" ")[0]
            line = next(ln for ln in text.split("\n") if f" for {key} is " in ln)
            out.append(line.split(" is ")[1] if mode == "memory" else "0000000")
        return out
    return answer_cues


def _patch_answers(monkeypatch, answer_cues):
    """Every mode answered by the fake `answer_cues` (memory mode through `memory_answers`)."""
    from memformer.qa.longdoc import Answer
    monkeypatch.setattr(needle, "answer_cues", answer_cues)
    monkeypatch.setattr(needle, "memory_answers", lambda model, text, cues, n, evidence=3, **kw:
                        [Answer("memory", a) for a in answer_cues(model, text, cues, "memory", n)])


def test_runner_streams_trials_and_resume_skips_finished_ones(btok, tmp_path, monkeypatch):
    calls = []
    _patch_answers(monkeypatch, _fake_answers(calls))
    model = _fake_model(btok)
    kw = dict(variants=["single-number", "multiquery"], lengths=[1500, 2000], trials=2, modes=["memory", "truncate"],
              out_dir=tmp_path, show_progress=False)
    rs = needle.evaluate(model, **kw)
    assert len(calls) == len(rs) == 16
    assert all(r["score"] == (1.0 if r["mode"] == "memory" else 0.0) for r in rs)
    lines = (tmp_path / "trials.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [r["id"] for r in rs]
    # an interrupted run: the last record cut in half
    (tmp_path / "trials.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    calls.clear()
    again = needle.evaluate(model, **kw, resume=True)
    assert len(calls) == 1 and [r["id"] for r in again] == [r["id"] for r in rs]
    assert len((tmp_path / "trials.jsonl").read_text().splitlines()) == 16
    calls.clear()
    needle.evaluate(model, **dict(kw, lengths=[1500, 2000, 2500]), resume=True)           # only the new length
    assert len(calls) == 8
    with pytest.raises(ValueError, match=r"other settings \(seed: 0 -> 1\)"):
        needle.evaluate(model, **kw, seed=1, resume=True)
    with pytest.raises(ValueError, match=r"other settings \(memory_config.top_k: 32 -> 8\)"):
        needle.evaluate(_fake_model(btok, top_k=8), **kw, resume=True)
    with pytest.raises(ValueError, match=r"other settings \(memory_config.question_blocks: 4 -> 2\)"):
        needle.evaluate(_fake_model(btok, question_blocks=2), **kw, resume=True)
    run = json.loads((tmp_path / "run.json").read_text())          # a run from before a new config field
    run["memory_config"].pop("capacity")
    (tmp_path / "run.json").write_text(json.dumps(run))
    calls.clear()
    needle.evaluate(model, **kw, resume=True)
    assert calls == []
    calls.clear()
    needle.evaluate(model, **kw)                                                          # no --resume: fresh
    assert len(calls) == 16


def test_resumed_progress_starts_at_the_finished_trials(btok, tmp_path, monkeypatch):
    """The bar of a resumed run begins at the trials already logged and counts only new ones."""
    _patch_answers(monkeypatch, _fake_answers([]))
    bars = []

    class Bar:
        def __init__(self, total, initial=0, **kw):
            self.total, self.n = total, initial
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    model = _fake_model(btok)
    kw = dict(variants=["single-number"], lengths=[1500], trials=2, modes=["memory", "truncate"], out_dir=tmp_path)
    needle.evaluate(model, **kw)
    monkeypatch.setattr(needle, "tqdm", Bar)
    needle.evaluate(model, **dict(kw, lengths=[1500, 2000]), resume=True)
    assert [(b.total, b.n) for b in bars] == [(8, 8)]
    bars.clear()
    real_update = Bar.update
    firsts = []
    monkeypatch.setattr(Bar, "update", lambda self, n: (firsts.append(self.n), real_update(self, n)))
    needle.evaluate(model, **dict(kw, lengths=[1500, 2000, 2500]), resume=True)
    assert firsts[0] == 8 and bars[0].n == 12


def test_the_evaluation_modules_import_each_other_without_a_cycle():
    """Every import between memformer.eval modules, at the top or inside a function, points one
    way: the runner (needle) imports the tasks (passkey) and what they share (samples)."""
    import ast
    from pathlib import Path
    folder = Path(needle.__file__).parent
    graph = {}
    for f in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "memformer.eval":
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("memformer.eval."):
                deps.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[2] for a in node.names if a.name.startswith("memformer.eval.")}
        graph[f.stem] = deps - {f.stem}
    assert "passkey" in graph["needle"] and "needle" not in graph["passkey"]

    def reach(m, seen):
        for d in graph.get(m, ()):
            if d not in seen:
                seen.add(d)
                reach(d, seen)
        return seen
    assert not [m for m in graph if m in reach(m, set())], graph


def test_passkey_is_a_task_of_the_needle_run(btok, monkeypatch):
    """`eval needle --variants passkey` and `eval passkey` run the same trials: the needle runner's
    task "passkey" (`memformer.eval.passkey` builds its documents and imports nothing of the runner)."""
    _patch_answers(monkeypatch, lambda model, text, cues, mode, n: [text.split("pass key is ")[1][:5]])
    model = _fake_model(btok)
    a = needle.evaluate(model, ["passkey"], [1200], 3, show_progress=False)
    b = needle.evaluate(model, ["passkey"], [1200], 3, show_progress=False, name="passkey")
    assert [(r["id"], r["expected"], r["score"]) for r in a] == [(r["id"], r["expected"], r["score"]) for r in b]
    assert [r["score"] for r in a] == [1.0] * 6 and len({r["expected"][0][0] for r in a}) == 3


def test_evidence_records_whether_the_top_span_holds_the_needle(btok, monkeypatch):
    from memformer.qa.evidence import EvidenceSpan
    from memformer.qa.longdoc import Answer
    seen = []

    def memory_answers(model, text, cues, max_new_tokens, evidence=3):
        """trial 0: the needle's line is the top span; trial 1: second; trial 2: absent."""
        seen.append(cues)
        key = text.split("pass key is ")[1][:5]
        at = text.index("pass key is ")
        needle_span = EvidenceSpan("text 1", 0, at, at + 17, text[at:at + 17], 0.5, 0, 1)
        other = EvidenceSpan("text 1", 0, 0, 10, text[:10], 0.3, 0, 1)
        order = [[needle_span, other], [other, needle_span], [other]][len(seen) - 1]
        return [Answer("memory", key, evidence=order)]
    monkeypatch.setattr(needle, "memory_answers", memory_answers)
    monkeypatch.setattr(needle, "answer_cues", lambda model, text, cues, mode, n: ["00000"])
    rs = needle.evaluate(_fake_model(btok), ["passkey"], [1200], 3, modes=["memory", "truncate"],
                         show_progress=False, evidence=True)
    mem = [r for r in rs if r["mode"] == "memory"]
    assert [(r["evidence_top1"], r["evidence_top3"]) for r in mem] == [(True, True), (False, True), (False, False)]
    assert all(r["correct"] for r in mem) and "evidence_top1" not in rs[1]     # truncate records none
    assert mem[0]["evidence"][0]["text"].startswith("pass key is")
    table = needle.evidence_table(rs)
    assert table.splitlines()[-1] == "| passkey | 1200 | 1/3 (33%) | 2/3 |"
    assert needle.evidence_table([r for r in rs if r["mode"] == "truncate"]) == ""


def test_evaluate_rejects_bad_arguments(btok):
    model = _fake_model(btok)
    with pytest.raises(ValueError, match="unknown needle variant"):
        needle.evaluate(model, variants=["nope"], show_progress=False)
    with pytest.raises(ValueError, match="unknown mode"):
        needle.evaluate(model, modes=["memory", "psychic"], show_progress=False)
    with pytest.raises(ValueError, match="trials"):
        needle.evaluate(model, trials=0, show_progress=False)
    with pytest.raises(ValueError, match="too short"):
        needle.evaluate(model, lengths=[50], show_progress=False)
    with pytest.raises(ValueError, match="needles per document >= 1"):
        needle.evaluate(model, needles_per_doc=0, show_progress=False)
    with pytest.raises(ValueError, match="too short for 8 trials of single-number needles"):
        needle.evaluate(model, ["single-number"], lengths=[400], needles_per_doc=8, show_progress=False)
    with pytest.raises(ValueError, match="at most 48 pass keys per document"):
        needle.evaluate(model, ["passkey"], [20000], 49, needles_per_doc=49, show_progress=False)
    with pytest.raises(ValueError, match="distinct keys and values"):        # 64 value words
        needle.evaluate(model, ["single-word"], lengths=[8000], trials=65, needles_per_doc=65, show_progress=False)


# ---------------------------------------------------------------------- tables and plots
def _records():
    rs = []
    for L in (4096, 16384):
        for d, ok in ((0.1, 1.0), (0.5, 0.5), (0.9, 0.0)):
            rs.append(dict(id=f"a/{L}/{d}/memory", task="multivalue", length=L, depth=d, mode="memory",
                           status="ok", score=ok))
            rs.append(dict(id=f"a/{L}/{d}/full", task="multivalue", length=L, depth=d, mode="full",
                           status="ok" if L < 8192 else "n/a", score=1.0 if L < 8192 else None))
    return rs


def test_accuracy_table_marks_modes_that_do_not_fit(tmp_path):
    table = evalplots.accuracy_table(_records())
    assert table.splitlines()[0] == "| task | length | memory | full |"
    assert "| multivalue | 4k | 50% (1.5/3) | 100% (3/3) |" in table
    assert f"| multivalue | 16k | 50% (1.5/3) | {evalplots.NA} |" in table


def test_plots_are_written(tmp_path):
    rs = _records()
    for f in (evalplots.plot_depth_heatmaps(rs, tmp_path / "h.png", bins=3),
              evalplots.plot_accuracy_vs_length(rs, tmp_path / "a.png"),
              evalplots.plot_ppl_vs_position({"doc": {"memory": ([0, 10], [5.0, 4.0]),
                                                      "truncate": ([0, 10], [5.0, 6.0])}}, tmp_path / "p.png")):
        assert f.stat().st_size > 5000 and f.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------- perplexity
def test_bin_ppl_pools_segments_by_position():
    nll = [1.0, 1.0, 1.0, 3.0, 3.0]                     # tokens 1..5
    starts, vals = ppl.bin_ppl([nll, nll], 3)
    assert starts == [0, 3] and vals[0] == pytest.approx(math.e) and vals[1] == pytest.approx(math.exp(7 / 3))
    assert ppl.pooled_ppl([nll], 4) == pytest.approx(math.exp(3))


def _tiny_mem(tiny, vocab=128, tokenizer=None, memory_layers=None):
    return MemformerForCausalLM(tiny("llama", vocab_size=vocab), tokenizer,
                                MemoryConfig(window=24, sink_tokens=2, overlap=4, top_k=4,
                                             memory_layers=memory_layers))


# [0]: memory below the top layer, where ingest alone stops early; the scores must still come
# from the whole decoder
@pytest.mark.parametrize("memory_layers", [None, [0]])
def test_window_nll_without_memory_is_the_backbone_on_each_window(tiny, memory_layers):
    model = _tiny_mem(tiny, memory_layers=memory_layers)
    ids = torch.randint(0, 128, (80,), generator=torch.Generator().manual_seed(0)).tolist()
    nll = torch.tensor(ppl.window_nll(model, ids, "truncate"))
    assert nll.shape == (79,) and not nll.isnan().any()
    # windows of 24 = [sink 0..1 ‖ 4 tokens of context ‖ 18 new]; window 1 = [0, 1 ‖ 16..19 ‖ 20..37]
    x = torch.tensor([ids[:2] + ids[16:38]])
    with torch.no_grad():
        logp = model.backbone(input_ids=x).logits[0, :-1].log_softmax(-1)
    ref = -logp.gather(-1, x[0, 1:, None])[:, 0]                    # ref[j - 1] scores x[j]
    torch.testing.assert_close(nll[19:37], ref[5:], rtol=1e-5, atol=1e-5)   # tokens 20..37


@pytest.mark.parametrize("memory_layers", [None, [0]])
def test_window_nll_with_memory_changes_only_windows_after_the_first(tiny, memory_layers):
    model = _tiny_mem(tiny, memory_layers=memory_layers)
    ids = torch.randint(0, 128, (80,), generator=torch.Generator().manual_seed(1)).tolist()
    trunc = torch.tensor(ppl.window_nll(model, ids, "truncate"))
    mem = torch.tensor(ppl.window_nll(model, ids, "memory"))
    torch.testing.assert_close(mem[:19], trunc[:19])                 # first window (tokens 1..19): memory empty
    assert ((mem[19:] - trunc[19:]).abs() > 1e-4).float().mean() > 0.5   # later windows read memory
    assert model.memory_size() == 0                                  # nothing left behind
    with pytest.raises(ValueError, match="unknown ppl mode"):
        ppl.window_nll(model, ids, "full")
    with pytest.raises(TypeError, match="on_window must be callable"):
        model.memorize(torch.tensor([ids]), on_window="scores")
    assert model.memory_size() == 0                                  # refused before writing


def test_ppl_evaluate_writes_resumable_records_and_report(tiny, tmp_path):
    model = _tiny_mem(tiny, vocab=257, tokenizer=byte_tokenizer())
    rs = ppl.evaluate(model, ["pydocs"], 100, 2, out_dir=tmp_path, show_progress=False)
    assert [r["id"] for r in rs] == ["pydocs/100/0/memory", "pydocs/100/0/truncate",
                                     "pydocs/100/1/memory", "pydocs/100/1/truncate"]
    assert all(len(r["nll"]) == 99 and r["ppl"] > 1 for r in rs)
    again = ppl.evaluate(model, ["pydocs"], 100, 2, out_dir=tmp_path, resume=True, show_progress=False)
    assert again == rs
    md, png = ppl.write_report(rs, tmp_path, 25, 24)
    text = md.read_text()
    assert "### pydocs" in text and "| 75-99 |" in text and "| >= 24 |" in text and png.stat().st_size > 5000
    with pytest.raises(ValueError, match="tokens > window"):
        ppl.evaluate(model, ["pydocs"], 20, show_progress=False)
    with pytest.raises(ValueError, match="unknown document"):
        ppl.evaluate(model, ["novel"], 100, show_progress=False)


def test_ppl_documents_heldout_parts_and_files(tmp_path):
    import random
    from memformer.training.data import held_out, python_docs_documents
    parts = {d.name: d.load() for d in python_docs_documents(random.Random(0))}
    text = ppl.document_text("pydocs-heldout")
    held = [n for n in sorted(parts) if held_out(n, ppl.HELDOUT_FRACTION)]
    assert held and len(held) < len(parts)
    assert text == "\n\n".join(parts[n] for n in held)
    for name in set(parts) - set(held):                      # no training part's text is in it
        assert parts[name][:2000] not in text
    from memformer.training.data import stdlib_documents
    names = [d.name for d in stdlib_documents(random.Random(0))]
    held = sorted(n for n in names if held_out(n, ppl.HELDOUT_FRACTION))
    code = ppl.document_text("stdlib-heldout")
    assert held and len(held) < len(names) and code.count("# file: ") > len(held)
    for name in held:                                        # each held-out package or module is in it ...
        assert f"# file: {name.removeprefix('stdlib/')}" in code
    for name in set(names) - set(held):                      # ... and no training one
        assert f"# file: {name.removeprefix('stdlib/')}/" not in code
        assert f"# file: {name.removeprefix('stdlib/')}\n" not in code
    f = tmp_path / "book.md"
    f.write_text("A long book. " * 50)
    assert ppl.document_text(str(f)) == f.read_text() and ppl.check_documents([str(f), "pydocs", "novel"]) == ["novel"]


# ---------------------------------------------------------------------- the CLI, end to end
def _main(*argv):
    from memformer.cli.main import main
    return main(list(argv))


@pytest.fixture
def fake_minilm(monkeypatch):
    """Stands in for all-MiniLM-L6-v2 in the CLI runs."""
    return fake_default_embedder(monkeypatch, HashedWords(64, r"[a-z0-9]+", eps=1e-3))


def test_cli_needle_passkey_ppl_end_to_end(tiny_dir, tmp_path, capsys, monkeypatch, fake_minilm):
    common = ["--model", str(tiny_dir), "--window", "256", "--top-k", "4"]
    out = tmp_path / "needle"
    asked = []                                   # memory trials answer through model.ask (question reads)
    real_ask = MemformerForCausalLM.ask
    monkeypatch.setattr(MemformerForCausalLM, "ask", lambda self, *a, **kw: asked.append(kw.get("cue")) or
                        real_ask(self, *a, **kw))
    argv = ["eval", "needle", *common, "--lengths", "400,1k", "--trials", "2", "--variants",
            "single-number,multiquery,passkey", "--modes", "memory,truncate,full", "--out", str(out),
            "--needles-per-doc", "1"]
    assert _main(*argv) == 0
    records = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 2 * 2 * 3
    full = {r["length"]: r["status"] for r in records if r["mode"] == "full"}
    assert full == {400: "ok", 1024: "n/a"}                        # the tiny model's context is 512
    table = (out / "needle.md").read_text()
    assert "| single-number | 1k |" in table and evalplots.NA in table and "| all tasks | 400 |" in table
    assert "| passkey | 1k |" in table and "Trials: one needle per document, 2 documents per task" in table
    assert "question reads (4 memory blocks x 64 tokens" in table and "own reads in 0..1" in table
    assert all((out / f).stat().st_size > 5000 for f in ("needle_heatmap.png", "needle_accuracy.png"))
    mem = [r for r in records if r["mode"] == "memory"]
    assert all(r["status"] == "ok" and len(r["answers"]) == len(r["expected"]) for r in mem)
    assert len(asked) == sum(len(r["answers"]) for r in mem) and all(asked)      # one ask(cue=...) per query
    assert not {"reads", "confidence", "other_answers"} & {k for r in mem for k in r}
    assert all(len(r["answer_reads"]) == len(r["answers"]) and min(r["answer_reads"]) >= 1 for r in mem)
    assert not any("answer_reads" in r for r in records if r["mode"] != "memory")
    assert "qa" not in json.loads((out / "run.json").read_text())
    asked.clear()
    assert _main(*argv, "--resume") == 0                            # nothing left to run
    assert (out / "trials.jsonl").read_text().splitlines() == [json.dumps(r) for r in records] and asked == []

    pk = tmp_path / "passkey"
    assert _main("eval", "passkey", *common, "--lengths", "600", "--trials", "2", "--modes", "memory,truncate",
                 "--out", str(pk), "--evidence", "--question-blocks", "2", "--block-size", "32",
                 "--needles-per-doc", "2") == 0
    report = (pk / "passkey.md").read_text()
    assert "question reads (2 memory blocks x 32 tokens" in report
    assert json.loads((pk / "run.json").read_text())["memory_config"]["question_blocks"] == 2
    assert "| passkey | 600 |" in report and (pk / "passkey_heatmap.png").is_file()
    assert "Evidence (memory trials)" in report and "| passkey | 600 |" in report.split("Evidence")[1]
    mem = [json.loads(x) for x in (pk / "trials.jsonl").read_text().splitlines() if '"memory"' in x]
    assert len(mem) == 2 and all(r["evidence"] and "evidence_top1" in r for r in mem)
    assert [(r["index"], r["needle"]) for r in mem] == [(0, 0), (0, 1)] and mem[0]["key"] != mem[1]["key"]
    assert "Trials: 2 needles per document, 1 document per task and length (2 trials)" in report

    pp = tmp_path / "ppl"
    assert _main("eval", "ppl", *common, "--docs", "pydocs,stdlib", "--tokens", "600", "--bin", "128",
                 "--out", str(pp)) == 0
    text = (pp / "ppl.md").read_text()
    assert "### stdlib" in text and "own reads in 0..1" in text and (pp / "ppl_position.png").is_file()
    rs = [json.loads(x) for x in (pp / "trials.jsonl").read_text().splitlines()]
    assert {(r["task"], r["mode"]) for r in rs} == {(d, m) for d in ("pydocs", "stdlib") for m in ("memory", "truncate")}
    assert all(len(r["nll"]) == 599 for r in rs)
    capsys.readouterr()


def _exit_code(*argv):
    """`memformer ARGV`'s exit status, whether returned or raised (argparse, load_model)."""
    try:
        return _main(*argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv, msg", [
    (["needle", "--variants", "single-number,haystack"], "unknown variant"),
    (["needle", "--modes", "memory,psychic"], "unknown mode"),
    (["needle", "--lengths", "4k,lots"], "not a length"),
    (["passkey", "--trials", "0"], "must be >= 1"),
    (["needle", "--needles-per-doc", "0"], "--needles-per-doc .* must be >= 1"),
    (["needle", "--question-blocks", "0"], "question_blocks must be >= 1"),
    (["ruler", "--answer-reads", "0"], "answer_reads must be >= 1"),
    (["needle", "--answer-reads", "many"], "invalid int value"),
    (["passkey", "--block-size", "0"], "block_size must be >= 1"),
    (["ppl", "--docs", "novel"], "unknown document"),
    (["ppl", "--modes", "rag"], "unknown document\\(s\\)/mode"),
    (["ppl", "--tokens", "many"], "not a length"),
])
def test_cli_rejects_bad_arguments_before_loading_a_model(argv, msg, capsys):
    assert _exit_code("eval", *argv, "--model", "/nonexistent/model") == 2
    assert re.search(msg, capsys.readouterr().err)


def test_cli_resume_refuses_other_settings(tiny_dir, tmp_path, capsys):
    argv = ["eval", "passkey", "--model", str(tiny_dir), "--window", "256", "--lengths", "300", "--trials", "1",
            "--modes", "truncate", "--out", str(tmp_path)]
    assert _main(*argv) == 0
    assert _main(*argv, "--seed", "3", "--resume") == 2
    assert "other settings" in capsys.readouterr().err


# ---------------------------------------------------------------------- multi-needle documents
@pytest.mark.parametrize("task", needle.TASKS)
def test_multi_needle_document_has_distinct_keys_and_values_at_the_planned_depths(btok, task):
    job = needle.Job(task, 4000, 1, None, 5, 2)
    s = needle.build_sample(btok, job, seed=0)
    depths = needle.spread_depths(5, 1, 2, needle.trial_rng(0, task, 4000, "doc1of2x5"))
    assert [t.depth for t in s.needles] == depths and s.depth is None and len(s.trials) == 5
    assert all((2 * j + 1.2) / 10 <= d <= (2 * j + 1.8) / 10 for j, d in enumerate(depths))   # doc 1's slots
    assert 3500 < s.tokens <= 4000 and s.queries == [q for t in s.needles for q in t.queries]
    for t in s.needles:
        assert abs(t.needle_depths[0] - t.depth) < 0.03                     # the target needle where planned
    keys = [t.key for t in s.needles]
    values = [v for t in s.needles for q in t.queries for v in q.expected]
    assert len(set(keys)) == 5 and len(set(values)) == len(values)
    lines = s.text.split("\n") if task != "passkey" else s.text.split(". ")
    for t in s.needles:                                  # each cue's value is planted with that cue's key only
        for q in t.queries:
            asked = q.cue.split(" for ")[1].split(" ")[0] if task != "passkey" else t.key
            for v in q.expected:
                holders = [ln for ln in lines if v in ln and ("special magic" in ln or "pass key" in ln)]
                assert holders and all(asked in ln for ln in holders)
    per_trial = {"multikey": 4, "multivalue": 4, "multiquery": 4}.get(task, 1)
    planted = sum(ln.count("special magic") for ln in s.text.split("\n")) if task != "passkey" \
        else s.text.count("Remember it.")
    assert planted == 5 * per_trial and sum(len(t.needle_depths) for t in s.needles) == 5 * per_trial
    again = needle.build_sample(btok, job, seed=0)
    assert again.text == s.text and again.needles == s.needles                          # seeded
    assert needle.build_sample(btok, job._replace(index=0), seed=0).text != s.text


def test_multi_needle_scoring_counts_only_the_trials_own_value(btok, monkeypatch):
    """An answer giving another needle's value of the same document is wrong."""
    def answer_cues(model, text, cues, mode, n):
        vals = [q.expected[0] for q in sample.queries]
        mine = [vals[[q.cue for q in sample.queries].index(c)] for c in cues]
        return mine if mode == "memory" else mine[1:] + mine[:1]            # truncate: a neighbour's value
    build = needle.build_sample
    sample = build(btok, needle.Job("single-number", 3000, 0, None, 4, 1), seed=0)
    _patch_answers(monkeypatch, answer_cues)
    monkeypatch.setattr(needle, "build_sample", lambda tok, job, seed: sample)
    rs = needle.evaluate(_fake_model(btok), ["single-number"], [3000], 4, ["memory", "truncate"],
                         needles_per_doc=4, show_progress=False)
    assert [(r["mode"], r["needle"], r["score"], r["other_needles"]) for r in rs] == \
        [("memory", j, 1.0, []) for j in range(4)] + [("truncate", j, 0.0, [(j + 1) % 4]) for j in range(4)]
    table = needle.other_needle_table(rs)
    assert table.splitlines()[2:] == ["| single-number | 3000 | memory | 0/4 (0%) |",
                                      "| single-number | 3000 | truncate | 4/4 (100%) |"]
    assert needle.other_needle_table(_records()) == ""                      # one-needle records: no table
    # multivalue: only the first 4 values of the answer count; an unrelated number is no other needle
    mv = build(btok, needle.Job("multivalue", 3000, 0, None, 3, 1), seed=0)
    own, other = mv.needles[0].queries[0].expected, mv.needles[2].queries[0].expected
    assert needle.other_needles(mv, 0, [", ".join(own[:3] + [other[1]])]) == [2]
    assert needle.other_needles(mv, 0, [", ".join(own + [other[1]])]) == []
    assert needle.other_needles(mv, 1, ["1234567"]) == []


def _counting_answers(calls):
    """Every mode answers its cues right; calls gets (mode, text, cues) per document read."""
    def answer_cues(model, text, cues, mode, n):
        calls.append((mode, text, list(cues)))
        out = []
        for cue in cues:
            if " of " in cue:                                           # passkey: "... pass key of NAME is"
                name = cue.split(" of ")[-1].removesuffix(" is")
                out.append(text.split(f"The pass key of {name} is ")[1][:5])
            else:
                key = cue.split(" for ")[1].split(" ")[0]
                out.append(", ".join(ln.split(" is ")[1].rstrip(".") for ln in text.split("\n")
                                     if f" for {key} is " in ln))
        return out
    return answer_cues


def test_multi_needle_runner_reads_each_document_once_and_resumes_per_trial(btok, tmp_path, monkeypatch):
    calls = []
    _patch_answers(monkeypatch, _counting_answers(calls))
    model = _fake_model(btok)
    kw = dict(variants=["single-word", "multivalue", "passkey"], lengths=[3000], trials=6, modes=["memory", "rag"],
              out_dir=tmp_path, show_progress=False, needles_per_doc=4)
    rs = needle.evaluate(model, **kw)
    # 6 trials at 4 per document -> 2 documents (8 trials) per task; one read per document and mode
    assert len(calls) == 3 * 2 * 2 and len(rs) == 3 * 2 * 2 * 4
    assert all(len(cues) == 4 for _, _, cues in calls) and all(r["score"] == 1.0 for r in rs)
    assert [r["id"] for r in rs[:5]] == [f"single-word/3000/0/memory/{j}" for j in range(4)] + \
        ["single-word/3000/0/rag/0"]
    r = rs[0]
    assert (r["index"], r["needle"], r["needles"], r["status"]) == (0, 0, 4, "ok")
    assert r["key"] in calls[0][2][0] and r["expected"] == [[r["answers"][0]]]
    assert sorted(x["depth"] for x in rs if x["task"] == "passkey" and x["mode"] == "rag") == \
        sorted(x["depth"] for x in rs if x["task"] == "passkey" and x["mode"] == "memory")
    assert json.loads((tmp_path / "run.json").read_text())["needles_per_doc"] == 4
    # interrupted: two trials of one document lost -> that document is read again, only they are asked
    lines = (tmp_path / "trials.jsonl").read_text().splitlines()
    lost = {"multivalue/3000/1/rag/1", "multivalue/3000/1/rag/3"}
    (tmp_path / "trials.jsonl").write_text("\n".join(x for x in lines if json.loads(x)["id"] not in lost) + "\n")
    calls.clear()
    again = needle.evaluate(model, **kw, resume=True)
    assert [(m, len(c)) for m, _, c in calls] == [("rag", 2)]
    assert [r["id"] for r in again] == [r["id"] for r in rs]
    assert [r["answers"] for r in again] == [r["answers"] for r in rs]
    with pytest.raises(ValueError, match=r"other settings \(needles_per_doc: 4 -> 2\)"):
        needle.evaluate(model, **dict(kw, needles_per_doc=2), resume=True)
    with pytest.raises(ValueError, match=r"other settings \(needles_per_doc: 4 -> None\)"):
        needle.evaluate(model, **dict(kw, needles_per_doc=1), resume=True)
    needle.evaluate(model, **dict(kw, needles_per_doc=1, variants=["single-word"], out_dir=tmp_path / "old"))
    with pytest.raises(ValueError, match=r"needles_per_doc: None -> 4\).*resume it with --needles-per-doc 1"):
        needle.evaluate(model, **dict(kw, variants=["single-word"], out_dir=tmp_path / "old"), resume=True)


def test_one_needle_layout_is_unchanged(btok, monkeypatch):
    """needles_per_doc=1: the documents, ids and settings of the one-needle runs before it."""
    calls = []
    _patch_answers(monkeypatch, _counting_answers(calls))
    rs = needle.evaluate(_fake_model(btok), ["single-number"], [1500], 2, ["memory"], show_progress=False)
    assert [r["id"] for r in rs] == ["single-number/1500/0/memory", "single-number/1500/1/memory"]
    assert [r["depth"] for r in rs] == [0.25, 0.75] and not {"needle", "needles", "key", "other_needles"} & set(rs[0])
    old = needle.make_sample(btok, "single-number", 1500, 0.75, needle.trial_rng(0, "single-number", 1500, 1), 1)
    assert calls[1][1] == old.text
    assert "needles_per_doc" not in needle.run_settings(_fake_model(btok), "needle", 0, 2)


def test_cli_multi_needle_reads_each_document_once_per_mode(tiny_dir, tmp_path, capsys, monkeypatch, fake_minilm):
    """The real tiny model: one memorize per document (mode memory), one prepare per document and
    baseline mode, one ask per needle; the report states the layout."""
    from memformer.qa import longdoc
    memorized, prepared, asked = [], [], []
    real_memorize, real_prepare, real_ask = MemformerForCausalLM.memorize, longdoc.prepare, MemformerForCausalLM.ask
    monkeypatch.setattr(MemformerForCausalLM, "memorize", lambda self, x, **kw: memorized.append(len(x)) or
                        real_memorize(self, x, **kw))
    monkeypatch.setattr(longdoc, "prepare", lambda model, docs, mode, **kw: prepared.append(mode) or
                        real_prepare(model, docs, mode, **kw))
    monkeypatch.setattr(MemformerForCausalLM, "ask", lambda self, *a, **kw: asked.append(kw["cue"]) or
                        real_ask(self, *a, **kw))
    plotted = []                           # (plots of these records are tested above; they cost seconds)
    monkeypatch.setattr(evalplots, "plot_depth_heatmaps", lambda rs, path, **kw: plotted.append((len(rs), kw)))
    monkeypatch.setattr(evalplots, "plot_accuracy_vs_length", lambda rs, path, **kw: None)
    out = tmp_path / "multi"
    argv = ["eval", "needle", "--model", str(tiny_dir), "--window", "256", "--top-k", "4", "--lengths", "1200",
            "--trials", "3", "--needles-per-doc", "3", "--variants", "single-word,passkey",
            "--modes", "memory,truncate,rag", "--out", str(out)]
    assert _main(*argv) == 0
    records = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 3 * 3                       # tasks x needles x modes (one document per task)
    assert len(memorized) == 2 and sorted(prepared) == ["rag"] * 2 + ["truncate"] * 2
    mem = [r for r in records if r["mode"] == "memory"]
    assert len(asked) == len(mem) == 6 and all(r["key"] in cue for r, cue in zip(mem, asked))
    assert [r["needle"] for r in mem] == [0, 1, 2] * 2 and all(r["status"] == "ok" for r in records)
    report = (out / "needle.md").read_text()
    assert "Trials: 3 needles per document, 1 document per task and length (3 trials)" in report
    assert "| single-word | 1200 |" in report and "| all tasks | 1200 | 0.8-1.0 |" in report
    assert "| passkey | 1200 | rag |" in report.split("Wrong needle")[1]
    assert plotted == [(18, dict(bins=5, title="needle accuracy by depth and length (3 needles per document)"))]
    memorized.clear()
    assert _main(*argv, "--resume") == 0 and memorized == []                # nothing left to read
    capsys.readouterr()


def test_depth_table_pools_tasks_by_length_and_depth():
    table = evalplots.depth_table(_records(), bins=3)
    assert table.splitlines()[0] == "| task | length | depth | memory | full |"
    assert "| all tasks | 4k | 0.0-0.3 | 100% (1/1) | 100% (1/1) |" in table
    assert f"| all tasks | 16k | 0.7-1.0 | 0% (0/1) | {evalplots.NA} |" in table
