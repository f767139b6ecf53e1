"""Speech fine-tuning (`dataset.format: audio`) with a tiny Whisper built locally."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from finetune_trainer.config import Audio
from finetune_trainer.data.audio import Clip, check_sample_rate, read_clip
from finetune_trainer.data.errors import DataError
from finetune_trainer.evaluation import basic_normalizer, word_error_rate
from finetune_trainer.exitcodes import ExitCode
from finetune_trainer.speech import transcript_max_new_tokens, wer_normalizer
from finetune_trainer.testing.cli import base_config, run_trainer
from finetune_trainer.testing.tiny import (
    SPEECH_RATE,
    build_tiny_whisper,
    synthetic_speech,
    tone,
    write_clip,
    write_jsonl,
)


@pytest.fixture(scope="module")
def whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("whisper") / "model")


def planted_speech(folder: Path) -> Path:
    """60 good clips plus one of each problem the checks must catch."""
    data = synthetic_speech(folder, 60, seed=1)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    write_clip(folder / "slow.wav", tone("apple", 0.6)[::2].copy(), rate=8_000)  # resampled, kept
    write_clip(folder / "long.wav", tone("river", 3.0))  # beyond the 2 s window
    write_clip(folder / "empty.wav", tone("stone", 0.5))
    write_clip(folder / "chatty.wav", tone("cloud", 0.4))
    (folder / "broken.wav").write_bytes(b"RIFF but not really audio")
    records += [
        {"audio": "slow.wav", "text": "apple"},
        {"audio": "long.wav", "text": "river"},
        {"audio": "empty.wav", "text": "  "},
        {"audio": "chatty.wav", "text": " ".join(["maple tiger amber copper"] * 6)},
        {"audio": "broken.wav", "text": "stone"},
        records[0],  # the same clip listed twice
    ]
    return write_jsonl(records, folder / "data.jsonl")


def speech_config(model: Path, data: Path, out: Path, method: str) -> dict[str, Any]:
    config = base_config(
        model,
        data,
        out,
        method,
        goal={
            "metrics": ["eval_loss", "wer"],
            "successCriteria": [{"metric": "eval_loss", "maxRegression": 0.0}],
        },
        hyperparameters={
            "maxSteps": 30,
            "batchSize": 8,
            "learningRate": 3e-3,
            "loggingSteps": 5,
            "warmupRatio": 0.0,
        },
        validation={"maxGenerationSamples": 8, "everyEpoch": False},  # maxNewTokens: from the transcripts
    )
    config["dataset"] = {
        "source": str(data),
        "format": "audio",
        "split": {"validation": 0.1, "test": 0.1, "seed": 0},
        "audio": {"chunkSeconds": 30},
    }
    config["method"]["allowSmallDataFullFineTune"] = True
    config["method"]["lora"] = {"r": 8, "alpha": 16, "dropout": 0.0}
    return config


@pytest.mark.parametrize(
    ("method", "weights"), [("full", "model.safetensors"), ("lora", "adapter_model.safetensors")]
)
def test_speech_fine_tune_reports_data_checks_and_wer(
    whisper: Path, tmp_path: Path, method: str, weights: str
) -> None:
    data = planted_speech(tmp_path / "speech")
    result = run_trainer(
        speech_config(whisper, data, tmp_path / "out", method), tmp_path, env={"OMP_NUM_THREADS": "1"}
    )
    assert result.code == ExitCode.SUCCEEDED, result.log[-3000:]

    report = result.report()
    assert report["data"]["raw"] == 66
    assert report["data"]["duplicatesRemoved"] == 1
    assert report["data"]["examples"] == 61  # 60 + the resampled one
    assert report["baseline"]["wer"] > 0.5, "a random-initialized model does not transcribe"
    assert isinstance(report["final"]["wer"], float)
    assert report["final"]["eval_loss"] < report["baseline"]["eval_loss"]

    audio = json.loads((result.out / "final" / "data_report.json").read_text())["audio"]
    assert audio["sampleRate"] == SPEECH_RATE and audio["windowSeconds"] == 2.0  # the model's window
    assert audio["resampled"] == 1
    assert audio["leftOut"] == {
        "unreadable": 1,
        "empty_transcript": 1,
        "too_long": 1,
        "transcript_too_long": 1,
    }
    assert "long.wav (3.0 s > 2 s)" in result.log
    assert "slow.wav at 8000 Hz" in result.log
    assert "chatty.wav (" in result.log and "broken.wav" in result.log

    final = result.out / "final"
    assert (final / weights).is_file()
    assert (final / "processor_config.json").is_file() and (final / "tokenizer_config.json").is_file()
    assert json.loads((final / "metrics.json").read_text())["final"]["wer"] == report["final"]["wer"]


def test_nothing_usable_is_refused_with_the_counts(whisper: Path, tmp_path: Path) -> None:
    folder = tmp_path / "speech"
    write_clip(folder / "long.wav", tone("river", 3.0))
    data = write_jsonl(
        [{"audio": "long.wav", "text": "river"}, {"audio": "gone.wav", "text": "x"}], folder / "d.jsonl"
    )
    result = run_trainer(speech_config(whisper, data, tmp_path / "out", "lora"), tmp_path)
    assert result.code == ExitCode.DATA_REFUSED, result.log[-2000:]
    assert (
        "no usable clips left for training (longer than the window: 1, unreadable: 1)"
        in result.report()["message"]
    )


def test_a_sample_rate_setting_unlike_the_model_is_refused_with_the_fix() -> None:
    with pytest.raises(
        DataError, match=r"dataset.audio.sampleRate: got 8000: .* expects 16000 Hz \(fix: set it to 16000"
    ):
        check_sample_rate(Audio(sample_rate=8_000), 16_000)


def test_clips_at_another_rate_are_resampled_keeping_length_and_pitch(tmp_path: Path) -> None:
    path = write_clip(
        tmp_path / "a.wav", np.sin(2 * np.pi * 440 * np.arange(8_000) / 8_000).astype(np.float32), 8_000
    )
    samples = read_clip(Clip(path, "a", 1.0, 8_000), SPEECH_RATE)
    assert samples.shape == (SPEECH_RATE,)
    peak_hz = np.argmax(np.abs(np.fft.rfft(samples))) * SPEECH_RATE / samples.size
    assert peak_hz == pytest.approx(440, abs=2)


@pytest.mark.parametrize(
    ("predictions", "references", "wer"),
    [
        (["apple river"], ["apple river"], 0.0),
        (["apple stone"], ["apple river"], 0.5),  # one substitution
        (["apple"], ["apple river"], 0.5),  # one deletion
        (["Apple, river!"], ["apple river"], 0.0),  # normalized: case, punctuation
        (["the apple river"], ["apple river"], 0.5),  # an article is a word to transcribe
        (["apple [noise] river (um)"], ["apple river"], 0.0),  # bracketed asides are not words
        (["café"], ["cafe"], 1.0),  # the basic normalizer keeps diacritics
        (["b c d e"], ["x"], 4.0),  # insertions can push WER above 1
        (["apple", ""], ["apple", "river stone"], 2 / 3),  # corpus-level, not a mean of rates
    ],
)
def test_word_error_rate(predictions: list[str], references: list[str], wer: float) -> None:
    assert word_error_rate(predictions, references) == pytest.approx(wer)


def test_word_error_rate_with_the_english_normalizer() -> None:
    english = wer_normalizer("english", {"colour": "color"})
    said, written = ["twenty five colour, Mr. Smith"], ["25 color mister smith"]
    assert word_error_rate(said, written, english) == 0.0
    assert word_error_rate(said, written, basic_normalizer()) == 1.0


@pytest.mark.parametrize(
    ("language", "spelling", "normalizer"),
    [
        ("english", {"colour": "color"}, "EnglishTextNormalizer"),
        ("en", {"colour": "color"}, "EnglishTextNormalizer"),
        (None, {"colour": "color"}, "EnglishTextNormalizer"),  # no language: English-only checkpoints
        ("french", {"colour": "color"}, "BasicTextNormalizer"),  # English rules would mangle French
        ("english", None, "BasicTextNormalizer"),  # no normalizer.json among the tokenizer's files
        (None, {}, "BasicTextNormalizer"),
    ],
)
def test_wer_normalizer(language: str | None, spelling: dict[str, str] | None, normalizer: str) -> None:
    assert type(wer_normalizer(language, spelling)).__name__ == normalizer


def clips_with_labels(*lengths: int) -> list[Clip]:
    return [Clip(Path(f"{i}.wav"), "x", 1.0, SPEECH_RATE, tuple(range(n))) for i, n in enumerate(lengths)]


@pytest.mark.parametrize(
    ("configured", "labels", "expected"),
    [
        (6, (3,), 6),  # the job's validation.maxNewTokens
        (500, (3,), 60),  # never past the decoder's positions: 64 less the prefix of 4
        (None, (3, 5), 13),  # the longest transcript and a margin of 8
        (None, (40,), 50),
        (None, (90,), 60),
        (None, (), 60),
    ],
)
def test_transcript_max_new_tokens(configured: int | None, labels: tuple[int, ...], expected: int) -> None:
    assert transcript_max_new_tokens(configured, clips_with_labels(*labels), 64, 4) == expected
