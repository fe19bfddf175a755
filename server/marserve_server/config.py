"""ServerConfig: how the HTTP server listens, whom it lets in, and how much one request may ask for."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue_len: int = 256  # sequences waiting beyond this are refused with 429 (400 if one request is larger)
    max_body_bytes: int = 4 * 2**20
    shutdown_grace_seconds: float = 30.0
    # Whole request (head and body) within this long of connecting or of the previous response, or the
    # connection is closed: half-sent requests would otherwise hold connections (and handlers) forever.
    request_read_timeout_seconds: float = 30.0
    log_level: str = "info"
    # Size bounds, checked before any work (tokenizing, queueing): each costs the server in proportion
    # to its size, for every request batched with it, while a request stays tiny on the wire.
    # A prompt of more characters than max_model_len x this cannot fit in the context, so it is refused
    # before tokenizing (seconds per megabyte). 64 is generous: no token of the default model spans more
    # than 32 characters; build_app warns when the served tokenizer has longer tokens.
    max_prompt_chars_per_token: int = 64
    # Prompts in one /v1/completions request (each is tokenized before the request is queued).
    max_prompts_per_request: int = 256
    # Stop strings are searched for in every sequence's new text after every token: count and length.
    max_stop_strings: int = 16
    max_stop_string_chars: int = 1024
    # stop_token_ids are looked up for every token generated.
    max_stop_token_ids: int = 256

    def __post_init__(self):
        if self.max_queue_len < 1:  # every request waits before it runs, so 0 would refuse them all
            raise ValueError("max_queue_len must be at least 1")
        if self.shutdown_grace_seconds < 0:
            raise ValueError("shutdown_grace_seconds must be >= 0")
        if self.request_read_timeout_seconds <= 0:
            raise ValueError("request_read_timeout_seconds must be positive")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")
        for name in ("max_prompt_chars_per_token", "max_prompts_per_request", "max_stop_string_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("max_stop_strings", "max_stop_token_ids"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
