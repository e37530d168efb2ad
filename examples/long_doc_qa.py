"""Long-document QA in a few lines: memorize documents once, answer from memory, show the evidence.

    .venv/bin/python examples/long_doc_qa.py book.txt notes.md -q "Who wrote the preface?"
    .venv/bin/python examples/long_doc_qa.py            # Python's docs with three planted facts

Memory answers are `model.ask`: the trained memory layers shipped with the default backbone read
the memory blocks under the passages nearest the question. Each is shown beside the truncation (last window only) and RAG (retrieved
passages instead of memory) baselines.
"""
import argparse
from pathlib import Path

from memformer import MemformerForCausalLM
from memformer.qa.demo import DEMO_FACTS, demo_document
from memformer.qa.longdoc import Document, LongDocQA

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("docs", nargs="*", type=Path, help="text/Markdown files (default: the demo document)")
parser.add_argument("-q", "--question", action="append", default=[])
args = parser.parse_args()

model = MemformerForCausalLM.from_pretrained()      # default backbone + its trained sparse memory
if args.docs:
    docs, asks = args.docs, [(q, None) for q in args.question]
else:
    docs = [Document("python-docs", demo_document(model.tokenizer, 8192))]
    asks = [(f.question, f.cue) for f in DEMO_FACTS]     # a 135M model completes cues far better

qa = LongDocQA(model).read(docs, cache_dir=Path.home() / ".cache" / "memformer" / "memories")
modes = ["memory", "truncate", "rag"]
for question, cue in asks:
    print(f"\nQ: {question}" + (f"  (asked as: {cue} ...)" if cue else ""))
    for mode, ans in qa.ask(question, cue=cue, modes=modes, max_new_tokens=24).items():
        print(f"  {mode:9} {' '.join(ans.text.split())[:120]}")
        for span in ans.evidence[:2]:
            print(f"            evidence: {span.document} chars {span.start}-{span.end}: "
                  f"{' '.join(span.text.split())[:100]}")
