"""RULER evaluation: its templates and needles, haystack sizes, scoring, the looping check, the
resumable runner and the CLI end to end on a tiny model + byte tokenizer."""
import argparse
import json
import random
import re
from types import SimpleNamespace

import pytest
import torch

from memformer import MemoryConfig
from memformer.eval import ruler
from test_needle_ppl import _exit_code, _main, byte_tokenizer, fake_minilm, tiny_dir  # noqa: F401 (fixtures)

ESSAY = ruler.essay_words(" ".join(f"Essay sentence number {i} talks about topic {i % 7}." for i in range(400)))


@pytest.fixture(scope="module")
def btok():
    return byte_tokenizer()


def _sample(btok, task, length=2000, seed=0, index=0):
    return ruler.make_sample(btok, task, length, ruler.trial_rng(seed, task, length, index), ESSAY, index)


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_samples_follow_rulers_templates_and_fill_the_length(btok, task):
    spec = ruler.TASKS[task]
    s = _sample(btok, task)
    budget = 2000 - spec.tokens_to_generate
    assert budget - 100 <= s.tokens <= budget       # fills it, to one haystack unit (a noise line is 92 bytes)
    assert s.max_new_tokens == spec.tokens_to_generate
    if spec.kind == "vt":
        assert s.document.startswith(ruler.VT_HEAD[:20])             # the one-shot example comes first
        example, _, rest = s.document.partition("\n\n" + ruler.VT_HEAD)
        assert "are assgined the value" in example and rest.count("The grass is green.") > 1
        value = re.search(r"assigned the value (\d+)", s.cue).group(1)
        assert f"VAR {s.expected[0]} = {value}" in rest
        for a, b in zip(s.expected, s.expected[1:]):                 # the chain, hop by hop, in order
            assert rest.index(f"VAR {b} = VAR {a}") > rest.index(f"VAR {a} =")
        assert len(s.expected) == 5 and all(re.fullmatch(r"[A-Z]{5}", v) for v in s.expected)
        assert s.cue.endswith("they are: ") and "5 variables" in s.cue
        return
    one = spec.q * spec.v == 1
    head = s.document.split("\n")[0]
    assert head == (f"A special magic {spec.value[:-1]} is hidden within the following text." if one else
                    f"Some special magic {spec.value} are hidden within the following text.") + \
        head.split("text.", 1)[1]
    needles = re.findall(r"One of the special magic (\w+) for ([a-z-]+) is: (\S+)\.", s.document)
    assert len(needles) == spec.k * spec.v and {n[0] for n in needles} == {spec.value}
    assert len({n[1] for n in needles}) == spec.k                    # distractors: other keys, same form
    asked = re.search(r"for (.+) mentioned in the provided text\?", s.cue).group(1)
    keys = [k for k in re.split(r", and |, ", asked)]
    assert len(keys) == spec.q
    assert sorted(s.expected) == sorted(v for _, k, v in needles if k in keys)
    assert s.cue.endswith(f"The special magic {spec.value[:-1] if one else spec.value} for {asked} mentioned in "
                          f"the provided text {'is' if one else 'are'}")
    if spec.haystack == "noise":
        assert s.document.count(ruler.NOISE) > 5 and "Essay" not in s.document
    else:
        assert "Essay sentence number 0 talks" in s.document and ruler.NOISE not in s.document
    assert len(s.needle_depths) == len(needles) and all(0 < d < 1 for d in s.needle_depths)


def test_samples_are_seeded_and_errors_are_clear(btok):
    a, b = _sample(btok, "niah_multikey_1"), _sample(btok, "niah_multikey_1")
    assert (a.document, a.cue, a.expected) == (b.document, b.cue, b.expected)
    assert _sample(btok, "niah_multikey_1", seed=1).document != a.document
    assert _sample(btok, "niah_multikey_1", index=1).expected != a.expected
    with pytest.raises(ValueError, match="unknown RULER task"):
        _sample(btok, "niah_single_9")
    with pytest.raises(ValueError, match="too short for niah_multiquery"):
        _sample(btok, "niah_multiquery", length=300)
    with pytest.raises(ValueError, match="essay haystack is empty"):
        ruler.essay_words(" \n ")


def test_a_short_essay_is_repeated_to_fill_a_long_sample(btok):
    s = ruler.make_sample(btok, "niah_single_2", 6000, random.Random(0), ruler.essay_words("One short essay. " * 20))
    assert s.tokens > 0.97 * (6000 - 128) and s.document.count("One short essay.") > 200


def test_keys_are_rulers_adjective_noun_pairs():
    words = ruler.key_words()
    assert len(words) > 100_000 and all(w.count("-") >= 1 for w in words[:100])
    assert words == tuple(sorted(set(words)))


def test_wrong_values_counts_values_of_the_asked_form_not_asked_for():
    assert ruler.wrong_values("8287841.\n2437752.\n1234567 (see 1.6.5, 12345678)", ["8287841", "2437752"]) == 1
    assert ruler.wrong_values("8287841. 8287841.", ["8287841"]) == 0
    u = "0a1b2c3d-0000-4000-8000-00000000000a"
    assert ruler.wrong_values(f"{u.upper()} and 11111111-2222-4333-8444-555555555555", [u]) == 1
    assert ruler.wrong_values("VAR QREMZ = 1, VAR ABCDE, VARS", ["QREMZ", "SHYXD"]) == 1
    assert ruler.wrong_values(None, ["1"]) == ruler.wrong_values("x", []) == ruler.wrong_values("a b", ["a-b"]) == 0


