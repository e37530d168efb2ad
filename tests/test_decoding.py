"""Answers stop at a degenerate loop (memformer.decoding): the check, the cut, the stopping
criterion, and ask / LongDocQA answers on a tiny model whose greedy output loops."""
import pytest
import torch

from conftest import HashedWords, tiny_backbone
from memformer import MemformerForCausalLM, MemoryConfig
from memformer.decoding import LoopStop, cut_loop, end_at_cue, first_item, looping
from test_qa import char_tokenizer

TEXT = " ".join(["river stone cloud maple lantern copper meadow harbor"] * 8)


def test_looping_and_cut_loop():
    for loop in ("111111111111111", "**************", "the the the the the the the the the", "1, 2, " * 8):
        assert looping(loop), loop
    for fine in ("1234567", "1111111", "The special magic number is 7654321.", "SCBJV TOERZ MGAXP", "", "   " * 20):
        assert not looping(fine) and cut_loop(fine) == (fine, False), fine
    assert cut_loop("**8041831.** The number is **1111111111111111111") == ("**8041831.** The number is **1", True)
    assert cut_loop("1111111111111") == ("1", True)
    assert cut_loop("zebra zebra zebra zebra zebra zebra zebra zebra zebra") == ("zebra", True)
    # a sentence and the cue leading back into it, 3 times: cut to the sentence
    sentence_loop = "a secret code. \nThe secret code of the red vault is " * 3 + "a secret"
    assert looping(sentence_loop) and cut_loop(sentence_loop) == ("a secret code.", True)
    assert cut_loop("Yes. " + "and then it went on and on " * 3) == ("Yes. and then it went on and on", True)
    # a list naming one value on line after line: cut to one line, once the third copy is complete
    listed = ":\n\n* 9021980.\n* 9021980.\n* 9021980.\n* 9021980.\n* "
    assert looping(listed) and cut_loop(listed) == (":\n\n* 9021980.", True)
    assert looping(":\n\n* 9021980.\n* 9021980.\n* 9021980.")
    assert cut_loop("x\ny\ny\ny") == ("x\ny", True)
    for fine in (":\n\n* 9021980.\n* 9021980.\n* 9021980",        # the third copy is not complete yet
                 "* 1\n* 1\n", "- a\n- b\n- c", "|---|\n|---|\n|---|", "ok\n\n\n\n"):
        assert not looping(fine) and cut_loop(fine) == (fine, False), fine
    # a word group said 4 times running, apart by spaces: cut to one copy
    assert cut_loop("KXA ZQV TQQ VQQ VQQ VQQ VQQ VQQ") == ("KXA ZQV TQQ VQQ", True)
    assert cut_loop(": 5434657. 5434657. 5434657. 5434657. 54") == (": 5434657.", True)
    assert cut_loop("LPB DVT ZSQ IGI ZSQ IGI ZSQ IGI ZSQ IGI ZSQ I") == ("LPB DVT ZSQ IGI", True)
    for fine in ("5434657. 5434657. 5434657.", "0 0 0 0 0 0", "1.0 2.0 1.0 1.0", "VQQ VQQ VQQ VQQX",
                 "He said no, no, no, no."):
        assert not looping(fine) and cut_loop(fine) == (fine, False), fine
    # a count: 6+ whole numbers, each one more than the one before, apart by the same separator
    for count, cut in (("5, 6, 7, 8, 9, 10, 11, 12, 13,", "5"), ("48960, 5, 6, 7, 8, 9, 10, 11,", "48960, 5"),
                       (": 1. 2. 3. 4. 5. 6. 7.", ": 1"), (": 4231320. 4231321. 4231322. 4231323. 4231324. 4231325.", ": 4231320"),
                       ("1.1.1.2.2.3.4.5.6.7.8.9", "1.1.1.2.2"), ("1, 2, 3. 4. 5. 6. 7. 8.", "1, 2, 3"),
                       ("* 3871243\n11, 12, 13, 14, 15, 16, 17", "* 3871243\n11")):
        assert looping(count) and cut_loop(count) == (cut, True), count
    for fine in ("1, 2, 3, 4, 5", "Python 3.8, 3.9, 3.10, 3.11, 3.12, 3.13", "1, 3, 5, 7, 9, 11, 13",
                 "2019, 2020 and 2021, 2022, 2023, 2024", "1 a 2 b 3 c 4 d 5 e 6 f 7",
                 "1, 2, 3, 5, 6, 7, 8", "1. 2. 3. 4. 5 6"):
        assert not looping(fine) and cut_loop(fine) == (fine, False), fine
    for fine in ("The special magic numbers are 1234567, 2345678, 3456789 and 4567890.",
                 "The code of the red vault is 4417. The code of the blue vault is 9921.",
                 "a secret code. \nThe secret code of the red vault is " * 2):      # twice is not a loop yet
        assert not looping(fine), fine


