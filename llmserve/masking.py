"""Credentials in URLs (`redis://user:password@host`) masked wherever a URL may be shown: the
effective config, error messages, log lines."""

from __future__ import annotations

import re
from typing import Any

_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.\-]*://[^/\s:@]*:)(?P<secret>[^@\s/]+)@")
# a password given as a query option: redis+sentinel://...?sentinel_password=...
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&][a-z_]*password=)(?P<secret>[^&\s#'\"]+)")


def mask_url_credentials(text: str) -> str:
    """`text` with the password of every URL in it replaced by `****`."""
    if "://" not in text:
        return text
    if "@" in text:
        text = _URL_PASSWORD.sub(r"\g<head>****@", text)
    if "password=" in text:
        text = _QUERY_PASSWORD.sub(r"\g<head>****", text)
    return text


def mask_tree(value: Any) -> Any:
    """A copy of plain data (dicts, lists, strings) with every URL password masked."""
    if isinstance(value, str):
        return mask_url_credentials(value)
    if isinstance(value, dict):
        return {key: mask_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [mask_tree(item) for item in value]
    return value
