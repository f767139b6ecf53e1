"""Model size without guessing: parameter counts from config.json and safetensors metadata, read
from a hub (a local HTTP server stands in) or from S3 (a real versitygw server), and the MemoryFits
message saying where the number came from."""

from __future__ import annotations

import base64
import json
import math
import os
import secrets
import struct
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from finetune_operator import api, model_info, model_size, policy
from finetune_operator.policy import ModelSize, Verdict
from finetune_operator.settings import OperatorSettings
from localcluster.processes import free_port
from localcluster.s3 import S3Server

Spec = dict[str, Any]
REPO = Path(__file__).resolve().parents[2]

# config.json of real models (the fields that set the size), the size their publishers state, and
# the exact count transformers' num_parameters() gives for that config (checked with transformers
# 5.24 on the meta device), which catches what 1% cannot: biases, norms, a router.
SMOLLM2_135M = {
    "model_type": "llama",
    "attention_bias": False,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "mlp_bias": False,
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "vocab_size": 49152,
}
LLAMA_32_1B = {
    "model_type": "llama",
    "head_dim": 64,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
PUBLISHED: list[tuple[str, dict[str, Any], float, int]] = [
    ("SmolLM2-135M", SMOLLM2_135M, 134.5e6, 134_515_008),
    ("Llama-3.2-1B", LLAMA_32_1B, 1.24e9, 1_235_814_400),
    (
        "Llama-2-7b",
        {
            "model_type": "llama",
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "num_key_value_heads": 32,
            "tie_word_embeddings": False,
            "vocab_size": 32000,
        },
        6.74e9,
        6_738_415_616,
    ),
    (
        "Mistral-7B-v0.1",
        {
            "model_type": "mistral",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "num_key_value_heads": 8,
            "tie_word_embeddings": False,
            "vocab_size": 32000,
        },
        7.24e9,
        7_241_732_096,
    ),
    (
        "Mixtral-8x7B-v0.1",
        {
            "model_type": "mixtral",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "num_key_value_heads": 8,
            "num_local_experts": 8,
            "tie_word_embeddings": False,
            "vocab_size": 32000,
        },
        46.7e9,
        46_702_792_704,
    ),
    (
        "Qwen2.5-0.5B",
        {
            "model_type": "qwen2",
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_attention_heads": 14,
            "num_hidden_layers": 24,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
            "vocab_size": 151936,
        },
        0.49e9,
        494_032_768,
    ),
    (
        "Qwen3-0.6B",
        {
            "model_type": "qwen3",
            "attention_bias": False,
            "head_dim": 128,
            "hidden_size": 1024,
            "intermediate_size": 3072,
            "num_attention_heads": 16,
            "num_hidden_layers": 28,
            "num_key_value_heads": 8,
            "tie_word_embeddings": True,
            "vocab_size": 151936,
        },
        0.6e9,
        596_049_920,
    ),
    (
        "gemma-2b",
        {
            "model_type": "gemma",
            "head_dim": 256,
            "hidden_size": 2048,
            "intermediate_size": 16384,
            "num_attention_heads": 8,
            "num_hidden_layers": 18,
            "num_key_value_heads": 1,
            "vocab_size": 256000,
        },
        2.51e9,
        2_506_172_416,
    ),
    (
        "gemma-2-2b",
        {
            "model_type": "gemma2",
            "head_dim": 256,
            "hidden_size": 2304,
            "intermediate_size": 9216,
            "num_attention_heads": 8,
            "num_hidden_layers": 26,
            "num_key_value_heads": 4,
            "vocab_size": 256000,
        },
        2.61e9,
        2_614_341_888,
    ),
    (
        "gemma-3-1b",
        {
            "model_type": "gemma3_text",
            "head_dim": 256,
            "hidden_size": 1152,
            "intermediate_size": 6912,
            "num_attention_heads": 4,
            "num_hidden_layers": 26,
            "num_key_value_heads": 1,
            "vocab_size": 262144,
        },
        1.0e9,
        999_885_952,
    ),
    (
        "Phi-3-mini-4k",
        {
            "model_type": "phi3",
            "hidden_size": 3072,
            "intermediate_size": 8192,
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "num_key_value_heads": 32,
            "tie_word_embeddings": False,
            "vocab_size": 32064,
        },
        3.82e9,
        3_821_079_552,
    ),
    (
        "gpt2",
        {
            "model_type": "gpt2",
            "n_embd": 768,
            "n_head": 12,
            "n_inner": None,
            "n_layer": 12,
            "n_positions": 1024,
            "vocab_size": 50257,
        },
        124.4e6,
        124_439_808,
    ),
    (
        "pythia-160m",
        {
            "model_type": "gpt_neox",
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "tie_word_embeddings": False,
            "vocab_size": 50304,
        },
        162.3e6,
        162_322_944,
    ),
    (
        "whisper-tiny",
        {
            "model_type": "whisper",
            "d_model": 384,
            "decoder_ffn_dim": 1536,
            "decoder_layers": 4,
            "encoder_ffn_dim": 1536,
            "encoder_layers": 4,
            "max_source_positions": 1500,
            "max_target_positions": 448,
            "num_mel_bins": 80,
            "vocab_size": 51865,
        },
        37.8e6,
        37_760_640,
    ),
]


@pytest.mark.parametrize(
    ("config", "published", "exact"), [c[1:] for c in PUBLISHED], ids=[c[0] for c in PUBLISHED]
)
def test_config_counts_match_published_sizes(config: dict[str, Any], published: float, exact: int) -> None:
    assert model_size.count_config_parameters(config) == pytest.approx(published, rel=0.01)
    assert model_size.count_config_parameters(config) == exact


def test_an_untied_lm_head_counts_the_embedding_twice() -> None:
    tied = model_size.count_config_parameters(LLAMA_32_1B)
    untied = model_size.count_config_parameters({**LLAMA_32_1B, "tie_word_embeddings": False})
    assert untied - tied == 128256 * 2048


@pytest.mark.parametrize(
    ("config", "phrases"),
    [
        ({"model_type": "mamba", "hidden_size": 768}, ["model_type 'mamba'", "llama", "whisper"]),
        ({"hidden_size": 768}, ["model_type None"]),
        ({**SMOLLM2_135M, "hidden_size": None}, ["config.json has no hidden_size"]),
        ({**SMOLLM2_135M, "num_hidden_layers": "thirty"}, ["num_hidden_layers is 'thirty', not a count"]),
    ],
    ids=["unknown-architecture", "no-model-type", "missing-field", "bad-field"],
)
def test_a_config_that_cannot_be_counted_says_why(config: dict[str, Any], phrases: list[str]) -> None:
    with pytest.raises(ValueError) as raised:
        model_size.count_config_parameters(config)
    for phrase in phrases:
        assert phrase in str(raised.value)


def smollm2_header() -> dict[str, Any]:
    """The tensors of SmolLM2-135M's model.safetensors (tied: no lm_head), offsets included."""
    shapes: dict[str, list[int]] = {"model.embed_tokens.weight": [49152, 576], "model.norm.weight": [576]}
    for layer in range(30):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": [576, 576],
            p + "self_attn.k_proj.weight": [192, 576],
            p + "self_attn.v_proj.weight": [192, 576],
            p + "self_attn.o_proj.weight": [576, 576],
            p + "mlp.gate_proj.weight": [1536, 576],
            p + "mlp.up_proj.weight": [1536, 576],
            p + "mlp.down_proj.weight": [576, 1536],
            p + "input_layernorm.weight": [576],
            p + "post_attention_layernorm.weight": [576],
        }
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return header


