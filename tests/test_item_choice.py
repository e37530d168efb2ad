"""An answer's first content token chosen by the item it begins (memformer.item_choice): the
helpers, and `ask` on a tiny model whose scores a processor sets, through both of its paths (one
read, several reads side by side), recorded or not."""
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from conftest import HashedWords, tiny_backbone
from memformer import MemformerForCausalLM, MemoryConfig
from memformer import item_choice
from memformer.item_choice import content_step, ended, item_score, mean_logp, runner_ups
from test_qa import char_tokenizer

TEXT = " ".join(["river stone cloud maple lantern copper meadow harbor"] * 8)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_content_step_runner_ups_and_mean_logp():
    tok = char_tokenizer()
    assert content_step(tok, ids_of(tok, " :7.")) == 2
    assert content_step(tok, ids_of(tok, " :.")) is None and content_step(tok, []) is None
    one, three, dot, space = (ids_of(tok, c)[0] for c in "13. ")
    logp = torch.full((len(tok),), -20.0)
    logp[[one, three, dot, space]] = torch.tensor([-0.9, -1.2, -1.0, -1.1])
    # within 1 nat of "1": "3" (a digit); "." and " " hold no letter or digit
    assert runner_ups(logp, one, tok) == [three]
    assert runner_ups(logp, one, tok, margin=0.2) == []
    assert runner_ups(logp, one, tok, n=0) == []
    logp[ids_of(tok, "a")[0]] = -1.5
    assert runner_ups(logp, one, tok) == [three, ids_of(tok, "a")[0]]
    assert runner_ups(logp, one, tok, n=1) == [three]
    steps = [torch.log_softmax(torch.tensor([0.0, 1.0, 2.0]), -1)] * 2
    assert mean_logp(steps, [2, 0]) == pytest.approx(float(steps[0][2] + steps[0][0]) / 2)
    assert mean_logp([], []) == float("-inf")


def test_item_score_counts_the_item_given_and_never_prefers_a_loop():
    tok = char_tokenizer()
    ids = ids_of(tok, "42. If")
    logps = [torch.full((len(tok),), -3.0) for _ in ids]
    for j, t in enumerate(ids[:3]):
        logps[j][t] = -0.5                            # "42." at -0.5 a token, " If" at -3
    assert item_score(tok, logps, ids, one_item=True) == pytest.approx(-0.5)       # the item "42." alone
    assert item_score(tok, logps, ids, one_item=False) == pytest.approx((3 * -0.5 + 3 * -3.0) / 6)
    count = ids_of(tok, "1, 2, 3, 4, 5, 6")
    sure = [torch.zeros(len(tok)) for _ in count]
    assert item_score(tok, sure, count, one_item=True) == float("-inf")


def test_ended_is_short_of_the_limit_or_at_the_end_of_sequence():
    assert ended([5, 6], 3) and not ended([5, 6, 7], 3)
    assert ended([5, 6, 7], 3, {7}) and not ended([], 0)


class SureOfThree(LogitsProcessor):
    """Scores by what was generated after the prompt: the first token "1" (-0.9) or "3" (-1.2);
    after "1", "." (-1.0) then a line break; after "3", "33." for sure, then a line break; after a
    line break, the end of text."""

    def __init__(self, tok, prompt_len: int):
        self.tok, self.prompt_len = tok, prompt_len
        self.ids = {c: ids_of(tok, c)[0] for c in "13.\nab"}

    def _set(self, row: torch.Tensor, scores: dict) -> None:
        row.fill_(-30.0)
        for token, logp in scores.items():
            row[token] = logp

    def __call__(self, input_ids, scores):
        out = torch.empty_like(scores)
        i = self.ids
        for r in range(input_ids.shape[0]):
            text = self.tok.decode(input_ids[r, self.prompt_len:].tolist())
            if text == "":
                self._set(out[r], {i["1"]: -0.9, i["3"]: -1.2, i["a"]: -1.4})
            elif text == "1":
                self._set(out[r], {i["."]: -1.0, i["a"]: -1.2, i["b"]: -1.3})
            elif text in ("3", "33"):
                self._set(out[r], {i["3"]: 0.0})
            elif text == "333":
                self._set(out[r], {i["."]: 0.0})
            elif text.endswith("\n"):
                self._set(out[r], {self.tok.eos_token_id: 0.0})
            else:
                self._set(out[r], {i["\n"]: 0.0})
        return out.log_softmax(-1)


def tiny_memory_model(answer_reads: int = 1) -> MemformerForCausalLM:
    torch.manual_seed(0)
    tok = char_tokenizer()
    model = MemformerForCausalLM(tiny_backbone("llama"), tok,
                                 MemoryConfig(window=64, sink_tokens=2, overlap=8, block_size=16, question_blocks=2,
                                              answer_reads=answer_reads),
                                 embedder=HashedWords(256))
    model.backbone.generation_config.eos_token_id = tok.eos_token_id
    model.memorize(TEXT, show_progress=False)
    return model


def asked(model, question=None, cue=None, **kw) -> str:
    x = model.questions.prompt_ids(question, cue=cue)
    prompt_len = model.state.with_sink(x, model.memory_config.sink_tokens).shape[1]
    procs = LogitsProcessorList([SureOfThree(model.tokenizer, prompt_len)])
    return model.ask(question, cue=cue, max_new_tokens=12, logits_processor=procs, **kw)


