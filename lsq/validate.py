"""One check each for the numbers a user types (whole, or any finite number): type, bounds, and a
message that says both."""

from __future__ import annotations

import math
import operator

from lsq.errors import LSQError


def whole_number(value: object, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int if it is a whole number within [lo, hi] (either bound optional).

    Python, NumPy and 0-d tensor integers pass, and so do floats with no fraction (a number
    widget's 16.0); booleans, fractions and text are refused with ``name`` and the bounds in the
    message, e.g. "resolution must be a whole number from 32 to 1024, got 8".
    """
    if lo is not None and hi is not None:
        wanted = f"a whole number from {lo} to {hi}"
    elif lo is not None:
        wanted = f"a whole number of at least {lo}"
    elif hi is not None:
        wanted = f"a whole number of at most {hi}"
    else:
        wanted = "a whole number"
    number: int | None = None
    if not isinstance(value, bool):
        if isinstance(value, float) and value.is_integer():
            number = int(value)
        else:
            try:
                number = operator.index(value)
            except TypeError:
                number = None
    if number is None or (lo is not None and number < lo) or (hi is not None and number > hi):
        raise LSQError(f"{name} must be {wanted}, got {value!r}")
    return number


def finite_number(
    value: object, name: str, lo: float | None = None, hi: float | None = None
) -> float | int:
    """``value`` unchanged if it is a finite int or float within [lo, hi] (either bound optional).

    Booleans, NaN, infinities and text are refused ("lr must be a finite number, got nan"), and so
    is a number out of bounds ("weight_decay must be from 0 to 1, got 2.0").
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LSQError(f"{name} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if lo is not None and hi is not None:
            wanted = f"from {lo:g} to {hi:g}"
        else:
            wanted = f"at least {lo:g}" if lo is not None else f"at most {hi:g}"
        raise LSQError(f"{name} must be {wanted}, got {value!r}")
    return value
