"""POST /v1/classify: a sequence-classification adapter's label and probabilities per input."""

from __future__ import annotations

from adapters.bundle import Task
from serving.protocol import ClassifyData, ClassifyRequest, ClassifyResponse, EncoderUsage
from serving.replica_io import ReplicaCall
from serving.service import RequestRecord, ServingContext


async def classify(ctx: ServingContext, req: ClassifyRequest, record: RequestRecord) -> ClassifyResponse:
    await ctx.check_inputs(req.texts())
    base_task = await ctx.base_task()
    target = await ctx.resolve(req.model, record)
    ctx.require(target, {Task.SEQUENCE_CLASSIFICATION}, "classify", base_ok=False, base_task=base_task)
    result = await ctx.client.call("classify", ReplicaCall(adapter=target.adapter, texts=req.texts()))
    ctx.account(record, result)
    record.prompt_tokens = sum(result.prompt_tokens)
    return ClassifyResponse(
        model=req.model,
        data=[ClassifyData(index=i, label=o.label, probs=o.probs) for i, o in enumerate(result.outputs)],
        usage=EncoderUsage(prompt_tokens=record.prompt_tokens, total_tokens=record.prompt_tokens),
    )
