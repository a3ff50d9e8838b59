"""One check for the whole numbers a user types: type, bounds, and a message that says both."""

from __future__ import annotations

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
