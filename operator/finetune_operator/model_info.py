"""The base model's parameter count, read from the model's own files before launch.

Without spec.model.parameters a job would be sized as the operator's default (7B); a 1B model
would then be refused GPUs it fits on. The handler calls `look_up` before preflight, and
`policy.model_parameters` takes the answer: a count and the file it came from, or why there is none.

Files, in order: config.json (small and always next to transformers weights; when it gets no
answer at all, the store is unreachable and nothing else is tried), then the model.safetensors
header (exact tensor shapes, two range requests) or, for sharded weights,
model.safetensors.index.json; the count from config.json is the fallback. hf:// models come from
FINETUNE_OPERATOR_HUB_ENDPOINT (with the job's spec.env HF_TOKEN for gated ones), s3:// models from
the job's checkpoint store with its credentialsSecret, as the trainer reads them.

S3 requests are signed here (Signature Version 4 with hashlib and hmac) rather than with
botocore: the operator image stays free of the AWS SDK for a few small GETs.

Secret values are held only for one lookup: never logged, cached or put in a message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from kubernetes.client.rest import ApiException

from finetune_operator import model_size, policy
from finetune_operator.api import FineTuneJobSpec
from finetune_operator.policy import ModelSize
from finetune_operator.settings import OperatorSettings

if TYPE_CHECKING:
    from finetune_operator.kube import Kube

log = logging.getLogger("finetune_operator")

SecretReader = Callable[[str, str], str | None]
"""(Secret name, key) -> the value; None when the Secret or key is missing or may not be read."""

ByteRange = tuple[int, int]  # first and last byte, inclusive, as in an HTTP Range header

MiB = 1024 * 1024
CONFIG_LIMIT = MiB
INDEX_LIMIT = 16 * MiB
HEADER_LIMIT = 16 * MiB  # headers of 70B models are a few hundred KiB
# A failure is retried after this long: a Secret may be fixed or the network restored meanwhile.
FAILURE_TTL_S = 60.0
CACHE_ENTRIES = 512
HUB_TOKEN_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class ReadError(Exception):
    """A file could not be read. The message is safe to show: a status and error code, never a
    secret. `unreachable`: no answer came at all; `absent`: the store says there is no such file."""

    def __init__(
        self, detail: str, *, absent: bool = False, denied: bool = False, unreachable: bool = False
    ) -> None:
        super().__init__(detail)
        self.absent, self.denied, self.unreachable = absent, denied, unreachable


Read = Callable[[str, ByteRange | None, int], bytes]
"""(file name, byte range or None for all, size limit) -> bytes; raises ReadError."""


@dataclass(frozen=True)
class ModelFiles:
    """A model's folder: `base` names it in messages (s3://bucket/prefix, or the hub URL)."""

    base: str
    read: Read
    # Appended when access is denied: what would let the operator in.
    denied_hint: str = ""

    def where(self, name: str) -> str:
        return f"{self.base}/{name}"


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)


# ---------------------------------------------------------------------------------------------
# What the files say


def read_model_size(files: ModelFiles) -> ModelSize:
    """The parameter count from the model's files, the most exact one available."""
    config: Mapping[str, Any] | None = None
    config_problem = ""
    try:
        config = _read_json(files, "config.json", CONFIG_LIMIT)
    except ReadError as exc:
        config_problem = _cannot_read(files, "config.json", exc)
        if exc.unreachable:
            return ModelSize(failure=config_problem)
    except ValueError as exc:
        config_problem = (
            f"the model's config.json at {files.where('config.json')} is not readable JSON ({exc})"
        )
    exact = _from_weights(files, config)
    if exact is not None:
        return exact
    if config is None:
        return ModelSize(failure=config_problem)
    try:
        return ModelSize(float(model_size.count_config_parameters(config)), "config.json")
    except ValueError as exc:
        return ModelSize(
            failure=f"the model's config.json at {files.where('config.json')} cannot be counted: {exc}"
        )


def _from_weights(files: ModelFiles, config: Mapping[str, Any] | None) -> ModelSize | None:
    """The count from the weights' own metadata, or None (config.json then serves)."""
    try:
        header = safetensors_header(files)
        return ModelSize(
            float(model_size.count_safetensors_parameters(header)), "the model.safetensors header"
        )
    except ReadError as exc:
        if not exc.absent:
            return None
    except ValueError:
        return None
    dtype = None
    if config is not None:
        dtype = config.get("torch_dtype") or config.get("dtype")
    try:
        index = _read_json(files, "model.safetensors.index.json", INDEX_LIMIT)
        count = model_size.count_safetensors_index_parameters(
            index, dtype if isinstance(dtype, str) else None
        )
    except (ReadError, ValueError):
        return None
    return ModelSize(float(count), "model.safetensors.index.json")


