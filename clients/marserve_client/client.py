"""Client and AsyncClient: `client.completions.create(...)`, `client.chat.completions.create(...)`,
`client.models.list()`, `client.health()`, `client.tokenize(...)`, `client.detokenize(...)`.

Keyword arguments are the API's fields (see the server's docs/server.md); None values are left
out, `extra_body` is merged in as is. `stream=True` returns an iterator of chunks.
"""

from __future__ import annotations

import os
import time
from typing import Any

import httpx

from marserve_client import _http
from marserve_client.streaming import AsyncStream, Stream
from marserve_client.types import ChatCompletion, ChatCompletionChunk, Completion, Health, ModelList, Tokens

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 600.0  # generation can take long; connect failures still surface fast
DEFAULT_CONNECT_TIMEOUT = 5.0


def _body(kwargs: dict[str, Any]) -> dict[str, Any]:
    extra = kwargs.pop("extra_body", None) or {}
    body = {k: v for k, v in kwargs.items() if v is not None}
    body.update(extra)
    return body


class _Base:
    def __init__(self, base_url: str | None, api_key: str | None, timeout: float | httpx.Timeout | None,
                 max_retries: int):
        base = (base_url or os.environ.get("MARSERVE_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]  # accept the OpenAI-style base URL too
        self.base_url = base
        self.api_key = api_key if api_key is not None else os.environ.get("MARSERVE_API_KEY")
        if timeout is None:
            timeout = httpx.Timeout(DEFAULT_TIMEOUT, connect=DEFAULT_CONNECT_TIMEOUT)
        self.timeout = timeout
        self.retry = _http.RetryPolicy(max_retries=max_retries)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


class Client(_Base):
    def __init__(self, base_url: str | None = None, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = None, max_retries: int = 2,
                 transport: httpx.BaseTransport | None = None):
        super().__init__(base_url, api_key, timeout, max_retries)
        self._http = httpx.Client(base_url=self.base_url, timeout=self.timeout, headers=self._headers(),
                                  transport=transport)
        self._sleep = time.sleep
        self.completions = _Completions(self)
        self.chat = _Chat(_ChatCompletions(self))
        self.models = _Models(self)

    def _request(self, method: str, path: str, json: dict | None = None, stream: bool = False) -> httpx.Response:
        request = self._http.build_request(method, path, json=json)
        return _http.send(self._http, request, self.retry, stream=stream, sleep=self._sleep)

    def _create(self, path: str, kwargs: dict, whole, chunk):
        body = _body(kwargs)
        if body.get("stream"):
            return Stream(self._request("POST", path, body, stream=True), chunk)
        return whole.model_validate(self._request("POST", path, body).json())

    def health(self) -> Health:
        return Health.model_validate(self._request("GET", "/health").json())

    def tokenize(self, prompt: str | None = None, messages: list[dict] | None = None, **kwargs) -> Tokens:
        return Tokens.model_validate(self._request("POST", "/tokenize",
                                                   _body(dict(prompt=prompt, messages=messages, **kwargs))).json())

    def detokenize(self, tokens: list[int], **kwargs) -> str:
        return self._request("POST", "/detokenize", _body(dict(tokens=tokens, **kwargs))).json()["prompt"]

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient(_Base):
    def __init__(self, base_url: str | None = None, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = None, max_retries: int = 2,
                 transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(base_url, api_key, timeout, max_retries)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout, headers=self._headers(),
                                       transport=transport)
        import asyncio
        self._sleep = asyncio.sleep
        self.completions = _AsyncCompletions(self)
        self.chat = _Chat(_AsyncChatCompletions(self))
        self.models = _AsyncModels(self)

    async def _request(self, method: str, path: str, json: dict | None = None,
                       stream: bool = False) -> httpx.Response:
        request = self._http.build_request(method, path, json=json)
        return await _http.asend(self._http, request, self.retry, stream=stream, sleep=self._sleep)

    async def _create(self, path: str, kwargs: dict, whole, chunk):
        body = _body(kwargs)
        if body.get("stream"):
            return AsyncStream(await self._request("POST", path, body, stream=True), chunk)
        return whole.model_validate((await self._request("POST", path, body)).json())

    async def health(self) -> Health:
        return Health.model_validate((await self._request("GET", "/health")).json())

    async def tokenize(self, prompt: str | None = None, messages: list[dict] | None = None, **kwargs) -> Tokens:
        r = await self._request("POST", "/tokenize", _body(dict(prompt=prompt, messages=messages, **kwargs)))
        return Tokens.model_validate(r.json())

    async def detokenize(self, tokens: list[int], **kwargs) -> str:
        return (await self._request("POST", "/detokenize", _body(dict(tokens=tokens, **kwargs)))).json()["prompt"]

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


class _Chat:
    def __init__(self, completions):
        self.completions = completions


class _Completions:
    def __init__(self, client: Client):
        self._client = client

    def create(self, *, model: str | None = None, prompt, **kwargs) -> Completion | Stream:
        return self._client._create("/v1/completions", dict(model=model, prompt=prompt, **kwargs), Completion,
                                    Completion)


class _ChatCompletions:
    def __init__(self, client: Client):
        self._client = client

    def create(self, *, model: str | None = None, messages: list[dict], **kwargs) -> ChatCompletion | Stream:
        return self._client._create("/v1/chat/completions", dict(model=model, messages=messages, **kwargs),
                                    ChatCompletion, ChatCompletionChunk)


class _Models:
    def __init__(self, client: Client):
        self._client = client

    def list(self) -> ModelList:
        return ModelList.model_validate(self._client._request("GET", "/v1/models").json())


class _AsyncCompletions:
    def __init__(self, client: AsyncClient):
        self._client = client

    async def create(self, *, model: str | None = None, prompt, **kwargs) -> Completion | AsyncStream:
        return await self._client._create("/v1/completions", dict(model=model, prompt=prompt, **kwargs), Completion,
                                          Completion)


class _AsyncChatCompletions:
    def __init__(self, client: AsyncClient):
        self._client = client

    async def create(self, *, model: str | None = None, messages: list[dict],
                     **kwargs) -> ChatCompletion | AsyncStream:
        return await self._client._create("/v1/chat/completions", dict(model=model, messages=messages, **kwargs),
                                          ChatCompletion, ChatCompletionChunk)


class _AsyncModels:
    def __init__(self, client: AsyncClient):
        self._client = client

    async def list(self) -> ModelList:
        return ModelList.model_validate((await self._client._request("GET", "/v1/models")).json())
