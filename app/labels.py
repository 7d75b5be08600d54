"""The class a free prompt names, for class-conditional models (DiT): pure, no I/O.

A model's labels come from its id2label.json ("7": "7, seven"; an ImageNet DiT: "207":
"golden retriever"). A prompt names a class when one of its labels appears in it as whole
words, case and punctuation aside: "a seven", "the digit 7, please" and "Seven!" all name 7.
The most specific match wins: a label inside a longer matched label does not count ("golden
retriever" names 207, not "retriever"). A prompt that names two different classes is
ambiguous and names none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Match", "find_class", "label_key"]

_WORD = re.compile(r"[^\W_]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def label_key(label: str) -> str:
    """How a label is looked up: its words, case-folded, one space apart."""
    return " ".join(_words(label))


@dataclass(frozen=True)
class Match:
    class_id: int | None  # None: no class, or several
    named: tuple[str, ...]  # the labels found, most specific only


def find_class(prompt: str, labels: dict[str, int]) -> Match:
    """The class ``prompt`` names among ``labels`` (keys made by ``label_key``)."""
    words = _words(prompt)
    longest = max((len(k.split()) for k in labels), default=0)
    spans = []  # (start, end, label) of every label occurring as whole words
    for start in range(len(words)):
        for end in range(start + 1, min(start + longest, len(words)) + 1):
            key = " ".join(words[start:end])
            if key in labels:
                spans.append((start, end, key))
    kept = [
        (s, e, k)
        for s, e, k in spans
        if not any(s2 <= s and e <= e2 and (e2 - s2) > (e - s) for s2, e2, _ in spans)
    ]
    named = tuple(dict.fromkeys(k for _, _, k in kept))
    classes = {labels[k] for k in named}
    return Match(classes.pop() if len(classes) == 1 else None, named)
