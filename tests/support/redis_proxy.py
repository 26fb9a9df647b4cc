"""A TCP proxy in front of a test Redis that can lose replies."""

from __future__ import annotations

import asyncio


class ReplyLosingProxy:
    """A TCP proxy in front of Redis that can lose replies after Redis ran the command:
    mode "drop" cuts the client's connection instead of passing a reply on, "hold" keeps
    replies back (the client times out)."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.mode = "pass"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
        self._writers += [writer, redis_writer]
        await asyncio.gather(
            self._forward(reader, redis_writer, requests=True),
            self._forward(redis_reader, writer, requests=False),
            return_exceptions=True,
        )

    async def _forward(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, requests: bool
    ) -> None:
        while data := await source.read(65536):
            if requests or self.mode == "pass":
                sink.write(data)
            elif self.mode == "drop":
                break
        sink.transport.abort()
