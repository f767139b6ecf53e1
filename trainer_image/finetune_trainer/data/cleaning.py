"""Text cleaning: Unicode normalization, web boilerplate removal, exact and near-duplicate removal."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_ZERO_WIDTH = re.compile(r"[\u200b\u200c\u200d\ufeff]")


def normalize_text(text: str) -> str:
    """Repair mojibake (ftfy), NFC-normalize, drop zero-width characters, tidy whitespace."""
    import ftfy

    text = unicodedata.normalize("NFC", ftfy.fix_text(text))
    text = _ZERO_WIDTH.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


_COOKIE = re.compile(
    r"(we use cookies|this (web)?site uses cookies|accept (all )?cookies|cookie (policy|settings|preferences)"
    r"|by continuing to (browse|use) this (site|website))",
    re.IGNORECASE,
)
_NAV_WORDS = {
    "skip to content",
    "skip to main content",
    "menu",
    "main menu",
    "back to top",
    "share this",
    "toggle navigation",
    "sign in",
    "log in",
    "subscribe",
}
_NAV_SEPARATORS = re.compile("\\s*(?:\\||\u2022|\u00b7|\u00bb|\u203a|>|/)\\s*")
_MAX_NAV_ITEM_WORDS = 3


def is_boilerplate_line(line: str) -> bool:
    """Cookie banners and navigation menus (`Home | About | Contact`, breadcrumbs)."""
    stripped = line.strip()
    if not stripped:
        return False
    if len(stripped) < 300 and _COOKIE.search(stripped):
        return True
    if stripped.lower().rstrip(".:") in _NAV_WORDS:
        return True
    if stripped.startswith("|"):  # a Markdown table row is content
        return False
    items = [item for item in _NAV_SEPARATORS.split(stripped) if item]
    separators = len(_NAV_SEPARATORS.findall(stripped))
    return separators >= 2 and all(_is_menu_item(item) for item in items)


def _is_menu_item(item: str) -> bool:
    return len(item.split()) <= _MAX_NAV_ITEM_WORDS and item[0].isalpha()


def repeated_lines(documents: Sequence[str], min_docs: int, min_fraction: float) -> set[str]:
    """Lines present in at least `min_docs` documents and `min_fraction` of them: headers, footers."""
    counts: Counter[str] = Counter()
    for document in documents:
        counts.update({line.strip() for line in document.split("\n") if line.strip()})
    threshold = max(min_docs, min_fraction * len(documents))
    return {line for line, count in counts.items() if count >= threshold}


def strip_lines(text: str, repeated: set[str]) -> tuple[str, int]:
    """Remove boilerplate lines; a single-line text is content and is kept."""
    lines = text.split("\n")
    if len(lines) < 2:
        return text, 0
    kept = [line for line in lines if line.strip() not in repeated and not is_boilerplate_line(line)]
    return "\n".join(kept).strip(), len(lines) - len(kept)


# --- duplicates ------------------------------------------------------------------------------------------


def dedupe_key(text: str) -> str:
    return " ".join(text.lower().split())


def _shingles(text: str, size: int = 3) -> set[str]:
    words = dedupe_key(text).split()
    if len(words) < size:
        return {" ".join(words)}
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


@dataclass
class NearDuplicateIndex:
    """MinHash LSH over word 3-gram shingles (datasketch).

    LSH bands are tuned for recall, and each candidate is confirmed by its estimated
    Jaccard similarity, so a missed near duplicate is rarer than a false alarm is.
    """

    threshold: float
    num_perm: int = 128

    def __post_init__(self) -> None:
        from datasketch import MinHash, MinHashLSH

        self._lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm, weights=(0.1, 0.9))
        self._hashes: list[Any] = []
        # Drawing the permutations costs more than hashing a text; every MinHash shares these.
        self._empty = MinHash(num_perm=self.num_perm, seed=1)

    def _minhash(self, text: str) -> Any:
        from datasketch import MinHash

        empty = self._empty
        minhash = MinHash(empty.num_perm, empty.seed, permutations=empty.permutations, scheme=empty.scheme)
        minhash.update_batch([s.encode("utf-8") for s in _shingles(text)])
        return minhash

    def _near(self, minhash: Any) -> bool:
        candidates = self._lsh.query(minhash)
        return any(minhash.jaccard(self._hashes[int(key)]) >= self.threshold for key in candidates)

    def _insert(self, minhash: Any) -> None:
        self._lsh.insert(str(len(self._hashes)), minhash)
        self._hashes.append(minhash)

    def contains_near(self, text: str) -> bool:
        return self._near(self._minhash(text))

    def add(self, text: str) -> None:
        self._insert(self._minhash(text))

    def add_unless_near(self, text: str) -> bool:
        """Add the text unless a near duplicate is in already; True when added. Hashes it once."""
        minhash = self._minhash(text)
        if self._near(minhash):
            return False
        self._insert(minhash)
        return True


@dataclass
class DedupeCounts:
    exact: int = 0
    near: int = 0


def dedupe(
    texts: Sequence[str], mode: str, threshold: float, protected: Iterable[str] = ()
) -> tuple[list[int], DedupeCounts]:
    """Indices of texts to keep, first occurrence wins; anything matching `protected` is dropped.

    `protected` holds held-out test texts: a training example equal or near to one of them
    would leak the test set into training.
    """
    counts = DedupeCounts()
    if mode == "none":
        return list(range(len(texts))), counts
    seen = {dedupe_key(t) for t in protected}
    index = NearDuplicateIndex(threshold) if mode == "exact+near" else None
    if index is not None:
        for text in protected:
            index.add(text)
    kept: list[int] = []
    for i, text in enumerate(texts):
        key = dedupe_key(text)
        if key in seen:
            counts.exact += 1
            continue
        seen.add(key)
        if index is not None and not index.add_unless_near(text):
            counts.near += 1
            continue
        kept.append(i)
    return kept, counts
