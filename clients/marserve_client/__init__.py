"""marserve-client: a small Python SDK for marserve's OpenAI-compatible HTTP API."""

__version__ = "0.1.0"