def safetensors_header(files: ModelFiles) -> dict[str, Any]:
    """The JSON header of model.safetensors: an 8-byte little-endian length, then that much JSON."""
    prefix = files.read("model.safetensors", (0, 7), 8)
    if len(prefix) < 8:
        raise ValueError("model.safetensors is shorter than its 8-byte header length")
    length = int.from_bytes(prefix, "little")
    if not 0 < length <= HEADER_LIMIT:
        raise ValueError(f"model.safetensors header length {length} is not between 1 and {HEADER_LIMIT}")
    header = json.loads(files.read("model.safetensors", (8, 8 + length - 1), length))
    if not isinstance(header, dict):
        raise ValueError("model.safetensors header is not a JSON object")
    return header


def _read_json(files: ModelFiles, name: str, limit: int) -> dict[str, Any]:
    value = json.loads(files.read(name, None, limit))
    if not isinstance(value, dict):
        raise ValueError(f"{name} is not a JSON object")
    return value


def _cannot_read(files: ModelFiles, name: str, exc: ReadError) -> str:
    hint = f"; {files.denied_hint}" if exc.denied and files.denied_hint else ""
    return f"the model's {name} could not be read from {files.where(name)} ({exc}{hint})"


# ---------------------------------------------------------------------------------------------
# Where the files are


def look_up(spec: FineTuneJobSpec, settings: OperatorSettings, read_secret: SecretReader) -> ModelSize | None:
    """The model's size for `policy.model_parameters`; None when spec.model.parameters is set.
    Cached per (source, revision, endpoint). Never raises: a failure is a reason in the result."""
    if spec.model.parameters is not None:
        return None
    if not settings.model_size_lookup:
        return ModelSize(
            failure="the model's files were not read: FINETUNE_OPERATOR_MODEL_SIZE_LOOKUP is false"
        )
    source = spec.model.source
    if source.startswith("file://"):
        return ModelSize(failure=f"{source} is a path on the training node, which the operator cannot read")
    endpoint = settings.hub_endpoint if source.startswith("hf://") else _s3_location(spec, settings)[0]
    key = (source, spec.model.revision or "", endpoint)
    cached = _cache.get(key)
    if cached is not None:
        return cached
    try:
        size = read_model_size(model_files(spec, settings, read_secret))
    except Exception as exc:  # the lookup only informs the estimate: never let it block a job
        log.warning("reading the size of %s failed: %s", source, type(exc).__name__)
        size = ModelSize(failure=f"the model's files at {source} could not be read ({type(exc).__name__})")
    _cache.put(key, size)
    log.info("model %s: %s", source, policy.model_parameters(spec, settings, size)[1])
    return size


def model_files(spec: FineTuneJobSpec, settings: OperatorSettings, read_secret: SecretReader) -> ModelFiles:
    """The folder of an hf:// or s3:// model, with the credentials the trainer would use."""
    source, timeout = spec.model.source, settings.model_size_timeout
    if source.startswith("hf://"):
        token, hint = _hub_token(spec, settings, read_secret)
        repo = source.removeprefix("hf://").strip("/")
        return hub_files(repo, spec.model.revision, settings.hub_endpoint, token, timeout, denied_hint=hint)
    endpoint, region, path_style = _s3_location(spec, settings)
    credentials, hint = _s3_credentials(spec, settings, read_secret)
    return s3_files(source, endpoint, region, credentials, timeout, path_style=path_style, denied_hint=hint)


def hub_files(
    repo: str,
    revision: str | None,
    endpoint: str,
    token: str | None,
    timeout: float,
    *,
    denied_hint: str = "",
) -> ModelFiles:
    """A hub repository's files at a revision (main when None), as `hf_hub_download` resolves them."""
    base = f"{endpoint.rstrip('/')}/{quote(repo, safe='/')}/resolve/{quote(revision or 'main', safe='')}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def read(name: str, byte_range: ByteRange | None, limit: int) -> bytes:
        return _get(f"{base}/{name}", headers, byte_range, limit, timeout, opener=_HUB_OPENER)

    return ModelFiles(base, read, denied_hint)