def safetensors_bytes(header: Mapping[str, Any], data: bytes = b"\0" * 64) -> bytes:
    """A model.safetensors: 8-byte little-endian header length, the JSON header, then data (here
    only a token amount: the operator never reads past the header)."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_the_safetensors_header_gives_the_exact_count() -> None:
    assert model_size.count_safetensors_parameters(smollm2_header()) == 134_515_008
    assert model_size.count_safetensors_parameters(smollm2_header()) == model_size.count_config_parameters(
        SMOLLM2_135M
    )


@pytest.mark.parametrize(
    ("header", "phrase"),
    [
        ({"w": {"dtype": "BF16", "data_offsets": [0, 2]}}, "'w' has no shape list"),
        ({"w": {"dtype": "BF16", "shape": [2, "x"]}}, "'w' has no shape list"),
        ({"qweight": {"dtype": "I32", "shape": [4096, 512]}}, "packed I32 (a quantized model)"),
    ],
)
def test_a_header_that_cannot_be_counted_says_why(header: dict[str, Any], phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        model_size.count_safetensors_parameters(header)


def in_memory(files: Mapping[str, bytes]) -> model_info.ModelFiles:
    def read(name: str, byte_range: tuple[int, int] | None, limit: int) -> bytes:
        if name not in files:
            raise model_info.ReadError("HTTP 404", absent=True)
        body = files[name]
        return body if byte_range is None else body[byte_range[0] : byte_range[1] + 1]

    return model_info.ModelFiles("mem://model", read)


def test_a_file_written_by_the_safetensors_library_is_read_by_its_header() -> None:
    np = pytest.importorskip("numpy")
    save = pytest.importorskip("safetensors.numpy").save
    tensors = {"embed": np.zeros((100, 16), dtype=np.float16), "norm": np.ones(16, dtype=np.float32)}
    header = model_info.safetensors_header(in_memory({"model.safetensors": save(tensors)}))
    assert model_size.count_safetensors_parameters(header) == 100 * 16 + 16


@pytest.mark.parametrize(
    ("metadata", "dtype", "expected"),
    [
        ({"total_parameters": 8_030_261_248, "total_size": 16_100_000_000}, "bfloat16", 8_030_261_248),
        ({"total_size": 16_060_522_496}, "bfloat16", 8_030_261_248),
        ({"total_size": 16_060_522_496}, "float32", 4_015_130_624),
        ({"total_size": 16_060_522_496}, None, "the dtype None is unknown"),
        ({}, "bfloat16", "metadata has no total_size"),
    ],
)
def test_a_sharded_index_gives_its_total(
    metadata: dict[str, Any], dtype: str | None, expected: int | str
) -> None:
    index = {"metadata": metadata, "weight_map": {}}
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            model_size.count_safetensors_index_parameters(index, dtype)
    else:
        assert model_size.count_safetensors_index_parameters(index, dtype) == expected


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (134_515_008, "134.5M"),
        (1_235_814_400, "1.236B"),
        (7e9, "7B"),
        (46_702_792_704, "46.7B"),
        (1.5e12, "1.5T"),
    ],
)
def test_counts_are_written_the_way_spec_model_parameters_takes_them(count: float, text: str) -> None:
    assert policy.format_parameter_count(count) == text
    assert policy.parse_parameter_count(text) == pytest.approx(count, rel=5e-4)


# ---------------------------------------------------------------------------------------------
# Where the number came from, in the decision and the MemoryFits message

ACCESS_DENIED = ModelSize(
    failure="the model's config.json could not be read from s3://models/llama/config.json "
    "(HTTP 403 AccessDenied)"
)


@pytest.mark.parametrize(
    ("parameters", "looked_up", "count", "phrase"),
    [
        ("1B", ModelSize(134_515_008, "config.json"), 1e9, "1B parameters"),
        (None, ModelSize(134_515_008, "config.json"), 134_515_008, "134.5M parameters (from config.json)"),
        (
            None,
            ModelSize(1_235_814_400, "the model.safetensors header"),
            1_235_814_400,
            "1.236B parameters (from the model.safetensors header)",
        ),
        (
            None,
            ACCESS_DENIED,
            7e9,
            "assumed 7B parameters (the model's config.json could not be read from "
            "s3://models/llama/config.json (HTTP 403 AccessDenied); set spec.model.parameters)",
        ),
        (
            None,
            None,
            7e9,
            "assumed 7B parameters (the model's size was not looked up; set spec.model.parameters)",
        ),
    ],
    ids=["spec-wins", "config", "header", "lookup-failed", "not-looked-up"],
)
def test_model_parameters_says_where_the_count_came_from(
    spec_dict: Callable[..., Spec],
    settings: OperatorSettings,
    parameters: str | None,
    looked_up: ModelSize | None,
    count: float,
    phrase: str,
) -> None:
    spec = api.parse_spec(spec_dict(model={"source": "s3://models/llama", "parameters": parameters}))
    assert policy.model_parameters(spec, settings, looked_up) == (pytest.approx(count), phrase)


@pytest.mark.parametrize(
    ("looked_up", "verdict", "phrases"),
    [
        (
            ModelSize(1_235_814_400, "config.json"),
            Verdict.OK,
            ["1.236B parameters (from config.json): LoRA needs"],
        ),
        (
            ACCESS_DENIED,
            Verdict.REFUSE,
            [
                "assumed 7B parameters",
                "could not be read from s3://models/llama/config.json (HTTP 403 AccessDenied)",
                "set spec.model.parameters",
                "LoRA needs about 17.",
                "does not fit",
            ],
        ),
    ],
    ids=["counted-fits", "assumed-refused"],
)
def test_a_1b_lora_job_on_a_16_gib_gpu(
    spec_dict: Callable[..., Spec],
    settings: OperatorSettings,
    looked_up: ModelSize,
    verdict: Verdict,
    phrases: list[str],
) -> None:
    spec = api.parse_spec(
        spec_dict(
            model={"source": "s3://models/llama", "parameters": None},
            method={"type": "lora"},
            resources={"nodeSelector": {"nvidia.com/gpu.memory": "16384"}},
        )
    )
    result = policy.preflight(
        spec,
        settings,
        namespace="team-a",
        secret_keys={"s3-creds": {"accessKeyId", "secretAccessKey"}},
        model_size=looked_up,
    )
    memory = next(f for f in result.findings if f.condition == "MemoryFits")
    assert memory.verdict == verdict, memory.message
    for phrase in phrases:
        assert phrase in memory.message


# ---------------------------------------------------------------------------------------------
# S3 request signing and addressing


def test_s3_requests_are_signed_as_aws_documents() -> None:
    # The GET Object example of the Signature Version 4 documentation (header-based auth).
    creds = model_info.S3Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    headers = model_info.sign_s3_get(
        "https://examplebucket.s3.amazonaws.com/test.txt",
        "us-east-1",
        creds,
        datetime(2013, 5, 24, tzinfo=UTC),
        {"Range": "bytes=0-9"},
    )
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )
    assert "wJalrXUtnFEMI" not in repr(creds)


@pytest.mark.parametrize(
    ("endpoint", "path_style", "url"),
    [
        ("http://127.0.0.1:7070", True, "http://127.0.0.1:7070/models/llama 3/config.json"),
        ("https://minio.lab/", False, "https://models.minio.lab/llama 3/config.json"),
        ("", True, "https://s3.eu-west-1.amazonaws.com/models/llama 3/config.json"),
        ("", False, "https://models.s3.eu-west-1.amazonaws.com/llama 3/config.json"),
    ],
)
def test_s3_object_urls(endpoint: str, path_style: bool, url: str) -> None:
    got = model_info.s3_object_url(endpoint, "eu-west-1", "models", "llama 3/config.json", path_style)
    assert got == url.replace(" ", "%20")


# ---------------------------------------------------------------------------------------------
# The hub, played by a local HTTP server


@dataclass
class FakeHub:
    """Serves files under /<repo>/resolve/<revision>/, honouring Range; records every request."""

    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    token: str | None = None  # when set, a request without this bearer token gets 401 GatedRepo
    redirects: dict[str, str] = field(default_factory=dict)  # path -> Location
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hub.requests.append((self.path, dict(self.headers.items())))
            if hub.token is not None and self.headers.get("Authorization") != f"Bearer {hub.token}":
                self._reply(
                    401, b"", {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access is restricted."}
                )
            elif self.path in hub.redirects:
                self._reply(302, b"", {"Location": hub.redirects[self.path]})
            elif self.path in hub.files:
                body, status = hub.files[self.path], 200
                wanted = self.headers.get("Range")
                if wanted:
                    start, end = (int(n) for n in wanted.removeprefix("bytes=").split("-"))
                    body, status = body[start : end + 1], 206
                self._reply(status, body, {})
            else:
                self._reply(404, b"", {"X-Error-Code": "EntryNotFound"})

        def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def _serve(hub: FakeHub) -> Iterator[FakeHub]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    yield from _serve(FakeHub())


@pytest.fixture
def cdn() -> Iterator[FakeHub]:
    """A second host, like the hub's file CDN."""
    yield from _serve(FakeHub())


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    model_info.forget_cached()
    yield
    model_info.forget_cached()


