"""Argument types for the ``prefloss`` sub-commands' parsers: checked at parse time.

Each function here is an ``argparse`` ``type=``: it turns the text into a value or raises
``argparse.ArgumentTypeError`` saying what was expected and what came. argparse prefixes the
message with the flag (``argument --repeats: ...``) and exits with status 2 before any work runs.

    parser.add_argument("--repeats", type=positive_int)
    parser.add_argument("--seq-len", type=int_list(minimum=1))
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = [
    "InputError",
    "finite_float",
    "int_at_least",
    "int_list",
    "nonnegative_float",
    "nonnegative_int",
    "positive_float",
    "positive_int",
    "probability",
    "random_seed",
    "seed_list",
]


class InputError(ValueError):
    """Bad input from the user (an argument, a data file), said in the message.

    The ``prefloss`` command prints such an error as one line, ``prefloss <command>: error: ...``,
    with no traceback, and exits with status 2.
    """


def _int(text: str, expected: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _float(text: str, expected: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer ``>= minimum``."""
    expected = f"an integer >= {minimum}"

    def parse(text: str) -> int:
        value = _int(text, expected)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # argparse names the type in "invalid <name> value"
    return parse


positive_int = int_at_least(1)
positive_int.__doc__ = "An integer >= 1."
nonnegative_int = int_at_least(0)
nonnegative_int.__doc__ = "An integer >= 0."


def random_seed(text: str) -> int:
    """A seed every generator takes (torch, numpy, Python's ``random``): an integer in [0, 2**32 - 1]."""
    expected = "an integer in [0, 4294967295]"
    value = _int(text, expected)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


MAX_SEEDS = 1000


def seed_list(text: str) -> list[int]:
    """Seeds as a range ``A-B`` (both included, ``A <= B``) or comma-separated (``0,3,7``), each a
    `random_seed`; at most `MAX_SEEDS` of them, repeats dropped."""
    expected = f"seeds as A-B (A <= B) or A,B,..., each in [0, 4294967295], at most {MAX_SEEDS}"
    low, dash, high = text.partition("-")
    try:
        if dash and low.strip():  # a range; a leading "-" is a negative number, refused below
            a, b = random_seed(low.strip()), random_seed(high.strip())
            if a > b or b - a >= MAX_SEEDS:
                raise argparse.ArgumentTypeError("")
            seeds = list(range(a, b + 1))
        else:
            seeds = list(dict.fromkeys(random_seed(v.strip()) for v in text.split(",") if v.strip()))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not seeds or len(seeds) > MAX_SEEDS:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return seeds


seed_list.__name__ = "seed list"


def finite_float(text: str) -> float:
    """A finite number (no nan, no inf)."""
    return _float(text, "a finite number")


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _float(text, "a finite number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _float(text, "a finite number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def probability(text: str) -> float:
    """A number in [0, 1]."""
    value = _float(text, "a number in [0, 1]")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def int_list(minimum: int = 1, example: str = "") -> Callable[[str], list[int]]:
    """A comma-separated, non-empty list of integers, each ``>= minimum`` (e.g. ``"128,512"``)."""
    expected = f"a comma-separated list of integers >= {minimum}" + (f" like {example}" if example else "")

    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not values or any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return values

    parse.__name__ = "integer list"
    return parse
