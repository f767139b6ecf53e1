"""Parameter counts from a model's own files: its config.json, a safetensors header, or the index of
sharded weights. Pure functions; `model_info` fetches the files and `policy` uses the count."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class _Decoder:
    """How a decoder family lays out its weights beyond what config.json says."""

    tied_by_default: bool
    qkv_bias: bool = False  # q, k and v always have biases (Qwen2), whatever attention_bias says
    norms_per_layer: int = 2  # RMSNorm weights of hidden size
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys


# Keyed by config.json model_type; the defaults are those of the transformers config classes.
_DECODERS = {
    "llama": _Decoder(tied_by_default=False),
    "mistral": _Decoder(tied_by_default=False),
    "mixtral": _Decoder(tied_by_default=False),
    "qwen2": _Decoder(tied_by_default=False, qkv_bias=True),
    "qwen3": _Decoder(tied_by_default=False, qk_norm=True),
    "gemma": _Decoder(tied_by_default=True),
    "gemma2": _Decoder(tied_by_default=True, norms_per_layer=4),
    "gemma3_text": _Decoder(tied_by_default=True, norms_per_layer=4, qk_norm=True),
    "phi3": _Decoder(tied_by_default=False),
}
COUNTED_MODEL_TYPES = (*_DECODERS, "gpt2", "gpt_neox", "whisper")


def _size(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"config.json has no {key}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"config.json {key} is {value!r}, not a count")
    return value


def _tied(config: Mapping[str, Any], default: bool) -> bool:
    value = config.get("tie_word_embeddings")
    return default if value is None else bool(value)


def count_config_parameters(config: Mapping[str, Any]) -> int:
    """Parameters of a model from its config.json, as transformers' num_parameters() counts them:
    embeddings, an untied lm_head, attention (grouped-query: k and v have num_key_value_heads),
    the MLP (gated: 3 matrices; GPT-style: 2 with biases) and the norms. Raises ValueError naming the
    model_type or the field it cannot count."""
    model_type = config.get("model_type")
    if model_type in _DECODERS:
        return _decoder_parameters(config, _DECODERS[model_type])
    if model_type == "gpt2":
        return _gpt2_parameters(config)
    if model_type == "gpt_neox":
        return _gpt_neox_parameters(config)
    if model_type == "whisper":
        return _whisper_parameters(config)
    raise ValueError(
        f"config.json model_type {model_type!r} is not one the operator counts "
        f"({', '.join(COUNTED_MODEL_TYPES)})"
    )


def _decoder_parameters(config: Mapping[str, Any], family: _Decoder) -> int:
    hidden, layers = _size(config, "hidden_size"), _size(config, "num_hidden_layers")
    heads, vocab = _size(config, "num_attention_heads"), _size(config, "vocab_size")
    if heads == 0:
        raise ValueError("config.json num_attention_heads is 0, not a count of heads")
    kv_heads = _size(config, "num_key_value_heads", heads)
    head_dim = _size(config, "head_dim", hidden // heads)
    queries, keys = heads * head_dim, kv_heads * head_dim
    attention = hidden * queries + 2 * hidden * keys + queries * hidden
    if family.qkv_bias:
        attention += queries + 2 * keys
    elif config.get("attention_bias"):
        attention += queries + 2 * keys + hidden
    intermediate = _size(config, "intermediate_size")
    mlp = 3 * hidden * intermediate + (2 * intermediate + hidden if config.get("mlp_bias") else 0)
    experts = _size(config, "num_local_experts", 1)
    if experts > 1:
        mlp = experts * mlp + hidden * experts  # plus the router
    norms = family.norms_per_layer * hidden + (2 * head_dim if family.qk_norm else 0)
    embeddings = vocab * hidden * (1 if _tied(config, family.tied_by_default) else 2)
    return embeddings + layers * (attention + mlp + norms) + hidden


def _gpt2_parameters(config: Mapping[str, Any]) -> int:
    hidden, layers = _size(config, "n_embd"), _size(config, "n_layer")
    inner = _size(config, "n_inner", 4 * hidden)
    vocab, positions = _size(config, "vocab_size"), _size(config, "n_positions")
    norms = 2 * 2 * hidden  # two LayerNorms, weight and bias
    attention = 4 * hidden * hidden + 4 * hidden  # fused q, k, v and the output projection
    mlp = 2 * hidden * inner + inner + hidden
    layer = norms + attention + mlp
    embeddings = vocab * hidden * (1 if _tied(config, True) else 2) + positions * hidden
    return embeddings + layers * layer + 2 * hidden


def _gpt_neox_parameters(config: Mapping[str, Any]) -> int:
    hidden, layers = _size(config, "hidden_size"), _size(config, "num_hidden_layers")
    intermediate, vocab = _size(config, "intermediate_size"), _size(config, "vocab_size")
    bias = config.get("attention_bias", True) is not False
    attention = 4 * hidden * hidden + (4 * hidden if bias else 0)
    mlp = 2 * hidden * intermediate + intermediate + hidden
    layer = 2 * 2 * hidden + attention + mlp
    embeddings = vocab * hidden * (1 if _tied(config, False) else 2)
    return embeddings + layers * layer + 2 * hidden


def _whisper_parameters(config: Mapping[str, Any]) -> int:
    hidden, vocab = _size(config, "d_model"), _size(config, "vocab_size")
    attention = 4 * hidden * hidden + 3 * hidden  # k has no bias
    norm = 2 * hidden

    def ffn(size: int) -> int:
        return hidden * size + size + size * hidden + hidden

    encoder_layer = attention + norm + ffn(_size(config, "encoder_ffn_dim")) + norm
    decoder_layer = 2 * (attention + norm) + ffn(_size(config, "decoder_ffn_dim")) + norm
    convolutions = (_size(config, "num_mel_bins") + hidden) * hidden * 3 + 2 * hidden  # kernel 3
    encoder = (
        convolutions
        + _size(config, "max_source_positions") * hidden
        + _size(config, "encoder_layers") * encoder_layer
        + norm
    )
    decoder = (
        vocab * hidden * (1 if _tied(config, True) else 2)
        + _size(config, "max_target_positions") * hidden
        + _size(config, "decoder_layers") * decoder_layer
        + norm
    )
    return encoder + decoder


# safetensors dtype names of packed integer tensors: GPTQ, AWQ and bitsandbytes store several
# weights per element, so their shapes undercount the model.
_PACKED_DTYPES = frozenset({"I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64"})


def count_safetensors_parameters(header: Mapping[str, Any]) -> int:
    """Elements of every tensor in a safetensors header (its JSON: name -> dtype, shape, offsets).
    Raises ValueError for a malformed header or packed (quantized) integer weights."""
    total = 0
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        shape = tensor.get("shape") if isinstance(tensor, Mapping) else None
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise ValueError(f"safetensors header entry {name!r} has no shape list")
        if tensor.get("dtype") in _PACKED_DTYPES and len(shape) >= 2:
            raise ValueError(f"safetensors tensor {name!r} is packed {tensor['dtype']} (a quantized model)")
        total += math.prod(shape)
    return total


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def count_safetensors_index_parameters(index: Mapping[str, Any], dtype: str | None) -> int:
    """Parameters of sharded weights from model.safetensors.index.json: its metadata.total_parameters
    (recent transformers write it), else metadata.total_size in bytes over the config's dtype."""
    metadata = index.get("metadata")
    if not isinstance(metadata, Mapping):
        raise ValueError("model.safetensors.index.json has no metadata")
    exact = metadata.get("total_parameters")
    if isinstance(exact, int) and not isinstance(exact, bool) and exact > 0:
        return exact
    size = metadata.get("total_size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError("model.safetensors.index.json metadata has no total_size")
    if dtype not in DTYPE_BYTES:
        raise ValueError(
            f"model.safetensors.index.json total_size is in bytes and the dtype {dtype!r} is unknown"
        )
    return size // DTYPE_BYTES[dtype]