def no_secrets(name: str, key: str) -> str | None:
    raise AssertionError(f"no Secret should be read, got {name}/{key}")


def hub_spec(spec_dict: Callable[..., Spec], repo: str = "org/model", **model: Any) -> api.FineTuneJobSpec:
    return api.parse_spec(spec_dict(model={"source": f"hf://{repo}", "parameters": None, **model}))


def on(hub: FakeHub, **changes: Any) -> OperatorSettings:
    return OperatorSettings(hub_endpoint=hub.url, model_size_timeout=2.0, **changes)


def test_hub_model_counted_from_config_json(spec_dict: Callable[..., Spec], hub: FakeHub) -> None:
    hub.files["/org/model/resolve/main/config.json"] = json.dumps(SMOLLM2_135M).encode()
    size = model_info.look_up(hub_spec(spec_dict), on(hub), no_secrets)
    assert size == ModelSize(134_515_008, "config.json")
    assert hub.paths() == [
        "/org/model/resolve/main/config.json",
        "/org/model/resolve/main/model.safetensors",
        "/org/model/resolve/main/model.safetensors.index.json",
    ]


def test_hub_model_counted_from_the_safetensors_header_by_range(
    spec_dict: Callable[..., Spec], hub: FakeHub
) -> None:
    weights = safetensors_bytes(smollm2_header(), data=os.urandom(4096))
    hub.files["/org/model/resolve/main/config.json"] = json.dumps(SMOLLM2_135M).encode()
    hub.files["/org/model/resolve/main/model.safetensors"] = weights
    size = model_info.look_up(hub_spec(spec_dict), on(hub), no_secrets)
    assert size == ModelSize(134_515_008, "the model.safetensors header")
    ranges = [h.get("Range") for path, h in hub.requests if path.endswith("model.safetensors")]
    header_length = struct.unpack("<Q", weights[:8])[0]
    assert ranges == ["bytes=0-7", f"bytes=8-{8 + header_length - 1}"]  # never the weights


