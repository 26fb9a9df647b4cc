"""`auth.keys` as text: a directory or a Redis URL (light: the config checks it on load)."""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, urlencode, urlsplit

from llmserve.errors import ConfigError
from llmserve.masking import mask_url_credentials

# = llmserve.limits.stores.urls.URL_SCHEMES (not imported: this module stays light)
REDIS_SCHEMES = (
    "redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster",
    "rediss+cluster",
)  # fmt: skip
DEFAULT_REDIS_KEY_PREFIX = "llmserve:auth:"


def is_redis_url(value: str | os.PathLike[str]) -> bool:
    return isinstance(value, str) and urlsplit(value).scheme in REDIS_SCHEMES and "://" in value


def check_key_store_url(value: str | os.PathLike[str]) -> None:
    """ConfigError unless `value` is a directory or a Redis URL the store accepts (used when
    the config loads, so `llmserve check` names a bad `auth.keys` before anything starts)."""
    if isinstance(value, str) and "://" in value and not is_redis_url(value):
        raise ConfigError(
            f"unknown key store {mask_url_credentials(value)!r}; expected a directory or "
            "redis://host:port/db (also rediss://, unix://, redis+sentinel://, redis+cluster://)"
        )
    if is_redis_url(value):
        from llmserve.limits.stores.urls import parse_any_url

        parse_any_url(split_key_prefix(str(value))[0])


def split_key_prefix(url: str) -> tuple[str, str]:
    """(the URL without its `key_prefix` query option, the prefix or the default)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((v for k, v in query if k == "key_prefix"), DEFAULT_REDIS_KEY_PREFIX)
    rest = urlencode([(k, v) for k, v in query if k != "key_prefix"])
    return parts._replace(query=rest).geturl(), prefix
