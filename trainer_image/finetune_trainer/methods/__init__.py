"""Fine-tuning methods: how the model is loaded and wrapped (lora, qlora, full)."""

from finetune_trainer.methods.loading import MethodError, load_for_training, load_tokenizer

__all__ = ["MethodError", "load_for_training", "load_tokenizer"]
