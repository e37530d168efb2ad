"""Answers that end where a degenerate loop would begin.

A greedy 135M backbone that does not find what it is asked for tends to repeat one short unit
until the token budget runs out ("1111111…", "*****…"): its prior for the next token after an
unanswerable "…is" is a digit or a reST underline, and greedy decoding never leaves it. The same
happens with RAG and truncation, whatever the memory read. Every answer memformer generates
(`MemformerForCausalLM.ask`, the baselines of `memformer.qa.longdoc`) therefore stops as soon as
its text holds a unit of 1-16 characters repeated 8 or more times in a row, a longer unit (a
sentence and the cue that leads back into it: "a secret code. The secret code of the red vault is
a secret code. …") repeated 3 or more times, one line repeated as the next 2 or more lines (a
list that names one value again and again: "* 9021980." on every line), a word group of 3-16
characters said 4 or more times in a row apart by spaces ("VQQ VQQ VQQ VQQ"), or a count: 6 or
more whole numbers in a row, each one more than the one before, apart by the same separator
("5, 6, 7, 8, 9, 10", "1. 2. 3. 4. 5. 6.", "4231320. 4231321. 4231322. …") (`LoopStop`). The loop
is cut back to one copy of its unit, a count to its first number (`cut_loop`): the user gets a
short answer, and the caller is told that it was cut.

A completion that states its own cue again ("1. The special magic number for tidy-violin is 1.
The special magic number for …"), or the last sentence of a cue that asks a question first, is
starting over, whether or not it would loop: it stops there too, and the answer ends before the
restated cue (`end_at_cue`). That is the end of an answer,
not a loop, so it is not reported as one.

An answer to a cue that only says a phrase of the cue back ("The special magic numbers for
boundless-strawberry, helpless-bunghole, … are" → "* boundless-strawberry", the keys listed one
per line) names none of what was asked for (`restates_cue`); `ask` answers such a read again with
the first token of each of the cue's words barred until the answer holds a letter or digit
(`CueWordBar`), so its first word comes from somewhere else, the memory read. One word of the
cue ("closed." for "... open or closed? It is") or one of the alternatives an "or" in the cue
offers ("the red door" for "... the red door or the blue door? She opened") is an answer.
"""
from __future__ import annotations

import re

import torch
from transformers import LogitsProcessor, StoppingCriteria

# a short unit repeated 8+ times, or a unit of 17-200 characters repeated 3+ times (a number may
# legitimately hold "1111111"; no answer repeats a whole sentence three times)
LOOP = re.compile(r"(\S.{0,15}?)\1{7,}|(\S.{16,199}?)\2{2,}", re.DOTALL)
# a line with a letter or digit that the next 2+ lines repeat exactly ("* 9021980." x 3): too short
# for the 8 repeats of a short unit once its line break is counted, and no answer lists an item
# three times in a row
LINE_LOOP = re.compile(r"^([^\n]{0,200}?\w[^\n]{0,200}?)(?:\n\1){2,}$", re.MULTILINE)
# a word or words of 3-16 characters said 4+ times in a row, apart by spaces ("VQQ VQQ VQQ VQQ",
# "5434657. 5434657. 5434657. 5434657."): the space between copies hides them from LOOP until the
# 8th, and no answer names one value four times running
WORD_LOOP = re.compile(r"(?<!\S)(\w[^\n]{2,15}?)(?:[ \t]+\1(?!\S)){3,}")
# a count: whole numbers, each one more than the one before, apart by the same 1-3 characters
# without a letter or digit ("5, 6, 7, …", "1. 2. 3. …", "2004, 2005, …"); the unit changes at every
# step, so no pattern above sees it, and no answer counts six numbers in a row
COUNT_RUN = 6
NUMBER = re.compile(r"\d+")
TAIL_TOKENS = 160           # generated tokens decoded at each step to look for a loop (3 units of 200 characters)


def count_at(text: str) -> re.Match | None:
    """The first number of the first count in `text` (`COUNT_RUN`+ whole numbers in a row, each
    one more than the one before, apart by the same 1-3 characters without a letter or digit),
    else None."""
    numbers = list(NUMBER.finditer(text))
    start, run, sep = 0, 1, None
    for i in range(1, len(numbers)):
        a, b = numbers[i - 1], numbers[i]
        gap = text[a.end():b.start()]
        if int(b.group()) != int(a.group()) + 1 or not 1 <= len(gap) <= 3 or re.search(r"\w", gap):
            start, run, sep = i, 1, None                  # b starts afresh
        elif run > 1 and gap != sep:
            start, run, sep = i - 1, 2, gap               # a step with another separator: a, b start afresh
        else:
            run, sep = run + 1, gap
        if run >= COUNT_RUN:
            return numbers[start]
    return None