def test_loop_stop_looks_at_the_generated_tokens_only():
    tok = char_tokenizer()
    ids = lambda s: torch.tensor([tok(s, add_special_tokens=False)["input_ids"]])
    stop = LoopStop(tok)
    prompt = "---------------- rule, then a cue:"                 # the prompt itself repeats a unit
    assert not stop(ids(prompt + "4"), None).item()               # first call: prompt + one new token
    assert stop.prompt_len == ids(prompt).shape[1]
    assert not stop(ids(prompt + "4211"), None).item()
    assert stop(ids(prompt + "42" + "1" * 9), None).item()
    assert not stop(ids(prompt + "\n* 42.\n* 42.\n* 4"), None).item()
    assert stop(ids(prompt + "\n* 42.\n* 42.\n* 42."), None).item()      # a line listed three times
    assert not stop(ids(prompt + "5, 6, 7, 8, 9,"), None).item()
    assert stop(ids(prompt + "5, 6, 7, 8, 9, 10"), None).item()          # a count of six numbers
    both = torch.cat([ids("ab" + "x" * 10), ids("ab" + "xyz" * 3 + "q")])
    s2 = LoopStop(tok)
    s2.prompt_len = 2
    assert s2(both, None).tolist() == [True, False]


def test_first_item_and_the_one_item_stop_keep_one_item():
    """An answer from one of several reads is one item: up to the end of its first sentence or
    line that holds a letter or digit (a leading ":" and blank lines before it kept); the stop
    fires once such an item has ended in the generated text, not in the prompt."""
    assert first_item(":\n\n- 4353316.\n- 155893.") == ":\n\n- 4353316."
    assert first_item(":\n\n- 2798049.\n\nPlease provide the numbers") == ":\n\n- 2798049."
    assert first_item(": 5419972. BACK TO BASICS Copyleft is") == ": 5419972."
    assert first_item("* 4264739\n* 7015582.") == "* 4264739"
    assert first_item("3.14 is pi. More") == "3.14 is pi."                 # a point inside a number ends nothing
    for whole in (": 5186161.", ":\n\n", "", "7982575", "3.14"):
        assert first_item(whole) == whole
    tok = char_tokenizer()
    ids = lambda s: torch.tensor([tok(s, add_special_tokens=False)["input_ids"]])
    stop = LoopStop(tok, one_item=True)
    prompt = "Question? Yes.\nAnswer:"                           # the prompt's own ends count not
    assert not stop(ids(prompt + ":"), None).item()
    assert not stop(ids(prompt + ":\n\n- 43"), None).item()       # blank lines, then an open item
    assert not stop(ids(prompt + ":\n\n- 4.3"), None).item()
    assert stop(ids(prompt + ":\n\n- 43.\n"), None).item()
    assert stop(ids(prompt + ": 43. The"), None).item()


