"""Decoding pieces: next-token choice, a left-padded batch decoder on the KV cache, and
per-sequence text assembly (incremental detokenisation, stop strings, finish reasons).

The decoder only runs forwards; `GenerateRunner` (generate.py) calls `step()` with the
engine's lock held and the request's adapter active, one step at a time, so streams of
different adapters interleave correctly. Streaming and non-streaming use the same
`SequenceState`, so the streamed deltas always concatenate to the non-streamed text.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from serving.engine.outputs import FinishReason, GenerationDelta, GenerationOutput
from serving.engine.sampling import SamplingParams

#: Temperatures below this decode greedily (0 means greedy; tinier ones would overflow).
GREEDY_BELOW = 1e-5


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest most-likely set whose mass reaches top_p (keeps >= 1 token)."""
    if top_p >= 1.0:
        return probs
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of strictly more likely tokens
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, idx, sorted_p)


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """[n, V] float32 logits -> [n] token ids: argmax at temperature 0, else sampled."""
    if params.temperature < GREEDY_BELOW:  # dividing by a vanishing temperature overflows
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    probs = top_p_filter(probs, params.top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


class BatchDecoder:
    """Prefill a left-padded batch, then one token per `step()` for every row, on the KV cache.

    Positions come from the attention mask, so a left-padded row is computed exactly as if
    it were alone (up to float rounding of the different matrix shapes).
    """

    def __init__(
        self, model: Any, prompts: list[list[int]], pad_id: int, params: SamplingParams, device: torch.device
    ) -> None:
        self.model = model
        self.params = params
        n, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        self._ids = ids.to(device)
        self._mask = mask.to(device)
        self._pos = (self._mask.cumsum(-1) - 1).clamp(min=0)
        self._past: Any = None
        self.generator = make_generator(device, params.seed)
        self._kw = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    @torch.inference_mode()
    def step(self) -> list[int]:
        """One forward: the next token of every row (rows already finished are ignored by callers)."""
        out = self.model(
            input_ids=self._ids,
            attention_mask=self._mask,
            position_ids=self._pos,
            past_key_values=self._past,
            use_cache=True,
            **self._kw,
        )
        self._past = out.past_key_values
        tok = next_tokens(out.logits[:, -1, :].to(torch.float32), self.params, self.generator)
        self._ids = tok.unsqueeze(-1)
        self._mask = torch.cat([self._mask, self._mask.new_ones((self._mask.shape[0], 1))], dim=-1)
        self._pos = self._pos[:, -1:] + 1
        return tok.tolist()


class SequenceState:
    """One sequence's tokens, text and finish reason.

    Text is detokenised incrementally (prefix/read offsets, as TGI and vLLM do) and held
    back while it might still be the start of a stop string or an incomplete UTF-8 char.
    """

    def __init__(self, tokenizer: Any, prompt_tokens: int, params: SamplingParams, eos_ids: set[int]) -> None:
        self.tok = tokenizer
        self.prompt_tokens = prompt_tokens
        self.max_tokens = params.max_tokens
        self.stop = [s for s in params.stop if s]
        self.eos_ids = eos_ids
        self.token_ids: list[int] = []
        self._text_ids: list[int] = []  # tokens that make text (EOS excluded)
        self._prefix = self._read = 0
        self.text = ""
        self.finish_reason: FinishReason | None = None
        self._sent_text = 0
        self._sent_tokens = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _append_text(self, final: bool) -> None:
        prefix_text = self._decode(self._text_ids[self._prefix : self._read])
        new_text = self._decode(self._text_ids[self._prefix :])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            start = len(self.text)
            self.text += new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._text_ids)
            self._check_stop(start)

    def _check_stop(self, start: int) -> None:
        if not self.stop:
            return
        longest = max(len(s) for s in self.stop)
        window = max(0, start - longest + 1)
        hits = [i for i in (self.text.find(s, window) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"

    def push(self, token: int) -> None:
        """Add one generated token and decide whether the sequence is finished."""
        self.token_ids.append(token)
        if token in self.eos_ids:
            self.finish_reason = "stop"
        else:
            self._text_ids.append(token)
            self._append_text(final=False)
        if self.finish_reason is None and len(self.token_ids) >= self.max_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None and self._read < len(self._text_ids) and not self.stop_hit:
            self._append_text(final=True)

    @property
    def stop_hit(self) -> bool:
        return self.finish_reason == "stop" and bool(self.token_ids) and self.token_ids[-1] not in self.eos_ids

    def _held_back(self) -> int:
        """Chars at the end of text that may begin a stop string: not yet safe to send."""
        for k in range(min(len(self.text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self.stop):
                return k
        return 0

    def take_delta(self) -> GenerationDelta:
        """Text and tokens since the previous delta; everything once finished."""
        end = len(self.text) if self.done else len(self.text) - self._held_back()
        end = max(end, self._sent_text)
        delta = GenerationDelta(
            text=self.text[self._sent_text : end],
            token_ids=self.token_ids[self._sent_tokens :],
            finish_reason=self.finish_reason,
        )
        self._sent_text, self._sent_tokens = end, len(self.token_ids)
        return delta

    def output(self) -> GenerationOutput:
        assert self.finish_reason is not None
        return GenerationOutput(
            text=self.text,
            token_ids=list(self.token_ids),
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.token_ids),
        )
