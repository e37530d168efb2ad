"""Dev-split diagnostic: per candidate read, cosine / generated log-prob / prompt token log-probs,
and whether the read's continuation holds an expected value."""
import json, sys, torch
from memformer import MemformerForCausalLM
from memformer.eval import ruler
from memformer.qa import longdoc as qa
from memformer.memory_layer import memory_pass
from memformer.question_reads import read_query
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
seeds = [int(s) for s in sys.argv[1].split(",")]
out = open(sys.argv[2], "a")
model = MemformerForCausalLM.from_pretrained()
name, text = ruler.haystack_text(None)
essay = ruler.essay_words(text)
tasks = ["niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multivalue", "niah_multiquery"]
for seed in seeds:
    for task in tasks:
        for i in range(3):
            s = ruler.make_sample(model.tokenizer, task, 16384, ruler.trial_rng(seed, task, 16384, i), essay, i)
            ctx = qa.prepare(model, [s.document], "memory", show_progress=False, cache_dir="runs/ruler_cache")
            x = model.questions.prompt_ids(None, cue=s.cue)                      # [1, T]
            cands, source = model.questions.candidates(read_query(None, s.cue), 4)
            rows = []
            for blocks, cos in cands:
                with model.reading_blocks(blocks, source):
                    xs = model.state.with_sink(x, model.memory_config.sink_tokens)
                    S = xs.shape[1] - x.shape[1]
                    with memory_pass(model.runtime, model.memory_modules, read=True, write=False):
                        logits = model.backbone(input_ids=xs, attention_mask=torch.ones_like(xs), use_cache=False).logits
                    lp = torch.log_softmax(logits[0].float(), -1)                  # [S+T, V]
                    tok = [lp[S + t - 1, x[0, t]].item() for t in range(1, x.shape[1])]
                    g = model.generate(x, max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
                glp = [torch.log_softmax(sc[0].float(), -1).max().item() for sc in g.scores[:4]]
                ans = model.tokenizer.decode(g.sequences[0, x.shape[1]:], skip_special_tokens=True)
                rows.append(dict(blocks=blocks, cos=cos, gen=sum(glp) / len(glp), prompt=tok, answer=ans,
                                 hit=ruler.string_match_all(ans, s.expected) > 0 or any(e in ans for e in s.expected)))
            rec = dict(seed=seed, task=task, index=i, expected=s.expected, cue=s.cue,
                       cue_tokens=[model.tokenizer.decode([t]) for t in x[0, 1:].tolist()], cands=rows)
            out.write(json.dumps(rec) + "\n"); out.flush()
            print(seed, task, i, [(round(r["cos"], 3), round(r["gen"], 2), round(sum(r["prompt"]), 1), r["hit"]) for r in rows], flush=True)