def test_an_answer_ends_where_it_states_its_cue_again():
    """`end_at_cue`: a completion that restates its cue after some text of its own is starting over
    (twice is not a loop yet, so `cut_loop` alone keeps it); it ends before the restated cue.
    One that opens with the cue, never restates it, or has no cue is kept whole."""
    cue = "The special magic number for tidy-violin is"
    again = "1.\n\nThe special magic number for tidy-violin is 1.\n\nThe special magic number for tidy-violin is"
    assert not looping(again) and end_at_cue(again, cue) == "1."
    assert end_at_cue("6332596. " + cue + " 6332596.", " " + cue + " ") == "6332596."
    for kept in (cue + " 4417.", "4417.", "4417. The special magic number for other-key is 1."):
        assert end_at_cue(kept, cue) == kept
    assert end_at_cue(again, None) == end_at_cue(again, "  ") == again
    tok = char_tokenizer()
    ids = lambda s: torch.tensor([tok(s, add_special_tokens=False)["input_ids"]])
    stop = LoopStop(tok, prompt_len=ids("x: ").shape[1], cue="code is")
    assert not stop(ids("x: code is 4417"), None).item()         # opens with its cue: an answer
    assert not stop(ids("x: 4417. The code i"), None).item()
    assert stop(ids("x: 4417. The code is"), None).item()
    assert not LoopStop(tok, prompt_len=3)(ids("x: 4417. The code is"), None).item()


def test_an_answer_ends_where_it_restates_the_last_sentence_of_its_cue():
    """A cue that asks first and then opens the answer: a completion that restates the opening
    alone is starting over too. A short last sentence ("It is") or one that only opens the
    answer is not taken for a restatement."""
    cue = ("What are all the special magic numbers for humorous-bride mentioned in the provided text? "
           "The special magic numbers for humorous-bride mentioned in the provided text are")
    text = ": 4444674. The special magic numbers for humorous-bride mentioned in the provided text are: 4"
    assert end_at_cue(text, cue) == ": 4444674."
    assert end_at_cue("The special magic numbers for humorous-bride mentioned in the provided text are 1.", cue) \
        == "The special magic numbers for humorous-bride mentioned in the provided text are 1."
    short = "Which colour is the door?\nIt is"
    assert end_at_cue("red. It is red.", short) == "red. It is red."
    tok = char_tokenizer()
    ids = lambda s: torch.tensor([tok(s, add_special_tokens=False)["input_ids"]])
    stop = LoopStop(tok, prompt_len=ids("x: ").shape[1], cue="What is the code?\nThe code of the vault is")
    assert not stop(ids("x: 4417. The code of the vault i"), None).item()
    assert stop(ids("x: 4417. The code of the vault is"), None).item()


def _always(model, token: int) -> None:
    """Make the backbone's head always prefer `token`: its greedy answers are that token repeated."""
    head = model.backbone.lm_head
    fixed = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        fixed.weight.zero_()
        fixed.bias.zero_()
        fixed.bias[token] = 10.0
    model.backbone.lm_head = fixed


def test_ask_and_baselines_stop_at_a_loop_and_say_so():
    """A backbone whose greedy answer is "1111…": ask stops after the loop shows (not at the
    token budget) and returns one "1" with loop_cut True; a LongDocQA baseline answer does the
    same; without the loop, nothing is cut."""
    from memformer.qa import longdoc as qa
    torch.manual_seed(0)
    tok = char_tokenizer()
    model = MemformerForCausalLM(tiny_backbone("llama"), tok,
                                 MemoryConfig(window=64, sink_tokens=2, overlap=8, block_size=16, question_blocks=2),
                                 embedder=HashedWords(256))
    model.memorize(TEXT, show_progress=False)
    one = tok("1", add_special_tokens=False)["input_ids"][0]
    _always(model, one)
    steps = []
    real = model.backbone.forward
    model.backbone.forward = lambda *a, **kw: steps.append(1) or real(*a, **kw)
    out = model.ask(cue="The river is", max_new_tokens=80, return_dict=True)
    # stopped at 8 repeats, not at 80 (the candidate checks before it take 4 steps each)
    assert out.loop_cut and out.text == "1" and len(steps) < 40
    assert out.read_answers == ["1"] and out.read_loops == [True]
    assert model.ask(cue="The river is", max_new_tokens=80) == "1"
    ctx = qa.prepare(model, [TEXT], "truncate", show_progress=False)
    ans = qa.answer(model, ctx, cue="The river is", max_new_tokens=80, evidence=0)
    assert ans.loop_cut and ans.text == "1"
    short = model.ask(cue="The river is", max_new_tokens=5, return_dict=True)   # 5 ones: no loop yet
    assert short.text == "11111" and not short.loop_cut


