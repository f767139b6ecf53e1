"""Text cleaning: Unicode normalization, web boilerplate removal, exact and near-duplicate removal."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# Zero-width space and byte-order mark only: ZWJ/ZWNJ carry meaning in Persian, Indic scripts and emoji.
_ZERO_WIDTH = re.compile("[\u200b\ufeff]")


def normalize_text(text: str) -> str:
    """Repair mojibake (ftfy), NFC-normalize, drop zero-width spaces and trailing whitespace.

    Indentation, inner runs of spaces and blank lines are kept: code, YAML and aligned
    tables mean something by them.
    """
    import ftfy

    # Off: ftfy defaults that rewrite correct text (curly quotes, fullwidth CJK punctuation, &amp; in prose).
    fixed = ftfy.fix_text(
        text, unescape_html=False, uncurl_quotes=False, fix_character_width=False, normalization="NFC"
    )
    fixed = _ZERO_WIDTH.sub("", fixed)  # ftfy has turned \r\n and \r into \n
    return "\n".join(line.rstrip() for line in fixed.split("\n")).strip("\n")


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
# `/` is no separator: paths, `read/write/execute`, `Yes / No / Maybe` and `TCP/IP / UDP` are content.
_NAV_SEPARATORS = re.compile("\\s*(?:\\||\u2022|\u00b7|\u00bb|\u203a|>)\\s*")
_MAX_NAV_ITEM_WORDS = 3
_SENTENCE_END = tuple(".,;:!?-")


def is_boilerplate_line(line: str) -> bool:
    """Cookie banners and navigation menus (`Home | About | Contact`, `Home > Docs > API`)."""
    stripped = line.strip()
    if not stripped:
        return False
    if len(stripped) < 300 and _COOKIE.search(stripped):
        return True
    if stripped.lower().rstrip(".:") in _NAV_WORDS:
        return True
    if stripped.startswith(("|", ">")):  # a Markdown table row or quote is content
        return False
    items = [item for item in _NAV_SEPARATORS.split(stripped) if item]
    separators = len(_NAV_SEPARATORS.findall(stripped))
    return separators >= 2 and all(_is_menu_item(item) for item in items)


def _is_menu_item(item: str) -> bool:
    """A menu entry is a short capitalized label: `About us`, `API`; not `x`, `if a` or `done.`."""
    return len(item.split()) <= _MAX_NAV_ITEM_WORDS and item[0].isupper() and not item.endswith(_SENTENCE_END)


_FENCE = re.compile(r"^\s*(```|~~~)")
_TABLE_DELIMITER = re.compile(r"^\s*\|?(\s*:?-+:?\s*\|)+\s*(:?-+:?)?\s*$")


def content_lines(lines: Sequence[str]) -> set[int]:
    """Indices of lines in fenced code blocks and Markdown tables: content, whatever they look like."""
    content: set[int] = set()
    in_fence = False
    for i, line in enumerate(lines):
        fence = bool(_FENCE.match(line))
        if fence or in_fence:
            content.add(i)
        if fence:
            in_fence = not in_fence
    for i, line in enumerate(lines):
        if i and _TABLE_DELIMITER.match(line) and "|" in lines[i - 1]:
            end = i + 1
            while end < len(lines) and "|" in lines[end]:
                end += 1
            content.update(range(i - 1, end))
    return content


def _may_repeat(line: str) -> bool:
    """Headers and footers are flush-left prose; an indented line or `}` repeats because it is code."""
    return bool(line) and not line[0].isspace() and any(c.isalpha() for c in line)


def repeated_lines(documents: Sequence[str], min_docs: int, min_fraction: float) -> set[str]:
    """Lines present in at least `min_docs` documents and `min_fraction` of them: headers, footers."""
    counts: Counter[str] = Counter()
    for document in documents:
        counts.update({line.strip() for line in document.split("\n") if _may_repeat(line)})
    threshold = max(min_docs, min_fraction * len(documents))
    return {line for line, count in counts.items() if count >= threshold}


def is_boilerplate(line: str, repeated: set[str]) -> bool:
    return (_may_repeat(line) and line.strip() in repeated) or is_boilerplate_line(line)


def strip_lines(text: str, repeated: set[str]) -> tuple[str, int]:
    """Remove boilerplate lines from a document; a single-line text is content and is kept."""
    lines = text.split("\n")
    if len(lines) < 2:
        return text, 0
    content = content_lines(lines)
    kept = [line for i, line in enumerate(lines) if i in content or not is_boilerplate(line, repeated)]
    return "\n".join(kept).strip("\n"), len(lines) - len(kept)


# --- duplicates ------------------------------------------------------------------------------------------


def dedupe_key(text: str) -> str:
    return " ".join(text.lower().split())


# A line in this many distinct examples (and this share of them) is a template: a system prompt,
# an instruction, a form. Near duplicates come in twos and threes, templates in hundreds.
TEMPLATE_MIN_EXAMPLES = 5
TEMPLATE_MIN_SHARE = 0.001


def template_lines(
    texts: Sequence[str], min_examples: int = TEMPLATE_MIN_EXAMPLES, min_share: float = TEMPLATE_MIN_SHARE
) -> frozenset[str]:
    """Dedupe keys of lines shared by many distinct texts; exact copies count once."""
    unique = {dedupe_key(text): text for text in texts}
    counts: Counter[str] = Counter()
    for text in unique.values():
        counts.update({key for line in text.split("\n") if (key := dedupe_key(line))})
    threshold = max(min_examples, min_share * len(unique))
    return frozenset(line for line, count in counts.items() if count >= threshold)


def varying_text(text: str, template: frozenset[str]) -> str:
    """What sets a text apart: its lines that are not template; all of it when nothing else is left."""
    kept = [line for line in text.split("\n") if dedupe_key(line) not in template]
    return "\n".join(kept) if any(line.strip() for line in kept) else text


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
    texts: Sequence[str],
    mode: str,
    threshold: float,
    protected: Iterable[str] = (),
    template: frozenset[str] = frozenset(),
) -> tuple[list[int], DedupeCounts]:
    """Indices of texts to keep, first occurrence wins; anything matching `protected` is dropped.

    `protected` holds held-out test texts: a training example equal or near to one of them
    would leak the test set into training. Exact duplicates compare whole texts; near duplicates
    compare what varies, leaving out `template` lines (see template_lines).
    """
    counts = DedupeCounts()
    if mode == "none":
        return list(range(len(texts))), counts
    seen = {dedupe_key(t) for t in protected}
    index = NearDuplicateIndex(threshold) if mode == "exact+near" else None
    if index is not None:
        for text in protected:
            index.add(varying_text(text, template))
    kept: list[int] = []
    for i, text in enumerate(texts):
        key = dedupe_key(text)
        if key in seen:
            counts.exact += 1
            continue
        seen.add(key)
        if index is not None and not index.add_unless_near(varying_text(text, template)):
            counts.near += 1
            continue
        kept.append(i)
    return kept, counts
