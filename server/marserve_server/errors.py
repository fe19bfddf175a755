"""Every failure leaves the server as an OpenAI-shaped error body with the right status; no traceback ever does.

{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from marserve.engine.async_engine import EngineDeadError, ShuttingDownError
from marserve.errors import MarserveError, RequestError
from marserve.sampling_params import SamplingParamsError
from marserve_server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "internal_server_error", 503: "service_unavailable_error"}

# Codes of the errors starlette raises before a route runs (docs/server.md lists them); a 404 for an
# unknown route has its own code, distinct from model_not_found (a route that exists, a model that does not).
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    info = ErrorInfo(message=message, type=_TYPES.get(status, "invalid_request_error"), param=param, code=code)
    return ErrorResponse(error=info).model_dump()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def from_exception(e: BaseException) -> APIError:
    """Map an engine-side exception to the error a client sees."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, SamplingParamsError):
        return APIError(400, str(e), param=e.param)
    if isinstance(e, RequestError):
        return APIError(400, str(e), param=e.param, code=e.code)
    if isinstance(e, ShuttingDownError):
        return APIError(503, str(e), code="shutting_down", headers={"Retry-After": "5"})
    if isinstance(e, EngineDeadError):
        return APIError(503, "the engine has stopped; this server cannot generate", code="engine_dead",
                        headers={"Retry-After": "30"})
    logger.error("internal error", exc_info=e)
    return APIError(500, f"internal server error ({type(e).__name__})")


def _param_of(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or None


def install(app: FastAPI, on_error=lambda status: None) -> None:
    """Exception handlers for everything; on_error(status) is told of each error answered."""

    def respond(status, message, param=None, code=None, headers=None):
        on_error(status)
        return error_response(status, message, param, code, headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return respond(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(MarserveError)
    @app.exception_handler(SamplingParamsError)
    async def _engine_refused(request: Request, e: Exception):
        err = from_exception(e)
        return respond(err.status, err.message, err.param, err.code, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = _param_of(tuple(first.get("loc", ())))
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            return respond(400, "the request body is not valid JSON", None, "invalid_json")
        return respond(400, f"{param}: {msg}" if param else msg, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        msg = e.detail if isinstance(e.detail, str) else "request failed"
        if e.status_code == 404:
            msg = f"no route {request.method} {request.url.path}"
        code = _HTTP_CODES.get(e.status_code)
        return respond(e.status_code, msg, code=code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _any(request: Request, e: Exception):
        err = from_exception(e)
        return respond(err.status, err.message, err.param, err.code, err.headers)