def test_hub_sharded_model_counted_from_its_index(spec_dict: Callable[..., Spec], hub: FakeHub) -> None:
    base = "/meta-llama/Llama-3.1-8B/resolve/main/"
    hub.files[base + "config.json"] = json.dumps({**LLAMA_32_1B, "torch_dtype": "bfloat16"}).encode()
    index = {"metadata": {"total_size": 16_060_522_496}, "weight_map": {}}
    hub.files[base + "model.safetensors.index.json"] = json.dumps(index).encode()
    size = model_info.look_up(hub_spec(spec_dict, "meta-llama/Llama-3.1-8B"), on(hub), no_secrets)
    assert size == ModelSize(8_030_261_248, "model.safetensors.index.json")


def test_the_pinned_revision_is_read(spec_dict: Callable[..., Spec], hub: FakeHub) -> None:
    hub.files["/org/model/resolve/refs%2Fpr%2F7/config.json"] = json.dumps(SMOLLM2_135M).encode()
    size = model_info.look_up(hub_spec(spec_dict, revision="refs/pr/7"), on(hub), no_secrets)
    assert size is not None and size.parameters == 134_515_008


def test_a_gated_model_without_a_token_says_how_to_give_one(
    spec_dict: Callable[..., Spec], hub: FakeHub
) -> None:
    hub.token = "hf_" + secrets.token_hex(8)
    size = model_info.look_up(hub_spec(spec_dict, "meta-llama/Llama-3.2-1B"), on(hub), no_secrets)
    assert size is not None and size.parameters is None
    assert size.failure == (
        f"the model's config.json could not be read from {hub.url}/meta-llama/Llama-3.2-1B/resolve/main/"
        "config.json (HTTP 401 GatedRepo: Access is restricted.; a gated or private model needs "
        "spec.env HF_TOKEN from a Secret)"
    )


