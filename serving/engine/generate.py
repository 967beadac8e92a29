"""Causal-LM requests: batched generation (one adapter, or mixed) and single streams.

Each decode step is one forward inside `AdapterResidency.merged` / `unmerged`, taking the
lock per step, so streams and batches of different adapters interleave correctly. A
request's adapters stay leased (not evictable) from its first step to its last; the
decoding pieces themselves (KV cache, sampling, text assembly) are in
serving.engine.decoding.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from adapters.bundle import Task
from adapters.tasks.errors import InvalidRequest, UnsupportedTask
from adapters.tasks.tokens import Tokens
from serving.engine.decoding import BatchDecoder, SequenceState
from serving.engine.mixed import adapter_order
from serving.engine.outputs import GenerationDelta, GenerationOutput
from serving.engine.residency import AdapterResidency
from serving.engine.sampling import SamplingParams


class GenerateRunner:
    """Runs `generate`, `generate_mixed` and `generate_stream` on a causal LM."""

    def __init__(self, model: torch.nn.Module, task: Task, tokens: Tokens, residency: AdapterResidency) -> None:
        self.model = model
        self.task = task
        self.tokens = tokens
        self.residency = residency
        self.eos_ids = eos_ids(tokens.tokenizer, model)

    def generate(self, prompts: list[str], adapter: str | None, params: SamplingParams) -> list[GenerationOutput]:
        """Complete a batch of prompts for one adapter (left-padded, KV cache, one lock per step)."""
        ids = self.prompt_ids(prompts, params)
        with self.residency.lease([adapter]) as (entry,):
            dec, states = self._decoder(ids, params)
            while not all(s.done for s in states):
                with self.residency.merged(entry):
                    toks = dec.step()
                _push(states, toks)
        return [s.output() for s in states]

    def generate_mixed(
        self, prompts: list[str], adapters: list[str | None], params: SamplingParams
    ) -> list[GenerationOutput]:
        """Complete a batch whose row i uses adapters[i] (None: the base), unmerged.

        The decoder's rows stay fixed for the whole generation (finished rows keep being
        computed), so each step installs the same per-row updates and every row's KV cache
        is its own adapter's. Greedy rows equal their merged single-adapter completion;
        sampled rows share one generator, as in `generate`.
        """
        if not isinstance(adapters, list) or not isinstance(prompts, list) or len(adapters) != len(prompts):
            raise InvalidRequest("adapters must be a list with one entry (a name or None) per text")
        ids = self.prompt_ids(prompts, params)  # errors name rows as the caller numbered them
        order = adapter_order(adapters)  # each adapter's rows one slice of the batch
        with self.residency.lease([adapters[i] for i in order]) as entries:
            dec, states = self._decoder([ids[i] for i in order], params)
            while not all(s.done for s in states):
                with self.residency.unmerged(entries):
                    toks = dec.step()
                _push(states, toks)
        restored: list[GenerationOutput | None] = [None] * len(order)
        for i, s in zip(order, states):
            restored[i] = s.output()
        return restored  # type: ignore[return-value] - every row was filled

    def generate_stream(self, prompt: str, adapter: str | None, params: SamplingParams) -> Iterator[GenerationDelta]:
        """Deltas of one completion; the last one has finish_reason set. Bad requests raise
        here, before the first delta, so a server can answer with an error status."""
        ids = self.prompt_ids([prompt], params)
        self.residency.check(adapter)
        return self._stream(ids, adapter, params)

    def _stream(self, ids: list[list[int]], adapter: str | None, params: SamplingParams) -> Iterator[GenerationDelta]:
        # resolved again (no second cache hit): it may have gone since generate_stream returned;
        # leased from the first delta until the stream ends or is closed
        with self.residency.lease([adapter], touch=False) as (entry,):
            dec, (state,) = self._decoder(ids, params)
            while not state.done:
                with self.residency.merged(entry):
                    toks = dec.step()
                state.push(toks[0])
                delta = state.take_delta()
                if delta.text or delta.finish_reason is not None or delta.token_ids:
                    yield delta

    def prompt_ids(self, prompts: list[str], params: SamplingParams) -> list[list[int]]:
        """Token ids of each prompt (errors name rows as the caller numbered them)."""
        if self.task is not Task.CAUSAL_LM:
            raise UnsupportedTask(f"text generation needs a causal LM; {self.tokens.model_id!r} is an encoder")
        return self.tokens.prompts(prompts, params)

    def _decoder(self, ids: list[list[int]], params: SamplingParams) -> tuple[BatchDecoder, list[SequenceState]]:
        tok = self.tokens.tokenizer
        dec = BatchDecoder(self.model, ids, int(tok.pad_token_id), params, self.residency.device)
        return dec, [SequenceState(tok, len(p), params, self.eos_ids) for p in ids]


def _push(states: list[SequenceState], toks: list[int]) -> None:
    """One step's token per row; finished rows (still computed) ignore theirs."""
    for s, tok in zip(states, toks):
        if not s.done:
            s.push(tok)


def eos_ids(tokenizer: Any, model: torch.nn.Module) -> set[int]:
    """Every id that ends a sequence: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    tok_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    gen_cfg = getattr(model, "generation_config", None)
    for v in (tok_eos, getattr(gen_cfg, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids
