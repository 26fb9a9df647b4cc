"""Limiter state stores, chosen by URL: `memory://` (default) or `redis://host:6379/0`."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from llmserve.errors import ConfigError
from llmserve.limits.stores.base import ReserveOutcome, Store, StoreUnavailable
from llmserve.limits.stores.memory import MemoryStore

__all__ = ["MemoryStore", "ReserveOutcome", "Store", "StoreUnavailable", "store_from_url"]

_REDIS_SCHEMES = ("redis", "rediss", "unix")


def store_from_url(url: str, state_dir: Path | None = None) -> Store:
    """Build the store a `limits.store` URL names.

    `memory://` persists to `state_dir` when one is given. Redis URLs take redis-py's query
    options (`?socket_timeout=1`) plus `key_prefix`. Anything else is a ConfigError.
    """
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return MemoryStore(state_dir)
    if scheme in _REDIS_SCHEMES:
        return _redis_store(url)
    raise ConfigError(
        f"limits.store: unknown store {url!r}; expected memory:// or "
        "redis://host:port/db (also rediss:// and unix://)"
    )


def _redis_store(url: str) -> Store:
    try:
        from llmserve.limits.stores.redis import DEFAULT_KEY_PREFIX, RedisStore
    except ImportError:
        raise ConfigError(
            f"limits.store: {url!r} needs the redis package: pip install 'llmserve[redis]'"
        ) from None
    url, prefix = _pop_query_option(url, "key_prefix", DEFAULT_KEY_PREFIX)
    return RedisStore.from_url(url, key_prefix=prefix)


def _pop_query_option(url: str, name: str, default: str) -> tuple[str, str]:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    value = next((v for k, v in query if k == name), default)
    rest = urlencode([(k, v) for k, v in query if k != name])
    return parts._replace(query=rest).geturl(), value
