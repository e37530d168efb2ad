"""Check scores of all candidates: dev RULER samples (seed 1000, 16k) and absent-fact cues."""
import json, sys, torch
torch.set_num_threads(1)
from memformer import MemformerForCausalLM
from memformer.eval import ruler
from memformer.qa import longdoc as qa
from memformer.question_reads import checked_reads, read_query
from memformer.qa.demo import python_docs_text

model = MemformerForCausalLM.from_pretrained()
name, text = ruler.haystack_text(None)
essay = ruler.essay_words(text)
out = []
def probe(tag, query_cue):
    x = model.questions.prompt_ids(None, cue=query_cue)
    cands, source = model.questions.candidates(read_query(None, query_cue))
    scored, _ = checked_reads(model, cands, source, x)
    s = [round(v, 3) for _, v in scored]
    print(tag, s, flush=True)
    out.append(dict(tag=tag, scores=s))
for task in ["niah_multivalue", "niah_multiquery", "niah_single_2", "niah_multikey_1", "vt"]:
    for i in range(2):
        sample = ruler.make_sample(model.tokenizer, task, 16384, ruler.trial_rng(1000, task, 16384, i), essay, i)
        qa.prepare(model, [sample.document], "memory", show_progress=False, cache_dir="runs/ruler_cache")
        probe(f"{task}/{i}", sample.cue)
model.reset_memory()
model.memorize(python_docs_text()[:12000], show_progress=False)
for cue in ("The secret code of the red vault is", "The special magic number for tidy-violin is"):
    probe("absent/" + cue, cue)
json.dump(out, open("runs/score_probe.json", "w"), indent=1)
