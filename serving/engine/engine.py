"""The engine: one base model, many CapaBoost adapters merged into it in place.

`Engine` is a facade that loads the model and wires the parts that do the work:
- `Tokens` (tokens.py): the tokenizer behind one lock, length checks, chat template;
- `AdapterResidency` (residency.py): loaded adapters, the weights they are written into,
  the one RLock no forward runs without, and the leases that keep in-use adapters loaded;
- `EncodeRunner` (encode.py): embeddings, classification and question answering (qa.py),
  merged or mixed, on text or (`ImageInputs`, images.py) image inputs;
- `GenerateRunner` (generate.py): batched, mixed and streamed generation on a causal LM.
No forward ever overlaps a swap, and generation takes the lock per decode step, so
interleaved requests of different adapters stay correct. No Ray in here: the Ray Serve
deployment (serving.deployments) is a shim over this class.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from adapters.bundle import AdapterBundle, Task
from adapters.tasks.kinds import RequestKind
from adapters.tasks.model_loader import LoadedModel, load_model
from adapters.tasks.pixels import ImageInputs
from adapters.tasks.tokens import Tokens
from serving.config import EngineConfig
from serving.engine.continuous import ContinuousDecoder, Guard
from serving.engine.encode import AdapterMode, EncodeInput, EncodeRunner
from serving.engine.generate import GenerateRunner
from serving.engine.packed import maybe_pack
from serving.engine.outputs import (
    EncodedRow,
    EngineStats,
    GenerationDelta,
    GenerationOutput,
    LoadedAdapterInfo,
)
from serving.engine.residency import AdapterResidency
from serving.engine.sampling import SamplingParams


class Engine:
    """Serves the base model and its loaded adapters; thread-safe."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        _set_threads(config)
        self._setup(config, load_model(config))

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, config: EngineConfig | None = None) -> "Engine":
        """An engine over an already built model (benchmarks on random models built in memory)."""
        self = cls.__new__(cls)
        config = config or EngineConfig()
        _set_threads(config)
        self._setup(config, loaded)
        return self

    def _setup(self, config: EngineConfig, loaded: LoadedModel) -> None:
        self.config = config
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.task: Task = loaded.task
        self.spec = loaded.spec
        self.model_id: str = loaded.spec.model_id
        self.device: torch.device = loaded.device
        self.dtype: torch.dtype = loaded.dtype
        #: the weights' dtype and why (the dtype setting and the startup guard's verdict)
        self.precision = loaded.precision
        #: linear layers running on prepacked weights (serving/engine/packed.py); 0 when not packed
        self.packed_layers = maybe_pack(loaded.model, loaded.device, loaded.dtype, config.pack_weights)
        self.max_len = min(config.max_seq_len, loaded.max_positions)
        self.tokens = Tokens(loaded.tokenizer, self.max_len, self.model_id)
        self.residency = AdapterResidency(
            loaded.model, loaded.spec, loaded.device, config.adapter_cache_bytes, config.dense_budget_bytes
        )
        #: an image base's pixels (its image processor); None for a text base
        self.images = (
            ImageInputs(loaded.processor, loaded.model, loaded.device, loaded.dtype)
            if loaded.processor is not None else None
        )
        self._encoder = EncodeRunner(loaded.model, loaded.task, self.tokens, self.residency, self.images)
        self._generator = GenerateRunner(loaded.model, loaded.task, self.tokens, self.residency)

    # ------------------------------------------------------------------ adapters

    def load_adapter(self, name: str, bundle: AdapterBundle) -> LoadedAdapterInfo:
        """Validate, pre-merge and insert (evicting LRU entries if needed); replaces `name`.

        Raises BundleError (nothing changed) if the bundle cannot be served here, Overloaded
        if only active or in-use adapters are left to evict.
        """
        return self.residency.load(name, bundle)

    def unload_adapter(self, name: str) -> None:
        """Drop an adapter; if it is active the base is restored first."""
        self.residency.unload(name)

    def list_adapters(self) -> list[LoadedAdapterInfo]:
        return self.residency.infos()

    def has_adapter(self, name: str) -> bool:
        return self.residency.has(name)

    def activate(self, name: str | None) -> bool:
        """Make `name` (None: the base) the weights in place; True when weights were rewritten."""
        return self.residency.activate(name)

    def stats(self) -> EngineStats:
        return self.residency.stats()

    # ------------------------------------------------------------------ requests

    def encode(
        self, inputs: list[EncodeInput], adapters: list[str | None], tasks: list[RequestKind], *, mixed: bool = False
    ) -> list[EncodedRow]:
        """One encoder pass over inputs that may mix embeddings, classification and question
        answering: texts (or, for "qa", `QAInput` pairs) on a text base, PNG/JPEG bytes on an
        image base.

        Input i uses adapters[i] (None: the base) and gets tasks[i]. Merged (the default)
        needs one adapter for all inputs; mixed=True runs them unmerged, each with its own.
        """
        return self._encoder.encode(inputs, adapters, tasks, mixed=mixed)

    @property
    def unpadded(self) -> bool:
        """Whether encoder forwards (merged and mixed) compute only real tokens (serving/engine/unpadded.py)."""
        return self._encoder.unpadded

    @property
    def mode(self) -> AdapterMode:
        """How the last encoder forward ran: merged (one adapter in the weights) or mixed."""
        return self._encoder.mode

    def generate(self, prompts: list[str], adapter: str | None, params: SamplingParams) -> list[GenerationOutput]:
        """Complete a batch of prompts for one adapter."""
        return self._generator.generate(prompts, adapter, params)

    def generate_mixed(
        self, prompts: list[str], adapters: list[str | None], params: SamplingParams
    ) -> list[GenerationOutput]:
        """Complete a batch whose row i uses adapters[i] (None: the base), unmerged."""
        return self._generator.generate_mixed(prompts, adapters, params)

    def generate_stream(self, prompt: str, adapter: str | None, params: SamplingParams) -> Iterator[GenerationDelta]:
        """Deltas of one completion, the last with finish_reason set. Bad requests raise here,
        before the first delta; the adapter stays leased from the first delta to the last."""
        return self._generator.generate_stream(prompt, adapter, params)

    def prompt_ids(self, prompts: list[str], params: SamplingParams) -> list[list[int]]:
        """Token ids of generation prompts; InvalidRequest (400) for a bad or too long one, or on an encoder."""
        return self._generator.prompt_ids(prompts, params)

    def continuous_decoder(
        self, max_rows: int, prefill_tokens: int, guard: Guard | None = None, share: int = 1,
        stream_interval_s: float = 0.0,
    ) -> ContinuousDecoder:
        """A continuous-batching decoder over this engine (serving/engine/continuous.py), its KV cache
        bounded by `kv_cache_bytes` / `share` (one of `share` decoders side by side); `guard(refs, fn)`
        runs each adapter lease (a replica reloads an adapter evicted since the request was queued);
        a stream's deltas are handed over at most every `stream_interval_s`."""
        g = self._generator
        return ContinuousDecoder(
            self.model, self.tokenizer, self.residency, g.eos_ids, self.config.kv_cache_bytes // share, max_rows,
            prefill_tokens, guard, stream_interval_s,
        )

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for chat messages, ending with the assistant turn's opening."""
        return self.tokens.chat(messages)

    def count_tokens(self, texts: list[str]) -> int:
        return self.tokens.count(texts)


def _set_threads(config: EngineConfig) -> None:
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
