"""The bundled demo document: Python's own documentation (`pydoc_data.topics`, present on every
Python install) with a few facts planted at chosen depths (`make demo`, `memformer qa --demo`)."""
from __future__ import annotations

from dataclasses import dataclass

from memformer.loading import encode_text


@dataclass
class PlantedFact:
    depth: float          # where in the document, 0..1
    sentence: str         # what is planted
    question: str
    answer: str           # expected substring of a correct answer
    cue: str              # the same question as a sentence to complete (what the demo asks)


DEMO_FACTS = [
    PlantedFact(0.15, "The secret code of the blue vault is 73914.",
                "What is the secret code of the blue vault?", "73914", "The secret code of the blue vault is"),
    PlantedFact(0.5, "The name of the lighthouse keeper's cat is Marmalade.",
                "What is the name of the lighthouse keeper's cat?", "Marmalade",
                "The name of the lighthouse keeper's cat is"),
    PlantedFact(0.85, "The meeting with the archivist is scheduled for Thursday at 4 pm in room 21.",
                "In which room is the meeting with the archivist?", "21",
                "The meeting with the archivist is scheduled for Thursday at 4 pm in room"),
]


def python_docs_text() -> str:
    """Python's documentation topics (pydoc_data.topics) as one long real document."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def demo_document(tokenizer, max_tokens: int, facts=DEMO_FACTS, text: str | None = None) -> str:
    """The first `max_tokens` tokens of `text` (default: Python's docs) with `facts` planted at
    their depths."""
    text = python_docs_text() if text is None else text
    ids = encode_text(tokenizer, text)["input_ids"][:max_tokens]
    # cut at token boundaries, planting each fact between paragraphs near its depth
    text = tokenizer.decode(ids)
    out, last = [], 0
    for f in sorted(facts, key=lambda f: f.depth):
        at = text.find("\n\n", int(f.depth * len(text)))
        at = len(text) if at < 0 else at
        out += [text[last:at], "\n\n" + f.sentence]
        last = at
    out.append(text[last:])
    return "".join(out)
