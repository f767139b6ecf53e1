"""Speech fine-tuning (`dataset.format: audio`): Whisper-style encoder-decoder models.

The model folder holds the model and its processor (feature extractor and tokenizer). Clips are
read and turned into log-mel features when a batch is built; transcripts are scored by word error
rate (WER) from greedy transcriptions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from finetune_trainer import evaluation
from finetune_trainer.config import Method, ModelSource
from finetune_trainer.data.audio import Clip, label_ids, read_clip
from finetune_trainer.data.tokenization import IGNORE_INDEX
from finetune_trainer.methods.loading import MethodError

log = logging.getLogger(__name__)


def load_processor(path: str, revision: str | None) -> Any:
    from transformers import AutoProcessor

    auto: Any = AutoProcessor  # untyped in transformers
    processor = auto.from_pretrained(path, revision=revision)
    if not hasattr(processor, "feature_extractor") or not hasattr(processor, "tokenizer"):
        raise MethodError(
            f"model.source: {path!r} has no speech processor (feature extractor and tokenizer) "
            "(fix: use a Whisper-style speech model with dataset.format: audio)"
        )
    return processor


def model_window(processor: Any) -> tuple[int, float]:
    """The sample rate and window length (seconds) the model's feature extractor reads."""
    features = processor.feature_extractor
    return int(features.sampling_rate), float(features.chunk_length)


def load_speech_model(path: str, model: ModelSource, method: Method) -> Any:
    from transformers import AutoModelForSpeechSeq2Seq

    dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(model.dtype, "auto")
    loaded = AutoModelForSpeechSeq2Seq.from_pretrained(path, revision=model.revision, dtype=dtype)
    if method.type == "full":
        return loaded
    from peft import LoraConfig, get_peft_model

    lora = method.lora
    # No task type: the encoder-decoder forward takes input_features, which peft passes through.
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules
    )
    wrapped = get_peft_model(loaded, config)
    trainable, total = wrapped.get_nb_trainable_parameters()
    log.info("lora adapter: %d trainable of %d parameters", trainable, total)
    return wrapped


class SpeechCollator:
    """Reads a batch of clips, computes log-mel features, pads the labels with -100."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.rate, _window = model_window(processor)

    def features(self, clips: Sequence[Clip]) -> Any:
        audio = [read_clip(c, self.rate) for c in clips]
        extracted = self.processor.feature_extractor(audio, sampling_rate=self.rate, return_tensors="pt")
        return extracted.input_features

    def __call__(self, clips: list[Clip]) -> dict[str, Any]:
        import torch

        width = max(len(c.label_ids) for c in clips)
        labels = [[*c.label_ids, *[IGNORE_INDEX] * (width - len(c.label_ids))] for c in clips]
        return {"input_features": self.features(clips), "labels": torch.tensor(labels, dtype=torch.long)}


def decoder_prefix(decoder_start: int, tokenizer: Any) -> list[int]:
    """What a transcription starts from: the start token and the tokenizer's prefix (language,
    task, no timestamps), as the labels are built (see label_ids)."""
    return [decoder_start, *label_ids(tokenizer, "")[:-1]]


def transcript_max_new_tokens(
    configured: int | None, clips: Sequence[Clip], max_target_positions: int, prefix: int
) -> int:
    """validation.maxNewTokens, or the longest held-out transcript's labels plus a margin; at most
    what the decoder's positions leave after the prefix (max_target_positions, 448 for Whisper)."""
    room = max(1, max_target_positions - prefix)
    lengths = [len(c.label_ids) for c in clips]
    return min(room, evaluation.derived_max_new_tokens(configured, lengths, cap=room))


def wer_normalizer(language: str | None, spelling: Mapping[str, str] | None) -> Callable[[str], str]:
    """Whisper's EnglishTextNormalizer (spelled-out numbers, British spellings, contractions) for
    English transcripts when the tokenizer's files carry the spelling mapping (normalizer.json, as
    OpenAI's Whisper checkpoints do); else BasicTextNormalizer (lower case, no punctuation or
    bracketed asides), which suits every language. A tokenizer without a language counts as English."""
    english = language is None or language.lower() in ("en", "english")
    if english and spelling:
        from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

        english_class: Any = EnglishTextNormalizer  # untyped in transformers
        normalize: Callable[[str], str] = english_class(dict(spelling))
        return normalize
    return evaluation.basic_normalizer()


def transcribe(model: Any, collator: SpeechCollator, clips: Sequence[Clip], max_new_tokens: int) -> list[str]:
    """Greedy transcriptions, a batch at a time, ending at end of text."""
    import torch

    tokenizer = collator.processor.tokenizer
    prefix = decoder_prefix(model.config.decoder_start_token_id, tokenizer)
    room = int(getattr(model.config, "max_target_positions", len(prefix) + max_new_tokens)) - len(prefix)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    synced = evaluation.sharded(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            features = collator.features(clips).to(next(model.parameters()).device)
            encoded = model.get_encoder()(input_features=features)
            ids = torch.tensor([prefix] * len(clips), device=features.device)
            done = torch.zeros(len(clips), dtype=torch.bool, device=features.device)
            for _ in range(max(1, min(max_new_tokens, room))):  # past its positions the decoder fails
                logits = model(encoder_outputs=encoded, decoder_input_ids=ids).logits[:, -1]
                step = torch.where(done, torch.full_like(done, pad, dtype=torch.long), logits.argmax(-1))
                ids, done = torch.cat([ids, step[:, None]], dim=1), done | (step == eos)
                if evaluation.finished_everywhere(bool(done.all()), synced, done.device):
                    break
    finally:
        model.train(was_training)
    return [str(t).strip() for t in tokenizer.batch_decode(ids[:, len(prefix) :], skip_special_tokens=True)]


def evaluate_speech(
    trainer: Any, collator: SpeechCollator, clips: Sequence[Clip], limit: int, max_new_tokens: int
) -> dict[str, float]:
    """Loss and perplexity on the held-out clips, and WER on up to `limit` of them (see wer_normalizer)."""
    if not clips:
        return {}
    loss = trainer.evaluate(eval_dataset=list(clips), metric_key_prefix="heldout")["heldout_loss"]
    scored = list(clips[:limit])
    predictions: list[str] = []
    for start in range(0, len(scored), 16):
        predictions += transcribe(trainer.model, collator, scored[start : start + 16], max_new_tokens)
    tokenizer = collator.processor.tokenizer
    normalize = wer_normalizer(
        getattr(tokenizer, "language", None), getattr(tokenizer, "english_spelling_normalizer", None)
    )
    wer = evaluation.word_error_rate(predictions, [c.text for c in scored], normalize)
    return evaluation.loss_metrics(float(loss)) | {"wer": wer}
