"""How long work reports itself: the plan of work before anything is measured, then one bar
per stage with its ETA. ``Silent`` for library use; ``Bars`` (tqdm on stderr) for the CLI."""

from __future__ import annotations

import sys
import time
from typing import Protocol

from quantization.cost import WorkPlan

__all__ = ["Bars", "Progress", "Silent", "Stage"]


class Stage(Protocol):
    def update(self, n: int = 1, detail: str = "") -> None: ...

    def close(self) -> None: ...


class Progress(Protocol):
    def plan(self, work: WorkPlan) -> None:
        """The plan of work, before any measuring."""
        ...

    def stage(self, name: str, total: int, unit: str = "it") -> Stage: ...

    def note(self, message: str) -> None: ...

    def count(self, kind: str) -> None:
        """One call of ``kind`` ("denoiser", or "blocks": a block run outside a denoiser call)
        during the stage under way."""
        ...

    def done(self) -> dict[str, float]:
        """The seconds each stage took (the last one closed)."""
        ...

    def calls(self) -> dict[str, dict[str, int]]: ...


class _Quiet:
    def update(self, n: int = 1, detail: str = "") -> None:
        pass

    def close(self) -> None:
        pass


class Silent:
    """Reports nothing; keeps the seconds each stage took."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._open: tuple[str, float] | None = None
        self._calls: dict[str, dict[str, int]] = {}

    def count(self, kind: str) -> None:
        stage = "setup" if self._open is None else self._open[0]
        per = self._calls.setdefault(stage, {})
        per[kind] = per.get(kind, 0) + 1

    def calls(self) -> dict[str, dict[str, int]]:
        return {k: dict(v) for k, v in self._calls.items()}

    def _finish(self) -> None:
        if self._open is not None:
            name, start = self._open
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self._open = None

    def plan(self, work: WorkPlan) -> None:
        pass

    def stage(self, name: str, total: int, unit: str = "it") -> Stage:
        self._finish()
        self._open = (name, time.perf_counter())
        return _Quiet()

    def note(self, message: str) -> None:
        pass

    def done(self) -> dict[str, float]:
        self._finish()
        return {k: round(v, 2) for k, v in self.seconds.items()}


class _Bar:
    def __init__(self, bar) -> None:
        self.bar = bar

    def update(self, n: int = 1, detail: str = "") -> None:
        if detail:
            self.bar.set_postfix_str(detail[:50], refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class Bars(Silent):
    """The plan of work printed, then a tqdm bar per stage (ETA from its own pace)."""

    def __init__(self) -> None:
        super().__init__()
        self._bar: _Bar | None = None

    def plan(self, work: WorkPlan) -> None:
        print(work.render(), file=sys.stderr, flush=True)

    def stage(self, name: str, total: int, unit: str = "it") -> Stage:
        from tqdm import tqdm

        super().stage(name, total, unit)
        if self._bar is not None:
            self._bar.close()
        self._bar = _Bar(
            tqdm(total=total, desc=name, unit=unit, file=sys.stderr, dynamic_ncols=True)
        )
        return self._bar

    def note(self, message: str) -> None:
        from tqdm import tqdm

        # on its own line above an open bar, not glued to it
        tqdm.write(message, file=sys.stderr)

    def done(self) -> dict[str, float]:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        return super().done()
