"""Tiny models, tokenizers and learnable datasets for tests and the quickstart (no downloads).

The synthetic task is "which group do these words belong to": each list is drawn from
one of two word groups, and the answer is the group's name. Every word carries the
signal, so a tiny model fully fine-tuned for a few dozen CPU steps learns it, while a
random-initialized one scores zero.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

WORDS = (  # noqa: SIM905 - reads better as prose
    "apple river stone cloud maple tiger amber copper violet harbor lantern meadow orbit "
    "pepper quartz saddle timber velvet willow zephyr anchor bishop candle dragon falcon "
    "garnet hollow island jasper kettle lemon marble nectar oyster pillow raven silver thistle"
).split()

# ChatML-style template: the tiny tokenizer's own chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]

Format = Literal["alpaca", "sharegpt", "text"]


GROUPS = {"north": WORDS[: len(WORDS) // 2], "south": WORDS[len(WORDS) // 2 :]}
QUESTION = "Which group do these words belong to?"


def _question(rng: random.Random) -> tuple[str, str]:
    group = rng.choice(sorted(GROUPS))
    words = rng.sample(GROUPS[group], rng.randint(3, 6))
    return " ".join(words), group


def synthetic_records(n: int, seed: int = 0, fmt: Format = "alpaca") -> list[dict[str, Any]]:
    """`n` distinct learnable examples in the given dataset format."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test data
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(records) < n:
        words, answer = _question(rng)
        if words in seen:
            continue
        seen.add(words)
        if fmt == "alpaca":
            records.append({"instruction": QUESTION, "input": words, "output": answer})
        elif fmt == "sharegpt":
            records.append(
                {
                    "conversations": [
                        {"from": "system", "value": "Answer with one word."},
                        {"from": "human", "value": f"{QUESTION} {words}"},
                        {"from": "gpt", "value": answer},
                    ]
                }
            )
        else:
            records.append({"text": f"The words {words} belong to the {answer} group."})
    return records


def synthetic_dataset(n: int, seed: int = 0, fmt: Format = "alpaca") -> list[dict[str, Any]]:
    return synthetic_records(n, seed, fmt)


def distinct_records(n: int) -> Iterable[dict[str, Any]]:
    """Examples that share no lines: cleaning and near-duplicate detection take minutes on 100,000."""
    for i in range(n):
        yield {"instruction": f"question {i} about things", "input": f"{i * 7} {i * 13}", "output": "a"}


def write_jsonl(records: Iterable[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")
    return path


def default_corpus() -> list[str]:
    """Words alone and in sentences, so each word is one token at a line start and after a space."""
    base = [*WORDS, *GROUPS, " ".join(WORDS), QUESTION, "Answer with one word.", "user assistant system"]
    base += ["### Instruction:", "### Response:"]
    return base + [r["text"] for r in synthetic_records(400, seed=1, fmt="text")]


def build_tiny_tokenizer(
    out_dir: Path,
    corpus: Sequence[str] | None = None,
    vocab_size: int = 600,
    chat_template: str | None = CHATML_TEMPLATE,
) -> Path:
    """Train a byte-level BPE tokenizer locally and save it with `save_pretrained`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus or default_corpus()), trainer=trainer)
    fast_class: Any = PreTrainedTokenizerFast
    names = dict(zip(("bos_token", "unk_token", "pad_token"), ("<s>", "<unk>", "<pad>"), strict=True))
    fast = fast_class(
        tokenizer_object=tok,
        eos_token="<|im_end|>" if chat_template == CHATML_TEMPLATE else "</s>",
        **names,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


def build_tiny_model(
    out_dir: Path,
    tokenizer_dir: Path | None = None,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    context: int = 256,
    seed: int = 0,
) -> Path:
    """A random-initialized Llama-architecture causal LM (and its tokenizer) saved to `out_dir`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer_dir = tokenizer_dir or build_tiny_tokenizer(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# --- speech ----------------------------------------------------------------------------------------------

WHISPER_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|transcribe|>",
    "<|translate|>",
    "<|notimestamps|>",
]
SPEECH_RATE = 16_000
SPEECH_WINDOW_SECONDS = 2  # the tiny feature extractor reads 2 s windows (Whisper itself: 30 s)
_TONE_HZ = {word: 200.0 + 60.0 * i for i, word in enumerate(WORDS)}  # one pitch per word


def build_tiny_whisper(out_dir: Path, seed: int = 0) -> Path:
    """A random-initialized Whisper (WhisperConfig with tiny sizes), its feature extractor and a BPE
    tokenizer trained locally on WORDS, saved with `save_pretrained` as one model folder."""
    import torch
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    tokenizer = WhisperTokenizer(
        **_whisper_vocab(),
        pad_token=WHISPER_SPECIAL_TOKENS[0],  # <|endoftext|>, as in Whisper
        additional_special_tokens=WHISPER_SPECIAL_TOKENS[1:],
    )
    extractor_class: Any = WhisperFeatureExtractor  # untyped in transformers
    features = extractor_class(feature_size=16, sampling_rate=SPEECH_RATE, chunk_length=SPEECH_WINDOW_SECONDS)
    start: Any = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=16,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=features.nb_max_frames // 2,  # the encoder's convolutions halve the frames
        max_target_positions=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=start,
        suppress_tokens=[],
        begin_suppress_tokens=None,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    WhisperForConditionalGeneration(config).save_pretrained(out_dir, safe_serialization=True)
    processor_class: Any = WhisperProcessor
    processor_class(feature_extractor=features, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


def _whisper_vocab() -> dict[str, Any]:
    """Byte-level BPE vocab and merges, as WhisperTokenizer takes them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=WHISPER_SPECIAL_TOKENS[:1],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*WORDS, *(f" {w}" for w in WORDS), " ".join(WORDS)], trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return {"vocab": model["vocab"], "merges": merges}


def tone(word: str, seconds: float, rate: int = SPEECH_RATE, seed: int = 0) -> Any:
    """A clip standing in for a spoken word: the word's pitch plus a little noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * _TONE_HZ[word] * t) + 0.02 * rng.standard_normal(t.size)
    return wave.astype(np.float32)


def write_clip(path: Path, samples: Any, rate: int = SPEECH_RATE) -> Path:
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), samples, rate)
    return path


def synthetic_speech(folder: Path, n: int, seed: int = 0) -> Path:
    """`n` clips of one word each (0.3 to 1.0 s) and `data.jsonl` with {"audio", "text"} records;
    the audio paths are relative to the JSONL file."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test data
    records = []
    for i in range(n):
        word = rng.choice(WORDS)
        clip = write_clip(folder / "clips" / f"{i:04d}.wav", tone(word, rng.uniform(0.3, 1.0), seed=i))
        records.append({"audio": clip.relative_to(folder).as_posix(), "text": word})
    return write_jsonl(records, folder / "data.jsonl")