def s3_files(
    uri: str,
    endpoint: str,
    region: str,
    credentials: S3Credentials | None,
    timeout: float,
    *,
    path_style: bool = True,
    denied_hint: str = "",
) -> ModelFiles:
    """The objects under an s3://bucket/prefix; signed when there are credentials, else anonymous."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")

    def read(name: str, byte_range: ByteRange | None, limit: int) -> bytes:
        url = s3_object_url(endpoint, region, bucket, f"{prefix}/{name}" if prefix else name, path_style)
        headers = {} if credentials is None else sign_s3_get(url, region, credentials, datetime.now(UTC))
        return _get(url, headers, byte_range, limit, timeout, opener=_S3_OPENER)

    return ModelFiles(f"s3://{bucket}/{prefix}".rstrip("/"), read, denied_hint)


def _hub_token(
    spec: FineTuneJobSpec, settings: OperatorSettings, read_secret: SecretReader
) -> tuple[str | None, str]:
    """The token the trainer gets (spec.env HF_TOKEN from a Secret), and what to say on a 401."""
    for var in spec.env:
        if var.name in HUB_TOKEN_NAMES and var.secret_key_ref is not None:
            ref = var.secret_key_ref
            if not settings.check_secrets:
                return None, f"spec.env {var.name} was not used: FINETUNE_OPERATOR_CHECK_SECRETS is false"
            token = read_secret(ref.name, ref.key)
            if token:
                return token, ""
            return None, f"spec.env {var.name}: Secret {ref.name} key {ref.key} could not be read"
    return None, "a gated or private model needs spec.env HF_TOKEN from a Secret"


def _s3_location(spec: FineTuneJobSpec, settings: OperatorSettings) -> tuple[str, str, bool]:
    """Endpoint, region and addressing of the job's store, resolved as for the trainer: a job
    without an endpoint uses the cluster's store from the settings."""
    store = spec.checkpoints.store
    endpoint, path_style = store.endpoint, store.path_style
    if not endpoint and settings.checkpoint_endpoint:
        endpoint = settings.checkpoint_endpoint
        if settings.checkpoint_path_style is not None:
            path_style = settings.checkpoint_path_style
    region = store.region or settings.checkpoint_region or "us-east-1"
    return endpoint, region, path_style


def _s3_credentials(
    spec: FineTuneJobSpec, settings: OperatorSettings, read_secret: SecretReader
) -> tuple[S3Credentials | None, str]:
    """The store's key pair from credentialsSecret, or None and why the request goes unsigned."""
    store = spec.checkpoints.store
    name = store.credentials_secret
    if name is None:
        return None, "read without credentials: spec.checkpoints.store.credentialsSecret is not set"
    if not settings.check_secrets:
        return None, "read without credentials: FINETUNE_OPERATOR_CHECK_SECRETS is false"
    key_id = read_secret(name, store.access_key_id_key)
    secret = read_secret(name, store.secret_access_key_key)
    if not key_id or not secret:
        return None, (
            f"read without credentials: Secret {name} keys {store.access_key_id_key} and "
            f"{store.secret_access_key_key} could not be read"
        )
    return S3Credentials(key_id, secret), ""


def secret_reader(kube: Kube, namespace: str) -> SecretReader:
    """Reads keys of Secrets in the job's namespace, each Secret once; values go to the caller only."""
    secrets: dict[str, dict[str, str] | None] = {}

    def read(name: str, key: str) -> str | None:
        if name not in secrets:
            secrets[name] = _secret_data(kube, namespace, name)
        return (secrets[name] or {}).get(key)

    return read


def _secret_data(kube: Kube, namespace: str, name: str) -> dict[str, str] | None:
    try:
        secret = kube.core.read_namespaced_secret(name, namespace)
    except ApiException:  # missing or forbidden: the lookup goes unsigned and says so
        return None
    data = {
        key: base64.b64decode(value).decode(errors="replace") for key, value in (secret.data or {}).items()
    }
    return {**dict(secret.string_data or {}), **data}


# ---------------------------------------------------------------------------------------------
# HTTP and S3


def s3_object_url(endpoint: str, region: str, bucket: str, key: str, path_style: bool) -> str:
    """The object's URL: endpoint/bucket/key, or bucket.endpoint/key; AWS when endpoint is empty."""
    base = endpoint.rstrip("/") or f"https://s3.{region}.amazonaws.com"
    path = quote(key, safe="/")
    if path_style:
        return f"{base}/{bucket}/{path}"
    parts = urlsplit(base)
    return f"{parts.scheme}://{bucket}.{parts.netloc}{parts.path}/{path}"


