"""Sending one request with retries: backoff with jitter on 429/503 and connection failures, honouring Retry-After.

Never retried: any other 4xx (the request itself is wrong) and any stream that has already started.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import httpx

from marserve_client.errors import APIConnectionError, APITimeoutError, from_response

RETRY_STATUSES = (429, 502, 503, 504)


@dataclass
class RetryPolicy:
    max_retries: int = 2
    initial_backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            after = response.headers.get("retry-after")
            try:
                if after is not None:
                    return min(max(float(after), 0.0), self.max_retry_after)
            except ValueError:
                pass
        base = min(self.max_backoff, self.initial_backoff * 2 ** attempt)
        return base * (0.5 + random.random() / 2)  # jitter: callers retrying together spread out


def _retryable(response: httpx.Response) -> bool:
    return response.status_code in RETRY_STATUSES


def send(http: httpx.Client, request: httpx.Request, policy: RetryPolicy, stream: bool = False,
         sleep=time.sleep) -> httpx.Response:
    attempt = 0
    while True:
        try:
            response = http.send(request, stream=stream)
        except httpx.TimeoutException as e:
            if attempt >= policy.max_retries:
                raise APITimeoutError(f"request timed out: {e}") from e
            sleep(policy.delay(attempt, None))
        except httpx.TransportError as e:
            if attempt >= policy.max_retries:
                raise APIConnectionError(f"cannot reach the server: {e}") from e
            sleep(policy.delay(attempt, None))
        else:
            if response.status_code < 400:
                return response
            response.read()
            response.close()
            if not _retryable(response) or attempt >= policy.max_retries:
                raise from_response(response)
            sleep(policy.delay(attempt, response))
        attempt += 1


async def asend(http: httpx.AsyncClient, request: httpx.Request, policy: RetryPolicy, stream: bool = False,
                sleep=asyncio.sleep) -> httpx.Response:
    attempt = 0
    while True:
        try:
            response = await http.send(request, stream=stream)
        except httpx.TimeoutException as e:
            if attempt >= policy.max_retries:
                raise APITimeoutError(f"request timed out: {e}") from e
            await sleep(policy.delay(attempt, None))
        except httpx.TransportError as e:
            if attempt >= policy.max_retries:
                raise APIConnectionError(f"cannot reach the server: {e}") from e
            await sleep(policy.delay(attempt, None))
        else:
            if response.status_code < 400:
                return response
            await response.aread()
            await response.aclose()
            if not _retryable(response) or attempt >= policy.max_retries:
                raise from_response(response)
            await sleep(policy.delay(attempt, response))
        attempt += 1
