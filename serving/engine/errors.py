"""The engine's own narrow exception type; `serving.errors` maps it to 404 at the API edge."""

from __future__ import annotations


class AdapterNotLoaded(KeyError):
    """A request names an adapter this engine has not loaded (or has evicted): load it first."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(name)

    def __str__(self) -> str:  # KeyError would quote the repr of the whole message
        return f"adapter {self.name!r} is not loaded on this engine"
