"""marserve-client: a small Python SDK for marserve's OpenAI-compatible HTTP API (httpx + pydantic, no torch)."""

from marserve_client.client import AsyncClient, Client
from marserve_client.errors import (APIConnectionError, APIStatusError, APITimeoutError, AuthenticationError,
                                    BadRequestError, InternalServerError, MarserveClientError, NotFoundError,
                                    RateLimitError, RequestTooLargeError, ServiceUnavailableError, StreamError)
from marserve_client.streaming import AsyncStream, Stream

__version__ = "0.1.0"
__all__ = ["Client", "AsyncClient", "Stream", "AsyncStream", "MarserveClientError", "APIConnectionError",
           "APITimeoutError", "APIStatusError", "BadRequestError", "AuthenticationError", "NotFoundError",
           "RequestTooLargeError", "RateLimitError", "ServiceUnavailableError", "InternalServerError", "StreamError"]
