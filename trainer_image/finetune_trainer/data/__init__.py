"""Data preparation: load, clean, dedupe, split, format, tokenize, chunk."""

from finetune_trainer.data.errors import DataError

__all__ = ["DataError"]