def looping(text: str) -> bool:
    """True when some unit of 1-16 characters (not blank) repeats 8+ times in a row, one of
    17-200 characters 3+ times, a line (with a letter or digit) 3+ times in a row, a word
    group of 3-16 characters 4+ times in a row apart by spaces, or the text counts (`count_at`)."""
    return any(p.search(text) is not None for p in (LOOP, LINE_LOOP, WORD_LOOP)) or count_at(text) is not None


def end_at_cue(text: str, cue: str | None) -> str:
    """text up to where it states `cue` again after some answer of its own (stripped); text
    unchanged without a cue, when it never restates it, or when it opens with it."""
    at = restated_at(text, cue)
    return text if at < 0 else text[:at].strip()


MIN_RESTATED_CHARS = 16     # a cue's last sentence shorter than this ("It is") may recur in any answer


def restated_at(text: str, cue: str | None) -> int:
    """Where `text` states `cue` (stripped) again after some text of its own, else -1. A cue of
    several sentences (a question, then the answer's first words) counts as restated when its
    last sentence of at least `MIN_RESTATED_CHARS` characters is: a completion that repeats the
    answer's opening without the question is starting over all the same."""
    cue = (cue or "").strip()
    if not cue:
        return -1
    found = [text.find(cue, 1)]
    last = re.split(r"(?<=[.!?:])\s+|\n+", cue)[-1].strip()
    if last != cue and len(last) >= MIN_RESTATED_CHARS:
        found.append(text.find(last, 1))
    found = [at for at in found if at > 0]
    return min(found) if found else -1


def cut_loop(text: str) -> tuple[str, bool]:
    """(text with its first loop cut back to one copy of the unit, whether a loop was cut)."""
    m, line, word, count = LOOP.search(text), LINE_LOOP.search(text), WORD_LOOP.search(text), count_at(text)
    first = min((x.start() for x in (m, line, word, count) if x is not None), default=None)
    if first is None:
        return text, False
    if count is not None and count.start() == first and all(x is None or x.start() > first for x in (m, line, word)):
        return text[:count.end()].strip(), True                       # a count: keep its first number
    if line is not None and line.start() == first:                 # a repeated line: keep one
        return text[:line.start(1) + len(line.group(1))].strip(), True
    if word is not None and word.start() == first and (m is None or m.start() > first):
        return (text[:word.start()] + word.group(1)).strip(), True      # a repeated word group: keep one
    unit = m.group(1) or m.group(2)
    if m.group(2) is not None:                 # a sentence loop: keep its unit up to the first sentence end
        end = re.search(r"[.!?](?=\s)", unit)
        unit = unit[:end.end()] if end else unit
    return (text[:m.start()] + unit).strip(), True


WORD = re.compile(r"[^\W_]+")                 # a word: letters and digits (hyphens, points and marks apart)


def restates_cue(text: str, cue: str | None) -> bool:
    """True when `text` holds words, every one of them a word of `cue`, and two or more of them
    in a row as the cue has them: a phrase of the cue said back ("* boundless-strawberry" for a cue
    that names boundless-strawberry among the keys it asks about). An answer that names one
    word ("closed." for "... open or closed? It is") or one of the choices the cue offers ("the
    red door" for "... the red door or the blue door? She chose") answers."""
    words = [w.lower() for w in WORD.findall(text)]
    cue_words = [w.lower() for w in WORD.findall(cue or "")]
    if len(words) < 2 or not set(words) <= set(cue_words):
        return False
    pairs = set(zip(cue_words, cue_words[1:]))
    return any(p in pairs for p in zip(words, words[1:])) and not offered_choice(words, cue or "")


def offered_choice(words: list[str], cue: str) -> bool:
    """True when `words` (lowercase) are a run of the words on one side of an "or" in `cue`, up to
    the punctuation that bounds that side: one of the alternatives the cue offers ("red door" or
    "the blue door" in "Which door, the red door or the blue door? She opened")."""
    n = len(words)
    for m in re.finditer(r"\bor\b", cue, flags=re.IGNORECASE):
        left = re.split(r"[,;:.!?\n]", cue[:m.start()])[-1]
        right = re.split(r"[,;:.!?\n]", cue[m.end():])[0]
        for side in (left, right):
            side_words = [w.lower() for w in WORD.findall(side)]
            if any(side_words[k:k + n] == words for k in range(len(side_words) - n + 1)):
                return True
    return False


