"""Response objects: pydantic models in OpenAI's shapes that keep any field a newer server adds."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Obj(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Obj):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(_Obj):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(_Obj):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(_Obj):
    id: str
    object: str = "text_completion"
    created: int = 0
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Obj):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(_Obj):
    content: list[TokenLogprob] | None = None


class ChatMessage(_Obj):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(_Obj):
    index: int
    message: ChatMessage
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(_Obj):
    id: str
    object: str = "chat.completion"
    created: int = 0
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(_Obj):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(_Obj):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(_Obj):
    id: str
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class Model(_Obj):
    id: str
    object: str = "model"
    owned_by: str | None = None
    max_model_len: int | None = None


class ModelList(_Obj):
    object: str = "list"
    data: list[Model]


class Health(_Obj):
    status: str


class Tokens(_Obj):
    tokens: list[int]
    count: int
    max_model_len: int | None = None
