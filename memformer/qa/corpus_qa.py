"""Questions answered from an attached corpus memory alone (`model.attach_corpus`), with no
document of their own: `memformer qa --corpus docs.mem -q ...`."""
from __future__ import annotations

import time

import torch

from memformer.qa.longdoc import Answer


class CorpusQA:
    """Questions answered from an attached corpus memory alone (`model.attach_corpus`), no
    document of their own: the local window holds only the question, and every memory layer reads
    the corpus blocks under the passages nearest to it (`model.question_read`; kNN reads for a
    corpus built without passages); mode "memory" only.
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
        x = (torch.tensor([model.tokenizer(cue, add_special_tokens=False)["input_ids"]]) if cue
             else model.questions.chat_ids(question))                                  # [1, T]
        # question reads: the corpus blocks under the passages nearest to the cue (or question)
        with model.question_read(cue if cue else question, prompt_ids=x):
            out = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False, record=evidence > 0)
        ans = Answer("memory", model.tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True).strip(),
                     prompt_tokens=x.shape[1])
        if evidence > 0:
            ans.corpus_evidence = model.corpus_evidence(top=evidence)
            model.clear_recorded_reads()
        ans.seconds = time.perf_counter() - t0
        return ans
