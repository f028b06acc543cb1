"""Progress reporting for long work, passed in by the caller (a bar headless, a hook in the editor)."""
from __future__ import annotations

from typing import Any, Protocol


class Progress(Protocol):
    """`update`'s `preview`, when given, is a zero-argument callable returning an RGB uint8
    array [h, w, 3] of the current prediction (ldm_core.preview): a consumer that shows
    previews calls it, others ignore it, so nobody pays for previews nobody sees."""

    def start(self, total: int) -> None: ...
    def update(self, done: int, total: int, preview: Any = None) -> None: ...
    def finish(self) -> None: ...


class NullProgress:
    def start(self, total: int) -> None:
        pass

    def update(self, done: int, total: int, preview: Any = None) -> None:
        pass

    def finish(self) -> None:
        pass


null_progress = NullProgress()


class BarProgress:
    """A tqdm bar on stderr."""

    def __init__(self, desc: str = "sampling") -> None:
        self.desc = desc
        self._bar = None

    def start(self, total: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=self.desc, leave=False)

    def update(self, done: int, total: int, preview: Any = None) -> None:
        if self._bar is not None:
            self._bar.n = done
            self._bar.refresh()

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
