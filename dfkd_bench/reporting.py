"""What a run tells the outside world while it runs (the CLI draws a rich progress bar from it)."""

from __future__ import annotations

from typing import Any, Protocol


class Reporter(Protocol):
    """Progress of one run: rounds, epochs and one-line messages."""

    def start(self, total_rounds: int, done_rounds: int, description: str) -> None: ...
    def round_done(self, epoch: int, round_: int, terms: dict[str, float]) -> None: ...
    def epoch_done(self, record: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...


class SilentReporter:
    """A :class:`Reporter` that shows nothing (library calls, Ray tasks, tests)."""

    def start(self, total_rounds: int, done_rounds: int, description: str) -> None:
        pass

    def round_done(self, epoch: int, round_: int, terms: dict[str, float]) -> None:
        pass

    def epoch_done(self, record: dict[str, Any]) -> None:
        pass

    def message(self, text: str) -> None:
        pass


__all__ = ["Reporter", "SilentReporter"]