def test_a_gated_model_is_read_with_the_jobs_hf_token(
    spec_dict: Callable[..., Spec], hub: FakeHub, cdn: FakeHub
) -> None:
    token = "hf_" + secrets.token_hex(8)
    hub.token = token
    base = "/meta-llama/Llama-3.2-1B/resolve/main/"
    hub.files[base + "config.json"] = json.dumps(LLAMA_32_1B).encode()
    # The hub sends weights to its CDN, another host: the token must not follow.
    hub.redirects[base + "model.safetensors"] = f"{cdn.url}/blob/weights"
    cdn.files["/blob/weights"] = safetensors_bytes({"w": {"dtype": "BF16", "shape": [1000, 1000]}})
    spec = api.parse_spec(
        spec_dict(
            model={"source": "hf://meta-llama/Llama-3.2-1B", "parameters": None},
            env=[{"name": "HF_TOKEN", "secretKeyRef": {"name": "hub", "key": "token"}}],
        )
    )
    read: list[tuple[str, str]] = []

    def read_secret(name: str, key: str) -> str | None:
        read.append((name, key))
        return token

    size = model_info.look_up(spec, on(hub), read_secret)
    assert size == ModelSize(1_000_000, "the model.safetensors header")
    assert read == [("hub", "token")]
    assert all("Authorization" not in headers for _, headers in cdn.requests)
    assert len(cdn.requests) == 2


