"""Keep API keys and JWTs out of logs that quote raw request bytes.

aiohttp's parser, refusing an oversized or malformed header, logs (and answers with) the
first 100 bytes of it, which can hold a whole API key. Attach `RedactSecretsFilter` to the
`aiohttp.server` and `aiohttp.access` loggers (the server does this once at start).
"""

from __future__ import annotations

import logging
import re

_API_KEY = re.compile(r"(sk-llms-[0-9a-f]{12}-)[A-Za-z0-9_\-]+")
_JWT = re.compile(r"eyJ[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*")


def redact(text: str) -> str:
    """Secrets replaced, public key ids kept (they name the key without revealing it)."""
    return _JWT.sub("<jwt>", _API_KEY.sub(r"\1<redacted>", text))


class RedactSecretsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def install_redaction(*logger_names: str) -> None:
    names = logger_names or ("aiohttp.server", "aiohttp.access", "aiohttp.web")
    for name in names:
        logging.getLogger(name).addFilter(RedactSecretsFilter())
