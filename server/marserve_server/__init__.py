"""marserve's OpenAI-compatible HTTP server (FastAPI + uvicorn) over the async engine."""

from marserve_server.api_server import ServerConfig, build_app, make_server, serve

__all__ = ["ServerConfig", "build_app", "make_server", "serve"]
