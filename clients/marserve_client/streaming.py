"""Server-sent events -> typed chunks, for sync and async streams.

An event is one or more `data:` lines ended by a blank line (its lines joined with newlines);
lines starting with ':' are comments (keep-alives); `data: [DONE]` ends the stream; an event whose
JSON holds "error" raises StreamError.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator

from marserve_client.errors import StreamError


class SSEDecoder:
    def __init__(self):
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """One line (without its newline) -> the data of a completed event, or None."""
        if line == "":
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        return None  # event:, id:, retry: carry nothing we need

    def flush(self) -> str | None:
        return self.feed("")


def _decode(data: str, cls):
    obj = json.loads(data)
    if isinstance(obj, dict) and "error" in obj and isinstance(obj["error"], dict):
        e = obj["error"]
        raise StreamError(str(e.get("message", "stream error")), e.get("type"), e.get("param"), e.get("code"))
    return cls.model_validate(obj)


_DONE = object()


def _event(line: str | None, decoder: SSEDecoder, cls):
    """A line (None = end of input) -> a decoded chunk, _DONE, or None (nothing complete yet)."""
    data = decoder.flush() if line is None else decoder.feed(line.rstrip("\r"))
    if data is None:
        return None
    return _DONE if data == "[DONE]" else _decode(data, cls)


def iter_events(lines: Iterable[str], cls) -> Iterator:
    decoder = SSEDecoder()
    for line in _with_end(lines):
        item = _event(line, decoder, cls)
        if item is _DONE:
            return
        if item is not None:
            yield item


def _with_end(lines):
    yield from lines
    yield None


async def aiter_events(lines: AsyncIterator[str], cls) -> AsyncIterator:
    decoder = SSEDecoder()

    async def with_end():
        async for line in lines:
            yield line
        yield None

    async for line in with_end():
        item = _event(line, decoder, cls)
        if item is _DONE:
            return
        if item is not None:
            yield item


class Stream:
    """Iterator of chunks; closes its HTTP response when exhausted, on error, or on close()/with-exit."""

    def __init__(self, response, cls):
        self.response = response
        self._it = iter_events(response.iter_lines(), cls)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._it)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.response.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncStream:
    def __init__(self, response, cls):
        self.response = response
        self._it = aiter_events(response.aiter_lines(), cls)

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await self._it.__anext__()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await self.response.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
