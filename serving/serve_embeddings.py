"""POST /v1/embeddings: the base encoder or an encoder adapter, mean-pooled and normalised."""

from __future__ import annotations

from adapters.bundle import Task
from serving.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, UsageInfo
from serving.replica_io import ReplicaCall
from serving.service import RequestRecord, ServingContext

ENCODER_TASKS = {Task.FEATURE_EXTRACTION, Task.SEQUENCE_CLASSIFICATION}


async def create_embeddings(ctx: ServingContext, req: EmbeddingRequest, record: RequestRecord) -> EmbeddingResponse:
    base_task = await ctx.base_task()
    target = await ctx.resolve(req.model, record)
    ctx.require(target, ENCODER_TASKS, "embeddings", base_ok=base_task in ENCODER_TASKS, base_task=base_task)
    result = await ctx.client.call("embed", ReplicaCall(adapter=target.adapter, texts=req.texts()))
    ctx.account(record, result)
    record.prompt_tokens = sum(result.prompt_tokens)
    return EmbeddingResponse(
        data=[EmbeddingData(embedding=v, index=i) for i, v in enumerate(result.outputs)],
        model=req.model,
        usage=UsageInfo(prompt_tokens=record.prompt_tokens, total_tokens=record.prompt_tokens),
    )
