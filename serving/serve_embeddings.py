"""POST /v1/embeddings: the base encoder or an encoder adapter, mean-pooled and normalised.

On an image base the inputs are images (data URLs) and the vector is the same rule over the
image's positions: the mean of the last hidden states of the class token and every patch,
L2-normalised. Any encoder adapter (feature extraction, classification, question answering)
embeds with its adapted encoder; its head is not used.

OpenAI's options are honoured so its SDK works unchanged: `encoding_format="base64"` (its
default) returns each vector's little-endian float32 bytes base64-encoded, and
`dimensions=N` keeps the first N components and L2-normalises them again (the rule OpenAI
documents for its shortened embeddings). Truncation is exact for Matryoshka-trained models
and an approximation for others; the caller opts in, so it is allowed for every encoder.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from adapters.tasks.errors import InvalidRequest
from adapters.tasks.kinds import RequestKind
from adapters.validation import ENCODER_TASKS
from serving.engine.pooling import l2_normalize
from serving.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EncoderUsage
from serving.service import RequestRecord, ServingContext


def shape_vectors(vectors: Sequence[Any], dimensions: int | None, encoding: str) -> list[np.ndarray | str]:
    """Truncate and re-normalise (when `dimensions` is set), then encode each float32 vector."""
    arr = np.asarray(np.stack(vectors) if len(vectors) else np.zeros((0, 0)), dtype=np.float32)
    if dimensions is not None:
        arr = l2_normalize(torch.from_numpy(np.ascontiguousarray(arr[:, :dimensions]))).numpy()  # the engine's own rule
    if encoding == "base64":
        little = arr.astype("<f4", copy=False)
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    return list(arr)


async def create_embeddings(ctx: ServingContext, req: EmbeddingRequest, record: RequestRecord) -> EmbeddingResponse:
    await ctx.check_inputs(req.texts())
    base_task = await ctx.base_task()
    target = await ctx.resolve(req.model, record)
    ctx.require(target, ENCODER_TASKS, "embeddings", base_ok=base_task in ENCODER_TASKS, base_task=base_task)
    if req.dimensions is not None:  # refused before any compute
        size = int((await ctx.info()).spec["hidden_size"])
        if req.dimensions > size:
            raise InvalidRequest(f"dimensions must be between 1 and the model's size {size}, got {req.dimensions}")
    result = await ctx.client.call(RequestKind.EMBED.method, await ctx.encoder_call(target, req.texts()))
    ctx.account(record, result)
    record.prompt_tokens = sum(result.prompt_tokens)
    vectors = shape_vectors(result.outputs, req.dimensions, req.encoding_format)
    # Built without validation: the vectors are the engine's own float32 arrays, and
    # validating them as 384 Python floats each is the cost `render` exists to avoid.
    return EmbeddingResponse.model_construct(
        data=[EmbeddingData.model_construct(embedding=v, index=i) for i, v in enumerate(vectors)],
        model=req.model,
        usage=EncoderUsage(prompt_tokens=record.prompt_tokens, total_tokens=record.prompt_tokens),
    )