def test_string_match_all_and_looping():
    assert ruler.string_match_all("The numbers are 123, 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert ruler.string_match_all("ABCDE\x00bcdef", ["abcde", "BCDEF"]) == 1.0
    assert ruler.string_match_all("nothing", ["1"]) == 0.0
    for loop in ("111111111111111", "**************", "the the the the the the the the the", "1, 2, 1, 2, " * 8,
                 "5, 6, 7, 8, 9, 10, 11, 12, 13,"):
        assert ruler.looping(loop), loop
    for fine in ("1234567", "1111111", "The special magic number is 7654321.", "SCBJV TOERZ MGAXP PRNMM BRHVQ",
                 "", "   " * 20):
        assert not ruler.looping(fine), fine


def _fake_model(btok, **cfg):
    return SimpleNamespace(tokenizer=btok, backbone_fingerprint="fake", memory_config=MemoryConfig(**cfg))


def test_runner_streams_records_and_resumes(btok, tmp_path, monkeypatch):
    calls = []

    def fake_run(model, sample, mode, cache_dir=None, cache_limit=None):          # memory answers right, rag a loop, truncate nothing
        calls.append(mode)
        text = {"memory": " ".join(sample.expected), "rag": "1" * 20, "truncate": ""}[mode]
        score = ruler.string_match_all(text, sample.expected)
        return dict(id=ruler.record_id(sample.task, sample.length, sample.index, mode), task=sample.task,
                    length=sample.length, index=sample.index, mode=mode, status="ok", score=score, depth=0.5,
                    answer=text, looping=ruler.looping(text))
    monkeypatch.setattr(ruler, "run_sample", fake_run)
    monkeypatch.setattr(ruler, "haystack_text", lambda path=None: ("essay", " ".join(ESSAY)))
    kw = dict(tasks=["niah_single_1", "vt"], lengths=[1500, 2000], samples=2, modes=["memory", "rag", "truncate"],
              out_dir=tmp_path, show_progress=False)
    rs = ruler.evaluate(_fake_model(btok), **kw)
    assert len(rs) == len(calls) == 24
    table = ruler.mean_table(rs)
    assert "| 1500 | 100.0% | 0.0% | 0.0% | 0/4 | 0/4 | 4/4 | 0 | 0 | 0 |" in table      # modes: memory, truncate, rag
    assert "1500/0/rag" in ruler.looping_examples(rs)
    lines = (tmp_path / "trials.jsonl").read_text().splitlines()
    (tmp_path / "trials.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:15])   # cut off
    calls.clear()
    again = ruler.evaluate(_fake_model(btok), **kw, resume=True)
    assert calls == ["truncate"] and [r["id"] for r in again] == [r["id"] for r in rs]
    calls.clear()                                            # more samples: only the new ones run
    grown = ruler.evaluate(_fake_model(btok), **dict(kw, samples=3), resume=True)
    assert len(calls) == 12 and len(grown) == 36
    assert [r for r in grown if r["index"] < 2] == again
    with pytest.raises(ValueError, match=r"other settings \(memory_config.question_blocks"):
        ruler.evaluate(_fake_model(btok, question_blocks=2), **kw, resume=True)
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.evaluate(_fake_model(btok), **dict(kw, tasks=["qa_1"]))


def test_cli_ruler_end_to_end(tiny_dir, tmp_path, capsys, fake_minilm):   # noqa: F811
    hay = tmp_path / "essay.txt"
    hay.write_text(" ".join(f"Sentence {i} of a held-out essay about rivers and {i % 5} boats." for i in range(300)))
    out = tmp_path / "ruler"
    argv = ["eval", "ruler", "--model", str(tiny_dir), "--window", "256", "--lengths", "1200", "--samples", "1",
            "--cache-dir", str(tmp_path / "cache"),
            "--tasks", "niah_single_1,niah_multikey_1,vt", "--haystack", str(hay), "--out", str(out)]
    assert _main(*argv) == 0
    records = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    assert {(r["task"], r["mode"]) for r in records} == {(t, m) for t in ("niah_single_1", "niah_multikey_1", "vt")
                                                         for m in ("memory", "rag", "truncate")}
    assert all(r["status"] == "ok" and isinstance(r["looping"], bool) and 0 <= r["score"] <= 1 for r in records)
    report = (out / "ruler.md").read_text()
    assert "essay.txt" in report and "| vt | 1200 |" in report and "memory looping" in report
    assert (out / "ruler_accuracy.png").stat().st_size > 5000
    assert len([d for d in (tmp_path / "cache").iterdir() if d.is_dir()]) == 3     # a memory per document
    assert json.loads((out / "run.json").read_text())["haystack"] == "essay.txt"
    assert _main(*argv, "--resume") == 0
    assert [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()] == records
    capsys.readouterr()


@pytest.mark.parametrize("argv, msg", [
    (["--tasks", "niah_single_1,qa_1"], "unknown task"),
    (["--lengths", "16k,long"], "not a length"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--haystack", "/nonexistent/essay.txt"], "--haystack: .*no such file"),
    (["--cache-dir", "c", "--cache-limit", "10 apples"], "--cache-limit: not a size"),
])
def test_cli_ruler_rejects_bad_arguments_before_loading_a_model(argv, msg, capsys):
    assert _exit_code("eval", "ruler", *argv, "--model", "/nonexistent/model") == 2
    assert re.search(msg, capsys.readouterr().err)


def _ruler_run(folder, length, seed=7, records=None, memory_config=None):
    """A run folder as `memformer eval ruler` leaves it: run.json and trials.jsonl."""
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"eval": "ruler", "backbone": "b", "haystack": "h.txt",
                                                 "seed": seed, "memory_config": memory_config or {"top_k": 32}}))
    records = records if records is not None else [
        {"id": f"{t}/{length}/0/{m}", "task": t, "length": length, "index": 0, "mode": m, "status": "ok",
         "score": s, "looping": False, "answer": "x"}
        for t, m, s in [("vt", "memory", 0.0), ("vt", "rag", 0.2), ("niah_single_1", "memory", 1.0),
                        ("niah_single_1", "rag", 1.0)]]
    (folder / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_ruler_lengths_merges_runs_of_one_configuration(tmp_path, capsys):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import ruler_lengths

    a, b = _ruler_run(tmp_path / "a", 16384), _ruler_run(tmp_path / "b", 32768)
    records, shared = ruler_lengths.load_runs([a, b])
    assert len(records) == 8 and shared["seed"] == 7
    assert ruler_lengths.main([str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "ruler_lengths.md").read_text()
    assert "| 16k | 50.0% | 60.0% |" in text and "| 32k | 50.0% | 60.0% |" in text
    assert "16k: 1, 32k: 1" in text
    assert (tmp_path / "out" / "ruler_lengths.png").stat().st_size > 0
    # loops are recounted by today's rule on the stored answer; the run's own flag stays
    looped = [dict(id=f"vt/65536/{i}/memory", task="vt", length=65536, index=i, mode="memory", status="ok",
                   score=0.0, looping=flag, answer=ans)
              for i, (flag, ans) in enumerate([(False, "KXA VQQ VQQ VQQ VQQ"), (True, "1"), (False, "KXA VQQ")])]
    recs, _ = ruler_lengths.load_runs([_ruler_run(tmp_path / "e", 65536, records=looped)])
    assert [r["looping"] for r in recs] == [True, True, False]

    other_seed = _ruler_run(tmp_path / "c", 65536, seed=8)
    with pytest.raises(ValueError, match="differs .* in seed"):
        ruler_lengths.load_runs([a, other_seed])
    with pytest.raises(ValueError, match="also in"):
        ruler_lengths.load_runs([a, _ruler_run(tmp_path / "d", 16384)])
    with pytest.raises(ValueError, match="run.json and trials.jsonl"):
        ruler_lengths.load_runs([tmp_path / "missing"])
    assert ruler_lengths.main([str(a), str(other_seed), "--out", str(tmp_path / "o2")]) == 2
    assert "differs" in capsys.readouterr().err


def test_ruler_lengths_takes_a_folders_modes_and_lets_rag_records_differ_in_ask_settings(tmp_path, capsys):
    """FOLDER:MODES takes only those modes' records: a memory-only rerun under another
    `answer_reads` merges with the RAG records of the earlier run of the same samples, never with
    its memory records."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import ruler_lengths

    rerun_records = [{"id": f"{t}/16384/0/memory", "task": t, "length": 16384, "index": 0, "mode": "memory",
                      "status": "ok", "score": s, "looping": False, "answer": "x"}
                     for t, s in [("vt", 0.0), ("niah_single_1", 1.0)]]
    rerun = _ruler_run(tmp_path / "rerun", 16384, records=rerun_records,
                       memory_config={"top_k": 32, "answer_reads": 4})
    earlier = _ruler_run(tmp_path / "earlier", 16384)
    assert ruler_lengths.parse_folder(f"{earlier}:rag") == (earlier, {"rag"})
    assert ruler_lengths.parse_folder(str(earlier)) == (earlier, None)
    records, _ = ruler_lengths.load_runs([rerun, earlier], [None, {"rag"}])
    assert sorted(r["id"] for r in records) == ["niah_single_1/16384/0/memory", "niah_single_1/16384/0/rag",
                                                "vt/16384/0/memory", "vt/16384/0/rag"]
    # its memory records too: the same records twice, and memory read under other ask settings
    with pytest.raises(ValueError, match="differs .* in memory_config"):
        ruler_lengths.load_runs([rerun, earlier])
    other = _ruler_run(tmp_path / "other", 16384, memory_config={"top_k": 8})
    with pytest.raises(ValueError, match="differs .* in memory_config"):    # top_k is not ask-only
        ruler_lengths.load_runs([rerun, other], [None, {"rag"}])
    assert ruler_lengths.main([str(rerun), f"{earlier}:rag", "--out", str(tmp_path / "out")]) == 0
    assert "| 16k | 50.0% | 60.0% |" in (tmp_path / "out" / "ruler_lengths.md").read_text()
    assert ruler_lengths.main([str(rerun), f"{earlier}:", "--out", str(tmp_path / "o2")]) == 2
    assert "no mode" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no records of mode.*rga; it holds memory, rag"):   # a misspelt mode
        ruler_lengths.load_runs([rerun, earlier], [None, {"rga"}])


def test_copy_repeats_values_documents_and_verdicts(btok):
    import random
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import copy_repeats

    rng = random.Random(3)
    for _ in range(200):
        d, n = copy_repeats.value(rng, True), copy_repeats.value(rng, False)
        assert len(d) == len(n) == 7 and d[0] != "0" and n[0] != "0"
        assert d[-1] == d[-2] and len(set(d)) == 6 and len(set(n)) == 7
    text, facts = copy_repeats.make_document(btok, ESSAY * 3, 1500, 4, random.Random(0))
    assert len(facts) == 4 and sum(dbl for _, _, dbl, _ in facts) == 2
    assert all(copy_repeats.STATEMENT.format(key=k, value=v) in text for k, v, _, _ in facts)
    assert 1400 <= len(btok(text, add_special_tokens=False)["input_ids"]) <= 1650   # re-decoding adds a few
    assert [copy_repeats.verdict(a, "9622344") for a in ("9622344.", ": 962234.", "1.", "")] == \
        ["exact", "short", "other", "other"]


def test_passage_ranks_needle_rank():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import passage_ranks

    scores = torch.tensor([0.1, 0.9, 0.5, 0.7])
    assert passage_ranks.needle_rank(scores, torch.tensor([False, False, True, True])) == 1
    assert passage_ranks.needle_rank(scores, torch.tensor([False, True, False, False])) == 0
    assert passage_ranks.needle_rank(scores, torch.zeros(4, dtype=torch.bool)) is None


def test_ruler_copy_probe_samples_and_table(btok):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import ruler_copy_probe

    found = list(ruler_copy_probe.doubled_samples(btok, ESSAY * 3, 1024, 5000, 3))
    assert len(found) == 3 and [s for s, _ in found] == sorted({s for s, _ in found})
    assert all(s > 5000 and x.task == "niah_single_2" and x.expected[0][-1] == x.expected[0][-2] for s, x in found)
    recs = [dict(adapter="auto", lora_scale=1.0, verdict="short", p_digit=0.1, p_dot=0.9),
            dict(adapter="auto", lora_scale=1.0, verdict="exact", p_digit=0.7, p_dot=0.3),
            dict(adapter="auto", lora_scale=0.75, verdict="other")]
    rows = ruler_copy_probe.table(recs).splitlines()
    assert rows[2] == "| auto | 1 | 1 | 1 | 0 | 0.40 / 0.60 (2 answers) |"
    assert rows[3] == "| auto | 0.75 | 0 | 0 | 1 | — |"
    assert ruler_copy_probe.scales("1,0.75,0") == [1.0, 0.75, 0.0]
    for bad in ("1,x", "-0.5", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            ruler_copy_probe.scales(bad)


def test_first_item_rescore_cuts_stored_answers_and_scores_them_again(tmp_path):
    """benchmarks/first_item_rescore.py: each answer of the modes asked is cut where `first_item`
    ends it and scored again (RULER records by string_match_all, needle records per query); a
    memory answer from several reads is left as it is (each read already answered one item)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import first_item_rescore

    rec = lambda i, mode, answer, expected, reads=1: {
        "id": f"niah_multivalue/16384/{i}/{mode}", "task": "niah_multivalue", "mode": mode, "status": "ok",
        "answer": answer, "expected": expected, "reads": reads}
    ruler_run = _ruler_run(tmp_path / "r", 16384, records=[
        rec(0, "memory", "1234567.\n\nThe special magic numbers for", ["1234567"]),      # cut, same score
        rec(1, "memory", "1234567.\n7654321.", ["1234567", "7654321"], reads=2),        # several reads: kept
        rec(2, "rag", ": 1234567. 7654321. 1111111.", ["1234567", "7654321"]),          # cut, loses a value
        rec(3, "rag", "1234567", ["1234567"])])                                         # no item end: kept
    needle_run = tmp_path / "n"
    needle_run.mkdir()
    (needle_run / "trials.jsonl").write_text(json.dumps({
        "id": "single-word/16384/0/memory/0", "task": "single-word", "mode": "memory", "status": "ok",
        "answers": ["lantern. The special magic word for", "Harbor and lantern."], "expected": [["lantern"], ["lantern"]],
        "answer_reads": [1, 1]}) + "\n")
    memory = first_item_rescore.rescore(ruler_run, {"memory"})
    assert (memory["answers"], memory["cut"], memory["before"], memory["after"], memory["moved"]) == (2, 1, 2.0, 2.0, [])
    rag = first_item_rescore.rescore(ruler_run, {"rag"})
    assert (rag["answers"], rag["cut"], rag["before"], rag["after"]) == (2, 1, 2.0, 1.5)
    assert [m["cut"] for m in rag["moved"]] == [": 1234567."]
    words = first_item_rescore.rescore(needle_run, {"memory"})
    assert (words["answers"], words["cut"], words["before"], words["after"]) == (2, 1, 1.0, 1.0)
    first_item_rescore.main(["--modes", "rag", str(ruler_run), "--out", str(tmp_path / "o.md")])
    assert "| 2 | 1 | 2.00 | 1.50 | 0 | 0 |" in (tmp_path / "o.md").read_text()
    with pytest.raises(SystemExit):                                  # a folder with no trials: a usage error
        first_item_rescore.main([str(tmp_path / "missing"), "--out", str(tmp_path / "x.md")])
    assert not (tmp_path / "x.md").exists()


def test_first_item_rescore_cuts_stored_answers_at_loops_read_by_read(tmp_path):
    """benchmarks/first_item_rescore.py --cut loop: a stored answer is cut where today's loop rule
    finds a loop (a count, which older runs' stop let through), an answer of several reads read by
    read (RULER's stored read answers; a needle answer's lines) and joined again; looping counts
    the run's flags, the cuts and what still loops (before: the run's flags)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import first_item_rescore

    rec = lambda i, mode, answer, expected, reads=1, read_answers=None, loop=False: {
        "id": f"niah_multivalue/16384/{i}/{mode}", "task": "niah_multivalue", "mode": mode, "status": "ok",
        "answer": answer, "expected": expected, "reads": reads, "read_answers": read_answers, "looping": loop}
    ruler_run = _ruler_run(tmp_path / "r", 16384, records=[
        rec(0, "memory", "5, 6, 7, 8, 9, 10, 11,", ["1234567"]),                         # a count: cut to "5"
        rec(1, "memory", ": 1234567.\n2, 3, 4, 5, 6, 7, 8\n7654321.", ["1234567", "7654321"], reads=3,
            read_answers=[": 1234567.", ": 2, 3, 4, 5, 6, 7, 8", "7654321."]),             # the middle read cut
        rec(2, "memory", "1234567.", ["1234567"], loop=True),                              # flagged by its run
        rec(3, "rag", ": 1234566, 1234567, 1234568, 1234569, 1234570, 1234571", ["1234567", "7654321"])])
    memory = first_item_rescore.rescore(ruler_run, {"memory"}, "loop")
    assert (memory["answers"], memory["cut"], memory["before"], memory["after"]) == (3, 2, 2.0, 2.0)
    assert (memory["loops_before"], memory["loops_after"]) == (1, 3)       # the run flagged one
    rag = first_item_rescore.rescore(ruler_run, {"rag"}, "loop")
    assert (rag["cut"], rag["before"], rag["after"], rag["loops_before"], rag["loops_after"]) == (1, 0.5, 0.0, 0, 1)
    assert [m["cut"] for m in rag["moved"]] == [": 1234566"]
    needle_run = tmp_path / "n"
    needle_run.mkdir()
    (needle_run / "trials.jsonl").write_text(json.dumps({
        "id": "multivalue/16384/0/memory/0", "task": "multivalue", "mode": "memory", "status": "ok",
        "answers": ["4266483.\n10, 5, 11, 12, 13, 14, 15, 16\n6569215."], "expected": [["4266483", "6569215"]],
        "answer_reads": [3]}) + "\n")
    words = first_item_rescore.rescore(needle_run, {"memory"}, "loop")
    assert words["cut"] == 1 and words["after"] == words["before"] > 0 and words["loops_after"] == 1
    first_item_rescore.main(["--cut", "loop", str(ruler_run), "--out", str(tmp_path / "o.md")])
    assert "| 3 | 2 | 2.00 | 2.00 | 1 | 3 |" in (tmp_path / "o.md").read_text()
    with pytest.raises(SystemExit):                                  # an unknown cut: a usage error
        first_item_rescore.main(["--cut", "sentence", str(ruler_run), "--out", str(tmp_path / "y.md")])
    assert not (tmp_path / "y.md").exists()


def test_vt_reads_finds_each_statements_blocks_and_counts_names_per_statement_kind():
    """benchmarks/vt_reads.py: the blocks a statement's read takes (the one holding "VAR name =",
    one before, n in all; None when absent) and the summary of names found per statement kind."""
    import sys
    from argparse import Namespace
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import vt_reads

    class Words:                                       # one token per word
        vocab: list[str] = []

        def encode(self, text):
            for w in text.split():
                if w not in self.vocab:
                    self.vocab.append(w)
            return [self.vocab.index(w) for w in text.split()]

        def decode(self, ids):
            return " ".join(self.vocab[i] for i in ids)

    tok = Words()
    for pad in range(8):                               # the statement at every offset within a block
        words = "x " * pad + "noise . " * 5 + "VAR HNPJI = 27155 " + "noise . " * 5 + "VAR IQMRG = VAR HNPJI "
        stream = tok.encode(words)
        for name in ("HNPJI", "IQMRG"):
            blocks = vt_reads.statement_blocks(tok, stream, name, 8, 3)
            assert blocks == list(range(blocks[0], blocks[0] + 3))
            assert f"VAR {name} =" in tok.decode(stream[blocks[0] * 8:(blocks[-1] + 1) * 8])   # the read holds it
        assert vt_reads.statement_blocks(tok, stream, "ABSNT", 8, 4) is None
    assert vt_reads.statement_blocks(tok, tok.encode("VAR A = 1 " * 3), "A", 8, 3) == [0, 1, 2]

    def rec(kind, k, memory, prompt):
        return dict(seed=1, index=0, statement=k, kind=kind, check_rank=k, candidates=5, memory="m", prompt="p",
                    with_best="b", with_best_prompt="bp", default_answer="d", memory_score=memory,
                    prompt_score=prompt, with_best_score=0.0, with_best_prompt_score=0.2)
    records = [rec("value", 0, 0.0, 0.2), rec("hop", 1, 0.2, 0.0), rec("hop", 2, 0.4, 0.0)]
    args = Namespace(seeds="1", samples=1, length="16k", threads=1, haystack=None, cache_dir=None, out="x")
    text = vt_reads.report(records, args, 1.0)
    assert "| value | 1 | 0 | 1 | 0 | 1 | 0 |" in text          # names found (score x 5), median rank
    assert "| hop | 2 | 3 | 0 | 0 | 2 | 2 |" in text
    with pytest.raises(SystemExit) as exit_:                # a usage error before any model loads
        vt_reads.main(["--samples", "0", "--out", "x"])
    assert exit_.value.code == 2


def test_needles_beside_numbers_moves_only_the_asked_needle_next_to_a_colon_number(btok, tmp_path, capsys):
    """benchmarks/needles_beside_numbers.py: the asked needle moves to 0-2 sentences after a
    sentence with a colon before a number (never a distractor needle), every other needle and the
    haystack's words stay; a haystack with no such sentence is a clear error; the report counts
    scores per mode."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import needles_beside_numbers as nb

    essay = ruler.essay_words(" ".join(f"Essay sentence {i} is plain." if i % 9 else f"Popcon V:{i}, I:{i + 1} here."
                                       for i in range(400)))
    s = ruler.make_sample(btok, "niah_multikey_1", 4000, ruler.trial_rng(3, "niah_multikey_1", 4000, 0), essay, 0)
    before = s.document
    needles = re.findall(r"One of the special magic numbers for [a-z-]+ is: \d+\.", before)
    asked = next(n for n in needles if s.expected[0] in n)
    at, places = nb.plant_beside_numbers(s, 3)
    assert places > 3 and s.document[at:].startswith(asked)
    assert sorted(re.findall(r"One of the special magic numbers for [a-z-]+ is: \d+\.", s.document)) == sorted(needles)
    assert s.document.replace(" " + asked, "", 1).split() == before.replace(asked, "", 1).split()
    preceding = re.split(r"(?<=[.!?])\s+", s.document[:at].strip())[-3:]       # the 3 sentences before it
    assert any(re.search(r":\s?\d", p) and "special magic" not in p for p in preceding)
    again = ruler.make_sample(btok, "niah_multikey_1", 4000, ruler.trial_rng(3, "niah_multikey_1", 4000, 0), essay, 0)
    assert nb.plant_beside_numbers(again, 3) == (at, places) and again.document == s.document     # seeded
    plain = _sample(btok, "niah_multikey_1", 4000)
    with pytest.raises(ValueError, match="no sentence with a colon before a number"):
        nb.plant_beside_numbers(plain, 0)
    recs = [dict(seed=1, index=0, mode="memory", status="ok", score=1.0, looping=False, answer="123.", expected=["123"]),
            dict(seed=1, index=0, mode="rag", status="ok", score=0.0, looping=True, answer="9|9", expected=["123"])]
    text = nb.report(recs, argparse.Namespace(task="niah_multikey_1", length=16384, haystack="h.txt", seeds="1", samples=1))
    assert "| memory | 1/1 | 0 |" in text and "| rag | 0/1 | 1 |" in text and "| 1/0 | 123 | ✓ '123.' | ✗ '9\\|9' |" in text
    with pytest.raises(SystemExit):
        nb.main(["--haystack", "h.txt"])                       # no --out and no --diagnose
    assert "--out is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        nb.main(["--haystack", "h.txt", "--diagnose", "1000-6"])
    assert "--diagnose takes SEED/INDEX" in capsys.readouterr().err
