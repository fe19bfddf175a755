"""Counts each generation request once when it arrives and once when it ends, by how it ended.

A pure ASGI middleware, outermost, so that it sees what every other layer answers (the API-key and
body-size guards included) and what the client does (a disconnect). Streams answer 200 before they
know how they end, so a stream's outcome is read from its body: an error event makes it failed, and
a stream that never sent its last byte was left by its client (aborted).
"""

from __future__ import annotations

from marserve_server.metrics import ServerMetrics

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
_ERROR_EVENT = b'data: {"error"'  # serving.sse_error's event (the whole event is one body chunk)
_CLIENT_CLOSED = 499  # serving.run_to_end's status for a non-streaming request whose client left


def outcome_of(status: int | None, saw_error_event: bool, sent_whole_body: bool, raised: bool) -> str:
    """finished, aborted, rejected or failed, from what was answered."""
    if status is None:  # nothing answered: the handler failed, or the client left before any byte
        return "failed" if raised else "aborted"
    if status == _CLIENT_CLOSED:
        return "aborted"
    if status >= 500:
        return "failed"
    if status >= 400:
        return "rejected"
    if saw_error_event:
        return "failed"
    return "finished" if sent_whole_body else "aborted"


class RequestOutcomes:
    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        self.metrics.observe_received()
        status, saw_error, whole, raised = None, False, False, False

        async def watched_send(message):
            nonlocal status, saw_error, whole
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                saw_error = saw_error or message.get("body", b"").startswith(_ERROR_EVENT)
                if not message.get("more_body", False):
                    whole = True
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except BaseException:
            raised = True
            raise
        finally:
            self.metrics.observe_ended(outcome_of(status, saw_error, whole, raised))
