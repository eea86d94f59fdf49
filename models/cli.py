"""Command-line pieces shared by train.py, demo.py and ``python -m models.images.pregenerate``.

Bad input is one ``error: ...`` line on stderr and exit status 2, never a usage dump or a traceback.
Under torchrun only rank 0 prints it; the other ranks exit with the same status, quietly.
"""
from __future__ import annotations

import argparse
import math
import os
import sys


def is_rank0() -> bool:
    """Whether this process is rank 0 of a distributed launch (or not launched distributed at all)."""
    return os.environ.get("RANK", "0") == "0"


def report_error(message: str) -> None:
    """Print ``error: message`` on stderr, from rank 0 only."""
    if is_rank0():
        print(f"error: {message}", file=sys.stderr, flush=True)


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one ``error: ...`` line (exit status 2) instead of usage + error."""

    def error(self, message: str):
        report_error(f"{message} (see --help)")
        raise SystemExit(2)


def int_at_least(low: int, what: str):
    """argparse type: an integer >= ``low`` (``what`` names it in the error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0, "an integer >= 0")


def finite_float(low: float | None = None, high: float | None = None, *, low_open: bool = False):
    """argparse type: a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (low is None or (value > low if low_open else value >= low)) and (
            high is None or value <= high)
        if not ok:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
            hi = "" if high is None else f"<= {high:g}"
            rule = " and ".join(r for r in (lo, hi) if r)
            raise argparse.ArgumentTypeError(f"must be a finite number{' ' + rule if rule else ''}, got {text!r}")
        return value

    return parse


SEED_RANGE = (0, 2**32 - 1)  # what numpy accepts


def seed(text: str) -> int:
    """argparse type: a seed every RNG accepts (0 .. 2**32 - 1)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {SEED_RANGE[1]}, got {text!r}")
    return value
