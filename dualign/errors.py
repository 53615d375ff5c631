"""The exceptions dualign raises on purpose. The CLI turns each into one line and exit code 2."""
from __future__ import annotations


class DualignError(Exception):
    """Base class: an error whose message is meant for the user, not a traceback."""


class InputError(DualignError, ValueError):
    """Bad user input: names the file, the record and the field when they are known."""

    def __init__(self, message: str, *, file: str | None = None, record: int | str | None = None,
                 field: str | None = None):
        where = []
        if file is not None:
            where.append(str(file))
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field '{field}'")
        self.file, self.record, self.field = file, record, field
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")


class InfeasibleMarginError(DualignError, ValueError):
    """A safety margin that no reweighting of the reference's samples can reach.

    Attributes
    ----------
    constraint : int or str
        Which constraint (index or name) is out of reach.
    margin : float
        The margin that was asked for.
    max_gain : numpy.ndarray, shape (m,)
        The largest achievable gain of every constraint on this sample.
    """

    def __init__(self, message: str, *, constraint, margin: float, max_gain):
        self.constraint, self.margin, self.max_gain = constraint, margin, max_gain
        super().__init__(message)


class OutputError(InputError):
    """An output path that cannot be written: not a regular file (a directory, symlink, FIFO or
    device), under a file, read-only, or a write that failed (e.g. a full disk). Names the path."""


class DualNotConvergedError(DualignError, ArithmeticError):
    """The dual's solver stopped short of its tolerance on a problem whose margins are reachable.

    Never returned as a result: the multipliers it reached are kept for inspection only.

    Attributes
    ----------
    lam : numpy.ndarray, shape (m,)
        The last iterate.
    kkt_residual : float
        Its scaled KKT residual (slack in units of each constraint's largest achievable gain).
    iterations : int
        Newton iterations taken.
    """

    def __init__(self, message: str, *, lam, kkt_residual: float, iterations: int):
        self.lam, self.kkt_residual, self.iterations = lam, kkt_residual, iterations
        super().__init__(message)


def settings_from_dict(cls, d, section: str, what: str = "settings"):
    """Build the settings dataclass `cls` from a YAML mapping `d` (the config's `section`).

    Raises
    ------
    InputError
        `d` is not a mapping (naming `section`); an unknown key (naming `section.key` and the
        closest valid name); or a value `cls` rejects with a TypeError/ValueError (naming
        `section`). An InputError raised by `cls`'s own checks passes through.
    """
    import dataclasses
    import difflib
    import typing

    if d is not None and not isinstance(d, dict):
        raise InputError(f"expected a mapping of {what}, got {type(d).__name__}", field=section)
    d = dict(d or {})
    known = sorted(f.name for f in dataclasses.fields(cls))
    for key in sorted(map(str, set(d) - set(known))):
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(known)}"
        raise InputError(f"unknown {what[:-1] if what.endswith('s') else what} ({hint})", field=f"{section}.{key}")
    # YAML 1.1 (PyYAML, and `--train.learning_rate 5e-4` on the command line) reads 5e-4 as a
    # string: a float field takes the number it spells, checked here, before any work starts
    hints = typing.get_type_hints(cls)
    for key, value in list(d.items()):
        if hints.get(key) is float and isinstance(value, str):
            try:
                d[key] = float(value)
            except ValueError:
                raise InputError(f"expected a number, got {value!r}", field=f"{section}.{key}") from None
    try:
        return cls(**d)
    except InputError:
        raise
    except (TypeError, ValueError) as e:  # a wrong type deep in a check, e.g. epochs "three"
        raise InputError(f"invalid {what} ({e})", field=section) from None
