"""Speech data (`dataset.format: audio`): clips with transcripts, checked before training.

Records hold an audio file path (relative to the dataset file, or absolute) and its transcript,
in `dataset.audio.audioColumn` and `textColumn`. Clips are read when a batch is built, so a large
corpus never sits in memory; the checks here read only each file's header and bytes.

Left out, each counted in the data report, with the first few files named in its warnings:
- unreadable files and files without samples;
- empty transcripts;
- clips longer than the model's window (`audio.chunkSeconds`, at most the feature extractor's
  window): without timestamps a transcript cannot be split with its audio, so they are not split;
- transcripts with more tokens than the clip's duration allows (a misaligned pair).
Clips at another sample rate are resampled to the model's rate when read.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_trainer.config import Audio, Dataset, S3Store
from finetune_trainer.data.errors import DataError, show_sample
from finetune_trainer.data.report import AudioReport, DataReport
from finetune_trainer.data.sources import Record, load_records
from finetune_trainer.data.split import split

log = logging.getLogger(__name__)
MAX_TOKENS_PER_SECOND = 15.0  # fast speech is ~4 words/s; far above this, text and audio do not match
TOKEN_ALLOWANCE = 8  # short clips may still carry a word or two of several tokens each
NAMED_PER_REASON = 3
REASONS = {
    "unreadable": "unreadable",
    "empty_transcript": "empty transcript",
    "too_long": "longer than the window",
    "transcript_too_long": "transcript too long for the clip",
}


@dataclass(frozen=True)
class Clip:
    path: Path
    text: str
    seconds: float
    sample_rate: int
    label_ids: tuple[int, ...] = ()


@dataclass
class AudioData:
    train: list[Clip]
    validation: list[Clip]
    test: list[Clip]
    report: DataReport
    notes: list[str] = field(default_factory=list)
    _named: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    @property
    def audio(self) -> AudioReport:
        assert self.report.audio is not None  # set by load_audio
        return self.report.audio

    def leave_out(self, reason: str, where: str) -> None:
        self.audio.left_out[reason] = self.audio.left_out.get(reason, 0) + 1
        if len(self._named[reason]) < NAMED_PER_REASON:
            self._named[reason].append(where)

    def warnings(self) -> list[str]:
        return self.notes + [
            f"{count} clip(s) left out: {REASONS[reason]} (e.g. {', '.join(self._named[reason])})"
            for reason, count in sorted(self.audio.left_out.items())
        ]


# --- loading and the checks that need no tokenizer -------------------------------------------------------


def _read_info(path: Path) -> tuple[float, int] | None:
    """(seconds, sample rate), or None when the file cannot be decoded or has no samples."""
    import soundfile

    try:
        info = soundfile.info(str(path))
    except (RuntimeError, OSError, ValueError):
        return None
    if info.frames <= 0 or info.samplerate <= 0:
        return None
    return info.frames / info.samplerate, int(info.samplerate)


def _clip_path(value: Any, base: Path, audio: Audio, record: Record, where: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise DataError(
            f"{where}: audio example needs a file path in {audio.audio_column!r}: {show_sample(record)} "
            "(fix: set dataset.audio.audioColumn to the column that holds the path)"
        )
    path = Path(value)
    return path if path.is_absolute() else base / path


def _check(
    record: Record, base: Path, audio: Audio, window: float, data: AudioData, where: str
) -> Clip | None:
    path = _clip_path(record.get(audio.audio_column), base, audio, record, where)
    text = record.get(audio.text_column)
    info = _read_info(path)
    if info is None:
        data.leave_out("unreadable", path.name)
        return None
    if not isinstance(text, str) or not text.strip():
        data.leave_out("empty_transcript", path.name)
        return None
    seconds, rate = info
    if seconds > window:
        data.leave_out("too_long", f"{path.name} ({seconds:.1f} s > {window:g} s)")
        return None
    return Clip(path, " ".join(text.split()), seconds, rate)


def _dedupe(clips: list[Clip]) -> tuple[list[Clip], int]:
    """The same audio bytes listed twice is one clip."""
    seen: set[str] = set()
    kept = []
    for clip in clips:
        digest = hashlib.sha256(clip.path.read_bytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            kept.append(clip)
    return kept, len(clips) - len(kept)


def check_sample_rate(audio: Audio, model_rate: int) -> None:
    if audio.sample_rate != model_rate:
        raise DataError(
            f"dataset.audio.sampleRate: got {audio.sample_rate}: the model's feature extractor expects "
            f"{model_rate} Hz (fix: set it to {model_rate}; clips at other rates are resampled)"
        )


def load_audio(ds: Dataset, store: S3Store, model_rate: int, model_window: float) -> AudioData:
    """Load, check, dedupe and split; clips at another rate than the model's are counted for resampling."""
    check_sample_rate(ds.audio, model_rate)
    if ds.source.startswith("s3://"):
        raise DataError(
            f"dataset.source: got {ds.source!r}: audio datasets are read from a mounted folder "
            "(fix: mount the clips and point dataset.source at their JSONL or CSV file)"
        )
    records = load_records(ds.source, store, ds.hub_split)
    base = Path(ds.source) if Path(ds.source).is_dir() else Path(ds.source).parent
    window = min(ds.audio.chunk_seconds, model_window)
    audio = AudioReport(sample_rate=model_rate, window_seconds=window)
    data = AudioData([], [], [], DataReport(raw=len(records), audio=audio))
    checked = [
        _check(r, base, ds.audio, window, data, f"dataset.source example {i + 1}")
        for i, r in enumerate(records)
    ]
    clips, duplicates = _dedupe([c for c in checked if c is not None])
    data.report.duplicates_removed = duplicates
    data.train, data.validation, data.test = split(clips, ds.split.validation, ds.split.test, ds.split.seed)
    other_rates = [c for c in clips if c.sample_rate != model_rate]
    data.audio.resampled = len(other_rates)
    if other_rates:
        named = ", ".join(f"{c.path.name} at {c.sample_rate} Hz" for c in other_rates[:NAMED_PER_REASON])
        data.notes.append(f"{len(other_rates)} clip(s) resampled to {model_rate} Hz (e.g. {named})")
    return data


