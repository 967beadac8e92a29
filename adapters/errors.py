"""Narrow exception types of the adapter layer; the API edge maps each to one HTTP status."""

from __future__ import annotations


class BundleError(ValueError):
    """A bundle is malformed or cannot be served on this base model (HTTP 400/422).

    Carries every problem found, not just the first, so a user fixes a bundle in one go.
    """

    def __init__(self, problems: list[str] | str, *, name: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.name = name
        prefix = f"adapter {name!r}: " if name else ""
        super().__init__(prefix + "; ".join(self.problems))


#: What pydantic puts before the text of a ValueError / AssertionError raised by a validator.
_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


def validation_message(err: dict) -> str:
    """The text of one pydantic error (an item of `ValidationError.errors()`) for a person: a
    validator's own message without the "Value error, " pydantic puts before it."""
    msg = str(err.get("msg", ""))
    for prefix in _PYDANTIC_PREFIXES:
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg
