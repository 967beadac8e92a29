"""The scheduler's `BatchRunner` over one replica's engine: engine calls in, answers out.

It runs on the engine workers and does nothing else: no registry read, no adapter load.
An adapter missing from the engine (evicted under its byte budget since its requests were
admitted) surfaces as `AdapterNotLoaded`; the deployment makes it resident again off the
engine's threads and resubmits the request once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from adapters.bundle import Task
from adapters.tasks.kinds import RequestKind
from serving.config import SchedulerConfig
from serving.engine.continuous import DecodeLoop
from serving.engine.engine import Engine
from serving.engine.outputs import EngineStats
from serving.replica_io import ClassOutput, QAOutput

T = TypeVar("T")


class EngineRunner:
    """Runs the scheduler's batches on the engine; `observe` gets the engine's stats after each call."""

    def __init__(
        self,
        engine: Engine,
        observe: Callable[[EngineStats], None],
        scheduler: SchedulerConfig | None = None,
        decode_threads: int | None = None,
    ) -> None:
        self.engine = engine
        self._observe = observe
        self._scheduler = scheduler or SchedulerConfig()
        self._decode_threads = decode_threads

    def run_batch(self, kinds: list[RequestKind], adapter: str | None, texts: list[Any]) -> list[Any]:
        """One merged encoder call (input i is a kinds[i] request); (output, prompt_tokens) per input."""
        e = self.engine
        try:
            return _encoder_results(e.encode(texts, [adapter] * len(texts), kinds))
        finally:
            self._observe(e.stats())

    def run_mixed_batch(self, kinds: list[RequestKind], adapters: list[str | None], texts: list[Any]) -> list[Any]:
        """Adaptive mode: one unmerged encoder call, input i with adapters[i]."""
        e = self.engine
        try:
            return _encoder_results(e.encode(texts, adapters, kinds, mixed=True))
        finally:
            self._observe(e.stats())

    def decode_loop(self) -> DecodeLoop | None:
        """Generation by continuous batching on this engine (serving/engine/continuous.py): one
        decoder on its own thread with `decode_threads` torch threads (an engine worker's: 1 on a
        CPU), None for a base that does not generate (an encoder: the ingress refuses
        generation for it). A sequence's adapter is resident before it is queued (the replica
        admits it first); one evicted meanwhile fails its lease with AdapterNotLoaded, which the
        replica answers by admitting it again.

        Why one decoder: a decode step reads every weight once whatever its rows, so two half
        batches read the weights twice and contend for the GIL (in process on this 2-core host,
        16 closed-loop users, bfloat16: one decoder on two threads 1,085 tokens/s, two decoders
        on one thread each 547). Why one thread on a CPU: in the server the event loop, Ray and
        the ingress share the cores, and an intra-op thread that loses its core stalls every
        parallel region of the step; bench_generate with the same 16 users gave 538 / 446
        tokens/s (max_tokens 32 / 24..96) on one thread against 512 / 401 on two."""
        if self.engine.task is not Task.CAUSAL_LM:
            return None
        s = self._scheduler
        decoder = self.engine.continuous_decoder(
            s.max_batch_size, s.prefill_chunk_tokens, self._observed, stream_interval_s=s.stream_interval_ms / 1000.0
        )
        return DecodeLoop([decoder], threads=self._decode_threads)

    def prompt_ids(self, texts: list[str], params: Any) -> list[list[int]]:
        """Generation prompts' token ids (InvalidRequest for a bad one)."""
        return self.engine.prompt_ids(texts, params)

    def _observed(self, _refs: list[str | None], fn: Callable[[], T]) -> T:
        """The decoders' guard around each adapter lease: the engine's stats after it."""
        try:
            return fn()
        finally:
            self._observe(self.engine.stats())


def _encoder_results(rows: list[Any]) -> list[Any]:
    """EncodedRow -> (float32 embedding array | ClassOutput | QAOutput, prompt_tokens): what the ingress answers with."""
    return [(_encoder_output(r), r.prompt_tokens) for r in rows]


def _encoder_output(r: Any) -> Any:
    if r.task == RequestKind.EMBED:
        return r.embedding.numpy()  # pickled as one buffer, written to JSON by orjson as is
    if r.task == RequestKind.QA:
        return QAOutput(answer=r.answer, score=r.score, start=r.start, end=r.end)
    return ClassOutput(label=r.label, probs=r.probs.tolist(), label_names=list(r.label_names or []))
