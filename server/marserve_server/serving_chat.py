"""POST /v1/chat/completions: messages -> the tokenizer's chat template -> completions, whole or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from marserve.outputs import CompletionOutput, Logprob
from marserve_server.errors import APIError
from marserve_server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
    random_id,
)
from marserve_server.serving import (
    ServerState,
    StreamChunks,
    event_stream,
    merged_streams,
    off_loop,
    run_to_end,
    sampling_params,
    sse,
    sse_error,
    token_text,
    usage,
)


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):  # content parts: only text is understood by a text-only model
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported",
                                   param=f"messages.{i}.content")
                texts.append(part["text"])
            content = "".join(texts)
        out.append({"role": m.role, "content": content or ""})
    return out


def render_chat(state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
    tok = state.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    try:
        return tok.apply_chat_template(message_dicts(messages), tokenize=False,
                                       add_generation_prompt=add_generation_prompt)
    except APIError:
        raise
    except Exception as e:  # noqa: BLE001 - a template may refuse a conversation (roles out of order, ...)
        raise APIError(400, f"the chat template rejected these messages: {e}", param="messages") from None


def _token_logprobs(tokenizer, token_ids: list[int], entries: list[dict[int, Logprob]], k: int) -> list[TokenLogprob]:
    out = []
    for tok, entry in zip(token_ids, entries):
        text = token_text(tokenizer, tok)
        top = sorted((kv for kv in entry.items() if kv[1].rank is not None and kv[1].rank <= k),
                     key=lambda kv: kv[1].rank)
        out.append(TokenLogprob(token=text, logprob=entry[tok].logprob, bytes=list(text.encode()),
                                top_logprobs=[TopLogprob(token=(t := token_text(tokenizer, i)), logprob=lp.logprob,
                                                         bytes=list(t.encode())) for i, lp in top]))
    return out


def _choice_logprobs(state, req, o: CompletionOutput, start: int = 0) -> ChatLogprobs | None:
    if not req.logprobs:
        return None
    return ChatLogprobs(content=_token_logprobs(state.tokenizer, list(o.token_ids[start:]),
                                                list((o.logprobs or [])[start:]), req.top_logprobs or 0))


def _render_and_prepare(state: ServerState, req: ChatCompletionRequest, params) -> tuple[str, list[int]]:
    text = render_chat(state, req.messages, req.add_generation_prompt)
    state.check_prompt_chars(len(text), param="messages")  # rendering is a copy; tokenizing is the cost
    # The template already holds the special tokens it wants; do not add a BOS again.
    ids = state.tokenizer(text, add_special_tokens=False)["input_ids"]
    _, ids = state.engine.prepare({"prompt_token_ids": ids}, params)  # 400s now (context length, empty)
    return text, ids


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, raw: Request):
    state.check_model(req.model)
    if req.tools:
        raise APIError(400, "tools are not supported by this server", param="tools")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    state.check_stops(req)
    params = sampling_params(req, default_max_tokens=None,
                             logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                             defaults=state.generation_defaults)
    release = state.admit(req.n)  # before rendering and tokenizing: a full queue costs the server nothing
    try:
        text, ids = await off_loop(_render_and_prepare, state, req, params)
    except BaseException:
        release()
        raise
    base_id = random_id("chatcmpl")
    jobs = [({"prompt": text, "prompt_token_ids": ids}, params, base_id)]
    if req.stream:
        return event_stream(_stream(state, req, jobs, base_id), release)
    try:
        (res,) = await run_to_end(state, raw, jobs)
    finally:
        release()
    choices = [ChatChoice(index=o.index, message=ChatResponseMessage(content=o.text),
                          logprobs=_choice_logprobs(state, req, o), finish_reason=o.finish_reason,
                          stop_reason=o.stop_reason) for o in res.outputs]
    completion_tokens = sum(len(o.token_ids) for o in res.outputs)
    body = ChatCompletionResponse(id=base_id, model=state.model_name, choices=choices,
                                  usage=UsageInfo(prompt_tokens=len(ids), completion_tokens=completion_tokens,
                                                  total_tokens=len(ids) + completion_tokens))
    return JSONResponse(body.model_dump())


async def _stream(state: ServerState, req: ChatCompletionRequest, jobs, base_id: str) -> AsyncIterator[str]:
    out = StreamChunks(base_id, "chat.completion.chunk", state.model_name)
    try:
        yield out.chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for j in range(req.n)])
        async for _, res in merged_streams(state, jobs):
            if res.error:
                yield sse_error(APIError(500, res.error, code="generation_failed"))
                break
            choices = []
            for o in res.outputs:
                step = out.advance(o.index, o)
                if step is None:
                    continue
                delta, token_at, _ = step
                logprobs = _choice_logprobs(state, req, o, token_at)
                choices.append({"index": o.index, "delta": {"content": delta} if delta else {},
                                "logprobs": logprobs.model_dump() if logprobs else None,
                                "finish_reason": o.finish_reason if o.finished else None,
                                "stop_reason": o.stop_reason if o.finished else None})
            if choices:
                yield out.chunk(choices)
        else:
            if req.stream_options is not None and req.stream_options.include_usage:
                yield out.chunk([], usage(len(jobs[0][0]["prompt_token_ids"]), out.completion_tokens))
    except Exception as e:  # noqa: BLE001 - the status is already sent: report in the stream
        yield sse_error(e)
    yield sse("[DONE]")
