"""A small real task for real models: give a character's official Unicode name.

The examples come from Python's own copy of the Unicode character database (`unicodedata`), so
they are real data that ships with every interpreter, not lines written for the tests:

    {"system": "...", "instruction": "Unicode name of 'é'?", "output": "LATIN SMALL LETTER E WITH ACUTE"}

The characters are the printable ASCII ones, the accented letters of Latin-1 and the Greek
alphabet. An instruct model knows them but not the standard's naming scheme (it answers in a
sentence), so its baseline exact match is zero; a short LoRA run learns the scheme. Held-out
letters and digits then come out right, accents mostly, punctuation names (COMMERCIAL AT)
rarely: the metrics have room above and below.
"""

from __future__ import annotations

import random
import unicodedata

SYSTEM = "Answer with the character's official Unicode name only."
BLOCKS = ((0x21, 0x7F), (0xC0, 0x100), (0x391, 0x3CA))  # printable ASCII, Latin-1 letters, Greek
# Kept out of the data: examples/quickstart.yaml asks about them in its prompts and scenarios.
RESERVED = "ÑqΩ"


def characters() -> list[tuple[str, str]]:
    """(character, name) for every named character of BLOCKS, in code point order."""
    found = []
    for low, high in BLOCKS:
        for code in range(low, high):
            char = chr(code)
            name = unicodedata.name(char, "")
            if name and (code < 0x80 or char.isalpha()):  # Latin-1's letters, not its signs
                found.append((char, name))
    return found


def prompt(char: str) -> str:
    return f"Unicode name of '{char}'?"


def records(count: int | None = None, seed: int = 7) -> list[dict[str, str]]:
    """Alpaca records in a seeded order; `count` takes the first ones."""
    letters = [(c, name) for c, name in characters() if c not in RESERVED]
    random.Random(seed).shuffle(letters)  # noqa: S311 (a reproducible order, not a secret)
    chosen = letters if count is None else letters[:count]
    return [{"system": SYSTEM, "instruction": prompt(c), "output": name} for c, name in chosen]