def test_several_reads_answer_one_item_each_and_so_do_not_loop(monkeypatch):
    """A backbone whose greedy answer lists one item on line after line ("7\n7\n7…"): a question
    answered from one read loops and is cut back; a cue's answer ends with its first item, and
    when several reads answer, each stops at the end of its first item, before any loop, and the
    distinct items are joined."""
    import memformer.model as model_module
    from transformers import LogitsProcessor, LogitsProcessorList
    torch.manual_seed(0)
    tok = char_tokenizer()
    seven, newline = (tok(c, add_special_tokens=False)["input_ids"][0] for c in ("7", "\n"))

    class SevenPerLine(LogitsProcessor):
        def __call__(self, input_ids, scores):
            forced = torch.full_like(scores, -1e9)
            forced[:, newline if input_ids[0, -1].item() == seven else seven] = 0.0
            return forced

    model = MemformerForCausalLM(tiny_backbone("llama"), tok,
                                 MemoryConfig(window=64, sink_tokens=2, overlap=8, block_size=16, question_blocks=2,
                                              answer_reads=2),
                                 embedder=HashedWords(256))
    model.backbone.generation_config.eos_token_id = tok.eos_token_id   # (LlamaConfig's default 2 is "\n" here)
    model.memorize(TEXT, show_progress=False)
    listing = dict(max_new_tokens=40, return_dict=True, logits_processor=LogitsProcessorList([SevenPerLine()]))
    one = model.ask("Where is the river?", **dict(listing))
    assert one.reads == 1 and one.loop_cut and one.text == "7"          # "7\n7\n7": a line listed three times
    steps = []
    real = model.backbone.forward
    model.backbone.forward = lambda *a, **kw: steps.append(1) or real(*a, **kw)
    cued = model.ask(cue="The river is", **dict(listing))
    model.backbone.forward = real
    assert cued.reads == 1 and cued.text == "7" and not cued.loop_cut and cued.read_loops == [False]
    assert len(steps) <= 2 + 1                      # the check's forward, then "7" and "\n": no third line

    def two_close_reads(m, candidates, source, prompt_ids, weight=1.0, keep=1):
        return [(b, -0.1 * i) for i, (b, _) in enumerate(candidates)] + [([], -5.0)] * 10, None
    monkeypatch.setattr(model_module, "checked_reads", two_close_reads)
    two = model.ask(cue="The river is", **dict(listing))
    assert two.reads == 2 and two.read_answers == ["7", "7"] and two.read_loops == [False, False]
    assert two.text == "7" and not two.loop_cut