def test_an_unreachable_hub_is_asked_once(
    spec_dict: Callable[..., Spec], monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    settings = OperatorSettings(hub_endpoint=closed, model_size_timeout=2.0)
    urls: list[str] = []
    get = model_info._get

    def counting_get(url: str, *args: Any, **kwargs: Any) -> bytes:
        urls.append(url)
        return get(url, *args, **kwargs)

    monkeypatch.setattr(model_info, "_get", counting_get)
    size = model_info.look_up(hub_spec(spec_dict), settings, no_secrets)
    assert urls == [f"{closed}/org/model/resolve/main/config.json"]
    assert size is not None and size.parameters is None
    assert size.failure.startswith(
        f"the model's config.json could not be read from {closed}/org/model/resolve/main/config.json ("
    )
    assert "refused" in size.failure.lower()


def test_an_architecture_the_operator_cannot_count_is_named(
    spec_dict: Callable[..., Spec], hub: FakeHub
) -> None:
    hub.files["/org/model/resolve/main/config.json"] = json.dumps({"model_type": "mamba"}).encode()
    size = model_info.look_up(hub_spec(spec_dict), on(hub), no_secrets)
    assert size is not None and size.parameters is None
    assert f"the model's config.json at {hub.url}/org/model/resolve/main/config.json cannot be counted" in (
        size.failure
    )
    assert "model_type 'mamba' is not one the operator counts" in size.failure


def test_lookups_are_cached_and_failures_retried(
    spec_dict: Callable[..., Spec], hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, settings = hub_spec(spec_dict), on(hub)
    hub.files["/org/model/resolve/main/config.json"] = json.dumps(SMOLLM2_135M).encode()
    first = model_info.look_up(spec, settings, no_secrets)
    asked = len(hub.requests)
    assert model_info.look_up(spec, settings, no_secrets) == first
    assert len(hub.requests) == asked

    other = hub_spec(spec_dict, "org/missing")
    missing = model_info.look_up(other, settings, no_secrets)
    assert missing is not None and missing.parameters is None
    asked = len(hub.requests)
    assert model_info.look_up(other, settings, no_secrets) == missing
    assert len(hub.requests) == asked  # a failure is kept a while too
    monkeypatch.setattr(model_info, "FAILURE_TTL_S", 0.0)
    model_info.look_up(other, settings, no_secrets)
    assert len(hub.requests) > asked


@pytest.mark.parametrize(
    ("model", "settings", "failure"),
    [
        ({"source": "hf://org/model", "parameters": "1B"}, {}, None),
        (
            {"source": "hf://org/model", "parameters": None},
            {"model_size_lookup": False},
            "the model's files were not read: FINETUNE_OPERATOR_MODEL_SIZE_LOOKUP is false",
        ),
        (
            {"source": "file:///models/llama", "parameters": None},
            {},
            "file:///models/llama is a path on the training node, which the operator cannot read",
        ),
    ],
    ids=["spec-says", "lookup-off", "local-path"],
)
def test_when_nothing_is_read(
    spec_dict: Callable[..., Spec],
    hub: FakeHub,
    model: dict[str, Any],
    settings: dict[str, Any],
    failure: str | None,
) -> None:
    size = model_info.look_up(api.parse_spec(spec_dict(model=model)), on(hub, **settings), no_secrets)
    assert (size.failure if size is not None else None) == failure
    assert hub.requests == []


# ---------------------------------------------------------------------------------------------
# S3: a real S3-compatible server (versitygw from hack/build-tools.sh)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> tuple[Any, str]:
    boto3 = pytest.importorskip("boto3")
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required"),
    )
    name = f"models-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=name)
    return client, name


def s3_spec(
    spec_dict: Callable[..., Spec], server: S3Server, bucket: str, **store: Any
) -> api.FineTuneJobSpec:
    return api.parse_spec(
        spec_dict(
            model={"source": f"s3://{bucket}/base/smol", "parameters": None},
            checkpoints={
                "store": {
                    "bucket": bucket,
                    "endpoint": server.endpoint,
                    "region": "us-east-1",
                    "credentialsSecret": "s3-creds",
                    **store,
                }
            },
        )
    )


def secrets_of(values: dict[tuple[str, str], str]) -> model_info.SecretReader:
    return lambda name, key: values.get((name, key))


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (("config.json",), ModelSize(134_515_008, "config.json")),
        (("config.json", "model.safetensors"), ModelSize(134_515_008, "the model.safetensors header")),
    ],
    ids=["config-only", "with-weights"],
)
def test_s3_model_read_with_the_jobs_credentials(
    spec_dict: Callable[..., Spec],
    s3_server: S3Server,
    s3_bucket: tuple[Any, str],
    files: tuple[str, ...],
    expected: ModelSize,
) -> None:
    client, bucket = s3_bucket
    bodies = {
        "config.json": json.dumps(SMOLLM2_135M).encode(),
        "model.safetensors": safetensors_bytes(smollm2_header()),
    }
    for name in files:
        client.put_object(Bucket=bucket, Key=f"base/smol/{name}", Body=bodies[name])
    read_secret = secrets_of(
        {
            ("s3-creds", "accessKeyId"): s3_server.access_key,
            ("s3-creds", "secretAccessKey"): s3_server.secret_key,
        }
    )
    size = model_info.look_up(s3_spec(spec_dict, s3_server, bucket), OperatorSettings(), read_secret)
    assert size == expected