class CueWordBar(LogitsProcessor):
    """Bars the first token of each word of `cue` that holds a letter (as it starts a word after a
    space or at a line's start, as written and capitalized) while the generated text holds no letter
    or digit yet: the answer's first word is not one of its cue's. prompt_len: the length of the
    input ids `generate` continues (its generated tokens follow)."""

    def __init__(self, tokenizer, cue: str, prompt_len: int):
        ids = set()
        for w in set(re.findall(r"[^\W\d_][\w'-]*", cue or "")):
            for form in (w, " " + w, w[:1].upper() + w[1:], " " + w[:1].upper() + w[1:]):
                ids.update(tokenizer(form, add_special_tokens=False)["input_ids"][:1])
        self.barred = sorted(t for t in ids if re.search(r"[^\W\d_]", tokenizer.decode([t])))
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.free: set[int] = set()          # rows whose answer holds a letter or digit: never barred again

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row, ids in enumerate(input_ids[:, self.prompt_len:].tolist()):         # [B, new]
            if row in self.free:
                continue
            if WORD.search(self.tokenizer.decode(ids, skip_special_tokens=True)) is None:
                scores[row, self.barred] = float("-inf")
            else:
                self.free.add(row)
        return scores


# the end of the first sentence or line that holds a letter or digit (the text before it that
# holds none, a leading ":" and blank lines, kept): ".!?" followed by a space or line break, or a
# line break ("3.14" does not end it)
FIRST_ITEM = re.compile(r"^\W*?\w[^\n]*?(?:[.!?](?=\s)|(?=\n))")
ITEM_BREAK = re.compile(r"\n|[.!?]\s")      # what ends an item once it holds a word (the copy pointer's rest)
ITEM_MARKS = (".", "!", "?")                 # end an item when whitespace follows


def first_item(text: str) -> str:
    """text up to the end of its first sentence or line that holds a letter or digit
    (": 5419972. BACK TO BASICS …" -> ": 5419972."; ":\n\n- 4353316.\n- 155893." ->
    ":\n\n- 4353316."; an abbreviation ends it too: "Dr."); text unchanged when that item has
    not ended."""
    m = FIRST_ITEM.search(text)
    return text if m is None else text[:m.end()].rstrip()


class LoopStop(StoppingCriteria):
    """Stops a sequence once its generated text (the last `TAIL_TOKENS` tokens of it) loops, or
    states `cue` again after some text of its own (`end_at_cue`).

    The prompt's length is taken at the first call, which comes after the first new token, so a
    prompt that itself holds a repeated unit (a Markdown rule, say) stops nothing; a generation
    that continues tokens already generated gives it instead. one_item: also stop once the
    generated text has ended its first sentence or line that holds a letter or digit
    (`first_item`): one item of a list (`ask` answering from several reads, one item per read)."""

    def __init__(self, tokenizer, prompt_len: int | None = None, cue: str | None = None, one_item: bool = False):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len                 # None: taken at the first call
        self.cue = (cue or "").strip()
        self.one_item = one_item

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1] - 1
        new = input_ids[:, self.prompt_len:][:, -TAIL_TOKENS:]                 # [B, <= TAIL_TOKENS]
        texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in new.tolist()]
        done = [looping(t) or restated_at(t.lstrip(), self.cue) >= 0
                or (self.one_item and FIRST_ITEM.search(t.lstrip()) is not None) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def strip_padding(ids: list[int], pad_id: int | None) -> list[int]:
    """A batch row's generated ids without the padding `generate` appends once the row has
    stopped and others have not."""
    end = len(ids)
    while end and pad_id is not None and ids[end - 1] == pad_id:
        end -= 1
    return ids[:end]


def join_answers(texts: list[str]) -> str:
    """Answers of one question from several reads (`ask` with `MemoryConfig.answer_reads` > 1),
    one per line, best read first: an empty answer, or one whose letters and digits the answers
    before it already hold ("7114983." after ": 7114983."), adds nothing and is dropped; the
    others lose the leading ":" that continued the cue."""
    kept, seen = [], ""
    for text in texts:
        body = text if not kept else text.lstrip(" \t\n:;,")
        key = re.sub(r"[\W_]+", "", body).lower()
        if not key or key in seen:
            continue
        kept.append(body)
        seen += "\n" + key
    return "\n".join(kept)
