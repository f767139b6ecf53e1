"""Load records from a local path, `s3://bucket/key` or a hub dataset id.

JSONL and JSON are parsed here so a malformed line is reported with its number;
Parquet and CSV go through `datasets`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from finetune_trainer.config import S3Store
from finetune_trainer.data.errors import DataError, show_sample

Record = dict[str, Any]
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def load_records(
    source: str, store: S3Store, hub_split: str = "train", field: str = "dataset.source"
) -> list[Record]:
    if source.startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="finetune-data-") as tmp:
            return _load_path(download_s3(source, store, Path(tmp)), field)
    path = Path(source)
    if path.exists():
        return _load_path(path, field)
    if source.startswith(("/", ".")) or path.suffix in SUFFIXES:
        raise DataError(f"{field}: {source!r} does not exist (fix: mount the file or use an s3:// URI)")
    return _load_hub(source, hub_split)


def _load_path(path: Path, field: str) -> list[Record]:
    files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{field}: no {', '.join(SUFFIXES)} files under {str(path)!r} (fix: check the path)")
    records: list[Record] = []
    for file in files:
        records.extend(_load_file(file, field))
    if not records:
        raise DataError(f"{field}: {str(path)!r} holds no examples (fix: point it at a non-empty dataset)")
    return records


def _load_file(file: Path, field: str) -> list[Record]:
    if file.suffix == ".jsonl":
        return _load_jsonl(file, field)
    if file.suffix == ".json":
        return _load_json(file, field)
    import datasets

    loader = datasets.Dataset.from_parquet if file.suffix == ".parquet" else datasets.Dataset.from_csv
    return [dict(row) for row in loader(str(file))]


def _load_jsonl(file: Path, field: str) -> list[Record]:
    records: list[Record] = []
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{field}: {file.name} line {number}: invalid JSON ({exc.msg}): {show_sample(line)} "
                    "(fix: one JSON object per line)"
                ) from None
            records.append(_as_record(record, f"{file.name} line {number}", field))
    return records


def _load_json(file: Path, field: str) -> list[Record]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{field}: {file.name}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{field}: {file.name}: expected a list of objects (fix: use a JSON array or JSONL)")
    return [_as_record(item, f"{file.name} item {i}", field) for i, item in enumerate(data)]


def _as_record(value: Any, where: str, field: str) -> Record:
    if not isinstance(value, dict):
        raise DataError(f"{field}: {where}: expected an object, got {show_sample(value)}")
    return value


def _load_hub(dataset_id: str, split: str) -> list[Record]:
    import datasets

    return [dict(row) for row in datasets.load_dataset(dataset_id, split=split)]


def s3_client(store: S3Store) -> Any:
    """A boto3 S3 client from the job's store settings; credentials from the environment chain."""
    import boto3
    from botocore.config import Config

    config = Config(
        s3={"addressing_style": "path" if store.path_style else "auto"},
        request_checksum_calculation=store.checksum_mode,
        response_checksum_validation=store.checksum_mode,
        retries={"max_attempts": 5, "mode": "standard"},
    )
    session = boto3.session.Session()  # credentials read now, not cached from an earlier client
    return session.client(
        "s3", endpoint_url=store.endpoint or None, region_name=store.region or None, config=config
    )


def download_s3(uri: str, store: S3Store, into: Path, field: str = "dataset.source") -> Path:
    """Download an object or every object under a prefix; return the local file or folder. A store
    that refuses the credentials or has no such bucket raises StoreRefusedError naming `field`;
    nothing under the prefix raises `missing` (DataError for data)."""
    from botocore.exceptions import ClientError

    from finetune_trainer.checkpoints.client import refusal
    from finetune_trainer.sink import StoreRefusedError

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    client = s3_client(store)
    try:
        keys = [
            obj["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            for obj in page.get("Contents", [])
        ]
        if not keys:
            raise DataError(f"{field}: {uri!r}: no objects found (fix: check the bucket and key)")
        for object_key in keys:
            target = into / (object_key[len(key) :].lstrip("/") or Path(object_key).name)
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, object_key, str(target))
    except ClientError as exc:
        refused = refusal(exc, store, bucket, f"reading {uri}", field)
        if refused is None:
            raise
        raise StoreRefusedError(refused) from None
    return into / Path(key).name if keys == [key] else into
