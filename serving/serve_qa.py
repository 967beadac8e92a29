"""POST /v1/question-answering: extractive answers of a question-answering adapter.

Each {question, context} pair is answered from its own context (cut into overlapping
windows on the replica, docs/bundle-format.md#question-answering); `start`/`end` are
character offsets into that context and `answer` is `context[start:end]`.
"""

from __future__ import annotations

from adapters.bundle import Task
from adapters.tasks.kinds import RequestKind
from serving.protocol import EncoderUsage, QAData, QuestionAnsweringRequest, QuestionAnsweringResponse
from serving.replica_io import ReplicaCall
from serving.service import RequestRecord, ServingContext


async def answer(ctx: ServingContext, req: QuestionAnsweringRequest, record: RequestRecord) -> QuestionAnsweringResponse:
    await ctx.check_inputs([q.question for q in req.questions()], "question")  # contexts: the replica's window bound
    base_task = await ctx.base_task()
    target = await ctx.resolve(req.model, record)
    ctx.require(target, {Task.QUESTION_ANSWERING}, "question answering", base_ok=False, base_task=base_task)
    result = await ctx.client.call(RequestKind.QA.method, ReplicaCall(adapter=target.adapter, questions=req.questions()))
    ctx.account(record, result)
    record.prompt_tokens = sum(result.prompt_tokens)
    return QuestionAnsweringResponse(
        model=req.model,
        data=[
            QAData(index=i, answer=o.answer, score=o.score, start=o.start, end=o.end) for i, o in enumerate(result.outputs)
        ],
        usage=EncoderUsage(prompt_tokens=record.prompt_tokens, total_tokens=record.prompt_tokens),
    )