@pytest.mark.parametrize(
    ("store", "wrong_secret", "phrases"),
    [
        ({}, True, ["HTTP 403 SignatureDoesNotMatch"]),
        (
            {"credentialsSecret": None},
            False,
            [
                "HTTP 403 AccessDenied",
                "read without credentials: spec.checkpoints.store.credentialsSecret is not set",
            ],
        ),
    ],
    ids=["wrong-secret", "no-credentials-secret"],
)
def test_s3_access_denied_says_what_was_tried(
    spec_dict: Callable[..., Spec],
    s3_server: S3Server,
    s3_bucket: tuple[Any, str],
    store: dict[str, Any],
    wrong_secret: bool,
    phrases: list[str],
) -> None:
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="base/smol/config.json", Body=json.dumps(SMOLLM2_135M).encode())
    wrong = "not-" + s3_server.secret_key
    read_secret = secrets_of(
        {("s3-creds", "accessKeyId"): s3_server.access_key, ("s3-creds", "secretAccessKey"): wrong}
    )
    spec = s3_spec(spec_dict, s3_server, bucket, **store)
    size = model_info.look_up(spec, OperatorSettings(), read_secret if wrong_secret else no_secrets)
    assert size is not None and size.parameters is None
    assert size.failure.startswith(
        f"the model's config.json could not be read from s3://{bucket}/base/smol/config.json ("
    )
    for phrase in phrases:
        assert phrase in size.failure
    assert wrong not in size.failure and s3_server.secret_key not in size.failure


