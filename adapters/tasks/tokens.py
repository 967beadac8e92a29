"""The tokenizer behind one lock, with the length checks every request gets.

Fast tokenizers may reconfigure their Rust state on a call (padding, truncation), so two
calls must never overlap; one lock here serves every runner and the facade.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from adapters.tasks.errors import InvalidRequest, UnsupportedTask


class TokenBudget(Protocol):
    """What `Tokens.prompts` reads of a request's sampling parameters (serving's
    SamplingParams is one): the tokens it may generate after the prompt."""

    @property
    def max_tokens(self) -> int: ...


class Tokens:
    """Tokenises requests for one model and rejects those longer than `max_len` tokens."""

    def __init__(self, tokenizer: Any, max_len: int, model_id: str) -> None:
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.model_id = model_id
        #: held by every call into the tokenizer (adapters.tasks.qa cuts its windows under it too)
        self.lock = threading.Lock()

    def texts(self, texts: list[str]) -> Any:
        """Encoder inputs, unpadded (the runner pads per chunk); each within max_len."""
        if not isinstance(texts, list) or not texts:
            raise InvalidRequest("input must be a non-empty list of strings")
        if not all(isinstance(t, str) for t in texts):
            raise InvalidRequest("every input must be a string")
        with self.lock:
            enc = self.tokenizer(texts, add_special_tokens=True)
        for i, ids in enumerate(enc["input_ids"]):
            if len(ids) > self.max_len:
                raise InvalidRequest(f"input {i} has {len(ids)} tokens, more than the limit of {self.max_len}")
        return enc

    def pad(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        """Token rows (one text, or one question-answering window, each) as one padded batch
        of CPU tensors."""
        keys = rows[0].keys()
        with self.lock:
            return dict(self.tokenizer.pad({k: [r[k] for r in rows] for k in keys}, return_tensors="pt"))

    def prompts(self, prompts: list[str], params: TokenBudget) -> list[list[int]]:
        """Prompt ids (an empty prompt becomes BOS); each prompt plus max_tokens within max_len."""
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise InvalidRequest("prompt must be a non-empty list of strings")
        with self.lock:
            encoded = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        out: list[list[int]] = []
        for i, ids in enumerate(encoded):
            if not ids:
                bos = self.tokenizer.bos_token_id
                if bos is None:
                    raise InvalidRequest(f"prompt {i} is empty")
                ids = [bos]
            if len(ids) + params.max_tokens > self.max_len:
                raise InvalidRequest(
                    f"prompt {i} has {len(ids)} tokens; with max_tokens={params.max_tokens} it exceeds "
                    f"the limit of {self.max_len} tokens"
                )
            out.append(list(ids))
        return out

    def count(self, texts: list[str]) -> int:
        with self.lock:
            encoded = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        return sum(len(ids) for ids in encoded)

    def chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for chat messages, ending with the assistant turn's opening."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise UnsupportedTask(f"model {self.model_id!r} has no chat template")
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise InvalidRequest("messages must be a non-empty list of {role, content} objects")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
