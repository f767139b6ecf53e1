"""A small real task for real models: name an accented Latin letter as the Unicode standard does.

The examples come from Python's own copy of the Unicode character database (`unicodedata`), so
they are real data that ships with every interpreter, not lines written for the tests:

    {"system": "...", "instruction": "Unicode name of 'ệ'?", "output": "LATIN SMALL LETTER E WITH CIRCUMFLEX AND DOT BELOW"}

An instruct model knows the letters and the marks but not the standard's naming scheme, so its
baseline exact match is near zero; a short LoRA run learns the scheme, and held-out letters test
that it generalizes (case, base letter and each mark must all be right).
"""

from __future__ import annotations

import random
import unicodedata

SYSTEM = "Answer with the character's official Unicode name only."
LATIN_BLOCKS = ((0x00C0, 0x0250), (0x1E00, 0x1F00))  # Latin-1, Extended-A/B, Extended Additional
# Kept out of the data: examples/quickstart.yaml asks about them in its prompts and scenarios.
RESERVED = "ŵḮǸ"


def accented_letters() -> list[tuple[str, str]]:
    """(character, name) for every precomposed Latin letter with marks, in code point order."""
    letters = []
    for low, high in LATIN_BLOCKS:
        for code in range(low, high):
            char = chr(code)
            name = unicodedata.name(char, "")
            # Precomposed letters decompose canonically into a base letter and combining marks.
            if name.startswith("LATIN") and " WITH " in name and unicodedata.decomposition(char)[:1] != "<":
                if unicodedata.decomposition(char):
                    letters.append((char, name))
    return letters


def prompt(char: str) -> str:
    return f"Unicode name of '{char}'?"


def records(count: int | None = None, seed: int = 7) -> list[dict[str, str]]:
    """Alpaca records in a seeded order; `count` takes the first ones."""
    letters = [(c, name) for c, name in accented_letters() if c not in RESERVED]
    random.Random(seed).shuffle(letters)
    chosen = letters if count is None else letters[:count]
    return [{"system": SYSTEM, "instruction": prompt(c), "output": name} for c, name in chosen]
