"""Questions answered from an attached corpus memory alone (`model.attach_corpus`), with no
document of their own: `memformer qa --corpus docs.mem -q ...`."""
from __future__ import annotations

import time

from memformer.qa.longdoc import Answer


class CorpusQA:
    """Questions answered from an attached corpus memory alone (`model.attach_corpus`), no
    document of their own: the local window holds only the question, and every memory layer reads
    the corpus blocks under the passages nearest to it, through `model.ask` as every question
    read runs (kNN reads for a corpus built without passages); mode "memory" only.
    `answer` returns an `Answer` whose `corpus_evidence` names the documents drawn on."""

    def __init__(self, model):
        if not model.state.corpus_documents:
            raise ValueError("CorpusQA needs a corpus memory attached (model.attach_corpus(path))")
        if model.tokenizer is None:
            raise ValueError("CorpusQA needs a model with a tokenizer")
        self.model = model

    def answer(self, question: str | None = None, *, cue: str | None = None, mode: str = "memory",
               max_new_tokens: int = 48, evidence: int = 3) -> Answer:
        if mode != "memory":
            raise ValueError(f"a corpus memory alone answers in mode 'memory' only, not {mode!r} "
                             f"(the baselines need the documents: give them with --doc)")
        if not (question and question.strip()) and not (cue and cue.strip()):
            raise ValueError("give a question or a cue")
        model, t0 = self.model, time.perf_counter()
        # `ask`: question reads of the corpus blocks under the passages nearest to the cue (or
        # question), checked by the memory layers, with its loop stop and answer reads
        out = model.ask(question, cue=cue, max_new_tokens=max_new_tokens, record=evidence > 0, return_dict=True)
        ans = Answer("memory", out.text, prompt_tokens=model.questions.prompt_ids(question, cue=cue).shape[1],
                     loop_cut=out.loop_cut, reads=out.reads, read_answers=out.read_answers,
                     read_loops=out.read_loops)
        if evidence > 0:
            ans.corpus_evidence = model.corpus_evidence(top=evidence)
            model.clear_recorded_reads()
        ans.seconds = time.perf_counter() - t0
        return ans
