"""`marserve serve [MODEL_DIR]`: the OpenAI-compatible HTTP server (flags named as vLLM names them)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket

from marserve import progress
from marserve.commands.expert_flags import add_expert_flags, expert_kwargs
from marserve.commands.generate import resolve_model_dir
from marserve.errors import ConfigError

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", nargs="?", default=None,
                   help="Hugging Face model directory (default: the bundled default model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="model name clients use (default: the directory name; marserve-default for the shipped model)")
    p.add_argument("--api-key", default=os.environ.get("MARSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes, /tokenize, /detokenize and the OpenAPI "
                        "schema and pages (default: $MARSERVE_API_KEY)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences in one batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens computed in one step")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="memory for the paged KV cache")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-queue-len", type=int, default=256, help="sequences (prompts x n) allowed to wait; beyond this 429 (400 for one request larger than this)")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="larger request bodies get 413")
    # Size bounds checked before any work (400 naming the field); docs/server.md says why each exists.
    p.add_argument("--max-prompt-chars-per-token", type=int, default=64,
                   help="a prompt of more characters than max_model_len x this is refused before tokenizing")
    p.add_argument("--max-prompts-per-request", type=int, default=256, help="prompts in one /v1/completions request")
    p.add_argument("--max-stop-strings", type=int, default=16, help="stop strings in one request")
    p.add_argument("--max-stop-string-chars", type=int, default=1024, help="characters in one stop string")
    p.add_argument("--max-stop-token-ids", type=int, default=256, help="stop_token_ids in one request")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds running requests may take to finish after SIGTERM")
    p.add_argument("--request-read-timeout", type=float, default=30.0,
                   help="seconds a client has to send a whole request (head and body) before its connection is closed")
    add_expert_flags(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    progress.add_quiet_flag(p)


def claim_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or a one-line ConfigError: taken before the model loads, so a busy port
    fails at once instead of after the load, and nothing can take the port while the model loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ConfigError(f"cannot listen on {host}: {e.strerror} (check --host)") from None
    sock = socket.socket(family, kind, proto)
    # As uvicorn does: lets a restart bind while the last run's connections sit in TIME_WAIT; on Linux a
    # port another socket listens on stays refused.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} is in use (on {host}); stop what holds it or pick another with --port") \
                from None
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def run(args: argparse.Namespace) -> int:
    sock = claim_port(args.host, args.port)  # before the imports and the load: a busy port fails in a second
    from marserve.engine.async_engine import AsyncEngine
    from marserve.engine_config import EngineConfig
    from marserve_server import ServerConfig, serve
    from marserve import DEFAULT_MODEL_DIR
    model_dir = resolve_model_dir(args.model_dir)
    default_name = "marserve-default" if model_dir.resolve() == DEFAULT_MODEL_DIR.resolve() else model_dir.resolve().name
    try:
        server_config = ServerConfig(model_name=args.served_model_name or default_name, host=args.host,
                                     port=args.port, api_key=args.api_key or None, max_queue_len=args.max_queue_len,
                                     max_body_bytes=int(args.max_body_mb * 2**20),
                                     max_prompt_chars_per_token=args.max_prompt_chars_per_token,
                                     max_prompts_per_request=args.max_prompts_per_request,
                                     max_stop_strings=args.max_stop_strings,
                                     max_stop_string_chars=args.max_stop_string_chars,
                                     max_stop_token_ids=args.max_stop_token_ids,
                                     shutdown_grace_seconds=args.shutdown_grace,
                                     request_read_timeout_seconds=args.request_read_timeout, log_level=args.log_level)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    engine = AsyncEngine.from_config(EngineConfig(
        model=model_dir, dtype=args.dtype, seed=args.seed, kv_cache_gb=args.kv_cache_gb, block_size=args.block_size,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, enable_prefix_caching=args.enable_prefix_caching, **expert_kwargs(args)))
    logger.info("model %s loaded; listening on http://%s:%d (OpenAI API under /v1)", server_config.model_name,
                args.host, args.port)
    serve(engine, server_config, sock=sock)
    return 0
