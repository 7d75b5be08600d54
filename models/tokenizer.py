"""A CLIP BPE vocabulary written by the recipe, so the text-to-image model needs no hub tokenizer.

Every word of the caption templates becomes one token; any other lowercase word falls back to
single characters, so an unseen prompt still tokenizes (and simply means little to the model).
"""

from __future__ import annotations

import itertools
import json
import string
from pathlib import Path

from transformers import CLIPTokenizer

from models.data import COLOR_NAMES, DIGIT_WORDS, TEMPLATES

__all__ = ["MAX_LENGTH", "build_tokenizer", "caption_words"]

MAX_LENGTH = 16
SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def caption_words() -> list[str]:
    words = set(COLOR_NAMES) | set(DIGIT_WORDS) | {str(d) for d in range(10)}
    for template in TEMPLATES:
        words |= {w for w in template.split() if not w.startswith("{")}
    return sorted(words)


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the lowest-ranked adjacent pair until none applies."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get(p, len(ranks)), p) for p in itertools.pairwise(symbols)]
        rank, (a, b) = min(pairs)
        if rank == len(ranks):
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Characters, then merges added until every caption word is a single token."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = list(chars) + [c + "</w>" for c in chars]
    ranks: dict[tuple[str, str], int] = {}
    pending = True
    while pending:
        pending = False
        for word in caption_words():
            pieces = _bpe(word, ranks)
            if len(pieces) > 1:
                pending = True
                ranks.setdefault((pieces[0], pieces[1]), len(ranks))
                tokens.append(pieces[0] + pieces[1])
    vocab: dict[str, int] = {}
    for token in [*tokens, *SPECIAL]:
        vocab.setdefault(token, len(vocab))
    return vocab, [f"{a} {b}" for (a, b) in sorted(ranks, key=ranks.get)]


def build_tokenizer(folder: Path) -> CLIPTokenizer:
    """Write vocab.json / merges.txt into ``folder`` and return the tokenizer they define."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=MAX_LENGTH,
        pad_token="<|endoftext|>",
    )
    for word in caption_words():
        pieces = tokenizer.tokenize(word)
        if pieces != [word + "</w>"]:
            raise RuntimeError(f"caption word {word!r} is not one token: {pieces}")
    return tokenizer
