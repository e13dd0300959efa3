"""Checks of the numbers a caller hands to moelite (issue 33): load options, generation options, the routing metrics,
simulator and calibration, and the command-line flags that map to them. One place, one rule per kind of number:

    int_in("n_threads", v, 1, MAX_THREADS)          -> int      an int or numpy integer (bool refused) in [lo, hi]
    finite_float("top_p", v, 0, 1, lo_open=True)    -> float    an int / float / numpy number (bool refused),
                                                                 finite, in the range (open ends as asked)
    ints_in("host_slots", v, 1, E)                  -> list     a sequence of such ints (not a str)
    cli_int(1, MAX_THREADS), cli_float(0, 1, ...)   -> argparse `type=` functions with the same ranges

A bad value is a moelite.errors.UsageError naming the argument, the value and the accepted range, e.g.
``n_threads=0: expected an integer in [1, 512]``; on the command line the same range in argparse's one-line error,
``argument --top-p: 'nan' is not a finite number in (0, 1]``. Integers that reach the C++ core are bounded by its
types (INT32_MAX for an `int` field); floats are never NaN or infinite. `optional=True` also accepts None.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ..errors import UsageError

INT32_MAX = 2**31 - 1  # an `int` field of the C++ core (csrc/model.h ModelOptions)
INT64_MAX = 2**63 - 1
MAX_THREADS = 512  # ggml's GGML_MAX_N_THREADS: a compute thread pool holds at most this many
MAX_LOOKAHEAD = 3  # gate lookahead distances the core computes (csrc/expert_cache.h kMaxLookahead)


def is_int(x: object) -> bool:
    """An integer value: int or numpy integer, not bool (True is not a count)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_real(x: object) -> bool:
    """A real number (int, float or numpy number, not bool), possibly NaN or infinite."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _int_text(n: int) -> str:
    return {INT32_MAX: "2^31 - 1", INT64_MAX: "2^63 - 1"}.get(n, str(n))


def _int_bounds(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f" in [{_int_text(lo)}, {_int_text(hi)}]"
    if lo is not None:
        return f" >= {_int_text(lo)}"
    return f" <= {_int_text(hi)}" if hi is not None else ""


def int_range(lo: int | None, hi: int | None) -> str:
    """'an integer in [1, 512]', 'an integer in [0, 2^63 - 1]', 'an integer >= 0' or 'an integer'."""
    return "an integer" + _int_bounds(lo, hi)


def float_range(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    """'a finite number in (0, 1]', 'a finite number >= 0', 'a finite number > 0' or 'a finite number'."""
    if lo is not None and hi is not None:
        return f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"a finite number {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"a finite number {'<' if hi_open else '<='} {hi:g}"
    return "a finite number"


def _show(value: Any) -> str:
    text = repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int_ok(value: Any, lo: int | None, hi: int | None) -> bool:
    return is_int(value) and (lo is None or value >= lo) and (hi is None or value <= hi)


def _float_value(value: Any, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> float | None:
    """float(value) when it is a finite real in the range, else None."""
    if not is_real(value):
        return None
    try:
        v = float(value)
    except OverflowError:  # an int beyond any double
        return None
    if not math.isfinite(v):
        return None
    if lo is not None and (v <= lo if lo_open else v < lo):
        return None
    if hi is not None and (v >= hi if hi_open else v > hi):
        return None
    return v


def _fail(name: str, value: Any, want: str, optional: bool, why: str) -> UsageError:
    return UsageError(
        f"{name}={_show(value)}: expected {want}" + (" or None" if optional else "") + (f" ({why})" if why else "")
    )


def int_in(
    name: str,
    value: Any,
    lo: int | None = None,
    hi: int | None = INT64_MAX,
    *,
    optional: bool = False,
    why: str = "",
) -> Any:
    """value as an int when it is an integer in [lo, hi] (None allowed when optional); else UsageError, `why`
    (where the bound comes from) appended in parentheses."""
    if value is None and optional:
        return None
    if not _int_ok(value, lo, hi):
        raise _fail(name, value, int_range(lo, hi), optional, why)
    return int(value)


def finite_float(
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    optional: bool = False,
    why: str = "",
) -> Any:
    """value as a float when it is a finite real in the range (None allowed when optional); else UsageError."""
    if value is None and optional:
        return None
    v = _float_value(value, lo, hi, lo_open, hi_open)
    if v is None:
        raise _fail(name, value, float_range(lo, hi, lo_open, hi_open), optional, why)
    return v


def ints_in(name: str, values: Any, lo: int | None = None, hi: int | None = INT64_MAX, *, why: str = "") -> list[int]:
    """A sequence (list, tuple, 1-D numpy array, range...) of integers in [lo, hi] as a list; the UsageError names
    the first bad item as name[i]."""
    flat = not isinstance(values, np.ndarray) or values.ndim == 1
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, Iterable) or not flat:
        raise _fail(name, values, "a list of integers" + _int_bounds(lo, hi), False, why)
    items = list(values)
    return [int_in(f"{name}[{i}]", v, lo, hi, why=why) for i, v in enumerate(items)]


# --- the command line: argparse `type=` functions with the same ranges -----------------------------------------
def cli_int(lo: int | None = None, hi: int | None = INT32_MAX, *, why: str = "") -> Callable[[str], int]:
    """argparse type: the text as an int in [lo, hi]; anything else is argparse's one-line usage error."""
    want = int_range(lo, hi) + (f" ({why})" if why else "")

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {want}") from None
        if not _int_ok(v, lo, hi):
            raise argparse.ArgumentTypeError(f"{text!r} is not {want}")
        return v

    parse.__name__ = want
    return parse


def cli_float(
    lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False, why: str = ""
) -> Callable[[str], float]:
    """argparse type: the text as a finite float in the range; 'nan', 'inf' and '1e999' are refused."""
    want = float_range(lo, hi, lo_open, hi_open) + (f" ({why})" if why else "")

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {want}") from None
        v = _float_value(v, lo, hi, lo_open, hi_open)
        if v is None:
            raise argparse.ArgumentTypeError(f"{text!r} is not {want}")
        return v

    parse.__name__ = want
    return parse
