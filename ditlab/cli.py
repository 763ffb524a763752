"""What every command shares: numeric flag types checked at parse time, and the wrapper that turns a library
error into its one-line message and exit code."""

import argparse
import functools
import math
import sys

from ditlab.errors import DitlabError


def at_least(low):
    """An integer type accepting values >= low."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def number(low=None, high=None, low_open=False, high_open=False):
    """A finite float type within [low, high]; `low_open` / `high_open` exclude the end points."""
    lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
    hi = "" if high is None else f"{high}" + (")" if high_open else "]")
    if low is not None and high is not None:
        wanted = f"a number in {lo}, {hi}"
    elif low is not None:
        wanted = f"a number {'>' if low_open else '>='} {low}"
    else:
        wanted = f"a number {'<' if high_open else '<='} {high}"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        bad = not math.isfinite(value)
        bad = bad or (low is not None and (value <= low if low_open else value < low))
        bad = bad or (high is not None and (value >= high if high_open else value > high))
        if bad:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    parse.__name__ = wanted
    return parse


COUNT = at_least(1)  # sizes, steps, batches, intervals
INDEX = at_least(0)  # seeds, workers, labels, timesteps, "0 = never" intervals
POSITIVE = number(0, low_open=True)  # learning rates, clip norms, scales
NON_NEGATIVE = number(0)  # weight decay, guidance scale
FRACTION = number(0, 1)  # EMA decay
DROPOUT = number(0, 1, high_open=True)  # label dropout probability


def command(main):
    """Wrap a command's `main(argv=None)` so that a library error ends it with its one-line message and its
    exit code (1, or 75 for pre-emption, 3 for divergence) instead of a traceback. Other exceptions, bugs,
    keep their traceback."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except DitlabError as e:
            if e.exit_code == 1:
                raise SystemExit(f"error: {e}") from None
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(e.exit_code) from None

    return wrapped
