"""Typed errors: one class per failure a caller may want to handle differently."""

from __future__ import annotations

import httpx


class MarserveClientError(Exception):
    """Base of every error this SDK raises."""


class APIConnectionError(MarserveClientError):
    """The server could not be reached (refused, reset, DNS...)."""


class APITimeoutError(APIConnectionError):
    """The request took longer than the client's timeout."""


class APIStatusError(MarserveClientError):
    """The server answered with an error status; fields come from its OpenAI-shaped error body."""

    status_code: int = 0

    def __init__(self, response: httpx.Response, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(f"{response.status_code}: {message}")
        self.response = response
        self.status_code = response.status_code
        self.message, self.type, self.param, self.code = message, type, param, code


class BadRequestError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class NotFoundError(APIStatusError):
    pass


class RequestTooLargeError(APIStatusError):
    pass


class RateLimitError(APIStatusError):
    pass


class InternalServerError(APIStatusError):
    pass


class ServiceUnavailableError(InternalServerError):
    pass


_BY_STATUS = {400: BadRequestError, 401: AuthenticationError, 404: NotFoundError, 413: RequestTooLargeError,
              429: RateLimitError, 503: ServiceUnavailableError}


def from_response(response: httpx.Response) -> APIStatusError:
    """The typed error for an error response (whatever its body)."""
    message, type_, param, code = response.reason_phrase or "error", None, None, None
    try:
        err = response.json().get("error")
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            type_, param, code = err.get("type"), err.get("param"), err.get("code")
    except (ValueError, AttributeError):
        if response.text:
            message = response.text[:500]
    cls = _BY_STATUS.get(response.status_code)
    if cls is None:
        cls = InternalServerError if response.status_code >= 500 else APIStatusError
    return cls(response, message, type_, param, code)


class StreamError(MarserveClientError):
    """The server reported an error inside a stream that had already started (status 200 was sent)."""

    def __init__(self, message: str, type: str | None = None, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.type, self.param, self.code = message, type, param, code
