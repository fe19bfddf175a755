"""The FastAPI app: thin routes over the serving layer, API-key and body-size guards, lifespan, graceful stop.

build_app(engine, ServerConfig) -> app; serve(engine, ServerConfig) runs it with uvicorn. On SIGTERM
the server stops accepting connections, answers 503 on /ready and to new requests on open
connections, lets running requests finish for up to `shutdown_grace_seconds`, ends the rest with an
error their clients read (an SSE error event and [DONE], or a 503 body), then exits.
"""

from __future__ import annotations

import hmac
import json
import logging
import signal
import socket
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response

import marserve
from marserve.engine.async_engine import AsyncEngine
from marserve_server import errors
from marserve_server.config import ServerConfig
from marserve_server.http_protocol import with_read_timeout
from marserve_server.metrics import ServerMetrics
from marserve_server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from marserve_server.request_outcomes import RequestOutcomes
from marserve_server.serving import ServerState, off_loop, warn_if_tokens_outrun_the_prompt_bound
from marserve_server.serving_chat import create_chat_completion, render_chat
from marserve_server.serving_completions import create_completion

logger = logging.getLogger(__name__)

# With an API key these need it. The OpenAPI schema and its pages describe the protected routes, so they
# are protected too; probes (/health, /ready), /metrics and /version stay open.
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/openapi.json", "/docs", "/redoc")


class _Guard:
    """Pure ASGI middleware (keeps streaming and disconnect detection intact): API key, then body size."""

    def __init__(self, app, config: ServerConfig, metrics: ServerMetrics):
        self.app, self.config, self.metrics = app, config, metrics

    async def _reject(self, send, status: int, message: str, code: str, headers: dict | None = None):
        self.metrics.observe_error(status)
        body = json.dumps(errors.error_body(status, message, None, code)).encode()
        raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = self.config.api_key
        if key and scope["path"].startswith(PROTECTED_PREFIXES):
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return await self._reject(send, 401, "invalid or missing API key (Authorization: Bearer <key>)",
                                          "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        limit = self.config.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._reject(send, 413, f"the request body is larger than {limit} bytes",
                                      "request_too_large")
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # a chunked body has no Content-Length to refuse up front
                    # FastAPI turns other exceptions raised while it reads the body into a 400; an
                    # HTTPException it passes on (errors.py maps 413 to code request_too_large).
                    raise HTTPException(413, f"the request body is larger than {limit} bytes")
            return message

        return await self.app(scope, limited_receive, send)


def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    metrics = ServerMetrics(engine, config.model_name)
    state = ServerState(engine=engine, config=config, metrics=metrics)
    warn_if_tokens_outrun_the_prompt_bound(engine.tokenizer, config.max_prompt_chars_per_token)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        logger.info("serving %s (context %d tokens)", config.model_name, engine.max_model_len)
        yield
        state.draining = True
        await engine.shutdown(grace_seconds=config.shutdown_grace_seconds)

    app = FastAPI(title="marserve", version=marserve.__version__, lifespan=lifespan)
    app.state.server = state
    errors.install(app, on_error=metrics.observe_error)
    app.add_middleware(_Guard, config=config, metrics=metrics)
    app.add_middleware(RequestOutcomes, metrics=metrics)  # added last = outermost: sees the guard's answers too

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await create_completion(state, req, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        return await create_chat_completion(state, req, raw)

    @app.get("/v1/models")
    async def models():
        # root names the served model, never its directory: a path on the server is not the clients' business.
        card = ModelCard(id=config.model_name, root=config.model_name, max_model_len=engine.max_model_len)
        return ModelList(data=[card]).model_dump()

    @app.get("/health")
    async def health():
        if not engine.is_running:
            return errors.error_response(503, "the engine loop is not running", code="engine_dead")
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready():
        if state.draining or not engine.is_running:
            return errors.error_response(503, "not ready (shutting down or engine stopped)", code="not_ready",
                                         headers={"Retry-After": "5"})
        return JSONResponse({"status": "ready"})

    @app.get("/version")
    async def version():
        return {"version": marserve.__version__}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def _tokenize(req: TokenizeRequest) -> str:
        if req.messages is not None:
            text = render_chat(state, req.messages, req.add_generation_prompt)
            state.check_prompt_chars(len(text), param="messages")
            ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = engine.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
        # Serialised here too: a megabyte prompt has a million ids, too many to encode on the event loop.
        return json.dumps({"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len},
                          separators=(",", ":"))

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        state.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise errors.APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
        if req.prompt is not None:
            state.check_prompt_chars(len(req.prompt))  # nothing longer could ever be a prompt here
        return Response(await off_loop(_tokenize, req), media_type="application/json")

    def _detokenize(tokens: list[int]) -> dict:
        vocab = engine.model_config.vocab_size
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise errors.APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": engine.tokenizer.decode(tokens)}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        state.check_model(req.model)
        # A 4 MB body holds a million ids: checking and decoding them takes long enough to stall the loop.
        return await off_loop(_detokenize, req.tokens)

    return app


# After the drain has ended every engine request, what uvicorn may still wait for: handlers writing
# their last error event or error body, and idle keep-alive connections closing.
SHUTDOWN_FLUSH_SECONDS = 5


class _Server(uvicorn.Server):
    """uvicorn, plus: mark the app as draining the moment a stop signal arrives, and drain the engine
    before uvicorn closes connections, so that a request outliving the grace ends with an error its
    client can read, never a cut connection."""

    def __init__(self, config: uvicorn.Config, state: ServerState, grace_seconds: float):
        super().__init__(config)
        self._state, self._grace_seconds = state, grace_seconds

    def handle_exit(self, sig, frame) -> None:
        self._state.draining = True
        super().handle_exit(sig, frame)
        # uvicorn raises a captured signal again once it has shut down, so the process died of SIGTERM
        # (exit -15 / 143) even after a clean drain. SIGTERM is how deployments stop a server: after the
        # drain it exits 0. (SIGINT, Ctrl-C, is left to uvicorn's way.)
        if sig == signal.SIGTERM:
            self._captured_signals = [s for s in getattr(self, "_captured_signals", []) if s != signal.SIGTERM]

    async def shutdown(self, sockets=None) -> None:
        self._state.draining = True
        for server in self.servers:
            server.close()  # no new connections while running requests finish
        # uvicorn alone would wait its graceful timeout and then cancel the handlers mid-response
        # (streams cut without [DONE], plain-text 500s, tracebacks). Abort first, then close.
        await self._state.engine.drain(self._grace_seconds)
        await super().shutdown(sockets)


def make_server(app: FastAPI, config: ServerConfig) -> uvicorn.Server:
    """The uvicorn server for an app from build_app (also used by the tests' live server)."""
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level.lower(),
                        timeout_graceful_shutdown=SHUTDOWN_FLUSH_SECONDS,
                        http=with_read_timeout(config.request_read_timeout_seconds))
    return _Server(uv, app.state.server, config.shutdown_grace_seconds)


def serve(engine: AsyncEngine, config: ServerConfig, sock: socket.socket | None = None) -> None:
    """Runs the app until stopped; on `sock` (bound to config.host:config.port) when the caller claimed
    the port beforehand, else uvicorn binds it."""
    make_server(build_app(engine, config), config).run(sockets=None if sock is None else [sock])
