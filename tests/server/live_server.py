"""A real marserve server on 127.0.0.1 (uvicorn in a background thread) for tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
from marserve_server import ServerConfig, build_app, make_server

from marserve.engine.async_engine import AsyncEngine
from marserve.engine_config import EngineConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(model_dir, engine_kw: dict | None = None, **server_kw):
    """Yields (base_url, app); the server (the one `serve` runs) stops, and the engine with it, on exit."""
    engine = AsyncEngine.from_config(EngineConfig(model=model_dir, dtype="float32", **(engine_kw or {})))
    port = free_port()
    server_kw.setdefault("log_level", "warning")
    server_kw.setdefault("shutdown_grace_seconds", 2)
    config = ServerConfig(model_name=server_kw.pop("model_name", "baby"), port=port, **server_kw)
    app = build_app(engine, config)
    server = make_server(app, config)
    app.state.test_server = server  # for tests that stop it themselves (server.handle_exit)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    else:
        raise RuntimeError("the test server did not start")
    try:
        yield base, app
    finally:
        server.should_exit = True
        thread.join(15)
