"""What may reach MLflow params and tags: flat, stringified, within limits, with secrets masked.

A key that names a credential (`…secret…`, `…password…`, `…token`, `…access_key…`) keeps only a
mask; a value that holds one (the value of any such environment variable, a URL's user:password,
an AWS key id, a private key, a bearer token, a signed-URL signature) has that part masked.
Environment variables are read only to recognise their values, never logged. Paths are never
secrets: PWD and OLDPWD, variables that name a file or folder (`…_FILE`, `…_PATH`, `…_DIR`) and
values that are existing paths are not masked, or every path under them would become `***/…`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
#: MLflow 3 limits: param values, tag values (kept far below), key length.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 5000
MAX_KEY = 250
#: Environment values shorter than this are too likely to occur by chance to be masked.
MIN_SECRET_LENGTH = 6

_SECRET_WORDS = re.compile(
    r"secret|passw|credential|private[_.\- ]?key|api[_.\- ]?key|access[_.\- ]?key"
    r"|session[_.\- ]?token",
    re.IGNORECASE,
)
_SECRET_PARTS = re.compile(
    r"(?:^|[._\-/ ])(?:token|auth|authorization|pwd|signature)(?:$|[._\-/ ])", re.IGNORECASE
)
_SECRET_VALUES = (
    (re.compile(r"(://)[^/\s@:]+:[^/\s@]+@"), rf"\1{MASK}@"),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), MASK),
    (
        re.compile(
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"
        ),
        MASK,
    ),
    (re.compile(r"\b(bearer\s+)[\w\-.~+/=]+", re.IGNORECASE), rf"\1{MASK}"),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"), MASK),
    (
        re.compile(
            r"([?&;](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig"
            r"|token|access_token|password|secret)=)[^&\s#]+",
            re.IGNORECASE,
        ),
        rf"\1{MASK}",
    ),
)
_BAD_KEY_CHARS = re.compile(r"[^\w.\- :/]")
#: Environment variables whose values are paths, whatever their names say.
_PATH_VARIABLES = frozenset({"PWD", "OLDPWD"})
_PATH_SUFFIXES = ("_FILE", "_PATH", "_DIR")


def is_secret_key(key: str) -> bool:
    """True for names of credentials: AWS_SECRET_ACCESS_KEY, db.password, auth_token, …."""
    return bool(_SECRET_WORDS.search(key) or _SECRET_PARTS.search(key))


def mask(text: str) -> str:
    """`text` with every credential-looking part replaced by ***."""
    return _mask_with(text, _environment_secrets())


def clean(items: Mapping[str, Any], *, max_value: int = MAX_PARAM_VALUE) -> dict[str, str]:
    """Flatten `items` into MLflow-safe string keys and values, secrets masked."""
    secrets = _environment_secrets()
    cleaned: dict[str, str] = {}
    for key, value in _flatten_to_params(items).items():
        name = safe_key(_mask_with(key, secrets))
        text = MASK if is_secret_key(key) else _mask_with(_as_text(value), secrets)
        cleaned[name] = text if len(text) <= max_value else text[: max_value - 1] + "…"
    return cleaned


def safe_key(key: str) -> str:
    """`key` with the characters MLflow refuses in names replaced by `_`, within its length."""
    return _BAD_KEY_CHARS.sub("_", key)[:MAX_KEY]


def _flatten_to_params(items: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"sampler": {"kind": "tpe"}} → {"sampler.kind": "tpe"}: every level, models and
    dataclasses included, for MLflow's flat params (the search space's flattening stops at the
    trial config's sections, for Optuna). Dotted keys stay as they are."""
    flat: dict[str, Any] = {}
    for key, value in items.items():
        name = f"{prefix}{key}"
        plain = plain_data(value)
        if isinstance(plain, Mapping) and plain:
            flat.update(_flatten_to_params(plain, prefix=f"{name}."))
        else:
            flat[name] = plain
    return flat


def plain_data(value: Any) -> Any:
    """Pydantic models and dataclasses as dicts; anything else unchanged."""
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _mask_with(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    for pattern, replacement in _SECRET_VALUES:
        text = pattern.sub(replacement, text)
    return text


def _environment_secrets() -> list[str]:
    """Values of credential-named environment variables, longest first (for substring masking)."""
    values = {
        value
        for name, value in os.environ.items()
        if is_secret_key(name) and len(value) >= MIN_SECRET_LENGTH and not _is_path(name, value)
    }
    return sorted(values, key=len, reverse=True)


def _is_path(name: str, value: str) -> bool:
    """True for variables that hold a path, not a credential (see the module docstring)."""
    upper = name.upper()
    if upper in _PATH_VARIABLES or upper.endswith(_PATH_SUFFIXES):
        return True
    return os.path.isabs(value) and os.path.exists(value)
