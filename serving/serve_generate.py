"""POST /v1/completions and /v1/chat/completions, whole or streamed (SSE).

A streamed answer pulls the replica's first delta before it is returned, so a bad
request (prompt too long, unknown adapter) still gets an error status instead of a
broken stream. Closing the returned iterator (the client went away) closes the replica
stream, which stops the generation between two tokens.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

from adapters.bundle import Task
from adapters.tasks.errors import InvalidRequest, UnsupportedTask
from adapters.tasks.kinds import RequestKind
from serving.api.errors import error_body, status_for, unwrap
from serving.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    UsageInfo,
    make_id,
    unix_now,
)
from serving.replica_io import ReplicaCall, StreamItem
from serving.service import RequestRecord, ServingContext, Target

DONE = "data: [DONE]\n\n"
log = logging.getLogger("capaserve.api")


def sse(body: object) -> str:
    data = body.model_dump_json() if hasattr(body, "model_dump_json") else json.dumps(body)  # type: ignore[union-attr]
    return f"data: {data}\n\n"


async def _target(ctx: ServingContext, model: str, record: RequestRecord, what: str, inputs: list[str]) -> Target:
    await ctx.check_inputs(inputs, "messages" if what.startswith("chat") else "prompt")
    base_task = await ctx.base_task()
    target = await ctx.resolve(model, record)
    ctx.require(target, {Task.CAUSAL_LM}, what, base_ok=base_task is Task.CAUSAL_LM, base_task=base_task)
    return target


def _usage(prompt: int, completion: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _completion_call(ctx: ServingContext, req: CompletionRequest, record: RequestRecord) -> ReplicaCall:
    prompts = req.prompts()
    target = await _target(ctx, req.model, record, "text completion", prompts)
    return ReplicaCall(adapter=target.adapter, texts=prompts, params=req.to_sampling_params())


async def _chat_call(ctx: ServingContext, req: ChatCompletionRequest, record: RequestRecord) -> ReplicaCall:
    messages = req.chat_messages()
    target = await _target(ctx, req.model, record, "chat completion", [m["content"] for m in messages])
    await _require_template(ctx, req.model)
    return ReplicaCall(adapter=target.adapter, messages=messages, params=req.to_sampling_params())


async def create_completion(ctx: ServingContext, req: CompletionRequest, record: RequestRecord) -> CompletionResponse:
    call = await _completion_call(ctx, req, record)
    result = await ctx.client.call(RequestKind.GENERATE.method, call)
    ctx.account(record, result)
    record.prompt_tokens = sum(o.prompt_tokens for o in result.outputs)
    record.completion_tokens = sum(o.completion_tokens for o in result.outputs)
    return CompletionResponse(
        model=req.model,
        choices=[CompletionChoice(text=o.text, index=i, finish_reason=o.finish_reason) for i, o in enumerate(result.outputs)],
        usage=_usage(record.prompt_tokens, record.completion_tokens),
    )


async def create_chat_completion(
    ctx: ServingContext, req: ChatCompletionRequest, record: RequestRecord
) -> ChatCompletionResponse:
    call = await _chat_call(ctx, req, record)
    result = await ctx.client.call(RequestKind.GENERATE.method, call)
    ctx.account(record, result)
    out = result.outputs[0]
    record.prompt_tokens, record.completion_tokens = out.prompt_tokens, out.completion_tokens
    return ChatCompletionResponse(
        model=req.model,
        choices=[
            ChatCompletionChoice(index=0, message=ChatResponseMessage(content=out.text), finish_reason=out.finish_reason)
        ],
        usage=_usage(out.prompt_tokens, out.completion_tokens),
    )


async def _require_template(ctx: ServingContext, model: str) -> None:
    if not (await ctx.info()).has_chat_template:
        raise UnsupportedTask(f"chat completion needs a chat template; the tokenizer of {model!r} has none")


async def _open(ctx: ServingContext, call: ReplicaCall, record: RequestRecord) -> tuple[StreamItem, AsyncIterator[StreamItem]]:
    items = ctx.client.stream(call)
    try:
        first = await items.__anext__()
    except StopAsyncIteration:
        raise InvalidRequest("the model produced no output") from None
    except BaseException:
        await items.aclose()  # type: ignore[attr-defined]
        raise
    return first, items


def _note(ctx: ServingContext, record: RequestRecord, item: StreamItem) -> None:
    ctx.account(record, item)
    if item.prompt_tokens is not None:
        record.prompt_tokens = item.prompt_tokens
    record.completion_tokens += item.completion_tokens
    if item.text and record.first_token_s is None:
        record.first_token_s = time.perf_counter() - record.start


async def _items(first: StreamItem, rest: AsyncIterator[StreamItem]) -> AsyncIterator[StreamItem]:
    yield first
    if first.finish_reason is not None:
        return
    async for item in rest:
        yield item
        if item.finish_reason is not None:
            return


def sse_error(exc: BaseException) -> str:
    """The error body (docs/http-api.md#errors) as one SSE event: how a stream that already
    answered 200 reports a failure (the OpenAI SDK raises APIError on it)."""
    exc = unwrap(exc)
    status, kind = status_for(exc)
    if status >= 500:
        log.error("stream failed after it started", exc_info=exc)
        message = "the stream was cut short by a server error; the text sent so far is incomplete"
    else:
        message = str(exc)
    return f"data: {json.dumps(error_body(message, kind, status))}\n\n"


async def _ending_in_error_event(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """`events`, but a failure once the stream has started (the replica failed, or was lost
    with its node) ends it with an error event and [DONE] instead of a cut connection."""
    try:
        async for event in events:
            yield event
    except Exception as exc:  # noqa: BLE001 - the client's connection must end cleanly
        yield sse_error(exc)
        yield DONE
    finally:
        await events.aclose()  # type: ignore[attr-defined]


async def stream_completion(ctx: ServingContext, req: CompletionRequest, record: RequestRecord) -> AsyncIterator[str]:
    call = await _completion_call(ctx, req, record)
    if len(call.texts) != 1:
        raise InvalidRequest("stream: true takes a single prompt")
    first, rest = await _open(ctx, call, record)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        cid, created = make_id("cmpl"), unix_now()
        try:
            async for item in _items(first, rest):
                _note(ctx, record, item)
                choice = CompletionChoice(text=item.text, index=0, finish_reason=item.finish_reason)
                yield sse(CompletionStreamResponse(id=cid, created=created, model=req.model, choices=[choice]))
            if include_usage:
                usage = _usage(record.prompt_tokens, record.completion_tokens)
                yield sse(CompletionStreamResponse(id=cid, created=created, model=req.model, choices=[], usage=usage))
            yield DONE
        finally:
            await rest.aclose()  # type: ignore[attr-defined]

    return _ending_in_error_event(events())


async def stream_chat_completion(
    ctx: ServingContext, req: ChatCompletionRequest, record: RequestRecord
) -> AsyncIterator[str]:
    call = await _chat_call(ctx, req, record)
    first, rest = await _open(ctx, call, record)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        cid, created = make_id("chatcmpl"), unix_now()

        def chunk(delta: DeltaMessage, finish: str | None = None) -> str:
            choice = ChatCompletionStreamChoice(index=0, delta=delta, finish_reason=finish)
            return sse(ChatCompletionStreamResponse(id=cid, created=created, model=req.model, choices=[choice]))

        try:
            yield chunk(DeltaMessage(role="assistant", content=""))
            async for item in _items(first, rest):
                _note(ctx, record, item)
                if item.text:
                    yield chunk(DeltaMessage(content=item.text))
                if item.finish_reason is not None:
                    yield chunk(DeltaMessage(), item.finish_reason)
            if include_usage:
                usage = _usage(record.prompt_tokens, record.completion_tokens)
                yield sse(
                    ChatCompletionStreamResponse(id=cid, created=created, model=req.model, choices=[], usage=usage)
                )
            yield DONE
        finally:
            await rest.aclose()  # type: ignore[attr-defined]

    return _ending_in_error_event(events())
