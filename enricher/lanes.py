"""Traffic lanes: live events, or a replay that may use only a share of each API's budget."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Lane"]


@dataclass(frozen=True, slots=True)
class Lane:
    """A replay's lane: its calls may use at most ``share`` of each API's rate and of each quota's
    remaining budget (live traffic keeps the rest). Live calls have no lane (``None``)."""

    replay_id: str
    share: float

    def __post_init__(self) -> None:
        if not 0 < self.share <= 1:
            raise ValueError(f"replay share must be in (0, 1], got {self.share}")