# --- the checks that need the tokenizer ------------------------------------------------------------------


def label_ids(tokenizer: Any, text: str) -> list[int]:
    """Decoder targets: the tokenizer's prefix without the start token (the model prepends it), the
    text, end of text."""
    ids = list(tokenizer(text).input_ids)
    start = getattr(tokenizer, "convert_tokens_to_ids", lambda _t: None)("<|startoftranscript|>")
    return ids[1:] if ids and ids[0] == start else ids


def tokenize_audio(data: AudioData, tokenizer: Any, max_target_tokens: int) -> AudioData:
    """Add decoder labels; leave out transcripts too long for their clip or for the decoder."""

    def labelled(clips: Sequence[Clip]) -> list[Clip]:
        kept = []
        for clip in clips:
            ids = label_ids(tokenizer, clip.text)
            allowed = min(max_target_tokens, TOKEN_ALLOWANCE + MAX_TOKENS_PER_SECOND * clip.seconds)
            if len(ids) > allowed:
                data.leave_out(
                    "transcript_too_long", f"{clip.path.name} ({len(ids)} tokens, {clip.seconds:.1f} s)"
                )
                continue
            kept.append(Clip(clip.path, clip.text, clip.seconds, clip.sample_rate, tuple(ids)))
        return kept

    data.train, data.validation, data.test = (
        labelled(data.train),
        labelled(data.validation),
        labelled(data.test),
    )
    if not data.train:
        raise DataError(
            f"dataset.source: no usable clips left for training ({_counts(data)}) "
            "(fix: check the audio files and transcripts named in the log)"
        )
    _finish_report(data)
    return data


def _counts(data: AudioData) -> str:
    return ", ".join(f"{REASONS[k]}: {v}" for k, v in sorted(data.audio.left_out.items())) or "none left out"


def _finish_report(data: AudioData) -> None:
    clips = [*data.train, *data.validation, *data.test]
    report = data.report
    report.examples = report.chunks = len(clips)
    report.tokens = sum(len(c.label_ids) for c in clips)
    report.split.train, report.split.validation, report.split.test = (
        len(data.train),
        len(data.validation),
        len(data.test),
    )
    digest = hashlib.sha256()
    for clip in data.train:  # what training reads, in order: a resumed run must see the same
        digest.update(f"{clip.path.name}\t{clip.text}\t{clip.label_ids}\n".encode())
    report.fingerprint = digest.hexdigest()[:16]
    data.audio.clips = len(clips)
    data.audio.seconds = round(sum(c.seconds for c in clips), 2)
    report.warnings = data.warnings()
    for warning in report.warnings:
        log.warning("%s", warning)


# --- reading clips ---------------------------------------------------------------------------------------


def read_clip(clip: Clip, rate: int) -> Any:
    """Mono float32 samples at `rate` (polyphase resampling when the file has another rate)."""
    from math import gcd

    import numpy as np
    import soundfile
    from scipy.signal import resample_poly  # type: ignore[import-untyped]

    samples, file_rate = soundfile.read(str(clip.path), dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    if file_rate != rate:
        g = gcd(file_rate, rate)
        mono = resample_poly(mono, rate // g, file_rate // g).astype(np.float32)
    return mono
