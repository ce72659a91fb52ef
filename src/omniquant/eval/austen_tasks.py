"""An offline zero-shot task from the Austen corpus: next-sentence multiple choice.

Each document's context is a few consecutive sentences of a novel; its choices are the sentence
that really follows and distractor sentences drawn from elsewhere in the same novel, of similar
length (so that neither acc nor acc_norm can win by length alone). Everything is deterministic
under the seed. The default novel, persuasion, is used neither for calibration
(prideprejudice) nor for perplexity (emma) by the austen-v1 protocol.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from omniquant.data.austen import read_austen
from omniquant.errors import DataError
from omniquant.eval.choice_task import ChoiceDoc, write_choice_task

DEFAULT_NOVEL = "persuasion"
CONTEXT_SENTENCES = 3
DISTRACTORS = 3
MIN_WORDS, MAX_WORDS = 5, 40  # sentences used as context, answers or distractors
LENGTH_RATIO = 1.5  # a distractor has between 1/1.5 and 1.5 times the answer's words
MIN_GAP = 10  # distractors come from at least this many sentences away from the answer

HEADING = re.compile(r"^(chapter|volume)\b", re.IGNORECASE)
SENTENCE_END = re.compile(r"(?<=[.!?])([\"']?)\s+(?=[\"']?[A-Z])")
ABBREVIATION = re.compile(r"(?:\b(?:Mr|Mrs|Dr|St|Esq|Wm|Col|Capt|Sir)|\b[A-Z])\.$")


@dataclass(frozen=True)
class Sentence:
    text: str
    section: int  # the chapter (or front matter, 0) it belongs to

    @property
    def words(self) -> int:
        return len(self.text.split())


def paragraphs(text: str) -> list[str]:
    """Blank-line-separated paragraphs with their line breaks and underscores (italics) removed."""
    blocks = re.split(r"\n\s*\n", text)
    return [" ".join(b.replace("_", "").split()) for b in blocks if b.strip()]


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of a paragraph: split after . ! ? (and a closing quote) before a capital, but
    not after an abbreviation such as `Mrs.` or an initial."""
    pieces = SENTENCE_END.split(paragraph)
    # split() returns text, quote, text, quote, ...: put each closing quote back on its sentence
    raw = [
        pieces[i] + (pieces[i + 1] if i + 1 < len(pieces) else "") for i in range(0, len(pieces), 2)
    ]
    sentences: list[str] = []
    for piece in raw:
        if sentences and ABBREVIATION.search(sentences[-1]):
            sentences[-1] = f"{sentences[-1]} {piece}"
        else:
            sentences.append(piece)
    return sentences


def novel_sentences(novel: str) -> list[Sentence]:
    """A novel's sentences in order, each tagged with its chapter."""
    out: list[Sentence] = []
    section = 0
    for para in paragraphs(read_austen(novel)):
        if HEADING.match(para):
            section += 1
            continue
        out += [Sentence(s, section) for s in split_sentences(para)]
    return out


def usable(s: Sentence) -> bool:
    return s.section > 0 and MIN_WORDS <= s.words <= MAX_WORDS


def item_positions(sentences: list[Sentence], k: int) -> list[int]:
    """Answers whose k preceding sentences are usable and in the same chapter."""
    return [
        i
        for i in range(k, len(sentences))
        if all(usable(s) and s.section == sentences[i].section for s in sentences[i - k : i + 1])
    ]


def distractors(
    sentences: list[Sentence], answer: int, pool: list[int], rng: random.Random, n: int
) -> list[str]:
    """n different sentences of similar length, far from the answer, other than its text."""
    words = sentences[answer].words
    text = sentences[answer].text
    similar = [
        j
        for j in pool
        if abs(j - answer) >= MIN_GAP
        and words / LENGTH_RATIO <= sentences[j].words <= words * LENGTH_RATIO
        and sentences[j].text != text
    ]
    unique = list(dict.fromkeys(sentences[j].text for j in similar))
    if len(unique) < n:
        raise DataError(f"too few sentences like {text!r} to draw {n} distractors")
    return rng.sample(unique, n)


def build_docs(novel: str, n: int, seed: int, k: int = CONTEXT_SENTENCES) -> list[ChoiceDoc]:
    """n next-sentence documents from a novel, in text order; deterministic under `seed`."""
    sentences = novel_sentences(novel)
    positions = item_positions(sentences, k)
    if n > len(positions):
        raise DataError(f"{novel} has {len(positions)} usable next-sentence items; asked for {n}")
    rng = random.Random(seed)
    pool = [i for i, s in enumerate(sentences) if usable(s)]
    docs: list[ChoiceDoc] = []
    for i in sorted(rng.sample(positions, n)):
        choices = [sentences[i].text, *distractors(sentences, i, pool, rng, DISTRACTORS)]
        rng.shuffle(choices)
        context = " ".join(s.text for s in sentences[i - k : i])
        docs.append(
            {"context": context, "choices": choices, "label": choices.index(sentences[i].text)}
        )
    return docs


def task_name(novel: str) -> str:
    return f"austen_next_sentence_{novel}"


def write_austen_task(
    folder: str | Path, novel: str = DEFAULT_NOVEL, n: int = 500, seed: int = 0
) -> str:
    """Write the next-sentence task of a novel (YAML + JSONL) into `folder`; returns its lm-eval
    task name, for `omniquant eval MODEL --tasks NAME --tasks-include FOLDER`."""
    return write_choice_task(folder, task_name(novel), build_docs(novel, n, seed))