def test_a_cues_answer_starts_under_the_pointer_from_the_checks_shares():
    """The check's forward over the prompt but its last token keeps each read's copy-pointer shares
    with its cache ({layer: [K, Hq, R]}); keep_row / stack_rows cut and stack them with the rows; a
    read's row in the padded batch holds its shares alone read, in the last columns. `generate`
    continuing such a cache points the prompt's last token (the answer's first step) from them, so
    that step's logits change, and without them it is the unpointed step; `ask` keeps them for a
    cue (a recorded answer runs the prompt but its last token again, recorded, and starts from
    the same shares) and drops them for a question."""
    from memformer.blocks import seeded_pointers
    from memformer.question_reads import candidate_reads, keep_row, stack_rows
    torch.manual_seed(0)
    tok = char_tokenizer()
    cfg = MemoryConfig(window=64, sink_tokens=2, overlap=8, block_size=16, question_blocks=2, answer_reads=2)
    model = MemformerForCausalLM(tiny_backbone("llama"), tok, cfg, embedder=HashedWords(256))
    model.memorize(TEXT, show_progress=False)
    prompt = model.questions.prompt_ids(None, cue="The river is")                       # [1, T]
    Hq, bs = model.config.num_attention_heads, cfg.block_size
    with torch.no_grad():
        cache, _ = candidate_reads(model, [[0, 1], [2], [3, 4]], "own", prompt)
        alone, _ = candidate_reads(model, [[2]], "own", prompt)
    shares = cache.memformer_pointer
    assert sorted(shares) == sorted(model.memory_modules)
    assert all(s.shape == (3, Hq, 2 * bs) for s in shares.values())
    for i, s in shares.items():
        torch.testing.assert_close(s[1, :, -bs:], alone.memformer_pointer[i][0], atol=1e-5, rtol=1e-5)
        assert float(s[1, :, :bs].abs().sum()) == 0.0                      # the padding's columns
        torch.testing.assert_close(keep_row(cache, 2).memformer_pointer[i], s[2:3])
        stacked = stack_rows([keep_row(cache, 2), keep_row(cache, 0)]).memformer_pointer[i]
        torch.testing.assert_close(stacked, torch.cat([s[2:3], s[0:1]]))
        torch.testing.assert_close(seeded_pointers(3.0, {i: s}, bs)[i].share, s[..., -bs:])
    assert seeded_pointers(3.0, shares, 3 * bs) == {}                      # shares of fewer rows: none

    def first_logits(row_cache):
        with torch.no_grad(), model.reading_blocks([3, 4]):
            out = model.generate(prompt, cache=row_cache, max_new_tokens=1, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True)
        return out.logits[0]
    seeded, bare = keep_row(cache, 2), keep_row(cache, 2)
    bare.memformer_pointer = None
    with torch.no_grad(), model.reading_blocks([3, 4]):
        fresh = model.generate(prompt, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                               output_logits=True).logits[0]
    torch.testing.assert_close(first_logits(bare), fresh, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(first_logits(seeded), fresh, atol=1e-4)

    seen = []
    real = model.generate
    model.generate = lambda *a, **kw: seen.append(getattr(kw.get("cache", kw.get("past_key_values")),
                                                          "memformer_pointer", None)) or real(*a, **kw)
    model.ask(cue="The river is", max_new_tokens=2)
    recorded = model.ask(cue="The river is", max_new_tokens=2, record=True)      # runs the prompt again, recorded
    model.ask("Where is the river?", max_new_tokens=2)
    model.ask("Where is the river?", max_new_tokens=2, record=True)
    model.generate = real
    assert seen[0] is not None and seen[1] is not None and seen[2] is None and seen[3] is None
    for i in shares:
        torch.testing.assert_close(seen[1][i], seen[0][i], atol=1e-5, rtol=1e-5)  # the check's shares, again
    assert recorded == model.ask(cue="The river is", max_new_tokens=2) and model.recorded_reads()


def test_cue_pointer_ab_reports_both_answers_and_refuses_unknown_variants(capsys):
    """benchmarks/cue_pointer_ab.py: the table sums each side's scores per variant and counts the
    answers that changed, listing them; an unknown variant is a usage error before any model loads."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import cue_pointer_ab
    import memformer.model as modeling

    rec = lambda v, exp, off, on, a, b: dict(variant=v, length=32768, seed=1, cue="c", expected=[exp], without=off,
                                            with_seed=on, score_without=a, score_with=b)
    text = cue_pointer_ab.report([rec("single-word", "zebra", "ze.", "zebra.", 0.0, 1.0),
                                  rec("single-word", "candle", "candle.", "candle.", 1.0, 1.0),
                                  rec("multikey", "2057699", "2057699.", "2057699.", 1.0, 1.0)], "cmd", 1.0)
    assert "| single-word | 32k | 1 | 2 | 1 | 2 | 1 |" in text and "| multikey | 32k | 1 | 1 | 1 | 1 | 0 |" in text
    assert "| single-word | zebra | 'ze.' | 'zebra.' |" in text and "candle." not in text.split("changed:")[1]
    with pytest.raises(SystemExit) as exit_:
        cue_pointer_ab.main(["--variants", "single-wrod", "--out", "x"])
    assert exit_.value.code == 2 and "single-wrod" in capsys.readouterr().err
    shipped = modeling.seeded_pointers

    class Model:                                        # ask sees no seed inside the first call only
        def ask(self, cue, max_new_tokens):
            return "off" if modeling.seeded_pointers(1.0, {1: torch.zeros(1, 1, 4)}, 4) == {} else "on"
    assert cue_pointer_ab.ask_both(Model(), "c", 4) == ("off", "on") and modeling.seeded_pointers is shipped


def test_restates_cue_and_the_cue_word_bar():
    """restates_cue: words all of the cue, two of them in a row as the cue has them (a phrase said
    back); one word, or a new word, is an answer. CueWordBar bars the first token of each cue word
    (as written, after a space, capitalized) until the generated text holds a letter or digit."""
    from memformer.decoding import CueWordBar, restates_cue
    cue = "The special magic numbers for boundless-strawberry, helpless-bunghole and decisive-retreat are"
    for said_back in (":\n\n* boundless-strawberry", "* Boundless-strawberry, helpless-bunghole", "magic numbers"):
        assert restates_cue(said_back, cue), said_back
    for answer in (": 7500249.", "* boundless-strawberry: 7500249", "strawberry", "", "closed.",
                   "strawberry boundless"):
        assert not restates_cue(answer, cue), answer
    assert not restates_cue("river is", None)
    choice = "Which door did she open, the red door or the blue door? She opened"
    for answer in ("the red door.", "The blue door", "red door", "blue door"):     # a choice offered: answers
        assert not restates_cue(answer, choice), answer
    for said_back in ("the red door or the blue door", "she opened", "door did she open", "blue door she"):
        assert restates_cue(said_back, choice), said_back
    tok = char_tokenizer()
    ids = lambda s: torch.tensor([tok(s, add_special_tokens=False)["input_ids"]])
    bar = CueWordBar(tok, "The river is", prompt_len=ids("x:").shape[1])
    letter = lambda c: tok(c, add_special_tokens=False)["input_ids"][0]
    assert {letter("r"), letter("R"), letter("i"), letter("I"), letter("T")} <= set(bar.barred)
    assert letter("7") not in bar.barred and letter(" ") not in bar.barred
    scores = torch.zeros(2, len(tok))
    out = bar(torch.cat([ids("x: \n"), ids("x:7 r")[:, :4]]), scores.clone())
    assert out[0, letter("r")] == float("-inf") and out[0, letter("7")] == 0     # nothing said yet: barred
    assert (out[1] == 0).all()                                                   # "7" said: free


class _SaysCueBack:
    """A logits processor that makes greedy answers say "river is." (a phrase of the cue "The river
    is") unless its first "r" is barred, then "7."; each line ends the item. first="7": "7." at once."""

    def __init__(self, tok, first: str = "r"):
        self.tok, self.first, self.start, self.last = tok, first, None, None
        self.id = lambda c: tok(c, add_special_tokens=False)["input_ids"][0]

    def __call__(self, input_ids, scores):
        if self.last is None or input_ids.shape[1] <= self.last:            # a new generate call
            self.start = input_ids.shape[1]
        self.last = input_ids.shape[1]
        forced = torch.full_like(scores, -1e9)
        for row, ids in enumerate(input_ids[:, self.start:].tolist()):
            said = self.tok.decode(ids)
            if not said:
                forced[row, self.id("r")], forced[row, self.id("7")] = (0.0, -1.0) if self.first == "r" else (-1.0, 0.0)
            else:
                target = ("river is." if said.startswith("r") else "7.") + "\n"
                forced[row, self.id(target[len(said)] if len(said) < len(target) else "\n")] = 0.0
        return forced


def test_ask_answers_again_a_read_that_says_its_cue_back(monkeypatch):
    """A cue's answer that only says a phrase of the cue back ("river is.") is answered again with
    the cue's words barred from its first word ("7."): from one read, recorded (its evidence
    from the second answer alone), and from several reads side by side; a question's answer, and
    one that names an alternative the cue offers, are kept as they are."""
    import memformer.model as model_module
    from transformers import LogitsProcessorList
    torch.manual_seed(0)
    tok = char_tokenizer()
    model = MemformerForCausalLM(tiny_backbone("llama"), tok,
                                 MemoryConfig(window=64, sink_tokens=2, overlap=8, block_size=16, question_blocks=2,
                                              answer_reads=2),
                                 embedder=HashedWords(256))
    model.backbone.generation_config.eos_token_id = tok.eos_token_id
    model.memorize(TEXT, show_progress=False)
    rig = lambda: dict(max_new_tokens=20, return_dict=True, logits_processor=LogitsProcessorList([_SaysCueBack(tok)]))
    one = model.ask(cue="The river is", **rig())
    assert one.reads == 1 and one.text == "7." and one.read_answers == ["7."]
    recorded = model.ask(cue="The river is", record=True, **rig())
    assert recorded.text == "7."
    with_retry = {layer: len(r) for layer, r in model.recorded_reads().items()}
    direct = model.ask(cue="The river is", record=True, max_new_tokens=20, return_dict=True,   # "7." at once
                       logits_processor=LogitsProcessorList([_SaysCueBack(tok, first="7")]))
    assert direct.text == "7."
    assert {layer: len(r) for layer, r in model.recorded_reads().items()} == with_retry
    question = model.ask("Where is the river?", **rig())
    assert question.text == "river is."                            # a question has no cue to say back
    choice = model.ask(cue="Was it the lake or the river is? It was", **rig())
    assert choice.text == "river is."                              # an alternative the cue offers: kept

    def two_close_reads(m, candidates, source, prompt_ids, weight=1.0, keep=1):
        return [(b, -0.1 * i) for i, (b, _) in enumerate(candidates)] + [([], -5.0)] * 10, None
    monkeypatch.setattr(model_module, "checked_reads", two_close_reads)
    two = model.ask(cue="The river is", **rig())
    assert two.reads == 2 and two.read_answers == ["7.", "7."] and two.text == "7."


def test_dotted_values_benchmark_plants_every_fact_and_reports_whole_values(tmp_path):
    """benchmarks/dotted_values.py: each fact's cue is its sentence up to the value, the value holds
    a point, the document plants every sentence (Python's docs or a haystack file), and the table
    counts an answer right only when it states the whole value, not a longer number; --rescore
    scores stored answers again."""
    import json
    import sys
    from argparse import Namespace
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import dotted_values
    from memformer.qa.demo import PlantedFact
    for name, facts in dotted_values.FACT_SETS.items():
        for sentence, question, value, cue in facts:
            assert sentence.startswith(cue + " " + value) and "." in value and question.endswith("?"), (name, sentence)
        assert len({v for _, _, v, _ in facts}) == len(facts)
    assert not {v for *_, v, _ in dotted_values.FACT_SETS["dev"]} & {v for *_, v, _ in dotted_values.FACT_SETS["heldout"]}
    tok = char_tokenizer()
    facts = [PlantedFact((k + 0.5) / 3, *f) for k, f in enumerate(dotted_values.FACT_SETS["heldout"][:3])]
    hay = tmp_path / "hay.txt"
    hay.write_text("\n\n".join(f"Paragraph {i} of the haystack." for i in range(200)))
    for path in (None, str(hay)):
        doc = dotted_values.haystack_document(tok, 3000, facts, path)
        assert all(f.sentence in doc for f in facts)
        assert ("Paragraph 3 of" in doc) == (path is not None)
    rows = [dict(value="10.8.0.254", cue_answer="10.8.0.1.", cue_ok=False, question_answer="It is 10.8.0.254.",
                 question_ok=True)]
    text = dotted_values.report({"default": rows}, Namespace(facts="dev", haystack=None, tokens="16k"), 1.0)
    assert "| default | 0/1 | 1/1 |" in text and "'10.8.0.1.'" in text
    holds = dotted_values.holds_value
    assert holds("It is 10.8.0.254.", "10.8.0.254") and holds("10.8.0.254 at noon", "10.8.0.254")
    for longer in ("10.8.0.2541", "10.8.0.254.1", "110.8.0.254", "10.8.0.25"):
        assert not holds(longer, "10.8.0.254"), longer
    out = tmp_path / "run"
    out.mkdir()
    (out / "dotted_values.json").write_text(json.dumps(dict(
        settings=dict(facts="dev", haystack=None, tokens="16k"), seconds=5.0,
        results={"default": [dict(rows[0], cue_answer="10.8.0.254.1", cue_ok=True)]})))
    assert dotted_values.main(["--rescore", "--out", str(out)]) == 0
    with pytest.raises(SystemExit) as exit_:                        # nothing stored there: a usage error
        dotted_values.main(["--rescore", "--out", str(tmp_path / "none")])
    assert exit_.value.code == 2
    assert "| default | 0/1 | 1/1 |" in (out / "dotted_values.md").read_text()
