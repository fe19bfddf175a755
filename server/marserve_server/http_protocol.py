"""uvicorn's h11 protocol with a deadline for reading each request, so half-sent requests cannot pile up.

uvicorn bounds only the idle time between requests (timeout_keep_alive), and its timer is cancelled
by the first byte a client sends: a client that sends half a request line, half the headers, or a
body shorter than its Content-Length holds its connection (and, for a body, a handler) forever.
Here a timer runs from the moment a connection opens, or a response ends, until the whole request
(head and body) has arrived; when it fires first, the connection is closed.
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class TimedH11Protocol(H11Protocol):
    request_read_timeout: float = 30.0  # set per server by with_read_timeout

    def connection_made(self, transport) -> None:
        self._read_timer = None
        super().connection_made(transport)
        self._arm_read_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):  # the whole request is in (or it is over)
            self._disarm_read_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm_read_timer()  # keep-alive: the next request gets its own deadline

    def connection_lost(self, exc) -> None:
        self._disarm_read_timer()
        super().connection_lost(exc)

    def _arm_read_timer(self) -> None:
        self._disarm_read_timer()
        self._read_timer = self.loop.call_later(self.request_read_timeout, self._read_timed_out)

    def _disarm_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            # A handler waiting for the rest of the body sees a disconnect, as if the client had left.
            self.transport.close()


def with_read_timeout(seconds: float) -> type[TimedH11Protocol]:
    """The protocol class for one server (uvicorn takes a class, not an instance)."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"request_read_timeout": seconds})
