"""User-facing errors: the CLI prints them as one line, the server maps them to HTTP errors."""


class MarserveError(Exception):
    """An error a user can act on; its message is the whole story (no traceback needed)."""


class CheckpointError(MarserveError):
    """A model directory cannot be served: the message names the file and, where it applies, the tensor."""


class ConfigError(MarserveError):
    """A configuration value (config.json field, CLI flag, engine argument) is invalid."""


class RequestError(MarserveError):
    """A request cannot be served as asked (e.g. prompt longer than the context)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code