def sign_s3_get(
    url: str,
    region: str,
    credentials: S3Credentials,
    now: datetime,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Headers that sign a body-less GET of `url` with AWS Signature Version 4, S3 flavour (the
    path is signed as sent, not encoded twice). `extra` headers are sent and signed too."""
    parts = urlsplit(url)
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    headers = {
        "host": parts.netloc,
        "x-amz-content-sha256": EMPTY_SHA256,
        "x-amz-date": stamp,
        **{k.lower(): v.strip() for k, v in (extra or {}).items()},
    }
    names = sorted(headers)
    signed = ";".join(names)
    canonical_headers = "".join(f"{name}:{headers[name]}\n" for name in names)
    query = "&".join(sorted(parts.query.split("&"))) if parts.query else ""
    canonical = "\n".join(("GET", parts.path or "/", query, canonical_headers, signed, EMPTY_SHA256))
    scope = f"{stamp[:8]}/{region}/s3/aws4_request"
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    to_sign = "\n".join(("AWS4-HMAC-SHA256", stamp, scope, digest))
    key = ("AWS4" + credentials.secret_access_key).encode()
    for part in (stamp[:8], region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    authorization = (
        f"AWS4-HMAC-SHA256 Credential={credentials.access_key_id}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    return {**{name.title(): headers[name] for name in names}, "Authorization": authorization}


class _HubRedirects(urllib.request.HTTPRedirectHandler):
    """The hub redirects weights to its file CDN: follow, without the token once the host changes."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urlsplit(newurl).netloc != urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """An S3 signature holds for one host: a redirect (a bucket in another region) is an error."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None


_HUB_OPENER = urllib.request.build_opener(_HubRedirects)
_S3_OPENER = urllib.request.build_opener(_NoRedirects)


def _get(
    url: str,
    headers: Mapping[str, str],
    byte_range: ByteRange | None,
    limit: int,
    timeout: float,
    *,
    opener: urllib.request.OpenerDirector,
) -> bytes:
    request = urllib.request.Request(url, headers=dict(headers))  # noqa: S310 (http(s) URLs only)
    if byte_range is not None:
        request.add_header("Range", f"bytes={byte_range[0]}-{byte_range[1]}")
    try:
        with opener.open(request, timeout=timeout) as response:
            if byte_range is not None and response.status == 200:  # Range ignored: skip to the start
                body = bytes(response.read(byte_range[1] + 1)[byte_range[0] :])
            else:
                body = bytes(response.read(limit + 1))
    except urllib.error.HTTPError as exc:
        raise _http_error(exc) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise ReadError(_network_detail(exc, timeout), unreachable=True) from None
    if len(body) > limit:
        raise ReadError(f"larger than {limit // 1024} KiB")
    return body


_S3_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")


def _http_error(exc: urllib.error.HTTPError) -> ReadError:
    """Status plus the server's error code: S3's <Code> or the hub's X-Error-Code/-Message."""
    try:
        body = exc.read(4096)
    except Exception:  # the body is only a detail
        body = b""
    code = exc.headers.get("X-Error-Code") if exc.headers else None
    match = _S3_CODE.search(body)
    if match is not None:
        code = match.group(1).decode()
    message = exc.headers.get("X-Error-Message") if exc.headers else None
    detail = f"HTTP {exc.code}" + (f" {code}" if code else "") + (f": {message[:200]}" if message else "")
    return ReadError(detail, absent=exc.code == 404, denied=exc.code in (401, 403))


def _network_detail(exc: Exception, timeout: float) -> str:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:g}s"
    return str(reason) or type(reason).__name__


# ---------------------------------------------------------------------------------------------
# Cache


class _Cache:
    """Lookups per key; a failure expires after FAILURE_TTL_S. Handlers run in threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str, str], tuple[float, ModelSize]] = {}

    def get(self, key: tuple[str, str, str]) -> ModelSize | None:
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            return None
        stored, size = entry
        if size.parameters is None and time.monotonic() - stored > FAILURE_TTL_S:
            return None
        return size

    def put(self, key: tuple[str, str, str], size: ModelSize) -> None:
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = (time.monotonic(), size)
            while len(self._entries) > CACHE_ENTRIES:
                del self._entries[next(iter(self._entries))]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_cache = _Cache()


def forget_cached() -> None:
    """Drops every cached lookup (tests; a changed model under the same source)."""
    _cache.clear()
