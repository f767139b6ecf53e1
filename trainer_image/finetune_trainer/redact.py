"""Never print, log or store a secret value: find secret-looking env vars and mask them."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

# Name parts (split on "_") that mark a secret: AWS_SECRET_ACCESS_KEY and HF_TOKEN,
# but not TOKENIZERS_PARALLELISM.
SECRET_PARTS = frozenset(
    {"KEY", "KEYS", "APIKEY", "SECRET", "SECRETS", "TOKEN", "PASSWORD", "PASSWD", "PASS"}
    | {"CREDENTIAL", "CREDENTIALS", "AUTH", "PRIVATE", "DSN"}
)
MASK = "***"
_MIN_SECRET_LEN = 6  # shorter values would mask ordinary words


def is_secret_name(name: str) -> bool:
    return any(part in SECRET_PARTS for part in re.split(r"[_\W]+", name.upper()))


def secret_names(env: Mapping[str, str] | None = None) -> list[str]:
    env = os.environ if env is None else env
    return sorted(name for name in env if is_secret_name(name))


def _secret_values(env: Mapping[str, str]) -> list[str]:
    values = {v for k, v in env.items() if is_secret_name(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    for value in _secret_values(os.environ if env is None else env):
        text = text.replace(value, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Masks secret env values in every log record, tracebacks included."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
            record.exc_text = None
        record.msg, record.args = redact(message), None
        return True
