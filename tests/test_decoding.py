"""Answers stop at a degenerate loop (memformer.decoding): the check, the cut, the stopping
criterion, and ask / LongDocQA answers on a tiny model whose greedy output loops."""
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
