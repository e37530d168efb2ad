"""Long-document QA in a few lines: memorize a document once, ask questions from memory.

    .venv/bin/python examples/long_doc_qa.py path/to/book.txt "Who wrote the preface?"
    .venv/bin/python examples/long_doc_qa.py            # Python's docs with planted facts
"""
import sys

from memformer import MemformerForCausalLM, MemoryConfig
from memformer.qa import DEMO_FACTS, demo_document, read_document

model = MemformerForCausalLM.from_pretrained(None, MemoryConfig(window=1024, top_k=32))
if len(sys.argv) > 2:
    document, questions = read_document(sys.argv[1]), sys.argv[2:]
else:
    document, questions = demo_document(model.tokenizer, 8192), [f.question for f in DEMO_FACTS]

model.memorize(document)                       # windows of 1024 tokens -> memory, with a progress bar
for q in questions:
    print(f"Q: {q}\nA: {model.ask(q)}\n")
