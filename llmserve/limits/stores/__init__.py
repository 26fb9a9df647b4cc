"""Limiter state stores, chosen by URL: `memory://` (default) or a Redis URL
(`redis://host:6379/0`, also TLS, unix socket, Sentinel and Cluster: stores/urls.py)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from llmserve.errors import ConfigError
from llmserve.limits.stores.base import ReserveOutcome, Store, StoreUnavailable
from llmserve.limits.stores.memory import MemoryStore
from llmserve.limits.stores.redis import DEFAULT_KEY_PREFIX, RedisStore
from llmserve.limits.stores.urls import URL_SCHEMES
from llmserve.masking import mask_url_credentials

__all__ = ["MemoryStore", "ReserveOutcome", "Store", "StoreUnavailable", "store_from_url"]


def store_from_url(url: str, state_dir: Path | None = None) -> Store:
    """Build the store a `limits.store` URL names.

    `memory://` persists to `state_dir` when one is given. Redis URLs (`redis://`, `rediss://`,
    `unix://`, `redis+sentinel://`, `redis+cluster://`...; forms and query options:
    stores/urls.py) also take `key_prefix`. Anything else is a ConfigError.
    """
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return MemoryStore(state_dir)
    if scheme in URL_SCHEMES:
        return _redis_store(url)
    raise ConfigError(
        f"limits.store: unknown store {mask_url_credentials(url)!r}; expected memory:// or "
        "redis://host:port/db (also rediss://, unix://, redis+sentinel://, redis+cluster://)"
    )


def _redis_store(url: str) -> Store:
    url, prefix = _pop_query_option(url, "key_prefix", DEFAULT_KEY_PREFIX)
    try:
        return RedisStore.from_url(url, key_prefix=prefix)
    except ConfigError as exc:
        raise ConfigError(f"limits.store: {exc}") from None


def _pop_query_option(url: str, name: str, default: str) -> tuple[str, str]:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    value = next((v for k, v in query if k == name), default)
    rest = urlencode([(k, v) for k, v in query if k != name])
    return parts._replace(query=rest).geturl(), value
