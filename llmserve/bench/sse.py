"""An incremental Server-Sent Events decoder: bytes in, complete `data` payloads out.

Only what the OpenAI streaming wire uses: `data:` lines (joined by newlines when an event has
several); comments (lines starting with `:`, heartbeats) are dropped; `event:`, `id:` and
`retry:` fields are ignored. An event ends at a blank line; `\\r\\n` and `\\r` line ends work.
"""

from __future__ import annotations

import codecs


class SSEDecoder:
    def __init__(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        """Add bytes; return the payloads of every event completed by them, in order."""
        self._buffer += self._text.decode(chunk)
        # A "\r" at the very end may be the first half of "\r\n": wait for the next byte.
        held = "\r" if self._buffer.endswith("\r") else ""
        text = self._buffer[: len(self._buffer) - len(held)]
        *lines, rest = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self._buffer = rest + held
        return [event for line in lines if (event := self._take_line(line)) is not None]

    def flush(self) -> list[str]:
        """End of stream: the last event, if the server closed without its blank line."""
        tail = self._buffer.rstrip("\r")
        self._buffer = ""
        events = [] if tail == "" else [e for e in [self._take_line(tail)] if e is not None]
        last = self._take_line("")
        return events + ([last] if last is not None else [])

    def _take_line(self, line: str) -> str | None:
        if line == "":
            if not self._data:
                return None
            event, self._data = "\n".join(self._data), []
            return event
        if line.startswith("data:"):
            self._data.append(line[5:].removeprefix(" "))
        return None
