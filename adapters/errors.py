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
