"""POST /v1/completions: prompts (text or token ids, one or many) -> completions, whole or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from marserve.outputs import CompletionOutput, Logprob, RequestOutput
from marserve.sampling_params import SamplingParams
from marserve_server.errors import APIError
from marserve_server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
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

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def _prompts(state: ServerState, req: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts, each bounded in size before any is tokenized."""
    p = req.prompt
    if isinstance(p, str):
        prompts = [p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    elif not p:
        raise APIError(400, "prompt must not be empty", param="prompt")
    else:
        prompts = p
    limit = state.config.max_prompts_per_request
    if len(prompts) > limit:
        raise APIError(400, f"{len(prompts)} prompts in one request; at most {limit} (--max-prompts-per-request)",
                       param="prompt", code="too_many_prompts")
    for prompt in prompts:
        if isinstance(prompt, str):
            state.check_prompt_chars(len(prompt))
    return prompts


def _check(req: CompletionRequest) -> None:
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of other than n is not supported", param="best_of")


def _jobs(state: ServerState, prompts: list[str | list[int]], params: SamplingParams, base_id: str):
    """Tokenize and check every prompt (in a worker thread: seconds for a long prompt)."""
    jobs = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            text, ids = state.engine.prepare(prompt, params)  # 400s now, before anything is queued
        else:
            text, ids = state.engine.prepare({"prompt_token_ids": prompt}, params)
            text = state.tokenizer.decode(ids)
        jobs.append(({"prompt": text, "prompt_token_ids": ids}, params, f"{base_id}-{i}"))
    return jobs


def _logprobs(tokenizer, token_ids: list[int], entries: list[dict[int, Logprob] | None], k: int,
              offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for tok, entry in zip(token_ids, entries):
        text = token_text(tokenizer, tok)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:  # the first prompt token has no logprob
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(entry[tok].logprob)
        top = sorted((lp for lp in entry.items() if lp[1].rank is not None and lp[1].rank <= k),
                     key=lambda kv: kv[1].rank)
        out.top_logprobs.append({token_text(tokenizer, t): lp.logprob for t, lp in top} if k else None)
    return out


def _choice(state: ServerState, req: CompletionRequest, index: int, res: RequestOutput,
            o: CompletionOutput) -> CompletionChoice:
    text = (res.prompt or "") + o.text if req.echo else o.text
    logprobs = None
    if req.logprobs is not None:
        ids, entries = list(o.token_ids), list(o.logprobs or [])
        if req.echo:
            ids = list(res.prompt_token_ids) + ids
            entries = list(res.prompt_logprobs or [None] * len(res.prompt_token_ids)) + entries
        logprobs = _logprobs(state.tokenizer, ids, entries, req.logprobs, 0)
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=o.finish_reason,
                            stop_reason=o.stop_reason)


async def create_completion(state: ServerState, req: CompletionRequest, raw: Request):
    state.check_model(req.model)
    _check(req)
    state.check_stops(req)
    # Every check that costs nothing comes before the work that costs: sizes, parameters, admission,
    # and only then tokenizing.
    prompts = _prompts(state, req)
    params = sampling_params(req, default_max_tokens=DEFAULT_MAX_TOKENS, logprobs=req.logprobs,
                             prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None,
                             defaults=state.generation_defaults)
    base_id = random_id("cmpl")
    release = state.admit(len(prompts) * req.n, param="prompt" if len(prompts) > 1 else "n")
    try:
        jobs = await off_loop(_jobs, state, prompts, params, base_id)
    except BaseException:
        release()
        raise
    if req.stream:
        return event_stream(_stream(state, req, jobs, base_id), release)
    try:
        results = await run_to_end(state, raw, jobs)
    finally:
        release()
    choices = [_choice(state, req, i * req.n + o.index, res, o) for i, res in enumerate(results) for o in res.outputs]
    prompt_tokens = sum(len(r.prompt_token_ids) for r in results)
    completion_tokens = sum(len(o.token_ids) for r in results for o in r.outputs)
    body = CompletionResponse(id=base_id, model=state.model_name, choices=choices,
                              usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                              total_tokens=prompt_tokens + completion_tokens))
    return JSONResponse(body.model_dump())


async def _stream(state: ServerState, req: CompletionRequest, jobs, base_id: str) -> AsyncIterator[str]:
    out = StreamChunks(base_id, "text_completion", state.model_name)
    try:
        if req.echo:
            yield out.chunk([{"index": i * req.n + j, "text": job[0]["prompt"], "logprobs": None,
                              "finish_reason": None} for i, job in enumerate(jobs) for j in range(req.n)])
        async for i, res in merged_streams(state, jobs):
            if res.error:
                yield sse_error(APIError(500, res.error, code="generation_failed"))
                break
            choices = []
            for o in res.outputs:
                index = i * req.n + o.index
                step = out.advance(index, o)
                if step is None:
                    continue
                delta, token_at, text_at = step
                logprobs = None
                if req.logprobs is not None and len(o.token_ids) > token_at:
                    logprobs = _logprobs(state.tokenizer, list(o.token_ids[token_at:]),
                                         (o.logprobs or [])[token_at:], req.logprobs, text_at).model_dump()
                choices.append({"index": index, "text": delta, "logprobs": logprobs,
                                "finish_reason": o.finish_reason if o.finished else None,
                                "stop_reason": o.stop_reason if o.finished else None})
            if choices:
                yield out.chunk(choices)
        else:
            if req.stream_options is not None and req.stream_options.include_usage:
                prompt_tokens = sum(len(job[0]["prompt_token_ids"]) for job in jobs)
                yield out.chunk([], usage(prompt_tokens, out.completion_tokens))
    except Exception as e:  # noqa: BLE001 - the status is already sent: report in the stream
        yield sse_error(e)
    yield sse("[DONE]")
