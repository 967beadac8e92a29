"""POST /v1/classify: a classification adapter's label and probabilities per input.

On a text base the inputs are texts and the adapter a sequence-classification one; on an
image base they are images (data URLs, checked by `ServingContext.encoder_call`) and the
adapter an image-classification one.
"""

from __future__ import annotations

from adapters.bundle import Task
from adapters.tasks.kinds import RequestKind
from serving.protocol import ClassifyData, ClassifyRequest, ClassifyResponse, EncoderUsage
from serving.service import RequestRecord, ServingContext


async def classify(ctx: ServingContext, req: ClassifyRequest, record: RequestRecord) -> ClassifyResponse:
    await ctx.check_inputs(req.texts())
    base_task = await ctx.base_task()
    target = await ctx.resolve(req.model, record)
    task = Task.IMAGE_CLASSIFICATION if await ctx.modality() == "image" else Task.SEQUENCE_CLASSIFICATION
    ctx.require(target, {task}, "classify", base_ok=False, base_task=base_task)
    result = await ctx.client.call(RequestKind.CLASSIFY.method, await ctx.encoder_call(target, req.texts()))
    ctx.account(record, result)
    record.prompt_tokens = sum(result.prompt_tokens)
    return ClassifyResponse(
        model=req.model,
        data=[ClassifyData(index=i, label=o.label, probs=o.probs) for i, o in enumerate(result.outputs)],
        usage=EncoderUsage(prompt_tokens=record.prompt_tokens, total_tokens=record.prompt_tokens),
    )
