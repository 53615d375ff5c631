"""A pipeline call in its run directory: the lock, config.json, which stages the call runs,
their wall times, and the records that let a rerun skip a stage whose inputs have not changed.

Each finished stage leaves `stages/<name>.json` with the digest of everything it read
(settings and upstream digests) and the files it wrote. A stage is current when that
record matches and its outputs exist, so rerunning a killed or finished pipeline redoes
only what is missing or stale.

A recipe (MoCAN, PeCAN) is one `with Run(cfg, stages, start, stop, log) as run:` block that
calls `run.begin(stage, message)` before each stage; the call for the first stage past `stop`
ends the block, and the recipe returns `run.dir` after it.
"""
from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path

from ..runio import write_json
from .config import validated


def stage_key(*parts) -> str:
    """A digest of JSON-serializable parts (settings, upstream keys, file digests)."""
    from ..runio import digest

    return digest(parts)


def is_current(run: Path, name: str, key: str) -> bool:
    """Whether stage `name` finished in `run` with inputs digested to `key`, its outputs all there."""
    rec = Path(run) / "stages" / f"{name}.json"
    if not rec.exists():
        return False
    d = json.loads(rec.read_text())
    return d.get("key") == key and all((Path(run) / o).exists() for o in d.get("outputs", []))


def mark_done(run: Path, name: str, key: str, outputs: list[str]) -> None:
    """Record stage `name` as finished with inputs `key` and `outputs` (paths relative to `run`)."""
    write_json({"stage": name, "key": key, "outputs": outputs}, Path(run) / "stages" / f"{name}.json")


class StageClock:
    """Wall time of each stage of one pipeline call, in seconds, kept in `timings.json` in the
    run directory (rewritten atomically as each stage ends, so a killed run keeps the stages
    it finished). A stage found current and skipped shows up with its (short) checking time.

    Use: `clock = StageClock(run, log)`, then `clock("sample", "[1/7 sample] ...")` at the start
    of each stage (it ends the previous one), `clock.stop()` at the end."""

    FILE = "timings.json"

    def __init__(self, run: Path, log=print):
        self._now, self._log, self._path = time.perf_counter, log, Path(run) / self.FILE
        self.seconds: dict[str, float] = {}
        self._current, self._t0 = None, self._now()

    def __call__(self, name: str, message: str) -> None:
        self.stop()
        self._current, self._t0 = name, self._now()
        self._log(message)

    def stop(self) -> None:
        if self._current is not None:
            self.seconds[self._current] = round(self._now() - self._t0, 2)
            self._current = None
            write_json({"seconds": self.seconds, "total": round(sum(self.seconds.values()), 2)}, self._path)


def stage_window(start: str | None, stop: str | None, stages: tuple[str, ...]) -> tuple[int, int]:
    """Indices in `stages` of the first stage forced to rerun and the last stage to run.

    Raises
    ------
    ValueError
        An unknown stage name.
    """
    for s in (start, stop):
        if s is not None and s not in stages:
            raise ValueError(f"unknown stage '{s}': one of {', '.join(stages)}")
    first = stages.index(start) if start else len(stages)
    last = stages.index(stop) if stop else len(stages) - 1
    return first, last


class _PastStop(Exception):
    """Raised by `Run.begin` for a stage after `stop`; the `with Run(...)` block swallows it."""


class Run:
    """One call of a pipeline in its run directory `cfg.out`.

    `with Run(cfg, stages, start, stop, log) as run:` checks the stage names and the settings
    (`cfg.validate()`) before anything is created, then takes the folder's lock (`run_lock`: a
    second run into it is refused) and, under torchrun / accelerate launch, one process group
    for the whole run, and writes config.json. Inside the block:

    - `run.begin(name, message)` starts stage `name`: logs `message` and starts its clock
      (timings.json, `StageClock`); for a stage after `stop` it ends the block instead (the
      `with` statement swallows that exit, and the code after the block runs).
    - `run.force(name)`: whether the call reruns stage `name` even when current (`start` and
      every stage after it).
    - `run.dir`: the run directory; `run.log`: the log function.

    Leaving the block stops the clock, then leaves the process group and the lock.

    Raises
    ------
    ValueError
        An unknown `start` or `stop` (`stage_window`).
    InputError
        As `cfg.validate()`; the folder is in use by another run (`run_lock`).
    """

    def __init__(self, cfg, stages: tuple[str, ...], start: str | None = None, stop: str | None = None,
                 log=print):
        self.cfg, self.stages, self.dir, self.log = cfg, tuple(stages), Path(cfg.out), log
        self._start, self._stop = start, stop
        self._stack: ExitStack | None = None

    def __enter__(self) -> Run:
        from ..parallel import process_group
        from ..runio import run_lock

        validated(self.cfg)
        self._first, self._last = stage_window(self._start, self._stop, self.stages)
        stack = ExitStack()
        try:
            stack.enter_context(run_lock(self.dir))
            # one process group for the whole run: every sharded stage (sampling, scoring,
            # log-probs) and the Trainer use it. A gloo group torn down and set up again in one
            # process can fail to connect (it did at the third stage, every 2-rank run)
            stack.enter_context(process_group())
            self.dir.mkdir(parents=True, exist_ok=True)
            self.clock = StageClock(self.dir, self.log)
            stack.callback(self.clock.stop)  # left first: the last stage's time, then the group and lock
            write_json(self.cfg.to_dict(), self.dir / "config.json")
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, self._stack = self._stack, None
        if exc_type is _PastStop:  # the planned end: leave as after the last stage
            stack.close()
            return True
        return bool(stack.__exit__(exc_type, exc, tb))

    def force(self, name: str) -> bool:
        """Whether stage `name` reruns even when current (raises ValueError for an unknown name)."""
        return self._index(name) >= self._first

    def begin(self, name: str, message: str) -> None:
        """Start stage `name` (log `message`, start its clock), or end the run's block when
        `name` comes after `stop`. Raises ValueError for an unknown name."""
        if self._index(name) > self._last:
            raise _PastStop(name)
        self.clock(name, message)

    def _index(self, name: str) -> int:
        if name not in self.stages:
            raise ValueError(f"unknown stage '{name}': one of {', '.join(self.stages)}")
        return self.stages.index(name)