@pytest.mark.parametrize("record", [False, True])
def test_ask_keeps_the_runner_up_whose_item_is_surer(record, monkeypatch):
    """Greedy gives "1." (mean log-probability -0.63 per token); the runner-up "3" within 1 nat
    goes on "333." for sure (-0.24): `ask` answers "333.", from one read (a question, a cue) and
    from several side by side; without runner-ups it answers greedily."""
    model = tiny_memory_model()
    assert asked(model, "Where is the river?", record=record) == "333."
    assert asked(model, cue="The river is", record=record) == "333."
    if record:
        assert model.recorded_reads()                 # the reads of the answer kept
    several = tiny_memory_model(answer_reads=2)
    monkeypatch.setattr("memformer.model.answer_reads", lambda scored, limit: [b for b, _ in scored[:limit]])
    out = asked(several, "Where is the river?", record=record, return_dict=True)
    assert out.reads == 2 and out.read_answers == ["333.", "333."] and out.text == "333."
    monkeypatch.setattr(item_choice, "ITEM_ALTERNATIVES", 0)
    assert asked(model, "Where is the river?", record=record) == "1."
    assert asked(several, "Where is the river?", record=record) == "1."


class EndlessThree(SureOfThree):
    """As `SureOfThree`, but after "3" the runner-up spells PI for sure, then a line break: an
    item that ends only after len(PI) tokens."""
    PI = "3.14159265358979323846"

    def __call__(self, input_ids, scores):
        out = super().__call__(input_ids, scores)
        for r in range(input_ids.shape[0]):
            text = self.tok.decode(input_ids[r, self.prompt_len:].tolist())
            if text.startswith("3") and not text.endswith("\n"):
                nxt = self.PI[len(text)] if len(text) < len(self.PI) and self.PI.startswith(text) else "\n"
                out[r].fill_(-30.0)
                out[r, self.tok(nxt, add_special_tokens=False)["input_ids"][0]] = 0.0
        return out.log_softmax(-1)


def test_a_runner_up_cut_by_the_token_limit_never_wins():
    """The runner-up "3" goes on "3.14159…" for sure: likelier per token than greedy's "1.", but
    with fewer new tokens than it needs to end, its item has no whole score and greedy stays."""
    model = tiny_memory_model()
    x = model.questions.prompt_ids("Where is the river?")
    prompt_len = model.state.with_sink(x, model.memory_config.sink_tokens).shape[1]
    procs = LogitsProcessorList([EndlessThree(model.tokenizer, prompt_len)])
    assert model.ask("Where is the river?", max_new_tokens=12, logits_processor=procs) == "1."
    assert model.ask("Where is the river?", max_new_tokens=40, logits_processor=procs) == EndlessThree.PI


def test_a_runner_up_item_is_what_generating_it_alone_gives(monkeypatch):
    """The runner-up's item is continued under the same read as the greedy answer: forcing its
    first token (greedy with every other token of the first step barred) gives the same answer."""
    model = tiny_memory_model()
    monkeypatch.setattr(item_choice, "ITEM_MARGIN", 5.0)      # any first-step token of the tiny model is a runner-up
    monkeypatch.setattr(item_choice, "ITEM_ALTERNATIVES", 1)
    monkeypatch.setattr("memformer.model.ended", lambda *a: True)   # a random model's items seldom end in 6 tokens
    seen = []
    real = model._item_choice

    def spy(x, blocks, source, cache, ids, logps, *a, **kw):
        better = real(x, blocks, source, cache, ids, logps, *a, **kw)
        seen.append((ids, runner_ups(logps[content_step(model.tokenizer, ids)], ids[content_step(model.tokenizer, ids)],
                                     model.tokenizer), better))
        return better
    model._item_choice = spy
    answer = model.ask("Where is the river?", max_new_tokens=6)
    (greedy, alts, better), = seen
    assert len(alts) == 1
    monkeypatch.setattr(item_choice, "ITEM_ALTERNATIVES", 0)
    s = content_step(model.tokenizer, greedy)

    class Force(LogitsProcessor):
        def __init__(self):
            self.step = 0

        def __call__(self, input_ids, scores):
            if self.step == s:
                keep = scores[:, alts[0]].clone()
                scores = torch.full_like(scores, -float("inf"))
                scores[:, alts[0]] = keep
            self.step += 1
            return scores
    forced = model.ask("Where is the river?", max_new_tokens=6, logits_processor=LogitsProcessorList([Force()]))
    if better is None:
        assert answer == model.tokenizer.decode(greedy, skip_special_tokens=True).strip()
    else:
        assert answer == forced


def test_each_choice_is_logged_at_debug(caplog):
    """With `memformer.model` at DEBUG, a choice logs its answers, the runner-up cut by the limit
    and the winner."""
    model = tiny_memory_model()
    x = model.questions.prompt_ids("Where is the river?")
    prompt_len = model.state.with_sink(x, model.memory_config.sink_tokens).shape[1]
    procs = LogitsProcessorList([EndlessThree(model.tokenizer, prompt_len)])
    with caplog.at_level("DEBUG", logger="memformer.model"):
        model.ask("Where is the river?", max_new_tokens=12, logits_processor=procs)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("item choice")]
    assert "(cut by the limit)" in line and line.endswith("-> greedy")
