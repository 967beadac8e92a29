"""When to serve merged (one adapter in the weights) and when mixed (base weights, per-row
low-rank updates), as dLoRA does for LoRA.

Merged is fastest while one adapter dominates the queue: a batch runs at base speed and a
swap is rare. Mixed wins when many adapters wait at once: merged batches would hold one
adapter's few requests each, with a swap between them, while one mixed batch holds them
all for the price of a pair of thin matmuls per adapter present. Hysteresis keeps the
mode from flapping on a queue near the boundary:

- enter mixed when >= `enter_min_adapters` distinct adapters wait and the most-waited-for
  one holds < `enter_top_share` of the waiting requests;
- leave mixed when the top one holds > `leave_top_share` (> enter_top_share), or fewer
  than two distinct adapters wait;
- never switch again within `min_dwell_ms` of the previous switch;
- an empty queue keeps the current mode (nothing to decide on).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Mode = Literal["merged", "mixed"]


class ModePolicyConfig(BaseModel):
    """Thresholds of the merged/mixed switch (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enter_min_adapters: int = Field(3, ge=2, description="Distinct waiting adapters (base counts as one) to enter mixed.")
    enter_top_share: float = Field(
        0.5, gt=0.0, le=1.0, description="Enter mixed only while the top adapter holds less than this share of the queue."
    )
    leave_top_share: float = Field(
        0.8, gt=0.0, le=1.0, description="Leave mixed once the top adapter holds more than this share (> enter_top_share)."
    )
    min_dwell_ms: float = Field(50.0, ge=0.0, description="Least time between two mode switches.")

    @model_validator(mode="after")
    def _ordered(self) -> "ModePolicyConfig":
        if self.leave_top_share <= self.enter_top_share:
            raise ValueError(
                f"leave_top_share ({self.leave_top_share}) must exceed enter_top_share ({self.enter_top_share})"
            )
        return self


class ModePolicy:
    """Holds the current mode; `decide` moves it with hysteresis from the waiting counts."""

    def __init__(self, config: ModePolicyConfig | None = None, mode: Mode = "merged") -> None:
        self.config = config or ModePolicyConfig()
        self.mode: Mode = mode
        self.switches = 0
        self._since = float("-inf")

    def decide(self, waiting: Mapping[Hashable, int], now: float) -> Mode:
        """The mode for the next batch, given waiting requests per adapter (seconds clock `now`)."""
        counts = [c for c in waiting.values() if c > 0]
        total = sum(counts)
        if total == 0 or (now - self._since) * 1000.0 < self.config.min_dwell_ms:
            return self.mode
        top = max(counts) / total
        if self.mode == "merged":
            if len(counts) >= self.config.enter_min_adapters and top < self.config.enter_top_share:
                self._switch("mixed", now)
        elif top > self.config.leave_top_share or len(counts) < 2:
            self._switch("merged", now)
        return self.mode

    def _switch(self, mode: Mode, now: float) -> None:
        self.mode = mode
        self.switches += 1
        self._since = now
