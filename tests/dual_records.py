"""Dual records for tests: the golden dual.json files written by the code before `DualRecord`
(tests/data/dual_record, see test_dual_record.py), and copies of them with values changed, so
a test states only the values it is about and still passes a whole record."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from dualign.pipelines.dual_stage import DualRecord

GOLDEN = Path(__file__).parent / "data" / "dual_record"


def golden_record(name: str) -> DualRecord:
    """Golden case `name`: "margins" (two margin constraints), "rate" (safety/harm as a maximum
    unsafe rate, safety/tox as a margin), "unsigned" (one constraint, no unsafe rates) or "demo"."""
    return DualRecord.read(GOLDEN / f"{name}.dual.json")


def dual_record(name: str = "margins", *, predicted: dict | None = None, constraints: list[dict] | None = None,
                **changes) -> DualRecord:
    """Golden record `name` with `changes` (DualRecord fields); `predicted` changes fields of its
    PredictedRecord; `constraints`, one dict per constraint kept, changes fields of the first
    len(constraints) constraints and drops the others."""
    d = golden_record(name)
    if predicted:
        changes["predicted"] = dataclasses.replace(d.predicted, **predicted)
    if constraints is not None:
        changes["constraints"] = tuple(dataclasses.replace(c, **kw) for c, kw in zip(d.constraints, constraints))
    return dataclasses.replace(d, **changes)