# ---------------------------------------------------------------------------------------------
# Settings


def test_the_lookup_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_OPERATOR_HUB_ENDPOINT", "https://hf-mirror.lab")
    monkeypatch.setenv("FINETUNE_OPERATOR_MODEL_SIZE_TIMEOUT", "2s")
    monkeypatch.setenv("FINETUNE_OPERATOR_MODEL_SIZE_LOOKUP", "false")
    settings = OperatorSettings()
    assert (settings.hub_endpoint, settings.model_size_timeout, settings.model_size_lookup) == (
        "https://hf-mirror.lab",
        2.0,
        False,
    )
    defaults = OperatorSettings.model_fields
    assert defaults["hub_endpoint"].default == "https://huggingface.co"
    assert (defaults["model_size_lookup"].default, defaults["model_size_timeout"].default) == (True, 5.0)


@pytest.mark.parametrize(("name", "value"), [("HUB_ENDPOINT", "huggingface.co"), ("MODEL_SIZE_TIMEOUT", "0")])
def test_bad_lookup_settings_are_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv(f"FINETUNE_OPERATOR_{name}", value)
    with pytest.raises(ValidationError, match=name.lower()):
        OperatorSettings()


# ---------------------------------------------------------------------------------------------
# The handler's call site: preflight gets the looked-up size, the token from the job's Secret


@dataclass
class FakeCore:
    secrets: dict[str, dict[str, str]]

    def read_namespaced_secret(self, name: str, namespace: str) -> Any:
        from types import SimpleNamespace

        from kubernetes.client.rest import ApiException

        if name not in self.secrets:
            raise ApiException(status=404, reason="Not Found")
        data = {k: base64.b64encode(v.encode()).decode() for k, v in self.secrets[name].items()}
        return SimpleNamespace(data=data, string_data=None, metadata=SimpleNamespace(resource_version="1"))


@dataclass
class FakeKube:
    core: FakeCore

    def secret_keys(self, namespace: str, names: set[str]) -> tuple[dict[str, set[str]], dict[str, str]]:
        return {n: set(self.core.secrets[n]) for n in names if n in self.core.secrets}, {}

    def node_labels(self) -> tuple[list[dict[str, str]], list[str]]:
        return [], []


def test_the_handler_sizes_the_job_from_the_model_files(
    spec_dict: Callable[..., Spec], hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_operator import handlers

    token = "hf_" + secrets.token_hex(8)
    hub.token = token
    hub.files["/meta-llama/Llama-3.2-1B/resolve/main/config.json"] = json.dumps(LLAMA_32_1B).encode()
    kube = FakeKube(
        FakeCore(
            {"s3-creds": {"accessKeyId": "a", "secretAccessKey": "b"}, "hub": {"token": token}},
        )
    )
    monkeypatch.setitem(handlers._state, "settings", on(hub, environment=api.Environment.ONPREM))
    monkeypatch.setitem(handlers._state, "kube", kube)
    spec = api.parse_spec(
        spec_dict(
            model={"source": "hf://meta-llama/Llama-3.2-1B", "parameters": None},
            method={"type": "lora"},
            env=[{"name": "HF_TOKEN", "secretKeyRef": {"name": "hub", "key": "token"}}],
            resources={"nodeSelector": {"nvidia.com/gpu.memory": "16384"}},
        )
    )
    result, _ = handlers._preflight(spec, "team-a")
    memory = next(f for f in result.findings if f.condition == "MemoryFits")
    assert memory.verdict == Verdict.OK, memory.message
    assert memory.message.startswith("1.236B parameters (from config.json): LoRA needs about")
    assert token not in memory.message and token not in result.decision.reason
